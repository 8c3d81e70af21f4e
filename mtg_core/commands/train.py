"""`mtg-train`: list, plan and train expert adapters. Imports no torch until training starts."""

from __future__ import annotations

import json
import signal
import sys

import click

from mtg_core.commands.exits import OneLineCommand, StopNow, reported_errors, stop_on_signals, survive_closed_stderr
from mtg_core.listing import expert_rows, print_table, refuse_problems
from mtg_core.options import SEED, TEXT, BaseModelName, FiniteFloat, ShellPath, count, read_config
from mtg_core.plan import OFFLOAD_CHOICES
from mtg_core.plugins import Registry


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", type=ShellPath(dir_okay=False), callback=read_config, is_eager=True, expose_value=False,
              help="TOML file with any of these options (names as below, without --); the command line wins.")
@click.option("--expert", "-e", type=TEXT, metavar="NAME", help="Expert to train (any case): see --list.")
@click.option("--all", "all_experts", is_flag=True, help="Train every installed expert in turn on one loaded base.")
@click.option("--list", "list_experts", is_flag=True, help="List installed experts and exit.")
@click.option("--plan", "plan_only", is_flag=True, help="Print the memory the run needs (no weights load) and exit; non-zero if it does not fit.")
@click.option("--json", "as_json", is_flag=True, help="With --list or --plan: print JSON.")
@click.option("--strict", is_flag=True, help="With --list: exit 2 if any row is not ok (for plugin authors' CI).")
@click.option("--base-model", type=BaseModelName(), metavar="NAME", help="Preset (tiny-mixtral, mixtral-8x7b, mixtral-8x7b-instruct), folder or hub id. "
              "Default: mixtral-8x7b with a CUDA GPU, tiny-mixtral otherwise.")
@click.option("--data", type=ShellPath(allow_dash=True), help="JSONL file to train on instead of the expert's bundled data (- reads stdin).")
@click.option("--output-dir", type=ShellPath(file_okay=False), default="adapters", show_default=True,
              help="Adapters go to OUTPUT_DIR/<expert>/.")
@click.option("--max-steps", type=count(), help="Stop after this many optimizer steps.")
@click.option("--max-samples", type=count(), help="Train on the first N examples only (a test run).")
@click.option("--epochs", type=FiniteFloat(min=0, min_open=True, max=1000), default=3.0, show_default=True)
@click.option("--seq-len", type=click.IntRange(16, 32768), default=512, show_default=True, help="Token cap per example.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=4, show_default=True)
@click.option("--grad-accum", type=click.IntRange(1, 1024), default=4, show_default=True)
@click.option("--lr", type=FiniteFloat(min=0, min_open=True, max=1.0),
              help="Learning rate. Default: 2e-4 (QLoRA's) for Mixtral, 2e-3 for tiny-mixtral, whose random base learns slowly.")
@click.option("--seed", type=SEED, default=42, show_default=True)
@click.option("--quant", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True,
              help="nf4: every attention and expert weight in 4-bit (QLoRA); none: the compute dtype.")
@click.option("--offload-experts", type=click.Choice(OFFLOAD_CHOICES), default="auto", show_default=True,
              help="Keep NF4 experts of some layers in host memory and stream them to the GPU as they run: auto streams "
                   "as few layers as the memory plan needs (none on a big GPU), all streams every layer (16 GB cards).")
@click.option("--gpu-memory", type=FiniteFloat(min=0, min_open=True), metavar="GIB",
              help="GPU memory to plan for (default: what is free on the device); --offload-experts auto fits the run into it. "
                   "With --plan on a machine without a GPU: a CUDA GPU of GIB (bf16), the card you are about to rent.")
@click.option("--host-memory", type=FiniteFloat(min=0, min_open=True), metavar="GIB",
              help="Host RAM to plan for (default: what is available); with --plan and --gpu-memory on a machine "
                   "without a GPU: the RAM of the machine you are about to rent.")
@click.option("--save-steps", type=count(), help="Checkpoint every N steps (the last 3 are kept) for --resume.")
@click.option("--resume", is_flag=True, help="Continue the newest complete checkpoint of an interrupted run.")
@click.option("--force", is_flag=True, help="With --resume: resume although settings changed; without: discard an interrupted run.")
@click.option("--eval-after", is_flag=True, help="Verify the new adapters with mtg-eval once training ends.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def train_command(expert, all_experts, list_experts, plan_only, as_json, strict, base_model, data, output_dir, resume, force, eval_after, debug, **hyper):
    """Train MTG reasoning-mode LoRA experts (QLoRA on Mixtral, or the embedded tiny Mixtral on a CPU)."""
    with reported_errors(debug):
        registry = Registry.discover()
        if list_experts:
            rows = expert_rows(registry)
            click.echo(json.dumps(rows, indent=2)) if as_json else print_table(rows)
            if strict:
                refuse_problems(rows)
            return
        if plan_only:
            _plan(registry, expert, all_experts, base_model, hyper, as_json)
            return
        from mtg_core.train.recipe import train_experts

        _warn_force_from_config(resume, force)
        survive_closed_stderr()
        try:
            with stop_on_signals():
                train_experts(registry, expert, all_experts, base_model, data, output_dir, hyper, resume, force, eval_after)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("aborted: second Ctrl-C; any earlier adapter is untouched, checkpoints so far are kept for --resume", err=True)
            sys.exit(130)
        except StopNow as stop:
            click.echo(f"interrupted: stopped by {signal.Signals(stop.signum).name} outside a training step; nothing was "
                       "half-written (adapters finished before it are installed, earlier ones untouched)", err=True)
            sys.exit(128 + stop.signum)


def _warn_force_from_config(resume: bool, force: bool) -> None:
    """--force in a config file acts on every run that uses the file: say so each time (the command line wins)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if force and ctx.get_parameter_source("force") is ParameterSource.DEFAULT_MAP:
        what = "resumes although the settings changed" if resume else "discards an interrupted run's checkpoints"
        click.echo(f"warning: {ctx.meta['mtg_config']} sets force = true: this run {what}; pass --force on the command "
                   "line instead, for the one run that needs it", err=True)


def _plan(registry: Registry, name, all_experts, base_model, hyper: dict, as_json: bool) -> None:
    from mtg_core.distributed import local_world_size, world_size
    from mtg_core.run import TrainOptions, base_for, memory_plan, select_experts

    experts = select_experts(registry, name, all_experts)
    options = TrainOptions.given(hyper)
    choice = base_for(None, experts, base_model)
    plans = []
    for expert in experts:
        plan, advice = memory_plan(choice, registry.lora_settings(expert), options, rent=True, expert=expert)
        plans.append({"expert": expert.name, "base_model": choice.name, "world_size": world_size(), **plan.as_dict(), "advice": advice})
        if not as_json:
            from mtg_core.plan import describe

            per_gpu = (f", per process of {world_size()} (each holds the whole base; the streamed experts' pinned host "
                       f"memory is one copy shared by the {local_world_size()} processes on this node)" if world_size() > 1 else "")
            click.echo(f"{expert.name} on {choice.name}, batch {options.batch_size} x seq {options.seq_len}, quant {options.quant}{per_gpu}:")
            if plan.device == "cuda" and not _has_cuda():
                host = "--host-memory" if options.host_memory is not None else "this machine's available RAM"
                click.echo(f"  no GPU here: planned for a CUDA GPU of {options.gpu_memory:g} GiB in bf16, host RAM from {host}")
            click.echo("\n".join(describe(plan)))
            if not plan.fits:
                click.echo(f"  to fit: {advice}" if advice else "  no batch size or sequence length makes it fit this device")
    if as_json:
        click.echo(json.dumps(plans if all_experts else plans[0], indent=2))
    if not all(p["fits"] for p in plans):
        sys.exit(1)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
