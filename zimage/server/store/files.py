"""Image files of finished jobs: a local directory, or any fsspec URL (s3://bucket/prefix, gs://..., memory://...).

Writes are atomic: a reader sees the whole file or none. Locally: a temporary `.part` file in the same directory,
fsync, rename, fsync of the directory (so a power loss cannot undo the rename after the job was marked succeeded).
On object stores a PUT is already all-or-nothing, so the object is written at its name directly; other fsspec
filesystems get the same temporary-then-move as a local disk.

Names are chosen by the job store (`<job id>-<index>.<ext>`), never taken from a request.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from pathlib import Path

log = logging.getLogger("zimage.server")

PART_SUFFIX = ".part"
# A .part file from another machine sharing the storage cannot be checked for a live writer; one this old is dead
# (a write takes milliseconds to seconds).
STALE_PART_S = 3600.0
# fsspec protocols whose writes are single PUTs: the object appears whole or not at all.
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"}
# Tells this process's parts from those of an earlier process that had the same pid (a restarted container is
# pid 1 again).
_PROCESS_TOKEN = secrets.token_hex(4)


def is_local(location: str | Path) -> bool:
    return isinstance(location, Path) or "://" not in str(location) or str(location).startswith("file://")


class ImageFiles:
    """Where a store keeps image bytes. `local` is the directory (a Path) when the files are on this machine."""

    def __init__(self, location: str | Path):
        self.url = str(location)
        if is_local(location):
            path = str(location)
            self.local: Path | None = Path(path[len("file://"):] if path.startswith("file://") else path)
            self.local.mkdir(parents=True, exist_ok=True)
            self._fs, self._root = None, str(self.local)
        else:
            import fsspec

            self.local = None
            self._fs, root = fsspec.core.url_to_fs(self.url)
            self._root = root.rstrip("/")
            self._fs.makedirs(self._root, exist_ok=True)
        self._host = socket.gethostname().replace(".", "_")

    # ---------------------------------------------------------------- write / read / delete
    def write(self, name: str, data: bytes) -> str | Path:
        """Atomic write of one file; returns its path (local) or URL."""
        if self.local is not None:
            return self._write_local(name, data)
        target = f"{self._root}/{name}"
        if self._fs.protocol and set(_protocols(self._fs)) & _ATOMIC_PUT:
            self._fs.pipe_file(target, data)
        else:
            tmp = f"{self._root}/{self._part_name(name)}"
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, target)
        return f"{self.url.rstrip('/')}/{name}"

    def _write_local(self, name: str, data: bytes) -> Path:
        path = self.local / name
        tmp = self.local / self._part_name(name)
        # 0600: the server's images are its clients' data, not the machine's users'. O_EXCL: never an existing
        # file, nor a symlink planted at that name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.local)
        return path

    def read(self, name: str) -> bytes | None:
        try:
            if self.local is not None:
                return (self.local / name).read_bytes()
            return self._fs.cat_file(f"{self._root}/{name}")
        except (FileNotFoundError, IsADirectoryError):
            return None

    def path(self, name: str) -> Path | None:
        """The local file (for a zero-copy FileResponse), or None when absent or not on this machine."""
        if self.local is None:
            return None
        path = (self.local / name).resolve()
        if path.parent != self.local.resolve() or not path.is_file():
            return None
        return path

    def size(self, name: str) -> int:
        try:
            if self.local is not None:
                return (self.local / name).stat().st_size
            return int(self._fs.size(f"{self._root}/{name}") or 0)
        except FileNotFoundError:
            return 0

    def delete(self, names) -> int:
        """Removes the files that exist; returns how many were removed."""
        removed = 0
        for name in names:
            try:
                if self.local is not None:
                    (self.local / name).unlink()
                else:
                    self._fs.rm_file(f"{self._root}/{name}")
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def age_s(self, name: str, now: float | None = None) -> float | None:
        """Seconds since the file was last written (None: the storage does not say, or the file is gone)."""
        try:
            mtime = self._modified(name)
        except FileNotFoundError:
            return None
        return None if mtime is None else (time.time() if now is None else now) - mtime

    def _modified(self, name: str) -> float | None:
        """The file's modification time (None: the storage does not say); FileNotFoundError when it is gone."""
        if self.local is not None:
            return (self.local / name).stat().st_mtime
        return _mtime(self._fs.info(f"{self._root}/{name}"))

    def names(self) -> list[str]:
        """Every file name in the storage (images and .part files)."""
        if self.local is not None:
            return [e.name for e in os.scandir(self.local) if e.is_file(follow_symlinks=False)]
        return [p.rsplit("/", 1)[-1] for p in self._fs.ls(self._root, detail=False)]

    # ---------------------------------------------------------------- crash leftovers
    def _part_name(self, name: str) -> str:
        # Host, pid and process token in the name tell a later start-up whose write this was (clean_partials).
        return f".{name}.{self._host}.{os.getpid()}.{_PROCESS_TOKEN}{secrets.token_hex(4)}{PART_SUFFIX}"

    def clean_partials(self) -> int:
        """Remove the .part files that a killed writer left (issue: kill -9 while an image is written). A part is
        stale when it was written on this host by a process that no longer runs (or by an earlier process with this
        very pid: a restarted container is pid 1 again), or when it is older than STALE_PART_S (another host's
        crash). A live writer's part is left alone, be it another store of this process or another process."""
        removed = 0
        now = time.time()
        for fname in self.names():
            if not (fname.startswith(".") and fname.endswith(PART_SUFFIX)):
                continue
            if self._part_is_stale(fname, now):
                removed += self.delete([fname])
        if removed:
            log.info("removed %d partly written image file(s) left by a crash", removed)
        return removed

    def _part_is_stale(self, fname: str, now: float) -> bool:
        fields = fname[: -len(PART_SUFFIX)].rsplit(".", 3)  # [".<name>", host, pid, process token + random]
        if len(fields) == 4 and fields[1] == self._host and fields[2].isdigit():
            pid = int(fields[2])
            if pid == os.getpid():
                return not fields[3].startswith(_PROCESS_TOKEN)
            return not _pid_alive(pid)
        try:
            mtime = self._modified(fname)
        except FileNotFoundError:
            return False
        return mtime is None or now - mtime > STALE_PART_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened for fsync
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _mtime(info: dict) -> float | None:
    """fsspec backends name the modification time differently (mtime, LastModified, updated, created)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return value.timestamp()
    return None
