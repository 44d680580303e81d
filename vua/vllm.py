"""VUA as a vLLM KV connector: prompts' KV stored on a (shared) file system, restored by any node.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "VUAConnector", "kv_role": "kv_both",
        "kv_connector_module_path": "vua.vllm",
        "kv_connector_extra_config": {"vua_root": "/mnt/kv"}}'

Extra config keys: ``vua_root`` (required), ``index_path`` (keep it on local disk when
the root is on NFS), ``split_factor`` (default 256; a multiple of vLLM's block size),
``max_bytes`` (capacity, LRU eviction), ``namespace`` (appended to the derived one).

Scheduler side: ``get_num_new_matched_tokens`` answers from the index alone; the
metadata of each step tells workers which requests to load (tokens, block ids, token
range) and which finished prompts to save.

Worker side: ``start_load_kv`` starts a layer-wise :class:`vua.KVLoad` per request;
``wait_for_layer_load`` waits for one layer and scatters it into the paged blocks;
``save_kv_layer`` gathers a finished prompt's new groups from each layer to host memory;
``wait_for_save`` hands them to a background writer once the copies are done, so vLLM
may reuse the blocks at once. Groups that fail verification are reported through
``get_block_ids_with_load_errors`` and vLLM recomputes them.

Paged layouts: vLLM >= 0.33 hands connectors a standardized per-layer view
``[blocks, heads, block_size, content]`` (FlashAttention-style K and V concatenated in
``content``; MLA's single latent with heads = 1), in whatever physical order it chose;
indexing the view follows that order. Older 5-D ``[2, blocks, block_size, heads, dim]``
and 3-D MLA ``[blocks, block_size, dim]`` tensors work too.
"""

from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vua.core import VUA, KVLoad, VUAConfig
from vua.errors import VUAError, missing_extra

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
except ImportError as exc:
    raise missing_extra("vua.vllm", "vllm", "vllm", exc) from exc

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["VUAConnector", "VUAConnectorMetadata", "LoadSpec", "SaveSpec", "PagedLayer"]

logger = logging.getLogger(__name__)


@dataclass
class LoadSpec:
    """Load tokens [start, end) of a request from the store into its blocks."""

    req_id: str
    token_ids: list[int]  # the prompt up to ``end``
    block_ids: list[int]
    start: int
    end: int


@dataclass
class SaveSpec:
    """Store the whole groups of a request's computed prompt, read from its blocks."""

    req_id: str
    token_ids: list[int]  # the prompt cut to whole groups
    block_ids: list[int]


@dataclass
class VUAConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


class PagedLayer:
    """One layer's paged KV tensor, read and written per token position.

    Knows the layouts vLLM gives connectors and splits each token's content into the
    (key, value) pair a fragment stores: K and V for attention, the latent's two parts
    for MLA. Everything is indexing on the tensor vLLM handed over, so any physical
    order (stride permutation) is respected.
    """

    def __init__(self, kv: torch.Tensor, block_size: int, key_width: int | None):
        self.kv = kv
        self.block_size = block_size
        if kv.dim() == 5 and kv.shape[0] == 2:  # legacy FlashAttention [2, blocks, block, heads, dim]
            self.kind, self.heads, width = "split", kv.shape[3], kv.shape[4]
            self.key_width = width
        elif kv.dim() == 4:  # standardized [blocks, heads, block, content]
            self.kind, self.heads, width = "bhnc", kv.shape[1], kv.shape[3]
            self.key_width = key_width if key_width and 0 < key_width < width else width - width // 2
        elif kv.dim() == 3:  # legacy MLA [blocks, block, latent]
            self.kind, self.heads, width = "mla", 1, kv.shape[2]
            self.key_width = key_width if key_width and 0 < key_width < width else width - width // 2
        else:
            raise VUAError(
                f"unsupported paged KV tensor of shape {tuple(kv.shape)}; VUAConnector knows vLLM's "
                "[blocks, heads, block_size, content] views and the older 5-D and MLA layouts"
            )
        self.value_width = width if self.kind == "split" else width - self.key_width

    def _slots(self, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_ids, dtype=torch.long)[positions // self.block_size]
        return blocks.to(self.kv.device), (positions % self.block_size).to(self.kv.device)

    def gather(self, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of positions [start, end), each ``(1, heads, end - start, width)``."""
        blocks, offsets = self._slots(block_ids, start, end)
        if self.kind == "split":
            k, v = self.kv[0][blocks, offsets], self.kv[1][blocks, offsets]  # (n, heads, dim)
        elif self.kind == "bhnc":
            content = self.kv[blocks, :, offsets]  # (n, heads, content): advanced indices go first
            k, v = content[..., : self.key_width], content[..., self.key_width :]
        else:
            content = self.kv[blocks, offsets][:, None]  # (n, 1, latent)
            k, v = content[..., : self.key_width], content[..., self.key_width :]
        return k.transpose(0, 1)[None], v.transpose(0, 1)[None]

    def scatter(self, block_ids: list[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes (K, V) of shape ``(1, heads, n, width)`` at positions [start, start + n)."""
        n = k.shape[2]
        blocks, offsets = self._slots(block_ids, start, start + n)
        k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # (n, heads, width)
        if self.kind == "split":
            self.kv[0][blocks, offsets] = k
            self.kv[1][blocks, offsets] = v
        elif self.kind == "bhnc":
            self.kv[blocks, :, offsets] = torch.cat([k, v], dim=-1)
        else:
            self.kv[blocks, offsets] = torch.cat([k, v], dim=-1)[:, 0]


def _layer_names(kv_cache_config: KVCacheConfig) -> list[str]:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise VUAError(
            f"VUAConnector supports models with one KV cache group; this one has {len(groups)} "
            "(hybrid or sliding-window models). Run without the connector for this model."
        )
    return list(groups[0].layer_names)


class VUAConnector(KVConnectorBase_V1):
    """vLLM's KV connector for a VUA store; see the module documentation."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        root = extra.get("vua_root")
        if not root:
            raise VUAError('VUAConnector needs "vua_root" in kv_connector_extra_config: the store directory')
        self.block_size = vllm_config.cache_config.block_size
        split_factor = int(extra.get("split_factor", 256))
        if split_factor % self.block_size:
            raise VUAError(
                f"VUAConnector: split_factor {split_factor} is not a multiple of vLLM's block size "
                f"{self.block_size}; set kv_connector_extra_config.split_factor to a multiple of it "
                f"(e.g. {self.block_size * max(1, split_factor // self.block_size)})"
            )
        self.layer_names = _layer_names(kv_cache_config)
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        self.key_width = getattr(spec, "head_size", None)
        parallel = vllm_config.parallel_config
        self.tp_size = parallel.tensor_parallel_size
        self.tp_rank = self._tp_rank() if role == KVConnectorRole.WORKER else 0

        auth_key = _read_auth_key(extra.get("auth_key_file"))

        def store(rank: int) -> VUA:
            config = VUAConfig(
                split_factor=split_factor,
                namespace=self.namespace(vllm_config, spec, rank, extra.get("namespace", "")),
                index_path=extra.get("index_path"),
                max_bytes=int(extra["max_bytes"]) if extra.get("max_bytes") else None,
                auth_key=auth_key,
            )
            return VUA(config, root)

        if role == KVConnectorRole.SCHEDULER:
            # A hit counts only if every tensor-parallel rank has its shard.
            self.rank_stores = [store(rank) for rank in range(self.tp_size)]
            self.vua = self.rank_stores[0]
        else:
            self.vua = store(self.tp_rank)
        self.split_factor = split_factor
        # scheduler state
        self._pending_loads: dict[str, int] = {}
        self._requests: dict[str, dict[str, Any]] = {}
        # worker state
        self._layers: dict[str, PagedLayer] = {}
        self._loads: list[tuple[LoadSpec, KVLoad | None]] = []
        self._gathered: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._save_starts: dict[str, int] = {}
        self._load_errors: set[int] = set()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vua-save")
        self._writes: list[Future] = []
        self._lock = threading.Lock()

    # -- naming ---------------------------------------------------------------------------

    @staticmethod
    def _tp_rank() -> int:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            return get_tensor_model_parallel_rank()
        except (AssertionError, ImportError, RuntimeError):  # no model-parallel group set up
            return 0

    def namespace(self, vllm_config: VllmConfig, spec: Any, rank: int, extra: str) -> str:
        """Model, KV dtype, tensor-parallel rank and layout: entries never mix across any of them."""
        model = vllm_config.model_config
        name = getattr(model, "model", "unknown-model") if model is not None else "unknown-model"
        cache_dtype = vllm_config.cache_config.cache_dtype
        dtype = str(getattr(spec, "dtype", "")).removeprefix("torch.") or str(cache_dtype)
        layout = (
            f"{type(spec).__name__}-h{getattr(spec, 'num_kv_heads', '?')}"
            f"-d{getattr(spec, 'head_size', '?')}-cache-{cache_dtype}"
        )
        parts = ["vllm", name, dtype, f"tp{rank}-of-{self.tp_size}", layout]
        return "/".join(parts + ([extra] if extra else []))

    # -- scheduler side -------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` that every rank has stored, from the index alone."""
        prompt = list(request.prompt_token_ids or [])
        limit = (len(prompt) - 1) // self.split_factor * self.split_factor  # the last token must run
        if limit <= num_computed_tokens:
            return 0, False
        tokens = torch.tensor(prompt[:limit], dtype=torch.long)
        stored = min(vua.prefix_length(tokens) for vua in self.rank_stores)
        return max(0, stored - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._pending_loads[request.request_id] = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = VUAConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            state = self._requests[new.req_id] = {"prompt": prompt, "blocks": list(new.block_ids[0]), "saved": False}
            self._plan(
                meta,
                new.req_id,
                state,
                new.num_computed_tokens,
                scheduler_output.num_scheduled_tokens.get(new.req_id, 0),
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new_blocks is not None:
                state["blocks"] = list(new_blocks[0])  # a resumed request gets its blocks anew
            elif new_blocks is not None:
                state["blocks"].extend(new_blocks[0])
            self._plan(
                meta, req_id, state, cached.num_computed_tokens[i], scheduler_output.num_scheduled_tokens.get(req_id, 0)
            )
        return meta

    def _plan(self, meta: VUAConnectorMetadata, req_id: str, state: dict, computed: int, scheduled: int) -> None:
        external = self._pending_loads.pop(req_id, 0)
        prompt = state["prompt"]
        if external:
            meta.loads.append(LoadSpec(req_id, prompt[:computed], list(state["blocks"]), computed - external, computed))
        whole = len(prompt) // self.split_factor * self.split_factor
        if not state["saved"] and whole and computed + scheduled >= len(prompt):
            meta.saves.append(SaveSpec(req_id, prompt[:whole], list(state["blocks"])))
            state["saved"] = True

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy out of the blocks within the step, so vLLM may free them now.
        self._requests.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = {name: PagedLayer(kv, self.block_size, self.key_width) for name, kv in kv_caches.items()}
        missing = [n for n in self.layer_names if n not in self._layers]
        if missing:
            raise VUAError(f"VUAConnector: no KV cache registered for layers {missing[:3]}...")

    def _layer_index(self, layer_name: str) -> int:
        try:
            return self.layer_names.index(layer_name)
        except ValueError:
            digits = re.findall(r"\d+", layer_name)
            raise VUAError(f"VUAConnector: unknown layer {layer_name!r} (layer {digits})") from None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, VUAConnectorMetadata)
        device = next(iter(self._layers.values())).kv.device
        for spec in meta.loads:
            tokens = torch.tensor(spec.token_ids[: spec.end], dtype=torch.long)
            load = self.vua.load(tokens, device, layerwise=True)
            if load is None:
                self._fail_blocks(spec, spec.start)
            self._loads.append((spec, load))

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._loads:
            return
        layer = self._layers[layer_name]
        index = self._layer_index(layer_name)
        for spec, load in self._loads:
            if load is None:
                continue
            k, v = load.wait_layer(index)  # (1, heads, verified tokens, width)
            end = min(spec.end, k.shape[2])
            if end > spec.start:
                layer.scatter(spec.block_ids, spec.start, k[:, :, spec.start : end], v[:, :, spec.start : end])
        if index == len(self.layer_names) - 1:
            self._finish_loads()

    def _fail_blocks(self, spec: LoadSpec, first_bad: int) -> None:
        with self._lock:
            self._load_errors.update(
                spec.block_ids[p // self.block_size] for p in range(max(first_bad, spec.start), spec.end)
            )

    def _finish_loads(self) -> None:
        for spec, load in self._loads:
            if load is not None:
                verified = load.wait() * self.split_factor
                if verified < spec.end:
                    self._fail_blocks(spec, verified)
        self._loads = []

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, VUAConnectorMetadata)
        if not meta.saves:
            return
        layer = self._layers.get(layer_name) or PagedLayer(kv_layer, self.block_size, self.key_width)
        for spec in meta.saves:
            start = self._save_start(spec)
            if start >= len(spec.token_ids):
                continue
            k, v = layer.gather(spec.block_ids, start, len(spec.token_ids))
            # Copy to host now: once the step ends vLLM may reuse these blocks.
            gathered = self._gathered.setdefault(spec.req_id, [])
            gathered.append((k.to("cpu", non_blocking=True), v.to("cpu", non_blocking=True)))

    def _save_start(self, spec: SaveSpec) -> int:
        """The first token to gather this step: the groups before it are already stored."""
        start = self._save_starts.get(spec.req_id)
        if start is None:
            start = self._save_starts[spec.req_id] = self.vua.prefix_length(
                torch.tensor(spec.token_ids, dtype=torch.long)
            )
        return start

    def wait_for_save(self) -> None:
        if self._loads:
            self._finish_loads()
        if not self._gathered:
            self._save_starts = {}
            return
        if any(layer.kv.is_cuda for layer in self._layers.values()):
            torch.cuda.current_stream().synchronize()  # the host copies of the blocks are complete
        meta = self._get_connector_metadata()
        specs = {spec.req_id: spec for spec in meta.saves}
        for req_id, layers in self._gathered.items():
            spec = specs[req_id]
            if len(layers) != len(self.layer_names):
                logger.warning(
                    "VUAConnector: request %s gathered %d of %d layers; not saved",
                    req_id,
                    len(layers),
                    len(self.layer_names),
                )
                continue
            tokens = torch.tensor(spec.token_ids, dtype=torch.long)
            self._writes.append(self._writer.submit(self._write, tokens, layers, self._save_start(spec)))
        self._gathered = {}
        self._save_starts = {}

    def _write(self, tokens: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], offset: int) -> None:
        try:
            self.vua.put(tokens, layers, offset=offset)
        except VUAError as exc:  # a failed save is a future miss, never a wrong answer
            logger.warning("VUAConnector: storing %d tokens failed: %s", tokens.numel(), exc)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # Loads finish within their step and saves hold no blocks: nothing is pending.
        self._writes = [w for w in self._writes if not w.done()]
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._loads:
            self._finish_loads()
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def flush(self) -> None:
        """Waits for background writes (tests and shutdown)."""
        for write in self._writes:
            write.result()
        self._writes = []

    def shutdown(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
        for vua in getattr(self, "rank_stores", [self.vua]):
            vua.close()


def _read_auth_key(path: str | None) -> bytes | None:
    """The store's MAC secret from a file (``auth_key_file``): a secret never goes in a command line."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as exc:
        raise VUAError(
            f"VUAConnector cannot read auth_key_file {path!r}: {exc.strerror}; "
            "point it at a file holding the store's secret (16 to 64 bytes)"
        ) from None
