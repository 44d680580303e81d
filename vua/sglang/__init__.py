"""VUA as SGLang's HiCache storage tier: verified, durable pages that many nodes share.

SGLang loads it through its ``dynamic`` storage backend::

    python -m sglang.launch_server ... --enable-hierarchical-cache --page-size 64 \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "vua", "module_path": "vua.sglang",
            "class_name": "VUAStorage", "interface_v1": 1, "root": "/mnt/kv"}'

Each SGLang page is one VUA group of ``page_size`` tokens. SGLang hands a storage backend
no token ids, only each page's key (SHA-256 chained over the page's tokens and every page
before it), so the group stores the key where a prompt's group stores its tokens: the
key's 32 bytes as four int64 "tokens", then zeros. Everything VUA checks for a prompt's
group holds for a page: the group's name is the xxh3-128 chain over those bytes, a read
compares the stored key with the one asked for and every tensor with its checksum (and the
MAC with ``auth_key_file``), and a page that fails ends the run of pages there, never an
exception into SGLang's controller. What cannot be checked is what SGLang's key stands for:
``vua verify`` re-derives a group's name from its stored key, not the key from tokens.

Pages live in a namespace per model and tensor-parallel rank (``sglang/<model>/tp<r>of<n>``;
MLA's replicated latent cache: ``sglang/<model>/mla``, written by rank 0 alone), so ranks
and models never read each other's pages. MHA pages are stored in the host pool's own byte
order (see ``PageViews``), one namespace per order: ``page_first`` pools share pages with
each other, ``layer_first`` and ``page_first_direct`` pools with each other. MLA pages load
into any of the three layouts.

The zero-copy calls (``interface_v1``) move each page straight between the host pool and
the file, a call's pages at once: ``batch_get_v1`` is one ``VUA.load_groups`` into the
pool's own page views, ``batch_set_v1`` one ``VUA.put_groups`` from the pool (MLA pages
are gathered first), ``batch_exists`` one ``VUA.stored_groups``. Without ``interface_v1``
SGLang uses the per-page calls with flat pages, which are stored as such in a namespace of
their own.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo
from sglang.srt.observability.metrics_collector import StorageMetrics

from vua.core import VUA, KVDestination, StoreStats, VUAConfig
from vua.errors import InvalidInputError, VUAError
from vua.integration import StoreHealth, read_secret_file
from vua.sglang._bounded import BoundedPages
from vua.sglang._flat import FlatPages
from vua.sglang._pages import KEY_TOKENS, PageViews, page_tokens
from vua.sglang._parts import PagePutter

__all__ = ["VUAStorage", "VUAStorageMetrics"]

logger = logging.getLogger(__name__)

# extra_config keys: SGLang's own (the dynamic factory reads them), then VUA's.
_SGLANG_KEYS = {"backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size"}
_VUA_KEYS = {"root", "index_path", "namespace", "auth_key_file", "io_threads", "create_parents", "bounded_io"}
# Deadlines of the bounded calls (seconds) and how long a store past one is skipped.
_SECONDS = {"load_timeout": 2.0, "load_timeout_per_gib": 2.0, "lookup_timeout": 0.5, "unhealthy_seconds": 30.0}
_VUA_KEYS |= set(_SECONDS)


@dataclass
class VUAStorageMetrics(StorageMetrics):
    """SGLang's storage metrics (pages and bandwidth per call since the last report) and VUA's counters.

    ``calls_timed_out``, ``calls_skipped`` and ``unhealthy_periods`` count, since the backend
    started, bounded calls answered as misses at their deadline, calls skipped while the store
    was unhealthy, and the periods it was.
    """

    vua: StoreStats | None = field(default=None)
    calls_timed_out: int = 0
    calls_skipped: int = 0
    unhealthy_periods: int = 0


class VUAStorage(HiCacheStorage):
    """A HiCache storage backend on a VUA store (see the module docstring).

    Args:
        storage_config: SGLang's; ``extra_config`` holds the keys below besides SGLang's own.
        kwargs: what SGLang's factory passes besides (an empty dict today); unused.

    extra_config keys:
        root: the store's root, a local or shared (network, FUSE) directory. Required.
        index_path: this node's index (on local disk where ``root`` is shared by many nodes).
        namespace: names the model in the pages' namespace (default: SGLang's model_name).
        auth_key_file: a file holding the store's secret (``VUAConfig.auth_key``).
        io_threads: VUA's copy threads.
        create_parents: create a missing parent of ``root`` (default: refuse, a typo).
        bounded_io: every zero-copy call under a deadline, through copies of VUA's own
            (``_bounded``); default: on shared (network, FUSE) roots only.
        load_timeout, load_timeout_per_gib: a bounded load's or save's deadline, 2 s plus 2 s per GiB.
        lookup_timeout: a bounded ``batch_exists``'s deadline, 0.5 s.
        unhealthy_seconds: how long a store past a deadline is skipped (calls miss at once), 30 s.

    Raises:
        InvalidInputError: an unknown or malformed key (the message names it).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None):
        extra = dict(storage_config.extra_config or {})
        unknown = sorted(set(extra) - _SGLANG_KEYS - _VUA_KEYS)
        if unknown:
            raise InvalidInputError(f"VUAStorage: unknown extra_config keys {unknown}; VUA's are {sorted(_VUA_KEYS)}")
        if not isinstance(extra.get("root"), str) or not extra["root"]:
            raise InvalidInputError(
                'VUAStorage: extra_config needs "root": the directory VUA keeps its pages in '
                '(e.g. {"root": "/mnt/kv", ...})'
            )
        self.storage_config = storage_config
        self._extra = extra
        self._zero_copy = bool(extra.get("interface_v1"))
        self._writer = storage_config.is_storage_writer if hasattr(storage_config, "is_storage_writer") else True
        self._auth_key = (
            read_secret_file(extra["auth_key_file"], "VUAStorage's auth_key_file")
            if extra.get("auth_key_file")
            else None
        )
        self._seconds = {name: _seconds(extra, name, default) for name, default in _SECONDS.items()}
        if extra.get("bounded_io") not in (None, True, False):
            raise InvalidInputError(
                f"VUAStorage: bounded_io must be true, false or absent, got {extra['bounded_io']!r}"
            )
        self.health = StoreHealth(extra["root"], cooldown=self._seconds["unhealthy_seconds"])
        self._bounded: BoundedPages | None = None  # on shared roots (bounded_io), once the pool is registered
        self.mem_pool_host: Any = None
        self._pages: PageViews | None = None
        self._pool: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._store: VUA | None = None  # opened once the host pool says the page size
        self._putter: PagePutter | None = None
        self._flat = FlatPages(
            lambda: self._open(self._namespace("flat")),
            self._page_size,
            lambda: self.mem_pool_host.get_dummy_flat_data_page(),
        )
        self._metrics = VUAStorageMetrics()

    # -- set-up ---------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Takes the host pool: its page size makes VUA's split_factor, its layout the page views."""
        super().register_mem_pool_host(mem_pool_host)
        self._pages = PageViews(mem_pool_host)
        self._store = self._open(self._namespace(self._pages.kind))
        self._pool = self._pages.pool()  # MHA: pages are written straight from the pool
        self._putter = PagePutter(self._store, self._pages) if self._pool is None else None
        bounded = self._extra.get("bounded_io")
        if bounded or (bounded is None and self._store.network_fs):
            seconds = self._seconds
            self._bounded = BoundedPages(
                self._pages,
                self.health,
                load_timeout=seconds["load_timeout"],
                load_timeout_per_gib=seconds["load_timeout_per_gib"],
                lookup_timeout=seconds["lookup_timeout"],
            )

    def _namespace(self, kind: str) -> str:
        config = self.storage_config
        model = str(self._extra.get("namespace") or config.model_name or "model")
        if config.is_mla_model:
            part = f"sglang/{model}/mla"  # the latent cache is the same on every rank
        else:
            part = f"sglang/{model}/tp{config.tp_rank}of{config.tp_size}"
        if getattr(config, "pp_size", 1) > 1:
            part += f"/pp{config.pp_rank}of{config.pp_size}"
        return f"{part}/{kind}"

    def _open(self, namespace: str) -> VUA:
        page = self._page_size()
        if page < KEY_TOKENS:
            raise InvalidInputError(
                f"VUAStorage needs SGLang pages of at least {KEY_TOKENS} tokens (a page's key fills "
                f"{KEY_TOKENS}), got --page-size {page}; pass --page-size 16 or more"
            )
        config = VUAConfig(
            split_factor=page,
            namespace=namespace,
            index_path=self._extra.get("index_path"),
            auth_key=self._auth_key,
        )
        if "io_threads" in self._extra:
            config = dataclasses.replace(config, io_threads=self._extra["io_threads"])  # checked when the store opens
        return VUA(config, self._extra["root"], create_parents=bool(self._extra.get("create_parents")))

    def _page_size(self) -> int:
        if self.mem_pool_host is None:
            raise InvalidInputError("VUAStorage: SGLang has not registered its host pool yet")
        return int(self.mem_pool_host.page_size)

    # -- the zero-copy calls (interface_v1) ---------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading ``keys`` are stored (one index transaction; on a shared root, the tree too)."""
        store = self._store_for_exists()
        if not keys:
            return 0
        page = self._page_size()
        try:
            if self._bounded is not None and self._zero_copy:
                return self._bounded.exists(store, page_tokens(keys, page))
            return store.stored_groups(page_tokens(keys, page))
        except VUAError as exc:
            logger.warning("VUAStorage: %d pages cannot be looked up: %s", len(keys), exc)
            return 0

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Loads pages into the host pool at ``host_indices``, each verified before it counts; stops at the first miss.

        One load takes the call's pages (one index transaction, every copy thread at work).
        """
        assert self._store is not None and self._pages is not None
        if not keys:
            return []
        started = time.perf_counter()
        page = self._page_size()
        done = 0
        try:
            tokens = page_tokens(keys, page)
            starts = [int(host_indices[i * page]) for i in range(len(keys))]
            if self._bounded is not None:
                done = self._bounded.get(self._store, tokens, starts)
            else:
                load = self._store.load_groups(tokens, "cpu", into=_PageDestination(self._pages, starts))
                done = 0 if load is None else load.wait()
        except VUAError as exc:  # a malformed key, a store that refuses: a miss, not an error in SGLang
            logger.warning("VUAStorage: %d pages not loaded: %s", len(keys), exc)
        self._record(self._metrics.prefetch_pgs, self._metrics.prefetch_bandwidth, done, started)
        return [True] * done + [False] * (len(keys) - done)

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Stores the pages at ``host_indices`` under ``keys``, durably; pages already stored are skipped."""
        assert self._store is not None, "register_mem_pool_host comes first"
        if not keys:
            return []
        if not self._writer:
            return [True] * len(keys)  # MLA: rank 0 writes the pages every rank shares
        started = time.perf_counter()
        page = self._page_size()
        try:
            tokens = page_tokens(keys, page)
            starts = [int(host_indices[i * page]) for i in range(len(keys))]
            if self._bounded is not None:
                bounded = self._bounded.put(self._store, tokens, starts)
                if bounded is None:  # past its deadline (the write goes on from its own copy)
                    return [False] * len(keys)
                written = bounded
            elif self._pool is not None:
                written = self._store.put_groups(tokens, self._pool, rows=[start // page for start in starts])
            else:
                assert self._putter is not None
                written = self._putter.put(tokens, starts)
        except VUAError as exc:  # ENOSPC, a refused write: SGLang keeps the pages in host memory
            logger.warning("VUAStorage: storing %d pages failed: %s", len(keys), exc)
            stored = self.batch_exists(keys)  # what did get published is whole and stays
            return [i < stored for i in range(len(keys))]
        self._record(self._metrics.backup_pgs, self._metrics.backup_bandwidth, written, started)
        return [True] * len(keys)

    # -- the per-page calls with flat pages (without interface_v1) ------------------------------

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None) -> torch.Tensor | None:
        """One flat page (as the host pool's ``get_data_page(flat=True)`` gives it), into ``target_location`` if given."""
        return self._flat.get(key, target_location)

    def batch_get(
        self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None
    ) -> list[torch.Tensor | None]:
        return self._flat.batch_get(keys, target_locations)

    def set(
        self, key: str, value: Any | None = None, target_location: Any | None = None, target_sizes: Any | None = None
    ) -> bool:
        """Stores one flat page ``value``, durably."""
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Stores flat pages; True when every one is stored (those that were stay whole either way)."""
        if not keys or not self._writer:
            return True  # (MLA: rank 0 writes the pages every rank shares)
        return self._flat.batch_set(keys, values)

    # -- upkeep -------------------------------------------------------------------------------

    def get_stats(self) -> VUAStorageMetrics:
        """Pages and bandwidth per call since the last call (SGLang's metrics), with the store's counters."""
        metrics, self._metrics = self._metrics, VUAStorageMetrics()
        if self._store is not None:
            metrics.vua = self._store.stats()
        metrics.calls_timed_out = 0 if self._bounded is None else self._bounded.timed_out
        metrics.calls_skipped, metrics.unhealthy_periods = self.health.skipped, self.health.periods
        return metrics

    def clear(self) -> None:
        """Leaves the pages: they may be other nodes' too. Capacity is ``vua gc ROOT --max-bytes N``."""
        logger.info("VUAStorage.clear: the store is shared and kept; run `vua gc` to bound or empty it")

    def close(self) -> None:
        if self._bounded is not None:
            self._bounded.close()
        if self._putter is not None:
            self._putter.close()
        if self._store is not None:
            self._store.close()
        self._flat.close()
        self._putter, self._store = None, None

    # -- helpers ---------------------------------------------------------------------------------

    def _store_for_exists(self) -> VUA:
        if self._zero_copy:
            assert self._store is not None, "register_mem_pool_host comes first"
            return self._store
        return self._flat.store

    @staticmethod
    def _record(pages: list[int], bandwidth: list[float], n: int, started: float) -> None:
        if n:
            pages.append(n)
            bandwidth.append(n / max(time.perf_counter() - started, 1e-9))


def _seconds(extra: dict[str, Any], name: str, default: float) -> float:
    value = extra.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidInputError(f"VUAStorage: extra_config {name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


class _PageDestination(KVDestination):
    """Pages of the host pool as the destination of a load of one-group prompts: group ``i`` is the page at ``starts[i]``."""

    def __init__(self, pages: PageViews, starts: list[int]):
        self._pages = pages
        self._starts = starts

    def chunks(self, group: int, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._pages.layer(self._starts[group], layer)]

    def whole_group(self, group: int) -> torch.Tensor | None:
        return self._pages.whole(self._starts[group])
