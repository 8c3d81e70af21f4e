"""Files checked whole before they are used: a checkpoint --resume reads, an adapter's safetensors and JSON."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def safetensors_problem(path: Path) -> str | None:
    """None when the header parses and the file is as long as the header says (a truncated copy is not)."""
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                return "is truncated"
            header = json.loads(handle.read(header_len))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except FileNotFoundError:
        return "is missing"
    except (OSError, struct.error, ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError):
        return "is not a safetensors file"
    if 8 + header_len + max(ends, default=0) > size:
        return "is truncated"
    return None


def torch_file_problem(path: Path) -> str | None:
    """torch.save files are zip archives: checking every member's CRC finds truncation and corruption unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        return "is missing"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return "is truncated or not a torch file"
    return f"is corrupt (member {bad})" if bad else None


def json_problem(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "is not valid JSON"
    return None if isinstance(value, dict) else "is not a JSON object"


def checkpoint_problem(checkpoint: Path) -> str | None:
    """None when every file --resume needs is present, whole and holds what the Trainer reads; else what is wrong."""
    for name in CHECKPOINT_FILES:
        path = checkpoint / name
        check = safetensors_problem if name.endswith(".safetensors") else torch_file_problem if name.endswith(".pt") else json_problem
        problem = check(path) or _content_problem(path, checkpoint)
        if problem:
            return f"{name} {problem}"
    rng = sorted(checkpoint.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    for path in rng:
        problem = torch_file_problem(path)
        if problem:
            return f"{path.name} {problem}"
    return None


# A file of the right format with other content fails only after the base has loaded, so the two the Trainer reads
# first are looked into here; optimizer.pt mmap'ed and unpickled with weights_only (no code runs).


def _content_problem(path: Path, checkpoint: Path) -> str | None:
    if path.name == "trainer_state.json":
        state = json.loads(path.read_text(encoding="utf-8"))
        step = checkpoint.name.removeprefix("checkpoint-")
        if not isinstance(state.get("log_history"), list) or str(state.get("global_step")) != step:
            return f"is not the Trainer's state of step {step} (global_step, log_history)"
        return None
    if path.name != "optimizer.pt":
        return None
    import torch

    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - torch reports a foreign zip or pickle in several exception types
        return "is not a torch optimizer state"
    if not isinstance(value, dict) or "state" not in value or "param_groups" not in value:
        return "does not hold an optimizer state (state, param_groups)"
    return None
