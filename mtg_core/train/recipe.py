"""The training recipe: check everything, load the base once, then for each expert set up, train, save and install.

`train_experts` is mtg-train's run from the command line's values to installed adapters; `train_expert` is one
expert's part of it, step by step (each step a function below it). The files beside this one hold the steps'
parts: `prepare.py` (data and settings, before any weights load), `resume.py` (--resume), `trainer.py`
(transformers' Trainer, set up as the seed's QLoRA recipe).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import attrs

from mtg_core.distributed import rank
from mtg_core.errors import ConfigError, TrainingInterrupted
from mtg_core.outputs import (META, OutputError, apply_umask, ensure_own_dir, install, is_ours, marker, open_shared, record_files,
                              replace_file, work_dir, write_errors, write_new)
from mtg_core.plugins import Registry
from mtg_core.run import Run, TrainOptions, base_for, select_experts
from mtg_core.train.prepare import ExpertJob, check_output_dir, prepare, tokenize_run
from mtg_core.train.resume import check_checkpoint_shapes, checkpoints, plan_resume, run_identity, step_of
from mtg_core.train.trainer import STOP, make_trainer, run_trainer

log = logging.getLogger("mtg_core")


def train_experts(registry: Registry, name, all_experts, base_model, data, output_dir: str, hyper: dict, resume=False, force=False,
                  eval_after=False) -> None:
    """mtg-train: every selected expert's data checked, its output folder locked, then `train_locked`."""
    from mtg_core.outputs import lock_all, require_output_dir

    experts = select_experts(registry, name, all_experts)
    if all_experts and data:
        raise ConfigError("--data applies to one expert: use it with --expert, not --all")
    output_dir = require_output_dir(output_dir)
    options = TrainOptions.given(hyper)
    jobs = [prepare(registry, expert, options, data) for expert in experts]  # all data checked before weights load
    check_output_dir(output_dir)
    locks = lock_all(output_dir, [expert.name for expert in experts]) if rank() == 0 else []  # rank 0 writes
    try:
        train_locked(registry, experts, jobs, base_model, output_dir, options, hyper, resume, force, eval_after)
    finally:
        for lock in locks:
            lock.release()


def train_locked(registry: Registry, experts, jobs: list[ExpertJob], base_model, output_dir: Path, options: TrainOptions, hyper: dict,
                 resume, force, eval_after) -> None:
    """The run, made once (base, resume points, tokenised data, memory plans), then each expert trained on the one loaded base."""
    from mtg_core.base_models import TINY, TINY_LR, load_tokenizer
    from mtg_core.outputs import check_replaceable, recover

    recovered = []
    if rank() == 0:
        for expert in experts:
            recover(output_dir, expert.name, recovered.append)
            check_replaceable(output_dir, expert.name)
    _setup_logging(output_dir)
    for line in recovered:
        log.warning(line)
    choice = base_for(None, experts, base_model)
    log.info("base model: %s (%s): %s", choice.name, choice.location, choice.reason)
    for failure in registry.failures:
        log.warning("plugin %s (%s) not loaded: %s", failure.plugin, failure.distribution, failure.reason)
    if hyper["lr"] is None and choice.name == TINY:
        options = attrs.evolve(options, lr=TINY_LR)
    jobs = [plan_resume(job, options, output_dir, choice.identity, resume, force) for job in jobs]
    tokenizer = load_tokenizer(choice)
    jobs = [tokenize_run(job, tokenizer, options.seq_len) for job in jobs]
    if eval_after:
        from mtg_core.evaluate import heldout_data

        for job in jobs:
            heldout_data(tokenizer, registry, job.expert, options.seq_len)
    run = Run.planned(registry, [job.expert for job in jobs], choice, options, tokenizer, loras=[job.lora for job in jobs])
    base = run.load_base(log.info)
    for done, (job, plan) in enumerate(zip(jobs, run.plans), 1):
        train_expert(base, run, job, plan, output_dir)
        STOP.phase = "setup"
        if STOP.signum is not None:  # arrived while the adapter was being saved
            left = f"; not trained: {', '.join(j.expert.name for j in jobs[done:])}" if done < len(jobs) else ""
            raise TrainingInterrupted(STOP.signum, f"stopped by {signal.Signals(STOP.signum).name} after {job.expert.name}'s adapter was saved{left}")
    if eval_after and rank() == 0:
        from mtg_core.evaluate import report_eval

        report_eval(run, output_dir, base, max_new_tokens=48, seq_len=options.seq_len, no_fail=False)


def _setup_logging(output_dir: Path) -> None:
    """training_log.txt and the console (rank 0); other ranks of torchrun only report problems, prefixed with their rank."""
    log.handlers.clear()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if rank() != 0:
        log.setLevel(logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank()}] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        return
    log.setLevel(logging.INFO)
    log_file = os.fdopen(open_shared(output_dir / "training_log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8")
    for handler in (logging.StreamHandler(sys.stderr), logging.StreamHandler(log_file)):
        handler.setFormatter(formatter)
        log.addHandler(handler)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "mtg-core")}


def train_expert(base, run: Run, job: ExpertJob, plan, output_dir: Path) -> dict:
    """Train one expert's LoRA on `base.model`, write DIR/<expert>/ atomically, and leave the base LoRA-free.

    `plan` is the memory plan made before the base loaded (the one that chose the streamed layers).
    The recipe: set up (LoRA, work folder, Trainer), train, save the adapter and its record, install it."""
    expert, options = job.expert, run.options
    model = _add_lora(base, job, options)
    log.info("%s: memory plan %.3f GiB (weights %.3f, activations %.3f) of %.3f GiB free on %s",
             expert.name, plan.total_bytes / 1024**3, plan.weights_bytes / 1024**3, plan.activation_bytes / 1024**3,
             plan.device_free_bytes / 1024**3, plan.device)
    work = work_dir(output_dir, expert.name)
    main_process = rank() == 0  # under torchrun only rank 0 writes checkpoints, logs and the adapter
    final = output_dir / expert.name
    finished = kept = False
    try:
        _start_work_folder(model, base, job, options, work, main_process)
        trainer, progress = make_trainer(model, base, run.registry, job, options, work)
        result, wall, copied = run_trainer(trainer, progress, base, job, plan, options, work)
        if not main_process:
            finished = True
            return {}
        meta = _record(trainer, result, wall, copied, base, run.registry, job, plan, options)
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


def _add_lora(base, job: ExpertJob, options: TrainOptions):
    """`base.model` wrapped by peft with the expert's LoRA (the base itself is restored by `unload`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mtg_core.moe.dropout import use_lora_dropout

    lora_config = LoraConfig(
        r=job.lora.rank,
        lora_alpha=job.lora.alpha,
        lora_dropout=job.lora.dropout,
        target_modules=list(job.lora.target_modules),
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
             job.expert.name, job.lora.rank, job.lora.alpha, job.lora.dropout, ",".join(job.lora.target_modules), trainable, total)
    return model


def _start_work_folder(model, base, job: ExpertJob, options: TrainOptions, work: Path, main_process: bool) -> None:
    """Check a checkpoint to resume against the model, then make the work folder and its run.json (rank 0 only)."""
    if job.resume_from:
        check_checkpoint_shapes(model, job.resume_from)
    if main_process:  # other ranks write nothing (the Trainer saves on rank 0)
        with write_errors(f"{work}", "the previous adapter is unchanged"):
            ensure_own_dir(work, f"the work folder of an mtg-train run of {job.expert.name}")
            replace_file(work / "run.json", json.dumps(run_identity(job, options, base.choice.identity), indent=2))


def _record(trainer, result, wall: float, copied: tuple[int, int] | None, base, registry: Registry, job: ExpertJob, plan,
            options: TrainOptions) -> dict:
    """training_meta.json: what was trained, on what, from which data, how it went and with which versions."""
    import torch

    expert, data, cuda = job.expert, job.data, base.device == "cuda"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    streamer = getattr(base.model, "expert_streamer", None)
    return {
        "expert": expert.name,
        "plugin": {"name": expert.plugin, "distribution": expert.distribution, "version": expert.version},
        "base_model": {"name": base.choice.name, "id": base.choice.identity, "location": base.choice.location,
                       **({"fingerprint": base.choice.fingerprint} if base.choice.fingerprint else {})},
        "hyperparameters": {**attrs.asdict(options), **attrs.asdict(job.lora), "target_modules": list(job.lora.target_modules)},
        "data": {
            "path": str(job.data_path),
            "sha256": job.data_sha256,
            "examples": len(data.rows),
            "truncated": data.truncated,
            "untrained": data.untrained,
            "answer_tokens": data.trained_tokens,
        },
        "resumed_from_step": step_of(job.resume_from) if job.resume_from else None,
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
            "copies": copied[0],
            "copied_bytes": copied[1],
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
    with write_errors(f"the new adapter in {new}", "the previous adapter is unchanged"):
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
