"""A checksum the GPU can verify: a position-weighted sum of 64-bit words.

xxh3 is fast on a CPU but sequential, so checking it means the host touches every byte on
the way to a GPU, and the host then sets the pace of a CUDA read. This sum is computed
from plain tensor operations (multiply, sum), so the device checks the bytes it received,
after the DMA, while the host only moves them. It guards against damage (a flipped bit,
a lost or misplaced 4 KiB block, another file's data), like xxh3; neither is meant to
resist forgery.

Definition, over a group's K and V bytes in file order (their length a multiple of 4 KiB),
read as little-endian unsigned 64-bit words ``x[r, c]`` in rows ``r`` of 512 words::

    sum = Σ_r  ROW(r) · Σ_c COL(c) · x[r, c]      (mod 2^64)

with odd weights ``COL(c) = ((c + 1) · A) | 1`` and ``ROW(r) = ((r + 1) · B) | 1`` (mod 2^64),
``A = 0x9E3779B97F4A7C15`` and ``B = 0xC2B2AE3D27D4EB4F``.
Odd weights are invertible mod 2^64, so changing any one word always changes the sum, and
position weights catch words or blocks that moved. Writers store it as the fragment
metadata ``kv_wordsum`` (16 hex digits) when every K and V tensor of a group is a whole
number of rows; groups without it are verified with xxh3 on the host. A put from CUDA
tensors computes the sums on the GPU (:func:`tensor_wordsums`), almost for free; a put from
host tensors computes them with numpy (:func:`host_wordsum`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ROW_BYTES = 4096
ROW_WORDS = ROW_BYTES // 8
_MASK = (1 << 64) - 1
_COL_MULT = 0x9E3779B97F4A7C15
_ROW_MULT = 0xC2B2AE3D27D4EB4F


def _col_weights() -> np.ndarray:
    return np.array([((c + 1) * _COL_MULT | 1) & _MASK for c in range(ROW_WORDS)], dtype=np.uint64)


_COL = _col_weights()


def _row_weights(first: int, count: int) -> np.ndarray:
    rows = np.arange(first + 1, first + count + 1, dtype=np.uint64)
    return (rows * np.uint64(_ROW_MULT)) | np.uint64(1)  # wraps mod 2^64, as intended


def _signed(value: int) -> int:
    """``value`` (mod 2^64) as the int64 torch holds it."""
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def host_wordsum(pieces: Sequence[np.ndarray]) -> int | None:
    """The sum of the concatenation of ``pieces``, each a uint8 array ``(chunks, nbytes)``.

    A piece's chunks follow one another in the data; each chunk is contiguous, the chunks
    need not be (a tensor's heads, say). Returns None when a chunk is not a whole number
    of 4 KiB rows (then no sum is stored).
    """
    if any(p.shape[1] % ROW_BYTES for p in pieces):
        return None
    total = 0
    row = 0
    for piece in pieces:
        chunks, nbytes = piece.shape
        words = piece.view("<u8").reshape(chunks, nbytes // ROW_BYTES, ROW_WORDS)  # a view, no copy
        # Σ_c COL(c) · x[r, c] for every row, without a temporary as large as the data
        per_row = np.einsum("hrc,c->hr", words, _COL).reshape(-1)  # (chunks * rows,)
        total += int((per_row * _row_weights(row, per_row.size)).sum(dtype=np.uint64))
        row += per_row.size
    return total & _MASK


_COL_ON: dict[torch.device, torch.Tensor] = {}


def _col_on(device: torch.device) -> torch.Tensor:
    """The column weights on ``device``, copied there once."""
    col = _COL_ON.get(device)
    if col is None:
        col = _COL_ON[device] = torch.from_numpy(_COL.view(np.int64)).to(device)
    return col


def device_wordsums_(groups: torch.Tensor) -> torch.Tensor:
    """The sum of each row of ``groups`` (uint8, ``(n, nbytes)``, on any device), as int64.

    Works in place: ``groups`` is overwritten, so the caller uses its data first. Compare
    with a stored sum through :func:`matches`.
    """
    n, nbytes = groups.shape
    rows = nbytes // ROW_BYTES
    words = groups.view(torch.int64).view(n, rows, ROW_WORDS)  # (groups, rows, 512)
    col = _col_on(groups.device)
    words.mul_(col)  # int64 arithmetic wraps mod 2^64, which is the definition
    per_row = words.sum(dim=2)  # (groups, rows)
    row = torch.arange(1, rows + 1, dtype=torch.int64, device=groups.device)
    row.mul_(_signed(_ROW_MULT)).bitwise_or_(1)
    return per_row.mul_(row).sum(dim=1)  # (groups,)


def matches(device_sum: int, stored: int) -> bool:
    """Whether a sum from :func:`device_wordsums_` (int64) equals a stored one (uint64)."""
    return device_sum & _MASK == stored


def tensor_wordsums(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]], tokens: int, split: int
) -> torch.Tensor | None:
    """The sum of every (row, group) of a put's K and V, computed on the tensors' device.

    Args:
        layers: per layer ``(K, V)``, each ``(batch, heads, seq >= tokens, head_dim)``.
        tokens: the tokens to cover, a multiple of ``split``.
        split: tokens per group.

    Returns:
        ``(batch, tokens // split)`` int64 on the tensors' device (compare through
        :func:`matches`); None when a head's run of a group is not whole rows.
    """
    groups = tokens // split
    total = None
    base = 0  # rows of the group's data before this tensor (file order: K0, V0, K1, ...)
    for t in (t for kv in layers for t in kv):
        batch, heads, _, dim = t.shape
        chunk = split * dim * t.element_size()  # one head's bytes in one group
        if chunk % ROW_BYTES:
            return None
        t = t[:, :, :tokens]
        if t.stride(-1) != 1 or t.stride(-2) != dim or t.storage_offset() * t.element_size() % 8:
            t = t.contiguous()
        rows = chunk // ROW_BYTES
        words = t.view(torch.int64).view(batch, heads, groups, rows, ROW_WORDS)
        per_row = (words * _col_on(t.device)).sum(dim=4)  # (batch, heads, groups, rows)
        weights = torch.arange(base + 1, base + heads * rows + 1, dtype=torch.int64, device=t.device)
        weights.mul_(_signed(_ROW_MULT)).bitwise_or_(1)
        # (batch, heads, groups, rows) x (heads, 1, rows) -> (batch, groups)
        part = (per_row * weights.view(heads, 1, rows)).sum(dim=(1, 3))
        total = part if total is None else total.add_(part)
        base += heads * rows
    return total
