"""The shape of one group's KV (:class:`Layout`) and the names and bit views its tensors go by.

Below the fragment files and the index: a layout is written in each fragment as JSON and
its 64-bit id in each index record, so a lookup can tell without reading files whether
groups fit together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from vua import _dtypes
from vua.errors import FragmentError

if TYPE_CHECKING:
    import torch

TOKENS = "tokens"

_BITS_BY_SIZE: dict[int, type[np.generic]] = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def loads_untrusted(text: str | bytes) -> Any:
    """``json.loads`` for text read from a fragment: hostile nesting is a ValueError, like any malformed JSON.

    A header of 100k ``[`` makes the parser recurse past Python's limit; that is damage,
    not a reason to fail the caller.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def is_size(value: object) -> bool:
    """A non-negative JSON integer (``true`` is a bool in JSON, not a size, though Python calls it an int)."""
    return type(value) is int and value >= 0


def bits_dtype(itemsize: int) -> type[np.generic]:
    """The numpy integer type ``itemsize`` bytes wide: the carrier for copying a dtype's bit patterns."""
    return _BITS_BY_SIZE[itemsize]


def as_bits(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor's bit patterns (see :func:`bits_dtype`)."""
    import torch

    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(carrier).numpy()


def key_name(layer: int) -> str:
    return f"layers.{layer}.key"


def value_name(layer: int) -> str:
    return f"layers.{layer}.value"


@dataclass(frozen=True)
class Layout:
    """The shape of one group's KV: a dtype and each layer's (heads, head_dim) for K and V.

    Every group of a stored prefix must share one layout; its JSON form is written in each
    fragment and its 64-bit id in each index record, so a lookup can tell without reading
    files whether groups fit together.
    """

    dtype_name: str  # safetensors' name: "BF16", "F32", ...
    layers: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    @classmethod
    def of(cls, dtype: torch.dtype, layers: tuple[tuple[tuple[int, int], tuple[int, int]], ...]) -> Layout:
        """The layout of KV in ``dtype`` (one safetensors can store) with per-layer (heads, head_dim)."""
        name = _dtypes.name_of(dtype)
        if name is None:
            raise ValueError(f"safetensors cannot store {dtype}")
        return cls(name, layers)

    @property
    def dtype(self) -> torch.dtype:
        return _dtypes.to_torch(self.dtype_name)

    @cached_property
    def json(self) -> str:
        body = {"dtype": self.dtype_name, "layers": [list(map(list, kv)) for kv in self.layers]}
        return json.dumps(body, separators=(",", ":"))

    @cached_property
    def id(self) -> int:
        return xxhash.xxh3_64_intdigest(self.json.encode())

    @classmethod
    def from_json(cls, text: str) -> Layout:
        """Parses a layout written by :attr:`json`; raises FragmentError when malformed."""
        try:
            body = loads_untrusted(text)
            dtype = body["dtype"]
            if dtype not in _dtypes.ITEMSIZE:
                raise ValueError(f"unknown dtype {dtype!r}")
            layers = tuple(((k[0], k[1]), (v[0], v[1])) for k, v in body["layers"])
            if not all(is_size(n) for kv in layers for shape in kv for n in shape):
                raise ValueError("a dimension is not a non-negative integer")
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise FragmentError(f"malformed layout {text[:80]!r}: {exc}") from None
        if not layers or any(n <= 0 for kv in layers for shape in kv for n in shape):
            raise FragmentError(f"layout {text[:80]!r} has no layers or an empty dimension")
        return cls(dtype, layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def describe(self) -> str:
        """The layout in words, for messages: ``"32 layers of 8 KV heads x 128, BF16"``."""
        shapes = {shape for kv in self.layers for shape in kv}
        if len(shapes) == 1:
            ((heads, dim),) = shapes
            return f"{self.num_layers} layers of {heads} KV heads x {dim}, {self.dtype_name}"
        return f"{self.num_layers} layers of mixed (heads, head_dim), {self.dtype_name}"

    def tensor_specs(self, split_factor: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, safetensors dtype name, shape) of every tensor of a fragment, in file order."""
        specs: list[tuple[str, str, tuple[int, ...]]] = [(TOKENS, "I64", (split_factor,))]
        for i, ((kh, kd), (vh, vd)) in enumerate(self.layers):
            specs.append((key_name(i), self.dtype_name, (kh, split_factor, kd)))
            specs.append((value_name(i), self.dtype_name, (vh, split_factor, vd)))
        return specs

    def kv_bytes(self, split_factor: int) -> int:
        """Bytes of K and V data in one group (tokens excluded)."""
        elems = sum(kh * kd + vh * vd for (kh, kd), (vh, vd) in self.layers)
        return elems * split_factor * _dtypes.ITEMSIZE[self.dtype_name]
