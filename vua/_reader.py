"""The read path: copy verified fragments into output tensors.

A :class:`KVLoad` owns the open fragments of one prefix and copies each byte once:

- ``device="cpu"``: from the memory map straight into the outputs, which are views of one
  host block. When every layer's K and V share a shape (the usual case), the outputs are one
  (layers, 2, heads, tokens, dim) array and a fragment's data one (layers, 2, heads, split,
  dim) array, so threads take whole groups: hash a tensor, check it, and copy it while it
  is in cache. The next group's file is prefetched meanwhile.
- a CUDA device: whole groups are read with ``preadv`` into a pinned staging buffer, sent
  with one non-blocking DMA per run of groups on a side stream and re-laid out on the
  device, while the host fills the other staging buffer. The GPU checks each group's
  word sum (see ``_wordsum``) after the copy, so the host only moves bytes; groups stored
  without one are checked with xxh3 on the host. With ``gds`` the files go straight into
  GPU memory (GPUDirect Storage) and are checked there the same way. The caller's stream
  waits on CUDA events; the host waits only to learn how many groups passed.
- layer-wise loads (and layouts with layers of different shapes) go layer by layer, so a
  consumer can take layer i as soon as it has landed.

Any failed check ends the prefix before the damaged group (with a warning); the groups
before it are complete and correct in every layer, so the result is only ever shorter.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np
import torch
import xxhash

from vua import _gds, _wordsum
from vua._fragment import Fragment, Layout, as_bits
from vua._staging import HostBlockPool, PinnedStaging
from vua.errors import FragmentError

logger = logging.getLogger(__name__)

_INLINE_BYTES = 4 << 20  # below this a layer is copied on the calling thread: fan-out costs more
_MIN_RUNS = 4  # CUDA reads come in at least this many runs where they can: reads overlap copies


class KVLoad:
    """An in-progress load of a stored prefix; ``VUA.get_closest`` and ``VUA.load`` return one's result.

    Args:
        fragments: the open, header-validated fragments of groups 0..n-1, in order.
        layout: their common layout.
        split_factor: tokens per group.
        device: where the output tensors live.
        executor: threads for parallel copies.
        staging: pinned buffers and side stream (CUDA devices only).
        host_pool: recycled host memory for CPU outputs (None: fresh memory).
        verify_checksums: check every tensor against the checksum stored at put time.
        gds: read whole groups with GPUDirect Storage where the platform allows (CUDA only).
        background: run on a thread of its own, so the caller can consume layers as they land.
        on_done: called with the load itself when it has finished.
    """

    def __init__(
        self,
        fragments: Sequence[Fragment],
        layout: Layout,
        split_factor: int,
        device: torch.device,
        executor: Executor,
        *,
        staging: PinnedStaging | None,
        host_pool: HostBlockPool | None = None,
        verify_checksums: bool,
        gds: bool = False,
        background: bool,
        on_done: Callable[[KVLoad], None] | None = None,
    ):
        self._fragments = list(fragments)
        self._requested_groups = len(self._fragments)
        self._layout = layout
        self._split = split_factor
        self._device = device
        self._executor = executor
        self._staging = staging
        self._verify = verify_checksums
        self._gds = gds
        self._on_done = on_done
        self._layerwise = background
        self._total_bytes = layout.kv_bytes(split_factor) * len(self._fragments)
        self._valid_groups = len(fragments)
        self._lock = threading.Lock()
        self.damaged_groups: set[int] = set()  # groups whose files failed a check
        self._error: BaseException | None = None
        self._layer_ready = [threading.Event() for _ in layout.layers]
        self._layer_events: list[torch.cuda.Event | None] = [None] * layout.num_layers
        self._finished = threading.Event()

        tokens = len(fragments) * split_factor
        shapes = [((1, kh, tokens, kd), (1, vh, tokens, vd)) for (kh, kd), (vh, vd) in layout.layers]
        # (layers) x ((1, kv_heads, tokens, head_dim) for K, the same for V)
        if device.type == "cpu":
            block = (
                torch.from_numpy(host_pool.take(self._total_bytes))
                if host_pool
                else torch.empty(self._total_bytes, dtype=torch.uint8)
            )
        else:
            block = torch.empty(self._total_bytes, dtype=torch.uint8, device=device)
        self.outputs = _carve(block, shapes, layout.dtype)
        # Every layer's K and V of one shape: the outputs are one (layers, 2, heads, tokens, dim)
        # block and a fragment's data one (layers, 2, heads, split, dim) array, so a group is
        # one verified copy instead of one per tensor (far fewer GIL round trips per byte).
        heads_dim = layout.layers[0][0]
        self._uniform = all(kv == heads_dim for pair in layout.layers for kv in pair)
        # Word sums need each head's run of a group to be whole 4 KiB rows (see _wordsum).
        run_bytes = [split_factor * dim * layout.dtype.itemsize for pair in layout.layers for _, dim in pair]
        self._whole_rows = all(_wordsum.whole_rows(n) for n in run_bytes)
        if self._uniform:
            self._block5 = block.view(layout.dtype).view(layout.num_layers, 2, heads_dim[0], tokens, heads_dim[1])
        if staging is not None:
            # The outputs' memory may have been freed by work still queued on the caller's
            # stream; the side stream must not write it before that work is done.
            staging.stream.wait_stream(torch.cuda.current_stream(device))
        if background:
            threading.Thread(target=self._run, name="vua-load", daemon=True).start()
        else:
            self._run()

    # -- consumer side ------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        """Groups verified so far; final once :meth:`wait` has returned."""
        return self._valid_groups

    def wait_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Waits for one layer and returns its (K, V), each ``(1, heads, tokens, head_dim)``.

        On CUDA this waits only on the caller's current stream (no host synchronisation):
        kernels queued after it see the data. The tokens dimension covers the groups
        verified so far; later layers can only shorten the prefix, which :meth:`wait` reports.
        """
        self._layer_ready[layer].wait()
        if self._error is not None:
            raise self._error
        event = self._layer_events[layer]
        if event is not None:
            torch.cuda.current_stream(self._device).wait_event(event)
        tokens = self._valid_groups * self._split
        k, v = self.outputs[layer]
        return k[:, :, :tokens], v[:, :, :tokens]

    def wait(self) -> int:
        """Waits for every layer and returns the number of valid groups (0: nothing usable)."""
        self._finished.wait()
        if self._error is not None:
            raise self._error
        last = self._layer_events[-1]
        if last is not None:
            torch.cuda.current_stream(self._device).wait_event(last)
        return self._valid_groups

    def data(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The finished outputs, cut to the valid prefix (a contiguous copy only when cut)."""
        groups = self.wait()
        tokens = groups * self._split
        if groups == self._requested_groups:
            return self.outputs
        return [(k[:, :, :tokens].clone(), v[:, :, :tokens].clone()) for k, v in self.outputs]

    # -- producer side ------------------------------------------------------------------

    def _fail(self, group: int, exc: FragmentError) -> None:
        with self._lock:
            if exc.damaged:
                self.damaged_groups.add(group)
            if group < self._valid_groups:
                self._valid_groups = group
                logger.warning("stored prefix ends before group %d: %s", group, exc)

    def _copy_group_layer(
        self, group: int, layer: int, dest_k: np.ndarray, dest_v: np.ndarray, *, check: bool = True
    ) -> None:
        """Verifies and copies one group's K and V of one layer into numpy views of the destination.

        ``check=False`` copies only: the GPU checks these bytes after its copy.
        """
        fragment = self._fragments[group]
        try:
            source_k, source_v, sum_k, sum_v = fragment.layers[layer]
        except (FragmentError, IndexError) as exc:
            self._fail(group, exc if isinstance(exc, FragmentError) else FragmentError(str(exc)))
            return
        for source, dest, expected, name in ((source_k, dest_k, sum_k, "key"), (source_v, dest_v, sum_v, "value")):
            # Hash first: it pulls the bytes into cache, so the copy reads them from there.
            if check and self._verify and xxhash.xxh3_64_intdigest(source) != expected:
                self._fail(
                    group,
                    FragmentError(
                        f"fragment {fragment.path}: checksum mismatch in layer {layer} {name} (damaged data)"
                    ),
                )
                return
            np.copyto(dest, source)

    def _copy_group(self, group: int, dest: np.ndarray) -> None:
        """Verifies and copies one group's whole KV into ``dest``, a (layers, 2, heads, split, dim) integer view.

        Tensor by tensor, hash then copy: the copy reads what the hash just pulled into cache
        (one hash and one copy per group measured no faster, even on 16 cores).
        """
        if self._verify:
            for layer in range(dest.shape[0]):
                if group >= self._valid_groups:
                    return  # a check failed: the rest of the group is not needed
                self._copy_group_layer(group, layer, dest[layer, 0], dest[layer, 1])
            return
        try:
            source = self._fragments[group].kv_block()
        except FragmentError as exc:
            self._fail(group, exc)
            return
        np.copyto(dest, source)

    def _parallel(self, work: Callable[[int, int], None], first: int, last: int, nbytes: int) -> None:
        """Runs ``work(lo, hi)`` over [first, last) split into one range per thread.

        numpy copies and xxhash release the GIL, so the threads really run at once.
        """
        workers = getattr(self._executor, "_max_workers", 1)
        if nbytes < _INLINE_BYTES or workers <= 1 or last - first < 2:
            work(first, last)
            return
        step = -(-(last - first) // workers)
        futures = [self._executor.submit(work, lo, min(lo + step, last)) for lo in range(first, last, step)]
        for future in futures:
            future.result()

    def _run(self) -> None:
        try:
            if self._layerwise or not self._uniform:
                for fragment in self._fragments:  # layer-major reads touch every file at once
                    fragment.prefetch()
            if self._staging is None:
                self._run_cpu(self._layerwise)
            else:
                with self._staging.lock:
                    self._run_cuda(self._staging)
        except BaseException as exc:  # surfaced to the consumer by wait()/wait_layer()
            self._error = exc
            for ready in self._layer_ready:
                ready.set()
        finally:
            for fragment in self._fragments:
                fragment.close()
            self._fragments = []
            self._finished.set()
            if self._on_done is not None and self._error is None:
                self._on_done(self)

    def _run_cpu(self, layerwise: bool) -> None:
        s = self._split
        # (layers) x (K, V) as (kv_heads, tokens, head_dim) integer views of the outputs
        dests = [(as_bits(k)[0], as_bits(v)[0]) for k, v in self.outputs]

        def copy(layers: range) -> Callable[[int, int], None]:
            def work(lo: int, hi: int) -> None:
                for layer in layers:
                    dest_k, dest_v = dests[layer]
                    for g in range(lo, min(hi, self._valid_groups)):
                        self._copy_group_layer(g, layer, dest_k[:, g * s : (g + 1) * s], dest_v[:, g * s : (g + 1) * s])

            return work

        if not layerwise:
            if self._uniform:
                block = as_bits(self._block5)

                def work(lo: int, hi: int) -> None:
                    if lo < len(self._fragments):
                        self._fragments[lo].prefetch()
                    for g in range(lo, min(hi, self._valid_groups)):
                        if g + 1 < hi and g + 1 < len(self._fragments):
                            self._fragments[g + 1].prefetch()  # disk reads overlap this copy
                        self._copy_group(g, block[:, :, :, g * s : (g + 1) * s])

                self._parallel(work, 0, self._valid_groups, self._total_bytes)
            else:
                # Each thread takes a run of groups through every layer: no barrier per layer.
                self._parallel(copy(range(len(dests))), 0, self._valid_groups, self._total_bytes)
            for ready in self._layer_ready:
                ready.set()
            return
        for layer in range(len(dests)):
            self._parallel(copy(range(layer, layer + 1)), 0, self._valid_groups, self._total_bytes // len(dests))
            self._layer_ready[layer].set()

    def _run_cuda(self, staging: PinnedStaging) -> None:
        expected = self._gpu_expectations()
        if self._uniform and not self._layerwise:
            if not (self._gds and self._run_gds(staging, expected)):
                self._run_cuda_groups(staging, expected)
        else:
            self._run_cuda_layers(staging, expected)

    def _read_group(self, group: int, dest: np.ndarray, *, offset: int = 0, check: bool = False) -> None:
        """Reads one group's K and V bytes (file order) from ``offset`` on into ``dest``.

        ``check``: verify them here, tensor by tensor (for groups the GPU cannot check;
        ``dest`` is then the whole group). A failure ends the prefix before the group.
        """
        fragment = self._fragments[group]
        try:
            fragment.read_kv_into(memoryview(dest), offset)
            if check and self._verify:
                for name, begin, end in fragment.kv_offsets():
                    fragment.verify_checksum(name, dest[begin:end])
        except (FragmentError, OSError) as exc:
            self._fail(
                group, exc if isinstance(exc, FragmentError) else FragmentError(f"reading {fragment.path}: {exc}")
            )

    def _gpu_expectations(self) -> list[list[int] | None]:
        """Per group, the word sums the GPU is to check, or None to check on the host.

        A group whose stored sums are malformed ends the prefix (the list stops there).
        """
        if not self._verify or not self._whole_rows:
            return [None] * len(self._fragments)
        expected = []
        for group, fragment in enumerate(self._fragments):
            try:
                expected.append(fragment.wordsums)
            except FragmentError as exc:
                self._fail(group, exc)
                break
        return expected

    def _place_groups(self, groups: torch.Tensor, first: int, last: int) -> None:
        """Copies groups ``first..last-1``, laid out as in their files, into the outputs (on the GPU).

        ``groups`` is ``(last - first) * group_bytes`` uint8 on the device; queue on the side stream.
        """
        s = self._split
        layers, _, heads, _, dim = self._block5.shape
        n = last - first
        # (groups, layers, 2, heads, split, dim) -> (layers, 2, heads, groups * split, dim)
        runs = groups.view(self._layout.dtype).view(n, layers, 2, heads, s, dim)
        target = self._block5[:, :, :, first * s : last * s].view(layers, 2, heads, n, s, dim)
        target.copy_(runs.permute(1, 2, 3, 0, 4, 5))

    def _check_on_device(self, sums: torch.Tensor, expected: list[list[int] | None]) -> None:
        """Compares the word sums the GPU computed, ``(groups, tensors)``, with the stored ones.

        A mismatch ends the prefix. Waits for the side stream (the caller's context): the
        caller must know how many groups are valid.
        """
        valid = self._valid_groups
        if all(e is None for e in expected[:valid]):
            return
        self._fail_first_mismatch(sums[:valid].cpu().tolist(), expected, slice(None), "after the copy")

    def _fail_first_mismatch(
        self, got: list[list[int]], expected: list[list[int] | None], tensors: slice, where: str
    ) -> None:
        """Ends the prefix at the first group whose sums from the GPU (``got``, per group) differ
        from the stored ones (``expected``, per group, cut to ``tensors``)."""
        for group in range(self._valid_groups):
            stored = expected[group]
            if stored is not None and not all(map(_wordsum.matches, got[group], stored[tensors])):
                path = self._fragments[group].path
                self._fail(group, FragmentError(f"fragment {path}: word sum mismatch {where} (damaged data)"))
                return

    def _group_wordsums(self, groups: torch.Tensor) -> torch.Tensor:
        """Word sums of whole groups as laid out in their files (uint8 ``(n, group_bytes)`` on
        the device), ``(n, tensors)``; overwrites ``groups``, so use their data first."""
        n = groups.shape[0]
        tensors = 2 * self._layout.num_layers  # uniform layout: all the same size
        words = groups.view(torch.int64).view(n * tensors, 1, -1, _wordsum.ROW_WORDS)
        return _wordsum.device_wordsums(words, inplace=True).view(n, tensors)

    def _finish_cuda(self, stream: torch.cuda.Stream) -> None:
        done = stream.record_event()
        for layer in range(len(self.outputs)):
            self._layer_events[layer] = done
            self._layer_ready[layer].set()

    def _run_cuda_groups(self, staging: PinnedStaging, expected: list[list[int] | None]) -> None:
        """Runs of whole groups: read into pinned staging, one DMA, re-laid out and checked on the GPU.

        There are several runs where the prefix allows, so the host fills one staging buffer
        while the GPU copies the other; within a run the threads split the bytes, not the
        groups, so even a run of one large group keeps every thread busy.
        """
        group_bytes = self._layout.kv_bytes(self._split)
        layers = self._layout.num_layers
        per_run = max(1, min(staging.slot_bytes // group_bytes, -(-self._valid_groups // _MIN_RUNS)))
        stream = staging.stream
        with torch.cuda.stream(stream):  # memory of the side stream's own, like everything it writes
            sums = torch.empty(self._requested_groups, 2 * layers, dtype=torch.int64, device=self._device)
        first = 0
        while first < self._valid_groups:
            last = min(self._valid_groups, first + per_run)
            slot_id, slot = staging.acquire((last - first) * group_bytes)
            host = slot.numpy()  # group j of the run at j * group_bytes, as in its file
            for g in range(last, min(last + per_run, len(self._fragments))):
                self._fragments[g].prefetch()  # the next run's disk reads start now

            def read_bytes(lo: int, hi: int, first: int = first, host: np.ndarray = host) -> None:
                """Bytes [lo, hi) of the run: a piece of one group or two, checked on the GPU."""
                while lo < hi:
                    j, offset = divmod(lo, group_bytes)
                    end = min(hi, (j + 1) * group_bytes)
                    if first + j >= self._valid_groups:
                        return
                    self._read_group(first + j, host[lo:end], offset=offset)
                    lo = end

            def read_groups(lo: int, hi: int, first: int = first, host: np.ndarray = host) -> None:
                """Groups [lo, hi), each by one thread, hashed here where the GPU cannot check them."""
                for g in range(lo, min(hi, self._valid_groups)):
                    at = (g - first) * group_bytes
                    self._read_group(g, host[at : at + group_bytes], check=expected[g] is None)

            nbytes = (last - first) * group_bytes
            if all(e is not None for e in expected[first:last]):
                self._parallel(read_bytes, 0, nbytes, nbytes)
            else:
                self._parallel(read_groups, first, last, nbytes)
            last = min(last, self._valid_groups)  # a failed read may have cut this run
            n = last - first
            with torch.cuda.stream(stream):
                if n > 0:
                    # Pinned source + non_blocking: one DMA the host does not wait for; the
                    # re-layout and the sums run at device-memory speed.
                    device_copy = slot[: n * group_bytes].to(self._device, non_blocking=True)
                    self._place_groups(device_copy, first, last)
                    if any(e is not None for e in expected[first:last]):
                        sums[first:last] = self._group_wordsums(device_copy.view(n, group_bytes))
                staging.release(slot_id, stream.record_event())
            first = last if n > 0 else self._valid_groups
        with torch.cuda.stream(stream):
            self._check_on_device(sums, expected)
        self._finish_cuda(stream)

    def _run_gds(self, staging: PinnedStaging, expected: list[list[int] | None]) -> bool:
        """Whole groups read with GPUDirect Storage into GPU memory, checked and re-laid out there.

        Returns False, having read nothing, when this load cannot use GDS (a group without
        a word sum, or the platform refuses); the caller then takes the staging path.
        """
        if not _gds.usable() or any(e is None for e in expected[: self._valid_groups]):
            return False
        group_bytes = self._layout.kv_bytes(self._split)
        stream = staging.stream
        begin, end = self._fragments[0].kv_range
        start, span = _gds.aligned_span(begin, end)
        skip = begin - start  # the same in every fragment of this split: data starts 4 KiB-aligned
        with torch.cuda.stream(stream):
            # Two buffers: cuFile fills one while the GPU re-lays out and checks the other.
            scratch = [torch.empty(span, dtype=torch.uint8, device=self._device) for _ in range(2)]
            sums = torch.empty(
                self._requested_groups, 2 * self._layout.num_layers, dtype=torch.int64, device=self._device
            )
        stream.synchronize()  # cuFile writes outside stream order: freed memory must be idle first
        idle: list[torch.cuda.Event | None] = [None, None]
        for g in range(self._valid_groups):
            fragment = self._fragments[g]
            buffer = scratch[g % 2]
            if idle[g % 2] is not None:
                idle[g % 2].synchronize()
            begin, end = fragment.kv_range
            try:
                if begin % _gds.ALIGN != skip or end - begin != group_bytes:
                    raise FragmentError(f"fragment {fragment.path}: K and V not where its layout puts them")
                _gds.read_into(fragment.path, buffer, begin - skip)
            except FileNotFoundError:
                self._fail(g, FragmentError(f"fragment {fragment.path} vanished while being read"))
                break
            except FragmentError as exc:
                self._fail(g, exc)
                break
            except (OSError, RuntimeError) as exc:
                if g == 0:
                    _gds.disable(f"{type(exc).__name__}: {exc}")
                    return False
                error = FragmentError(f"GPUDirect read of {fragment.path} failed: {exc}")
                error.damaged = False  # the platform's doing, not the file's
                self._fail(g, error)
                break
            with torch.cuda.stream(stream):
                data = buffer[skip : skip + group_bytes]
                self._place_groups(data, g, g + 1)
                sums[g : g + 1] = self._group_wordsums(data.view(1, group_bytes))
                idle[g % 2] = stream.record_event()
        with torch.cuda.stream(stream):
            self._check_on_device(sums, expected)
        self._finish_cuda(stream)
        return True

    def _run_cuda_layers(self, staging: PinnedStaging, expected: list[list[int] | None]) -> None:
        """Layer by layer, so a layer-wise consumer can start on layer 0 early.

        Groups with word sums are copied without hashing and checked on the GPU; a layer is
        handed out once its check is back, which the host collects while it reads the next
        layer (so the check costs no wait unless the GPU falls behind).
        """
        s = self._split
        dtype = self._layout.dtype
        stream = staging.stream
        on_device = any(e is not None for e in expected)
        if on_device:
            with torch.cuda.stream(stream):
                sums = torch.empty(len(self.outputs), len(expected), 2, dtype=torch.int64, device=self._device)
            landed = torch.empty(sums.shape, dtype=torch.int64, pin_memory=True)  # (layers, groups, K|V)
        unsettled: list[tuple[int, torch.cuda.Event]] = []  # layers queued, their check not yet read

        def settle(layer: int, checked: torch.cuda.Event) -> None:
            checked.synchronize()
            layer_sums = slice(2 * layer, 2 * layer + 2)  # its K and V
            self._fail_first_mismatch(landed[layer].tolist(), expected, layer_sums, f"in layer {layer} after the copy")
            self._layer_ready[layer].set()

        for layer, (out_k, out_v) in enumerate(self.outputs):
            (kh, kd), (vh, vd) = self._layout.layers[layer]
            group_bytes = (kh * kd + vh * vd) * s * dtype.itemsize
            # A slot takes a run of groups of this layer; groups are split across threads.
            per_slot = max(1, staging.slot_bytes // group_bytes)
            first = 0
            while first < self._valid_groups:
                last = min(self._valid_groups, first + per_slot)
                n = (last - first) * s
                slot_id, slot = staging.acquire((last - first) * group_bytes)
                # (kv_heads, n, head_dim) for K then V, packed at the start of the slot
                k_elems, v_elems = kh * n * kd, vh * n * vd
                typed = slot[: (k_elems + v_elems) * dtype.itemsize].view(dtype)
                stage_k = typed[:k_elems].view(kh, n, kd)
                stage_v = typed[k_elems:].view(vh, n, vd)
                bits_k, bits_v = as_bits(stage_k), as_bits(stage_v)

                def work(
                    lo: int,
                    hi: int,
                    first: int = first,
                    layer: int = layer,
                    bits_k: np.ndarray = bits_k,
                    bits_v: np.ndarray = bits_v,
                ) -> None:
                    for g in range(lo, min(hi, self._valid_groups)):
                        at = (g - first) * s
                        check = expected[g] is None
                        self._copy_group_layer(g, layer, bits_k[:, at : at + s], bits_v[:, at : at + s], check=check)

                self._parallel(work, first, last, (last - first) * group_bytes)
                last = min(last, self._valid_groups)  # a failed check may have cut this chunk
                n = (last - first) * s
                with torch.cuda.stream(stream):
                    if n > 0:
                        # Pinned source + non_blocking: a DMA the host does not wait for.
                        k_out, v_out = out_k[0, :, first * s : last * s], out_v[0, :, first * s : last * s]
                        k_out.copy_(stage_k[:, :n], non_blocking=True)
                        v_out.copy_(stage_v[:, :n], non_blocking=True)
                        for kv, out in enumerate((k_out, v_out) if on_device else ()):
                            # (kv_heads, tokens, head_dim) -> (groups,)
                            words = _wordsum.as_words(out, last - first)
                            sums[layer, first:last, kv] = _wordsum.device_wordsums(words)
                    staging.release(slot_id, stream.record_event())
                first = last if n > 0 else self._valid_groups
            with torch.cuda.stream(stream):
                self._layer_events[layer] = stream.record_event()
                if on_device:
                    landed[layer].copy_(sums[layer], non_blocking=True)
                    unsettled.append((layer, stream.record_event()))
            if not on_device:
                self._layer_ready[layer].set()
            while len(unsettled) > 1:  # the previous layer's check, read while this one copies
                settle(*unsettled.pop(0))
        for layer, checked in unsettled:
            settle(layer, checked)


def _carve(
    base: torch.Tensor, shapes: list[tuple[tuple[int, ...], ...]], dtype: torch.dtype
) -> list[tuple[torch.Tensor, ...]]:
    """Output tensors of the given shapes, in order, as views of one uint8 block.

    A block made from a pooled numpy array stays alive as long as any of the views; the
    pool sees when the last one dies.
    """
    sizes = [math.prod(shape) * dtype.itemsize for pair in shapes for shape in pair]
    tensors, offset = [], 0
    for size, shape in zip(sizes, (shape for pair in shapes for shape in pair)):
        tensors.append(base[offset : offset + size].view(dtype).view(shape))
        offset += size
    return [tuple(tensors[i : i + 2]) for i in range(0, len(tensors), 2)]
