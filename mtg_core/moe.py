"""Mixtral with one `nn.Linear` per expert matrix, so bitsandbytes can quantise all of it.

transformers 5 stores Mixtral's experts as fused 3-D parameters (`gate_up_proj`, `down_proj`).
bitsandbytes only converts `nn.Linear`, so a stock `load_in_4bit` leaves ~96 % of Mixtral in bf16
(bitsandbytes issue #1849). Here every expert is three Linear layers named as in the hub checkpoints
(`w1` gate, `w3` up, `w2` down): bitsandbytes quantises them while loading, peft targets them by
name, and the adapters load on the stock transformers model through peft's own v4->v5 conversion.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, MixtralModel
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming


class ExpertMLP(nn.Module):
    """One Mixtral expert: w2(act(w1 x) * w3 x)."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


_grouped_kernel = {"usable": hasattr(torch, "_grouped_mm")}


def grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of `x` sorted by expert (expert e owns rows ends[e-1]:ends[e]) times that expert's [in, out] matrix."""
    if _grouped_kernel["usable"] and x.is_cuda and x.dtype == torch.bfloat16:
        try:
            return torch._grouped_mm(x, weight_t, offs=ends)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # e.g. a GPU generation its kernels do not support: same maths, slower
            _grouped_kernel["usable"] = False
            logging.getLogger("mtg_core").warning("torch._grouped_mm unavailable (%s); experts use one matmul each", exc)
    out = x.new_empty(x.shape[0], weight_t.shape[-1])  # the same maths, one matmul per expert (CPU, fp32)
    start = 0
    for expert, end in enumerate(ends.tolist()):
        out[start:end] = x[start:end] @ weight_t[expert]
        start = end
    return out


def stacked_frozen_weights(groups, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[E, out, in]: per expert, its frozen Linear weights concatenated along `out`.

    bitsandbytes 4-bit weights are dequantised straight into the stacked buffer (no cat/stack copies,
    which on Mixtral would be 2.8 GB of extra traffic per layer).
    """
    import bitsandbytes.functional as bnbf

    rows = sum(layer.out_features for layer in groups[0])
    stacked = torch.empty(len(groups), rows, groups[0][0].in_features, dtype=dtype, device=device)
    for expert, group in enumerate(groups):
        row = 0
        for layer in group:
            target = stacked[expert, row : row + layer.out_features]
            weight = layer.weight
            if type(weight).__name__ == "Params4bit" and weight.quant_state.dtype == dtype and target.is_cuda:
                bnbf.dequantize_4bit(weight.data, weight.quant_state, out=target)  # bitsandbytes has no CPU out= kernel
            elif type(weight).__name__ == "Params4bit":
                target.copy_(bnbf.dequantize_4bit(weight.data, weight.quant_state))
            else:
                target.copy_(weight)
            row += layer.out_features
    return stacked


class FrozenGroupedLinear(torch.autograd.Function):
    """x @ W_e.T for every expert at once, with the frozen W_e of each expert stacked [E, out, in].

    The bf16 (dequantised) weights are saved for backward instead of the inputs, which frozen weights
    do not need. Under non-reentrant gradient checkpointing the first forward's saved tensors are
    dropped and rebuilt by the recompute, so each expert weight is dequantised exactly twice per step
    (forward, recompute) and only the layer in backward holds its dequantised experts.
    """

    @staticmethod
    def forward(ctx, x, ends, layers):
        weight = stacked_frozen_weights(layers, x.dtype, x.device)
        ctx.save_for_backward(weight, ends)
        return grouped_mm(x, weight.transpose(1, 2), ends)

    @staticmethod
    def backward(ctx, grad_out):
        weight, ends = ctx.saved_tensors
        # contiguous(): torch._grouped_mm rejects the stride-0 gradients that e.g. y.sum() produces
        return grouped_mm(grad_out.contiguous(), weight, ends), None, None


def _lora_delta(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """peft's vanilla LoRA term for `layer` (what peft's Linear4bit.forward adds to the base output)."""
    if not hasattr(layer, "lora_A") or layer.disable_adapters:
        return None
    delta = None
    for name in layer.active_adapters:
        if name in layer.lora_A:
            a, b = layer.lora_A[name], layer.lora_B[name]
            term = b(a(layer.lora_dropout[name](x.to(a.weight.dtype)))) * layer.scaling[name]
            delta = term if delta is None else delta + term
    return delta


def _base(layer: nn.Module) -> nn.Module:
    return getattr(layer, "base_layer", layer)


def _groupable(layer: nn.Module) -> bool:
    """A frozen Linear, bare or under peft's vanilla, unmerged LoRA; anything else takes the loop."""
    if hasattr(layer, "base_layer"):
        if layer.merged or getattr(layer, "lora_variant", None) or not isinstance(layer.base_layer, nn.Linear):
            return False
        layer = layer.base_layer
    return isinstance(layer, nn.Linear) and layer.bias is None and not layer.weight.requires_grad


class LinearExperts(nn.ModuleList):
    """Drop-in for transformers' `MixtralExperts`: same call signature, per-expert Linear layers.

    Training takes the grouped path: tokens sorted by expert, each frozen matrix applied to all
    experts in one grouped GEMM (FrozenGroupedLinear), LoRA terms per expert. The per-expert loop is
    the reference, used for layouts the grouped path does not cover.
    """

    grouped = True  # tests and benchmarks turn it off to compare against the reference loop

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(ExpertMLP(config) for _ in range(config.num_local_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.grouped and all(_groupable(m) for e in self for m in (e.w1, e.w3, e.w2)):
            return self._grouped_forward(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
            hit = routed.sum(dim=(-1, -2)).nonzero().flatten().tolist()
        for expert in hit:
            slot, token = torch.where(routed[expert])
            y = self[expert](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _grouped_forward(self, hidden_states, top_k_index, top_k_weights):
        top_k = top_k_index.shape[1]
        with torch.no_grad():
            order = top_k_index.reshape(-1).argsort(stable=True)
            ends = torch.bincount(top_k_index.reshape(-1), minlength=len(self)).cumsum(0).to(torch.int32)
            bounds = [0, *ends.tolist()]
        token, slot = order // top_k, order % top_k
        x = hidden_states[token]
        gate_up = FrozenGroupedLinear.apply(x, ends, [(_base(e.w1), _base(e.w3)) for e in self])
        gate, up = gate_up.chunk(2, dim=-1)
        gate, up = self._add_lora(gate, x, bounds, "w1"), self._add_lora(up, x, bounds, "w3")
        h = self[0].act_fn(gate) * up
        y = self._add_lora(FrozenGroupedLinear.apply(h, ends, [(_base(e.w2),) for e in self]), h, bounds, "w2")
        y = y * top_k_weights[token, slot, None]
        return torch.zeros_like(hidden_states).index_add_(0, token, y.to(hidden_states.dtype))

    def _add_lora(self, base: torch.Tensor, x: torch.Tensor, bounds: list[int], name: str) -> torch.Tensor:
        parts = []
        for expert, (start, end) in zip(self, zip(bounds, bounds[1:])):
            delta = _lora_delta(getattr(expert, name), x[start:end]) if end > start else None
            parts.append(base[start:end] if delta is None else base[start:end] + delta.to(base.dtype))
        return torch.cat(parts)


class MtgMixtralConfig(MixtralConfig):
    # A model type of our own keeps peft from rewriting w1/w2/w3 targets into the fused parameters
    # that this layout does not have (peft keys that rewrite on model_type == "mixtral").
    model_type = "mtg_mixtral"


class MtgMixtralModel(MixtralModel):
    config_class = MtgMixtralConfig
    # transformers picks an implementation for its fused experts by inspecting the class's module; ours
    # are LinearExperts, which ignore that choice, so accept whatever the outer model's init selected.
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        for layer in self.layers:
            layer.mlp.experts = LinearExperts(config)


class MtgMixtralForCausalLM(MixtralForCausalLM):
    """MixtralForCausalLM with per-expert Linear layers; loads hub (`w1/w2/w3`) checkpoints."""

    config_class = MtgMixtralConfig
    _can_set_experts_implementation_cached_value = True  # see MtgMixtralModel

    def __init__(self, config: MixtralConfig) -> None:
        config.model_type = MtgMixtralConfig.model_type  # config.json's "mixtral" would reach peft otherwise
        super().__init__(config)
        self.model = MtgMixtralModel(config)
        self.post_init()


# Hub checkpoints name the MoE block `block_sparse_moe`; transformers 5 calls it `mlp`. Expert keys
# (`experts.N.w1.weight`) then match this layout as they are, so no fusing happens while loading.
# The inner model maps nothing: without this entry it would inherit transformers' fusing "mixtral" mapping.
register_checkpoint_conversion_mapping(
    "MtgMixtralForCausalLM", [WeightRenaming(".block_sparse_moe.", ".mlp.")], overwrite=True
)
register_checkpoint_conversion_mapping("MtgMixtralModel", [], overwrite=True)


FUSED_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")


def has_fused_experts(folder) -> bool:
    """Whether a local checkpoint stores its experts fused (keys ending experts.gate_up_proj / down_proj)."""
    from pathlib import Path

    from safetensors import safe_open

    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            if any(key.endswith(FUSED_SUFFIXES) for key in f.keys()):
                return True
    return False


def unfuse_checkpoint(source, target) -> None:
    """Rewrite a fused-expert checkpoint in the hub layout (experts.N.w1/w3/w2), one tensor at a time.

    transformers' conversion mappings can merge many keys into one while loading but cannot split one
    key into a list of modules, so fused checkpoints are unfused on disk once; the copy then loads (and
    quantises while loading) like a hub checkpoint, without all bf16 experts ever being in memory.
    """
    import json
    import shutil
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(item, target / item.name)
    shards = sorted(source.glob("*.safetensors"))
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        with safe_open(shard, framework="pt") as f:  # at most one source shard in memory
            for key in f.keys():
                tensor = f.get_tensor(key)
                if key.endswith(".experts.gate_up_proj"):
                    prefix = key.removesuffix("gate_up_proj")
                    gate, up = tensor.chunk(2, dim=1)
                    for e in range(tensor.shape[0]):
                        tensors[f"{prefix}{e}.w1.weight"] = gate[e].contiguous()
                        tensors[f"{prefix}{e}.w3.weight"] = up[e].contiguous()
                elif key.endswith(".experts.down_proj"):
                    prefix = key.removesuffix("down_proj")
                    for e in range(tensor.shape[0]):
                        tensors[f"{prefix}{e}.w2.weight"] = tensor[e].contiguous()
                else:
                    tensors[key] = tensor
        save_file(tensors, target / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
