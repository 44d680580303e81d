"""Runs VUA's CUDA read logic on the CPU, through a stand-in for CUDA's streams, events and pinning.

    uv run tools/cuda_dry_run.py

For development without a GPU: the staged whole-group path, the layer-wise path and the
GPUDirect path (its file reads done with plain reads) run their real code on CPU tensors,
the GPU's word-sum checks included, so logic errors show up before a GPU session.
It proves nothing about CUDA itself (ordering, DMA, speed): `tools/gpu_check.py` does that
on a GPU. Prints one line per case; exit 0 when every case returns exactly the stored data.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import torch

from vua import _layout
from vua._fragment import Fragment
from vua._keys import group_keys
from vua._read import CudaPlatform, KVLoad, PinnedStaging, start_load
from vua.core import VUA, VUAConfig

CPU = torch.device("cpu")


class _Event:
    def synchronize(self) -> None:
        pass


class _Stream:
    def wait_stream(self, other: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def record_event(self) -> _Event:
        return _Event()

    def synchronize(self) -> None:
        pass


class CpuStandIn(CudaPlatform):
    """CUDA as the read paths see it, played by the CPU: streams and events do nothing, the
    "device" and "pinned" memory are host memory, and direct reads are plain reads (or refused)."""

    def __init__(self, *, refuse_direct: bool = False):
        super().__init__(CPU)
        self.refuse_direct = refuse_direct
        self.direct_attempts: list[str] = []
        self.disabled_reason: str | None = None

    def new_stream(self) -> _Stream:  # type: ignore[override]
        return _Stream()

    def current_stream(self) -> _Stream:  # type: ignore[override]
        return _Stream()

    @contextlib.contextmanager
    def on(self, stream: object) -> Iterator[None]:
        yield

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def direct_reads_usable(self) -> bool:
        return self.disabled_reason is None

    def direct_read(self, path: str, dest: torch.Tensor, offset: int) -> None:
        self.direct_attempts.append(path)
        if self.refuse_direct:
            raise OSError(errno.EINVAL, "O_DIRECT refused (as tmpfs does)")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(dest.numel())
        dest[: len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def disable_direct_reads(self, reason: str) -> None:
        self.disabled_reason = reason


def staged_load(
    store: VUA, tokens: torch.Tensor, platform: CpuStandIn, staging: PinnedStaging, *, gds: bool, layerwise: bool
) -> KVLoad:
    """A load of ``tokens`` down the CUDA paths (a CPU load would take the CPU path)."""
    ids = tokens.numpy().astype(np.int64)
    fragments, layout = store._catalog.open_prefix(group_keys(ids, 16, store._seed), ids)
    assert layout is not None
    return start_load(
        fragments,
        layout,
        16,
        CPU,
        store._pool(),
        verify_checksums=True,
        layerwise=layerwise,
        platform=platform,
        staging=staging,
        gds=gds,
    )


def exact(load: KVLoad, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the load's data are the stored KV, bit for bit, over the prefix it found."""
    tokens = load.wait() * 16
    return all(
        torch.equal(got.view(torch.uint8), put[:, :, :tokens].view(torch.uint8))
        for got_kv, put_kv in zip(load.data(), kv)
        for got, put in zip(got_kv, put_kv)
    )


def main() -> int:
    failures = 0
    cases = [
        (heads, sums, gds, layerwise, damage)
        for heads in (2, 8)  # groups of 24 KiB (each run read inline) and 2 MiB (runs split across threads)
        for sums in (True, False)  # word sums checked on the GPU, or xxh3 on the host
        for gds in (False, True)
        for layerwise in (False, True)
        for damage in (None, "first K", "last V")
        if not (gds and layerwise) and (sums or not gds)
    ]
    for heads, sums, gds, layerwise, damage in cases:
        layers = 3 if heads == 2 else 32
        gen = torch.Generator().manual_seed(heads)
        kv = [
            tuple(torch.randn(1, heads, 160, 128, generator=gen).to(torch.bfloat16) for _ in range(2))
            for _ in range(layers)
        ]
        tokens = torch.arange(160)
        group_bytes = layers * 2 * heads * 16 * 128 * 2
        with tempfile.TemporaryDirectory() as root:
            config = VUAConfig(
                split_factor=16, gds=gds, gpu_checksums=sums, io_threads=4, staging_bytes=3 * group_bytes
            )
            with VUA(config, root) as store:
                store.put(tokens, kv)
                if damage is not None:
                    path = _layout.fragment_path(root, store.config.tokens_to_paths(tokens)[6])
                    with Fragment(path) as fragment:
                        begin, end = fragment.kv_range
                    at = begin + 200 if damage == "first K" else end - 4096
                    with open(path, "r+b") as f:
                        f.seek(at)
                        byte = f.read(1)
                        f.seek(at)
                        f.write(bytes([byte[0] ^ 1]))
                platform = CpuStandIn()
                staging = PinnedStaging(platform, config.staging_bytes)
                load = staged_load(store, tokens, platform, staging, gds=gds, layerwise=layerwise)
                if layerwise:
                    for layer in range(len(kv)):
                        load.wait_layer(layer)
                groups = load.wait()
                want = 6 if damage is not None else 10
                same = exact(load, kv)
                ok = groups == want and same
                failures += not ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} {group_bytes >> 10} KiB groups, word sums={sums}, gds={gds}, "
                    f"layerwise={layerwise}, damage at {damage}: {groups} groups (want {want}), data exact: {same}",
                    flush=True,
                )

    # A platform that refuses direct reads: the first load falls back, later ones skip GDS.
    logging.getLogger("vua").setLevel(logging.ERROR)  # the one fallback warning is expected
    with tempfile.TemporaryDirectory() as root:
        with VUA(VUAConfig(split_factor=16, gds=True, gpu_checksums=True), root) as store:
            tokens = torch.arange(160)
            kv = [tuple(torch.randn(1, 2, 160, 128).to(torch.bfloat16) for _ in range(2)) for _ in range(3)]
            store.put(tokens, kv)
            platform = CpuStandIn(refuse_direct=True)
            staging = PinnedStaging(platform, 1 << 20)
            loads = [staged_load(store, tokens, platform, staging, gds=True, layerwise=False) for _ in range(2)]
            same = all(load.wait() == 10 and exact(load, kv) for load in loads)
    attempts = platform.direct_attempts
    ok = same and len(attempts) == 1 and platform.disabled_reason is not None
    failures += not ok
    print(
        f"{'ok  ' if ok else 'FAIL'} refused direct reads: {len(attempts)} attempt(s) over two loads, "
        f"fallback reason recorded: {platform.disabled_reason is not None}, data exact: {same}",
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
