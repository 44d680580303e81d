"""The connector's settings, from vLLM's config: checked once, the same for both roles."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vua.core import VUA, VUAConfig
from vua.errors import InvalidInputError
from vua.integration import parse_size, read_secret_file

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True)
class ConnectorSettings:
    """Everything either role needs to know, parsed from ``kv_connector_extra_config`` and vLLM's config.

    Raises (from :meth:`from_vllm`):
        InvalidInputError: a missing or malformed setting, with what to set.
    """

    root: str
    split_factor: int
    groups: tuple[CacheGroup, ...]  # vLLM's KV cache groups, in its order (their block ids come in it)
    layer_names: list[str]  # every layer the store holds, in the order the model runs them
    tp_size: int
    model_name: str
    kv_dtype: str
    kv_layout: str  # the KV cache spec's kind, heads, head size and cache dtype
    namespace_suffix: str  # the user's "namespace" setting
    index_path: str | None
    max_bytes: int | None
    auth_key: bytes | None = field(repr=False)
    shutdown_timeout: float = 4.0  # seconds pending saves get at shutdown; vLLM kills its engine 5 s after SIGTERM
    gpu_checksums: bool | None = None  # VUAConfig.gpu_checksums: None means on for CUDA caches
    load_failure_policy: str = "recompute"  # vLLM's kv_load_failure_policy
    # How loads run: "async" (off the engine's path, with a deadline) or "layerwise" (within
    # the step, overlapped with the forward; local roots only).
    load_mode: str = "async"
    load_timeout: float = 2.0  # seconds an asynchronous load gets before its first byte ...
    load_timeout_per_gib: float = 2.0  # ... plus this per GiB it reads (0.5 GiB/s at least)
    lookup_timeout: float = 0.5  # seconds the scheduler's lookup gets (it is asked again meanwhile)
    unhealthy_seconds: float = 30.0  # a store past a deadline is skipped this long, then tried again
    save_queue_bytes: int = 2 << 30  # host copies of saves waiting to be written, at most
    network_fs: bool | None = None  # VUAConfig.network_fs: None detects it from the root's file system type

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> ConnectorSettings:
        transfer = vllm_config.kv_transfer_config
        extra: dict[str, Any] = (transfer.kv_connector_extra_config if transfer else None) or {}
        _check_keys(extra, transfer)
        # "shared_storage_path" is the original project's name for it, kept as an alias.
        root = extra.get("vua_root") or extra.get("shared_storage_path")
        if not root or not isinstance(root, str):
            raise InvalidInputError(
                'VUAConnector needs "vua_root" (or "shared_storage_path") in kv_connector_extra_config: '
                "the store directory"
            )
        split_factor = _int_setting(extra, "split_factor", 256)
        specs = [group.kv_cache_spec for group in kv_cache_config.kv_cache_groups]
        if not specs:
            raise InvalidInputError("VUAConnector: this model keeps no KV cache; run it without a KV connector")
        groups = tuple(CacheGroup.of(g.layer_names, g.kv_cache_spec) for g in kv_cache_config.kv_cache_groups)
        _check_split_factor(split_factor, groups)
        layer_names = [name for group in groups for name in group.layer_names]
        if len(groups) > 1:  # one group's names are in the model's order already (and stores keep that order)
            layer_names.sort(key=_model_order)
        # Sizes read as `vua gc --max-bytes` reads them: "500G" or a number of bytes.
        max_bytes = parse_size(extra.get("max_bytes", 0), "VUAConnector: kv_connector_extra_config.max_bytes") or None
        model_name, kv_dtype, kv_layout = _namespace_parts(vllm_config, specs, groups)
        return cls(
            root=root,
            split_factor=split_factor,
            groups=groups,
            layer_names=layer_names,
            tp_size=vllm_config.parallel_config.tensor_parallel_size,
            model_name=model_name,
            kv_dtype=kv_dtype,
            kv_layout=kv_layout,
            namespace_suffix=str(extra.get("namespace", "")),
            index_path=extra.get("index_path"),
            max_bytes=max_bytes,
            auth_key=_read_auth_key(extra.get("auth_key_file")),
            shutdown_timeout=_seconds_setting(extra, "shutdown_timeout", 4.0),
            gpu_checksums=_optional_bool_setting(extra, "gpu_checksums"),
            # vLLM before 0.32 always recomputed what a connector failed to load.
            load_failure_policy=str(getattr(transfer, "kv_load_failure_policy", "recompute")),
            load_mode=_choice_setting(extra, "load_mode", ("async", "layerwise")),
            load_timeout=_seconds_setting(extra, "load_timeout", 2.0),
            load_timeout_per_gib=_seconds_setting(extra, "load_timeout_per_gib", 2.0),
            lookup_timeout=_seconds_setting(extra, "lookup_timeout", 0.5),
            unhealthy_seconds=_seconds_setting(extra, "unhealthy_seconds", 30.0),
            network_fs=_optional_bool_setting(extra, "network_fs"),
            save_queue_bytes=parse_size(
                extra.get("save_queue_bytes", 2 << 30), "VUAConnector: kv_connector_extra_config.save_queue_bytes"
            ),
        )

    def namespace(self, rank: int) -> str:
        """Model, KV dtype, tensor-parallel rank and layout: entries never mix across any of them."""
        parts = ["vllm", self.model_name, self.kv_dtype, f"tp{rank}-of-{self.tp_size}", self.kv_layout]
        return "/".join(parts + ([self.namespace_suffix] if self.namespace_suffix else []))

    def open_store(self, rank: int) -> VUA:
        """The store of one tensor-parallel rank's shard of the KV."""
        config = VUAConfig(
            split_factor=self.split_factor,
            namespace=self.namespace(rank),
            index_path=self.index_path,
            max_bytes=self.max_bytes,
            auth_key=self.auth_key,
            gpu_checksums=self.gpu_checksums,
            network_fs=self.network_fs,
        )
        return VUA(config, self.root)


@dataclass(frozen=True)
class CacheGroup:
    """One of vLLM's KV cache groups: layers that share a block table and an attention kind.

    Full attention keeps every block of a request; sliding-window attention (with vLLM's
    hybrid KV cache manager) frees the blocks that fall out of the window while a prompt is
    still being prefilled, and gives a loaded prompt real blocks only for its last window
    (the others are vLLM's null block).
    """

    layer_names: list[str]
    block_size: int
    key_width: int | None  # where K ends in a layer's content (the head size), if the spec says
    sliding_window: int | None  # tokens, for sliding-window groups

    @classmethod
    def of(cls, layer_names: list[str], spec: Any) -> CacheGroup:
        from vllm.v1 import kv_cache_interface as kinds

        # Exact kinds: subclasses of these free blocks in other patterns (RSWASpec evicts a
        # middle gap, for instance), which the saves below do not expect.
        full = {kinds.FullAttentionSpec, kinds.MLAAttentionSpec}
        sliding = {kinds.SlidingWindowSpec, getattr(kinds, "SlidingWindowMLASpec", kinds.SlidingWindowSpec)}
        if type(spec) not in full | sliding:
            raise InvalidInputError(
                f"VUAConnector stores attention KV of full-attention and sliding-window layers; layers "
                f"{list(layer_names)[:2]}... keep a {type(spec).__name__} (state-space, local-chunk, cross- or "
                "encoder-only attention). Run this model without the connector."
            )
        window = spec.sliding_window if type(spec) in sliding else None
        return cls(list(layer_names), spec.block_size, getattr(spec, "head_size", None), window)


def _check_split_factor(split_factor: int, groups: tuple[CacheGroup, ...]) -> None:
    """A group must fill whole blocks of every KV cache group, and fit a sliding window.

    A group is saved in the step that computes its last token; its first block is still
    held then only if the group is no longer than the window (vLLM frees a block once the
    next token's window has passed it).
    """
    sizes = sorted({g.block_size for g in groups})
    step = math.lcm(*sizes)
    windows = [g.sliding_window for g in groups if g.sliding_window]
    if split_factor <= 0 or split_factor % step:
        raise InvalidInputError(
            f"VUAConnector: split_factor {split_factor} is not a multiple of vLLM's block size "
            f"{'/'.join(map(str, sizes))}; set kv_connector_extra_config.split_factor to a multiple of {step} "
            f"(e.g. {step * max(1, split_factor // step)})"
        )
    if windows and split_factor > min(windows):
        fits = min(windows) // step * step
        advice = f"at most {fits} (a multiple of {step})" if fits else f"a multiple of {step}, which no window fits"
        raise InvalidInputError(
            f"VUAConnector: split_factor {split_factor} is longer than this model's sliding window "
            f"({min(windows)} tokens); set kv_connector_extra_config.split_factor to {advice}"
        )


def _model_order(layer_name: str) -> tuple[list[int], str]:
    """Sorts layer names as the model runs them: by the numbers in them ("model.layers.12.attn")."""
    return [int(part) for part in layer_name.split(".") if part.isdigit()], layer_name


def _namespace_parts(vllm_config: VllmConfig, specs: list[Any], groups: tuple[CacheGroup, ...]) -> tuple[str, str, str]:
    """(model, KV dtype, KV layout) as they go into a store's namespace."""
    model = vllm_config.model_config
    name = getattr(model, "model", "unknown-model") if model is not None else "unknown-model"
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(getattr(specs[0], "dtype", "")).removeprefix("torch.") or str(cache_dtype)
    layouts = []
    for spec, group in zip(specs, groups):
        window = f"-w{group.sliding_window}" if group.sliding_window else ""
        layouts.append(
            f"{type(spec).__name__}-h{getattr(spec, 'num_kv_heads', '?')}"
            f"-d{getattr(spec, 'head_size', '?')}{window}-cache-{cache_dtype}"
        )
    return str(name), dtype, "+".join(layouts)


# Every key the connector reads from kv_connector_extra_config ("shared_storage_path": the
# original project's name for "vua_root").
KEYS = (
    "vua_root",
    "shared_storage_path",
    "index_path",
    "split_factor",
    "max_bytes",
    "namespace",
    "auth_key_file",
    "shutdown_timeout",
    "gpu_checksums",
    "load_mode",
    "load_timeout",
    "load_timeout_per_gib",
    "lookup_timeout",
    "unhealthy_seconds",
    "save_queue_bytes",
    "network_fs",
)
# Keys vLLM itself writes into the dict, which are not the user's to get wrong: vLLM 0.33 adds
# only "cpu_bytes_to_use" (VllmConfig._post_init_kv_transfer_config, for --kv-offloading-size).
_VLLMS_KEYS = frozenset({"cpu_bytes_to_use"})


def _check_keys(extra: dict[str, Any], transfer: object) -> None:
    """Refuses keys the connector does not read: a misspelt setting would otherwise be ignored."""

    def advice(key: object) -> str:
        if key in getattr(transfer, "__dataclass_fields__", {}):
            return "a field of kv_transfer_config itself: move it out of kv_connector_extra_config"
        nearest = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.6)
        return f"did you mean {nearest[0]}?" if nearest else f"the connector reads {', '.join(KEYS)}"

    unknown = [key for key in extra if key not in KEYS and key not in _VLLMS_KEYS]
    if unknown:
        raise InvalidInputError(
            "VUAConnector: kv_connector_extra_config has keys the connector does not read, which would be "
            f"ignored: {'; '.join(f'{key!r} ({advice(key)})' for key in unknown)}"
        )


def _int_setting(extra: dict[str, Any], name: str, default: int) -> int:
    value = extra.get(name, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"VUAConnector: kv_connector_extra_config.{name} must be an integer, got {value!r}"
        ) from None


def _choice_setting(extra: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when absent)."""
    value = extra.get(name, choices[0])
    if value not in choices:
        raise InvalidInputError(
            f"VUAConnector: kv_connector_extra_config.{name} must be one of {', '.join(map(repr, choices))}, "
            f"got {value!r}"
        )
    return str(value)


def _optional_bool_setting(extra: dict[str, Any], name: str) -> bool | None:
    value = extra.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidInputError(
            f"VUAConnector: kv_connector_extra_config.{name} must be true, false or absent, got {value!r}"
        )
    return value


def _seconds_setting(extra: dict[str, Any], name: str, default: float) -> float:
    value = extra.get(name, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
        if not seconds >= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"VUAConnector: kv_connector_extra_config.{name} must be a number of seconds >= 0, got {value!r}"
        ) from None
    return seconds


def _read_auth_key(path: str | None) -> bytes | None:
    """The store's MAC secret from a file (``auth_key_file``): a secret never goes in a command line."""
    return read_secret_file(path, "VUAConnector's auth_key_file") if path else None
