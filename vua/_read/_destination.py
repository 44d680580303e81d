"""Memory the caller names for a load to land in: an engine's paged blocks, a host pool's pages.

Without one, a load fills fresh outputs of its own; an engine would then copy every layer a
second time into the memory it attends from. A :class:`KVDestination` says, per group and
layer, which views of that memory the group's tokens go to, and the read path copies each
verified tensor there directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vua._kv_layout import Layout, as_bits
from vua.errors import InvalidInputError

KVChunks = Sequence[tuple[torch.Tensor, torch.Tensor]]


class KVDestination:
    """Where each group of a load lands; pass one as ``VUA.load(..., into=)``.

    Subclass it and implement :meth:`chunks`. The load calls it from its copy threads, once
    per group and layer, so it must be cheap and must not block.

    What a destination sees of a group that fails its check: its views may already hold
    some of the group's bytes (the copy of a group and its check overlap), and the views of
    later groups may have been written too (groups are copied in parallel). The load
    reports the verified prefix (:meth:`KVLoad.wait`); everything from the first group it
    does not count is not loaded, whatever those views hold.
    """

    def chunks(self, group: int, layer: int) -> KVChunks:
        """The (K, V) views that group ``group`` of the load (0: the group at the load's offset) lands in, for ``layer``.

        Each K and V is ``(kv_heads, n, head_dim)`` in the stored dtype, on the load's
        device, with any strides (a slice of a paged block, a transposed view); the chunks
        cover the group's ``split_factor`` tokens in order, so their ``n`` add up to it.
        A view the caller does not want written (tokens it already holds) may point at
        scratch memory.
        """
        raise NotImplementedError

    def whole_group(self, group: int) -> torch.Tensor | None:
        """Optionally, every layer's K and V of ``group`` as one ``(layers, 2, kv_heads, split, head_dim)`` view.

        Where the memory allows it (every layer of one shape, as a paged pool holding all
        layers of a page is), a whole-group load then copies each group in one strided copy
        per group instead of one per layer and tensor. None (the default): :meth:`chunks`.
        """
        return None


class Landing:
    """A destination checked against the load it serves: every view's dtype, device and shape.

    A view that does not fit raises :class:`InvalidInputError` (from :meth:`KVLoad.wait`),
    before any byte is copied into it: bytes of another dtype with the same width would
    otherwise land without complaint.
    """

    def __init__(self, destination: KVDestination, layout: Layout, split_factor: int, device: torch.device):
        self.destination = destination
        self.layout = layout
        self.split = split_factor
        self.device = device

    def chunks(self, group: int, layer: int) -> KVChunks:
        """The destination's views for (group, layer), checked."""
        chunks = self.destination.chunks(group, layer)
        (kh, kd), (vh, vd) = self.layout.layers[layer]
        tokens = 0
        for k, v in chunks:
            for view, heads, dim, name in ((k, kh, kd, "K"), (v, vh, vd, "V")):
                if (
                    not isinstance(view, torch.Tensor)
                    or view.dtype != self.layout.dtype
                    or view.dim() != 3
                    or view.shape[0] != heads
                    or view.shape[2] != dim
                    or view.device.type != self.device.type
                ):
                    raise InvalidInputError(self._misfit(group, layer, name, view, heads, dim))
            if k.shape[1] != v.shape[1]:
                raise InvalidInputError(
                    f"the destination's K and V views for group {group}, layer {layer} cover different "
                    f"token counts ({k.shape[1]} and {v.shape[1]})"
                )
            tokens += k.shape[1]
        if tokens != self.split:
            raise InvalidInputError(
                f"the destination's views for group {group}, layer {layer} cover {tokens} tokens; "
                f"a group is split_factor={self.split} tokens"
            )
        return chunks

    @property
    def has_whole_groups(self) -> bool:
        """Whether the destination names whole groups (see :meth:`KVDestination.whole_group`)."""
        named = getattr(type(self.destination), "whole_group", KVDestination.whole_group)  # duck-typed: no method
        return named is not KVDestination.whole_group

    def host_whole_group(self, group: int) -> np.ndarray:
        """The destination's whole-group view, checked, as a numpy view of its bit patterns.

        Raises:
            InvalidInputError: the view does not fit the stored layout (or there is none).
        """
        view = self.destination.whole_group(group)
        (heads, dim), _ = self.layout.layers[0]
        shape = (self.layout.num_layers, 2, heads, self.split, dim)
        if (
            not isinstance(view, torch.Tensor)
            or view.dtype != self.layout.dtype
            or tuple(view.shape) != shape
            or view.device.type != self.device.type
        ):
            got = f"{tuple(view.shape)} {view.dtype} on {view.device}" if isinstance(view, torch.Tensor) else repr(view)
            raise InvalidInputError(
                f"the destination's whole view of group {group} is {got}; this store holds {shape} "
                f"{self.layout.dtype} there, and the load is to {self.device}"
            )
        return as_bits(view)

    def host_chunks(self, group: int, layer: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The views for (group, layer) as numpy views of their bit patterns (host memory)."""
        return [(as_bits(k), as_bits(v)) for k, v in self.chunks(group, layer)]

    def place(self, group: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copies one group's layer, ``(kv_heads, split, head_dim)`` each, into its views (queued on the current stream)."""
        at = 0
        for dest_k, dest_v in self.chunks(group, layer):
            n = dest_k.shape[1]
            dest_k.copy_(k[:, at : at + n])
            dest_v.copy_(v[:, at : at + n])
            at += n

    def _misfit(self, group: int, layer: int, name: str, view: object, heads: int, dim: int) -> str:
        if not isinstance(view, torch.Tensor):
            got = type(view).__name__
        else:
            got = f"{tuple(view.shape)} {view.dtype} on {view.device}"
        return (
            f"the destination's {name} view for group {group}, layer {layer} is {got}; this store holds "
            f"({heads}, tokens, {dim}) {self.layout.dtype} there, and the load is to {self.device}"
        )


def spread(source: np.ndarray, chunks: Sequence[tuple[np.ndarray, np.ndarray]], side: int) -> None:
    """Copies a ``(heads, split, dim)`` tensor's tokens, in order, into the K (side 0) or V (1) views of ``chunks``."""
    at = 0
    for chunk in chunks:
        dest = chunk[side]
        n = dest.shape[1]
        np.copyto(dest, source[:, at : at + n])
        at += n
