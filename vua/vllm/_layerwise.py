"""The worker's layer-wise loads (``load_mode: "layerwise"``): within the step, landing in the blocks as the forward reaches each layer.

Each request's :class:`vua.KVLoad` copies straight into its paged blocks (no memory of its
own between), and ``wait_for_layer_load`` waits for one layer, so the forward of the first
layers overlaps the copy of the next. The engine waits on the store here, which is why the
connector refuses this mode on a network file system; groups that fail a check are reported
as load errors, and vLLM recomputes those blocks.
"""

from __future__ import annotations

import threading

import torch

from vua.core import VUA, KVDestination, KVLoad
from vua.vllm._metadata import LoadSpec
from vua.vllm._paged import NULL_BLOCK, PagedLayer
from vua.vllm._settings import CacheGroup


class RequestBlocks(KVDestination):
    """Where one request's load lands: its paged blocks in every layer, from the load's offset on.

    Positions before ``spec.start`` are vLLM's already (its prefix cache, maybe shared with
    running requests): their bytes go to scratch, never into those blocks.
    """

    def __init__(self, layers: list[PagedLayer], block_ids: list[list[int]], spec: LoadSpec, offset: int, split: int):
        self._layers = layers  # in the store's layer order
        self._block_ids = block_ids  # each layer's block table (its KV cache group's)
        self._offset = offset
        self._keep_before = spec.start
        self._split = split

    def chunks(self, group: int, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        first = self._offset + group * self._split
        return self._layers[layer].views(self._block_ids[layer], first, first + self._split, self._keep_before)


class LayerwiseLoads:
    """One worker's layer-wise loads of the current step.

    Args:
        vua: the rank's store.
        layers: the paged layers in the store's layer order.
        group_of_layer: each of those layers' KV cache group (its block table's index).
        groups: vLLM's KV cache groups (their block sizes say which blocks a position is in).
        split: the store's split factor.
    """

    def __init__(
        self, vua: VUA, layers: list[PagedLayer], group_of_layer: list[int], groups: tuple[CacheGroup, ...], split: int
    ):
        self.vua = vua
        self._layers = layers
        self._group_of_layer = group_of_layer
        self._groups = groups
        self._split = split
        self._loads: list[tuple[LoadSpec, KVLoad | None]] = []
        self._errors: set[int] = set()
        self._lock = threading.Lock()
        self.error_blocks = 0  # blocks reported as load errors since start

    def start(self, spec: LoadSpec) -> None:
        """Starts landing ``spec``'s positions in its blocks, layer by layer."""
        tokens = torch.tensor(spec.token_ids[: spec.end], dtype=torch.long)
        # Only from the group holding the first token vLLM lacks: its prefix cache holds
        # the rest, and reading it from disk to throw it away would cost the same again.
        offset = spec.start // self._split * self._split
        block_ids = [spec.block_ids[g] for g in self._group_of_layer]
        blocks = RequestBlocks(self._layers, block_ids, spec, offset, self._split)
        load = self.vua.load(tokens, self._layers[0].kv.device, layerwise=True, offset=offset, into=blocks)
        if load is None:
            self._fail_blocks(spec, spec.start)
        self._loads.append((spec, load))

    def wait_layer(self, index: int) -> None:
        """Waits (on CUDA, makes the forward's stream wait) for layer ``index`` of every load of the step.

        The loads land in the blocks as they are verified; groups that fail a check later are
        reported once the last layer is in (:meth:`finish`).
        """
        for _, load in self._loads:
            if load is not None:
                load.wait_layer_groups(index)
        if index == len(self._layers) - 1:
            self.finish()

    def finish(self) -> None:
        """Waits for the step's loads and notes the blocks of every group they did not verify."""
        for spec, load in self._loads:
            if load is not None:
                verified = load.offset + load.wait() * self._split
                if verified < spec.end:
                    self._fail_blocks(spec, verified)
        self._loads = []

    def errors(self) -> set[int]:
        """The blocks that failed to load since the last call (vLLM's get_block_ids_with_load_errors)."""
        self.finish()
        with self._lock:
            errors, self._errors = self._errors, set()
        return errors

    def _fail_blocks(self, spec: LoadSpec, first_bad: int) -> None:
        """Notes the blocks of positions [first_bad, end) of a load, in every KV cache group, as not loaded."""
        first = max(first_bad, spec.start)
        if first >= spec.end:
            return
        blocks = set()
        for group, block_ids in zip(self._groups, spec.block_ids):
            size = group.block_size
            blocks.update(block_ids[first // size : (spec.end - 1) // size + 1])
        blocks.discard(NULL_BLOCK)
        with self._lock:
            self._errors.update(blocks)
            self.error_blocks += len(blocks)
