"""What an engine integration needs beyond ``vua.core``: the public ground the vLLM connector stands on.

Integrations (``vua.vllm``, an SGLang backend, your own) import from here and from
``vua.core``, never from VUA's private modules, so that those can change freely:

- :func:`word_sums`: the GPU-checkable sums of a put's K and V, computed where the KV lives
  (on a GPU nearly free), to hand to ``VUA.put(..., word_sums=)`` so no host thread hashes
  the same bytes again;
- :func:`read_secret_file`: a store's ``auth_key`` from a file, byte for byte, as the
  ``vua`` command and ``VUAConfig`` users must read it to get the same key;
- :func:`parse_size`: sizes written as text in a config ("500M", "10G");
- :class:`BoundedCalls` and :class:`StoreHealth`: store calls an engine waits for, each with
  a deadline, and a store that keeps failing skipped for a while (a network file system
  that slows down or stops answering must not stall a server).

A load into an engine's own memory takes a :class:`vua.KVDestination` (``VUA.load(...,
into=)``); the counters an engine reports are ``VUA.stats()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vua._deadline import BoundedCalls, StoreHealth
from vua._mac import read_secret
from vua._sizes import parse_size as _parse_size

if TYPE_CHECKING:
    import torch

__all__ = ["BoundedCalls", "StoreHealth", "parse_size", "read_secret_file", "word_sums"]


def word_sums(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]], tokens: int, split_factor: int
) -> torch.Tensor | None:
    """The word sums of every (row, group, tensor) of a put, computed on the tensors' device.

    Args:
        layers: per layer ``(K, V)``, each ``(batch, kv_heads, seq >= tokens, head_dim)``;
            for a part of the model (one layer, say), sums of the parts concatenated along
            the last dimension, in layer order, are the sums of the whole.
        tokens: the tokens to cover from position 0 of ``layers``, a multiple of ``split_factor``.
        split_factor: the store's.

    Returns:
        int64 ``(batch, tokens // split_factor, 2 * layers)`` (K0, V0, K1, ... as the
        fragment stores them) on the tensors' device, for ``VUA.put(..., word_sums=)``; None
        when a head's run of a group is not whole 4 KiB rows (the store then hashes on the host).
    """
    from vua import _wordsum

    return _wordsum.tensor_wordsums(layers, tokens, split_factor)


def read_secret_file(path: str, setting: str = "auth_key_file") -> bytes:
    """A store's secret (``VUAConfig(auth_key=...)``) from a file: its bytes exactly, nothing stripped.

    Raises:
        InvalidInputError: the file cannot be read, or does not hold 16 to 64 bytes
            (``setting`` names it in the message).
    """
    return read_secret(path, setting)


def parse_size(value: int | str, what: str = "a size") -> int:
    """A size in bytes from an int or text: '500M', '10G', '1.5TiB', '4096' (multiples are binary).

    Raises:
        InvalidInputError: not a size (``what`` names the setting in the message).
    """
    return _parse_size(value, what)
