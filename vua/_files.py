"""File system primitives every other unit shares: safe opens of files others may replace, and durable writes."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

_IOV_MAX = 1024  # Linux's limit on buffers per writev call


class NotRegularFileError(OSError):
    """A path holds something else than a regular file (a directory, a FIFO, a device)."""


def open_regular_file(path: str) -> int:
    """Opens ``path`` read-only, never blocking, and only if it is a regular file.

    O_NONBLOCK keeps a FIFO in a file's place from blocking the open; the fstat turns away
    anything that is not a regular file. Used for every file VUA reads that someone else
    could have replaced: fragments, the index's CURRENT and data file.

    Raises:
        NotRegularFileError: something else stands at ``path``.
        OSError: the open or fstat failed (FileNotFoundError, PermissionError, EIO, ...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"not a regular file (mode {stat.filemode(mode)})", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, buffers: Sequence[memoryview]) -> None:
    """Writes every buffer, in order, retrying short writes."""
    pending = [b for b in buffers if len(b)]
    while pending:
        batch = pending[:_IOV_MAX]
        written = os.writev(fd, batch)
        consumed = 0
        for buf in batch:
            if written >= len(buf):
                written -= len(buf)
                consumed += 1
            else:
                pending[consumed] = buf[written:]
                break
        del pending[:consumed]


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
