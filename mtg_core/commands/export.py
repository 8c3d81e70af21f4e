"""`mtg-export`: trained adapters for serving (vLLM multi-LoRA, llama.cpp GGUF, merged weights); the run is mtg_core.export's."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from mtg_core.commands.exits import OneLineCommand, reported_errors
from mtg_core.export import FORMATS, export
from mtg_core.export.writing import DTYPES, ExportStopped
from mtg_core.options import TEXT, BaseModelName, ShellPath


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--expert", "-e", type=TEXT, metavar="NAME", help="The adapter in ADAPTERS/NAME/ to export.")
@click.option("--all", "all_experts", is_flag=True, help="Every adapter in ADAPTERS (vllm: one multi-LoRA server command).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="vllm: peft adapter named for vLLM's Mixtral; gguf: llama.cpp LoRA adapter; merged: the base with the adapter merged in.")
@click.option("--adapters", type=ShellPath(file_okay=False), default="adapters", show_default=True, help="Where mtg-train wrote the adapters.")
@click.option("--base-model", type=BaseModelName(), metavar="NAME", help="Default: the base the adapter was trained on (its training_meta.json).")
@click.option("--out", type=ShellPath(), help="Exports go to OUT/<expert>/. Default: exports/<format>.")
@click.option("--dtype", type=click.Choice(list(DTYPES)),
              help="Cast the exported weights. Default: unchanged (adapters as trained, fp32; merged: the base's own dtype).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def export_command(expert, all_experts, fmt, adapters, base_model, out, dtype, debug):
    """Convert trained adapters for serving: vLLM multi-LoRA, llama.cpp GGUF, or merged full weights."""
    try:
        with reported_errors(debug):
            export(Path(adapters), expert, all_experts, fmt, base_model, Path(out) if out else Path("exports") / fmt, dtype)
    except ExportStopped as stop:
        click.echo(f"interrupted: stopped by {signal.Signals(stop.signum).name}; the export being written was removed "
                   "(exports finished before it are in place, earlier ones untouched)", err=True)
        sys.exit(128 + stop.signum)
