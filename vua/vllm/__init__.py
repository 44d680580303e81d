"""VUA as a vLLM KV connector: prompts' KV stored on a (shared) file system, restored by any node.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "VUAConnector", "kv_role": "kv_both",
        "kv_connector_module_path": "vua.vllm", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"vua_root": "/mnt/kv"}}'

Extra config keys: ``vua_root`` (required), ``index_path`` (keep it on local disk when
the root is on NFS), ``split_factor`` (default 256; a multiple of vLLM's block size),
``max_bytes`` (capacity, LRU eviction; local roots only; bytes or a size such as "500G", as
``vua gc --max-bytes`` takes it), ``namespace`` (appended to the
derived one), ``auth_key_file``, ``shutdown_timeout`` (seconds pending saves get at
shutdown, default 4; vLLM kills its engine 5 s after SIGTERM), ``gpu_checksums``
(``VUAConfig.gpu_checksums``; by default word sums are computed on the device for CUDA caches),
``load_mode`` ("async", the default, or "layerwise"), ``load_timeout`` and
``load_timeout_per_gib`` (an asynchronous load's deadline: 2 s plus 2 s per GiB by default),
``lookup_timeout`` (the scheduler's lookup, 0.5 s), ``unhealthy_seconds`` (how long a store
past a deadline is skipped, 30 s) and ``save_queue_bytes`` (host copies of saves waiting, 2 GiB).
Any other key is refused with the nearest valid name, since a misspelt one would be ignored.

The connector only dispatches, by role, as vLLM's larger connectors do:

Scheduler side (``_scheduler``): ``get_num_new_matched_tokens`` answers from the index
alone; the metadata of each step (``_metadata``) tells workers which requests to load
(tokens, block ids, token range) and which groups of prompts that step completes to save.

Worker side (``_worker``): ``start_load_kv`` starts an asynchronous load per request
(``_loads``: read and verified into memory of its own, then copied into the request's paged
blocks under a lock that a deadline or an abort takes first, so a late read never lands;
blocks vLLM already holds are never written), which ``get_transfer_results`` reports once over
or cut; with ``load_mode: "layerwise"`` a :class:`vua.KVLoad` lands straight in the blocks
within the step instead, and ``wait_for_layer_load`` waits for one layer;
``save_kv_layer`` gathers the groups a step completes from each layer to host memory
(and sums them where the cache lives, for GPU-side checks of later loads);
``wait_for_save`` hands them to a background writer once the copies are done, so vLLM
may reuse the blocks at once. Each group of a prompt is saved in the step that completes
it: a sliding-window layer's blocks are freed behind the window during chunked prefill.
Groups that fail verification are reported through ``get_block_ids_with_load_errors``, and
vLLM recomputes them with ``"kv_load_failure_policy": "recompute"`` (its default, "fail",
fails the request; the connector warns at start-up).

Hybrid models (``SupportsHMA``): full-attention and sliding-window layers are separate KV
cache groups with their own block tables; every layer is stored, and each is read and
written through its group's blocks (a windowed layer's blocks before its window are vLLM's
null block, skipped on loads).

Paged layouts: vLLM >= 0.33 hands connectors a standardized per-layer view
``[blocks, heads, block_size, content]`` (FlashAttention-style K and V concatenated in
``content``; MLA's single latent with heads = 1), in whatever physical order it chose;
indexing the view follows that order. Older 5-D ``[2, blocks, block_size, heads, dim]``
and 3-D MLA ``[blocks, block_size, dim]`` tensors work too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vua.errors import missing_extra

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorTransferResults,
        SupportsHMA,
    )
except ImportError as exc:
    raise missing_extra("vua.vllm", "vllm", "vllm", exc) from exc

from vua.core import VUA
from vua.vllm._metadata import LoadSpec, SaveSpec, VUAConnectorMetadata
from vua.vllm._paged import PagedLayer
from vua.vllm._scheduler import SchedulerSide
from vua.vllm._settings import ConnectorSettings
from vua.vllm._stats import VUAConnectorStats, VUAPromMetrics
from vua.vllm._worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "VUAConnector",
    "VUAStorageConnector_V1",
    "VUAConnectorMetadata",
    "VUAConnectorStats",
    "LoadSpec",
    "SaveSpec",
    "PagedLayer",
]


class VUAConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM's KV connector for a VUA store; see the module documentation.

    Builds a :class:`SchedulerSide` or a :class:`WorkerSide` by role and hands each of
    vLLM's calls to it.

    Raises:
        InvalidInputError: a missing or malformed setting in ``kv_connector_extra_config``.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = ConnectorSettings.from_vllm(vllm_config, kv_cache_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(settings)
        else:
            self._worker = WorkerSide(settings, _tp_rank(), self._get_connector_metadata)

    @property
    def scheduler_side(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("VUAConnector: a scheduler-side call reached the worker-side connector")
        return self._scheduler

    @property
    def worker_side(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("VUAConnector: a worker-side call reached the scheduler-side connector")
        return self._worker

    @property
    def vua(self) -> VUA:
        """This connector's store (the worker's rank, or rank 0 on the scheduler)."""
        return self._worker.vua if self._worker is not None else self.scheduler_side.rank_stores[0]

    # -- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler_side.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's call with its hybrid KV cache manager on (several KV cache groups)."""
        return self.scheduler_side.request_finished(request)

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker_side.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker_side.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self.worker_side.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self.worker_side.wait_for_save()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Asynchronous loads over (finished_recving) and those that failed (failed_recving: vLLM
        recomputes those requests); saves hold no blocks, so nothing is sending."""
        finished, failed = self.worker_side.transfer_results(finished_req_ids)
        return KVConnectorTransferResults(finished_recving=finished, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # vLLM asks get_transfer_results, which reports failed loads too; this is its older form.
        return None, self.get_transfer_results(finished_req_ids).finished_recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.get_block_ids_with_load_errors()

    # -- stats ------------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This worker's loads and saves since the last call (vLLM sums them over workers)."""
        if self._worker is None:
            return None
        delta = self._worker.stats_since_last_report()
        return None if delta is None else VUAConnectorStats(data=delta)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return VUAConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return VUAPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def flush(self) -> None:
        """Waits for background writes and load threads (tests: one inside a hung file system waits with it)."""
        if self._worker is not None:
            self._worker.flush()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()


def _tp_rank() -> int:
    """This worker's tensor-parallel rank (0 where vLLM set up no model-parallel group)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (AssertionError, ImportError, RuntimeError):
        return 0


# The original project's class name: kv_connector "VUAStorageConnector_V1" keeps working.
VUAStorageConnector_V1 = VUAConnector
