"""llama.cpp GGUF export: a LoRA adapter file with experts stacked and q/k rows permuted as llama.cpp's
converter makes them, and the `llama-server` command that serves the exports."""

from __future__ import annotations

import shlex
from pathlib import Path

from mtg_core.export.adapter import ATTENTION, EXPERT, HUB_BLOCK, Adapter, ExportError, _first_missing_expert


def check_gguf(adapter: Adapter) -> None:
    if missing := _first_missing_expert(adapter, whole_triplets=False):
        raise ExportError(f"{adapter.folder}: no LoRA for {missing}; llama.cpp stacks the experts of a layer into one "
                          "tensor per matrix, so every expert needs the matrices any expert of that layer has")


def gguf_tensors(adapter: Adapter):
    """(llama.cpp base tensor name, lora_a, lora_b) in torch layout, as llama.cpp's convert_lora_to_gguf.py would make them.

    Experts are stacked: lora_a [E, r, in], lora_b [E, out, r]. llama.cpp keeps q/k rows in the interleaved
    rotary order of the original LLaMA weights (its converter permutes the base's q/k rows), so the rows of
    lora_b, which are the rows of B @ A, take the same permutation.
    """
    import gguf
    import torch

    base = adapter.base
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base.num_hidden_layers)
    heads = {"q_proj": base.num_attention_heads, "k_proj": base.num_key_value_heads}
    stacks: dict[tuple[int, str], dict[int, tuple]] = {}
    for module, (a, b) in adapter.modules.items():
        if match := ATTENTION.fullmatch(module):
            if match[2] in heads:
                b = _rope_permute(b, heads[match[2]])
            yield f"{names.get_name(module)}.weight", a, b
        else:
            match = EXPERT.fullmatch(module)
            stacks.setdefault((int(match[1]), match[3]), {})[int(match[2])] = (a, b)
    for (layer, matrix), experts in sorted(stacks.items()):
        name = names.get_name(f"model.layers.{layer}{HUB_BLOCK}{matrix}")
        yield (f"{name}.weight", torch.stack([experts[e][0] for e in sorted(experts)]),
               torch.stack([experts[e][1] for e in sorted(experts)]))


def _rope_permute(rows, heads: int):
    """llama.cpp's LlamaModel.permute: per head of d rows, the rotary pair (i, i + d/2) of HF's rotate-half order
    moves to rows (2i, 2i + 1), the interleaved order of the original LLaMA weights that llama.cpp computes with."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def write_gguf(adapter: Adapter, work: Path, dtype: str | None) -> None:
    """A llama.cpp LoRA adapter: general.type adapter, llama architecture (llama.cpp's Mixtral), one alpha."""
    import gguf

    file = f"{adapter.name}.gguf"
    writer = gguf.GGUFWriter(str(work / file), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
    for name, a, b in gguf_tensors(adapter):
        for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
            data, raw_dtype = _gguf_array(tensor, dtype)
            writer.add_tensor(name + suffix, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_array(tensor, dtype: str | None):
    """numpy data and GGML type for a tensor in `dtype` (default: its own); numpy has no bfloat16, gguf packs it."""
    import gguf
    import numpy as np
    import torch

    name = dtype or {torch.float16: "f16", torch.bfloat16: "bf16"}.get(tensor.dtype, "f32")
    values = tensor.float().contiguous().numpy()
    if name == "bf16":
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return values.astype(np.float16 if name == "f16" else np.float32), None


def gguf_command(adapters: list[Adapter], targets: list[Path]) -> str:
    loras = [arg for a, t in zip(adapters, targets) for arg in ("--lora", str((t / f"{a.name}.gguf").resolve()))]
    return shlex.join(["llama-server", "-m", "BASE.gguf", "--lora-init-without-apply", *loras])
