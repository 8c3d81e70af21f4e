"""Writing exports safely: --out checked before anything is written, each export written into a hidden
work folder with its export.json marker and swapped into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from mtg_core import __version__
from mtg_core.export.adapter import Adapter, ExportError
from mtg_core.outputs import install, require_writable_folder

DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
MARKER = "export.json"


def _cast(tensor, dtype: str | None):
    import torch

    return (tensor.to(getattr(torch, DTYPES[dtype])) if dtype else tensor).contiguous()


def prepare_out(out: Path, names: list[str], needed_bytes: int) -> None:
    """Fail before writing when --out is unwritable, too small, or holds a folder of an expert's name that no export made."""
    require_writable_folder(out, "--out", ExportError)
    for name in names:
        if (out / name).exists() and not (out / name / MARKER).is_file():
            raise ExportError(f"{out / name} exists and is not an mtg-export folder (no {MARKER}); remove it or choose another --out")
    free = shutil.disk_usage(out).free
    if needed_bytes > free:
        raise ExportError(f"--out {out}: the export needs {needed_bytes / 1024**3:.1f} GiB and {free / 1024**3:.1f} GiB are free there; "
                          "free space or choose another --out")


def write_export(out: Path, adapter: Adapter, fmt: str, dtype: str | None, write) -> Path:
    """Write one export into OUT/.NAME.partial-PID, then swap it in for OUT/NAME (an earlier export stays whole until then)."""
    target, work = out / adapter.name, out / f".{adapter.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        files = write(work)
        marker = {"format": fmt, "expert": adapter.name, "adapter": str(adapter.folder.resolve()),
                  "base_model": {"name": adapter.choice.name, "serve_as": adapter.serve_id},
                  "rank": adapter.rank, "alpha": adapter.alpha, "dtype": dtype or "unchanged", "files": sorted(files),
                  "mtg_core": __version__, "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    install(work, target)
    return target
