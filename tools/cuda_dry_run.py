"""Runs VUA's CUDA read logic on the CPU, with CUDA's streams, events and pinning made no-ops.

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
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The stand-ins below replace torch attributes that VUA looks up at call time.
from vua import _gds, _layout, _reader, _staging  # noqa: E402
from vua._fragment import Fragment  # noqa: E402
from vua._keys import group_keys  # noqa: E402
from vua.core import VUA, VUAConfig  # noqa: E402

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


def _no_cuda() -> None:
    """CPU stand-ins for what the CUDA paths call; tensors and arithmetic stay real."""
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: _Stream()
    torch.cuda.Stream = lambda device=None: _Stream()
    empty = torch.empty

    def unpinned_empty(*args, pin_memory=False, **kwargs):
        return empty(*args, **kwargs)

    torch.empty = unpinned_empty


def _plain_read(path: str, dest: torch.Tensor, offset: int) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(dest.numel())
    dest[: len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def staged_load(store: VUA, tokens: torch.Tensor, staging: _staging.PinnedStaging, **options: bool) -> _reader.KVLoad:
    """A load of ``tokens`` down the CUDA paths (a CPU load would take the CPU path)."""
    ids = tokens.numpy().astype(np.int64)
    fragments, layout = store._open_prefix(group_keys(ids, 16, store._seed), ids)
    return _reader.KVLoad(fragments, layout, 16, CPU, store._pool(), staging=staging, verify_checksums=True, **options)


def exact(load: _reader.KVLoad, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the load's data are the stored KV, bit for bit, over the prefix it found."""
    tokens = load.wait() * 16
    return all(
        torch.equal(got.view(torch.uint8), put[:, :, :tokens].view(torch.uint8))
        for got_kv, put_kv in zip(load.data(), kv)
        for got, put in zip(got_kv, put_kv)
    )


def main() -> int:
    _no_cuda()
    _gds.usable = lambda: True
    _gds.read_into = _plain_read
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
                staging = _staging.PinnedStaging(CPU, config.staging_bytes)
                load = staged_load(store, tokens, staging, gds=gds, background=layerwise)
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
    attempts = []

    def refuse(path: str, dest: torch.Tensor, offset: int) -> None:
        attempts.append(path)
        raise OSError(errno.EINVAL, "O_DIRECT refused (as tmpfs does)")

    _gds.usable = lambda: _gds._disabled_reason is None
    _gds.read_into = refuse
    logging.getLogger("vua").setLevel(logging.ERROR)  # the one fallback warning is expected
    with tempfile.TemporaryDirectory() as root:
        with VUA(VUAConfig(split_factor=16, gds=True, gpu_checksums=True), root) as store:
            tokens = torch.arange(160)
            kv = [tuple(torch.randn(1, 2, 160, 128).to(torch.bfloat16) for _ in range(2)) for _ in range(3)]
            store.put(tokens, kv)
            staging = _staging.PinnedStaging(CPU, 1 << 20)
            loads = [staged_load(store, tokens, staging, gds=True, background=False) for _ in range(2)]
            same = all(load.wait() == 10 and exact(load, kv) for load in loads)
    ok = same and len(attempts) == 1 and _gds._disabled_reason is not None
    failures += not ok
    print(
        f"{'ok  ' if ok else 'FAIL'} refused direct reads: {len(attempts)} attempt(s) over two loads, "
        f"fallback reason recorded: {_gds._disabled_reason is not None}, data exact: {same}",
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
