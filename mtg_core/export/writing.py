"""Writing exports safely: --out checked before anything is written, each export written into a marked hidden work
folder with its export.json (a record of every file it wrote) and swapped into place only when complete.

An export folder is replaced only when it holds nothing but what an export recorded; a work folder or previous
export left by a killed mtg-export is recognised by its marker and cleaned (or restored) by the next export."""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from mtg_core import __version__
from mtg_core.commands.exits import STOP_SIGNALS
from mtg_core.export.adapter import Adapter, ExportError
from mtg_core.outputs import (WORK_MARKER, apply_umask, describe_foreign, foreign_files, install, left_by_dead_process, make_work_dir,
                              pid_alive, read_small, record_files, require_writable_folder, write_new)

DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
MARKER = "export.json"


class ExportStopped(BaseException):
    """A stop signal while an export was written. A BaseException, like KeyboardInterrupt, so that no library's
    `except Exception` swallows it; the work folder is removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _cast(tensor, dtype: str | None):
    import torch

    return (tensor.to(getattr(torch, DTYPES[dtype])) if dtype else tensor).contiguous()


def prepare_out(out: Path, names: list[str], needed_bytes: int, adapters: Path, folders: list[Path]) -> None:
    """Fail before writing when --out is inside the adapters, unwritable, too small, or holds a folder of an expert's
    name with anything an export did not write."""
    resolved = out.resolve()
    for inside in (adapters, *folders):
        if resolved == inside.resolve() or inside.resolve() in resolved.parents:
            raise ExportError(f"--out {out} is inside {inside}, where mtg-train keeps adapters (an export there would be taken "
                              "for one, and mtg-train would refuse the folder); choose another --out")
    require_writable_folder(out, "--out", ExportError)
    for name in names:
        target = out / name
        if target.exists() or target.is_symlink():
            reason = export_foreign(target)
            if reason:
                raise ExportError(f"{target} {reason}; move them out of it or choose another --out (nothing was changed)"
                                  if reason.startswith("also holds") else f"{target} {reason}; remove it or choose another --out")
    free = shutil.disk_usage(out).free
    if needed_bytes > free:
        raise ExportError(f"--out {out}: the export needs {needed_bytes / 1024**3:.1f} GiB and {free / 1024**3:.1f} GiB are free there; "
                          "free space or choose another --out")


def export_foreign(folder: Path, marked: bool = False) -> str | None:
    """None when `folder` holds only the files its export.json records, unchanged (and our marker, if `marked`);
    else why it is not only ours."""
    if folder.is_symlink() or not folder.is_dir():
        return "exists and is not an mtg-export folder (a symbolic link or a file)"
    try:
        record = json.loads(read_small(folder / MARKER) or "")
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return f"exists and is not an mtg-export folder (no {MARKER})"
    files = record.get("files")
    if isinstance(files, dict):
        foreign = foreign_files(folder, files, {MARKER, WORK_MARKER} if marked else {MARKER})
    else:  # exports made before export.json recorded sizes and hashes: a list of the top-level names written
        known = ({*files} if isinstance(files, list) else set()) | ({MARKER, WORK_MARKER} if marked else {MARKER})
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                         if p.name not in known or p.is_symlink() or not p.is_file())
    return f"also holds {describe_foreign(foreign)}, which mtg-export did not write" if foreign else None


def clean_leftovers(out: Path, name: str) -> None:
    """What a killed mtg-export left for `name`: work folders (removed) and a previous export between the two renames
    of its install (restored). Only folders carrying our marker, or our complete export.json, of a dead process."""
    target = out / name
    for old in sorted(out.glob(f".{name}.old-*"), key=lambda p: p.lstat().st_mtime, reverse=True):
        if left_by_dead_process(old) and export_foreign(old, marked=True) is None:
            if not target.exists() and not target.is_symlink():
                old.rename(target)
                (target / WORK_MARKER).unlink(missing_ok=True)
            else:
                shutil.rmtree(old, ignore_errors=True)
    for work in out.glob(f".{name}.partial-*"):
        pid = work.name.rsplit("-", 1)[-1]
        unmarked_ours = pid.isdigit() and not pid_alive(int(pid)) and export_foreign(work) is None
        if left_by_dead_process(work) or unmarked_ours:
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _stop_on_signals():
    def stop(signum, frame):
        raise ExportStopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_export(out: Path, adapter: Adapter, fmt: str, dtype: str | None, write) -> Path:
    """Write one export into OUT/.NAME.partial-PID, then swap it in for OUT/NAME (an earlier export stays whole until then)."""
    target, work = out / adapter.name, out / f".{adapter.name}.partial-{os.getpid()}"
    clean_leftovers(out, adapter.name)
    created = False
    try:
        with _stop_on_signals():
            make_work_dir(work, f"the work folder of an mtg-export of {adapter.name}")
            created = True
            write(work)
            apply_umask(work)
            files = {rel: entry for rel, entry in record_files(work).items() if rel != WORK_MARKER}
            marker = {"format": fmt, "expert": adapter.name, "adapter": str(adapter.folder.resolve()),
                      "base_model": {"name": adapter.choice.name, "serve_as": adapter.serve_id},
                      "rank": adapter.rank, "alpha": adapter.alpha, "dtype": dtype or "unchanged", "files": files,
                      "mtg_core": __version__, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_new(work / MARKER, json.dumps(marker, indent=2) + "\n")
        if target.exists() or target.is_symlink():
            reason = export_foreign(target)  # checked before writing too; the user may have added files since
            if reason:
                raise ExportError(f"{target} {reason}, so it was not replaced (nothing was changed); move them out and export again")
        (work / WORK_MARKER).unlink()  # from here export.json (with this PID in the folder's name) proves the folder ours
        install(work, target)
    except BaseException:
        if created:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return target
