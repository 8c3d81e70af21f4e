"""A MoE layer's experts in grouped GEMMs: frozen weights and peft's LoRA terms, every expert at once.

Rows (token, slot) are sorted by expert; expert e owns rows ends[e-1]:ends[e]. On the grouped_mm backend
`ends` stays on the device: nothing reads it on the host, so the path has no host syncs; the loop backend
reads it once per layer and pass (see `backend` for which runs where). Per MoE layer and pass (the
forward, and its recompute under gradient checkpointing) it launches: routing (sort, searchsorted,
two gathers); one batched dequantisation per frozen group (w1|w3 and w2); two frozen grouped
GEMMs; per LoRA tensor kind one stack of the experts' peft weights; four LoRA grouped GEMMs (w1 and w3
share their input, so their A's are one GEMM); SiLU x up; the routing-weight product; one index_add.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from mtg_core.errors import ConfigError
from mtg_core.moe.dequantize import frozen_weights, is_quantized, matrix_shape, stacked_frozen_weights
from mtg_core.moe.dropout import LoraDropout, dropped

BACKENDS = ("grouped_mm", "loop")  # torch._grouped_mm, or one matmul per expert (reads `ends` on the host)
BACKEND_ENV = "MTG_MOE_BACKEND"
_backends: dict[tuple[str, torch.dtype], str] = {}
_warned_unaligned: set[tuple[str, torch.dtype]] = set()
log = logging.getLogger("mtg_core")


def backend(device: torch.device, dtype: torch.dtype) -> str:
    """The grouped-GEMM backend for this device type and dtype, chosen once and logged with why (MTG_MOE_BACKEND overrides)."""
    key = (device.type, dtype)
    if key not in _backends:
        _backends[key], why = _choose_backend(device, dtype)
        log.info("MoE experts on %s in %s: %s backend (%s)", device.type, str(dtype).removeprefix("torch."), _backends[key], why)
    return _backends[key]


def _choose_backend(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, why). torch._grouped_mm has one fast kernel, CUTLASS bf16 x bf16 on sm90/sm100
    (torch/include/ATen/native/cuda/GroupMM.h:7, `bf16bf16_grouped_mm`; aten/src/ATen/native/cuda/GroupedBlas.cpp
    takes it only for bf16 on compute capability 9.x or 10.x). Elsewhere on CUDA it runs `_grouped_mm_fallback`,
    which copies `offs` to the host on every call: ~25 host syncs per MoE layer and step. There the loop, which
    reads `ends` once per layer and pass (Ends.host), is the faster choice. On the CPU no copy syncs anything."""
    requested = os.environ.get(BACKEND_ENV)
    if requested:
        if requested not in BACKENDS:
            raise ConfigError(f"{BACKEND_ENV}={requested!r}: unknown MoE backend; use one of {', '.join(BACKENDS)} or unset it")
        return requested, f"{BACKEND_ENV}={requested}"
    if not hasattr(torch, "_grouped_mm"):
        return "loop", f"torch {torch.__version__} has no _grouped_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major not in (9, 10) or dtype != torch.bfloat16:
            return "loop", (f"sm{major}{minor} in {str(dtype).removeprefix('torch.')}: torch._grouped_mm's fast kernel needs "
                            "sm90/sm100 and bf16, its fallback syncs the host on every GEMM")
    failure = _grouped_mm_fails(device, dtype)
    if failure:
        return "loop", f"torch._grouped_mm failed: {failure}"
    if device.type == "cuda":
        return "grouped_mm", f"sm{major}{minor} in bfloat16: torch._grouped_mm's CUTLASS kernel, no host syncs"
    return "grouped_mm", f"{device.type}: torch._grouped_mm (no device to sync with)"


def _grouped_mm_fails(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch._grouped_mm does not run here, or None: a call is the only reliable check of a torch build."""
    try:
        ones = torch.ones(2, 8, 8, device=device, dtype=dtype)
        torch._grouped_mm(ones[0], ones, offs=torch.tensor([1, 8], device=device, dtype=torch.int32))
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


class Ends:
    """Where each expert's rows end (int32 [E], sorted rows): on the device for torch._grouped_mm, and on the
    host for the per-expert loop, read there at most once per layer and pass however many GEMMs use it."""

    __slots__ = ("device", "_host")

    def __init__(self, device: torch.Tensor) -> None:
        self.device = device
        self._host: list[int] | None = None

    def host(self) -> list[int]:
        if self._host is None:
            self._host = self.device.tolist()  # the one host sync of this layer's pass on the loop backend
        return self._host


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm's layout rule: 16-byte aligned data and strides (the unit stride aside)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in t.stride() if stride != 1)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, ends: Ends) -> torch.Tensor:
    """Rows of `x` [N, in] sorted by expert, times their expert's `weight[e]` [in, out]; differentiable."""
    if backend(x.device, x.dtype) == "grouped_mm":
        if _aligned(x) and _aligned(weight):
            return torch._grouped_mm(x, weight, offs=ends.device)
        key = (x.device.type, x.dtype)
        if key not in _warned_unaligned:
            _warned_unaligned.add(key)
            log.warning("MoE experts: a %s operand of torch._grouped_mm is not 16-byte aligned (shapes %s, %s); "
                        "such GEMMs run one matmul per expert", str(x.dtype).removeprefix("torch."), tuple(x.shape), tuple(weight.shape))
    parts, start = [], 0
    for expert, end in enumerate(ends.host()):
        parts.append(x[start:end] @ weight[expert])
        start = end
    return torch.cat(parts)


def _pad_rows(t: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """`t` with `rows` zero rows appended along `dim` (LoRA ranks padded to _grouped_mm's alignment)."""
    if not rows:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, rows]
    return nn.functional.pad(t, pad)


class FrozenGroupedLinear(torch.autograd.Function):
    """x @ W_e.T for every expert at once, with the frozen W_e of each expert stacked [E, out, in].

    The dequantised weights are saved for backward instead of the inputs, which frozen weights do not
    need. Under non-reentrant gradient checkpointing the first forward's saved tensors are dropped and
    rebuilt by the recompute, so each expert weight is dequantised exactly twice per step (forward,
    recompute) and only the layer in backward holds its dequantised experts.
    """

    @staticmethod
    def forward(ctx, x, ends, groups, staged):
        with staged:  # a streamed layer's packed group readable inside; its buffer released before the GEMM
            weight = stacked_frozen_weights(groups, x.dtype)
        ctx.save_for_backward(weight)
        ctx.ends = ends  # not a saved tensor: backward reuses its host copy, if the forward read one
        return grouped_mm(x, weight.transpose(1, 2), ends)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        # contiguous(): torch._grouped_mm rejects the stride-0 gradients that e.g. y.sum() produces
        return grouped_mm(grad_out.contiguous(), weight, ctx.ends), None, None, None


class ChunkedFrozenGroupedLinear(torch.autograd.Function):
    """FrozenGroupedLinear `chunk` experts at a time: each chunk is dequantised, multiplied (the same grouped GEMM
    over its experts' rows) and dropped before the next, and backward dequantises them again instead of keeping
    them, so at most one chunk's dequantised weights are alive (plan.dequantized_bytes). `reload()` enters what
    makes the packed data readable again in backward (a streamed layer's staging buffer). The chunks' row ranges
    come from the host copy of `ends`: one host sync per layer, the price of bounding the dequantised bytes.
    """

    @staticmethod
    def forward(ctx, x, ends, groups, chunk, reload, staged):
        with staged:
            out = _by_chunks(x, ends, groups, chunk, forward=True)
        ctx.ends, ctx.groups, ctx.chunk, ctx.reload = ends, groups, chunk, reload
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with ctx.reload():
            grad = _by_chunks(grad_out.contiguous(), ctx.ends, ctx.groups, ctx.chunk, forward=False)
        return grad, None, None, None, None, None


def _by_chunks(x: torch.Tensor, ends: Ends, groups, chunk: int, forward: bool) -> torch.Tensor:
    """x @ W_e.T (forward) or x @ W_e (backward) for every expert, dequantising `chunk` experts at a time."""
    bounds = [0, *ends.host()]
    rows, cols = _group_shape(groups[0])
    parts = []
    for first in range(0, len(groups), chunk):
        last = min(first + chunk, len(groups))
        start, stop = bounds[first], bounds[last]
        if start == stop:  # no token routed to these experts: nothing to dequantise
            parts.append(x.new_empty(0, rows if forward else cols))
            continue
        part = Ends(ends.device[first:last] - start)
        part._host = [end - start for end in bounds[first + 1 : last + 1]]
        weight = stacked_frozen_weights(groups[first:last], x.dtype)
        parts.append(grouped_mm(x[start:stop], weight.transpose(1, 2) if forward else weight, part))
        del weight  # before the next chunk is dequantised
    return torch.cat(parts)


def _group_shape(group) -> tuple[int, int]:
    """(out, in) of one expert's stacked group (w1 and w3 concatenated along out, or w2)."""
    shapes = [matrix_shape(weight) for weight in frozen_weights(group)]
    return sum(shape[0] for shape in shapes), shapes[0][1]


def frozen_grouped_linear(x, ends, groups, chunk: int | None, reload, staged=None):
    """FrozenGroupedLinear, or ChunkedFrozenGroupedLinear when `chunk` is fewer experts than there are. `staged`: the
    context within which a streamed layer's packed group is readable (moe.streaming); None for a resident layer."""
    staged = staged if staged is not None else contextlib.nullcontext()
    if chunk is None or chunk >= len(groups):
        return FrozenGroupedLinear.apply(x, ends, groups, staged)
    return ChunkedFrozenGroupedLinear.apply(x, ends, groups, chunk, reload, staged)


KINDS = ("w1", "w3", "w2")


def _frozen_linear(layer: nn.Module) -> bool:
    base = getattr(layer, "base_layer", layer)
    return isinstance(base, nn.Linear) and base.bias is None and not base.weight.requires_grad


def _vanilla_lora(layer: nn.Module) -> bool:
    """peft's plain, unmerged LoRA (no DoRA or other variant, no LoRA bias)."""
    return hasattr(layer, "lora_A") and not layer.merged and not layer.lora_variant and not any(layer.lora_bias.values())


def _same_lora(layer: nn.Module, head: nn.Module, adapter: str) -> bool:
    if adapter not in layer.lora_A:
        return False
    dropout, head_dropout = layer.lora_dropout[adapter], head.lora_dropout[adapter]
    return (layer.r[adapter] == head.r[adapter] and layer.scaling[adapter] == head.scaling[adapter]
            and type(dropout) is type(head_dropout) and getattr(dropout, "p", None) == getattr(head_dropout, "p", None))


def grouped_adapters(experts) -> list[str] | None:
    """The peft adapters whose LoRA terms the grouped path adds to this layer's experts ([] for none), or None
    when the experts need the per-expert loop: a base that is not a frozen bias-free Linear, NF4 mixed with
    other weights, LoRA variants, or LoRA that differs between experts."""
    kinds = [[getattr(expert, name) for expert in experts] for name in KINDS]
    layers = [layer for kind in kinds for layer in kind]
    if not all(_frozen_linear(layer) for layer in layers) or len({is_quantized(w) for w in frozen_weights(layers)}) > 1:
        return None
    if not any(hasattr(layer, "lora_A") for layer in layers):
        return []
    head = layers[0]
    if not all(_vanilla_lora(layer) and layer.disable_adapters == head.disable_adapters
               and layer.active_adapters == head.active_adapters for layer in layers):
        return None
    adapters = [] if head.disable_adapters else [a for a in head.active_adapters if a in head.lora_A]
    if not all(_same_lora(layer, kind[0], adapter) for adapter in adapters for kind in kinds for layer in kind):
        return None
    return adapters


class _Stacked(torch.autograd.Function):
    """torch.stack(weights).to(dtype) whose backward hands each weight its gradient slice in one unbind.

    autograd's own stack backward selects the slices one by one: one op per expert and LoRA tensor,
    ~90 of a tiny model's step, where the dispatcher's per-op cost is what a CPU step spends its time on.
    """

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.dtype = weights[0].dtype
        return torch.stack(weights).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        return None, *grad.to(ctx.dtype).unbind(0)


def lora_terms(x: torch.Tensor, ends: Ends, kinds, adapter: str) -> list[torch.Tensor]:
    """lora_B(lora_A(dropout(x))) of each kind of matrix for all experts, unscaled, in grouped GEMMs.

    peft's per-expert A [r, in] and B [out, r] weights (the trainable parameters it saves) are stacked
    per layer, A [E, in, r] and B [E, r, out]; gradients flow back to them through the stack. Dropout
    is peft's module of each kind, applied to the sorted rows: each (token, expert, matrix) gets its own
    mask, as in peft's per-expert modules (LoraDropout's 1 / (1 - p) goes on the stacked A). The ranks are padded with zeros to torch._grouped_mm's 16-byte
    alignment. LoRA runs in the compute dtype (peft would upcast the input to the fp32 LoRA weights).
    """
    experts, rank = len(kinds[0]), kinds[0][0].r[adapter]
    padding = -rank % (16 // x.element_size())
    dropouts = [kind[0].lora_dropout[adapter] for kind in kinds]
    a_weights = [[layer.lora_A[adapter].weight for layer in kind] for kind in kinds]
    if all(isinstance(dropout, nn.Identity) for dropout in dropouts):  # one input: one GEMM for every kind's A
        stacked = _pad_rows(_Stacked.apply(x.dtype, *(w for expert in zip(*a_weights) for w in expert)), padding, 1)
        a = stacked.view(experts, len(kinds) * (rank + padding), -1).transpose(1, 2)
        inner = grouped_mm(x, a, ends).split(rank + padding, dim=1)
    else:
        inner = []
        for dropout, ws in zip(dropouts, a_weights):
            a = _pad_rows(_Stacked.apply(x.dtype, *ws), padding, 1)
            if isinstance(dropout, LoraDropout) and dropout.masks(x):  # 1 / (1 - p) on the small A, not on every input
                inner.append(grouped_mm(dropped(x, dropout.p), (a * (1 / (1 - dropout.p))).transpose(1, 2), ends))
            else:
                inner.append(grouped_mm(dropout(x), a.transpose(1, 2), ends))
    terms = []
    for kind, projected in zip(kinds, inner):
        b = _pad_rows(_Stacked.apply(x.dtype, *(layer.lora_B[adapter].weight for layer in kind)), padding, 2)
        terms.append(grouped_mm(projected, b.transpose(1, 2), ends))
    return terms


def grouped_experts_forward(experts, adapters, hidden_states, top_k_index, top_k_weights, stage=None) -> torch.Tensor:
    """What transformers' MixtralExperts computes, with `experts` a list of ExpertMLP (w1, w3, w2).

    `stage` (streamed experts, ExpertStreamer.loaded): stage(0) and stage(1) are entered around the dequantisation of
    w1|w3 and of w2, and left right after it, which frees the staging buffer for the next copy. With `experts.chunk`
    set, the frozen weights are dequantised that many experts at a time (ChunkedFrozenGroupedLinear); backward
    reloads a streamed layer's packed experts, group by group, to dequantise them again."""
    top_k = top_k_index.shape[1]
    with torch.no_grad():  # searchsorted, not bincount: CUDA's bincount reads its input's maximum on the host
        routed, order = top_k_index.reshape(-1).sort(stable=True)
        ends = Ends(torch.searchsorted(routed, torch.arange(len(experts), device=routed.device), right=True, out_int32=True))
        token = order // top_k
    x = hidden_states.index_select(0, token)
    w1, w3, w2 = ([getattr(expert, name) for expert in experts] for name in ("w1", "w3", "w2"))
    chunk = experts.chunk
    gate, up = frozen_grouped_linear(x, ends, list(zip(w1, w3)), chunk, _reloader(experts, 0), stage and stage(0)).chunk(2, dim=-1)
    for adapter in adapters:
        gate_term, up_term = lora_terms(x, ends, [w1, w3], adapter)
        gate = torch.add(gate, gate_term, alpha=w1[0].scaling[adapter])
        up = torch.add(up, up_term, alpha=w3[0].scaling[adapter])
    h = experts[0].act_fn(gate) * up
    y = frozen_grouped_linear(h, ends, [(layer,) for layer in w2], chunk, _reloader(experts, 1), stage and stage(1))
    for adapter in adapters:
        (down_term,) = lora_terms(h, ends, [w2], adapter)
        y = torch.add(y, down_term, alpha=w2[0].scaling[adapter])
    y = y * top_k_weights.reshape(-1, 1).index_select(0, order)
    return torch.zeros_like(hidden_states).index_add_(0, token, y.to(hidden_states.dtype))


def _reloader(experts, group: int):
    """What makes a layer's packed group (0: w1|w3, 1: w2) readable again in backward: a streamed layer's staging
    buffer, nothing for resident ones."""
    if experts.stream is None:
        return contextlib.nullcontext
    streamer, position = experts.stream

    @contextlib.contextmanager
    def reload():
        with streamer.loaded(position, backward=True) as stage, stage(group):
            yield

    return reload
