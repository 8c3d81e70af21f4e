"""A group of frozen expert matrices (a layer's w1|w3, or its w2) dequantised into one [E, out, in] tensor.

NF4 groups are dequantised in one bitsandbytes call where their blocks line up (`dequantizes_together`), straight
from the staging buffer when the packed data sits back to back there (`adjacent`), else one call per matrix.
"""

from __future__ import annotations

import torch


def frozen_weights(layers) -> list[torch.Tensor]:
    return [getattr(layer, "base_layer", layer).weight for layer in layers]


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "Params4bit"


def matrix_shape(weight: torch.Tensor) -> torch.Size:
    return weight.quant_state.shape if is_quantized(weight) else weight.shape


def dequantizes_together(weights) -> bool:
    """Whether a group of Params4bit can be dequantised as one tensor: same format, and no 4-bit block and
    no block of the double-quantised constants straddling two matrices."""
    first = weights[0].quant_state
    for weight in weights:
        state = weight.quant_state
        if (state.shape != first.shape or state.blocksize != first.blocksize or state.quant_type != first.quant_type
                or state.nested != first.nested or state.shape.numel() % state.blocksize):
            return False
        if state.nested and (state.state2.blocksize != first.state2.blocksize or state.absmax.numel() % state.state2.blocksize):
            return False
    return True


def stacked_frozen_weights(groups, dtype: torch.dtype) -> torch.Tensor:
    """[E, out, in]: per expert, its frozen Linear weights (w1 and w3, or w2) concatenated along `out`.

    All of a group's weights are NF4, or none is (grouped_adapters checks)."""
    weights = frozen_weights(layer for group in groups for layer in group)
    shapes = [matrix_shape(w) for w in weights]
    stacked_shape = (len(groups), sum(s[0] for s in shapes[: len(groups[0])]), shapes[0][1])
    if not is_quantized(weights[0]):
        return torch.cat(weights).to(dtype).view(stacked_shape)
    if dequantizes_together(weights):
        return _dequantize_together(weights, stacked_shape, dtype)
    return _dequantize_each(weights, dtype).view(stacked_shape)


def _dequantize_together(weights, shape, dtype: torch.dtype) -> torch.Tensor:
    """All matrices of a group in one dequantisation: their packed data and constants concatenated.

    bitsandbytes quantises each matrix on its own (own absmax, own double-quantisation offset), but its
    kernels only need the blocks in order: with no block straddling two matrices, the concatenation is
    the same maths as one call per matrix, in a few launches instead of a few per matrix. The copy of the
    packed data costs a quarter of the bf16 output's traffic.
    """
    import bitsandbytes.functional as bnbf

    states = [w.quant_state for w in weights]
    first = states[0]
    with torch._C.DisableTorchFunctionSubclass():  # plain tensors: Params4bit would wrap the result
        packed = adjacent(weights)  # streamed experts sit back to back in their staging buffer
        if packed is None:
            packed = torch.cat(weights)
    absmax = torch.stack([s.absmax for s in states])  # the kernels read absmax as flat memory: [M, blocks] is fine
    if first.nested:
        nested = bnbf.QuantState(absmax=torch.cat([s.state2.absmax for s in states]), code=first.state2.code,
                                 blocksize=first.state2.blocksize, dtype=torch.float32)
        absmax = bnbf.dequantize_blockwise(absmax, nested) + torch.stack([s.offset for s in states]).view(-1, 1)
    state = bnbf.QuantState(absmax=absmax, shape=torch.Size(shape), code=first.code, blocksize=first.blocksize,
                            quant_type=first.quant_type, dtype=dtype)
    return bnbf.dequantize_4bit(packed, state)


def adjacent(weights) -> torch.Tensor | None:
    """The packed data of `weights` as one tensor without a copy, when they are consecutive in one storage
    (streamed experts in their staging buffer). Reads pointers only: `.data` would dispatch a detach each."""
    storage = weights[0].untyped_storage().data_ptr()
    end = weights[0].data_ptr()
    for weight in weights:
        if weight.data_ptr() != end or weight.untyped_storage().data_ptr() != storage or not weight.is_contiguous():
            return None
        end += weight.numel() * weight.element_size()
    return weights[0].as_strided((sum(w.numel() for w in weights), 1), (1, 1))  # one view op, over all of them


def _dequantize_each(weights, dtype: torch.dtype) -> torch.Tensor:
    """One dequantisation per matrix into one buffer (matrices whose blocks do not line up)."""
    import bitsandbytes.functional as bnbf

    rows = [w.quant_state.shape[0] for w in weights]
    stacked = torch.empty(sum(rows), weights[0].quant_state.shape[1], dtype=dtype, device=weights[0].device)
    for weight, target in zip(weights, stacked.split(rows)):
        if target.is_cuda and weight.quant_state.dtype == dtype:
            bnbf.dequantize_4bit(weight.data, weight.quant_state, out=target)
        else:  # bitsandbytes has no CPU out= kernel
            target.copy_(bnbf.dequantize_4bit(weight.data, weight.quant_state))
    return stacked
