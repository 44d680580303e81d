"""The dtypes a fragment can hold, by their safetensors names, without importing torch.

Parsing and checking fragments (``vua verify``, ``vua rebuild-index``, ``vua stats``)
needs only each dtype's name and width; torch is imported only where a tensor is made.
That keeps the ``vua`` command quick to start (importing torch takes seconds).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> bytes per element
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}


@cache
def _tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    by_name = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    if hasattr(torch, "float8_e8m0fnu"):  # torch 2.7 and newer
        by_name["F8_E8M0"] = torch.float8_e8m0fnu
    return by_name, {dtype: name for name, dtype in by_name.items()}


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (KeyError for one this torch lacks)."""
    return _tables()[0][name]


def name_of(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype; None when safetensors cannot store it."""
    return _tables()[1].get(dtype)
