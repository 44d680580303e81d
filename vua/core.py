"""VUA's store: ``put`` the KV cache of token prefixes, ``get_closest`` the longest stored one.

    from vua.core import VUA, VUAConfig

    vua = VUA(VUAConfig(split_factor=256, namespace="llama-3.1-8b/bf16"), "/mnt/kv")
    vua.put(tokens, past_key_values)               # tokens [n] / [1, n] / [B, n]
    hit = vua.get_closest(prompt, device="cuda")   # ClosestKV(tokens, data) or None

This module validates input and orchestrates; the units below it do the work. A get goes
keys (``_keys``) -> catalog (``_catalog``: index, tree, fragments) -> copy (``_read``) ->
result; a put goes keys -> catalog (what is stored) -> writer (``_writer``, ``_publish``)
-> catalog (record) -> eviction (``_evict``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple, overload

import numpy as np
import torch

from vua import _evict, _layout
from vua._catalog import Catalog
from vua._config import VUAConfig, check_config
from vua._index import Index
from vua._inputs import (
    KVData,
    LayeredCache,
    checked_destination,
    checked_device,
    checked_offset,
    checked_put,
    checked_word_sums,
    int64_ids,
    single_row,
)
from vua._keys import first_group_keys, group_keys, namespace_seed
from vua._mac import mac_key
from vua._misses import MissReasons
from vua._read import (
    CudaPlatform,
    HostBlockPool,
    KVDestination,
    KVLoad,
    PinnedStaging,
    checks_macs_in_copy,
    start_load,
)
from vua._root import is_network_root, open_root, write_failure_advice
from vua._stats import StatsRecorder, StoreStats
from vua._writer import GroupSource, GroupToWrite, heads_are_runs, write_groups
from vua.errors import InvalidInputError, SplitFactorError, StorageError, VUAError

if TYPE_CHECKING:
    from vua._fragment import Fragment
    from vua._kv_layout import Layout

__all__ = ["VUA", "VUAConfig", "ClosestKV", "KVDestination", "KVLoad", "StoreStats", "SplitFactorError", "VUAError"]

logger = logging.getLogger(__name__)


class ClosestKV(NamedTuple):
    """The longest stored prefix of a query.

    Attributes:
        tokens: the query's tokens cut to the prefix, with the query's rank.
        data: per layer, ``(key, value)`` shaped ``(1, kv_heads, len(prefix), head_dim)``,
            on the device asked for.
    """

    tokens: torch.Tensor
    data: list[tuple[torch.Tensor, torch.Tensor]]


class VUA:
    """A KV-cache store rooted at a directory.

    Args:
        config: a :class:`VUAConfig` instance, or the class itself for the defaults.
        root_path: the fragment root; created if missing (its parent must exist unless
            ``create_parents``). It may be on a network file system shared by many nodes,
            each with its own local ``index_path``.
        create_parents: create missing parent directories of ``root_path`` and of
            ``config.index_path`` too.

    A root this process may not write (a read-only mount, another user's store) opens read
    only (``read_only`` is True): gets work, given an ``index_path`` this process can write
    when the root's own index is read-only too; puts raise :class:`StorageError`.

    Raises:
        InvalidInputError: a config value is out of range (the message says what to pass).
        NotAStoreError: the root's or the index path's parent does not exist (a mistyped
            path, most likely).
        StorageError: the root cannot be created, or the index cannot be created or written
            (for a read-only root, the message says to pass an ``index_path``).
    """

    def __init__(
        self,
        config: VUAConfig | type[VUAConfig],
        root_path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
        *,
        create_parents: bool = False,
    ):
        if isinstance(config, type) and issubclass(config, VUAConfig):
            config = config()
        if not isinstance(config, VUAConfig):
            raise InvalidInputError(f"config must be a VUAConfig, got {type(config).__name__}")
        check_config(config)
        self.config = config
        if config.index_path is not None:  # refused before anything is made
            _layout.check_index_path(
                os.fspath(config.index_path),
                setting="VUAConfig.index_path",
                otherwise="pass VUA(..., create_parents=True) to create it all",
                create_parents=create_parents,
            )
        self.root = open_root(root_path, create_parents)
        self.network_fs = is_network_root(self.root, config)
        self.index_path = config.index_path or os.path.join(self.root, _layout.DEFAULT_INDEX_DIR)
        # A root this process may not write (a read-only mount, another user's store) is read
        # only: gets work with an index of this process's own, puts are refused.
        self.read_only = not os.access(self.root, os.W_OK | os.X_OK)
        if self.read_only and not _layout.may_write(self.index_path):
            raise StorageError(
                f"the VUA root {self.root!r} is read-only to this process (a read-only mount or another user's "
                "store), and so is its index: to read it, pass VUAConfig(index_path=...) a directory this "
                "process can write (the index is rebuilt there from the fragment tree)"
            )
        self._index = Index(self.index_path, self.root, file_mode=config.file_mode)
        self._index.env()  # fail now, not on the first put, when the index is unusable
        self._seed = namespace_seed(config.namespace)
        self._mac_key = None if config.auth_key is None else mac_key(config.auth_key)
        self._pid = os.getpid()
        self._executor = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="vua-io")
        self._staging: dict[torch.device, PinnedStaging] = {}
        self._host_pool = HostBlockPool(config.host_pool_bytes) if config.host_pool_bytes else None
        self._stats = StatsRecorder()
        self._catalog = Catalog(
            self.root,
            self._index,
            namespace=config.namespace,
            split_factor=config.split_factor,
            mac_key=self._mac_key,
            executor=self._pool,
            shared=self.network_fs,
        )
        self._misses = MissReasons(self._index, namespace=config.namespace, split_factor=config.split_factor)

    def __enter__(self) -> VUA:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Records pending LRU refreshes and releases the index and threads."""
        self._catalog.flush_touches()
        self._index.close()
        self._executor.shutdown(wait=True)

    def stats(self) -> StoreStats:
        """This store's counters since it opened: lookups, hits in tokens, groups and bytes loaded
        and saved, load and save seconds, load errors (see :class:`vua.StoreStats`)."""
        return self._stats.snapshot()

    def _pool(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():  # threads do not survive a fork
            self._executor = ThreadPoolExecutor(max_workers=self.config.io_threads, thread_name_prefix="vua-io")
            self._staging = {}
            self._pid = os.getpid()
        return self._executor

    def _keys(self, row: torch.Tensor) -> tuple[np.ndarray, list[bytes]]:
        ids = int64_ids(row)
        return ids, group_keys(ids, self.config.split_factor, self._seed)

    # -- put ----------------------------------------------------------------------------

    def put(
        self,
        tokens: torch.Tensor,
        data: KVData | LayeredCache,
        *,
        offset: int = 0,
        word_sums: torch.Tensor | None = None,
    ) -> int:
        """Stores the KV cache of ``tokens``, group by group.

        Groups already stored are skipped; the rest are written in parallel, each durable
        (fsynced and atomically published) when this returns, and recorded in the index in
        one transaction.

        Args:
            tokens: ``[n]``, ``[1, n]`` or a batch ``[B, n]`` of token ids; n must be a
                multiple of ``split_factor``.
            data: per layer, ``(key, value)`` shaped ``[B, kv_heads, seq, head_dim]`` with
                ``seq >= n - offset`` (positions past n are ignored), one dtype for all, on any device;
                or a model's cache object holding them as ``layers[i].keys`` and ``.values``
                (transformers' ``DynamicCache``, as a forward returns it).
            offset: the token position ``data`` starts at, a multiple of split_factor: for
                callers that hold only the KV past an already stored prefix (groups before
                it are not written).
            word_sums: for engine integrations, the GPU-checkable sums of ``data`` computed
                where it lived (``vua.integration.word_sums(data, n - offset, split_factor)``,
                on any device), so no host thread hashes the same bytes again. Sums that do
                not match the data make later GPU reads of those groups fail their check (a
                shorter prefix, never wrong KV).

        Returns:
            The number of groups this call wrote.

        Raises:
            SplitFactorError: n is not a multiple of split_factor (nothing written).
            InvalidInputError: tokens or data are malformed (nothing written).
            StorageError: the file system refused a write, or the root is read-only to this
                process (see :class:`VUA`); groups already published stay valid, nothing
                partial is left.
        """
        s = self.config.split_factor
        rows, layout, layers = checked_put(tokens, data, offset, s)
        self._refuse_read_only()
        if not rows or rows[0].numel() == 0:
            return 0
        n = rows[0].numel()
        source = GroupSource.of_put(
            layers,
            layout,
            s,
            self.config.namespace,
            tokens=n,
            offset=offset,
            gpu_checksums=self.config.gpu_checksums,
            mac_key=self._mac_key,
            device_sums=checked_word_sums(word_sums),
        )
        todo: dict[bytes, GroupToWrite] = {}  # a batch may repeat a prefix: its first row is written
        every_key: list[bytes] = []
        for r, row in enumerate(rows):
            ids, keys = self._keys(row)
            every_key.extend(keys)
            present = self._catalog.stored_for_put(keys, layout)
            parents = [self._seed, *keys[:-1]]
            for g in range(offset // s, len(keys)):
                if not present[g]:
                    todo.setdefault(keys[g], GroupToWrite(r, g, keys[g], parents[g], ids))
        return self._write(source, layout, todo, every_key)

    def put_groups(self, groups: torch.Tensor, data: KVData, *, rows: Sequence[int]) -> int:
        """Stores many one-group prompts at once, each taken from its own row of ``data``: for engines that key pages themselves.

        The counterpart of :meth:`load_groups`. Row ``i`` of ``groups`` is a prompt of one
        group, and its KV is row ``rows[i]`` of ``data``: an engine passes its whole page pool
        (per layer, ``[pages, kv_heads, split_factor, head_dim]`` views of it, on the host) and
        the pages to store, and each fragment is written straight from the pool, with no copy
        into a batch first. Otherwise as :meth:`put`: stored prompts are skipped, the rest
        written in parallel, durable when this returns, recorded in one transaction.

        Returns:
            The number of groups this call wrote.

        Raises:
            InvalidInputError: ``groups`` is not ``[n, split_factor]``, ``rows`` does not give
                one row of ``data`` per row of it, or ``data`` is malformed (nothing written).
            StorageError: as :meth:`put`.
        """
        s = self.config.split_factor
        ids, keys = self._group_rows(groups)
        _, layout, layers = checked_put(groups, data, 0, s, data_rows=rows)
        for k, v in layers:
            for t in (k, v):  # what host_kv would copy, here the whole pool: refused instead
                if t.device.type != "cpu" or not heads_are_runs(t):
                    raise InvalidInputError(
                        "put_groups writes from data in place: it must be on the host with each head's "
                        f"(split_factor, head_dim) block contiguous; got a {t.device.type} tensor with strides {t.stride()}"
                    )
        self._refuse_read_only()
        source = GroupSource.of_put(
            layers,
            layout,
            s,
            self.config.namespace,
            tokens=s,
            offset=0,
            gpu_checksums=self.config.gpu_checksums,
            mac_key=self._mac_key,
        )
        present = self._catalog.stored_for_put(keys, layout)
        todo: dict[bytes, GroupToWrite] = {}
        for r, key in enumerate(keys):
            if not present[r]:
                todo.setdefault(key, GroupToWrite(rows[r], 0, key, self._seed, ids[r * s : (r + 1) * s]))
        return self._write(source, layout, todo, keys)

    def _refuse_read_only(self) -> None:
        if self.read_only:
            raise StorageError(
                f"cannot put into {self.root!r}: the root is read-only to this process (a read-only mount or "
                "another user's store), so this store only reads; put from a process that may write it"
            )

    def _write(
        self, source: GroupSource, layout: Layout, todo: dict[bytes, GroupToWrite], every_key: list[bytes]
    ) -> int:
        """Writes and publishes ``todo``'s groups, records them and the use of ``every_key``; the groups written."""
        started = time.perf_counter()
        results, failure = write_groups(
            self.root, source, todo.values(), self._pool(), file_mode=self.config.file_mode, shared=self._catalog.shared
        )
        # Record what did get published even when another group failed: those are whole.
        self._catalog.record_put(((r.key, r.record) for r in results), layout, every_key)
        written = sum(r.published for r in results)
        elapsed_ms = 1e3 * (time.perf_counter() - started)
        self._stats.add(
            groups_saved=written,
            bytes_saved=sum(r.record.nbytes for r in results if r.published),
            save_seconds=elapsed_ms / 1e3,
        )
        logger.debug("put: %d new groups, %d written in %.1f ms", len(todo), written, elapsed_ms)
        if failure is not None:
            raise StorageError(
                f"writing a fragment under {self.root!r} failed: {failure.strerror or failure}; "
                f"{write_failure_advice(failure)}, then put again (stored groups stay valid)"
            ) from failure
        if self.config.max_bytes is not None:
            self._catalog.flush_touches()
            _evict.enforce_capacity(self._index, self.root, self.config.max_bytes)
        return written

    # -- get ----------------------------------------------------------------------------

    @overload
    def get_closest(self, tokens: torch.Tensor, device: str | torch.device = "cpu") -> ClosestKV | None: ...

    @overload
    def get_closest(
        self, tokens: Sequence[torch.Tensor], device: str | torch.device = "cpu"
    ) -> list[ClosestKV | None]: ...

    def get_closest(
        self, tokens: torch.Tensor | Sequence[torch.Tensor], device: str | torch.device = "cpu"
    ) -> ClosestKV | None | list[ClosestKV | None]:
        """Returns the longest stored prefix of ``tokens``, in whole groups, with its KV.

        Every group returned was checked: header, namespace, its stored tokens against the
        query's and (by default) every tensor's checksum. A group that fails ends the
        prefix there, with a logged warning; wrong data is never returned.

        On a CUDA device the data is safe to use on the caller's current stream without
        synchronising the host: that stream waits on the copies through CUDA events. The
        host waits only for the GPU's check of the groups (a word sum computed after each
        copy), since the prefix length must be known when this returns; groups stored
        without a word sum are checked on the host and their copies left queued.

        Args:
            tokens: ``[n]`` or ``[1, n]``; or a list of 1-D tensors for a batch.
            device: where the returned tensors live.

        Returns:
            A :class:`ClosestKV`, None when no group is stored, or a list of those for a list.
        """
        if isinstance(tokens, (list, tuple)):
            if not all(isinstance(t, torch.Tensor) for t in tokens):
                raise InvalidInputError(
                    "a list passed to get_closest is a batch and must hold one 1-D tensor per prompt; "
                    "for a single prompt given as a list of ids, pass torch.tensor(ids)"
                )
            return [self._get_one(t, device) for t in tokens]
        if not isinstance(tokens, torch.Tensor):
            tokens = single_row(tokens)  # not a tensor: raises the error that says what to pass
        return self._get_one(tokens, device)

    def _get_one(self, tokens: torch.Tensor, device: str | torch.device) -> ClosestKV | None:
        load = self.load(tokens, device)
        if load is None:
            return None
        groups = load.wait()
        if groups == 0:
            return None
        return ClosestKV(tokens[..., : groups * self.config.split_factor], load.data())

    def prefix_length(self, tokens: torch.Tensor) -> int:
        """How many leading tokens of ``tokens`` are stored, in whole groups, without reading fragments.

        Answers from the index, plus one directory probe per group past it (for groups
        other nodes wrote). For schedulers that must not do I/O; a later get verifies the
        data and may find less.
        """
        ids, keys = self._keys(single_row(tokens))
        groups, _ = self._catalog.usable_groups(keys, read_headers=False)
        self._misses.after_lookup(ids, keys, groups, None)
        return groups * self.config.split_factor

    def load(
        self,
        tokens: torch.Tensor,
        device: str | torch.device = "cpu",
        *,
        layerwise: bool = False,
        offset: int = 0,
        into: KVDestination | None = None,
    ) -> KVLoad | None:
        """Starts loading the longest stored prefix of ``tokens``; for engines that overlap I/O with compute.

        With ``layerwise=True`` the copies run on a background thread and the caller can
        take layer i as soon as it has landed with :meth:`KVLoad.wait_layer`. The final
        prefix length is :meth:`KVLoad.wait`'s answer (a damaged group can shorten it).

        Args:
            offset: a token position, a multiple of split_factor: read the groups from there
                on, for a caller that holds the KV before it (an engine's own prefix cache),
                as ``put``'s offset writes them. They are checked exactly as in a whole prefix
                (each group's key chains every token before it); the load's outputs begin at
                ``offset`` (:attr:`KVLoad.offset`).
            into: memory of the caller's to land in instead of fresh outputs, such as an
                engine's paged blocks: a :class:`KVDestination` naming, per group and layer,
                the views on ``device`` the group's K and V go to. Each tensor is verified as
                it is copied there (on the host by xxh3, on CUDA by word sums once it is in
                device memory), and only the groups :meth:`KVLoad.wait` counts are loaded:
                the views of a group past that may hold bytes of it (see KVDestination).
                :meth:`KVLoad.wait_layer_groups` then takes the place of ``wait_layer``.

        Returns:
            A running :class:`KVLoad`, or None when no group of ``tokens`` from ``offset`` on is stored.

        Raises:
            SplitFactorError: ``offset`` is not a multiple of split_factor.
            InvalidInputError: ``into`` is not a KVDestination; a view it names does not fit
                the stored layout or the device (raised by :meth:`KVLoad.wait`).
        """
        device = checked_device(device)
        checked_destination(into)
        first = checked_offset(offset, self.config.split_factor)
        ids, keys = self._keys(single_row(tokens))
        started = time.perf_counter()
        self._stats.add(lookups=1, lookup_tokens=len(keys) * self.config.split_factor)
        mac_in_copy = self._mac_key is not None and checks_macs_in_copy(
            device, layerwise=layerwise, mapped=not self._catalog.shared
        )
        fragments, layout = self._catalog.open_prefix(keys, ids, check_macs=not mac_in_copy, first=first)
        if not first:  # (a caller that holds a prefix looked it up before: its misses were told then)
            self._misses.after_lookup(ids, keys, len(fragments), layout)  # a WARNING when a setting is why
        logger.debug(
            "lookup: %d of %d groups usable in %.2f ms",
            len(fragments),
            len(keys),
            1e3 * (time.perf_counter() - started),
        )
        if not fragments or layout is None:
            return None
        return self._start(
            fragments, layout, keys, first, device, started, layerwise=layerwise, mac_in_copy=mac_in_copy, into=into
        )

    def load_groups(
        self, groups: torch.Tensor, device: str | torch.device = "cpu", *, into: KVDestination
    ) -> KVLoad | None:
        """Starts loading many one-group prompts at once, each into its place in ``into``: for engines that key pages themselves.

        Each row of ``groups`` is a prompt of exactly one group, stored by ``put`` as such
        (an engine's page, whose tokens stand for the engine's own page key). They are
        looked up in one index transaction and copied by all the store's threads at once,
        each checked as :meth:`load` checks a group; the load stops at the first row that
        is not stored or fails a check, as a prefix does.

        Args:
            groups: ``[n, split_factor]`` token ids, one prompt per row.
            into: where row ``i`` lands: its :meth:`KVDestination.chunks` and
                :meth:`~KVDestination.whole_group` for group ``i``.

        Returns:
            A finished :class:`KVLoad` (:meth:`KVLoad.wait` says how many leading rows were
            loaded), or None when the first row is not stored.

        Raises:
            InvalidInputError: ``groups`` is not ``[n, split_factor]`` integer ids, or
                ``into`` is not a KVDestination; a view it names does not fit (from ``wait``).
        """
        device = checked_device(device)
        checked_destination(into)
        s = self.config.split_factor
        ids, keys = self._group_rows(groups)
        started = time.perf_counter()
        self._stats.add(lookups=len(keys), lookup_tokens=len(keys) * s)
        mac_in_copy = self._mac_key is not None and checks_macs_in_copy(
            device, layerwise=False, mapped=not self._catalog.shared
        )
        fragments, layout = self._catalog.open_prefix(keys, ids, check_macs=not mac_in_copy, one_group_each=True)
        if not fragments or layout is None:
            return None
        return self._start(
            fragments, layout, keys, 0, device, started, layerwise=False, mac_in_copy=mac_in_copy, into=into
        )

    def stored_groups(self, groups: torch.Tensor) -> int:
        """How many leading rows of ``groups`` (one-group prompts, as :meth:`load_groups` takes) are stored,
        without reading fragments: :meth:`prefix_length` for many one-group prompts, in one index transaction.

        Raises:
            InvalidInputError: ``groups`` is not ``[n, split_factor]`` integer ids.
        """
        _, keys = self._group_rows(groups)
        count, _ = self._catalog.usable_groups(keys, read_headers=False)
        return count

    def _group_rows(self, groups: torch.Tensor) -> tuple[np.ndarray, list[bytes]]:
        """The token ids of one-group prompts (``[n, split_factor]``), flat, and each row's key."""
        s = self.config.split_factor
        if not isinstance(groups, torch.Tensor) or groups.dim() != 2 or groups.shape[1] != s:
            got = list(groups.shape) if isinstance(groups, torch.Tensor) else type(groups).__name__
            raise InvalidInputError(
                f"groups must be a [n, split_factor={s}] tensor of token ids, one prompt a row; got {got}"
            )
        ids = int64_ids(groups.reshape(-1))
        return ids, first_group_keys(ids, s, self._seed)

    def _start(
        self,
        fragments: list[Fragment],
        layout: Layout,
        keys: list[bytes],
        first: int,
        device: torch.device,
        started: float,
        *,
        layerwise: bool,
        mac_in_copy: bool,
        into: KVDestination | None,
    ) -> KVLoad:
        """Starts copying the open ``fragments`` of ``keys[first:]``; its end is counted and recorded."""
        platform, staging = None, None
        if device.type == "cuda":
            platform = CudaPlatform(device)
            staging = self._staging.get(device)
            if staging is None:
                staging = self._staging[device] = PinnedStaging(platform, self.config.staging_bytes)

        def on_done(load: KVLoad) -> None:
            groups = load.num_groups
            self._catalog.touch(keys[: first + groups])  # the whole prefix was used, the caller's part too
            self._catalog.quarantine([keys[first + g] for g in load.damaged_groups])
            self._stats.add(
                hit_tokens=groups * self.config.split_factor,
                groups_loaded=groups,
                bytes_loaded=groups * layout.kv_bytes(self.config.split_factor),
                load_seconds=time.perf_counter() - started,
                load_errors=max(len(load.damaged_groups), int(groups < len(fragments))),
            )

        return start_load(
            fragments,
            layout,
            self.config.split_factor,
            device,
            self._pool(),
            # A group whose MAC is checked needs no second hash of the same bytes: the MAC is
            # the stronger check, and one pass fewer is what makes authentication cheap.
            verify_checksums=self.config.verify_checksums and self._mac_key is None,
            mac_key=self._mac_key if mac_in_copy else None,
            layerwise=layerwise,
            platform=platform,
            staging=staging,
            host_pool=self._host_pool,
            gds=self.config.gds,
            on_done=on_done,
            offset=first * self.config.split_factor,
            into=into,
        )
