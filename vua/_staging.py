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
