"""One host copy of the streamed experts per node: under torchrun the ranks of a node map one shared file per layer.

Each rank still quantises its streamed layers on its own device (the quantisation constants stay there), so
only the packed NF4 bytes are shared. Local rank 0 writes each layer into a file in the node's shared-memory
folder ($MTG_SHM_DIR, else /dev/shm); the other local ranks map it, check it byte for byte against their own
quantisation (a rank that loaded other weights fails instead of training on them) and never write it. Every
process pins its own mapping (cudaHostRegister locks the same physical pages in each), so the node holds the
streamed experts once, as memory-file-system pages, however many ranks it runs.

No process group exists when the base loads (transformers' TrainingArguments initialises torch.distributed
after it), so the ranks agree on names without talking: the run (TORCHELASTIC_RUN_ID, its restart count,
MASTER_ADDR:MASTER_PORT), the base's location and the how-many-th base load of the process, hashed, after
this user's id. Local rank 0 first writes a manifest naming the layers it streams (a rank whose plan streams
another layer keeps that one to itself), then each layer under a temporary name, renamed when complete; the
others wait for the names, with a timeout that ends in one line. Each local rank > 0 writes one small file
when it has mapped everything, and local rank 0 then unlinks all of them: the mappings stay valid, and from
then on the node's memory file system lists nothing of the run.

Files rule: every file starts with a header naming the process that wrote it (PID and host), files are
created with O_EXCL (which never follows a link), and only files carrying our header, of this user and this
host, whose writer is dead, are removed as leftovers of a killed run (by local rank 0, before it writes).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import mmap
import os
import socket
import stat
import time
from pathlib import Path

from mtg_core.distributed import local_rank, local_world_size
from mtg_core.errors import BaseModelError

MAGIC = b"mtg-core shared experts\n"
HEADER_BYTES = mmap.PAGESIZE  # a layer's data starts one page in, so its mapping (and pinning) stays page-aligned
WAIT_S = 600.0  # how long one rank waits for another's next file: a layer's quantisation takes seconds, not minutes
POLL_S = 0.02
_loads = itertools.count()  # base loads in this process: every rank loads in the same order, so the n-th ones match


def shm_folder() -> Path:
    """Where the shared copies go: $MTG_SHM_DIR, else /dev/shm (a memory file system: the copy costs RAM once)."""
    return Path(os.environ.get("MTG_SHM_DIR") or "/dev/shm")


def free_bytes(folder: Path) -> int | None:
    """What `folder` can still take (a Docker /dev/shm is 64 MiB unless --shm-size), None when it is not there."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def node_host_budget(available: int) -> int:
    """Host RAM the streamed experts may take, for the memory plan: their one copy per node (not one per rank) lives
    in the shared-memory folder when several ranks share this node, so that folder's free space bounds it too."""
    if local_world_size() <= 1:
        return available
    return min(available, free_bytes(shm_folder()) or 0)


def node_share(location: str, layers: list[int], layer_bytes: int, log) -> "NodeShare | None":
    """The node's shared copy for this base load; None for a single process on its node (private memory, as before)."""
    if local_world_size() <= 1:
        return None
    elastic = [os.environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")]
    where = str(Path(location).resolve()) if Path(location).is_dir() else location
    key = hashlib.sha256(json.dumps([*elastic, where, next(_loads)]).encode()).hexdigest()[:16]
    return NodeShare(shm_folder(), f"mtg-experts-{os.geteuid()}-{key}", layers, layer_bytes, log)


class NodeShare:
    """The files of one base load: local rank 0 writes them, the other local ranks map them."""

    def __init__(self, folder: Path, prefix: str, layers: list[int], layer_bytes: int, log,
                 rank: int | None = None, ranks: int | None = None) -> None:
        self.folder, self.prefix, self.log = folder, prefix, log
        self.rank = local_rank() if rank is None else rank
        self.ranks = local_world_size() if ranks is None else ranks
        self.written: list[tuple[Path, int, int]] = []  # (path, st_dev, st_ino) of what this process created
        if not folder.is_dir():
            raise BaseModelError(f"{folder}: no such folder for the streamed experts' shared copy; set MTG_SHM_DIR to a folder "
                                 "on a memory file system that every process of this node sees")
        if self.rank == 0:
            remove_stale(folder, log)
            need = len(layers) * (HEADER_BYTES + -(-layer_bytes // mmap.PAGESIZE) * mmap.PAGESIZE)
            free = free_bytes(folder) or 0
            if need > free:
                raise self._full(need, free)
            self._publish(self.path("manifest"), _header({"layers": sorted(layers)}))
            self.layers = set(layers)
        else:
            manifest = self._wait(self.path("manifest"), "its list of streamed layers")
            self.layers = set(_read_header(manifest)["layers"])

    def path(self, what: str) -> Path:
        return self.folder / f"{self.prefix}.{what}"

    def host(self, index: int, entries: list, total: int, fill, pin) -> object | None:
        """Layer `index`'s packed experts (`entries`: (param, offset, shape), `total` bytes) in the shared file, as a
        uint8 tensor pinned by `pin` (or left as it is); None when local rank 0 does not stream this layer."""
        import torch

        if index not in self.layers:
            return None
        final = self.path(f"L{index}")
        length = -(-max(total, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        if self.rank == 0:
            tmp = self.path(f"L{index}.tmp")
            fd = self._create(tmp, _header({"layer": index, "bytes": total}), HEADER_BYTES + length)
            try:
                host = pin(_map(fd, length), total)
            finally:
                os.close(fd)
            fill(host, entries)
            self._rename(tmp, final)
            return host
        fd = self._open(self._wait(final, f"layer {index}'s experts"))
        try:
            if os.fstat(fd).st_size != HEADER_BYTES + length:
                raise BaseModelError(f"{final}: {os.fstat(fd).st_size} bytes where layer {index}'s experts take {HEADER_BYTES + length}; "
                                     "every rank must load the same base (same --base-model and files)")
            host = pin(_map(fd, length), total)
        finally:
            os.close(fd)
        for param, offset, shape in entries:  # this rank quantised the same weights: the bytes must agree
            data = param.data.reshape(-1)
            if not torch.equal(host[offset : offset + data.numel()].to(data.device), data):
                raise BaseModelError(f"{final}: local rank 0's packed experts of layer {index} differ from this rank's "
                                     "quantisation; every rank must load the same base (same --base-model and files)")
        return host

    def finish(self) -> None:
        """Local ranks > 0: say that everything is mapped. Local rank 0: wait for that from every other local rank,
        then unlink the run's files (their mappings stay valid)."""
        if self.rank > 0:
            self._publish(self.path(f"mapped-{self.rank}"), _header({"rank": self.rank}), keep=False)
            return
        done = [self._wait(self.path(f"mapped-{rank}"), f"local rank {rank}'s word that it mapped the shared experts")
                for rank in range(1, self.ranks)]
        for path in done:
            if _read_header(path) is not None:  # ours: its writer wrote it for this run, under this run's name
                path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Unlink what this process created (and only that: the same file, not one renamed in since)."""
        for path, device, inode in self.written:
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if (info.st_dev, info.st_ino) == (device, inode):
                path.unlink()
        self.written.clear()

    def _create(self, path: Path, header: bytes, size: int) -> int:
        """Create `path` (O_EXCL: never an existing file, never through a link), `size` bytes reserved, header first."""
        try:
            # 0600: only this user's processes (the run's ranks) map it; the base's weights may be private
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise BaseModelError(f"{path} exists and this run did not write it; remove it if it is a leftover "
                                 "(mtg-core never writes over or through files it did not create)") from None
        except OSError as exc:
            raise BaseModelError(f"{path}: cannot create the streamed experts' shared copy ({exc.strerror}); "
                                 "set MTG_SHM_DIR to a writable folder on a memory file system") from None
        info = os.fstat(fd)
        self.written.append((path, info.st_dev, info.st_ino))
        try:
            os.pwrite(fd, header, 0)
            os.posix_fallocate(fd, 0, size)  # pages reserved now: a full tmpfs is this error, not a SIGBUS while copying
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ENOSPC:
                raise self._full(size, free_bytes(self.folder) or 0) from None
            raise BaseModelError(f"{path}: cannot write the streamed experts' shared copy ({exc.strerror}); "
                                 "set MTG_SHM_DIR to a writable folder on a memory file system") from None
        return fd

    def _publish(self, path: Path, header: bytes, keep: bool = True) -> None:
        """Write a header-only file under a temporary name, then give it `path` (readers never see it half written)."""
        tmp = path.with_name(path.name + ".tmp")
        os.close(self._create(tmp, header, len(header)))
        self._rename(tmp, path)
        if not keep:  # local rank 0 removes it once read; a dead run's copy goes as a leftover
            self.written.pop()

    def _rename(self, tmp: Path, final: Path) -> None:
        """`tmp` also named `final` (os.link: fails rather than replace anything there), then `tmp` unlinked."""
        try:
            os.link(tmp, final, follow_symlinks=False)
        except FileExistsError:
            raise BaseModelError(f"{final} exists and this run did not write it; remove it if it is a leftover "
                                 "(mtg-core never writes over files it did not create)") from None
        tmp.unlink()
        path, device, inode = self.written.pop()
        self.written.append((final, device, inode))

    def _wait(self, path: Path, what: str) -> Path:
        deadline = time.monotonic() + WAIT_S
        while not path.exists():
            if time.monotonic() > deadline:
                writer = "local rank 0" if self.rank > 0 else "another local rank"
                raise BaseModelError(f"{path}: {writer} did not write {what} within {WAIT_S:g} s; see its error (a plan "
                                     "that streams no experts there: give every rank the same --gpu-memory), and set "
                                     "MTG_SHM_DIR to one folder that every process of this node sees")
            time.sleep(POLL_S)
        return path

    def _open(self, path: Path) -> int:
        """Open a file local rank 0 wrote, read-write (pinning locks pages for device writes, which a read-only
        mapping refuses; a private mapping would copy each page as it is pinned): this process never writes it."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise BaseModelError(f"{path}: cannot open local rank 0's copy of the streamed experts ({exc.strerror}); "
                                 "see local rank 0's error") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or os.pread(fd, len(MAGIC), 0) != MAGIC:
            os.close(fd)
            raise BaseModelError(f"{path} is not a file this run wrote; remove it and start again")
        return fd

    def _full(self, need: int, free: int) -> BaseModelError:
        gib = 1024**3
        return BaseModelError(f"{self.folder} has {free / gib:.2f} GiB free; the streamed experts' one copy for this node needs "
                              f"{need / gib:.2f} GiB: enlarge it (docker run --shm-size) or set MTG_SHM_DIR to a larger memory file system")


def _map(fd: int, length: int) -> mmap.mmap:
    """The data pages of a layer file, shared (every process reaches the same pages)."""
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=HEADER_BYTES)


def _header(fields: dict) -> bytes:
    header = MAGIC + json.dumps({"pid": os.getpid(), "host": socket.gethostname(), **fields}).encode() + b"\n"
    assert len(header) <= HEADER_BYTES
    return header


def _read_header(path: Path) -> dict | None:
    """Our header's fields, or None when `path` is not a regular file of this user starting with it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return None
        head = os.pread(fd, HEADER_BYTES, 0)
    finally:
        os.close(fd)
    if not head.startswith(MAGIC):
        return None
    try:
        fields = json.loads(head[len(MAGIC) :].split(b"\n", 1)[0])
    except ValueError:
        return None
    return fields if isinstance(fields, dict) and isinstance(fields.get("pid"), int) else None


def remove_stale(folder: Path, log) -> list[Path]:
    """Remove what killed runs of this user on this host left in `folder`: files with our header whose writer is dead.
    Anything else (another user's, another host's, a live run's, a file without our header) stays."""
    from mtg_core.outputs.records import pid_alive

    removed = []
    for entry in os.scandir(folder):
        if not entry.name.startswith(f"mtg-experts-{os.geteuid()}-"):
            continue
        path = Path(entry.path)
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            continue
        fields = _read_header(path)
        if fields is None or fields.get("host") != socket.gethostname() or pid_alive(fields["pid"]):
            continue
        after = os.lstat(path)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            continue  # replaced since its header was read: not the file judged
        path.unlink(missing_ok=True)
        removed.append(path)
        log(f"removed {path}: left by a killed run (PID {fields['pid']})")
    return removed
