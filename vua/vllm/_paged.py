"""vLLM's paged KV caches, read and written per token position."""

from __future__ import annotations

import torch

from vua.errors import InvalidInputError

# vLLM's null block: its block pool hands block 0 to no request, and a request's block table
# holds it where a sliding-window layer keeps nothing (tokens out of the window).
NULL_BLOCK = 0


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_int(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers of its width (indexed copies then work for every dtype, fp8 too)."""
    return t.view(_INTS[t.element_size()])


class NullBlockError(Exception):
    """Positions to read lie in vLLM's null block: that layer no longer holds their KV."""


class PagedLayer:
    """One layer's paged KV tensor, read and written per token position.

    Knows the layouts vLLM gives connectors and splits each token's content into the
    (key, value) pair a fragment stores: K and V for attention, the latent's two parts
    for MLA. Everything is indexing on the tensor vLLM handed over, so any physical
    order (stride permutation) is respected.
    """

    def __init__(self, kv: torch.Tensor, block_size: int, key_width: int | None):
        self.kv = kv
        self.block_size = block_size
        if kv.dim() == 5 and kv.shape[0] == 2:  # legacy FlashAttention [2, blocks, block, heads, dim]
            self.kind, self.heads, width = "split", kv.shape[3], kv.shape[4]
            self.key_width = width
        elif kv.dim() == 4:  # standardized [blocks, heads, block, content]
            self.kind, self.heads, width = "bhnc", kv.shape[1], kv.shape[3]
            self.key_width = key_width if key_width and 0 < key_width < width else width - width // 2
        elif kv.dim() == 3:  # legacy MLA [blocks, block, latent]
            self.kind, self.heads, width = "mla", 1, kv.shape[2]
            self.key_width = key_width if key_width and 0 < key_width < width else width - width // 2
        else:
            raise InvalidInputError(
                f"unsupported paged KV tensor of shape {tuple(kv.shape)}; VUAConnector knows vLLM's "
                "[blocks, heads, block_size, content] views and the older 5-D and MLA layouts"
            )
        # K and V bytes of one token position in this layer (both parts of MLA's latent).
        self.token_bytes = self.heads * (width if self.kind != "split" else 2 * width) * kv.element_size()
        # Where a load's bytes for positions vLLM must not get go (see views); shared by
        # the copy threads, which may all write it at once: nothing reads it.
        like = self._block_views(NULL_BLOCK, 0, block_size)
        self._discard = (torch.empty_like(like[0]), torch.empty_like(like[1]))

    def _slots(self, block_ids: list[int], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset in it) of each position, on the host."""
        return torch.tensor(block_ids, dtype=torch.long)[positions // self.block_size], positions % self.block_size

    def gather(self, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of positions [start, end), each ``(1, heads, end - start, width)``.

        Raises:
            NullBlockError: some of the positions are in vLLM's null block.
        """
        first, last = start // self.block_size, (end - 1) // self.block_size
        if NULL_BLOCK in block_ids[first : last + 1]:
            raise NullBlockError(f"positions [{start}, {end}) reach vLLM's null block")
        blocks, offsets = (t.to(self.kv.device) for t in self._slots(block_ids, torch.arange(start, end)))
        if self.kind == "split":
            k, v = self.kv[0][blocks, offsets], self.kv[1][blocks, offsets]  # (n, heads, dim)
        elif self.kind == "bhnc":
            content = self.kv[blocks, :, offsets]  # (n, heads, content): advanced indices go first
            k, v = content[..., : self.key_width], content[..., self.key_width :]
        else:
            content = self.kv[blocks, offsets][:, None]  # (n, 1, latent)
            k, v = content[..., : self.key_width], content[..., self.key_width :]
        return k.transpose(0, 1)[None], v.transpose(0, 1)[None]

    def scatter(self, block_ids: list[int], first: int, k: torch.Tensor, v: torch.Tensor, keep_before: int) -> None:
        """Writes (K, V) of positions [first, first + n), each ``(heads, n, width)``, into their blocks.

        One indexed copy per tensor instead of one per block (an asynchronous load lands a
        prompt's layers this way, off the engine's thread: a copy per block held the GIL
        thousands of times per prompt). Positions before ``keep_before`` and in vLLM's null
        block are left as they are, as :meth:`views` leaves them. The copy is of the bits
        (any dtype, fp8 included).
        """
        n = k.shape[1]
        positions = torch.arange(first, first + n)
        blocks = torch.tensor(block_ids, dtype=torch.long)[positions // self.block_size]
        keep = (positions >= keep_before) & (blocks != NULL_BLOCK)
        if not bool(keep.any()):
            return
        device = self.kv.device
        blocks, offsets = blocks[keep].to(device), (positions % self.block_size)[keep].to(device)
        keep = keep.to(device)
        bits = as_int(self.kv)
        k_rows, v_rows = (as_int(t).transpose(0, 1)[keep] for t in (k, v))  # (m, heads, width)
        if self.kind == "split":
            bits[0][blocks, offsets] = k_rows
            bits[1][blocks, offsets] = v_rows
        elif self.kind == "bhnc":
            bits[blocks, :, offsets, : self.key_width] = k_rows
            bits[blocks, :, offsets, self.key_width :] = v_rows
        else:
            bits[blocks, offsets, : self.key_width] = k_rows[:, 0]
            bits[blocks, offsets, self.key_width :] = v_rows[:, 0]

    def views(
        self, block_ids: list[int], first: int, last: int, keep_before: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) views of positions [first, last), one pair per block, each ``(heads, n, width)``.

        A load lands in them directly (see ``VUA.load(..., into=)``). Positions before
        ``keep_before`` (vLLM computed or cached them: other requests may be reading those
        blocks) and positions in vLLM's null block get views of scratch memory instead, so
        a load never writes there.
        """
        pairs = []
        position = first
        while position < last:
            block, offset = divmod(position, self.block_size)
            end = min(last, (block + 1) * self.block_size)
            if position < keep_before:
                end = min(end, keep_before)
            n = end - position
            block_id = block_ids[block]
            if position < keep_before or block_id == NULL_BLOCK:
                pairs.append(self._scratch(n))
            else:
                pairs.append(self._block_views(block_id, offset, offset + n))
            position = end
        return pairs

    def _block_views(self, block_id: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) views of slots [lo, hi) of one block, ``(heads, n, width)``."""
        if self.kind == "split":
            return self.kv[0, block_id, lo:hi].transpose(0, 1), self.kv[1, block_id, lo:hi].transpose(0, 1)
        if self.kind == "bhnc":
            content = self.kv[block_id, :, lo:hi]  # (heads, n, content)
            return content[..., : self.key_width], content[..., self.key_width :]
        content = self.kv[block_id, lo:hi][None]  # (1, n, latent)
        return content[..., : self.key_width], content[..., self.key_width :]

    def _scratch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one block's worth of memory that nothing reads: where bytes vLLM must not get go."""
        k, v = self._discard
        return k[:, :n], v[:, :n]
