"""Single tensors to and from safetensors bytes, for callers that move KV over the wire.

The bytes are a complete safetensors file holding one tensor under ``name``: what
``safetensors.torch.save`` writes and ``safetensors.torch.load`` reads, every dtype that
format supports included (bf16 and fp8).
"""

from __future__ import annotations

import safetensors.torch
import torch

from vua.errors import InvalidInputError

__all__ = ["tensor_to_bytes", "bytes_to_tensor"]


def tensor_to_bytes(t: torch.Tensor, name: str = "tensor") -> bytes:
    """Serialises ``t`` as a one-tensor safetensors file. A CPU copy is made if needed."""
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"tensor_to_bytes takes a torch.Tensor, got {type(t).__name__}")
    return safetensors.torch.save({name: t.detach().to("cpu").contiguous()})


def bytes_to_tensor(b: bytes, name: str = "tensor") -> torch.Tensor:
    """Reads tensor ``name`` back from safetensors bytes (a CPU tensor).

    ``name`` defaults to the one :func:`tensor_to_bytes` uses, as in the original project.

    Raises:
        InvalidInputError: the bytes are not safetensors, or hold no tensor ``name``.
    """
    try:
        tensors = safetensors.torch.load(bytes(b))
    except Exception as exc:  # safetensors raises its own SafetensorError for bad bytes
        raise InvalidInputError(f"bytes are not a safetensors file: {exc}") from None
    if name not in tensors:
        raise InvalidInputError(f"no tensor named {name!r} in these bytes; found {sorted(tensors)}")
    return tensors[name]
