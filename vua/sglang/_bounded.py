"""SGLang's page calls on a shared root, each under a deadline, never touching the host pool after it returns.

SGLang's controller threads wait for each storage call, and SGLang frees or unlocks a call's
host pages the moment it returns (a prefetch's pages past those loaded are released; a
backup's pages are unlocked, then evicted and reused). So a call that gives up at its deadline
must leave no thread of its own that could still write those pages (a late load) or read them
(a late save, which would store another page's bytes under this key). On a shared root,
where a file system can stop answering:

- a load reads into staging buffers of its own, and only the calling thread copies what
  verified into the pool, before it returns; a late read lands in the staging buffers alone;
- a save copies the pages out of the pool on the calling thread first, and writes from the
  copy: once the call has returned the write may go on, or hang, without touching the pool;
- a lookup is a bounded call; none of them runs while the store is unhealthy (missed at once).

The extra copy is what a deadline costs; local roots keep the zero-copy calls (their reads
come from the page cache or a local disk).
"""

from __future__ import annotations

import logging

import torch

from vua.core import VUA, KVDestination
from vua.integration import BoundedCalls, StoreHealth
from vua.sglang._pages import PageViews

logger = logging.getLogger(__name__)


class BoundedPages:
    """The zero-copy calls' bounded form (see the module docstring).

    Args:
        pages: the host pool's pages.
        health: the store's health.
        load_timeout, load_timeout_per_gib: a call's deadline: seconds, plus seconds per GiB it moves.
        lookup_timeout: ``batch_exists``'s deadline.
    """

    def __init__(
        self,
        pages: PageViews,
        health: StoreHealth,
        *,
        load_timeout: float,
        load_timeout_per_gib: float,
        lookup_timeout: float,
    ):
        self._pages = pages
        self._calls = BoundedCalls(health, name="vua-sglang")
        self._timeout = load_timeout
        self._per_gib = load_timeout_per_gib
        self._lookup_timeout = lookup_timeout

    def _deadline(self, pages: int) -> float:
        return self._timeout + self._per_gib * pages * self._pages.page_bytes / 2**30

    def exists(self, store: VUA, tokens: torch.Tensor) -> int:
        """Leading stored pages, or 0 past the deadline."""
        return self._calls.call(
            lambda: store.stored_groups(tokens), timeout=self._lookup_timeout, default=0, what="batch_exists"
        )

    def get(self, store: VUA, tokens: torch.Tensor, starts: list[int]) -> int:
        """Loads pages into the pool at ``starts`` through staging; the leading pages loaded (0 past the deadline)."""
        staging = self._pages.buffers(len(starts))

        def load() -> int:
            kv = store.load_groups(tokens, "cpu", into=_Staging(staging))
            return 0 if kv is None else kv.wait()

        loaded = self._calls.call(load, timeout=self._deadline(len(starts)), default=0, what="batch_get_v1")
        for page in range(loaded):  # on the calling thread: the pool is written before the call returns
            for layer, (k_stage, v_stage) in enumerate(staging):
                k, v = self._pages.layer(starts[page], layer)
                k.copy_(k_stage[page])
                v.copy_(v_stage[page])
        return loaded

    def put(self, store: VUA, tokens: torch.Tensor, starts: list[int]) -> int | None:
        """Stores the pages at ``starts`` from a copy made here; groups written, or None past the deadline."""
        copy = self._pages.gather(starts)  # on the calling thread: SGLang may reuse the pages once we return
        rows = list(range(len(starts)))
        return self._calls.call(
            lambda: store.put_groups(tokens, copy, rows=rows),
            timeout=self._deadline(len(starts)),
            default=None,
            what="batch_set_v1",
        )

    @property
    def timed_out(self) -> int:
        return self._calls.timed_out

    def close(self) -> None:
        self._calls.shutdown()


class _Staging(KVDestination):
    """A load's staging buffers as its destination: group ``i`` lands in row ``i`` of each layer's (K, V)."""

    def __init__(self, staging: list[tuple[torch.Tensor, torch.Tensor]]):
        self._staging = staging

    def chunks(self, group: int, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        k, v = self._staging[layer]
        return [(k[group], v[group])]
