"""GPUDirect Storage reads (``torch.cuda.gds``): file bytes straight into GPU memory.

Optional (``VUAConfig(gds=True)``) and off by default. Where the platform cannot do it
(torch built without cuFile, no driver, a file system that refuses ``O_DIRECT``), the first
failure is logged once and this process goes back to the pinned staging path for good.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT reads start and end on block boundaries

_lock = threading.Lock()
_disabled_reason: str | None = None


def usable() -> bool:
    """Whether this process may try GDS reads: torch has cuFile, and no read has failed yet."""
    if _disabled_reason is not None:
        return False
    gds = getattr(torch.cuda, "gds", None)
    available = getattr(gds, "is_available", None)
    return bool(available and available())


def disable(reason: str) -> None:
    """Stops GDS reads in this process, with one warning."""
    global _disabled_reason
    with _lock:
        if _disabled_reason is None:
            _disabled_reason = reason
            logger.warning("GPUDirect Storage reads are off in this process (%s); using pinned staging", reason)


def aligned_span(begin: int, end: int) -> tuple[int, int]:
    """The smallest ``ALIGN``-aligned file range holding ``[begin, end)``: (start, length)."""
    start = begin - begin % ALIGN
    stop = -(-end // ALIGN) * ALIGN
    return start, stop - start


def read_into(path: str, dest: torch.Tensor, offset: int) -> None:
    """Reads ``dest.nbytes`` bytes of ``path`` at ``offset`` into ``dest``, a whole CUDA storage.

    Synchronous, and outside any stream's order: ``dest`` must not be in use by queued work.
    Bytes past the end of the file are left as they were.

    Raises:
        OSError: the file cannot be opened for direct I/O.
        RuntimeError: cuFile refused the read.
    """
    file = torch.cuda.gds.GdsFile(path, os.O_RDONLY)
    try:
        file.load_storage(dest.untyped_storage(), offset)  # type: ignore[arg-type]  # torch's stub names TypedStorage; it takes either
    finally:
        file.deregister_handle()  # now, not at garbage collection; the descriptor closes with the object
