"""The generic trainer: any registered expert, the seed's memory-optimised QLoRA recipe, on transformers' Trainer.

Reads top to bottom: prepare (data and settings, before any weights load), train (peft LoRA on the
loaded base), save (adapter, metadata, TensorBoard) into a work folder that replaces the old adapter
only when everything succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import attrs

from mtg_core.data import TokenizedData, check_trainable, file_sha256, load_examples, tokenize
from mtg_core.errors import ConfigError, OutOfMemory, TrainingInterrupted
from mtg_core.experts import FormattedExample, LoraSettings
from mtg_core.plugins import Expert, Registry

log = logging.getLogger("mtg_core")


@attrs.frozen
class TrainOptions:
    """Hyper-parameters of one run; ranges are checked by the CLI before anything loads."""

    epochs: float = 3.0
    max_steps: int | None = None
    max_samples: int | None = None
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    seed: int = 42
    quant: str = "nf4"
    save_steps: int | None = None


KEPT_CHECKPOINTS = 3
CHECKPOINT_DONE = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it is incomplete


@attrs.frozen
class PreparedRun:
    """Everything about one expert's run that can be checked before the base model loads."""

    expert: Expert
    lora: LoraSettings
    data_path: Path
    data_sha256: str
    examples: list[FormattedExample]
    resume_from: Path | None = None
    data: TokenizedData | None = None


def prepare(registry: Registry, expert: Expert, options: TrainOptions, data: Path | None) -> PreparedRun:
    lora = registry.lora_settings(expert)
    data_path = Path(data) if data else registry.data_files(expert).train
    examples = load_examples(data_path, lambda record: registry.format_example(expert, record), options.max_samples)
    return PreparedRun(expert, lora, data_path, file_sha256(data_path), examples)


def tokenize_run(run: PreparedRun, tokenizer, seq_len: int) -> PreparedRun:
    """Tokenise with the base's tokenizer and refuse data that would leave nothing to learn."""
    data = tokenize(run.examples, tokenizer, seq_len)
    log.info(
        "%s: %d examples from %s; %d truncated to %d tokens, %d with no answer tokens, %d answer tokens to learn",
        run.expert.name, len(data.rows), run.data_path, data.truncated, seq_len, data.untrained, data.trained_tokens,
    )
    check_trainable(data, seq_len, str(run.data_path))
    return attrs.evolve(run, data=data)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def work_dir(output_dir: Path, expert: str) -> Path:
    """Where a run trains and checkpoints; it becomes DIR/<expert>/ only when the run succeeds."""
    return output_dir / f".{expert}.partial"


def newest_checkpoint(work: Path) -> Path | None:
    done = [p for p in work.glob("checkpoint-*") if (p / CHECKPOINT_DONE).is_file() and p.name.split("-")[-1].isdigit()]
    return max(done, key=step_of, default=None)


def run_identity(run: PreparedRun, options: TrainOptions, base_location: str) -> dict:
    """What a checkpoint means: resuming with any of these changed would train something else."""
    return {
        "expert": run.expert.name,
        "base_model": base_location,
        "rank": run.lora.rank,
        "alpha": run.lora.alpha,
        "dropout": run.lora.dropout,
        "target_modules": list(run.lora.target_modules),
        "data_sha256": run.data_sha256,
        "max_samples": options.max_samples,
        "seq_len": options.seq_len,
        "batch_size": options.batch_size,
        "grad_accum": options.grad_accum,
        "quant": options.quant,
    }


def plan_resume(run: PreparedRun, options: TrainOptions, output_dir: Path, base_location: str, resume: bool, force: bool) -> PreparedRun:
    """Decide, before any weights load, whether this run continues a checkpoint or starts afresh."""
    work = work_dir(output_dir, run.expert.name)
    checkpoint = newest_checkpoint(work) if work.is_dir() else None
    if not resume:
        if checkpoint and not force:
            raise ConfigError(
                f"{work} holds an interrupted run of {run.expert.name} (step {step_of(checkpoint)}); "
                "continue it with --resume, or pass --force to discard it"
            )
        if rank() == 0:  # every rank decides alike; only rank 0 touches the disk
            shutil.rmtree(work, ignore_errors=True)
        return run
    if checkpoint is None:
        raise ConfigError(
            f"nothing to resume for {run.expert.name}: no complete checkpoint in {work} "
            "(checkpoints are written every --save-steps N steps and when a run is interrupted)"
        )
    identity = work / "run.json"
    saved = json.loads(identity.read_text(encoding="utf-8")) if identity.is_file() else {}
    changed = {k: (saved.get(k), v) for k, v in run_identity(run, options, base_location).items() if saved.get(k) != v}
    if changed and not force:
        what = "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"cannot resume {run.expert.name} from {checkpoint}: {what}; pass --force to resume anyway")
    return attrs.evolve(run, resume_from=checkpoint)


def rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class StopRequest:
    """Set by SIGINT/SIGTERM; the training loop stops after the current step and checkpoints."""

    signum: int | None = None


STOP = StopRequest()


def memory_plan(choice, lora: LoraSettings, options: TrainOptions):
    """The run's memory plan on this machine, and settings that would fit when it does not."""
    from mtg_core.base_models import base_config, device_and_dtype, free_memory
    from mtg_core.plan import plan_memory, settings_that_fit

    config = base_config(choice)
    device, dtype = device_and_dtype()
    free = free_memory(device)

    def plan_for(batch_size: int, seq_len: int):
        return plan_memory(config, lora.target_modules, lora.rank, options.quant, batch_size, seq_len,
                           dtype.itemsize, device, free)

    plan = plan_for(options.batch_size, options.seq_len)
    advice = None if plan.fits else settings_that_fit(plan_for, options.batch_size, options.grad_accum, options.seq_len)
    return plan, advice


def check_output_dir(output_dir: Path) -> None:
    """Fail before loading weights when the adapters folder cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as exc:
        raise ConfigError(f"--output-dir {output_dir}: cannot write there ({exc.strerror}); choose a writable folder") from None


def memory_stats() -> dict[str, float]:
    """Process RSS and, on CUDA, allocated / reserved / peak memory, in GiB."""
    import psutil
    import torch

    gib = 1024**3
    stats = {"memory/rss_gib": psutil.Process().memory_info().rss / gib}
    if torch.cuda.is_available():
        stats["memory/cuda_allocated_gib"] = torch.cuda.memory_allocated() / gib
        stats["memory/cuda_reserved_gib"] = torch.cuda.memory_reserved() / gib
        stats["memory/cuda_peak_gib"] = torch.cuda.max_memory_allocated() / gib
    return {k: round(v, 4) for k, v in stats.items()}


def _trainer_classes():
    from transformers import ProgressCallback, Trainer, TrainerCallback

    class MemoryLoggingTrainer(Trainer):
        # Trainer.log is the one place every reporter (TensorBoard included) reads from: memory joins the logs here.
        def log(self, logs, start_time=None):
            if "loss" in logs:
                logs.update(memory_stats())
            super().log(logs, start_time)

    class LogLines(TrainerCallback):
        """Each logging step as one line of training_log.txt and the console."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                fields = " ".join(f"{k.removeprefix('memory/')}={v:.4g}" for k, v in logs.items() if isinstance(v, (int, float)))
                log.info("step %d/%d %s", state.global_step, state.max_steps, fields)

    class ProgressBarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass  # LogLines already reports each step, once, in a readable form

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if _stop_agreed(args.device):
                control.should_save = True
                control.should_training_stop = True

    return MemoryLoggingTrainer, [LogLines(), StopOnSignal()], ProgressBarOnly


def _stop_agreed(device) -> bool:
    """Whether to stop now. Under torch.distributed every rank must stop at the same step (a rank that
    went on would wait forever in the next all-reduce), so the ranks agree with a one-number all-reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return STOP.signum is not None
    flag = torch.tensor([STOP.signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and STOP.signum is None:
        STOP.signum = int(flag.item())
    return bool(flag.item())


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "mtg-core")}


def train_expert(base, registry: Registry, run: PreparedRun, options: TrainOptions, output_dir: Path) -> dict:
    """Train one expert's LoRA on `base.model`, write DIR/<expert>/ atomically, and leave the base LoRA-free."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, ProgressCallback, TrainingArguments

    expert, data = run.expert, run.data
    lora_config = LoraConfig(
        r=run.lora.rank,
        lora_alpha=run.lora.alpha,
        lora_dropout=run.lora.dropout,
        target_modules=list(run.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(options.seed)  # LoRA A matrices are drawn here
    model = get_peft_model(base.model, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: LoRA rank %d alpha %g dropout %g on %s: %d trainable of %d parameters",
             expert.name, run.lora.rank, run.lora.alpha, run.lora.dropout, ",".join(run.lora.target_modules), trainable, total)

    plan, _ = memory_plan(base.choice, run.lora, options)
    log.info("%s: memory plan %.3f GiB (weights %.3f, activations %.3f) of %.3f GiB free on %s",
             expert.name, plan.total_bytes / 1024**3, plan.weights_bytes / 1024**3, plan.activation_bytes / 1024**3,
             plan.device_free_bytes / 1024**3, plan.device)
    cuda = base.device == "cuda"
    work = work_dir(output_dir, expert.name)
    main_process = rank() == 0  # under torchrun only rank 0 writes checkpoints, logs and the adapter
    work.mkdir(exist_ok=True)
    if main_process:
        (work / "run.json").write_text(json.dumps(run_identity(run, options, base.choice.location), indent=2), encoding="utf-8")
    log.info("%s: global batch %d = %d per device x %d accumulation x %d processes", expert.name,
             options.batch_size * options.grad_accum * world_size(), options.batch_size, options.grad_accum, world_size())
    finished = False
    try:
        args = TrainingArguments(
            output_dir=str(work),
            num_train_epochs=options.epochs,
            max_steps=options.max_steps or -1,
            per_device_train_batch_size=options.batch_size,
            gradient_accumulation_steps=options.grad_accum,
            learning_rate=options.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            optim="paged_adamw_8bit",
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": False},
            bf16=base.compute_dtype == "bfloat16",
            use_cpu=not cuda,
            seed=options.seed,
            data_seed=options.seed,
            logging_steps=1,
            save_strategy="steps" if options.save_steps else "no",
            save_steps=options.save_steps or 500,
            save_total_limit=KEPT_CHECKPOINTS,
            report_to=["tensorboard"],
            dataloader_pin_memory=cuda,
        )
        MemoryLoggingTrainer, own_callbacks, ProgressBarOnly = _trainer_classes()
        trainer = MemoryLoggingTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(data.rows),
            data_collator=DataCollatorForSeq2Seq(base.tokenizer, padding=True, label_pad_token_id=-100),
            callbacks=[*own_callbacks, *registry.trainer_callbacks(expert)],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressBarOnly)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if run.resume_from:
            log.info("%s: resumed from step %d (%s)", expert.name, step_of(run.resume_from), run.resume_from)
        started = time.perf_counter()
        try:
            result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        except torch.OutOfMemoryError:
            raise OutOfMemory(
                f"out of GPU memory at step {trainer.state.global_step} (planned {plan.total_bytes / 1024**3:.2f} GiB of "
                f"{plan.device_free_bytes / 1024**3:.2f} GiB free; {memory_stats()}); see mtg-train --plan; lower --batch-size "
                f"(now {options.batch_size}, raise --grad-accum to keep the batch) or --seq-len (now {options.seq_len})"
            ) from None
        wall = time.perf_counter() - started
        if STOP.signum is not None:
            checkpoint = newest_checkpoint(work)
            raise TrainingInterrupted(
                STOP.signum,
                f"stopped by {signal.Signals(STOP.signum).name} at step {trainer.state.global_step}; checkpoint in "
                f"{checkpoint}; continue with: {' '.join(map(shlex.quote, ['mtg-train', *sys.argv[1:], *(['--resume'] if '--resume' not in sys.argv else [])]))}",
            )
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if not main_process:
            finished = True
            return {}
        final = work / "adapter"
        # Dropout only acts while training (training_meta.json keeps the value used). Saved as 0 because
        # peft maps per-expert LoRA onto transformers 5's fused experts with ParamWrapper, which refuses
        # dropout != 0: with it, the adapter would not load with plain peft on the stock Mixtral.
        model.peft_config["default"].lora_dropout = 0.0
        model.save_pretrained(final)
        shutil.move(work / "runs", final / "runs")
        meta = {
            "expert": expert.name,
            "plugin": {"name": expert.plugin, "distribution": expert.distribution, "version": expert.version},
            "base_model": {"name": base.choice.name, "location": base.choice.location},
            "hyperparameters": {**attrs.asdict(options), **attrs.asdict(run.lora), "target_modules": list(run.lora.target_modules)},
            "data": {
                "path": str(run.data_path),
                "sha256": run.data_sha256,
                "examples": len(data.rows),
                "truncated": data.truncated,
                "untrained": data.untrained,
                "answer_tokens": data.trained_tokens,
            },
            "resumed_from_step": step_of(run.resume_from) if run.resume_from else None,
            "steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "train_loss": result.training_loss,
            "wall_time_s": round(wall, 2),
            "peak_memory": {
                "rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 4),
                **({"cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 4)} if cuda else {}),
            },
            "memory_plan": plan.as_dict(),
            "quantization": attrs.asdict(base.quantization, filter=lambda a, v: a.name != "first_unquantized"),
            "device": base.device,
            "compute_dtype": base.compute_dtype,
            "versions": _versions(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (final / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace_dir(final, output_dir / expert.name)
        finished = True
        if cuda:
            log.info("%s: peak CUDA memory %.3f GiB, planned %.3f GiB", expert.name,
                     meta["peak_memory"]["cuda_peak_gib"], (plan.total_bytes - plan.overhead_bytes) / 1024**3)
        log.info("%s: adapter saved to %s (loss %.4f -> %.4f in %.1fs)", expert.name, output_dir / expert.name,
                 meta["first_loss"], meta["final_loss"], wall)
        return meta
    finally:
        # A run that checkpointed keeps its work folder for --resume; anything else leaves no trace.
        if main_process and (finished or newest_checkpoint(work) is None):
            shutil.rmtree(work, ignore_errors=True)
        base.model = model.unload()  # the next expert of --all starts from the same, untouched base


def _replace_dir(new: Path, final: Path) -> None:
    """Swap `new` in for `final`; the old adapter stays whole until the new one is complete on disk."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old)
