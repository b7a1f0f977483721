"""An exclusive lock on a file's companion ``<file>.lock``, held while a process uses the file.

The journal and the batch store are SQLite files that one coordinator owns: a second coordinator
opening the same file would recover and serve the same requests again. SQLite's own locks only
order single transactions. The lock is ``flock``: the kernel releases it when the process ends,
however it ends, so a crashed coordinator leaves nothing to clean up. The lock is the real file's
(symlinks resolved); a hard link to the file is another name SQLite would keep another ``-wal``
for, and is not caught.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the coordinator is deployed on Linux)
    fcntl = None  # type: ignore[assignment]


class FileInUse(Exception):
    """Another process holds the file (its pid in the message when it wrote one)."""


class FolderNotWritable(Exception):
    """The file's folder does not take the lock file (read-only, or no permission): SQLite could not
    write its ``-wal`` file there either."""


def lock_file(path: Path, what: str) -> int | None:
    """Hold the lock of ``path`` (``what`` names it in the error); the descriptor to pass to
    :func:`unlock_file`. Raises :class:`FileInUse` or :class:`FolderNotWritable`."""
    if fcntl is None:
        return None
    real = path.resolve()  # a symlink to the file (or to its folder) names the same lock
    lock_path = real.with_name(real.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise FolderNotWritable(
            f"cannot write in the folder of {what} {path} ({exc.strerror or exc}): {what}, its lock "
            "and SQLite's -wal file live there; give it a writable path"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise FileInUse(f"{what} {path} is in use by another process{by}: one coordinator per file") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def unlock_file(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock
