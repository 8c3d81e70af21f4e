"""Fused-expert checkpoints (transformers 5's `experts.gate_up_proj` / `experts.down_proj`) in the hub layout."""

from __future__ import annotations

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
