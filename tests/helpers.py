"""Shared test helpers: temporary stores, random KV in the transformers legacy layout, and the
few looks inside a store that tests need (its index, its layout), in one place."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
import unittest
from collections.abc import Callable

import lmdb
import torch

from vua._inputs import checked_put
from vua._kv_layout import Layout
from vua._record import GroupRecord
from vua.cli import main
from vua.core import VUA, VUAConfig

# A decoder small enough to build from a config in milliseconds (no hub, random weights),
# for the transformers tests and the local model directory vLLM's configs read.
TINY_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=1024,
)


def random_kv(
    batch: int,
    seq: int,
    *,
    layers: int = 3,
    heads: int = 2,
    head_dim: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value), each (batch, heads, seq, head_dim), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)

    def one() -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype)
        return torch.randint(-100, 100, (batch, heads, seq, head_dim), generator=gen).to(dtype)

    return [(one(), one()) for _ in range(layers)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN-safe, works for fp8)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def overwrite(path: str, offset: int, data: bytes) -> None:
    """Damages a file in place: writes ``data`` at ``offset`` (negative: from the end). Every test's byte damage goes through here."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        f.write(data)


def flip_byte(path: str, offset: int, mask: int = 0x01) -> None:
    """XORs ``mask`` into the byte at ``offset`` (negative: from the end)."""
    with open(path, "rb") as f:
        f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        byte = f.read(1)[0]
    overwrite(path, offset, bytes([byte ^ mask]))


def rewrite_header(path: str, edit: Callable[[dict], object]) -> None:
    """Replaces a fragment's JSON header by ``edit(header dict)``, keeping the header's length.

    ``edit`` changes the dict in place (returning None) or returns the new header as text or
    bytes. Raises ValueError when the new header does not fit the old one's length.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        body = json.loads(f.read(length))
    result = edit(body)
    text = json.dumps(body, separators=(",", ":")) if result is None else result
    raw = text.encode() if isinstance(text, str) else bytes(text)  # type: ignore[arg-type]
    if len(raw) > length:
        raise ValueError("edited header does not fit")
    overwrite(path, 8, raw + b" " * (length - len(raw)))


def kv_slice(kv, row: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (1, heads, n, head_dim) slice of batch row ``row``, as get_closest returns it."""
    return [(k[row : row + 1, :, :n], v[row : row + 1, :, :n]) for k, v in kv]


def listing(root: str) -> list[tuple[str, int]]:
    """Every file under ``root`` with its size, the index excluded (it is a cache)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.endswith(".lmdb")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            out.append((os.path.relpath(path, root), os.path.getsize(path)))
    return sorted(out)


# -- real file systems for faults: need root, and skip the test without it ------------------


def read_only_mount(test: unittest.TestCase, path: str) -> str:
    """``path`` bind-mounted read-only at a fresh directory (writes fail with EROFS, even for
    root); unmounted at the test's cleanup."""
    mount = tempfile.mkdtemp(prefix="vua-ro-mount-")
    test.addCleanup(os.rmdir, mount)  # cleanups run last-in first-out: after the umount
    bound = subprocess.run(["mount", "--bind", path, mount], capture_output=True, text=True)
    if bound.returncode:
        test.skipTest(f"cannot bind-mount here (needs root): {bound.stderr.strip()}")
    test.addCleanup(subprocess.run, ["umount", "-l", mount], check=True)
    remounted = subprocess.run(["mount", "-o", "remount,bind,ro", mount], capture_output=True, text=True)
    if remounted.returncode:
        test.skipTest(f"cannot remount read-only here: {remounted.stderr.strip()}")
    return mount


def small_tmpfs(test: unittest.TestCase, path: str, size: str) -> str:
    """A tmpfs of ``size`` (e.g. "64k") mounted at the new directory ``path``, to fill up for
    real ENOSPC; unmounted at the test's cleanup."""
    os.mkdir(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    if mounted.returncode != 0:
        test.skipTest(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    test.addCleanup(subprocess.run, ["umount", "-l", path])
    return path


class StoreTestCase(unittest.TestCase):
    """A test case with a fresh temporary root per test and a ``store()`` factory."""

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="vua-test-")
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def store(self, config: VUAConfig | type[VUAConfig] | None = None, root: str | None = None, **kwargs) -> VUA:
        if config is None:
            config = VUAConfig(split_factor=kwargs.pop("split_factor", 16), **kwargs)
        vua = VUA(config, root or self.root)
        self.addCleanup(vua.close)
        return vua

    def assertHit(self, hit, groups: int, kv, split: int = 16) -> None:
        """Asserts ``hit`` holds exactly the first ``groups`` groups of ``kv`` (None when 0)."""
        if groups == 0:
            self.assertIsNone(hit)
            return
        self.assertIsNotNone(hit)
        self.assertEqual(hit.tokens.numel(), groups * split)
        self.assertKVEqual(hit.data, kv_slice(kv, 0, groups * split))

    def assertKVEqual(self, got, expected) -> None:
        self.assertEqual(len(got), len(expected))
        for i, ((gk, gv), (ek, ev)) in enumerate(zip(got, expected)):
            self.assertTrue(same_bits(gk, ek), f"layer {i} key differs")
            self.assertTrue(same_bits(gv, ev), f"layer {i} value differs")


def prefix_kv(
    tokens: torch.Tensor, *, layers: int = 2, heads: int = 2, head_dim: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV that depends on every token before a position, as a real model's does.

    Any process can recompute it from the tokens alone, so a reader checks a hit against
    exactly what a writer must have put. Shaped (1, heads, n, head_dim), float32.
    """
    ids = tokens.reshape(-1).to(torch.float64)
    running = torch.cumsum(ids * 1.000001, 0) % 1e6  # (n,)
    out = []
    for layer in range(layers):
        base = running[None, None, :, None] + torch.arange(heads * head_dim, dtype=torch.float64).view(
            1, heads, 1, head_dim
        )
        out.append(((base + layer).float(), (base - layer).float()))
    return out


def check_hit(hit, query: torch.Tensor) -> int:
    """Asserts a hit holds exactly prefix_kv of its tokens; returns its length (0 for None)."""
    if hit is None:
        return 0
    n = hit.tokens.shape[-1]
    assert torch.equal(hit.tokens.reshape(-1), query.reshape(-1)[:n]), "hit tokens are not a prefix of the query"
    expected = prefix_kv(
        query.reshape(-1)[:n], layers=len(hit.data), heads=hit.data[0][0].shape[1], head_dim=hit.data[0][0].shape[3]
    )
    for (k, v), (ek, ev) in zip(hit.data, expected):
        assert torch.equal(k, ek) and torch.equal(v, ev), "hit data differs from what was put"
    return n


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Runs ``vua ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def layout_of(kv: list[tuple[torch.Tensor, torch.Tensor]], split: int = 16) -> Layout:
    """The layout a put of ``kv`` (batch 1) stores."""
    tokens = torch.zeros(kv[0][0].shape[2] // split * split, dtype=torch.long)
    return checked_put(tokens, kv, 0, split)[1]


# -- the store's index, which tests inspect and damage -----------------------------------


def index_records(store: VUA) -> dict[bytes, GroupRecord | None]:
    """Every index entry of the store: key -> record (None for garbage)."""
    return dict(store._index.items())


def index_total_bytes(store: VUA) -> int:
    return store._index.total_bytes()


def indexed_groups(store: VUA, keys: list[bytes]) -> int:
    """How many leading groups of ``keys`` the store's index itself records (no tree probe)."""
    return len(store._index.lookup_prefix(keys))


def forget_in_index(store: VUA, keys: list[bytes]) -> None:
    """Drops groups from the index only, as if another node had written them."""
    store._index.remove(keys)


def index_env(store: VUA) -> tuple[lmdb.Environment, lmdb._Database, lmdb._Database]:
    """The index's LMDB environment and its groups and meta databases, for injecting damage."""
    return store._index.env()
