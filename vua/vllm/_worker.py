"""The worker side: loads into the paged blocks (asynchronous by default), and saves gathered to host and written in the background.

Nothing here waits on the store without a deadline: asynchronous loads run on threads of
their own and are cut at theirs (``_loads``); a save's lookup of what is stored already is a
bounded call; saves are written by a bounded queue (``_saves``); shutdown waits
``shutdown_timeout``. The layer-wise mode (``load_mode: "layerwise"``) is for local roots only,
where the reads come from the page cache or a local disk.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

import torch

from vua.core import VUA
from vua.errors import InvalidInputError, VUAError
from vua.integration import BoundedCalls, StoreHealth, word_sums
from vua.vllm._layerwise import LayerwiseLoads
from vua.vllm._loads import AsyncLoads
from vua.vllm._metadata import SaveSpec, VUAConnectorMetadata
from vua.vllm._paged import NullBlockError, PagedLayer
from vua.vllm._saves import SaveQueue
from vua.vllm._settings import ConnectorSettings
from vua.vllm._stats import HEALTH_COUNTERS, LOAD_COUNTERS

# Counters kept as totals by the parts that count them; the stats report their increments.
CUMULATIVE = (*HEALTH_COUNTERS, "load_error_blocks")

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext

logger = logging.getLogger(__name__)


class WorkerSide:
    """One tensor-parallel rank's loads and saves, driven by the step's metadata.

    Args:
        settings: the connector's settings.
        rank: this worker's tensor-parallel rank (its shard's store).
        metadata: returns the current step's metadata (vLLM binds it to the connector).
    """

    def __init__(self, settings: ConnectorSettings, rank: int, metadata: Any):
        self.settings = settings
        self.vua: VUA = settings.open_store(rank)
        if settings.load_mode == "layerwise" and self.vua.network_fs:
            raise InvalidInputError(
                f'VUAConnector: load_mode "layerwise" reads on the engine\'s own thread, and {settings.root} is a '
                "network file system, which may slow down or stop answering: remove load_mode (the default, "
                '"async", loads off the engine\'s path with a deadline)'
            )
        self._metadata = metadata
        self._layers: dict[str, PagedLayer] = {}
        self._group_of = {name: g for g, group in enumerate(settings.groups) for name in group.layer_names}
        # The loads' strategy, built once the caches are registered: asynchronous, or layer-wise.
        self._loads: AsyncLoads | LayerwiseLoads | None = None
        self._gathered: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # Per request, each layer's word sums (1, groups, 2) computed where the cache lives;
        # None once a layer's could not be (the writer then does as VUAConfig says).
        self._sums: dict[str, list[torch.Tensor] | None] = {}
        self._save_starts: dict[str, int] = {}
        self._unsaveable: set[str] = set()  # requests whose KV a layer no longer held when a group was due
        self.health = StoreHealth(settings.root, cooldown=settings.unhealthy_seconds)
        self._bounded = BoundedCalls(self.health, name="vua-worker-lookup")
        self._saves = SaveQueue(settings.save_queue_bytes)
        self._lock = threading.Lock()
        self._reported = self.vua.stats()  # the store's counters at the last stats report
        self._own = dict.fromkeys(("saves_dropped_at_shutdown", *LOAD_COUNTERS), 0)
        self._seen = dict.fromkeys(CUMULATIVE, 0)  # those counters at the last stats report

    def _step(self) -> VUAConnectorMetadata:
        meta = self._metadata()
        assert isinstance(meta, VUAConnectorMetadata)
        return meta

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = {name: self._paged(name, kv) for name, kv in kv_caches.items() if name in self._group_of}
        missing = [n for n in self.settings.layer_names if n not in self._layers]
        if missing:
            raise InvalidInputError(f"VUAConnector: no KV cache registered for layers {missing[:3]}...")
        names = self.settings.layer_names
        layers, groups = [self._layers[name] for name in names], [self._group_of[name] for name in names]
        split = self.settings.split_factor
        if self.settings.load_mode == "layerwise":
            self._loads = LayerwiseLoads(self.vua, layers, groups, self.settings.groups, split)
        else:
            self._loads = AsyncLoads(
                self.vua,
                layers,
                groups,
                split,
                timeout=self.settings.load_timeout,
                timeout_per_gib=self.settings.load_timeout_per_gib,
                health=self.health,
            )

    def _paged(self, layer_name: str, kv: torch.Tensor) -> PagedLayer:
        group = self.settings.groups[self._group_of[layer_name]]
        return PagedLayer(kv, group.block_size, group.key_width)

    def _layer_index(self, layer_name: str) -> int:
        try:
            return self.settings.layer_names.index(layer_name)
        except ValueError:
            raise InvalidInputError(f"VUAConnector: unknown layer {layer_name!r}") from None

    # -- loads ------------------------------------------------------------------------------

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._loads is not None, "register_kv_caches comes first"
        for spec in self._step().loads:
            self._loads.start(spec)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if isinstance(self._loads, LayerwiseLoads):  # asynchronous loads are not the step's
            self._loads.wait_layer(self._layer_index(layer_name))

    def get_block_ids_with_load_errors(self) -> set[int]:
        # An asynchronous load that failed is reported whole (transfer_results), never as blocks.
        return self._loads.errors() if isinstance(self._loads, LayerwiseLoads) else set()

    # -- saves ------------------------------------------------------------------------------

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        saves = self._step().saves
        if not saves:
            return
        layer = self._layers.get(layer_name) or self._paged(layer_name, kv_layer)
        group = self._group_of[layer_name]
        for spec in saves:
            start = self._save_start(spec)
            if start >= len(spec.token_ids) or spec.req_id in self._unsaveable:
                continue
            try:
                k, v = layer.gather(spec.block_ids[group], start, len(spec.token_ids))
            except NullBlockError:
                # vLLM's own prefix cache gave this request tokens the store lacks, and a
                # sliding-window layer kept only their last window: they cannot be stored, nor
                # (a prefix with a hole being useless) anything after them.
                self._unsaveable.add(spec.req_id)
                self._gathered.pop(spec.req_id, None)
                logger.info("VUAConnector: request %s is not saved: a layer no longer holds its prefix", spec.req_id)
                continue
            if self._device_sums(kv_layer):
                self._add_sums(spec.req_id, k, v, len(spec.token_ids) - start)
            # Copy to host now: once the step ends vLLM may reuse these blocks.
            gathered = self._gathered.setdefault(spec.req_id, [])
            gathered.append((k.to("cpu", non_blocking=True), v.to("cpu", non_blocking=True)))

    def _device_sums(self, kv_layer: torch.Tensor) -> bool:
        """Whether a save computes the word sums where the cache lives (see ``VUAConfig.gpu_checksums``).

        On a GPU they cost next to nothing there, and the background writer then hashes
        nothing on the host for them.
        """
        wanted = self.vua.config.gpu_checksums
        return wanted is True or (wanted is None and kv_layer.is_cuda)

    def _add_sums(self, req_id: str, k: torch.Tensor, v: torch.Tensor, tokens: int) -> None:
        sums = self._sums.setdefault(req_id, [])
        if sums is None:
            return
        layer_sums = word_sums([(k, v)], tokens, self.settings.split_factor)
        if layer_sums is None:  # a head's run of a group is not whole 8-byte words
            self._sums[req_id] = None
            return
        sums.append(layer_sums.to("cpu", non_blocking=True))

    def _save_start(self, spec: SaveSpec) -> int:
        """The first token to gather this step: the step's first group, or past it the groups already stored."""
        start = self._save_starts.get(spec.req_id)
        if start is None:
            tokens = torch.tensor(spec.token_ids, dtype=torch.long)
            # Bounded: on a shared root the lookup probes the tree, and a step must not wait on
            # a file system that hangs (then every group from spec.start on is gathered, and
            # the put skips those stored).
            stored = self._bounded.call(
                lambda: self.vua.prefix_length(tokens),
                timeout=self.settings.lookup_timeout,
                default=0,
                what="a lookup before a save",
            )
            start = self._save_starts[spec.req_id] = max(spec.start, stored)
        return start

    def wait_for_save(self) -> None:
        if isinstance(self._loads, LayerwiseLoads):
            self._loads.finish()
        if not self._gathered:
            self._save_starts = {}
            return
        if any(layer.kv.is_cuda for layer in self._layers.values()):
            torch.cuda.current_stream().synchronize()  # the host copies of the blocks are complete
        specs = {spec.req_id: spec for spec in self._step().saves}
        layers = len(self.settings.layer_names)
        for req_id, gathered in self._gathered.items():
            spec = specs[req_id]
            if len(gathered) != layers:
                logger.warning(
                    "VUAConnector: request %s gathered %d of %d layers; not saved", req_id, len(gathered), layers
                )
                continue
            tokens = torch.tensor(spec.token_ids, dtype=torch.long)
            sums = self._sums.get(req_id)
            all_sums = torch.cat(sums, dim=2) if sums and len(sums) == layers else None
            start = self._save_start(spec)
            nbytes = sum(k.nbytes + v.nbytes for k, v in gathered)
            self._saves.submit(functools.partial(self._write, tokens, gathered, start, all_sums), nbytes)
        self._gathered = {}
        self._sums = {}
        self._save_starts = {}

    def _write(
        self,
        tokens: torch.Tensor,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        offset: int,
        sums: torch.Tensor | None,
    ) -> None:
        try:
            self.vua.put(tokens, layers, offset=offset, word_sums=sums)
        except VUAError as exc:  # a failed save is a future miss, never a wrong answer
            logger.warning("VUAConnector: storing %d tokens failed: %s", tokens.numel(), exc)

    def transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(loads over, loads that failed) since the last call: vLLM's finished_recving and failed_recving.

        Saves hold no blocks, so nothing is ever reported as sending. A load that failed is
        recomputed by vLLM from the start (its request is admitted again).
        """
        self._unsaveable -= finished_req_ids
        if not isinstance(self._loads, AsyncLoads):  # layer-wise loads finish within their step
            return set(), set()
        result = self._loads.poll(finished_req_ids)
        if result.timed_out or result.failed:
            with self._lock:
                self._own["loads_timed_out"] += result.timed_out
                self._own["load_bytes_abandoned"] += result.bytes_abandoned
                self._own["loads_failed"] += len(result.failed)
        return result.finished, result.failed

    def stats_since_last_report(self) -> dict[str, int | float] | None:
        """The increments of the store's and the connector's counters since the last call; None when nothing moved."""
        now = self.vua.stats()
        delta = {name: value - getattr(self._reported, name) for name, value in now.as_dict().items()}
        self._reported = now
        with self._lock:
            delta.update(self._own)
            self._own = dict.fromkeys(self._own, 0)
        layerwise = self._loads.error_blocks if isinstance(self._loads, LayerwiseLoads) else 0
        totals = (self.health.periods, self.health.skipped, self._bounded.timed_out, self._saves.dropped, layerwise)
        seen = dict(zip(CUMULATIVE, totals))
        for name, value in seen.items():
            delta[name] = value - self._seen[name]
        self._seen = seen
        return delta if any(delta.values()) else None

    def flush(self) -> None:
        """Waits for background writes and load threads (tests: one inside a hung file system waits with it)."""
        if isinstance(self._loads, AsyncLoads):
            self._loads.wait()
        self._saves.wait()

    def shutdown(self) -> None:
        """Gives pending saves ``shutdown_timeout`` seconds, then abandons the rest; cancels loads in flight.

        vLLM kills its engine process a few seconds after SIGTERM, so waiting for every save
        could be cut short anywhere. Each group is published atomically: an abandoned save
        leaves the groups it finished, and a later engine loads the whole prompt or a
        shorter prefix, never a partial group or an error.
        """
        if isinstance(self._loads, AsyncLoads):
            self._loads.shutdown()
        self._bounded.shutdown()
        finished = self._saves.wait(timeout=self.settings.shutdown_timeout)
        unfinished = self._saves.close()
        self._own["saves_dropped_at_shutdown"] += unfinished
        if not finished:
            # The store stays open for the save still running (closing would wait for it).
            logger.warning(
                "VUAConnector: shut down with %d prompt saves unfinished after %.1f s; their remaining "
                "groups are not stored (the next engine recomputes them)",
                unfinished,
                self.settings.shutdown_timeout,
            )
            return
        self.vua.close()
