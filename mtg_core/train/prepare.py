"""One expert's part of a training run, checked before any weights load: its LoRA settings, data and output folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import attrs

from mtg_core.data import TokenizedData, check_trainable, describe_lines, load_examples, tokenize
from mtg_core.errors import ConfigError
from mtg_core.experts import FormattedExample, LoraSettings
from mtg_core.outputs import open_shared, require_writable_folder
from mtg_core.plugins import Expert, Registry
from mtg_core.run import TrainOptions

log = logging.getLogger("mtg_core")


@attrs.frozen
class ExpertJob:
    """Everything about one expert's run that can be checked before the base model loads."""

    expert: Expert
    lora: LoraSettings
    data_path: Path
    data_sha256: str
    examples: list[FormattedExample]
    lines: list[int]  # the data file's line of each example, for messages
    resume_from: Path | None = None
    data: TokenizedData | None = None


def prepare(registry: Registry, expert: Expert, options: TrainOptions, data: Path | None) -> ExpertJob:
    lora = registry.lora_settings(expert)
    data_path = Path(data) if data else registry.data_files(expert).train
    examples, lines, sha256 = load_examples(data_path, lambda record: registry.format_example(expert, record), options.max_samples)
    return ExpertJob(expert, lora, data_path, sha256, examples, lines)


def tokenize_run(job: ExpertJob, tokenizer, seq_len: int) -> ExpertJob:
    """Tokenise with the base's tokenizer and refuse data that would leave nothing to learn."""
    data = tokenize(job.examples, tokenizer, seq_len)
    log.info(
        "%s: %d examples from %s; %d truncated to %d tokens, %d with no answer tokens%s, %d answer tokens to learn",
        job.expert.name, len(data.rows), job.data_path, data.truncated, seq_len, data.untrained,
        f" ({describe_lines([job.lines[i] for i in data.untrained_rows])})" if data.untrained else "", data.trained_tokens,
    )
    check_trainable(data, seq_len, str(job.data_path), job.lines)
    return attrs.evolve(job, data=data)


def check_output_dir(output_dir: Path) -> None:
    """Fail before loading weights when the adapters folder or its log cannot be written."""
    require_writable_folder(output_dir, "--output-dir", ConfigError)
    log_file = output_dir / "training_log.txt"
    try:
        if log_file.exists() or log_file.is_symlink():  # a new one is created once the run starts
            os.close(open_shared(log_file, os.O_WRONLY | os.O_APPEND))
    except OSError as exc:
        raise ConfigError(f"{log_file}: cannot append the training log to it ({exc.strerror}); move it away or choose another --output-dir") from None
