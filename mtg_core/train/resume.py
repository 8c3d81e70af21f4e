"""--resume: which checkpoint a run continues, and whether it may (same expert, base, data and settings; whole files)."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

import attrs

from mtg_core.distributed import rank
from mtg_core.errors import ConfigError
from mtg_core.outputs import checkpoint_problem, json_problem, marker, work_dir
from mtg_core.run import TrainOptions
from mtg_core.train.prepare import ExpertJob

log = logging.getLogger("mtg_core")


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


def run_identity(job: ExpertJob, options: TrainOptions, base_identity: str) -> dict:
    """What a checkpoint means: resuming with any of these changed would train something else."""
    return {
        "expert": job.expert.name,
        "base_model": base_identity,
        "rank": job.lora.rank,
        "alpha": job.lora.alpha,
        "dropout": job.lora.dropout,
        "target_modules": list(job.lora.target_modules),
        "data_sha256": job.data_sha256,
        "max_samples": options.max_samples,
        "seq_len": options.seq_len,
        "batch_size": options.batch_size,
        "grad_accum": options.grad_accum,
        "quant": options.quant,
    }


def plan_resume(job: ExpertJob, options: TrainOptions, output_dir: Path, base_identity: str, resume: bool, force: bool) -> ExpertJob:
    """Decide, before any weights load, whether this run continues a checkpoint or starts afresh."""
    work = work_dir(output_dir, job.expert.name)
    name = job.expert.name
    if not resume:
        existing = [c for c in checkpoints(work) if (c / "trainer_state.json").is_file()]
        if existing and not force:
            raise ConfigError(
                f"{work} holds an interrupted run of {name} (step {step_of(existing[0])}); "
                "continue it with --resume, or pass --force to discard it"
            )
        if rank() == 0 and marker(work) is not None:  # every rank decides alike; only rank 0 touches the disk
            shutil.rmtree(work, ignore_errors=True)  # only a work folder mtg-train made (check_work_dir refused others)
        return job
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
    changed = {k: (saved.get(k), v) for k, v in run_identity(job, options, base_identity).items() if saved.get(k) != v}
    if changed and not force:
        what = "; ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"cannot resume {name} from {checkpoint}: {what}; pass --force to resume anyway")
    return attrs.evolve(job, resume_from=checkpoint)


def continue_command() -> str:
    """This command with --resume, and without --force: beside --resume it would skip resume's checks."""
    args = [arg for arg in sys.argv[1:] if arg != "--force"]
    return shlex.join(["mtg-train", *args, *([] if "--resume" in args else ["--resume"])])


def check_checkpoint_shapes(model, checkpoint: Path) -> None:
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

