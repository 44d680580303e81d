"""Checks of what callers pass in: each failure is an InvalidInputError saying what to pass instead.

Everything here runs before anything touches the disk, so bad input leaves the store as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from vua import _dtypes
from vua._keys import tokens_as_int64
from vua._kv_layout import Layout
from vua.errors import InvalidInputError, SplitFactorError

KVData = Sequence[tuple[torch.Tensor, torch.Tensor]]


class LayeredCache(Protocol):
    """A model's cache object holding per-layer K and V: transformers' ``Cache`` (``DynamicCache``,
    ``StaticCache``), whose ``layers[i].keys`` / ``.values`` are ``[batch, kv_heads, seq, head_dim]``.
    Recognised by that shape alone, so the core never imports transformers."""

    @property
    def layers(self) -> Sequence[Any]: ...


def cache_layers(cache: LayeredCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (key, value) tensors of a cache object's layers, without copying them.

    Raises:
        InvalidInputError: a layer holds no KV tensors yet, or only the last positions of
            what it has seen (a sliding-window or quantized layer: the stored prefix would be
            other positions' KV).
    """
    pairs = []
    for i, layer in enumerate(cache.layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4 or v.dim() != 4:
            got = list(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
            raise InvalidInputError(
                f"the cache's layer {i} ({type(layer).__name__}) holds no KV tensors [batch, kv_heads, seq, head_dim] "
                f"(keys: {got}); run the model with this cache first, or pass a list of (key, value) pairs"
            )
        seen = layer.get_seq_length() if callable(getattr(layer, "get_seq_length", None)) else None
        if seen is not None and k.shape[2] < int(seen):
            raise InvalidInputError(
                f"the cache's layer {i} ({type(layer).__name__}) keeps {k.shape[2]} of the {int(seen)} positions it "
                "has seen (a sliding-window or quantized layer), so its KV is not the prompt's from position 0; "
                "pass a cache whose layers keep every position, e.g. a DynamicCache of a full-attention model"
            )
        pairs.append((k, v))
    return pairs


def check_storage(t: torch.Tensor, what: str) -> None:
    """Refuses tensors whose bytes cannot be read: sparse or other layouts, the meta device."""
    if t.layout != torch.strided:
        raise InvalidInputError(f"{what} is a {t.layout} tensor; pass a dense one (t.to_dense())")
    if t.device.type == "meta":
        raise InvalidInputError(f"{what} is on the meta device and holds no data; pass a materialised tensor")


def single_row(tokens: object) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise InvalidInputError(
            f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}; "
            "wrap a list of ids with torch.tensor(ids)"
        )
    check_storage(tokens, "tokens")
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        return tokens[0]
    if tokens.dim() != 1:
        raise InvalidInputError(
            f"tokens must be shaped [n] or [1, n], got {list(tokens.shape)}; pass a batch to "
            "get_closest as a list of 1-D tensors"
        )
    return tokens


def int64_ids(row: torch.Tensor) -> np.ndarray:
    try:
        return tokens_as_int64(row)
    except TypeError as exc:
        raise InvalidInputError(f"{exc}; convert with tokens.long()") from None


def checked_put(
    tokens: torch.Tensor,
    data: KVData | LayeredCache,
    offset: int,
    split_factor: int,
    *,
    data_rows: Sequence[int] | None = None,
) -> tuple[list[torch.Tensor], Layout, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Validates put's arguments (``data`` a list of (key, value) pairs or a cache object); raises before anything touches the disk.

    ``data_rows``: where each token row's KV lies in ``data``'s batch dimension (``put_groups``);
    None: row for row.
    """
    if not isinstance(tokens, torch.Tensor):
        raise InvalidInputError(
            f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}; "
            "wrap a list of ids with torch.tensor(ids)"
        )
    check_storage(tokens, "tokens")
    if tokens.dim() == 1:
        rows = [tokens]
    elif tokens.dim() == 2:
        rows = list(tokens)
    else:
        raise InvalidInputError(f"tokens must be shaped [n], [1, n] or [B, n], got {list(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise InvalidInputError(f"tokens must hold integer ids, got dtype {tokens.dtype}; convert with tokens.long()")
    if data_rows is not None and (
        len(data_rows) != len(rows) or not all(isinstance(r, int) and not isinstance(r, bool) for r in data_rows)
    ):
        raise InvalidInputError(f"rows must be one int per row of groups ({len(rows)}), got {len(data_rows)} values")
    n, s = tokens.shape[-1], split_factor
    if n % s:
        raise SplitFactorError(
            f"put got {n} tokens, not a multiple of this store's split_factor={s}; cut them with the "
            f"store's own config, vua.config.trim_to_split_factor(tokens) (here to {n - n % s}), and the KV to match"
        )
    if not isinstance(offset, int) or offset % s or not 0 <= offset <= n:
        raise InvalidInputError(f"offset must be a multiple of split_factor={s} between 0 and {n}, got {offset!r}")
    batch = len(rows)
    if not isinstance(data, (list, tuple)) and hasattr(data, "layers"):
        data = cache_layers(data)
    if not isinstance(data, (list, tuple)) or not data:
        raise InvalidInputError(
            "data must be a non-empty list over layers of (key, value) tensor pairs, or a cache object with "
            "layers[i].keys and .values (transformers' DynamicCache)"
        )
    layers, shapes, dtypes = [], [], set()
    for i, pair in enumerate(data):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InvalidInputError(f"data[{i}] must be a (key, value) pair, got {type(pair).__name__}")
        for name, t in zip(("key", "value"), pair):
            if isinstance(t, torch.Tensor):
                check_storage(t, f"data[{i}] {name}")
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidInputError(
                    f"data[{i}] {name} must be a 4-D tensor [batch, kv_heads, seq, head_dim], got {got}"
                )
            if data_rows is None and t.shape[0] != batch:
                raise InvalidInputError(
                    f"data[{i}] {name} has batch {t.shape[0]} but tokens has {batch} rows; they must agree"
                )
            if data_rows is not None and not all(0 <= r < t.shape[0] for r in data_rows):
                raise InvalidInputError(
                    f"rows must index data's batch dimension, 0 to {t.shape[0] - 1}; got {list(data_rows)[:8]}..."
                )
            if t.shape[2] < n - offset:
                hint = (
                    f"; it looks laid out [batch, seq, heads, head_dim] (dimension 1 has {t.shape[1]}): "
                    "VUA takes [batch, kv_heads, seq, head_dim], so pass k.transpose(1, 2)"
                    if t.shape[1] >= n - offset
                    else "; pass the KV of every token"
                )
                raise InvalidInputError(
                    f"data[{i}] {name} shaped {list(t.shape)} covers {t.shape[2]} positions in dimension 2, "
                    f"fewer than the {n - offset} tokens{hint}"
                )
            if t.shape[1] == 0 or t.shape[3] == 0:
                raise InvalidInputError(f"data[{i}] {name} has an empty head or head_dim dimension")
            dtypes.add(t.dtype)
        k, v = pair
        layers.append((k, v))
        shapes.append(((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])))
    if len(dtypes) != 1:
        raise InvalidInputError(
            f"all layers must share one dtype, got {sorted(map(str, dtypes))}; cast them with .to(dtype)"
        )
    dtype = dtypes.pop()
    if _dtypes.name_of(dtype) is None:
        raise InvalidInputError(f"dtype {dtype} cannot be stored in safetensors; cast the KV to a supported dtype")
    return rows, Layout.of(dtype, tuple(shapes)), layers


# -- get ----------------------------------------------------------------------------


def checked_offset(offset: int, split_factor: int) -> int:
    """The first group a load reads, from the token position ``offset`` (see ``VUA.load``)."""
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidInputError(f"offset must be a token position (an int >= 0), got {offset!r}")
    if offset % split_factor:
        raise SplitFactorError(
            f"offset={offset} is not a multiple of split_factor={split_factor}: loads begin at a group boundary; "
            f"pass {offset // split_factor * split_factor} (the group holding it) and skip the tokens before it"
        )
    return offset // split_factor


def checked_word_sums(word_sums: object) -> np.ndarray | None:
    """``put``'s word sums (int64 on any device, see ``vua.integration.word_sums``) as host uint64."""
    if word_sums is None:
        return None
    if not isinstance(word_sums, torch.Tensor) or word_sums.dtype != torch.int64 or word_sums.dim() != 3:
        raise InvalidInputError(
            "word_sums must be the int64 (rows, groups, 2 * layers) tensor vua.integration.word_sums returns, "
            f"got {type(word_sums).__name__} {getattr(word_sums, 'dtype', '')}"
        )
    return word_sums.cpu().numpy().view(np.uint64)


def checked_destination(into: object) -> None:
    """Refuses an ``into=`` that is not a destination, before any fragment is opened."""
    if into is not None and not callable(getattr(into, "chunks", None)):
        raise InvalidInputError(
            f"into must be a vua.KVDestination (an object with chunks(group, layer)), got {type(into).__name__}"
        )


def checked_device(device: str | torch.device) -> torch.device:
    """The device a load writes to: the CPU or a CUDA device with its index filled in."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"device {device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {str(device)!r} asked for, but torch sees no CUDA device; pass device='cpu'"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise InvalidInputError(f"device {str(device)!r} is not supported; pass 'cpu' or a CUDA device")
    return device
