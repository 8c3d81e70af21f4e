"""One writer per expert: an OS file lock on OUTPUT_DIR/.<expert>.lock, released by the kernel when its process dies."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mtg_core.outputs.files import OutputError, open_shared, read_small


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
