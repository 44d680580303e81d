"""Runs VUA's CUDA read logic on the CPU, through a stand-in for CUDA's streams, events and pinning.

    uv run tools/cuda_dry_run.py

For development without a GPU: the staged whole-group path, the layer-wise path (into the
load's outputs and into a caller's paged blocks) and the GPUDirect path (its file reads done
with plain reads) run their real code on CPU tensors,
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
from vua._read import CudaPlatform, KVDestination, KVLoad, PinnedStaging, start_load
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


class PagedBlocks(KVDestination):
    """Per layer K and V in blocks of 8 tokens, ``(blocks, 8, heads, dim)`` as vLLM's FlashAttention
    caches are, handed out in reverse order: each group lands in two strided views."""

    def __init__(self, layers: int, heads: int, tokens: int, dim: int, dtype: torch.dtype):
        self.blocks = tokens // 8
        self.kv = [torch.zeros(2, self.blocks, 8, heads, dim, dtype=dtype) for _ in range(layers)]

    def block_of(self, position: int) -> int:
        return self.blocks - 1 - position // 8

    def chunks(self, group: int, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        k, v = self.kv[layer]
        blocks = [self.block_of(p) for p in range(group * 16, (group + 1) * 16, 8)]
        return [(k[b].transpose(0, 1), v[b].transpose(0, 1)) for b in blocks]

    def data(self, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What the blocks hold for positions [0, tokens), as (1, heads, tokens, dim) per layer."""
        order = [self.block_of(p) for p in range(0, tokens, 8)]
        return [tuple(t[order].flatten(0, 1).transpose(0, 1)[None] for t in kv) for kv in self.kv]  # type: ignore[misc]


def staged_load(
    store: VUA,
    tokens: torch.Tensor,
    platform: CpuStandIn,
    staging: PinnedStaging,
    *,
    gds: bool,
    layerwise: bool,
    into: KVDestination | None = None,
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
        into=into,
    )


def exact(load: KVLoad, kv: list[tuple[torch.Tensor, torch.Tensor]], into: PagedBlocks | None = None) -> bool:
    """Whether the load's data (or what it put in ``into``) are the stored KV, bit for bit, over the prefix it found."""
    tokens = load.wait() * 16
    data = load.data() if into is None else into.data(tokens)
    return all(
        torch.equal(got.view(torch.uint8), put[:, :, :tokens].view(torch.uint8))
        for got_kv, put_kv in zip(data, kv)
        for got, put in zip(got_kv, put_kv)
    )


def main() -> int:
    failures = 0
    cases = [
        (heads, sums, gds, layerwise, damage, into)
        for heads in (2, 8)  # groups of 24 KiB (each run read inline) and 2 MiB (runs split across threads)
        for sums in (True, False)  # word sums checked on the GPU, or xxh3 on the host
        for gds in (False, True)
        for layerwise in (False, True)
        for damage in (None, "first K", "last V")
        for into in (False, True)  # the load's own outputs, or a caller's paged blocks
        if not (gds and layerwise) and (sums or not gds) and not (gds and into)
    ]
    for heads, sums, gds, layerwise, damage, into in cases:
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
                blocks = PagedBlocks(layers, heads, 160, 128, torch.bfloat16) if into else None
                load = staged_load(store, tokens, platform, staging, gds=gds, layerwise=layerwise, into=blocks)
                if layerwise:
                    for layer in range(len(kv)):
                        load.wait_layer_groups(layer)
                groups = load.wait()
                want = 6 if damage is not None else 10
                same = exact(load, kv, blocks)
                ok = groups == want and same
                failures += not ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} {group_bytes >> 10} KiB groups, word sums={sums}, gds={gds}, "
                    f"layerwise={layerwise}, into paged blocks={into}, damage at {damage}: {groups} groups "
                    f"(want {want}), data exact: {same}",
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
