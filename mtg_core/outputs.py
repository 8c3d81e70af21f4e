"""The adapters folder: one writer per expert, replacing only what mtg-train wrote, surviving a kill at any point.

Layout under OUTPUT_DIR for expert E:
  E/                  the installed adapter (training_meta.json is written last, so its presence means complete)
  .E.partial/         the work folder of a run: checkpoints, run.json, and the finished adapter in adapter/
  .E.old-PID/         the previous adapter for the instant between the two renames that install a new one
  .E.lock             an OS file lock held by the run writing E (released by the kernel when the process dies)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from mtg_core.errors import ConfigError, MtgError

META = "training_meta.json"
# Everything mtg-train and mtg-eval write into an adapter folder; anything else belongs to the user.
OWN_ENTRIES = {"adapter_config.json", "adapter_model.safetensors", META, "eval.json", "README.md", "runs"}
CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


class OutputError(MtgError):
    """An output folder cannot be written, or holds something mtg-train must not replace."""


def work_dir(output_dir: Path, expert: str) -> Path:
    """Where a run trains and checkpoints; its adapter/ becomes OUTPUT_DIR/<expert>/ only when the run succeeds."""
    return output_dir / f".{expert}.partial"


class ExpertLock:
    """An exclusive `flock` on OUTPUT_DIR/.<expert>.lock, holding the owner's PID; the file is removed on release.

    flock rather than a PID file: the kernel drops it when the process dies, however it dies, so a
    crashed run never leaves a stale lock behind and a live one can never be mistaken for a dead one.
    """

    def __init__(self, output_dir: Path, expert: str) -> None:
        self.path = output_dir / f".{expert}.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder released and removed the file between our open and flock: try the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still held, so no one can lock the removed file and think it theirs
            except OSError:
                pass  # a folder that became read-only: the empty lock file stays, harmlessly
            os.close(self.fd)
            self.fd = None


def lock_for_training(output_dir: Path, expert: str) -> ExpertLock:
    lock = ExpertLock(output_dir, expert)
    try:
        acquired = lock.acquire()
    except OSError as exc:
        raise OutputError(f"{lock.path}: cannot create the run lock ({exc.strerror}); choose a writable --output-dir") from None
    if not acquired:
        raise OutputError(
            f"{output_dir / expert} is being written by another mtg-train (PID {lock.holder()}); "
            "wait for it to finish or give this run another --output-dir"
        )
    return lock


def is_complete_adapter(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / META).is_file() and (folder / "adapter_config.json").is_file()


def recover(output_dir: Path, expert: str, log: Callable[[str], None]) -> None:
    """Finish or undo an install that a kill interrupted; the caller holds the expert's lock (or no one does).

    The newest complete adapter wins: a finished adapter still in the work folder, else the previous one.
    """
    final = output_dir / expert
    work = work_dir(output_dir, expert)
    finished = work / "adapter"
    previous = sorted(output_dir.glob(f".{expert}.old-*"), key=lambda p: p.stat().st_mtime)
    if not final.exists() and not final.is_symlink():
        if is_complete_adapter(finished):
            finished.rename(final)
            log(f"restored {final}: the run that trained it was stopped while installing it")
        elif previous and is_complete_adapter(previous[-1]):
            previous.pop().rename(final)
            log(f"restored the previous adapter {final}: a run was stopped while replacing it")
    elif is_complete_adapter(finished) and is_ours(final, expert) is None:
        install(finished, final)
        log(f"installed {final}: the run that trained it was stopped before installing it")
    if is_complete_adapter(final):
        for stale in previous:
            shutil.rmtree(stale, ignore_errors=True)
        if work.is_dir() and not finished.exists() and not any(work.glob("checkpoint-*")):
            shutil.rmtree(work, ignore_errors=True)  # what is left of the run that installed it


def recover_unlocked(output_dir: Path, expert: str, log: Callable[[str], None]) -> None:
    """Recovery for read-only commands (eval, ask, export): only when no run is writing that expert."""
    if not output_dir.is_dir():
        return
    lock = ExpertLock(output_dir, expert)
    try:
        if not lock.acquire():
            return  # a live run owns the folder and will finish its own install
    except OSError:
        return  # a read-only adapters folder: nothing could be repaired here anyway
    try:
        recover(output_dir, expert, log)
    finally:
        lock.release()


def is_ours(folder: Path, expert: str) -> str | None:
    """None when `folder` is an adapter mtg-train wrote for `expert` (and nothing else); else why not."""
    if folder.is_symlink():
        return "is a symbolic link (mtg-train installs adapters by renaming and does not follow links)"
    if not folder.is_dir():
        return "is not a folder"
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"has no readable {META}, so it is not an adapter mtg-train wrote"
    if not isinstance(meta, dict) or meta.get("expert") != expert:
        return f"{META} is not mtg-train's record of a {expert} adapter"
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in OWN_ENTRIES)
    if foreign:
        return f"also holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which mtg-train did not write"
    return None


def check_replaceable(output_dir: Path, expert: str) -> None:
    """Refuse, before any weights load, to train into a folder the final install would wrongly replace."""
    final = output_dir / expert
    if not final.exists() and not final.is_symlink():
        return
    reason = is_ours(final, expert)
    if reason:
        raise OutputError(f"{final} {reason}; move your files out of it or give another --output-dir (nothing was changed)")
    # Renaming is how the new adapter goes in: find out now, not after hours of training, if it cannot.
    probe = final.with_name(f".{expert}.old-{os.getpid()}")
    try:
        final.rename(probe)
        probe.rename(final)
    except OSError as exc:
        raise OutputError(
            f"{final}: cannot be replaced ({exc.strerror}; is it immutable or on a read-only mount?); "
            "fix its permissions or give another --output-dir"
        ) from None


def install(new: Path, final: Path) -> None:
    """Swap `new` in for `final`; the old adapter stays whole until the new one is complete on disk."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    try:
        new.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by the next run's recover()


# -- files checked whole before they are used ----------------------------------------------------


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
    """None when every file --resume needs is present and whole; else what is wrong, naming the file."""
    for name in CHECKPOINT_FILES:
        path = checkpoint / name
        check = safetensors_problem if name.endswith(".safetensors") else torch_file_problem if name.endswith(".pt") else json_problem
        problem = check(path)
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


def is_write_failure(exc: BaseException) -> bool:
    """Disk full, file-size limit or permission, as each library reports it while saving."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.EIO)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        return True
    # torch.save reports a failed write from C++ (PytorchStreamWriter / inline_container.cc) as RuntimeError.
    return isinstance(exc, RuntimeError) and any(s in text for s in ("PytorchStreamWriter", "inline_container", "unexpected pos"))


def write_failure_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    for marker, reason in (("StorageFull", "no space left on device"), ("No space", "no space left on device"),
                           ("FileTooLarge", "file too large"), ("File too large", "file too large"),
                           ("unexpected pos", "the write stopped short (disk full or a file-size limit)"),
                           ("PermissionDenied", "permission denied")):
        if marker in text:
            return reason
    return text.splitlines()[0][:200] if text else type(exc).__name__


def require_writable_folder(folder: Path, option: str, error=OutputError) -> None:
    """Create `folder` if needed and prove a file can be written in it, before anything slow starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise error(f"{option} {folder}: cannot write there ({exc.strerror}); choose a writable folder") from None


def require_output_dir(value: str) -> Path:
    if not value.strip():
        raise ConfigError("--output-dir is empty; give a folder (default: adapters)")
    return Path(value)
