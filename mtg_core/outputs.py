"""The adapters folder: one writer per expert, replacing only what mtg-train wrote, surviving a kill at any point.

Layout under OUTPUT_DIR for expert E:
  E/                  the installed adapter; its training_meta.json (written last, so its presence means complete)
                      records every file training wrote (size and SHA-256): anything else in E/ is the user's
  .E.partial/         the work folder of a run: checkpoints, run.json, and the finished adapter in adapter/
  .E.old-PID/         the previous adapter for the instant between the two renames that install a new one
  .E.lock             an OS file lock held by the run writing E (released by the kernel when the process dies)
Work and .old- folders hold WORK_MARKER (the PID that made them and why): only folders carrying it are ever
removed or renamed by recovery. Files in these shared folders are opened without following links (open_shared).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from mtg_core.errors import ConfigError, MtgError

META = "training_meta.json"
WORK_MARKER = ".mtg-work.json"
EVAL = "eval.json"
LEGACY_EVAL_TMP = "eval.json.tmp"  # where earlier releases of mtg-eval wrote eval.json first; a kill could leave it behind
# What adapters written before training_meta.json recorded its files may hold (judged by name, see _legacy_foreign).
LEGACY_ENTRIES = {"adapter_config.json", "adapter_model.safetensors", META, EVAL, LEGACY_EVAL_TMP, "README.md", "runs"}
CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


class OutputError(MtgError):
    """An output folder cannot be written, or holds something mtg-train must not replace."""


# -- files in folders other users may share ---------------------------------------------------------


def open_shared(path: Path, flags: int) -> int:
    """Open (or create, with mode 0666 less the umask, as open() does) a file in a folder others may write to.

    Never through a symbolic link (O_NOFOLLOW), and only a regular file this user owns: a link or a file planted
    by someone else in a shared /tmp folder must not make our write land in their target. O_NONBLOCK keeps a
    planted FIFO from blocking the open; it changes nothing for regular files.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{path} is a symbolic link; mtg-core never writes through links: remove it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        why = "belongs to another user" if stat.S_ISREG(info.st_mode) else "is not a regular file"
        raise OutputError(f"{path} {why}; mtg-core writes only regular files of its own user there: remove it")
    return fd


def write_new(path: Path, text: str) -> None:
    """Create `path` (it must not exist: O_EXCL) and write `text` to it."""
    fd = open_shared(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as handle:
            handle.write(text)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # no empty or partial file left behind (a full disk)
        raise
    os.close(fd)


def replace_file(path: Path, text: str, tmp_dir: Path | None = None) -> None:
    """Write `text` beside `path` (or in `tmp_dir`) and rename it into place: readers see the old or the new file, whole."""
    tmp = tmp_dir / f".{path.parent.name}.{path.name}.tmp-{os.getpid()}" if tmp_dir else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_new(tmp, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_small(path: Path) -> str | None:
    """A small file's text, read without following a link; None when it is absent, a link or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(1 << 24).decode("utf-8", "replace")
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it (Linux shows it in /proc); else the set-and-restore dance."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def apply_umask(folder: Path) -> None:
    """Give every file under `folder` mode 0666 less the umask, as open() would: safetensors creates its files 0600,
    which a server running as another user could not read."""
    mode = 0o666 & ~umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, mode)


# -- what we wrote: work-folder markers and file records --------------------------------------------


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


# -- the adapters folder ----------------------------------------------------------------------------


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


class ExpertLock:
    """An exclusive `flock` on OUTPUT_DIR/.<expert>.lock, holding the owner's PID; the file is removed on release.

    flock rather than a PID file: the kernel drops it when the process dies, however it dies, so a
    crashed run never leaves a stale lock behind and a live one can never be mistaken for a dead one.
    """

    held: dict[Path, "ExpertLock"] = {}  # locks this process holds: mtg-train --eval-after writes eval.json under its own

    def __init__(self, output_dir: Path, expert: str) -> None:
        self.path = output_dir / f".{expert}.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        while True:
            fd = open_shared(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                current = os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder released and removed the file between our open and flock: try the new one
        os.ftruncate(fd, 0)  # only now, holding it: a refused run never overwrites the holder's PID
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        ExpertLock.held[self.path.absolute()] = self
        return True

    def holder(self) -> str:
        return (read_small(self.path) or "").strip() or "unknown"

    def release(self) -> None:
        if self.fd is not None:
            ExpertLock.held.pop(self.path.absolute(), None)
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


def lock_all(output_dir: Path, experts: list[str]) -> list[ExpertLock]:
    """Every expert's lock, or none: a refusal releases (and removes) the locks already taken."""
    locks = []
    try:
        for expert in experts:
            locks.append(lock_for_training(output_dir, expert))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


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
