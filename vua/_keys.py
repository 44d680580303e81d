"""Group keys: the chained xxh3-128 hash that names every stored group of tokens.

Group ``i`` of a prompt is named ``h_i = xxh3_128(h_(i-1) + bytes(group_i))`` where the
token ids are taken as little-endian int64 whatever their tensor dtype, and ``h_(-1)``
is derived from the namespace. Equal prefixes under one namespace therefore get equal
keys, and a key names its whole prefix, not just its own tokens.

This module is the bottom of the design: it knows tokens and bytes, nothing of files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import xxhash

if TYPE_CHECKING:
    import torch  # imported where used: the maintenance commands check key chains without torch

TOKEN_DTYPE = np.dtype("<i8")  # the canonical on-disk and hashing form of token ids

_ROOT_DOMAIN = b"vua/group-key/v1\x00"


def namespace_seed(namespace: str) -> bytes:
    """Returns h_(-1), the digest every key chain of ``namespace`` starts from."""
    return xxhash.xxh3_128_digest(_ROOT_DOMAIN + namespace.encode("utf-8"))


def tokens_as_int64(tokens: torch.Tensor) -> np.ndarray:
    """Returns the token ids of a 1-D tensor as a contiguous little-endian int64 array.

    Raises:
        TypeError: if ``tokens`` is not an integer tensor.
    """
    import torch

    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.device.type != "cpu":
        tokens = tokens.cpu()
    if tokens.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # numpy conversion of these dtypes is recent in torch; widening first is portable.
        tokens = tokens.to(torch.int64)
    return np.ascontiguousarray(tokens.numpy(), dtype=TOKEN_DTYPE)


def chain_key(parent: bytes, token_bytes: bytes | memoryview) -> bytes:
    """The key of a group whose tokens are ``token_bytes`` (little-endian int64) after the group keyed ``parent``."""
    return xxhash.xxh3_128_digest(bytes(parent) + token_bytes)


def first_group_keys(ids: np.ndarray, split_factor: int, seed: bytes) -> list[bytes]:
    """Returns the key of every whole group of ``ids`` taken as the first group of a prompt of
    its own (``VUA.load_groups``' rows): each chained from ``seed``, not from the group before."""
    group_bytes = split_factor * TOKEN_DTYPE.itemsize
    raw = memoryview(ids).cast("B")
    whole = len(ids) // split_factor * group_bytes
    return [chain_key(seed, raw[start : start + group_bytes]) for start in range(0, whole, group_bytes)]


def group_keys(ids: np.ndarray, split_factor: int, seed: bytes) -> list[bytes]:
    """Returns the key of every whole group of ``ids`` (an int64 array), in order.

    Linear in the number of tokens: each group is hashed once, chained through the
    16-byte digest of the group before it.
    """
    group_bytes = split_factor * TOKEN_DTYPE.itemsize
    raw = memoryview(ids).cast("B")
    keys = []
    digest = seed
    for start in range(0, (len(ids) // split_factor) * group_bytes, group_bytes):
        digest = chain_key(digest, raw[start : start + group_bytes])
        keys.append(digest)
    return keys
