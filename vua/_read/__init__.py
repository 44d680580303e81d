"""The read path: copy verified fragments into output tensors, or into memory the caller names.

A load is a :class:`KVLoad` handle (outputs, groups verified so far, per-layer readiness)
filled by one copy strategy, picked in :func:`choose_copy` from the device, the layout and
whether the consumer takes layers as they land:

- host outputs (``_cpu``): straight from the memory map, each byte copied once;
  :class:`HostGroups` hashes and copies whole groups per thread, :class:`HostLayers` goes
  layer-major (layer-wise consumers, layouts whose layers differ in shape); fragments
  opened without a map (network file systems) go through :class:`HostPreads`, ``preadv``
  straight into the outputs;
- a CUDA device (``_staged``): ``preadv`` into pinned staging, non-blocking DMAs on a side
  stream, checked on the GPU by word sums (``_device_check``), whole groups or layer by
  layer; with ``gds`` (``_direct``) files go straight into GPU memory instead.

A caller that holds the memory the KV belongs in (an engine's paged blocks) passes a
:class:`KVDestination` (``_destination``): the layer-major strategies then copy each verified
tensor into its views instead of into outputs of the load's own.

Every strategy runs over a :class:`ReadJob` (the open fragments, their layout, the host-side
read and check of a group) and reports a failed check to the load's LoadProgress, which ends the prefix
before the damaged group (with a warning): the result is only ever shorter, never wrong.
CUDA is reached only through a :class:`CudaPlatform`, which a dry run replaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import torch

from vua._fragment import Fragment
from vua._kv_layout import Layout
from vua._read._cpu import HostGroups, HostLayers, HostPreads
from vua._read._destination import KVChunks, KVDestination, Landing
from vua._read._direct import DirectGroups
from vua._read._job import CopyStrategy, ReadJob, allocate_outputs
from vua._read._load import KVLoad, LoadProgress
from vua._read._platform import CudaPlatform
from vua._read._staged import StagedGroups, StagedLayers
from vua._read._staging import HostBlockPool, PinnedStaging

__all__ = [
    "KVChunks",
    "KVDestination",
    "KVLoad",
    "CudaPlatform",
    "HostBlockPool",
    "PinnedStaging",
    "checks_macs_in_copy",
    "start_load",
]


def choose_copy(
    job: ReadJob, *, layerwise: bool, platform: CudaPlatform | None, staging: PinnedStaging | None, gds: bool
) -> CopyStrategy:
    """The one place a load's copy path is picked.

    Whole groups at a time need the load's own outputs (one block laid out as the files
    are); a caller's destination is filled group by group, layer by layer.
    """
    whole_groups = job.uniform and not layerwise and job.landing is None
    if job.landing is not None and job.landing.has_whole_groups and platform is None and job.mapped:
        return HostGroups() if job.uniform and not layerwise else HostLayers(layerwise=layerwise)
    if platform is None or staging is None:
        if not job.mapped:
            return HostPreads(layerwise=layerwise)
        return HostGroups() if whole_groups else HostLayers(layerwise=layerwise)
    if not whole_groups:
        return StagedLayers(platform, staging)
    staged = StagedGroups(platform, staging)
    return DirectGroups(platform, staged) if gds else staged


def checks_macs_in_copy(device: torch.device, *, layerwise: bool, mapped: bool) -> bool:
    """Whether a load's copy will check the fragments' MACs itself, over the bytes where they land.

    True for whole-group host reads with ``preadv`` (network file systems), where checking
    on opening would read every file once more through the network. Everywhere else the
    MACs are checked when the groups are opened (a layer-wise consumer takes layer 0 before
    the last layer is read).
    """
    return device.type == "cpu" and not layerwise and not mapped


def start_load(
    fragments: Sequence[Fragment],
    layout: Layout,
    split_factor: int,
    device: torch.device,
    executor: Executor,
    *,
    verify_checksums: bool,
    layerwise: bool,
    platform: CudaPlatform | None = None,
    staging: PinnedStaging | None = None,
    host_pool: HostBlockPool | None = None,
    gds: bool = False,
    on_done: Callable[[KVLoad], None] | None = None,
    mac_key: bytes | None = None,
    offset: int = 0,
    into: KVDestination | None = None,
) -> KVLoad:
    """Starts copying the open fragments of groups 0..n-1 into fresh outputs on ``device``, or ``into`` a destination.

    Args:
        fragments: open, header-validated fragments, in order; closed when the copy is over.
        layout: their common layout.
        verify_checksums: check every tensor (on the GPU where it can, else on the host).
        layerwise: run on a thread of its own and hand out layers as they land.
        platform, staging: CUDA's streams and pinned buffers (CUDA devices only).
        host_pool: recycled host memory for CPU outputs (None: fresh memory).
        gds: read whole groups with GPUDirect Storage where the platform allows (CUDA only).
        on_done: called with the load once it has finished without error.
        mac_key: the store's MAC key, when the fragments' MACs were not checked on opening
            (see :func:`checks_macs_in_copy`).
        offset: the prompt position of the first fragment's first token (see ``KVLoad``).
        into: the caller's memory to land in, instead of fresh outputs (see ``KVDestination``).

    Returns:
        The load: already finished unless ``layerwise``.
    """
    groups, layers = len(fragments), layout.num_layers
    block, outputs, landing = None, None, None
    if into is None:
        block, outputs = allocate_outputs(layout, groups * split_factor, device, host_pool)
    else:
        landing = Landing(into, layout, split_factor, device)
    progress = LoadProgress(groups, layers, first_group=offset // split_factor)
    load = KVLoad(progress, outputs, split_factor, platform=platform, offset=offset)
    job = ReadJob(
        fragments,
        layout,
        split_factor,
        block,
        outputs,
        executor,
        verify_checksums=verify_checksums,
        progress=progress,
        mac_key=mac_key,
        landing=landing,
    )
    copy = choose_copy(job, layerwise=layerwise, platform=platform, staging=staging, gds=gds)
    if staging is not None and platform is not None:
        # The outputs' memory may have been freed by work still queued on the caller's
        # stream; the side stream must not write it before that work is done.
        staging.stream.wait_stream(platform.current_stream())

    def run() -> None:
        try:
            if job.mac_key is not None and not copy.checks_macs:
                job.verify_macs()  # before any byte is copied
                job.mac_key = None
            if staging is None:
                copy.run(job)
            else:
                with staging.lock:  # one load uses the staging buffers at a time
                    copy.run(job)
        finally:
            job.close()

    progress.start(run, background=layerwise, on_done=None if on_done is None else lambda: on_done(load))
    return load
