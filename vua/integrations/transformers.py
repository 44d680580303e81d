"""Hugging Face transformers: restore a prompt's stored prefix as the model's cache, prefill the rest.

    from vua.core import VUA, VUAConfig
    from vua.integrations.transformers import prefill, model_namespace

    vua = VUA(VUAConfig(namespace=model_namespace(model)), "/mnt/kv")
    result = prefill(model, vua, input_ids)[0]     # cache, logits, cached_tokens
    model.generate(input_ids, past_key_values=result.cache, ...)

transformers is imported only when this module is, never by ``import vua``. Works with
transformers 5.x, whose forward takes the cache as ``past_key_values=`` (``cache=`` from
5.24); :func:`cache_keyword` picks the one the installed model accepts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vua.core import VUA, ClosestKV
from vua.errors import InvalidInputError, missing_extra

try:
    from transformers import DynamicCache, PreTrainedModel
except ImportError as exc:
    raise missing_extra("vua.integrations.transformers", "transformers", "transformers", exc) from exc

__all__ = [
    "PrefillResult",
    "restore",
    "cache_keyword",
    "cache_to_kv",
    "output_cache",
    "closest_to_cache",
    "generate",
    "model_namespace",
    "prefill",
]


def model_namespace(model: PreTrainedModel, *, extra: str = "") -> str:
    """A namespace that differs whenever the KV would: model, config, dtype and KV layout.

    Two models sharing one root never see each other's entries. The config is hashed
    whole, so two checkpoints with one name but different shapes also stay apart.
    """
    config = model.config
    name = getattr(config, "_name_or_path", "") or config.model_type
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    parts = [name, f"config-{digest}", dtype, "hf-bhsd"]
    return "/".join(parts + ([extra] if extra else []))


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward keyword that takes a cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def output_cache(out: object) -> DynamicCache:
    """The cache a forward returned: ``out.cache`` from transformers 5.24 on (where reading
    ``past_key_values`` logs a deprecation warning), ``out.past_key_values`` before."""
    fields = getattr(out, "__dataclass_fields__", {})
    return out.cache if "cache" in fields else out.past_key_values  # type: ignore[attr-defined]


def closest_to_cache(hit: ClosestKV | None, model: PreTrainedModel, *, tokens: int | None = None) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` holding the hit's KV (its first ``tokens`` positions).

    None gives an empty cache.
    """
    if hit is None:
        return DynamicCache(config=model.config)
    n = hit.tokens.shape[-1] if tokens is None else tokens
    return DynamicCache(ddp_cache_data=[(k[:, :, :n], v[:, :, :n]) for k, v in hit.data], config=model.config)


def cache_to_kv(
    cache: DynamicCache | Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cache's per-layer (key, value) tensors in put's layout, without copying them."""
    if isinstance(cache, DynamicCache):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]


@dataclass
class PrefillResult:
    """What :func:`prefill` returns for one prompt.

    Attributes:
        cache: the model's cache for the whole prompt (restored prefix + computed rest).
        logits: logits of the positions that were computed, ``(1, computed, vocab)``.
        cached_tokens: how many leading tokens came from the store.
        stored_groups: groups this call added to the store.
        seconds: wall time of lookup, restore and prefill (time to first token's logits).
    """

    cache: DynamicCache
    logits: torch.Tensor
    cached_tokens: int
    stored_groups: int
    seconds: float


def _rows(input_ids: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            return [input_ids]
        if input_ids.dim() == 2:
            return list(input_ids)
    elif isinstance(input_ids, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in input_ids):
        return list(input_ids)
    raise InvalidInputError("input_ids must be [n], [B, n] or a list of 1-D tensors (prompts of different lengths)")


def restore(model: PreTrainedModel, vua: VUA, row: torch.Tensor) -> tuple[DynamicCache, int]:
    """A cache holding the longest stored prefix of one prompt, and that prefix's length.

    At most ``n - 1`` tokens are restored (in whole groups): the last token must run
    through the model to give logits.
    """
    device = next(model.parameters()).device
    hit = vua.get_closest(row, device=device)
    limit = (row.numel() - 1) // vua.config.split_factor * vua.config.split_factor
    cached = 0 if hit is None else min(hit.tokens.numel(), limit)
    return closest_to_cache(hit if cached else None, model, tokens=cached), cached


def _store(vua: VUA, row: torch.Tensor, cache: DynamicCache) -> int:
    whole = vua.config.trim_to_split_factor(row)
    # put takes the cache itself, and refuses layers that no longer hold the prompt's first
    # positions (sliding-window, quantized) instead of storing other positions' KV.
    return vua.put(whole, cache) if whole.numel() else 0


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    vua: VUA,
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    *,
    store: bool = True,
) -> list[PrefillResult]:
    """Prefills each prompt from its longest stored prefix and stores what is new.

    Each prompt is looked up on its own, so prompts of a batch may have different cached
    lengths. The prompt's whole groups are then stored (groups already stored are skipped).

    Args:
        model: a causal LM whose cache is a ``DynamicCache``.
        vua: the store; its namespace should come from :func:`model_namespace`.
        input_ids: ``[n]``, ``[B, n]`` or a list of 1-D tensors.
        store: put the prompt's whole groups after prefill.

    Returns:
        One :class:`PrefillResult` per prompt; cache and logits on the model's device.
    """
    device = next(model.parameters()).device
    keyword = cache_keyword(model)
    results = []
    for row in _rows(input_ids):
        started = time.perf_counter()
        cache, cached = restore(model, vua, row)
        out = model(input_ids=row[cached:].to(device)[None], **{keyword: cache}, use_cache=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        returned = output_cache(out)
        stored = _store(vua, row, returned) if store else 0
        results.append(PrefillResult(returned, out.logits, cached, stored, seconds))
    return results


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    vua: VUA,
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    *,
    max_new_tokens: int = 32,
    store: bool = True,
    **generate_kwargs: object,
) -> list[torch.Tensor]:
    """Greedy generation (unless ``generate_kwargs`` say otherwise) per prompt, its prefix restored.

    ``model.generate`` prefills only what the store did not have; the prompt's whole
    groups are stored afterwards.

    Returns:
        Per prompt, the prompt followed by the new tokens, ``(1, n + new)``.
    """
    device = next(model.parameters()).device
    keyword = cache_keyword(model)
    outputs = []
    for row in _rows(input_ids):
        cache, _ = restore(model, vua, row)
        generate_kwargs.setdefault("do_sample", False)
        out = model.generate(row.to(device)[None], **{keyword: cache}, max_new_tokens=max_new_tokens, **generate_kwargs)
        if store:
            _store(vua, row, cache)  # generate filled the same cache object in place
        outputs.append(out)
    return outputs
