"""One load's work: the open fragments, where their bytes go, and the host-side read and check of a group.

Every copy strategy takes a :class:`ReadJob`. It owns the fragments (and closes them when
the copy is over) and reports failures to the :class:`KVLoad` handle, which cuts the
prefix; strategies stop at ``job.valid`` groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np
import torch
import xxhash

from vua._fragment import Fragment
from vua._kv_layout import Layout, as_bits
from vua._read._destination import Landing, spread
from vua._read._load import KVPairs, LoadProgress
from vua._read._staging import HostBlockPool
from vua.errors import FragmentError

_INLINE_BYTES = 4 << 20  # below this a range is copied on the calling thread: fan-out costs more
_SLICE_BYTES = 512 << 10  # read into place and hashed a slice at a time, while it is in cache (L2)


class CopyStrategy:
    """One way to fill a load's outputs; :func:`vua._read.choose_copy` picks one per load."""

    # Whether run() checks the fragments' MACs (``job.mac_key``) over the bytes where they
    # land. Most do not: a load with auth_key then has them checked before any byte is
    # copied (see start_load).
    checks_macs: bool = False

    def run(self, job: ReadJob) -> None:
        """Fills the job's outputs for its groups (stopping at ``job.valid``) and marks every layer landed."""
        raise NotImplementedError


class ReadJob:
    """The fragments of groups 0..n-1 (open, header-validated, in order) and where they land.

    They land in the load's own ``outputs`` (per layer (K, V), views of ``block``, see
    :func:`allocate_outputs`), or where the caller's destination says (``landing``; the
    load then has no outputs).

    Args:
        fragments: the open fragments; the job closes them when the copy is over.
        layout: their common layout.
        split_factor: tokens per group.
        block, outputs: the outputs' one uint8 block and its views (None with a landing).
        executor: threads for parallel copies.
        verify_checksums: check tensors on the host against their xxh3 sums (where the GPU does not).
        progress: where to report failed groups and landed layers.
        mac_key: the store's MAC key when the fragments' MACs are still to be checked (not
            when they were opened): over the bytes as they land, where the copy can (see
            ``checks_macs`` in ``choose_copy``), else before any is copied.
    """

    def __init__(
        self,
        fragments: Sequence[Fragment],
        layout: Layout,
        split_factor: int,
        block: torch.Tensor | None,
        outputs: KVPairs | None,
        executor: Executor,
        *,
        verify_checksums: bool,
        progress: LoadProgress,
        mac_key: bytes | None = None,
        landing: Landing | None = None,
    ):
        self.fragments = list(fragments)
        self.layout = layout
        self.split = split_factor
        self.executor = executor
        self.verify = verify_checksums
        self.mac_key = mac_key
        self.progress = progress
        self.outputs = outputs
        self.landing = landing
        on_host = outputs is not None and block is not None and block.device.type == "cpu"
        self._host_outputs = host_views(outputs) if outputs is not None and on_host else None
        self.total_bytes = layout.kv_bytes(split_factor) * len(self.fragments)
        self.mapped = all(fragment.mapped for fragment in self.fragments)  # else read with pread
        heads, dim = layout.layers[0][0]
        # Every layer's K and V of one shape: the outputs are one (layers, 2, heads, tokens, dim)
        # block and a fragment's data one (layers, 2, heads, split, dim) array, so a group is
        # one verified copy instead of one per tensor (far fewer GIL round trips per byte).
        self.uniform = all(kv == (heads, dim) for pair in layout.layers for kv in pair)
        tokens = len(self.fragments) * split_factor
        self.block5 = None
        if self.uniform and block is not None:
            self.block5 = block.view(layout.dtype).view(layout.num_layers, 2, heads, tokens, dim)

    @property
    def valid(self) -> int:
        """Groups still in the prefix: a failed check lowers it, and work past it is skipped."""
        return self.progress.valid_groups

    def fail(self, group: int, exc: FragmentError) -> None:
        self.progress.cut(group, exc)

    def verify_macs(self) -> None:
        """Checks every fragment's MAC before any byte is copied (for copies that cannot check it as bytes land)."""
        key = self.mac_key
        if key is None:
            return

        def work(lo: int, hi: int) -> None:
            for g in range(lo, min(hi, self.valid)):
                try:
                    self.fragments[g].verify_mac(key)
                except FragmentError as exc:
                    self.fail(g, exc)
                    return

        self.parallel(work, 0, len(self.fragments), self.total_bytes)

    def close(self) -> None:
        for fragment in self.fragments:
            fragment.close()
        self.fragments = []

    def prefetch_all(self) -> None:
        """Starts every file's disk reads at once (for layer-major copies, which touch every file)."""
        for fragment in self.fragments:
            fragment.prefetch()

    def parallel(self, work: Callable[[int, int], None], first: int, last: int, nbytes: int) -> None:
        """Runs ``work(lo, hi)`` over [first, last) split into one range per thread.

        numpy copies and xxhash release the GIL, so the threads really run at once.
        """
        workers = getattr(self.executor, "_max_workers", 1)
        if nbytes < _INLINE_BYTES or workers <= 1 or last - first < 2:
            work(first, last)
            return
        step = -(-(last - first) // workers)
        futures = [self.executor.submit(work, lo, min(lo + step, last)) for lo in range(first, last, step)]
        for future in futures:
            future.result()

    def host_chunks(self, group: int, layer: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Where one group's layer lands on the host: numpy (K, V) views, in token order.

        One pair in the load's own outputs; the destination's views with a landing.
        """
        if self.landing is not None:
            return self.landing.host_chunks(group, layer)
        assert self._host_outputs is not None
        dest_k, dest_v = self._host_outputs[layer]
        s = self.split
        return [(dest_k[:, group * s : (group + 1) * s], dest_v[:, group * s : (group + 1) * s])]

    def copy_group_layer(
        self, group: int, layer: int, chunks: list[tuple[np.ndarray, np.ndarray]], *, check: bool = True
    ) -> None:
        """Verifies and copies one group's K and V of one layer into numpy (K, V) views, in token order.

        ``check=False`` copies only: the GPU checks these bytes after its copy.
        """
        fragment = self.fragments[group]
        try:
            source_k, source_v, sum_k, sum_v = fragment.layers[layer]
        except (FragmentError, IndexError) as exc:
            self.fail(group, exc if isinstance(exc, FragmentError) else FragmentError(str(exc)))
            return
        for side, (source, expected, name) in enumerate(((source_k, sum_k, "key"), (source_v, sum_v, "value"))):
            # Hash first: it pulls the bytes into cache, so the copy reads them from there.
            if check and self.verify and xxhash.xxh3_64_intdigest(memoryview(source)) != expected:
                self.fail(
                    group,
                    FragmentError(
                        f"fragment {fragment.path}: checksum mismatch in layer {layer} {name} (damaged data)"
                    ),
                )
                return
            spread(source, chunks, side)

    def read_group_in_place(self, group: int, dests: Sequence[np.ndarray]) -> None:
        """Reads one group's K and V straight into ``dests`` (one view per tensor in file order: K0, V0,
        K1, ...; each head's ``(split, dim)`` one contiguous run) and checks each tensor there.

        The kernel copies the file's bytes into place (no mapping touched, no second copy), a
        slice of about ``_SLICE_BYTES`` at a time (one ``preadv`` over as many tensors as fit),
        and each slice is hashed right after, while it is in cache. Bytes that do not match
        the stored checksums, or cannot be read, end the prefix before the group.
        """
        fragment = self.fragments[group]
        try:
            names = fragment.kv_names
            if len(names) != len(dests):
                raise FragmentError(f"fragment {fragment.path}: {len(names)} tensors for {len(dests)} views")
            digests = [xxhash.xxh3_64() for _ in names]
            offset = fragment.kv_range[0]  # the tensors lie back to back in file order (validated on opening)
            parts: list[memoryview] = []
            owners: list[int] = []  # the tensor each part belongs to
            size = 0  # the parts' bytes

            def land() -> None:  # one preadv for the parts so far, each hashed while in cache
                nonlocal offset, size
                fragment.read_into(parts, offset)
                for owner, done in zip(owners, parts):
                    digests[owner].update(done)
                offset, size = offset + size, 0
                parts.clear()
                owners.clear()

            runs = ((tensor, memoryview(head).cast("B")) for tensor, dest in enumerate(dests) for head in dest)
            for tensor, landed in runs:  # the file holds each tensor's heads in order, back to back
                for at in range(0, len(landed), _SLICE_BYTES):
                    part = landed[at : at + _SLICE_BYTES]
                    if parts and size + len(part) > _SLICE_BYTES:
                        land()
                    parts.append(part)
                    owners.append(tensor)
                    size += len(part)
            land()
            sums = fragment.checksums
            for name, digest in zip(names, digests):
                if digest.intdigest() != sums.get(name):
                    raise FragmentError(f"fragment {fragment.path}: checksum mismatch in {name} (damaged data)")
        except FragmentError as exc:
            self.fail(group, exc)

    def read_group(self, group: int, dest: np.ndarray, *, offset: int = 0, check: bool = False) -> None:
        """Reads one group's K and V bytes (file order) from ``offset`` on into ``dest``.

        ``check``: verify them here, tensor by tensor (for groups the GPU cannot check;
        ``dest`` is then the whole group). A failure ends the prefix before the group.
        """
        fragment = self.fragments[group]
        try:
            fragment.read_kv_into(memoryview(dest), offset)
            if check and self.verify:
                for name, begin, end in fragment.kv_offsets():
                    fragment.verify_checksum(name, dest[begin:end])
        except FragmentError as exc:  # the fragment turns read errors into these too
            self.fail(group, exc)


def allocate_outputs(
    layout: Layout, tokens: int, device: torch.device, host_pool: HostBlockPool | None
) -> tuple[torch.Tensor, KVPairs]:
    """One uint8 block for every layer's K and V of ``tokens`` tokens, and the per-layer views of it.

    Host outputs come from the pool of recycled blocks where there is one (fresh pages cost
    a page fault and zeroing each).

    Returns:
        (block, [(K, V) per layer]), each K and V ``(1, kv_heads, tokens, head_dim)``.
    """
    nbytes = layout.kv_bytes(1) * tokens
    if device.type == "cpu" and host_pool is not None:
        block = torch.from_numpy(host_pool.take(nbytes))
    else:
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return block, _carve(
        block, [((1, kh, tokens, kd), (1, vh, tokens, vd)) for (kh, kd), (vh, vd) in layout.layers], layout.dtype
    )


def _carve(
    base: torch.Tensor, shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], dtype: torch.dtype
) -> KVPairs:
    """Output tensors of the given (K shape, V shape) per layer, in order, as views of one uint8 block.

    A block made from a pooled numpy array stays alive as long as any of the views; the
    pool sees when the last one dies.
    """
    pairs, offset = [], 0
    for k_shape, v_shape in shapes:
        views = []
        for shape in (k_shape, v_shape):
            size = math.prod(shape) * dtype.itemsize
            views.append(base[offset : offset + size].view(dtype).view(shape))
            offset += size
        pairs.append((views[0], views[1]))
    return pairs


def host_views(outputs: KVPairs) -> list[tuple[np.ndarray, np.ndarray]]:
    """(layers) x (K, V) as (kv_heads, tokens, head_dim) integer numpy views of host outputs."""
    return [(as_bits(k)[0], as_bits(v)[0]) for k, v in outputs]
