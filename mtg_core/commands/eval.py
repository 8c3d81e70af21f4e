"""`mtg-eval`: verify adapters (held-out loss and answers, base vs adapter); the run is mtg_core.evaluate's."""

from __future__ import annotations

from pathlib import Path

import click

from mtg_core.commands.exits import OneLineCommand, reported_errors
from mtg_core.options import TEXT, BaseModelName, ShellPath, inference_memory_options


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--expert", "-e", type=TEXT, metavar="NAME", help="Expert whose adapter to verify.")
@click.option("--all", "all_experts", is_flag=True, help="Every installed expert, with the held-out loss matrix.")
@click.option("--base-model", type=BaseModelName(), metavar="NAME", help="Default: the base the adapter was trained on.")
@click.option("--adapters", type=ShellPath(file_okay=False), default="adapters", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=48, show_default=True)
@click.option("--seq-len", type=click.IntRange(16, 32768), default=512, show_default=True)
@inference_memory_options
@click.option("--no-fail", is_flag=True, help="Report only: exit 0 even when an adapter does not lower its held-out loss.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_command(expert, all_experts, base_model, adapters, max_new_tokens, seq_len, quant, offload_experts, gpu_memory, host_memory,
                 no_fail, debug):
    """Verify adapters: held-out loss and greedy answers to each expert's evaluation prompts, base vs adapter."""
    with reported_errors(debug):
        from mtg_core.evaluate import eval_adapters

        eval_adapters(expert, all_experts, base_model, Path(adapters), max_new_tokens, seq_len, quant, offload_experts, gpu_memory,
                      host_memory, no_fail)
