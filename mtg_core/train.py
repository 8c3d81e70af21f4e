"""The generic trainer: any registered expert, the seed's memory-optimised QLoRA recipe, on transformers' Trainer.

Reads top to bottom: prepare (data and settings, before any weights load), train (peft LoRA on the
loaded base), save (adapter, metadata, TensorBoard) into a work folder that replaces the old adapter
only when everything succeeded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shlex
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import attrs

from mtg_core.data import TokenizedData, check_trainable, describe_lines, load_examples, tokenize
from mtg_core.distributed import local_world_size, rank, world_size
from mtg_core.errors import ConfigError, OutOfMemory, TrainingInterrupted
from mtg_core.experts import FormattedExample, LoraSettings
from mtg_core.optim import one_sync_per_step
from mtg_core.outputs import (
    META, OutputError, apply_umask, checkpoint_problem, ensure_own_dir, install, is_ours, is_write_failure, json_problem, marker,
    open_shared, record_files, replace_file, require_writable_folder, work_dir, write_failure_reason, write_new,
)
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
    offload_experts: str = "auto"  # stream NF4 experts from host memory: auto (as needed), none, all
    gpu_memory: float | None = None  # GiB to plan for; None: the device's free memory
    host_memory: float | None = None  # GiB of host RAM to plan for; None: what is available


KEPT_CHECKPOINTS = 3


@attrs.frozen
class PreparedRun:
    """Everything about one expert's run that can be checked before the base model loads."""

    expert: Expert
    lora: LoraSettings
    data_path: Path
    data_sha256: str
    examples: list[FormattedExample]
    lines: list[int]  # the data file's line of each example, for messages
    resume_from: Path | None = None
    data: TokenizedData | None = None


def prepare(registry: Registry, expert: Expert, options: TrainOptions, data: Path | None) -> PreparedRun:
    lora = registry.lora_settings(expert)
    data_path = Path(data) if data else registry.data_files(expert).train
    examples, lines, sha256 = load_examples(data_path, lambda record: registry.format_example(expert, record), options.max_samples)
    return PreparedRun(expert, lora, data_path, sha256, examples, lines)


def tokenize_run(run: PreparedRun, tokenizer, seq_len: int) -> PreparedRun:
    """Tokenise with the base's tokenizer and refuse data that would leave nothing to learn."""
    data = tokenize(run.examples, tokenizer, seq_len)
    log.info(
        "%s: %d examples from %s; %d truncated to %d tokens, %d with no answer tokens%s, %d answer tokens to learn",
        run.expert.name, len(data.rows), run.data_path, data.truncated, seq_len, data.untrained,
        f" ({describe_lines([run.lines[i] for i in data.untrained_rows])})" if data.untrained else "", data.trained_tokens,
    )
    check_trainable(data, seq_len, str(run.data_path), run.lines)
    return attrs.evolve(run, data=data)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def checkpoints(work: Path) -> list[Path]:
    """The work folder's checkpoints, newest first (whole or not: see resumable_checkpoint)."""
    found = [p for p in work.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()] if work.is_dir() else []
    return sorted(found, key=step_of, reverse=True)


def resumable_checkpoint(work: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose every file --resume needs is present and whole, and why newer ones were passed over."""
    passed_over = []
    for checkpoint in checkpoints(work):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, passed_over
        passed_over.append(f"{checkpoint.name}: {problem}")
    return None, passed_over


def run_identity(run: PreparedRun, options: TrainOptions, base_identity: str) -> dict:
    """What a checkpoint means: resuming with any of these changed would train something else."""
    return {
        "expert": run.expert.name,
        "base_model": base_identity,
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


def plan_resume(run: PreparedRun, options: TrainOptions, output_dir: Path, base_identity: str, resume: bool, force: bool) -> PreparedRun:
    """Decide, before any weights load, whether this run continues a checkpoint or starts afresh."""
    work = work_dir(output_dir, run.expert.name)
    name = run.expert.name
    if not resume:
        existing = [c for c in checkpoints(work) if (c / "trainer_state.json").is_file()]
        if existing and not force:
            raise ConfigError(
                f"{work} holds an interrupted run of {name} (step {step_of(existing[0])}); "
                "continue it with --resume, or pass --force to discard it"
            )
        if rank() == 0 and marker(work) is not None:  # every rank decides alike; only rank 0 touches the disk
            shutil.rmtree(work, ignore_errors=True)  # only a work folder mtg-train made (check_work_dir refused others)
        return run
    checkpoint, passed_over = resumable_checkpoint(work)
    if checkpoint is None:
        why = f" ({'; '.join(passed_over)})" if passed_over else ""
        raise ConfigError(
            f"nothing to resume for {name}: no complete checkpoint in {work}{why}; "
            "checkpoints are written every --save-steps N steps and when a run is interrupted; pass --force without --resume to start over"
        )
    for note in passed_over:
        log.warning("%s: not resuming from %s; using %s", name, note, checkpoint.name)
    identity = work / "run.json"
    problem = json_problem(identity)
    if problem and not force:
        raise ConfigError(f"cannot resume {name}: {identity} {problem}, so the run's settings are unknown; pass --force to resume anyway")
    saved = {} if problem else json.loads(identity.read_text(encoding="utf-8"))
    changed = {k: (saved.get(k), v) for k, v in run_identity(run, options, base_identity).items() if saved.get(k) != v}
    if changed and not force:
        what = "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"cannot resume {name} from {checkpoint}: {what}; pass --force to resume anyway")
    return attrs.evolve(run, resume_from=checkpoint)


class StopRequest:
    """What a stop signal (SIGINT, SIGTERM, SIGHUP) should do now, and the signal once one arrived.

    phase "setup": stop at once, nothing to keep; "training": finish the step, checkpoint, stop;
    "saving": finish writing the adapter, then stop.
    """

    signum: int | None = None
    phase: str = "setup"


STOP = StopRequest()


def memory_plan(choice, lora: LoraSettings, options: TrainOptions, *, rent: bool = False, inference: bool = False):
    """The run's memory plan on this machine (or the --gpu-memory / --host-memory budgets), and settings that
    would fit when it does not. rent: on a machine without a GPU, --gpu-memory stands for a CUDA GPU about to be
    rented (bf16, CUDA context) and --host-memory for that machine's RAM (mtg-train --plan)."""
    import psutil

    from mtg_core.base_models import base_config, device_and_dtype, free_memory
    from mtg_core.moe.shared_host import node_host_budget
    from mtg_core.plan import GIB, meta_model, plan_memory, settings_that_fit
    from mtg_core.plugins.targets import check_targets

    config = base_config(choice)
    check_targets(lora.target_modules, meta_model(config), choice.name)  # peft would skip a wrong one silently
    device, dtype = device_and_dtype()
    compute_bytes = dtype.itemsize
    host = psutil.virtual_memory().available
    if rent and device == "cpu" and options.gpu_memory is not None:
        device, compute_bytes, budget = "cuda", 2, int(options.gpu_memory * GIB)  # the GPUs mtg-train targets run bf16
        if options.host_memory is not None:
            host = int(options.host_memory * GIB)
    else:
        budget = free_memory(device)
        if options.gpu_memory is not None:
            budget = min(budget, int(options.gpu_memory * GIB))
        if options.host_memory is not None:
            host = min(host, int(options.host_memory * GIB))
        host = node_host_budget(host)  # one copy of the streamed experts per node, in its shared-memory folder

    def plan_for(batch_size: int, seq_len: int, offload: str = options.offload_experts):
        return plan_memory(config, lora.target_modules, lora.rank, options.quant, batch_size, seq_len, compute_bytes,
                           device, budget, offload=offload, grad_accum=options.grad_accum, host_free_bytes=host,
                           training=not inference)

    plan = plan_for(options.batch_size, options.seq_len)
    if plan.fits:
        return plan, None
    if options.offload_experts == "none" and options.quant == "nf4":  # what streaming experts would make fit
        streamed = plan_for(options.batch_size, options.seq_len, "auto")
        if streamed.fits:
            return plan, (f"--offload-experts auto (streams the experts of {streamed.offloaded_layers} of "
                          f"{config.num_hidden_layers} layers from host memory)")
        smaller = settings_that_fit(lambda batch, seq: plan_for(batch, seq, "auto"), options.batch_size, options.grad_accum, options.seq_len)
        return plan, f"--offload-experts auto {smaller}" if smaller else None
    return plan, settings_that_fit(plan_for, options.batch_size, options.grad_accum, options.seq_len)


def check_output_dir(output_dir: Path) -> None:
    """Fail before loading weights when the adapters folder or its log cannot be written."""
    require_writable_folder(output_dir, "--output-dir", ConfigError)
    log_file = output_dir / "training_log.txt"
    try:
        if log_file.exists() or log_file.is_symlink():  # a new one is created once the run starts
            os.close(open_shared(log_file, os.O_WRONLY | os.O_APPEND))
    except OSError as exc:
        raise ConfigError(f"{log_file}: cannot append the training log to it ({exc.strerror}); move it away or choose another --output-dir") from None


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
        device_peak = None  # mtg_core.device_memory.DevicePeak on CUDA: sampled at each logging step

        # Trainer.log is the one place every reporter (TensorBoard included) reads from: memory joins the logs here.
        def log(self, logs, start_time=None):
            if "loss" in logs:
                logs.update(memory_stats())
                if self.device_peak is not None:
                    logs["memory/cuda_device_used_gib"] = round(self.device_peak.sample() / 1024**3, 4)
            super().log(logs, start_time)

        def create_scheduler(self, num_training_steps, optimizer=None):
            # transformers' warmup gives the first step learning rate 0, so a --max-steps 1 run installed the untrained
            # adapter: the same linear warmup and cosine decay, taken one step on, so that every step learns.
            if self.lr_scheduler is None:
                from torch.optim.lr_scheduler import LambdaLR

                warmup = self.args.get_warmup_steps(num_training_steps)

                def factor(step: int) -> float:
                    step += 1
                    if step < warmup:
                        return step / warmup
                    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, num_training_steps + 1 - warmup)))

                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
                self._created_lr_scheduler = True
            return self.lr_scheduler

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


def train_expert(base, registry: Registry, run: PreparedRun, plan, options: TrainOptions, output_dir: Path) -> dict:
    """Train one expert's LoRA on `base.model`, write DIR/<expert>/ atomically, and leave the base LoRA-free.

    `plan` is the memory plan made before the base loaded (the one that chose the streamed layers).
    The recipe: set up (LoRA, work folder, Trainer), train, save the adapter and its record, install it."""
    expert = run.expert
    model = _add_lora(base, run, options)
    log.info("%s: memory plan %.3f GiB (weights %.3f, activations %.3f) of %.3f GiB free on %s",
             expert.name, plan.total_bytes / 1024**3, plan.weights_bytes / 1024**3, plan.activation_bytes / 1024**3,
             plan.device_free_bytes / 1024**3, plan.device)
    work = work_dir(output_dir, expert.name)
    main_process = rank() == 0  # under torchrun only rank 0 writes checkpoints, logs and the adapter
    final = output_dir / expert.name
    finished = kept = False
    try:
        _start_work_folder(model, base, run, options, work, main_process)
        trainer, progress = _make_trainer(model, base, registry, run, options, work)
        result, wall, copies = _train(trainer, progress, base, run, plan, options, work)
        if not main_process:
            finished = True
            return {}
        meta = _record(trainer, result, wall, copies, base, registry, run, plan, options)
        new = _save_adapter(model, base, meta, work)
        if final.exists() or final.is_symlink():
            reason = is_ours(final, expert.name)  # checked before training too; the user may have added files since
            if reason:
                kept = True
                raise OutputError(f"{final} {reason}, so it was not replaced; the new adapter is complete in {new}: move it where you want it")
        try:
            install(new, final)
        except OSError as exc:
            raise OutputError(f"{final}: cannot be replaced ({exc.strerror}); it is unchanged and the new adapter was discarded") from None
        finished = True
        _log_installed(meta, base, plan, final, wall)
        return meta
    finally:
        # A run that checkpointed keeps its work folder for --resume; anything else leaves no trace.
        checkpointed = any((c / "trainer_state.json").is_file() for c in checkpoints(work))
        if main_process and not kept and marker(work) is not None and (finished or not checkpointed):
            shutil.rmtree(work, ignore_errors=True)
        base.model = model.unload()  # the next expert of --all starts from the same, untouched base


def _add_lora(base, run: PreparedRun, options: TrainOptions):
    """`base.model` wrapped by peft with the expert's LoRA (the base itself is restored by `unload`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mtg_core.moe.dropout import use_lora_dropout

    lora_config = LoraConfig(
        r=run.lora.rank,
        lora_alpha=run.lora.alpha,
        lora_dropout=run.lora.dropout,
        target_modules=list(run.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(options.seed)  # LoRA A matrices are drawn here
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias: expected, not the user's to fix.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(base.model, lora_config)
    use_lora_dropout(model)  # torch's CPU dropout cost a quarter of each forward + backward (docs/performance.md)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: LoRA rank %d alpha %g dropout %g on %s: %d trainable of %d parameters",
             run.expert.name, run.lora.rank, run.lora.alpha, run.lora.dropout, ",".join(run.lora.target_modules), trainable, total)
    return model


def _start_work_folder(model, base, run: PreparedRun, options: TrainOptions, work: Path, main_process: bool) -> None:
    """Check a checkpoint to resume against the model, then make the work folder and its run.json (rank 0 only)."""
    if run.resume_from:
        _check_checkpoint_shapes(model, run.resume_from)
    if main_process:  # other ranks write nothing (the Trainer saves on rank 0)
        with _write_errors(f"{work}", "the previous adapter is unchanged"):
            ensure_own_dir(work, f"the work folder of an mtg-train run of {run.expert.name}")
            replace_file(work / "run.json", json.dumps(run_identity(run, options, base.choice.identity), indent=2))


def _make_trainer(model, base, registry: Registry, run: PreparedRun, options: TrainOptions, work: Path):
    """The Trainer of this run and its progress bar: the seed's QLoRA settings, checkpoints into `work`."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, ProgressCallback, TrainingArguments

    expert, cuda = run.expert, base.device == "cuda"
    log.info("%s: global batch %d = %d per device x %d accumulation x %d processes", expert.name,
             options.batch_size * options.grad_accum * world_size(), options.batch_size, options.grad_accum, world_size())
    args = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        # Paged 8-bit AdamW (QLoRA's) on CUDA; on the CPU bitsandbytes has no paging and says so on every run.
        optim="paged_adamw_8bit" if cuda else "adamw_bnb_8bit",
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
    optimizer_cls, optimizer_kwargs = MemoryLoggingTrainer.get_optimizer_cls_and_kwargs(args)
    trainer = MemoryLoggingTrainer(
        model=model,
        args=args,
        optimizer_cls_and_kwargs=(one_sync_per_step(optimizer_cls), optimizer_kwargs),  # one host sync per step (mtg_core.optim)
        train_dataset=Dataset.from_list(run.data.rows),
        data_collator=DataCollatorForSeq2Seq(base.tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[*own_callbacks, *registry.trainer_callbacks(expert)],
    )
    trainer.remove_callback(ProgressCallback)
    progress = ProgressBarOnly()
    trainer.add_callback(progress)
    if cuda:
        from mtg_core.device_memory import DevicePeak

        torch.cuda.reset_peak_memory_stats()
        trainer.device_peak = DevicePeak(base.model.device)  # paged optimizer state is outside torch's allocator
    return trainer, progress


def _train(trainer, progress, base, run: PreparedRun, plan, options: TrainOptions, work: Path):
    """Run the Trainer: its result, the wall time and the streamed layers' copies (None without streaming); a stop
    signal ends here with a checkpoint to continue from."""
    import torch

    expert = run.expert
    if run.resume_from:
        log.info("%s: resumed from step %d (%s)", expert.name, step_of(run.resume_from), run.resume_from)
    streamer = getattr(base.model, "expert_streamer", None)
    copies_before = streamer.copies if streamer else 0
    started = time.perf_counter()
    STOP.phase = "training"
    try:
        with _write_errors(f"a checkpoint in {work}", "the previous adapter is unchanged"):
            result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except torch.OutOfMemoryError:
        raise OutOfMemory(
            f"out of GPU memory at step {trainer.state.global_step} (planned {plan.total_bytes / 1024**3:.2f} GiB of "
            f"{plan.device_free_bytes / 1024**3:.2f} GiB free; {memory_stats()}); see mtg-train --plan; lower --batch-size "
            f"(now {options.batch_size}, raise --grad-accum to keep the batch) or --seq-len (now {options.seq_len})"
        ) from None
    finally:
        STOP.phase = "saving"
        if getattr(progress, "training_bar", None) is not None:
            progress.training_bar.close()  # before any error line, not after it
            progress.training_bar = None
    wall = time.perf_counter() - started
    if STOP.signum is not None:
        checkpoint, _ = resumable_checkpoint(work)
        raise TrainingInterrupted(
            STOP.signum,
            f"stopped by {signal.Signals(STOP.signum).name} at step {trainer.state.global_step}; checkpoint in "
            f"{checkpoint}; continue with: {continue_command()}",
        )
    return result, wall, streamer.copies - copies_before if streamer else None


def _record(trainer, result, wall: float, copies: int | None, base, registry: Registry, run: PreparedRun, plan,
            options: TrainOptions) -> dict:
    """training_meta.json: what was trained, on what, from which data, how it went and with which versions."""
    import torch

    expert, data, cuda = run.expert, run.data, base.device == "cuda"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    streamer = getattr(base.model, "expert_streamer", None)
    return {
        "expert": expert.name,
        "plugin": {"name": expert.plugin, "distribution": expert.distribution, "version": expert.version},
        "base_model": {"name": base.choice.name, "id": base.choice.identity, "location": base.choice.location,
                       **({"fingerprint": base.choice.fingerprint} if base.choice.fingerprint else {})},
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
            **({"cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 4),
                "cuda_peak_with_outside_allocator_gib": round(trainer.device_peak.peak() / 1024**3, 4)} if cuda else {}),
        },
        "memory_plan": plan.as_dict(),
        "skipped_plugins": registry.skipped_for(expert.name),
        "cross_cutting_plugins": registry.cross_cutting(expert),
        "plugin_callbacks": registry.callback_seconds(expert.name),
        "streaming": {
            "layers": [layer.index for layer in streamer.layers],
            "copies": copies,
            "copied_bytes": copies * streamer.layers[0].host.numel() // streamer.per_layer,  # by groups: copies come in pairs
        } if streamer else None,
        "quantization": attrs.asdict(base.quantization, filter=lambda a, v: a.name != "first_unquantized"),
        "device": base.device,
        "compute_dtype": base.compute_dtype,
        "versions": _versions(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _save_adapter(model, base, meta: dict, work: Path) -> Path:
    """The finished adapter in `work`/adapter/, with its TensorBoard runs and training_meta.json (written last: complete)."""
    new = work / "adapter"
    # Dropout only acts while training (training_meta.json keeps the value used). Saved as 0 because
    # peft maps per-expert LoRA onto transformers 5's fused experts with ParamWrapper, which refuses
    # dropout != 0: with it, the adapter would not load with plain peft on the stock Mixtral.
    model.peft_config["default"].lora_dropout = 0.0
    # The base by name (preset or hub id), not by this machine's cache path: the adapter stays valid elsewhere.
    model.peft_config["default"].base_model_name_or_path = base.choice.identity
    with _write_errors(f"the new adapter in {new}", "the previous adapter is unchanged"):
        shutil.rmtree(new, ignore_errors=True)
        model.save_pretrained(new, save_embedding_layers=False)  # no hub lookup: embeddings are never trained here
        shutil.move(work / "runs", new / "runs")
        apply_umask(new)
        meta["files"] = record_files(new)  # what is ours in the folder: anything else, or an edited file, is the user's
        write_new(new / META, json.dumps(meta, indent=2) + "\n")  # written last: complete
    return new


def _log_installed(meta: dict, base, plan, final: Path, wall: float) -> None:
    name = meta["expert"]
    if base.device == "cuda":
        log.info("%s: peak CUDA memory %.3f GiB allocated, planned %.3f GiB; %.3f GiB with what torch's allocator does "
                 "not see (paged optimizer state, CUDA context), planned %.3f GiB", name, meta["peak_memory"]["cuda_peak_gib"],
                 (plan.total_bytes - plan.overhead_bytes) / 1024**3, meta["peak_memory"]["cuda_peak_with_outside_allocator_gib"],
                 plan.total_bytes / 1024**3)
    log.info("%s: adapter saved to %s (loss %.4f -> %.4f in %.1fs)", name, final, meta["first_loss"], meta["final_loss"], wall)


def continue_command() -> str:
    """This command with --resume, and without --force: beside --resume it would skip resume's checks."""
    args = [arg for arg in sys.argv[1:] if arg != "--force"]
    return shlex.join(["mtg-train", *args, *([] if "--resume" in args else ["--resume"])])


@contextmanager
def _write_errors(what: str, consequence: str):
    """Disk full, a file-size limit or a permission error while writing becomes one line naming what and where."""
    try:
        yield
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        raise OutputError(f"cannot write {what}: {write_failure_reason(exc)}; free space or fix permissions there ({consequence})") from None


def _check_checkpoint_shapes(model, checkpoint: Path) -> None:
    """Refuse, before training starts, a checkpoint whose LoRA shapes do not fit this model (another base or rank)."""
    from safetensors import safe_open

    params = {name.replace(".default.", "."): p for name, p in model.named_parameters() if "lora_" in name}
    with safe_open(checkpoint / "adapter_model.safetensors", framework="pt") as saved:
        for key in saved.keys():
            shape = tuple(saved.get_slice(key).get_shape())
            param = params.get(key)
            if param is None or tuple(param.shape) != shape:
                have = "absent" if param is None else f"{tuple(param.shape)}"
                raise ConfigError(
                    f"cannot resume from {checkpoint}: its {key} has shape {shape}, this model's is {have} "
                    "(trained on another base or rank); start over with --force and without --resume"
                )
