"""Host memory for the read path: huge-page output buffers and pinned staging for CUDA.

Two costs dominate a large read besides the copy itself: first-touch page faults on fresh
output memory (one per 4 KiB page), and, on the way to a GPU, pageable memory, which CUDA
must bounce through its own pinned buffer. The helpers here remove both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import weakref

import numpy as np
import torch

logger = logging.getLogger(__name__)

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
_HUGE_PAGE_MIN_BYTES = 8 << 20

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux/glibc: plain pages, same results
    _madvise = None


def empty_host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` on the CPU, backed by transparent huge pages where the kernel allows.

    A 2 MiB page costs one fault instead of 512, which is a third of a large read's time
    when the system's THP mode is ``madvise`` (the common default).
    """
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if _madvise is not None and nbytes >= _HUGE_PAGE_MIN_BYTES:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # advisory: failure changes nothing
    return out


class HostBlockPool:
    """Recycles the host memory of results the caller has dropped.

    A CPU read returns all its layers as views of one block. The pool remembers the block
    and a weak reference to the numpy view the result's tensors were made from; once the
    caller drops every tensor of that result, the view dies and the block is free for the
    next read, without the kernel zeroing and faulting in fresh pages again (a third of a
    large read's time). At most ``max_free_bytes`` of free blocks are kept.
    """

    def __init__(self, max_free_bytes: int):
        self.max_free_bytes = max_free_bytes
        self._lock = threading.Lock()
        self._blocks: list[tuple[np.ndarray, weakref.ref | None]] = []  # (block, view in use)

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` backed by a recycled or new block."""
        with self._lock:
            best = None
            for i, (block, user) in enumerate(self._blocks):
                if (user is None or user() is None) and nbytes <= block.nbytes <= 2 * nbytes:
                    if best is None or block.nbytes < self._blocks[best][0].nbytes:
                        best = i
            if best is not None:
                block = self._blocks[best][0]
            else:
                block = empty_host((nbytes,), torch.uint8).numpy()
            view = block[:nbytes]
            entry = (block, weakref.ref(view))
            if best is not None:
                self._blocks[best] = entry
            else:
                self._blocks.append(entry)
            self._trim()
            return view

    def _trim(self) -> None:
        free = [(i, b.nbytes) for i, (b, user) in enumerate(self._blocks) if user is None or user() is None]
        total = sum(n for _, n in free)
        for i, n in sorted(free, key=lambda item: item[1]):  # drop the smallest first
            if total <= self.max_free_bytes:
                break
            self._blocks[i] = None  # type: ignore[call-overload]
            total -= n
        self._blocks = [entry for entry in self._blocks if entry is not None]


class PinnedStaging:
    """Two pinned host buffers, used alternately, and a side stream for host-to-device copies.

    While the GPU copies one buffer to the device, the host fills the other (double
    buffering). The buffers are allocated once, at the largest size asked for, and reused
    by every later load: pinned memory does not grow with the number of reads. One load
    uses the staging at a time (``lock``).
    """

    def __init__(self, device: torch.device, slot_bytes: int):
        self.device = device
        self.slot_bytes = slot_bytes
        self.stream = torch.cuda.Stream(device)
        self.lock = threading.Lock()
        self._slots: list[torch.Tensor | None] = [None, None]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._next = 0

    def acquire(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """Returns a free slot of at least ``nbytes``, waiting for its previous copy to finish."""
        i = self._next
        self._next ^= 1
        event = self._events[i]
        if event is not None:
            event.synchronize()
            self._events[i] = None
        slot = self._slots[i]
        if slot is None or slot.numel() < nbytes:
            size = max(nbytes, self.slot_bytes)
            logger.debug("allocating a %d-byte pinned staging buffer", size)
            self._slots[i] = slot = None  # free the old one before taking more pinned memory
            slot = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._slots[i] = slot
        return i, slot

    def release(self, i: int, event: torch.cuda.Event) -> None:
        """Marks slot ``i`` busy until ``event`` (its host-to-device copy) completes."""
        self._events[i] = event
