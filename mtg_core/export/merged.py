"""Merged export: the base's full-precision checkpoint, found on this machine and checked, rewritten
shard by shard with each adapted weight W + (alpha/r) B A."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from mtg_core.export.adapter import HUB_BLOCK, TRAINED_BLOCK, Adapter, ExportError
from mtg_core.export.writing import DTYPES

FULL_PRECISION = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype -> bytes per value
SERVING_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "vocab.json", "merges.txt")


def hub_key(module: str) -> str:
    """The checkpoint key of the weight an adapter module adapts (hub layout: block_sparse_moe.experts.N.wK)."""
    return f"{module.replace(TRAINED_BLOCK, HUB_BLOCK)}.weight"


def checkpoint_folder(adapter: Adapter) -> Path:
    """The base's full-precision checkpoint on this machine: the tiny model, a folder, or the hub cache (never a download)."""
    from mtg_core.base_models import TINY, ensure_tiny_mixtral

    if adapter.choice.name == TINY:
        return ensure_tiny_mixtral()
    location = Path(adapter.choice.location)
    if location.is_dir():
        return location
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(adapter.choice.location, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ExportError(f"base {adapter.choice.location} is not in the local Hugging Face cache; merged export reads the "
                          f"full-precision checkpoint from disk: `hf download {adapter.choice.location}` first, or pass "
                          "--base-model a local folder") from None


def check_merged(adapter: Adapter, folder: Path, dtype: str | None) -> int:
    """Refuse a base that is quantised, fused or lacks a weight the adapter adapts; return the bytes the export writes."""
    from safetensors import SafetensorError, safe_open

    config = _read_json(folder / "config.json")
    if quantization := config.get("quantization_config"):
        method = quantization.get("quant_method", "quantization_config") if isinstance(quantization, dict) else "quantization_config"
        raise ExportError(f"{folder / 'config.json'}: the base is quantised ({method}); "
                          "merged export needs the original 16- or 32-bit checkpoint (merging into dequantised weights adds "
                          "quantisation noise): pass --base-model the unquantised model")
    targets = {hub_key(module): (b.shape[0], a.shape[1]) for module, (a, b) in adapter.modules.items()}
    size = 0
    for shard in _shards(folder):
        try:
            with safe_open(folder / shard, framework="pt") as f:
                headers = [(key, f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape())) for key in f.keys()]
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"{folder / shard}: not a readable safetensors file ({exc}); download the base again") from None
        for key, stored, shape in headers:
            if stored not in FULL_PRECISION:
                raise ExportError(f"{folder / shard}: {key} is stored as {stored}; merged export needs the original 16- or "
                                  "32-bit checkpoint: pass --base-model the unquantised model")
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                raise ExportError(f"{folder / shard}: {key} stores the experts fused; merged export writes the hub layout "
                                  "(experts.N.w1/w2/w3): pass --base-model the hub checkpoint")
            if key in targets and targets.pop(key) != shape:
                raise ExportError(f"{folder / shard}: {key} is {shape}, not the shape the adapter adapts; pass the --base-model it was trained on")
            size += math.prod(shape) * (FULL_PRECISION[dtype.upper()] if dtype else FULL_PRECISION[stored])
    if targets:
        raise ExportError(f"{folder} has no weight {next(iter(targets))}, which the adapter adapts; pass the --base-model it was trained on")
    return size


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not a JSON object")
    return data


def _shards(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{index}: no weight_map; download the base again")
        shards = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ExportError(f"{folder}: no model.safetensors or model.safetensors.index.json; merged export needs safetensors weights")
    for shard in shards:
        if not (folder / shard).is_file():
            raise ExportError(f"{folder}: {shard}, listed in its index, is missing (an incomplete download?)")
    return shards


def write_merged(adapter: Adapter, folder: Path, work: Path, dtype: str | None) -> None:
    """The base's own shards with W + (alpha/r) B A, one shard in memory at a time; config, tokenizer, index alongside."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    scaling = adapter.alpha / adapter.rank
    pending = {hub_key(module): pair for module, pair in adapter.modules.items()}
    cast = getattr(torch, DTYPES[dtype]) if dtype else None
    total = 0
    shards = _shards(folder)
    for shard in shards:
        merged = {}
        with safe_open(folder / shard, framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                weight = f.get_tensor(key)
                if key in pending:
                    a, b = pending.pop(key)
                    # peft's merge_and_unload arithmetic (W + (B @ A) * scaling), in fp32 whatever the checkpoint stores
                    weight = (weight.float() + (b.float() @ a.float()) * scaling).to(weight.dtype)
                merged[key] = weight.to(cast) if cast is not None else weight
                total += merged[key].numel() * merged[key].element_size()
        save_file(merged, work / shard, metadata={**metadata, "format": "pt"})
        del merged
    if pending:  # check_merged found every key; a shard changing underneath would land here
        raise ExportError(f"{folder}: {next(iter(pending))} disappeared while merging; run the export again")
    if (folder / "model.safetensors.index.json").is_file():
        index = _read_json(folder / "model.safetensors.index.json")
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = _read_json(folder / "config.json")
    # stock names: other tools do not know our training class (MtgMixtralForCausalLM, model type mtg_mixtral)
    config.update(model_type="mixtral", architectures=["MixtralForCausalLM"])
    if dtype:
        config["dtype"] = DTYPES[dtype]
        if "torch_dtype" in config:
            config["torch_dtype"] = DTYPES[dtype]
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in SERVING_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, work / name)
