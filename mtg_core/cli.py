"""`mtg-train`: list, plan and train expert adapters. Imports no torch until training starts."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import attrs
import click

from mtg_core.commands.exits import OneLineCommand, StopNow, reported_errors, stop_on_signals, survive_closed_stderr
from mtg_core.errors import ConfigError, MtgError
from mtg_core.listing import expert_rows, print_table, refuse_problems
from mtg_core.options import SEED, TEXT, BaseModelName, FiniteFloat, ShellPath, count, read_config
from mtg_core.plan import OFFLOAD_CHOICES
from mtg_core.plugins import ALLOW_LIST_ENV, Registry

log = logging.getLogger("mtg_core")


def _setup_logging(output_dir: Path) -> None:
    from mtg_core.train import rank

    log.handlers.clear()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if rank() != 0:  # other ranks of torchrun only report problems, prefixed with their rank
        log.setLevel(logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank()}] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        return
    from mtg_core.outputs import open_shared

    log.setLevel(logging.INFO)
    log_file = os.fdopen(open_shared(output_dir / "training_log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")
    for handler in (logging.StreamHandler(sys.stderr), logging.StreamHandler(log_file)):
        handler.setFormatter(formatter)
        log.addHandler(handler)


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
        survive_closed_stderr()
        try:
            with stop_on_signals():
                _train(registry, expert, all_experts, base_model, data, output_dir, hyper, resume, force, eval_after)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("aborted: second Ctrl-C; any earlier adapter is untouched, checkpoints so far are kept for --resume", err=True)
            sys.exit(130)
        except StopNow as stop:
            click.echo(f"interrupted: stopped by {signal.Signals(stop.signum).name} outside a training step; nothing was "
                       "half-written (adapters finished before it are installed, earlier ones untouched)", err=True)
            sys.exit(128 + stop.signum)


def _selected(registry: Registry, name, all_experts) -> list:
    if bool(name) == bool(all_experts):
        raise ConfigError("give --expert NAME or --all (see --list for the installed experts)")
    if name:
        return [registry.expert(name)]
    experts = []
    for candidate in registry.experts():  # --all: a broken third-party expert costs only itself
        try:
            experts.append(registry.expert(candidate.name))
        except MtgError as exc:
            click.echo(f"warning: --all skips {candidate.name}: {exc}", err=True)
    if not experts:
        raise ConfigError(f"no experts installed; pip install ./mtg_expert_<name> (or check ${ALLOW_LIST_ENV})")
    return experts


def _plan(registry: Registry, name, all_experts, base_model, hyper: dict, as_json: bool) -> None:
    from mtg_core.base_models import choose_base, default_base
    from mtg_core.train import TrainOptions, local_world_size, memory_plan, world_size

    experts = _selected(registry, name, all_experts)
    options = TrainOptions(**{k: v for k, v in hyper.items() if v is not None})
    choice = choose_base(base_model) if base_model else default_base()
    plans = []
    for expert in experts:
        plan, advice = memory_plan(choice, registry.lora_settings(expert), options, rent=True)
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


def _train(registry: Registry, name, all_experts, base_model, data, output_dir: str, hyper: dict, resume=False, force=False, eval_after=False) -> None:
    from mtg_core.outputs import lock_all, require_output_dir
    from mtg_core.train import TrainOptions, check_output_dir, prepare, rank

    experts = _selected(registry, name, all_experts)
    if all_experts and data:
        raise ConfigError("--data applies to one expert: use it with --expert, not --all")
    output_dir = require_output_dir(output_dir)
    options = TrainOptions(**{k: v for k, v in hyper.items() if v is not None})
    runs = [prepare(registry, expert, options, data) for expert in experts]  # all data checked before weights load
    check_output_dir(output_dir)
    locks = lock_all(output_dir, [expert.name for expert in experts]) if rank() == 0 else []  # rank 0 writes
    try:
        _train_locked(registry, experts, runs, base_model, output_dir, options, hyper, resume, force, eval_after)
    finally:
        for lock in locks:
            lock.release()


def _train_locked(registry, experts, runs, base_model, output_dir: Path, options, hyper: dict, resume, force, eval_after) -> None:
    from mtg_core.errors import TrainingInterrupted
    from mtg_core.outputs import check_replaceable, recover
    from mtg_core.train import STOP, plan_resume, rank, tokenize_run, train_expert

    recovered = []
    if rank() == 0:
        for expert in experts:
            recover(output_dir, expert.name, recovered.append)
            check_replaceable(output_dir, expert.name)
    _setup_logging(output_dir)
    for line in recovered:
        log.warning(line)
    from mtg_core.base_models import TINY, TINY_LR, choose_base, default_base, load_base, load_tokenizer

    choice = choose_base(base_model) if base_model else default_base()
    log.info("base model: %s (%s): %s", choice.name, choice.location, choice.reason)
    for failure in registry.failures:
        log.warning("plugin %s (%s) not loaded: %s", failure.plugin, failure.distribution, failure.reason)
    if hyper["lr"] is None and choice.name == TINY:
        options = attrs.evolve(options, lr=TINY_LR)
    runs = [plan_resume(run, options, output_dir, choice.identity, resume, force) for run in runs]
    tokenizer = load_tokenizer(choice)
    runs = [tokenize_run(run, tokenizer, options.seq_len) for run in runs]
    if eval_after:
        from mtg_core.evaluate import heldout_data

        for run in runs:
            heldout_data(tokenizer, registry, run.expert, options.seq_len)
    plans = _memory_plans(choice, [run.expert for run in runs], [run.lora for run in runs], options)
    base = load_base(choice, options.quant, log.info, tokenizer, streamed_layers=_most_streamed(plans))
    _chunk_experts(base.model, plans)
    for done, (run, plan) in enumerate(zip(runs, plans), 1):
        train_expert(base, registry, run, plan, options, output_dir)
        STOP.phase = "setup"
        if STOP.signum is not None:  # arrived while the adapter was being saved
            left = f"; not trained: {', '.join(r.expert.name for r in runs[done:])}" if done < len(runs) else ""
            raise TrainingInterrupted(STOP.signum, f"stopped by {signal.Signals(STOP.signum).name} after {run.expert.name}'s adapter was saved{left}")
    if eval_after and rank() == 0:
        run_eval(registry, experts, output_dir, choice, base, max_new_tokens=48, seq_len=options.seq_len, no_fail=False)


def _memory_plans(choice, experts: list, loras: list, options, inference: bool = False) -> list:
    """Each expert's memory plan, made before the base loads (while the device's memory is still free)."""
    from mtg_core.train import memory_plan

    plans = []
    for expert, lora in zip(experts, loras):
        plan, advice = memory_plan(choice, lora, options, inference=inference)
        if not plan.fits:
            log.warning("%s: the memory plan (%.2f GiB) does not fit the %.2f GiB %s; %s", expert.name, plan.total_bytes / 1024**3,
                        plan.device_free_bytes / 1024**3, "budget" if options.gpu_memory else "free", f"to fit: {advice}" if advice else "see --plan")
        plans.append(plan)
    return plans


def _most_streamed(plans: list) -> tuple[int, ...]:
    """The layers whose experts stream from host memory: the most any expert's plan needs (one base serves all)."""
    return max((plan.streamed_layers for plan in plans), key=len, default=())


def _chunk_experts(model, plans: list) -> None:
    """Dequantise experts in the smallest chunk any plan needs (one base serves all), and say so."""
    from mtg_core.moe.streaming import set_expert_chunk

    chunks = [plan.expert_chunk for plan in plans if plan.expert_chunk is not None]
    if chunks:
        log.info("experts dequantised %d of %d at a time (the memory plan's chunk)", min(chunks), plans[0].experts)
    set_expert_chunk(model, min(chunks, default=None), "group" if any(plan.staging == "group" for plan in plans) else "layer")


def _inference_plans(registry, experts, choice, quant: str, offload: str, gpu_memory: float | None, host_memory: float | None = None,
                         seq_len: int = 512, batch_size: int = 1) -> list:
    """For mtg-eval and mtg-ask: the inference plan of `batch_size` sequences of `seq_len` tokens (no LoRA gradients,
    no optimizer state, no checkpointed hidden states: see plan.plan_memory's `training`)."""
    from mtg_core.train import TrainOptions

    options = TrainOptions(batch_size=batch_size, grad_accum=1, seq_len=seq_len, quant=quant, offload_experts=offload, gpu_memory=gpu_memory,
                           host_memory=host_memory)
    return _memory_plans(choice, experts, [registry.lora_settings(e) for e in experts], options, inference=True)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", type=TEXT)
@click.option("--description", "-d", type=TEXT, required=True, help="One line: what the expert does.")
@click.option("--dest", type=ShellPath(file_okay=False), default=".", show_default=True, help="Folder to create it in.")
def new_expert_command(name, description, dest):
    """Create mtg_expert_NAME/, a new expert package to edit, test and `pip install`."""
    from mtg_core.scaffold import clash_warning, next_steps, scaffold

    with reported_errors():
        target = Path(dest) / f"mtg_expert_{name}"
        existed = target.exists()
        try:
            root = scaffold(name, description, Path(dest))
        except OSError as exc:
            if not existed:
                shutil.rmtree(target, ignore_errors=True)  # no half-written package left behind
            raise ConfigError(f"--dest {dest}: cannot create {target} there ({exc.strerror}); choose a writable folder") from None
    click.echo(next_steps(root))
    if clash_warning(name):
        click.echo(f"warning: {clash_warning(name)}", err=True)


def _recover(adapters: Path, experts: list) -> None:
    """Finish an adapter install that a kill interrupted (unless a live run is doing it), telling the user."""
    from mtg_core.outputs import recover_unlocked

    for expert in experts:
        recover_unlocked(adapters, expert.name, lambda line: click.echo(f"warning: {line}", err=True))


class EvalFailed(MtgError):
    exit_code = 1


def _base_for(adapters: Path, experts: list, base_model: str | None):
    """--base-model, else the base the (first) adapter was trained on, else the machine's default."""
    from mtg_core.base_models import choose_base, default_base
    from mtg_core.evaluate import check_adapter_files, recorded_base

    if base_model:
        return choose_base(base_model)
    for expert in experts:
        if (adapters / expert.name / "adapter_config.json").is_file():
            recorded = recorded_base(check_adapter_files(adapters, expert.name))
            if recorded is not None:
                return recorded
    return default_base()


def run_eval(registry: Registry, experts: list, adapters: Path, choice, base, max_new_tokens: int, seq_len: int, no_fail: bool) -> dict:
    """Evaluate `experts`' adapters on `base` (a LoadedBase), print the table, then write each eval.json."""
    from mtg_core.evaluate import attach_adapters, check_adapter, evaluate
    from mtg_core.outputs import adapter_identity, write_eval

    folders = {e.name: check_adapter(adapters, e.name, choice) for e in experts}
    identities = {name: adapter_identity(folder) for name, folder in folders.items()}  # before peft reads the files
    model = attach_adapters(base.model, folders)
    results = evaluate(model, base.tokenizer, registry, experts, max_new_tokens, seq_len)
    for name, result in results.items():
        result["skipped_plugins"] = registry.skipped_for(name)
    click.echo(f"{'EXPERT':<12} {'BASE LOSS':>10} {'ADAPTER LOSS':>13} {'BASE PPL':>10} {'ADAPTER PPL':>12}  RESULT")
    for name, r in results.items():
        click.echo(f"{name:<12} {r['heldout_loss']['base']:>10.4f} {r['heldout_loss']['adapter']:>13.4f} "
                   f"{r['heldout_perplexity']['base']:>10.2f} {r['heldout_perplexity']['adapter']:>12.2f}  "
                   f"{'better' if r['improved'] else 'NOT better'}")
    if len(results) > 1:
        names = list(results)
        click.echo("\nheld-out loss, adapter (row) on each expert's held-out set (column):")
        click.echo(" " * 12 + "".join(f"{n:>12}" for n in names))
        matrix = results[names[0]]["heldout_matrix"]
        for row in names:
            click.echo(f"{row:<12}" + "".join(f"{matrix[row][col]:>12.4f}" for col in names))
    for name, r in results.items():
        for sample in r["samples"]:
            click.echo(f"\n[{name}] {sample['prompt']}\n  base:    {sample['base'][:160]}\n  adapter: {sample['adapter'][:160]}")
    write_eval(adapters, identities, results)  # after printing: results that cannot be saved are still seen
    worse = [name for name, r in results.items() if not r["improved"]]
    if worse and not no_fail:
        raise EvalFailed(f"the adapter of {', '.join(worse)} does not lower its held-out loss (see eval.json; --no-fail to only report)")
    return results


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--expert", "-e", type=TEXT, metavar="NAME", help="Expert whose adapter to verify.")
@click.option("--all", "all_experts", is_flag=True, help="Every installed expert, with the held-out loss matrix.")
@click.option("--base-model", type=BaseModelName(), metavar="NAME", help="Default: the base the adapter was trained on.")
@click.option("--adapters", type=ShellPath(file_okay=False), default="adapters", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=48, show_default=True)
@click.option("--seq-len", type=click.IntRange(16, 32768), default=512, show_default=True)
@click.option("--quant", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True)
@click.option("--offload-experts", type=click.Choice(OFFLOAD_CHOICES), default="auto", show_default=True, help="As for mtg-train.")
@click.option("--gpu-memory", type=FiniteFloat(min=0, min_open=True), metavar="GIB", help="As for mtg-train.")
@click.option("--host-memory", type=FiniteFloat(min=0, min_open=True), metavar="GIB", help="As for mtg-train.")
@click.option("--no-fail", is_flag=True, help="Report only: exit 0 even when an adapter does not lower its held-out loss.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_command(expert, all_experts, base_model, adapters, max_new_tokens, seq_len, quant, offload_experts, gpu_memory, host_memory,
                 no_fail, debug):
    """Verify adapters: held-out loss and greedy answers to each expert's evaluation prompts, base vs adapter."""
    with reported_errors(debug):
        registry = Registry.discover()
        experts = _selected(registry, expert, all_experts)
        adapters = Path(adapters)
        _recover(adapters, experts)
        choice = _base_for(adapters, experts, base_model)
        from mtg_core.base_models import load_base, load_tokenizer
        from mtg_core.evaluate import check_adapter, heldout_data

        for e in experts:  # before the base loads
            check_adapter(adapters, e.name, choice)
        tokenizer = load_tokenizer(choice)
        heldout = max(len(heldout_data(tokenizer, registry, e, seq_len).rows) for e in experts)
        # the held-out loss runs each expert's held-out set as one batch (evaluate.heldout_batch)
        plans = _inference_plans(registry, experts, choice, quant, offload_experts, gpu_memory, host_memory, seq_len, heldout)
        base = load_base(choice, quant, lambda line: click.echo(line, err=True), tokenizer, streamed_layers=_most_streamed(plans))
        _chunk_experts(base.model, plans)
        run_eval(registry, experts, adapters, choice, base, max_new_tokens, seq_len, no_fail)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("question", type=TEXT, required=False)
@click.option("--expert", "-e", type=TEXT, metavar="NAME", help="Expert to answer with (in --interactive: the first one).")
@click.option("--interactive", "-i", is_flag=True, help="Ask many questions; '/expert NAME' switches expert, '/quit' ends.")
@click.option("--base-model", type=BaseModelName(), metavar="NAME", help="Default: the base the adapters were trained on.")
@click.option("--adapters", type=ShellPath(file_okay=False), default="adapters", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=200, show_default=True)
@click.option("--quant", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True)
@click.option("--offload-experts", type=click.Choice(OFFLOAD_CHOICES), default="auto", show_default=True, help="As for mtg-train.")
@click.option("--gpu-memory", type=FiniteFloat(min=0, min_open=True), metavar="GIB", help="As for mtg-train.")
@click.option("--host-memory", type=FiniteFloat(min=0, min_open=True), metavar="GIB", help="As for mtg-train.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def ask_command(question, expert, interactive, base_model, adapters, max_new_tokens, quant, offload_experts, gpu_memory, host_memory,
                debug):
    """Answer an MTG question with a trained expert; --interactive keeps every adapter on one loaded base."""
    with reported_errors(debug):
        _ask(question, expert, interactive, base_model, Path(adapters), max_new_tokens, quant, offload_experts, gpu_memory, host_memory)


def _ask(question, name, interactive, base_model, adapters: Path, max_new_tokens: int, quant: str, offload="auto", gpu_memory=None,
         host_memory=None) -> None:
    from mtg_core.base_models import load_base
    from mtg_core.evaluate import attach_adapters, check_adapter, generate, prompt_for

    if question is not None and not question.strip():
        raise ConfigError('the question is empty; ask one (e.g. mtg-ask --expert explain "What does trample do?")')
    if interactive == bool(question):
        raise ConfigError('give a question, or --interactive (e.g. mtg-ask --expert explain "What does trample do?")')
    registry = Registry.discover()
    _recover(adapters, registry.experts() if interactive else [registry.expert(name)] if name else [])
    broken: dict[str, str] = {}
    if interactive:
        experts = _usable_experts(registry, adapters, broken)
    else:
        experts = [registry.expert(name)] if name else []
        if not experts:
            raise ConfigError("give --expert NAME (see mtg-train --list)")
    choice = _base_for(adapters, experts, base_model)
    folders = {}
    for expert in experts:
        try:
            folders[expert.name] = check_adapter(adapters, expert.name, choice)
        except MtgError as exc:
            if not interactive:
                raise
            broken[expert.name] = str(exc)  # in a session, a bad adapter costs only its expert
            click.echo(f"warning: {expert.name} not loaded: {exc}", err=True)
    experts = [e for e in experts if e.name in folders]
    if name and name.lower() in broken:
        raise ConfigError(f"--expert {name}: {broken[name.lower()]}")
    if not experts:
        raise ConfigError(f"no usable adapters in {adapters}: every one has a problem (above); retrain with mtg-train --expert NAME")
    current = registry.expert(name) if name else experts[0]
    if current.name not in folders:  # before the base loads
        raise ConfigError(f"no adapter for {current.name} in {adapters}")
    plans = _inference_plans(registry, experts, choice, quant, offload, gpu_memory, host_memory)
    base = load_base(choice, quant, lambda line: click.echo(line, err=True), streamed_layers=_most_streamed(plans))
    _chunk_experts(base.model, plans)
    model = attach_adapters(base.model, folders)
    from transformers import TextStreamer

    streamer = TextStreamer(base.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def answer(text: str) -> None:
        model.set_adapter(current.name)
        generate(model, base.tokenizer, prompt_for(registry, current, text), max_new_tokens, streamer)

    if not interactive:
        answer(question)
        return
    by_name = {e.name: e for e in experts}
    click.echo(f"experts loaded: {', '.join(folders)}; '/expert NAME' switches, '/quit' ends", err=True)
    stdin = click.get_binary_stream("stdin")  # bytes: one line that is not UTF-8 must not end the session
    for number, line in enumerate(_prompted_lines(stdin, lambda: current.name), 1):
        try:
            line = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            click.echo(f"error: input line {number} is not UTF-8 text (byte {line[exc.start]:#04x} at position "
                       f"{exc.start}); skipped it, ask again in UTF-8", err=True)
            continue
        if line == "/quit":
            return
        if line.startswith("/expert"):
            wanted = line.removeprefix("/expert").strip().lower()
            if wanted in by_name:
                current = by_name[wanted]
            elif wanted in broken:
                click.echo(f"{wanted} is not loaded: {broken[wanted]}; still {current.name}", err=True)
            else:
                click.echo(f"no adapter loaded for {wanted!r}; loaded: {', '.join(folders)}; still {current.name}", err=True)
        elif line:
            try:
                answer(line)
            except MtgError as exc:  # a plugin failing on one question costs that answer only
                click.echo(f"{exc.label}: {exc}", err=True)


def _usable_experts(registry: Registry, adapters: Path, broken: dict[str, str]) -> list:
    """--interactive: every expert with an adapter whose plugin passes the checks of --list (template, data,
    hooks) before the base loads; each broken one is a warning line, recorded in `broken`, and is not loaded."""
    experts = []
    for candidate in registry.experts():
        if not (adapters / candidate.name / "adapter_config.json").is_file():
            continue
        try:
            experts.append(registry.expert(candidate.name))
        except MtgError as exc:
            broken[candidate.name] = str(exc)
            click.echo(f"warning: {candidate.name} not loaded: {exc}", err=True)
    if not experts and not broken:
        raise ConfigError(f"no trained adapters in {adapters}; train one with mtg-train --expert NAME")
    return experts


def _prompted_lines(stdin, current):
    """Input lines as bytes, each after a '[expert]> ' prompt; ends the prompt's line at end of input."""
    while True:
        click.echo(f"[{current()}]> ", nl=False, err=True)
        line = stdin.readline()
        if not line:
            click.echo("", err=True)
            return
        yield line
