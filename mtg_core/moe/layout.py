"""Mixtral with one `nn.Linear` per expert matrix, so bitsandbytes can quantise all of it.

transformers 5 stores Mixtral's experts as fused 3-D parameters (`gate_up_proj`, `down_proj`).
bitsandbytes only converts `nn.Linear`, so a stock `load_in_4bit` leaves ~96 % of Mixtral in bf16
(bitsandbytes issue #1849). Here every expert is three Linear layers named as in the hub checkpoints
(`w1` gate, `w3` up, `w2` down): bitsandbytes quantises them while loading, peft targets them by
name, and the adapters load on the stock transformers model through peft's own v4->v5 conversion.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, MixtralModel
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from mtg_core.errors import ConfigError
from mtg_core.moe.grouped import grouped_adapters, grouped_experts_forward
from mtg_core.moe.streaming import pack_contiguously


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


class LinearExperts(nn.ModuleList):
    """Drop-in for transformers' `MixtralExperts`: same call signature, per-expert Linear layers.

    The grouped path (mtg_core.moe.grouped) runs every expert's frozen weights and LoRA terms in grouped
    GEMMs. The per-expert loop through the experts' own (peft) modules is the reference, and runs the
    layouts the grouped path does not cover.
    """

    grouped = True  # tests and benchmarks turn it off to compare against the reference loop
    stream = None  # (ExpertStreamer, position) when the packed experts live in host memory (moe.streaming)
    packed = False  # resident NF4 experts laid out back to back (moe.streaming.pack_contiguously) on first use: done
    chunk = None  # experts dequantised at a time by the grouped path (the memory plan's expert_chunk); None: all

    def __init__(self, config: MixtralConfig, experts: int | None = None) -> None:
        super().__init__(ExpertMLP(config) for _ in range(config.num_local_experts if experts is None else experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return self._forward(hidden_states, top_k_index, top_k_weights)
        streamer, position = self.stream
        with streamer.loaded(position) as stage:
            return self._forward(hidden_states, top_k_index, top_k_weights, stage)

    def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 stage=None) -> torch.Tensor:
        adapters = grouped_adapters(self) if self.grouped else None
        if adapters is not None:
            if self.stream is None and not self.packed:
                pack_contiguously(self)
                self.packed = True
            return grouped_experts_forward(self, adapters, hidden_states, top_k_index, top_k_weights, stage)
        if self.stream is not None:
            # bitsandbytes' own backward reads the packed weight again, after the staging buffer moved on
            raise ConfigError("experts streamed from host memory need the grouped path (plain LoRA, the same on every "
                              "expert); use --offload-experts none")
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
            hit = routed.sum(dim=(-1, -2)).nonzero().flatten().tolist()
        for expert in hit:
            slot, token = torch.where(routed[expert])
            y = self[expert](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


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
        streamed = set(getattr(config, "mtg_streamed_layers", ()))  # loaded by moe.streaming, not by transformers
        for index, layer in enumerate(self.layers):
            layer.mlp.experts = LinearExperts(config, 0 if index in streamed else None)
        if streamed:  # their checkpoint keys are expected to be left to moe.streaming (the outer post_init collects this)
            self._keys_to_ignore_on_load_unexpected = {rf"layers\.({'|'.join(map(str, sorted(streamed)))})\.mlp\.experts\."}


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
