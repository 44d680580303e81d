"""Copies into host outputs, straight from the memory-mapped fragments: each byte is copied once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import xxhash

from vua._kv_layout import as_bits, key_name, value_name
from vua._read._job import ReadJob, host_views
from vua.errors import FragmentError


class HostGroups:
    """Whole groups per thread, for layouts whose every K and V share one shape.

    The outputs are one (layers, 2, heads, tokens, dim) array and a fragment's data one
    (layers, 2, heads, split, dim) array, so a thread hashes a tensor, checks it and copies
    it while it is in cache, and prefetches the next group's file meanwhile.
    """

    checks_macs = False  # a load with auth_key has them checked before this copy (see start_load)

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

    checks_macs = False  # a load with auth_key has them checked before this copy (see start_load)

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


class HostPreads:
    """Host outputs filled with ``preadv`` straight from each file, no memory map: for network and FUSE
    file systems, where a file another node removes mid-read must be an error, not SIGBUS.

    A layer's K and V lie contiguously in a group's file, and each head's tokens are a
    contiguous run of the outputs, so one ``preadv`` per layer of a group lands every byte in
    place; each tensor is then hashed from where it landed, while it is in cache. With
    ``auth_key``, a whole-group read checks each group's MAC over the bytes where they
    landed in the same way, instead of reading the file through the network once more for
    the MAC when the group is opened.
    """

    def __init__(self, *, layerwise: bool):
        self.layerwise = layerwise
        # Layer-wise consumers take layer 0 before a group's last layer is read: its MAC
        # must have been checked when the group was opened.
        self.checks_macs = not layerwise

    def run(self, job: ReadJob) -> None:
        job.prefetch_all()
        dests = host_views(job.outputs)
        layers = len(dests)

        def read(first: int, last: int) -> Callable[[int, int], None]:
            def work(lo: int, hi: int) -> None:
                for g in range(lo, min(hi, job.valid)):
                    _read_group_layers(job, dests, g, range(first, last))

            return work

        if not self.layerwise:
            job.parallel(read(0, layers), 0, job.valid, job.total_bytes)
            job.load.all_landed()
            return
        for layer in range(layers):
            job.parallel(read(layer, layer + 1), 0, job.valid, job.total_bytes // layers)
            job.load.layer_landed(layer)


def _read_group_layers(job: ReadJob, dests: list[tuple[np.ndarray, np.ndarray]], group: int, layers: range) -> None:
    """Reads group ``group``'s K and V of ``layers`` into the outputs' runs, checking each layer as it lands.

    One ``preadv`` per layer (its K and V are contiguous in the file): the hash then reads
    what the read just wrote, while it is still in cache.
    """
    fragment = job.fragments[group]
    s = job.split
    try:
        expected = fragment.checksums if job.verify else {}
        # Fed in file order: the header and tokens, then each layer's K runs and V runs.
        mac = fragment.start_mac(job.mac_key) if job.mac_key is not None else None
        for layer in layers:
            if group >= job.valid:
                return  # a check failed: the rest of the group is not needed
            tensors = [
                # dest: (kv_heads, tokens, head_dim); one head's tokens of this group are contiguous
                (name, [memoryview(dest[h, group * s : (group + 1) * s]).cast("B") for h in range(dest.shape[0])])
                for dest, name in zip(dests[layer], (key_name(layer), value_name(layer)))
            ]
            fragment.read_into([run for _, runs in tensors for run in runs], fragment.tensors[tensors[0][0]].begin)
            if mac is not None:
                for _, runs in tensors:
                    for run in runs:
                        mac.update(run)
            for name, runs in tensors if job.verify else ():
                digest = xxhash.xxh3_64()
                for run in runs:
                    digest.update(run)
                if digest.intdigest() != expected.get(name):
                    raise FragmentError(f"fragment {fragment.path}: checksum mismatch in {name} (damaged data)")
        if mac is not None:
            mac.verify()
    except FragmentError as exc:
        job.fail(group, exc)
