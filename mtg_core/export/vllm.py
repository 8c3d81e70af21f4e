"""vLLM multi-LoRA export: the peft adapter with its expert keys renamed for vLLM's Mixtral, and the
`vllm serve` command that serves the exports."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mtg_core.export.adapter import HUB_BLOCK, TRAINED_BLOCK, Adapter, ExportError, _first_missing_expert
from mtg_core.export.writing import _cast

# vLLM's LoRAConfig accepts only these --max-lora-rank values; an adapter of any rank up to the value chosen loads.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_vllm(adapter: Adapter) -> None:
    if adapter.rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ExportError(f"{adapter.folder}: rank {adapter.rank} is above vLLM's largest --max-lora-rank "
                          f"({', '.join(map(str, VLLM_MAX_LORA_RANKS))}); retrain with a rank of at most {VLLM_MAX_LORA_RANKS[-1]}")
    if missing := _first_missing_expert(adapter, whole_triplets=True):
        raise ExportError(f"{adapter.folder}: no LoRA for {missing}; vLLM packs the experts of a layer only when every "
                          "expert has all of w1, w2 and w3 (train with target modules w1, w2, w3 or none of them)")


def write_vllm(adapter: Adapter, work: Path, dtype: str | None) -> None:
    """The peft adapter with expert keys under `block_sparse_moe.experts`, where vLLM's Mixtral looks them up."""
    from safetensors.torch import save_file

    tensors = {}
    for module, (a, b) in adapter.modules.items():
        name = f"base_model.model.{module.replace(TRAINED_BLOCK, HUB_BLOCK)}"
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = _cast(a, dtype), _cast(b, dtype)
    save_file(tensors, work / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {**adapter.config, "base_model_name_or_path": adapter.serve_id}
    (work / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def vllm_command(adapters: list[Adapter], targets: list[Path]) -> str:
    rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= max(a.rank for a in adapters))
    modules = [f"{a.name}={t.resolve()}" for a, t in zip(adapters, targets)]
    return shlex.join(["vllm", "serve", adapters[0].serve_id, "--enable-lora", "--max-loras", str(len(adapters)),
                       "--max-lora-rank", str(rank), "--lora-modules", *modules])
