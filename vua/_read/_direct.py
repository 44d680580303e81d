"""Copies to a CUDA device with GPUDirect Storage: file bytes straight into GPU memory, checked there."""

from __future__ import annotations

import torch

from vua._read import _gds
from vua._read._device_check import DeviceCheck
from vua._read._job import CopyStrategy, ReadJob
from vua._read._platform import CudaPlatform
from vua._read._staged import StagedGroups, place_groups
from vua.errors import FragmentError


class DirectGroups(CopyStrategy):
    """Whole groups read by cuFile into GPU memory, re-laid out and checked on the GPU.

    Where this load cannot use GDS (a group without a word sum, or the platform refuses
    its first read) it falls back to ``fallback`` having read nothing, and a platform that
    refused is not asked again in this process.
    """

    def __init__(self, platform: CudaPlatform, fallback: StagedGroups):
        self.platform = platform
        self.fallback = fallback

    def run(self, job: ReadJob) -> None:
        if not self._run(job):
            self.fallback.run(job)

    def _run(self, job: ReadJob) -> bool:
        check = DeviceCheck(job)
        platform = self.platform
        if not platform.direct_reads_usable() or not check.on_device(0, job.valid):
            return False
        group_bytes = job.layout.kv_bytes(job.split)
        stream = self.fallback.staging.stream
        begin, end = job.fragments[0].kv_range
        start, span = _gds.aligned_span(begin, end)
        skip = begin - start  # the same in every fragment of this split: data starts 4 KiB-aligned
        with platform.on(stream):
            # Two buffers: cuFile fills one while the GPU re-lays out and checks the other.
            scratch = [torch.empty(span, dtype=torch.uint8, device=platform.device) for _ in range(2)]
            sums = torch.empty(len(job.fragments), 2 * job.layout.num_layers, dtype=torch.int64, device=platform.device)
        stream.synchronize()  # cuFile writes outside stream order: freed memory must be idle first
        idle: list[torch.cuda.Event | None] = [None, None]
        for g in range(job.valid):
            fragment = job.fragments[g]
            buffer = scratch[g % 2]
            busy = idle[g % 2]
            if busy is not None:
                busy.synchronize()
            begin, end = fragment.kv_range
            try:
                if begin % _gds.ALIGN != skip or end - begin != group_bytes:
                    raise FragmentError(f"fragment {fragment.path}: K and V not where its layout puts them")
                platform.direct_read(fragment.path, buffer, begin - skip)
            except FileNotFoundError:
                job.fail(g, FragmentError(f"fragment {fragment.path} vanished while being read", damaged=False))
                break
            except FragmentError as exc:
                job.fail(g, exc)
                break
            except (OSError, RuntimeError) as exc:
                if g == 0:
                    platform.disable_direct_reads(f"{type(exc).__name__}: {exc}")
                    return False
                # The platform's doing, not the file's.
                job.fail(g, FragmentError(f"GPUDirect read of {fragment.path} failed: {exc}", damaged=False))
                break
            with platform.on(stream):
                data = buffer[skip : skip + group_bytes]
                place_groups(job, data, g, g + 1)
                sums[g : g + 1] = check.group_sums(data.view(1, group_bytes))
                idle[g % 2] = stream.record_event()
        with platform.on(stream):
            check.settle(sums)
        job.progress.all_landed(stream.record_event())
        return True
