"""A checksum the GPU can verify: a position-weighted sum of 64-bit words, per tensor.

xxh3 is fast on a CPU but sequential, so checking it means the host touches every byte on
the way to a GPU, and the host then sets the pace of a CUDA read. This sum is computed
with plain tensor operations (multiply, sum), so the device checks the bytes it received,
after the DMA, while the host only moves them. It guards against damage (a flipped bit,
a lost or misplaced 4 KiB block, another file's data), like xxh3; neither is meant to
resist forgery.

Definition, over one stored tensor's bytes (a whole number of 4 KiB rows), read as
little-endian unsigned 64-bit words ``x[r, c]`` in rows ``r`` of 512 words::

    sum = Σ_r  ROW(r) · Σ_c COL(c) · x[r, c]      (mod 2^64)

with odd weights ``COL(c) = ((c + 1) · A) | 1`` and ``ROW(r) = ((r + 1) · B) | 1`` (mod 2^64),
``A = 0x9E3779B97F4A7C15`` and ``B = 0xC2B2AE3D27D4EB4F``. Odd weights are invertible mod
2^64, so changing any one word always changes the sum, and position weights catch words or
blocks that moved. Writers store the sum of every K and V tensor as the fragment metadata
``wordsums`` (JSON, name -> 16 hex digits) when each head's run of a group is whole rows;
groups without them are verified with xxh3 on the host. A put from CUDA tensors computes
the sums on the GPU (:func:`tensor_wordsums`), almost for free; a put from host tensors
computes them with numpy (:func:`host_wordsum`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is touched: the vua command starts without it
    import torch

ROW_BYTES = 4096
ROW_WORDS = ROW_BYTES // 8
_MASK = (1 << 64) - 1
_COL_MULT = 0x9E3779B97F4A7C15
_ROW_MULT = 0xC2B2AE3D27D4EB4F


def _col_weights() -> np.ndarray:
    return np.array([((c + 1) * _COL_MULT | 1) & _MASK for c in range(ROW_WORDS)], dtype=np.uint64)


_COL = _col_weights()


def _signed(value: int) -> int:
    """``value`` (mod 2^64) as the int64 torch holds it."""
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def whole_rows(nbytes: int) -> bool:
    """Whether a run of ``nbytes`` (one head of one group) can carry a sum."""
    return nbytes > 0 and nbytes % ROW_BYTES == 0


def host_wordsum(piece: np.ndarray) -> int:
    """The sum of one tensor's bytes: ``piece`` is uint8 ``(chunks, nbytes)``, whole rows per chunk.

    The chunks (a tensor's heads, say) follow one another in the tensor; each is
    contiguous, the chunks need not be.
    """
    chunks, nbytes = piece.shape
    words = piece.view("<u8").reshape(chunks, nbytes // ROW_BYTES, ROW_WORDS)  # a view, no copy
    # Σ_c COL(c) · x[r, c] for every row, without a temporary as large as the data
    per_row = np.einsum("hrc,c->hr", words, _COL).reshape(-1)  # (chunks * rows,)
    rows = np.arange(1, per_row.size + 1, dtype=np.uint64)
    weights = (rows * np.uint64(_ROW_MULT)) | np.uint64(1)  # wraps mod 2^64, as intended
    return int((per_row * weights).sum(dtype=np.uint64))


_COL_ON: dict[torch.device, torch.Tensor] = {}


def _col_on(device: torch.device) -> torch.Tensor:
    """The column weights on ``device``, copied there once."""
    import torch

    col = _COL_ON.get(device)
    if col is None:
        col = _COL_ON[device] = torch.from_numpy(_COL.view(np.int64)).to(device)
    return col


def device_wordsums(words: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """The sums of a batch of tensors, computed where ``words`` lives (a GPU, or the CPU in tests).

    Args:
        words: int64 ``(tensors, chunks, rows, 512)``, any strides: tensor ``i``'s rows,
            chunk by chunk, in the order they are stored.
        inplace: overwrite ``words`` instead of taking a temporary of its size.

    Returns:
        ``(tensors,)`` int64; compare with stored sums through :func:`matches`.
    """
    import torch

    _, chunks, rows, _ = words.shape
    products = words.mul_(_col_on(words.device)) if inplace else words * _col_on(words.device)
    per_row = products.sum(dim=3)  # (tensors, chunks, rows); int64 wraps mod 2^64, as defined
    weights = torch.arange(1, chunks * rows + 1, dtype=torch.int64, device=words.device)
    weights.mul_(_signed(_ROW_MULT)).bitwise_or_(1)
    return per_row.mul_(weights.view(chunks, rows)).sum(dim=(1, 2))


def as_words(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``t`` (heads, groups * split, head_dim), each head's tokens contiguous, as int64
    ``(groups, heads, rows, 512)``: each group's tensor as :func:`device_wordsums` takes it.

    Every head's run of a group must be whole rows, its start 8-byte aligned.
    """
    import torch

    heads = t.shape[0]
    runs = t.view(torch.uint8).reshape(heads, groups, -1)  # (heads, groups, run bytes): a view
    return runs.view(torch.int64).view(heads, groups, -1, ROW_WORDS).permute(1, 0, 2, 3)


def tensor_wordsums(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]], tokens: int, split: int
) -> torch.Tensor | None:
    """The sums of every (row, group, tensor) of a put, computed on the tensors' device.

    Args:
        layers: per layer ``(K, V)``, each ``(batch, heads, seq >= tokens, head_dim)``.
        tokens: the tokens to cover, a multiple of ``split``.
        split: tokens per group.

    Returns:
        int64 ``(batch, tokens // split, 2 * layers)`` (tensors in file order: K0, V0, K1,
        ...) on the tensors' device; None when a head's run of a group is not whole rows.
    """
    import torch

    groups = tokens // split
    sums = []
    for t in (t for kv in layers for t in kv):
        batch, heads, _, dim = t.shape
        item = t.element_size()
        if not whole_rows(split * dim * item):
            return None
        t = t[:, :, :tokens]
        strides_ok = t.stride(-1) == 1 and t.stride(-2) == dim
        if not strides_ok or any(n * item % 8 for n in (*t.stride()[:2], t.storage_offset())):
            t = t.contiguous()  # as_words needs contiguous, 8-byte aligned runs
        per_row = [device_wordsums(as_words(t[b], groups)) for b in range(batch)]  # each (groups,)
        sums.append(torch.stack(per_row))  # (batch, groups)
    return torch.stack(sums, dim=2)


def matches(device_sum: int, stored: int) -> bool:
    """Whether a sum from :func:`device_wordsums` (int64) equals a stored one (uint64)."""
    return device_sum & _MASK == stored
