"""`mtg-export`: trained adapters as vLLM multi-LoRA adapters, llama.cpp GGUF adapters or merged weights.

Training keeps its own adapter format: expert keys `model.layers.N.mlp.experts.E.w1` (transformers 5's
name of the MoE block, which our 4-bit layout and peft load). vLLM and llama.cpp name the block as the
hub checkpoints do (`block_sparse_moe`) and drop or refuse anything else, so every export converts a
copy; the adapters folder is only read. Everything is checked before anything is written, and each
export is written into a hidden work folder that is renamed into place only when it is complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import tempfile
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import attrs
import click

from mtg_core import __version__
from mtg_core.cli import OneLineCommand, _reported_errors
from mtg_core.errors import MtgError
from mtg_core.experts import EXPERT_NAME
from mtg_core.outputs import install

FORMATS = ("vllm", "gguf", "merged")
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
# vLLM's LoRAConfig accepts only these --max-lora-rank values; an adapter of any rank up to the value chosen loads.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MARKER = "export.json"
TRAINED_BLOCK, HUB_BLOCK = ".mlp.experts.", ".block_sparse_moe.experts."
EXPERT_MATRICES = ("w1", "w2", "w3")
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
ATTENTION = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)")
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3)")
# adapter_config.json settings that change what the A/B matrices mean (DoRA magnitudes, rsLoRA scaling,
# per-module ranks or alphas, biases, fully trained extra modules): no export format can carry them.
PLAIN_LORA = {"peft_type": "LORA", "use_dora": False, "use_rslora": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "bias": "none", "lora_bias": False, "fan_in_fan_out": False}
FULL_PRECISION = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype -> bytes per value
SERVING_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "vocab.json", "merges.txt")


class ExportError(MtgError):
    """An adapter, base model or output folder that an export cannot use."""


@attrs.frozen
class Adapter:
    """One trained adapter, read and checked against the transformers config of its base."""

    name: str
    folder: Path
    config: dict
    choice: object  # base_models.BaseChoice
    base: object  # the base's transformers config
    modules: dict  # peft module name -> (lora_A [r, in], lora_B [out, r])

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def serve_id(self) -> str:
        """What a server loads the base from: the hub id of a preset, else its folder or hub id."""
        from mtg_core.base_models import PRESETS

        return PRESETS.get(self.choice.name) or self.choice.location


def adapter_names(adapters: Path, name: str | None, all_experts: bool) -> list[str]:
    if bool(name) == bool(all_experts):
        raise ExportError("give --expert NAME or --all")
    if name:
        if not EXPERT_NAME.match(name.lower()):
            raise ExportError(f"--expert {name!r}: not an expert name (1-40 lowercase letters, digits or '_', starting with a letter)")
        return [name.lower()]
    found = sorted(p.parent.name for p in adapters.glob("*/adapter_config.json") if not p.parent.name.startswith("."))
    if not found:
        raise ExportError(f"no adapters in {adapters} (no */adapter_config.json); train one with mtg-train --expert NAME")
    return found


def load_adapter(adapters: Path, name: str, base_model: str | None) -> Adapter:
    """Read ADAPTERS/NAME and check it is a plain LoRA whose every matrix fits its base."""
    from mtg_core.base_models import base_config

    from mtg_core.evaluate import check_adapter_files

    folder = check_adapter_files(adapters, name)
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{config_path}: not a readable JSON file ({exc}); retrain the adapter") from None
    if not isinstance(config, dict) or not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise ExportError(f"{config_path}: not a peft LoRA config (no integer r and numeric lora_alpha); retrain the adapter")
    for key, plain in PLAIN_LORA.items():
        if (config.get(key, plain) or None) != (plain or None):
            raise ExportError(f"{config_path}: {key} is {config[key]!r}; mtg-export converts plain LoRA adapters "
                              f"({key} {plain!r}), as mtg-train writes them")
    choice = _base_choice(folder, config, base_model)
    base = base_config(choice)
    if base.model_type not in ("mixtral", "mtg_mixtral"):
        raise ExportError(f"{choice.name} is a {base.model_type!r} model; mtg-export converts adapters of Mixtral models")
    adapter = Adapter(name, folder, config, choice, base, _read_modules(folder / "adapter_model.safetensors"))
    _check_shapes(adapter)
    return adapter


def _base_choice(folder: Path, config: dict, base_model: str | None):
    """--base-model, else the base training_meta.json names, else adapter_config.json's."""
    from mtg_core.base_models import choose_base
    from mtg_core.evaluate import recorded_base

    if base_model:
        return choose_base(base_model)
    recorded = recorded_base(folder)
    if recorded is not None:
        return recorded
    if config.get("base_model_name_or_path"):
        return choose_base(config["base_model_name_or_path"], reason="adapter_config.json's base_model_name_or_path")
    raise ExportError(f"{folder}: neither training_meta.json nor adapter_config.json names the base model; pass --base-model")


def _read_modules(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path} is missing; retrain the adapter")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path}: not a readable safetensors file ({exc}); retrain the adapter") from None
    if not tensors:
        raise ExportError(f"{path} holds no LoRA weights; retrain the adapter")
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key)
        if not match:
            raise ExportError(f"{path}: tensor {key} is not a LoRA A/B weight; mtg-export converts plain LoRA adapters")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise ExportError(f"{path}: {module} has lora_{''.join(pair)} but not its partner; retrain the adapter")
    return {module: (pair["A"], pair["B"]) for module, pair in sorted(pairs.items())}


def _check_shapes(adapter: Adapter) -> None:
    """Every module is a Mixtral attention projection or expert matrix of the base, at the adapter's one rank."""
    base, r = adapter.base, adapter.rank
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    q, kv, hidden, ffn = base.num_attention_heads * head_dim, base.num_key_value_heads * head_dim, base.hidden_size, base.intermediate_size
    shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
              "w1": (ffn, hidden), "w3": (ffn, hidden), "w2": (hidden, ffn)}
    where = adapter.folder / "adapter_model.safetensors"
    for module, (a, b) in adapter.modules.items():
        match = ATTENTION.fullmatch(module) or EXPERT.fullmatch(module)
        if not match:
            raise ExportError(f"{where}: {module} is neither a Mixtral attention projection nor an expert matrix")
        if int(match[1]) >= base.num_hidden_layers or (match.re is EXPERT and int(match[2]) >= base.num_local_experts):
            raise ExportError(f"{where}: {module} does not exist in {adapter.choice.name} ({base.num_hidden_layers} layers, "
                              f"{base.num_local_experts} experts); pass the --base-model it was trained on")
        out, inp = shapes[match.groups()[-1]]
        if tuple(a.shape) != (r, inp) or tuple(b.shape) != (out, r):
            raise ExportError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; rank {r} on "
                              f"{adapter.choice.name} needs ({r}, {inp}) and ({out}, {r}); pass the --base-model it was trained on")


def _first_missing_expert(adapter: Adapter, whole_triplets: bool) -> str | None:
    """The first expert matrix a layer lacks: of w1/w2/w3 (whole_triplets), or of the matrices the layer adapts."""
    present: dict[int, set] = {}
    for module in adapter.modules:
        if match := EXPERT.fullmatch(module):
            present.setdefault(int(match[1]), set()).add((int(match[2]), match[3]))
    for layer, have in sorted(present.items()):
        matrices = EXPERT_MATRICES if whole_triplets else sorted({w for _, w in have})
        for expert in range(adapter.base.num_local_experts):
            for matrix in matrices:
                if (expert, matrix) not in have:
                    return f"model.layers.{layer}.mlp.experts.{expert}.{matrix}"
    return None


# --- vLLM ---------------------------------------------------------------------------------------------


def check_vllm(adapter: Adapter) -> None:
    if adapter.rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ExportError(f"{adapter.folder}: rank {adapter.rank} is above vLLM's largest --max-lora-rank "
                          f"({', '.join(map(str, VLLM_MAX_LORA_RANKS))}); retrain with a rank of at most {VLLM_MAX_LORA_RANKS[-1]}")
    if missing := _first_missing_expert(adapter, whole_triplets=True):
        raise ExportError(f"{adapter.folder}: no LoRA for {missing}; vLLM packs the experts of a layer only when every "
                          "expert has all of w1, w2 and w3 (train with target modules w1, w2, w3 or none of them)")


def write_vllm(adapter: Adapter, work: Path, dtype: str | None) -> list[str]:
    """The peft adapter with expert keys under `block_sparse_moe.experts`, where vLLM's Mixtral looks them up."""
    from safetensors.torch import save_file

    tensors = {}
    for module, (a, b) in adapter.modules.items():
        name = f"base_model.model.{module.replace(TRAINED_BLOCK, HUB_BLOCK)}"
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = _cast(a, dtype), _cast(b, dtype)
    save_file(tensors, work / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {**adapter.config, "base_model_name_or_path": adapter.serve_id}
    (work / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return ["adapter_config.json", "adapter_model.safetensors"]


def vllm_command(adapters: list[Adapter], targets: list[Path]) -> str:
    rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= max(a.rank for a in adapters))
    modules = [f"{a.name}={t.resolve()}" for a, t in zip(adapters, targets)]
    return shlex.join(["vllm", "serve", adapters[0].serve_id, "--enable-lora", "--max-loras", str(len(adapters)),
                       "--max-lora-rank", str(rank), "--lora-modules", *modules])


# --- llama.cpp GGUF ------------------------------------------------------------------------------------


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


def write_gguf(adapter: Adapter, work: Path, dtype: str | None) -> list[str]:
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
    return [file]


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


# --- merged weights ------------------------------------------------------------------------------------


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


def write_merged(adapter: Adapter, folder: Path, work: Path, dtype: str | None) -> list[str]:
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
    written = list(shards)
    if (folder / "model.safetensors.index.json").is_file():
        index = _read_json(folder / "model.safetensors.index.json")
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append("model.safetensors.index.json")
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
            written.append(name)
    return [*written, "config.json"]


# --- writing -------------------------------------------------------------------------------------------


def _cast(tensor, dtype: str | None):
    import torch

    return (tensor.to(getattr(torch, DTYPES[dtype])) if dtype else tensor).contiguous()


def prepare_out(out: Path, names: list[str], needed_bytes: int) -> None:
    """Fail before writing when --out is unwritable, too small, or holds a folder of an expert's name that no export made."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write there ({exc.strerror}); choose a writable folder") from None
    for name in names:
        if (out / name).exists() and not (out / name / MARKER).is_file():
            raise ExportError(f"{out / name} exists and is not an mtg-export folder (no {MARKER}); remove it or choose another --out")
    free = shutil.disk_usage(out).free
    if needed_bytes > free:
        raise ExportError(f"--out {out}: the export needs {needed_bytes / 1024**3:.1f} GiB and {free / 1024**3:.1f} GiB are free there; "
                          "free space or choose another --out")


def write_export(out: Path, adapter: Adapter, fmt: str, dtype: str | None, write) -> Path:
    """Write one export into OUT/.NAME.partial-PID, then swap it in for OUT/NAME (an earlier export stays whole until then)."""
    target, work = out / adapter.name, out / f".{adapter.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        files = write(work)
        marker = {"format": fmt, "expert": adapter.name, "adapter": str(adapter.folder.resolve()),
                  "base_model": {"name": adapter.choice.name, "serve_as": adapter.serve_id},
                  "rank": adapter.rank, "alpha": adapter.alpha, "dtype": dtype or "unchanged", "files": sorted(files),
                  "mtg_core": __version__, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    install(work, target)
    return target


def export(adapters: Path, name: str | None, all_experts: bool, fmt: str, base_model: str | None, out: Path, dtype: str | None) -> list[Path]:
    """Check every selected adapter (and, for merged, its base checkpoint), then write one export per adapter."""
    names = adapter_names(adapters, name, all_experts)
    _recover(adapters, names)  # a kill while mtg-train installed an adapter: finish or undo it first
    chosen = [load_adapter(adapters, n, base_model) for n in names]
    checkpoints, needed = {}, 0
    for adapter in chosen:
        if fmt == "vllm":
            check_vllm(adapter)
        elif fmt == "gguf":
            check_gguf(adapter)
        else:
            checkpoints[adapter.name] = checkpoint_folder(adapter)
            needed += check_merged(adapter, checkpoints[adapter.name], dtype)
    if fmt == "vllm" and len({a.serve_id for a in chosen}) > 1:
        bases = ", ".join(f"{a.name}: {a.serve_id}" for a in chosen)
        raise ExportError(f"one vllm serve serves one base, and these adapters were trained on different ones ({bases}); export them separately")
    prepare_out(out, [a.name for a in chosen], needed)
    targets = []
    for adapter in chosen:
        if fmt == "merged":
            write = partial(write_merged, adapter, checkpoints[adapter.name], dtype=dtype)
        else:
            write = partial(write_vllm if fmt == "vllm" else write_gguf, adapter, dtype=dtype)
        targets.append(write_export(out, adapter, fmt, dtype, write))
        click.echo(f"{adapter.name}: {fmt} export of {adapter.folder} (rank {adapter.rank}, base {adapter.choice.name}) "
                   f"written to {targets[-1]}", err=True)
    _print_serving(fmt, chosen, targets)
    return targets


def _print_serving(fmt: str, adapters: list[Adapter], targets: list[Path]) -> None:
    """The command that serves the exports on stdout (so `mtg-export ... > serve.sh` keeps it); how to use it on stderr."""
    if fmt == "vllm":
        click.echo(vllm_command(adapters, targets))
        click.echo(f'choose the expert per request with "model": "<expert name>" ({", ".join(a.name for a in adapters)}); '
                   "see docs/serving.md", err=True)
    elif fmt == "gguf":
        click.echo(gguf_command(adapters, targets))
        click.echo(f"BASE.gguf: {adapters[0].serve_id} converted with llama.cpp's convert_hf_to_gguf.py (without "
                   '--fuse-gate-up-exps); choose the expert per request with "lora": [{"id": N, "scale": 1.0}], N in the '
                   "order above; see docs/serving.md", err=True)
    else:
        for target in targets:
            click.echo(shlex.join(["vllm", "serve", str(target.resolve())]))


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--expert", "-e", metavar="NAME", help="The adapter in ADAPTERS/NAME/ to export.")
@click.option("--all", "all_experts", is_flag=True, help="Every adapter in ADAPTERS (vllm: one multi-LoRA server command).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="vllm: peft adapter named for vLLM's Mixtral; gguf: llama.cpp LoRA adapter; merged: the base with the adapter merged in.")
@click.option("--adapters", type=click.Path(file_okay=False), default="adapters", show_default=True, help="Where mtg-train wrote the adapters.")
@click.option("--base-model", metavar="NAME", help="Default: the base the adapter was trained on (its training_meta.json).")
@click.option("--out", type=click.Path(), help="Exports go to OUT/<expert>/. Default: exports/<format>.")
@click.option("--dtype", type=click.Choice(list(DTYPES)),
              help="Cast the exported weights. Default: unchanged (adapters as trained, fp32; merged: the base's own dtype).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def export_command(expert, all_experts, fmt, adapters, base_model, out, dtype, debug):
    """Convert trained adapters for serving: vLLM multi-LoRA, llama.cpp GGUF, or merged full weights."""
    with _reported_errors(debug):
        export(Path(adapters), expert, all_experts, fmt, base_model, Path(out) if out else Path("exports") / fmt, dtype)


def _recover(adapters: Path, names: list[str]) -> None:
    from mtg_core.outputs import recover_unlocked

    for name in names:
        recover_unlocked(adapters, name, lambda line: click.echo(f"warning: {line}", err=True))
