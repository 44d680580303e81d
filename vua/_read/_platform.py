"""What the CUDA read paths ask of the platform: streams, events, pinned memory, direct reads.

The copy strategies never call ``torch.cuda`` themselves; they call a :class:`CudaPlatform`.
``tools/cuda_dry_run.py`` passes a stand-in whose streams and events do nothing and whose
"device" is the CPU, so the CUDA paths' real logic runs (and is checked) without a GPU,
and nothing in torch is patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vua._read import _gds


class CudaPlatform:
    """CUDA as the read paths use it, for one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self) -> torch.cuda.Stream:
        """A side stream for copies, so they overlap the caller's kernels."""
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> torch.cuda.Stream:
        """The caller's stream: its later kernels must see the loaded data."""
        return torch.cuda.current_stream(self.device)

    @contextlib.contextmanager
    def on(self, stream: torch.cuda.Stream) -> Iterator[None]:
        """Queues the work (and allocations) inside the block on ``stream``."""
        with torch.cuda.stream(stream):
            yield

    def pinned(self, nbytes: int) -> torch.Tensor:
        """Page-locked host memory: copies from it are DMAs the host does not wait for."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def direct_reads_usable(self) -> bool:
        """Whether file bytes may go straight into device memory (GPUDirect Storage)."""
        return _gds.usable()

    def direct_read(self, path: str, dest: torch.Tensor, offset: int) -> None:
        """Reads ``dest.nbytes`` bytes of ``path`` at ``offset`` into device memory (see ``_gds.read_into``)."""
        _gds.read_into(path, dest, offset)

    def disable_direct_reads(self, reason: str) -> None:
        _gds.disable(reason)
