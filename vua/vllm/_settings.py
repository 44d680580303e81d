"""The connector's settings, from vLLM's config: checked once, the same for both roles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vua.core import VUA, VUAConfig
from vua.errors import InvalidInputError

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
    block_size: int
    layer_names: list[str]
    key_width: int | None  # where K ends in a layer's content (the head size), if the spec says
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

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> ConnectorSettings:
        transfer = vllm_config.kv_transfer_config
        extra: dict[str, Any] = (transfer.kv_connector_extra_config if transfer else None) or {}
        # "shared_storage_path" is the original project's name for it, kept as an alias.
        root = extra.get("vua_root") or extra.get("shared_storage_path")
        if not root or not isinstance(root, str):
            raise InvalidInputError(
                'VUAConnector needs "vua_root" (or "shared_storage_path") in kv_connector_extra_config: '
                "the store directory"
            )
        block_size = vllm_config.cache_config.block_size
        split_factor = _int_setting(extra, "split_factor", 256)
        if split_factor <= 0 or split_factor % block_size:
            raise InvalidInputError(
                f"VUAConnector: split_factor {split_factor} is not a multiple of vLLM's block size "
                f"{block_size}; set kv_connector_extra_config.split_factor to a multiple of it "
                f"(e.g. {block_size * max(1, split_factor // block_size)})"
            )
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise InvalidInputError(
                f"VUAConnector supports models with one KV cache group; this one has {len(groups)} "
                "(hybrid or sliding-window models). Run without the connector for this model."
            )
        spec = groups[0].kv_cache_spec
        max_bytes = _int_setting(extra, "max_bytes", 0) or None
        model_name, kv_dtype, kv_layout = _namespace_parts(vllm_config, spec)
        return cls(
            root=root,
            split_factor=split_factor,
            block_size=block_size,
            layer_names=list(groups[0].layer_names),
            key_width=getattr(spec, "head_size", None),
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
        )
        return VUA(config, self.root)


def _namespace_parts(vllm_config: VllmConfig, spec: Any) -> tuple[str, str, str]:
    """(model, KV dtype, KV layout) as they go into a store's namespace."""
    model = vllm_config.model_config
    name = getattr(model, "model", "unknown-model") if model is not None else "unknown-model"
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(getattr(spec, "dtype", "")).removeprefix("torch.") or str(cache_dtype)
    layout = (
        f"{type(spec).__name__}-h{getattr(spec, 'num_kv_heads', '?')}"
        f"-d{getattr(spec, 'head_size', '?')}-cache-{cache_dtype}"
    )
    return str(name), dtype, layout


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
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as exc:
        raise InvalidInputError(
            f"VUAConnector cannot read auth_key_file {path!r}: {exc.strerror}; "
            "point it at a file holding the store's secret (16 to 64 bytes)"
        ) from None
