"""Host memory for the read path: recycled output blocks, and pinned staging for CUDA.

Two costs dominate a large read besides the copy itself: first-touch page faults on fresh
output memory (the kernel zeroes every page before the copy overwrites it), and, on the
way to a GPU, pageable memory, which CUDA must bounce through its own pinned buffer. The
pool and the staging buffers here remove both (see the README's design notes for the
figures, and why huge pages are not used instead).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from vua._read._platform import CudaPlatform

logger = logging.getLogger(__name__)


class HostBlockPool:
    """Recycles the host memory of results the caller has dropped.

    A CPU read returns all its layers as views of one block. The pool remembers the block
    and a weak reference to the numpy view the result's tensors were made from; once the
    caller drops every tensor of that result, the view dies and the block is free for the
    next read, without the kernel zeroing and faulting in fresh pages again (two to five
    times faster for large reads). At most ``max_free_bytes`` of free blocks are kept.
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
                block = np.empty(nbytes, dtype=np.uint8)
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

    def __init__(self, platform: CudaPlatform, slot_bytes: int):
        self.platform = platform
        self.slot_bytes = slot_bytes
        self.stream = platform.new_stream()
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
            slot = self.platform.pinned(size)
            self._slots[i] = slot
        return i, slot

    def release(self, i: int, event: torch.cuda.Event) -> None:
        """Marks slot ``i`` busy until ``event`` (its host-to-device copy) completes."""
        self._events[i] = event
