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
    """Opens ``path`` read-only, never blocking, and only if it is a regular file, not a link to one.

    O_NONBLOCK keeps a FIFO in a file's place from blocking the open; the fstat turns away
    anything that is not a regular file. O_NOFOLLOW refuses a symbolic link (to a valid
    fragment elsewhere, say): VUA writes only regular files, so a link is not the store's
    own. Used for every file VUA reads that someone else could have replaced: fragments,
    the index's CURRENT and data file.

    Raises:
        NotRegularFileError: something else stands at ``path`` (a symbolic link included).
        OSError: the open or fstat failed (FileNotFoundError, PermissionError, EIO, ...).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "a symbolic link, not a file VUA wrote", path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"not a regular file (mode {stat.filemode(mode)})", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def age_seconds(path: str, now: float) -> float:
    """How long ago ``path`` was last modified, in seconds; a date in the future counts as that far past.

    A clock is skewed by seconds, not years: a temporary dated ahead (copied, touched, a
    node's clock far off) must still outlive its grace period once, not every one.

    Raises:
        OSError: the path cannot be statted (FileNotFoundError: removed meanwhile).
    """
    return abs(now - os.stat(path).st_mtime)


def write_all(fd: int, buffers: Sequence[memoryview]) -> None:
    """Writes every buffer, in order, retrying short writes."""
    pending = [b for b in buffers if len(b)]
    while pending:
        _consume(pending, os.writev(fd, pending[:_IOV_MAX]))


def _consume(pending: list[memoryview], done: int) -> None:
    """Drops the first ``done`` bytes from the front of ``pending`` (whole buffers, then part of one)."""
    consumed = 0
    for buf in pending:
        if done < len(buf):
            pending[consumed] = buf[done:]
            break
        done -= len(buf)
        consumed += 1
    del pending[:consumed]


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    """Fills ``buffers``, in order, from ``fd`` at ``offset`` with ``preadv``, retrying short reads.

    The kernel copies straight into the buffers; an unlink, a stale handle or an I/O error
    on a network file system comes back as an OSError (a memory map would take a signal).

    Returns:
        The bytes read: less than the buffers hold only where the file ended.
    """
    pending = [b for b in buffers if len(b)]
    total = 0
    while pending:
        got = os.preadv(fd, pending[:_IOV_MAX], offset + total)
        if got == 0:
            break
        total += got
        _consume(pending, got)
    return total


# File system types whose pages can vanish under a memory map (another client unlinks or
# replaces the file, the server goes away), so a page fault there is SIGBUS, not an error.
_NETWORK_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "9p",
        "afs",
        "ocfs2",
        "gfs2",
        "panfs",
        "wekafs",
        "orangefs",
        "pvfs2",
    }
)


def file_system_type(path: str) -> str:
    """The type of the file system ``path`` is on, as /proc/self/mounts names it ("" where unknown)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def is_network_file_system(kind: str) -> bool:
    """Whether a file system type is a network or FUSE one (see :func:`file_system_type`)."""
    return kind in _NETWORK_TYPES or kind.split(".")[0] == "fuse"
