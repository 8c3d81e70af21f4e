"""`mtg-ask`: answer MTG questions with trained experts; the run is mtg_core.ask's."""

from __future__ import annotations

from pathlib import Path

import click

from mtg_core.commands.exits import OneLineCommand, reported_errors
from mtg_core.options import TEXT, BaseModelName, ShellPath, inference_memory_options


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("question", type=TEXT, required=False)
@click.option("--expert", "-e", type=TEXT, metavar="NAME", help="Expert to answer with (in --interactive: the first one).")
@click.option("--interactive", "-i", is_flag=True, help="Ask many questions; '/expert NAME' switches expert, '/quit' ends.")
@click.option("--base-model", type=BaseModelName(), metavar="NAME", help="Default: the base the adapters were trained on.")
@click.option("--adapters", type=ShellPath(file_okay=False), default="adapters", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=200, show_default=True)
@inference_memory_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def ask_command(question, expert, interactive, base_model, adapters, max_new_tokens, quant, offload_experts, gpu_memory, host_memory,
                debug):
    """Answer an MTG question with a trained expert; --interactive keeps every adapter on one loaded base."""
    with reported_errors(debug):
        from mtg_core.ask import ask

        ask(question, expert, interactive, base_model, Path(adapters), max_new_tokens, quant, offload_experts, gpu_memory, host_memory)
