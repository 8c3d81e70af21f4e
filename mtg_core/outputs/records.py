"""What we wrote: the marker a work folder carries (the PID that made it and why) and the record of every file an
adapter or export holds (size and SHA-256, as pip's RECORD); anything else in a folder we use is the user's."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from mtg_core.outputs.files import OutputError, read_small, write_new

META = "training_meta.json"
WORK_MARKER = ".mtg-work.json"
EVAL = "eval.json"
LEGACY_EVAL_TMP = "eval.json.tmp"  # where earlier releases of mtg-eval wrote eval.json first; a kill could leave it behind
# What adapters written before training_meta.json recorded its files may hold (judged by name, see _legacy_foreign).
LEGACY_ENTRIES = {"adapter_config.json", "adapter_model.safetensors", META, EVAL, LEGACY_EVAL_TMP, "README.md", "runs"}


def make_work_dir(folder: Path, what: str) -> None:
    """Create `folder` (it must not exist) and mark it as ours: only marked folders are ever removed by recovery."""
    folder.mkdir()
    try:
        mark(folder, what)
    except BaseException:
        folder.rmdir()
        raise


def ensure_own_dir(folder: Path, what: str) -> None:
    """`folder` as a real folder of this user (created and marked if absent): files are then created inside it."""
    folder.mkdir(exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OutputError(f"{folder} is {'a symbolic link' if stat.S_ISLNK(info.st_mode) else 'not a folder of this user'}; "
                          "move it away or give another --output-dir (nothing was written there)")
    if marker(folder) is None:
        mark(folder, what)


def mark(folder: Path, what: str) -> None:
    write_new(folder / WORK_MARKER, json.dumps({"pid": os.getpid(), "what": what}) + "\n")


def marker(folder: Path) -> dict | None:
    """Our marker in `folder` (a real folder, not a link), or None when `folder` is not one we made."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        value = json.loads(read_small(folder / WORK_MARKER) or "")
    except ValueError:
        return None
    return value if isinstance(value, dict) and isinstance(value.get("pid"), int) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def left_by_dead_process(folder: Path) -> bool:
    """`folder` carries our marker and the process that made it is gone (or is this one)."""
    found = marker(folder)
    return found is not None and (found["pid"] == os.getpid() or not pid_alive(found["pid"]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(folder: Path) -> dict[str, dict]:
    """Every file under `folder`, relative path -> size and SHA-256 (pip's RECORD, for one adapter or export)."""
    record = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            record[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return record


def foreign_files(folder: Path, record: dict, also_ours: set[str] = frozenset()) -> list[str]:
    """What under `folder` (any depth) is not a file `record` lists, unchanged: the user's; links always are.

    `also_ours`: top-level files written after the record (training_meta.json itself, eval.json).
    """
    kept_dirs = {parent.as_posix() for rel in record for parent in Path(rel).parents if parent != Path(".")}
    foreign = []
    for root, dirs, files in os.walk(folder):
        here = Path(root).relative_to(folder)
        for name in sorted(dirs):
            rel = (here / name).as_posix()
            if (Path(root) / name).is_symlink() or rel not in kept_dirs:
                foreign.append(f"{rel}/")
                dirs.remove(name)
        for name in sorted(files):
            path, rel = Path(root) / name, (here / name).as_posix()
            if path.is_symlink() or not path.is_file():
                foreign.append(rel)
            elif rel in also_ours and here == Path("."):
                continue
            elif rel not in record:
                foreign.append(rel)
            elif not isinstance(record[rel], dict) or path.stat().st_size != record[rel].get("size") or _sha256(path) != record[rel].get("sha256"):
                foreign.append(f"{rel} (changed since it was written)")
    return sorted(foreign)


def describe_foreign(foreign: list[str]) -> str:
    return ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")


def is_ours(folder: Path, expert: str) -> str | None:
    """None when `folder` is an adapter mtg-train wrote for `expert` (and nothing else, unchanged); else why not."""
    if folder.is_symlink():
        return "is a symbolic link (mtg-train installs adapters by renaming and does not follow links)"
    if not folder.is_dir():
        return "is not a folder"
    try:
        meta = json.loads(read_small(folder / META) or "")
    except ValueError:
        meta = None
    if meta is None:
        return f"has no readable {META}, so it is not an adapter mtg-train wrote"
    if not isinstance(meta, dict) or meta.get("expert") != expert:
        return f"{META} is not mtg-train's record of a {expert} adapter"
    record = meta.get("files")
    foreign = foreign_files(folder, record, {META, EVAL, LEGACY_EVAL_TMP}) if isinstance(record, dict) else _legacy_foreign(folder)
    if foreign:
        return f"also holds {describe_foreign(foreign)}, which mtg-train did not write"
    return None


def _legacy_foreign(folder: Path) -> list[str]:
    """An adapter from before training_meta.json recorded its files: ours only if every name is one training wrote,
    runs/ holds nothing but TensorBoard event files, and README.md is still peft's unfilled model card."""
    foreign = [p.name for p in folder.iterdir() if p.name not in LEGACY_ENTRIES or p.is_symlink()]
    runs = folder / "runs"
    if runs.is_dir() and not runs.is_symlink():
        for root, dirs, files in os.walk(runs):
            for name in [*dirs, *files]:
                path = Path(root) / name
                if path.is_symlink() or (path.is_file() and not name.startswith("events.out.tfevents.")):
                    foreign.append(path.relative_to(folder).as_posix())
    readme = folder / "README.md"
    if readme.exists() and not readme.is_symlink():
        text = read_small(readme) or ""
        if "library_name: peft" not in text or "[More Information Needed]" not in text:
            foreign.append("README.md (edited: not peft's model card)")
    return sorted(foreign)
