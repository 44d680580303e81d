"""Copies to a CUDA device through pinned host staging: the host fills one buffer while the GPU copies the other."""

from __future__ import annotations

import numpy as np
import torch

from vua import _wordsum
from vua._kv_layout import as_bits
from vua._read._device_check import DeviceCheck
from vua._read._job import CopyStrategy, ReadJob
from vua._read._platform import CudaPlatform
from vua._read._staging import PinnedStaging

_MIN_RUNS = 4  # reads come in at least this many runs where they can: reads overlap copies


def place_groups(job: ReadJob, groups: torch.Tensor, first: int, last: int) -> None:
    """Copies groups ``first..last-1``, laid out as in their files, into the outputs (on the GPU).

    ``groups`` is ``(last - first) * group_bytes`` uint8 on the device; queue on the side stream.
    """
    assert job.block5 is not None  # whole-group paths run for uniform layouts only
    s = job.split
    layers, _, heads, _, dim = job.block5.shape
    n = last - first
    # (groups, layers, 2, heads, split, dim) -> (layers, 2, heads, groups * split, dim)
    runs = groups.view(job.layout.dtype).view(n, layers, 2, heads, s, dim)
    target = job.block5[:, :, :, first * s : last * s].view(layers, 2, heads, n, s, dim)
    target.copy_(runs.permute(1, 2, 3, 0, 4, 5))


class StagedGroups(CopyStrategy):
    """Runs of whole groups: read with ``preadv`` into pinned staging, one DMA, re-laid out and checked on the GPU.

    There are several runs where the prefix allows, so the host fills one staging buffer
    while the GPU copies the other; within a run the threads split the bytes, not the
    groups, so even a run of one large group keeps every thread busy.
    """

    def __init__(self, platform: CudaPlatform, staging: PinnedStaging):
        self.platform = platform
        self.staging = staging

    def run(self, job: ReadJob) -> None:
        check = DeviceCheck(job)
        platform, staging = self.platform, self.staging
        group_bytes = job.layout.kv_bytes(job.split)
        per_run = max(1, min(staging.slot_bytes // group_bytes, -(-job.valid // _MIN_RUNS)))
        stream = staging.stream
        with platform.on(stream):  # memory of the side stream's own, like everything it writes
            sums = torch.empty(len(job.fragments), 2 * job.layout.num_layers, dtype=torch.int64, device=platform.device)
        first = 0
        while first < job.valid:
            last = min(job.valid, first + per_run)
            slot_id, slot = staging.acquire((last - first) * group_bytes)
            host = slot.numpy()  # group j of the run at j * group_bytes, as in its file
            for g in range(last, min(last + per_run, len(job.fragments))):
                job.fragments[g].prefetch()  # the next run's disk reads start now

            def read_bytes(lo: int, hi: int, first: int = first, host: np.ndarray = host) -> None:
                """Bytes [lo, hi) of the run: a piece of one group or two, checked on the GPU."""
                while lo < hi:
                    j, offset = divmod(lo, group_bytes)
                    end = min(hi, (j + 1) * group_bytes)
                    if first + j >= job.valid:
                        return
                    job.read_group(first + j, host[lo:end], offset=offset)
                    lo = end

            def read_groups(lo: int, hi: int, first: int = first, host: np.ndarray = host) -> None:
                """Groups [lo, hi), each by one thread, hashed here where the GPU cannot check them."""
                for g in range(lo, min(hi, job.valid)):
                    at = (g - first) * group_bytes
                    job.read_group(g, host[at : at + group_bytes], check=check.on_host(g))

            nbytes = (last - first) * group_bytes
            if check.on_device(first, last):
                job.parallel(read_bytes, 0, nbytes, nbytes)
            else:
                job.parallel(read_groups, first, last, nbytes)
            last = min(last, job.valid)  # a failed read may have cut this run
            n = last - first
            with platform.on(stream):
                if n > 0:
                    # Pinned source + non_blocking: one DMA the host does not wait for; the
                    # re-layout and the sums run at device-memory speed.
                    device_copy = slot[: n * group_bytes].to(platform.device, non_blocking=True)
                    place_groups(job, device_copy, first, last)
                    if check.any_on_device(first, last):
                        sums[first:last] = check.group_sums(device_copy.view(n, group_bytes))
                staging.release(slot_id, stream.record_event())
            first = last if n > 0 else job.valid
        with platform.on(stream):
            check.settle(sums)
        job.progress.all_landed(stream.record_event())


class StagedLayers(CopyStrategy):
    """Layer by layer through pinned staging, so a layer-wise consumer can start on layer 0 early.

    Groups with word sums are copied without hashing and checked on the GPU; a layer is
    handed out once its check is back, which the host collects while it reads the next
    layer (so the check costs no wait unless the GPU falls behind). Into a caller's
    destination, each run lands in device memory of the load's own (one slot's worth,
    reused), where it is summed, and is copied from there into the destination's views.
    """

    def __init__(self, platform: CudaPlatform, staging: PinnedStaging):
        self.platform = platform
        self.staging = staging

    def run(self, job: ReadJob) -> None:
        job.prefetch_all()  # layer-major reads touch every file at once
        check = DeviceCheck(job)
        platform, staging = self.platform, self.staging
        s = job.split
        dtype = job.layout.dtype
        stream = staging.stream
        on_device = check.any_on_device()
        layers = job.layout.num_layers
        landing = job.landing
        if on_device:
            with platform.on(stream):
                sums = torch.empty(layers, len(check.expected), 2, dtype=torch.int64, device=platform.device)
            landed = platform.pinned(sums.numel() * 8).view(torch.int64).view(sums.shape)  # (layers, groups, K|V)
        unsettled: list[tuple[int, torch.cuda.Event]] = []  # layers queued, their check not yet read

        def settle(layer: int, checked: torch.cuda.Event) -> None:
            checked.synchronize()
            layer_sums = slice(2 * layer, 2 * layer + 2)  # its K and V
            check.cut_at_first_mismatch(landed[layer].tolist(), layer_sums, f"in layer {layer} after the copy")
            job.progress.layer_landed(layer)

        if landing is not None:
            largest = max((kh * kd + vh * vd) * s * dtype.itemsize for (kh, kd), (vh, vd) in job.layout.layers)
            with platform.on(stream):  # reused run after run: the stream orders its uses
                device_run = torch.empty(max(staging.slot_bytes, largest), dtype=torch.uint8, device=platform.device)
        for layer in range(layers):
            (kh, kd), (vh, vd) = job.layout.layers[layer]
            group_bytes = (kh * kd + vh * vd) * s * dtype.itemsize
            # A slot takes a run of groups of this layer; groups are split across threads.
            per_slot = max(1, staging.slot_bytes // group_bytes)
            first = 0
            while first < job.valid:
                last = min(job.valid, first + per_slot)
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
                    for g in range(lo, min(hi, job.valid)):
                        at = (g - first) * s
                        job.copy_group_layer(
                            g, layer, [(bits_k[:, at : at + s], bits_v[:, at : at + s])], check=check.on_host(g)
                        )

                job.parallel(work, first, last, (last - first) * group_bytes)
                last = min(last, job.valid)  # a failed check may have cut this chunk
                n = (last - first) * s
                with platform.on(stream):
                    if n > 0:
                        # Pinned source + non_blocking: a DMA the host does not wait for.
                        if job.outputs is not None:
                            out_k, out_v = job.outputs[layer]
                            k_out, v_out = out_k[0, :, first * s : last * s], out_v[0, :, first * s : last * s]
                        else:
                            run = device_run[: (kh * kd + vh * vd) * n * dtype.itemsize].view(dtype)
                            k_out, v_out = run[: kh * n * kd].view(kh, n, kd), run[kh * n * kd :].view(vh, n, vd)
                        k_out.copy_(stage_k[:, :n], non_blocking=True)
                        v_out.copy_(stage_v[:, :n], non_blocking=True)
                        for kv, out in enumerate((k_out, v_out) if on_device else ()):
                            # (kv_heads, tokens, head_dim) -> (groups,)
                            words = _wordsum.as_words(out, last - first)
                            sums[layer, first:last, kv] = _wordsum.device_wordsums(words)
                        if landing is not None:
                            for g in range(first, last):
                                at = (g - first) * s
                                landing.place(g, layer, k_out[:, at : at + s], v_out[:, at : at + s])
                    staging.release(slot_id, stream.record_event())
                first = last if n > 0 else job.valid
            with platform.on(stream):
                job.progress.layer_queued(layer, stream.record_event())
                if on_device:
                    landed[layer].copy_(sums[layer], non_blocking=True)
                    unsettled.append((layer, stream.record_event()))
            if not on_device:
                job.progress.layer_landed(layer)
            while len(unsettled) > 1:  # the previous layer's check, read while this one copies
                settle(*unsettled.pop(0))
        for layer, checked in unsettled:
            settle(layer, checked)
