"""Storing a batch of an MLA host pool's pages in parts, through two reused buffers.

MHA pages are written straight from the pool (``VUA.put_groups``). An MLA page's K and V
are the halves of each token's latent vector, not runs in the pool, so its pages are
gathered into ``(heads, page, dim)`` runs (one copy) before they are written. A batch is
put in parts of about ``PART_BYTES``, each gathered into one of two buffers while the part
before it is being written: the copy hides behind the writes and fsyncs, and no call pays
for fresh memory the size of its batch (a page fault per 4 KiB on first touch).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from vua.core import VUA
from vua.sglang._pages import PageViews

PART_BYTES = 64 << 20
_MAX_PART_PAGES = 128  # SGLang's controller sends at most 128 pages a call


class PagePutter:
    """Puts pages of one host pool into one store, a part at a time; one caller at a time."""

    def __init__(self, store: VUA, pages: PageViews):
        self._store = store
        self._pages = pages
        self._per_part = max(1, min(PART_BYTES // max(1, pages.page_bytes), _MAX_PART_PAGES))
        self._buffers: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None  # made on first use
        self._writer: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # the buffers are one caller's at a time

    def put(self, tokens: torch.Tensor, starts: list[int]) -> int:
        """Puts the pages at host token ``starts`` under ``tokens`` (one row per page); returns the groups written.

        Raises:
            VUAError: what the store's put raises; parts already put stay stored.
        """
        with self._lock:
            if self._buffers is None:
                self._buffers = [self._pages.buffers(self._per_part), self._pages.buffers(self._per_part)]
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-sglang-put")
            assert self._writer is not None
            written, pending = 0, None
            try:
                for i, lo in enumerate(range(0, len(starts), self._per_part)):
                    data = self._pages.gather(starts[lo : lo + self._per_part], into=self._buffers[i % 2])
                    if pending is not None:
                        written += pending.result()  # its buffer is the next part's
                    pending = self._writer.submit(self._store.put, tokens[lo : lo + self._per_part], data)
                if pending is not None:
                    written += pending.result()
                    pending = None
            finally:
                if pending is not None:  # a gather failed: the part being written ends first
                    pending.exception()
            return written

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown()
        self._writer, self._buffers = None, None
