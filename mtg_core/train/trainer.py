"""transformers' Trainer as the seed's QLoRA recipe sets it up, and what we add to it: memory in the logs, one log
line per step, a learning rate that is never 0, a stop signal that ends with a checkpoint on every rank."""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

from mtg_core.distributed import world_size
from mtg_core.errors import OutOfMemory, TrainingInterrupted
from mtg_core.optim import one_sync_per_step
from mtg_core.outputs import write_errors
from mtg_core.plugins import Registry
from mtg_core.run import TrainOptions
from mtg_core.train.prepare import ExpertJob
from mtg_core.train.resume import continue_command, resumable_checkpoint, step_of

log = logging.getLogger("mtg_core")


KEPT_CHECKPOINTS = 3


class StopRequest:
    """What a stop signal (SIGINT, SIGTERM, SIGHUP) should do now, and the signal once one arrived.

    phase "setup": stop at once, nothing to keep; "training": finish the step, checkpoint, stop;
    "saving": finish writing the adapter, then stop.
    """

    signum: int | None = None
    phase: str = "setup"


STOP = StopRequest()


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


def make_trainer(model, base, registry: Registry, job: ExpertJob, options: TrainOptions, work: Path):
    """The Trainer of this run and its progress bar: the seed's QLoRA settings, checkpoints into `work`."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, ProgressCallback, TrainingArguments

    expert, cuda = job.expert, base.device == "cuda"
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
        # Paged 8-bit AdamW (QLoRA's) on CUDA; on the CPU bitsandbytes has no paging and says so on every job.
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
        train_dataset=Dataset.from_list(job.data.rows),
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


def run_trainer(trainer, progress, base, job: ExpertJob, plan, options: TrainOptions, work: Path):
    """Run the Trainer: its result, the wall time and the streamed experts' (copies, bytes) (None without streaming); a stop
    signal ends here with a checkpoint to continue from."""
    import torch

    expert = job.expert
    if job.resume_from:
        log.info("%s: resumed from step %d (%s)", expert.name, step_of(job.resume_from), job.resume_from)
    streamer = getattr(base.model, "expert_streamer", None)
    before = (streamer.copies, streamer.copied_bytes) if streamer else None
    started = time.perf_counter()
    STOP.phase = "training"
    try:
        with write_errors(f"a checkpoint in {work}", "the previous adapter is unchanged"):
            result = trainer.train(resume_from_checkpoint=str(job.resume_from) if job.resume_from else None)
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
    return result, wall, (streamer.copies - before[0], streamer.copied_bytes - before[1]) if streamer else None
