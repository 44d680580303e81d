"""Copies into host outputs, straight from the memory-mapped fragments: each byte is copied once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import xxhash

from vua._kv_layout import as_bits, bits_dtype, key_name, value_name
from vua._read._destination import spread
from vua._read._job import CopyStrategy, ReadJob, host_views
from vua.errors import FragmentError


class HostGroups(CopyStrategy):
    """Whole groups per thread, for layouts whose every K and V share one shape.

    The outputs are one (layers, 2, heads, tokens, dim) array and a fragment's data one
    (layers, 2, heads, split, dim) array, so a thread hashes a tensor, checks it and copies
    it while it is in cache, and prefetches the next group's file meanwhile. A caller's
    destination that names whole groups (``KVDestination.whole_group``) is filled the same way.
    """

    def run(self, job: ReadJob) -> None:
        s = job.split
        if job.landing is not None:  # a caller's destination that names whole groups
            landing = job.landing
            group_view: Callable[[int], np.ndarray] = landing.host_whole_group
        else:
            assert job.block5 is not None  # chosen for uniform layouts only
            block = as_bits(job.block5)

            def group_view(g: int) -> np.ndarray:
                return block[:, :, :, g * s : (g + 1) * s]

        def work(lo: int, hi: int) -> None:
            if lo < len(job.fragments):
                job.fragments[lo].prefetch()
            for g in range(lo, min(hi, job.valid)):
                if g + 1 < hi and g + 1 < len(job.fragments):
                    job.fragments[g + 1].prefetch()  # disk reads overlap this copy
                _copy_group(job, g, group_view(g))

        job.parallel(work, 0, job.valid, job.total_bytes)
        job.progress.all_landed()


class HostLayers(CopyStrategy):
    """Layer-major copies: layer by layer for a layer-wise consumer, else each thread takes a run of
    groups through every layer (no barrier per layer; for layouts whose layers differ in shape)."""

    def __init__(self, *, layerwise: bool):
        self.layerwise = layerwise

    def run(self, job: ReadJob) -> None:
        job.prefetch_all()  # layer-major copies touch every file at once
        layers = job.layout.num_layers

        def copy(layers: range) -> Callable[[int, int], None]:
            def work(lo: int, hi: int) -> None:
                for layer in layers:
                    for g in range(lo, min(hi, job.valid)):
                        job.copy_group_layer(g, layer, job.host_chunks(g, layer))

            return work

        if not self.layerwise:
            job.parallel(copy(range(layers)), 0, job.valid, job.total_bytes)
            job.progress.all_landed()
            return
        for layer in range(layers):
            job.parallel(copy(range(layer, layer + 1)), 0, job.valid, job.total_bytes // layers)
            job.progress.layer_landed(layer)


def _copy_group(job: ReadJob, group: int, dest: np.ndarray) -> None:
    """Verifies and copies one group's whole KV into ``dest``, a (layers, 2, heads, split, dim) integer view.

    Where the caller's destination holds each head of each tensor as one contiguous run (pages
    in the stored order), the file is read straight into it (``ReadJob.read_group_in_place``).
    Else tensor by tensor, hash then copy: the copy reads what the hash just pulled into
    cache, which beats one hash and one copy of the whole group.
    """
    if job.verify:
        # A caller's destination whose every head is one long run is read into in place, checked
        # there. Not the load's own outputs, nor short runs: a group's tokens of one head (64 KiB
        # for a Llama-3-8B group of 256) read one by one measured 5-12% slower than the map's copies.
        in_runs = job.landing is not None and _runs(dest[0, 0])
        tensors = [dest[layer, side] for layer in range(dest.shape[0]) for side in (0, 1)] if in_runs else []
        if tensors and all(_runs(t) for t in tensors):
            fragment = job.fragments[group]
            try:
                with fragment.held_open():
                    job.read_group_in_place(group, tensors)
            except FragmentError as exc:
                job.fail(group, exc)
            return
        for layer in range(dest.shape[0]):
            if group >= job.valid:
                return  # a check failed: the rest of the group is not needed
            job.copy_group_layer(group, layer, [(dest[layer, 0], dest[layer, 1])])
        return
    try:
        source = job.fragments[group].kv_block()
    except FragmentError as exc:
        job.fail(group, exc)
        return
    np.copyto(dest, source)


_MIN_RUN_BYTES = 128 << 10  # shorter runs cost more in Python per byte than the read saves


def _runs(tensor: np.ndarray) -> bool:
    """Whether each head of a ``(heads, split, dim)`` view is one contiguous run of ``split * dim`` elements,
    at least ``_MIN_RUN_BYTES`` long."""
    _, split, dim = tensor.shape
    item = tensor.itemsize
    contiguous = (tensor.strides[2] == item or dim == 1) and (tensor.strides[1] == dim * item or split == 1)
    return contiguous and split * dim * item >= _MIN_RUN_BYTES


class HostPreads(CopyStrategy):
    """Host memory filled with ``preadv`` straight from each file, no memory map: for network and FUSE
    file systems, where a file another node removes mid-read must be an error, not SIGBUS.

    Into the load's own outputs, each head's tokens of a group are a contiguous run, so one
    ``preadv`` per tensor lands every byte of it in place; the tensor is then hashed from
    where it landed, while it is in cache. Into a caller's destination (strided views, as
    paged blocks are), each tensor is read into a small buffer of the thread's own, hashed
    there and copied into the destination's views. With ``auth_key``, a whole-group read
    checks each group's MAC over the bytes it read in the same way, instead of reading the
    file through the network once more for the MAC when the group is opened.
    """

    def __init__(self, *, layerwise: bool):
        self.layerwise = layerwise
        # Layer-wise consumers take layer 0 before a group's last layer is read: its MAC
        # must have been checked when the group was opened.
        self.checks_macs = not layerwise

    def run(self, job: ReadJob) -> None:
        job.prefetch_all()
        outputs = None
        if job.outputs is not None:
            outputs = [tuple(_HeadRuns(dest, job.split) for dest in pair) for pair in host_views(job.outputs)]
        layers = job.layout.num_layers
        itemsize = job.layout.dtype.itemsize
        tensor_bytes = max(heads * dim for pair in job.layout.layers for heads, dim in pair) * job.split * itemsize

        def read(first: int, last: int) -> Callable[[int, int], None]:
            def work(lo: int, hi: int) -> None:
                reader = _GroupReader(job, outputs, None if outputs else np.empty(tensor_bytes, dtype=np.uint8))
                for g in range(lo, min(hi, job.valid)):
                    reader.read(g, range(first, last))

            return work

        if not self.layerwise:
            job.parallel(read(0, layers), 0, job.valid, job.total_bytes)
            job.progress.all_landed()
            return
        for layer in range(layers):
            job.parallel(read(layer, layer + 1), 0, job.valid, job.total_bytes // layers)
            job.progress.layer_landed(layer)


class _HeadRuns:
    """Where one group's tokens of one output tensor land: a contiguous run per head.

    Byte offsets into one flat view of the tensor, so a group's runs are slices (no numpy
    indexing per head, per layer, per group on the read loop).
    """

    def __init__(self, dest: np.ndarray, split: int):
        heads, tokens, _ = dest.shape  # C-contiguous: a view of one block (see allocate_outputs)
        self._bytes = memoryview(dest).cast("B")
        self._head_bytes = len(self._bytes) // heads
        self._run_bytes = self._head_bytes // tokens * split

    def of_group(self, group: int) -> list[memoryview]:
        run = self._run_bytes
        start = group * run
        return [self._bytes[h + start : h + start + run] for h in range(0, len(self._bytes), self._head_bytes)]


class _GroupReader:
    """One thread's reads of whole groups' tensors: into the outputs' runs, or through ``buffer`` into a landing."""

    def __init__(self, job: ReadJob, outputs: list[tuple[_HeadRuns, ...]] | None, buffer: np.ndarray | None):
        self.job = job
        self.outputs = outputs
        self.buffer = buffer
        self.bits = bits_dtype(job.layout.dtype.itemsize)

    def read(self, group: int, layers: range) -> None:
        """Reads group ``group``'s K and V of ``layers``, checking each tensor as it lands.

        One ``preadv`` per tensor, then its hash (and the MAC's) over the bytes just
        written, still in cache (measured 5-10% faster on GlusterFS than one ``preadv`` per
        layer, K and V together, hashed after both had landed).
        """
        job = self.job
        fragment = job.fragments[group]
        try:
            expected = fragment.checksums if job.verify else {}
            # Fed in file order: the header and tokens, then each layer's K runs and V runs.
            mac = fragment.start_mac(job.mac_key) if job.mac_key is not None else None
            for layer in layers:
                if group >= job.valid:
                    return  # a check failed: the rest of the group is not needed
                chunks = job.host_chunks(group, layer) if self.outputs is None else None
                for side, name in enumerate((key_name(layer), value_name(layer))):
                    entry = fragment.tensors[name]
                    if self.outputs is not None:
                        runs = self.outputs[layer][side].of_group(group)
                    else:
                        assert self.buffer is not None
                        runs = [memoryview(self.buffer)[: entry.end - entry.begin]]
                    fragment.read_into(runs, entry.begin)
                    if mac is not None:
                        for run in runs:
                            mac.update(run)
                    if job.verify:
                        digest = xxhash.xxh3_64()
                        for run in runs:
                            digest.update(run)
                        if digest.intdigest() != expected.get(name):
                            raise FragmentError(f"fragment {fragment.path}: checksum mismatch in {name} (damaged data)")
                    if chunks is not None:
                        spread(np.frombuffer(runs[0], dtype=self.bits).reshape(entry.shape), chunks, side)
            if mac is not None:
                mac.verify()
        except FragmentError as exc:
            job.fail(group, exc)
