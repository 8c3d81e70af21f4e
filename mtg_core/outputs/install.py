"""The adapters folder: a finished adapter swapped in for the old one, an install that a kill interrupted finished or
undone, and eval.json written only beside the adapter it evaluated."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from mtg_core.outputs.files import OutputError, read_small, replace_file
from mtg_core.outputs.lock import ExpertLock
from mtg_core.outputs.records import EVAL, META, WORK_MARKER, is_ours, left_by_dead_process, mark, marker


def work_dir(output_dir: Path, expert: str) -> Path:
    """Where a run trains and checkpoints; its adapter/ becomes OUTPUT_DIR/<expert>/ only when the run succeeds."""
    return output_dir / f".{expert}.partial"


def check_work_dir(output_dir: Path, expert: str) -> None:
    """Refuse, before anything loads, a work folder path that holds something mtg-train did not make."""
    work = work_dir(output_dir, expert)
    if (work.exists() or work.is_symlink()) and marker(work) is None:
        kind = "a symbolic link" if work.is_symlink() else "not a folder" if not work.is_dir() else f"a folder without mtg-train's {WORK_MARKER}"
        raise OutputError(f"{work} is {kind}, so it is not a work folder mtg-train made; move it away or give another --output-dir "
                          "(nothing was changed)")


def is_complete_adapter(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / META).is_file() and (folder / "adapter_config.json").is_file()


def recover(output_dir: Path, expert: str, log: Callable[[str], None]) -> None:
    """Finish or undo an install that a kill interrupted; the caller holds the expert's lock (or no one does).

    The newest complete adapter wins: a finished adapter still in the work folder, else the previous one.
    Only folders carrying our marker are renamed or removed; anything else named like them is the user's.
    """
    final = output_dir / expert
    work = work_dir(output_dir, expert)
    finished = work / "adapter"
    ours_work = marker(work) is not None
    candidates = sorted(output_dir.glob(f".{expert}.old-*"), key=lambda p: p.lstat().st_mtime)
    previous = [p for p in candidates if left_by_dead_process(p)]
    if not final.exists() and not final.is_symlink():
        if ours_work and is_complete_adapter(finished):
            finished.rename(final)
            log(f"restored {final}: the run that trained it was stopped while installing it")
        elif previous and is_complete_adapter(previous[-1]):
            restored = previous.pop()
            restored.rename(final)
            (final / WORK_MARKER).unlink(missing_ok=True)
            log(f"restored the previous adapter {final}: a run was stopped while replacing it")
        elif any(is_complete_adapter(p) for p in candidates):
            log(f"{final} is missing and {', '.join(p.name for p in candidates)} carries no mtg-train marker, so it was left "
                f"alone; rename it to {final} if it is the adapter you want")
    elif ours_work and is_complete_adapter(finished) and is_ours(final, expert) is None:
        install(finished, final)
        log(f"installed {final}: the run that trained it was stopped before installing it")
    if is_complete_adapter(final):
        for stale in previous:
            shutil.rmtree(stale, ignore_errors=True)
        if ours_work and not finished.exists() and not any(work.glob("checkpoint-*")):
            shutil.rmtree(work, ignore_errors=True)  # what is left of the run that installed it


def recover_unlocked(output_dir: Path, expert: str, log: Callable[[str], None]) -> None:
    """Recovery for read-only commands (eval, ask, export): only when no run is writing that expert."""
    if not output_dir.is_dir():
        return
    lock = ExpertLock(output_dir, expert)
    try:
        if not lock.acquire():
            return  # a live run owns the folder and will finish its own install
    except (OSError, OutputError):
        return  # a read-only adapters folder or a planted lock file: nothing is repaired here
    try:
        recover(output_dir, expert, log)
    finally:
        lock.release()


def pending_installs(output_dir: Path) -> list[str]:
    """Experts with an installed adapter or an interrupted install (work or .old- folder) in `output_dir`."""
    from mtg_core.experts import EXPERT_NAME

    names = {p.parent.name for p in output_dir.glob("*/adapter_config.json")}
    names |= {p.name[1:].split(".", 1)[0] for p in [*output_dir.glob(".*.partial"), *output_dir.glob(".*.old-*")]}
    return sorted(n for n in names if EXPERT_NAME.match(n))


def adapter_identity(folder: Path) -> str:
    """Which adapter is installed at `folder`: an install renames a new folder in, and its training_meta.json differs."""
    info = folder.stat()
    return f"{info.st_dev}:{info.st_ino}:{hashlib.sha256((read_small(folder / META) or '').encode()).hexdigest()}"


def write_eval(adapters: Path, identities: dict[str, str], results: dict[str, dict]) -> None:
    """Each adapter's eval.json, under its expert's lock and only while the adapter evaluated is still the one installed:
    results of an old adapter never land in a newer adapter's folder. One line naming every eval.json not written."""
    problems = []
    for name, result in results.items():
        folder, lock = adapters / name, ExpertLock(adapters, name)
        target, held = folder / EVAL, lock.path.absolute() in ExpertLock.held  # mtg-train --eval-after holds it already
        try:
            if not held and not lock.acquire():
                problems.append(f"{target} not written: mtg-train (PID {lock.holder()}) is replacing that adapter; evaluate it again when it is done")
                continue
            try:
                if not folder.is_dir() or adapter_identity(folder) != identities[name]:
                    problems.append(f"{target} not written: the adapter was replaced while it was evaluated; evaluate it again")
                    continue
                # the temporary file outside the adapter folder: one a kill leaves behind never blocks mtg-train
                replace_file(target, json.dumps(result, indent=2) + "\n", tmp_dir=None if folder.is_symlink() else adapters)
            finally:
                if not held:
                    lock.release()
        except OutputError as exc:
            problems.append(f"{target} not written: {exc}")
        except OSError as exc:
            problems.append(f"{target} not written: {exc.strerror or exc}")
    if problems:
        raise OutputError(f"{'; '.join(problems)} (the results are printed above)")


def check_replaceable(output_dir: Path, expert: str) -> None:
    """Refuse, before any weights load, to train into a folder the final install would wrongly replace."""
    check_work_dir(output_dir, expert)
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
    """Swap `new` in for `final`; the old adapter stays whole until the new one is complete on disk.

    The old one is marked before anything else happens to it, so recovery can tell it from a user's backup."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        try:
            mark(old, f"the previous {final.name}, being replaced")
        except BaseException:
            old.rename(final)
            raise
    try:
        new.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
            (final / WORK_MARKER).unlink(missing_ok=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # a leftover is removed by the next run's recover()
