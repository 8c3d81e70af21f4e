"""`mtg-export`: trained adapters as vLLM multi-LoRA adapters, llama.cpp GGUF adapters or merged weights.

Training keeps its own adapter format: expert keys `model.layers.N.mlp.experts.E.w1` (transformers 5's
name of the MoE block, which our 4-bit layout and peft load). vLLM and llama.cpp name the block as the
hub checkpoints do (`block_sparse_moe`) and drop or refuse anything else, so every export converts a
copy; the adapters folder is only read. Everything is checked before anything is written, and each
export is written into a hidden work folder that is renamed into place only when it is complete.

The job of each file: `adapter.py` reads and checks a trained adapter; `vllm.py`, `gguf.py` and
`merged.py` check and write one format each; `writing.py` prepares --out and swaps each export into
place; this file runs an export (mtg_core.commands.export is the `mtg-export` command).
"""

from __future__ import annotations

import shlex
from functools import partial
from pathlib import Path

import click

from mtg_core.export.adapter import (ATTENTION, EXPERT, EXPERT_MATRICES, HUB_BLOCK, LORA_KEY, PLAIN_LORA, TRAINED_BLOCK,
                                     Adapter, ExportError, adapter_names, load_adapter)
from mtg_core.export.gguf import check_gguf, gguf_command, gguf_tensors, write_gguf
from mtg_core.export.merged import (FULL_PRECISION, SERVING_FILES, check_merged, checkpoint_folder, hub_key,
                                    write_merged)
from mtg_core.export.vllm import VLLM_MAX_LORA_RANKS, check_vllm, vllm_command, write_vllm
from mtg_core.export.writing import DTYPES, MARKER, prepare_out, write_export

__all__ = ["ATTENTION", "DTYPES", "EXPERT", "EXPERT_MATRICES", "FORMATS", "FULL_PRECISION", "HUB_BLOCK", "LORA_KEY",
           "MARKER", "PLAIN_LORA", "SERVING_FILES", "TRAINED_BLOCK", "VLLM_MAX_LORA_RANKS", "Adapter", "ExportError",
           "adapter_names", "check_gguf", "check_merged", "check_vllm", "checkpoint_folder", "export",
           "gguf_command", "gguf_tensors", "hub_key", "load_adapter", "prepare_out", "vllm_command", "write_export",
           "write_gguf", "write_merged", "write_vllm"]

FORMATS = ("vllm", "gguf", "merged")


def export(adapters: Path, name: str | None, all_experts: bool, fmt: str, base_model: str | None, out: Path, dtype: str | None) -> list[Path]:
    """Check every selected adapter (and, for merged, its base checkpoint), then write one export per adapter."""
    # A kill while mtg-train installed an adapter: finish or undo it first. For --all, before listing the adapters:
    # an interrupted install may have left no adapters/<expert>/ to find.
    from mtg_core.run import finish_installs

    if all_experts and adapters.is_dir():
        from mtg_core.outputs import pending_installs

        finish_installs(adapters, pending_installs(adapters))
    names = adapter_names(adapters, name, all_experts)
    if not all_experts:
        finish_installs(adapters, names)
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
    prepare_out(out, [a.name for a in chosen], needed, adapters, [a.folder for a in chosen])
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
        from mtg_core.base_models import TINY

        if adapters[0].choice.name == TINY:  # llama.cpp does not know its tokenizer: there is no BASE.gguf to make
            click.echo(f"{TINY} does not convert to GGUF (stock llama.cpp does not recognise its tokenizer): these files "
                       "check the format; train on mixtral-8x7b to serve with llama.cpp; see docs/serving.md", err=True)
        else:
            click.echo(f"BASE.gguf: {adapters[0].serve_id} converted with llama.cpp's convert_hf_to_gguf.py (without "
                       '--fuse-gate-up-exps); choose the expert per request with "lora": [{"id": N, "scale": 1.0}], N in the '
                       "order above; see docs/serving.md", err=True)
    else:
        for target in targets:
            click.echo(shlex.join(["vllm", "serve", str(target.resolve())]))
