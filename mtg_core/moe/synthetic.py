"""Mixtral-shaped NF4 models from random weights, built one matrix at a time (never all bf16 at once).

benchmarks/gpu_moe.py --full and mtg-doctor train these: the real layout (mtg_core.moe.layout), the real
quantisation (loading.quantized_linear, as transformers + bitsandbytes load a checkpoint) and, for the
streamed layers, the real host staging (loading.install_streamed_layer). Each matrix draws from its own
generator seeded by its name, so a model with streamed layers has exactly the weights of the resident one.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def mixtral_config(layers: int, small: bool):
    """Mixtral-8x7B's shape (8 experts, top-2) with `layers` layers; `small`: tiny widths for the CPU."""
    from transformers import MixtralConfig

    return MixtralConfig(num_hidden_layers=layers, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, **(SMALL if small else MIXTRAL))


def random_matrix(name: str, rows: int, columns: int, device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    return torch.randn(rows, columns, device=device, dtype=dtype, generator=generator) * 0.02


def build_nf4(config, device, dtype: torch.dtype, streamed: tuple[int, ...] = ()):
    """An MtgMixtralForCausalLM with every attention and expert matrix NF4; the experts of the `streamed`
    layers in (pinned, on CUDA) host memory, attached to the model's ExpertStreamer."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    from mtg_core.base_models import QUANTIZED_PARTS
    from mtg_core.moe.layout import MtgMixtralForCausalLM
    from mtg_core.moe.loading import install_streamed_layer, quantized_linear
    from mtg_core.moe.streaming import attach

    config = type(config)(**config.to_dict())
    config.mtg_streamed_layers = list(streamed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # allocate nothing until the final layout exists
            model = MtgMixtralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}"
            if type(child) is nn.Linear and any(part in f".{name}." for part in QUANTIZED_PARTS):
                weight = random_matrix(name, child.out_features, child.in_features, device, dtype)
                setattr(parent, child_name, quantized_linear(weight))
    for module_name, module in model.named_modules():  # embeddings, norms, router, lm_head: in the compute dtype
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                if "norm" in type(module).__name__.lower():
                    value = torch.ones(param.shape, device=device, dtype=dtype)
                elif param.dim() == 2:
                    value = random_matrix(f"{module_name}.{name}", *param.shape, device, dtype)
                else:
                    value = torch.zeros(param.shape, device=device, dtype=dtype)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}
    hosted = []
    for index in streamed:
        linears = {(e, n): quantized_linear(random_matrix(f"model.layers.{index}.mlp.experts.{e}.{n}", *shape, device, dtype))
                   for e in range(config.num_local_experts) for n, shape in shapes.items()}
        hosted.append(install_streamed_layer(model, index, linears, pin=torch.device(device).type == "cuda"))
    if hosted:
        attach(model, hosted)
    model.model.rotary_emb = MixtralRotaryEmbedding(config).to(device)
    return model
