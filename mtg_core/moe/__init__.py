"""Mixtral's experts as per-expert Linear layers (4-bit while loading, LoRA by name), run in grouped GEMMs.

layout: the model classes; grouped: the grouped-GEMM path (frozen weights and LoRA); dequantize: a group of
NF4 experts dequantised at once; dropout: LoRA dropout with cheap masks; streaming: experts streamed from host
memory through two staging buffers; loading: the streamed layers loaded from the checkpoint into host memory;
shared_host: one host copy per node under torchrun; checkpoints: fused-expert checkpoints rewritten in the hub
layout; synthetic: random Mixtral-shaped models for benchmarks and mtg-doctor.
"""

from mtg_core.moe.checkpoints import has_fused_experts, unfuse_checkpoint
from mtg_core.moe.grouped import grouped_mm
from mtg_core.moe.layout import ExpertMLP, LinearExperts, MtgMixtralConfig, MtgMixtralForCausalLM, MtgMixtralModel

__all__ = ["ExpertMLP", "LinearExperts", "MtgMixtralConfig", "MtgMixtralForCausalLM", "MtgMixtralModel",
           "grouped_mm", "has_fused_experts", "unfuse_checkpoint"]
