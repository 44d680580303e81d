"""Copies into host outputs, straight from the memory-mapped fragments: each byte is copied once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vua._kv_layout import as_bits
from vua._read._job import ReadJob, host_views
from vua.errors import FragmentError


class HostGroups:
    """Whole groups per thread, for layouts whose every K and V share one shape.

    The outputs are one (layers, 2, heads, tokens, dim) array and a fragment's data one
    (layers, 2, heads, split, dim) array, so a thread hashes a tensor, checks it and copies
    it while it is in cache, and prefetches the next group's file meanwhile.
    """

    def run(self, job: ReadJob) -> None:
        s = job.split
        assert job.block5 is not None  # chosen for uniform layouts only
        block = as_bits(job.block5)

        def work(lo: int, hi: int) -> None:
            if lo < len(job.fragments):
                job.fragments[lo].prefetch()
            for g in range(lo, min(hi, job.valid)):
                if g + 1 < hi and g + 1 < len(job.fragments):
                    job.fragments[g + 1].prefetch()  # disk reads overlap this copy
                _copy_group(job, g, block[:, :, :, g * s : (g + 1) * s])

        job.parallel(work, 0, job.valid, job.total_bytes)
        job.load.all_landed()


class HostLayers:
    """Layer-major copies: layer by layer for a layer-wise consumer, else each thread takes a run of
    groups through every layer (no barrier per layer; for layouts whose layers differ in shape)."""

    def __init__(self, *, layerwise: bool):
        self.layerwise = layerwise

    def run(self, job: ReadJob) -> None:
        job.prefetch_all()  # layer-major copies touch every file at once
        dests = host_views(job.outputs)
        s = job.split

        def copy(layers: range) -> Callable[[int, int], None]:
            def work(lo: int, hi: int) -> None:
                for layer in layers:
                    dest_k, dest_v = dests[layer]
                    for g in range(lo, min(hi, job.valid)):
                        job.copy_group_layer(g, layer, dest_k[:, g * s : (g + 1) * s], dest_v[:, g * s : (g + 1) * s])

            return work

        if not self.layerwise:
            job.parallel(copy(range(len(dests))), 0, job.valid, job.total_bytes)
            job.load.all_landed()
            return
        for layer in range(len(dests)):
            job.parallel(copy(range(layer, layer + 1)), 0, job.valid, job.total_bytes // len(dests))
            job.load.layer_landed(layer)


def _copy_group(job: ReadJob, group: int, dest: np.ndarray) -> None:
    """Verifies and copies one group's whole KV into ``dest``, a (layers, 2, heads, split, dim) integer view.

    Tensor by tensor, hash then copy: the copy reads what the hash just pulled into cache,
    which beats one hash and one copy of the whole group (see the README's design notes).
    """
    if job.verify:
        for layer in range(dest.shape[0]):
            if group >= job.valid:
                return  # a check failed: the rest of the group is not needed
            job.copy_group_layer(group, layer, dest[layer, 0], dest[layer, 1])
        return
    try:
        source = job.fragments[group].kv_block()
    except FragmentError as exc:
        job.fail(group, exc)
        return
    np.copyto(dest, source)
