"""Files in folders other users may share: opened without following links, created with the mode open() gives,
replaced whole; and a failed write (full disk, file-size limit, permission) as each library reports it."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mtg_core.errors import ConfigError, MtgError


class OutputError(MtgError):
    """An output folder cannot be written, or holds something mtg-train must not replace."""


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


@contextmanager
def write_errors(what: str, consequence: str):
    """Disk full, a file-size limit or a permission error while writing becomes one line naming what and where."""
    try:
        yield
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        raise OutputError(f"cannot write {what}: {write_failure_reason(exc)}; free space or fix permissions there ({consequence})") from None
