"""A fragment file opened for reading: how its bytes are reached, not what they mean.

Two ways in, one class: a read-only shared memory map (local file systems: tensors become
zero-copy views, pages fault in as a copy touches them), or ``preadv`` on a descriptor held
open (network and FUSE file systems, where a page fault on a file another node removed is
SIGBUS, not an error). Either way the file is opened as a regular file only, never
following a link or blocking on a FIFO. What the bytes say (header, tensors, checksums,
MAC) is :class:`vua._fragment.Fragment`'s part, built on this one.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from functools import cached_property
from typing import TypeVar

import numpy as np

from vua._files import NotRegularFileError, open_regular_file, read_all
from vua._header import MAX_HEADER_BYTES
from vua.errors import FragmentError, FragmentState

_FIRST_READ = 64 << 10  # pread mode: one read takes a typical header and the tokens

_Self = TypeVar("_Self", bound="FragmentFile")


def open_regular(path: str) -> int:
    """Opens a fragment for reading (see :func:`open_regular_file`).

    Raises:
        FragmentError: DAMAGED when something else than a regular file stands there; MISSING
            when nothing does (the catalog decides whether that is damage); UNREADABLE for
            errors that may pass (EIO, ESTALE, EACCES), so the group stays.
    """
    try:
        return open_regular_file(path)
    except FileNotFoundError:
        raise FragmentError(f"cannot open fragment {path}: no such file", state=FragmentState.MISSING) from None
    except OSError as exc:
        something_else = (IsADirectoryError, NotADirectoryError, NotRegularFileError)
        state = FragmentState.DAMAGED if isinstance(exc, something_else) else FragmentState.UNREADABLE
        raise FragmentError(f"cannot open fragment {path}: {exc.strerror}", state=state) from None


def _close_quietly(fd: int) -> None:
    """Closes a descriptor opened for reading. A FUSE file system reports errors at close too
    (GlusterFS: ENOENT once another node removed the file); the read itself decided already."""
    try:
        os.close(fd)
    except OSError:
        pass


class FragmentFile:
    """A fragment file open for reading: memory-mapped, or (``mapped=False``) read with pread.

    Use as a context manager. Views of its bytes must be dropped before it closes.

    Raises:
        FragmentError: see :func:`open_regular`; also a file too short for a header's length,
            or a mapping the file system refuses (UNREADABLE).
    """

    def __init__(self, path: str, *, mapped: bool = True):
        self.path = path
        self._map: mmap.mmap | None = None
        self._head = b""  # pread mode: the header and the tokens, read once (see _keep_with_header)
        # Without a mapping the descriptor stays open, so every later read sees this file
        # even if another node replaces it; close() releases whichever this file holds.
        self._fd: int | None = open_regular(path)
        try:
            status = os.fstat(self._fd)
            self.file_size = status.st_size
            self._identity = (status.st_dev, status.st_ino)  # a file opened again must be this one
            if self.file_size < 8:
                raise FragmentError(f"fragment {path} is truncated ({self.file_size} bytes)")
            if mapped:
                # Read-only and shared: the pages are the page cache's own, nothing is copied.
                # Pages are mapped as the copy touches them; prefetch() starts disk reads early.
                try:
                    self._map = mmap.mmap(self._fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                except (OSError, ValueError) as exc:
                    # The file system's refusal, not the file's bytes.
                    raise FragmentError(f"cannot map fragment {path}: {exc}", state=FragmentState.UNREADABLE) from None
                # A get may hold hundreds of fragments: the mapping needs no descriptor.
                fd, self._fd = self._fd, None
                _close_quietly(fd)
        except BaseException:
            self.close()
            raise

    def _header_bytes(self) -> bytes | mmap.mmap:
        """Bytes from the file's start that hold its header (8-byte length, then the JSON).

        The mapping itself; in pread mode one read that takes a typical header, and a second
        where the length asks for more (up to the file's size and the header cap).
        """
        if self._map is not None:
            return self._map
        head = self._pread(0, min(self.file_size, _FIRST_READ))
        if len(head) < 8:
            raise FragmentError(f"fragment {self.path} is truncated ({len(head)} bytes read)")
        (header_len,) = struct.unpack_from("<Q", head, 0)
        if len(head) < 8 + header_len <= min(self.file_size, 8 + MAX_HEADER_BYTES):
            head += self._pread(len(head), 8 + header_len - len(head))
        self._head = head
        return head

    def _keep_with_header(self, end: int) -> None:
        """pread mode: keeps the file's bytes up to ``end`` in memory with the header's, where
        that is at most one more first read past them (the tokens, which validation reads)."""
        head = self._head
        if end > len(head) + _FIRST_READ:
            end = len(head)
        self._head = bytes(head) + self._pread(len(head), max(0, end - len(head)))

    def _pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the open file (pread mode); fewer only where the file ended."""
        assert self._fd is not None
        buffer = bytearray(length)
        got = self._read_at(self._fd, [memoryview(buffer)], offset)
        return bytes(buffer[:got])

    def _read_at(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        """:func:`read_all` with its errors as this fragment's: an I/O error or a stale handle is not the file's bytes."""
        try:
            return read_all(fd, buffers, offset)
        except OSError as exc:
            raise FragmentError(
                f"reading fragment {self.path} failed: {exc.strerror or exc}", state=FragmentState.UNREADABLE
            ) from None

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.__dict__.pop("region", None)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _close_quietly(fd)
        try:
            if self._map is not None:
                self._map.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes when the last one does

    @property
    def mapped(self) -> bool:
        """Whether the file is memory-mapped (else read with pread: network and FUSE file systems)."""
        return self._map is not None

    def prefetch(self) -> None:
        """Asks the kernel to start reading the whole file in the background (cold reads)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_WILLNEED)
        elif self._fd is not None:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_WILLNEED)

    def _open_again(self) -> int:
        """A descriptor of this same file (a mapped one keeps none).

        Raises:
            FragmentError: UNREADABLE when the path now names another file (the group was
                moved aside and written again since it was opened: its header is not this
                file's); see :func:`open_regular` for the rest.
        """
        fd = open_regular(self.path)
        status = os.fstat(fd)
        if (status.st_dev, status.st_ino) != self._identity:
            _close_quietly(fd)
            raise FragmentError(
                f"fragment {self.path} was replaced since it was opened", state=FragmentState.UNREADABLE
            )
        return fd

    @contextlib.contextmanager
    def held_open(self) -> Iterator[None]:
        """Holds a descriptor for a run of :meth:`read_into` calls (a mapped file keeps none).

        Raises:
            FragmentError: the file cannot be opened again (see :meth:`_open_again`).
        """
        if self._fd is not None:
            yield
            return
        self._fd = self._open_again()
        try:
            yield
        finally:
            fd, self._fd = self._fd, None
            if fd is not None:
                _close_quietly(fd)

    def read_into(self, buffers: list[memoryview], offset: int) -> None:
        """Fills ``buffers``, in order, with the file's bytes from ``offset`` on (one ``preadv`` where it can).

        Raises:
            FragmentError: the file is shorter than its header says (DAMAGED), or the read
                failed (an I/O error or a vanished file on a network file system: UNREADABLE).
        """
        fd = self._fd if self._fd is not None else self._open_again()
        try:
            got = self._read_at(fd, buffers, offset)
        finally:
            if fd != self._fd:
                _close_quietly(fd)
        if got < sum(len(b) for b in buffers):
            raise FragmentError(f"fragment {self.path} ended early while reading its data")

    @cached_property
    def region(self) -> np.ndarray:
        """The whole file as read-only uint8 numpy: zero-copy when mapped, else read into memory once."""
        if self._map is not None:
            return np.frombuffer(self._map, dtype=np.uint8)
        whole = np.empty(self.file_size, dtype=np.uint8)
        self.read_into([memoryview(whole)], 0)
        whole.flags.writeable = False
        return whole

    def span(self, begin: int, end: int) -> memoryview:
        """The file's bytes ``[begin, end)``: zero-copy when mapped; in pread mode from the bytes
        kept with the header where they lie there, else from :attr:`region`."""
        if self._map is not None:
            return memoryview(self._map)[begin:end]
        if end <= len(self._head):
            return memoryview(self._head)[begin:end]
        return memoryview(self.region)[begin:end]
