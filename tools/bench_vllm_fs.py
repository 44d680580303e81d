"""VUA beside vLLM's own file-system KV tier, on the same KV blocks, in one run.

    uv run --group test python tools/bench_vllm_fs.py              # local disk (a temp dir), a minute or two
    uv run --group test python tools/bench_vllm_fs.py --quick      # smaller, fewer repeats
    uv run --group test python tools/bench_vllm_fs.py --root DIR   # on DIR's file system
    uv run --group test python tools/bench_vllm_fs.py --glusterfs  # on a GlusterFS volume made for the run

vLLM 0.33's fs tier (``vllm/v1/kv_offload/tiering/fs``) moves blocks between its CPU tier and
files with ``batch_store_block`` / ``batch_load_block`` (``io.py``). Its CPU tier is rows of
``blocks_per_chunk`` blocks (1 by default), a row holding every layer's K and V for 16 tokens,
and each row becomes one file per rank, ``<root>/<model>_<digest>_r<rank>/<hhh>/<hh>_g<group>/
<hash>.bin`` (``FileMapper``): written to a temporary name and renamed, never fsynced; read
back with no check beyond its length. Here the same calls run on their own, on CPU, with the
tier's own choices (O_DIRECT when ``probe_o_direct`` says the directory takes it) and as
many threads as VUA's ``io_threads``.

The KV is a Llama-3-8B-shaped model's (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB a
token, 2 MiB a 16-token block). VUA gets the same values as a put would from a model,
``(tokens, [(K, V) per layer])``, split_factor a multiple of the block size.

Measured (medians of ``--repeat`` runs, the systems alternating within each repeat):
- store: vLLM native as it is; vLLM native then an fsync of each file and of each directory
  it made (what durability would need), and where the tier writes with O_DIRECT the same
  buffered (through the page cache, as VUA writes); VUA's put (each fragment fsynced, then
  published);
- load, page cache warm: VUA's get_closest (every tensor checked); vLLM's load as its tier
  would do it and, where that is O_DIRECT (no page cache at all), also buffered with a warm
  cache, the like-for-like figure.

Faults, each on a fresh copy of the first three groups (fault in the middle one, so that a
shorter prefix is visible): a flipped byte, a truncated file, a writer killed before its file
was renamed into place (its temporary left half written, the final name absent), and a
power loss after an un-fsynced publish (the final file at full length, its second half
zeros, as a file system that committed the rename before the data leaves it). What each
load returns: exact data (in full or a shorter prefix), an error, or wrong bytes.

Output: a markdown table on the terminal and ``OUT/bench_vllm_fs.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from vua._files import file_system_type
from vua.core import VUA, VUAConfig

GB = 1e9
BLOCK_TOKENS = 16  # vLLM's default block size
HEADS, HEAD_DIM, DTYPE = 8, 128, torch.bfloat16
EXACT = "exact or shorter"  # the only verdict VUA may give: its whole contract on a fault
ERROR = "error"
WRONG = "wrong bytes"

# vLLM's modules log at import and per block; this bench reports outcomes itself.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@dataclass(frozen=True)
class Workload:
    """What is stored: ``tokens`` tokens of a model with ``layers`` layers, in VUA groups of ``split``."""

    tokens: int
    layers: int
    split: int

    @property
    def block_bytes(self) -> int:  # one vLLM file: every layer's K and V for one block
        return self.layers * 2 * BLOCK_TOKENS * HEADS * HEAD_DIM * DTYPE.itemsize

    @property
    def blocks(self) -> int:
        return self.tokens // BLOCK_TOKENS

    @property
    def nbytes(self) -> int:
        return self.blocks * self.block_bytes


@dataclass(frozen=True)
class FaultRow:
    """What one system's load returned after one fault."""

    system: str
    fault: str
    verdict: str  # EXACT, ERROR or WRONG
    detail: str


# -- the KV, laid out for each system ---------------------------------------------------------


class KV:
    """One model's KV for ``work.tokens`` tokens, held twice: as vLLM's CPU tier rows and as a model's layers.

    The rows live in an anonymous mmap (page aligned, as vLLM's shared offload region is, so
    O_DIRECT accepts it); ``layers`` holds the same values as ``[(K, V)]`` each
    ``(1, heads, tokens, head_dim)``, what a transformers forward returns and VUA's put takes.
    """

    def __init__(self, work: Workload, seed: int = 0):
        self.work = work
        self.rows_mmap = mmap.mmap(-1, work.nbytes)
        # (blocks, layers, K/V, block tokens, heads, head_dim): one row per block
        rows = torch.frombuffer(self.rows_mmap, dtype=DTYPE).view(
            work.blocks, work.layers, 2, BLOCK_TOKENS, HEADS, HEAD_DIM
        )
        gen = torch.Generator().manual_seed(seed)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in range(work.layers):
            kv = []
            for side in range(2):
                t = torch.randn(1, HEADS, work.tokens, HEAD_DIM, generator=gen).to(DTYPE)  # (1, heads, T, dim)
                # (heads, T, dim) -> (blocks, block tokens, heads, dim)
                rows[:, layer, side] = t[0].view(HEADS, work.blocks, BLOCK_TOKENS, HEAD_DIM).permute(1, 2, 0, 3)
                kv.append(t)
            self.layers.append((kv[0], kv[1]))
        self.rows = memoryview(self.rows_mmap).cast("B").cast("B", (work.blocks, work.block_bytes))
        self.tokens = torch.randint(0, 128_000, (work.tokens,), generator=gen)

    def close(self) -> None:
        self.rows.release()
        self.rows_mmap.close()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# -- vLLM's native tier ----------------------------------------------------------------------


class VllmTier:
    """vLLM's fs tier I/O at ``root``: its file names, its calls, its O_DIRECT choice.

    File names follow ``FileMapper.get_file_name`` (rank 0, group 0); the block hashes are a
    chained sha256 of the tokens, as vLLM's prefix-caching hash chains each block to the one
    before. (``FileMapper`` itself is not imported: it pulls in vLLM's distributed package,
    ten seconds more, for a path.)
    """

    def __init__(self, root: str, kv: KV, threads: int):
        from vllm.v1.kv_offload.tiering.fs import io as fs_io

        self.io = fs_io
        self.kv = kv
        self.threads = threads
        base = os.path.join(root, "llama-3-8b-shaped_000000000000_r0")
        os.makedirs(base, exist_ok=True)
        self.o_direct = fs_io.probe_o_direct(base)  # the tier's own probe and fallback
        self.paths = []
        chain = b""
        ids = kv.tokens.numpy()
        for b in range(kv.work.blocks):
            chain = hashlib.sha256(chain + ids[b * BLOCK_TOKENS : (b + 1) * BLOCK_TOKENS].tobytes()).digest()
            h = chain.hex()
            self.paths.append(os.path.join(base, h[:3], f"{h[3:5]}_g0", f"{h}.bin"))
        self.base = base
        self.block_bytes = kv.work.block_bytes

    def _batches(self, blocks: range) -> list[list[int]]:
        # The tier runs one job per request on a pool of I/O threads; here the blocks are cut
        # into one batch per thread, so both systems get the same parallelism.
        n = max(1, self.threads)
        return [list(blocks[i::n]) for i in range(n) if blocks[i::n]]

    def store(self, pool: ThreadPoolExecutor, *, fsync: bool = False, o_direct: bool | None = None) -> None:
        """Stores every block as the tier does (its O_DIRECT choice unless ``o_direct``), then fsyncs if asked."""
        view = self.kv.rows
        o_direct = self.o_direct if o_direct is None else o_direct

        def one(batch: list[int]) -> None:
            self.io.batch_store_block(
                [self.paths[b] for b in batch],
                view,
                [b * self.block_bytes for b in batch],
                self.block_bytes,
                o_direct,
            )

        list(pool.map(one, self._batches(range(self.kv.work.blocks))))
        if fsync:
            self.fsync_all(pool)

    def fsync_all(self, pool: ThreadPoolExecutor) -> None:
        """What a durable store would add: each file, then each directory the store made or changed."""

        def fsync_path(path: str) -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        list(pool.map(fsync_path, self.paths))
        # A file's name lives in its directory, and a new directory's name in its parent.
        leaves = {os.path.dirname(p) for p in self.paths}
        parents = {os.path.dirname(d) for d in leaves} | {self.base}
        list(pool.map(fsync_path, sorted(leaves | parents)))

    def load(self, pool: ThreadPoolExecutor, dest: memoryview, *, o_direct: bool, blocks: int | None = None) -> None:
        """Loads blocks 0..blocks-1 into ``dest`` rows; raises the first batch's OSError."""

        def one(batch: list[int]) -> None:
            self.io.batch_load_block(
                [self.paths[b] for b in batch], dest, [b * self.block_bytes for b in batch], self.block_bytes, o_direct
            )

        list(pool.map(one, self._batches(range(self.kv.work.blocks if blocks is None else blocks))))

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


# -- VUA ------------------------------------------------------------------------------------


class VuaSide:
    """VUA stores at fresh roots under ``parent``, the index on ``index_parent`` (local disk) when given."""

    def __init__(self, parent: str, kv: KV, index_parent: str | None):
        self.parent = parent
        self.kv = kv
        self.index_parent = index_parent
        self.root: str | None = None
        self.index: str | None = None

    def fresh(self) -> None:
        """A new empty store: put skips groups already stored, so each timed put needs one."""
        self.remove()
        self.root = tempfile.mkdtemp(prefix="vua-", dir=self.parent)
        if self.index_parent is not None:
            self.index = tempfile.mkdtemp(prefix="vua-index-", dir=self.index_parent)

    def open(self) -> VUA:
        assert self.root is not None
        config = VUAConfig(split_factor=self.kv.work.split, namespace="llama-3-8b-shaped/bf16", index_path=self.index)
        return VUA(config, self.root)

    def remove(self) -> None:
        for path in (self.root, self.index):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self.root = self.index = None


def vua_fragment(store: VUA, tokens: torch.Tensor, group: int) -> str:
    """The fragment file of group ``group`` (``ROOT/<2 hex>/<32 hex>/kv.safetensors``, docs/architecture.md)."""
    key = store.config.tokens_to_paths(tokens)[group]
    return os.path.join(store.root, key[:2], key, "kv.safetensors")


# -- timing ---------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / GB


def measure(work: Workload, workdir: str, index_parent: str | None, repeat: int) -> dict:
    """Store and load throughput of both systems on ``work``, alternating within each repeat."""
    kv = KV(work)
    threads = VUAConfig().io_threads
    pool = ThreadPoolExecutor(max_workers=threads)
    vllm_dir = tempfile.mkdtemp(prefix="vllm-fs-", dir=workdir)
    tier = VllmTier(vllm_dir, kv, threads)
    vua = VuaSide(workdir, kv, index_parent)
    dest_mmap = mmap.mmap(-1, work.nbytes)  # page aligned, as the tier's CPU rows are
    dest = memoryview(dest_mmap).cast("B").cast("B", (work.blocks, work.block_bytes))
    stores = ["vllm_store", "vllm_store_fsync", "vua_put"]
    if tier.o_direct:
        # With O_DIRECT the fsync finds nothing in the page cache to write back; buffered, it
        # pays for the copy into the page cache and the writeback, as VUA's put does.
        stores.insert(2, "vllm_store_buffered_fsync")
    times: dict[str, list[float]] = {k: [] for k in stores}
    try:
        for _ in range(repeat):
            # Each store starts from an empty directory: both skip blocks already present.
            tier.remove()
            times["vllm_store"].append(timed(lambda: tier.store(pool)))
            tier.remove()
            times["vllm_store_fsync"].append(timed(lambda: tier.store(pool, fsync=True)))
            if tier.o_direct:
                tier.remove()
                times["vllm_store_buffered_fsync"].append(timed(lambda: tier.store(pool, fsync=True, o_direct=False)))
            vua.fresh()
            with vua.open() as store:
                times["vua_put"].append(timed(lambda: store.put(kv.tokens, kv.layers)))
        # Loads read what the last repeat stored. The page cache is warmed by one untimed read
        # of each (the tier's O_DIRECT load bypasses it whatever is done).
        load_times: dict[str, list[float]] = {"vua_get": []}
        modes = {"vllm_load": tier.o_direct}
        if tier.o_direct:
            modes["vllm_load_buffered"] = False
        for name in modes:
            load_times[name] = []
        with vua.open() as store:
            for o_direct in modes.values():
                tier.load(pool, dest, o_direct=o_direct)
            store.get_closest(kv.tokens)
            for _ in range(repeat):
                for name, o_direct in modes.items():
                    load_times[name].append(timed(lambda o=o_direct: tier.load(pool, dest, o_direct=o)))
                    if dest_mmap[:] != kv.rows_mmap[:]:
                        raise AssertionError(f"{name} loaded different bytes from those stored")
                hit = None

                def get() -> None:
                    nonlocal hit
                    hit = store.get_closest(kv.tokens)

                load_times["vua_get"].append(timed(get))
                if hit is None or not all(
                    same_bits(k, ek) and same_bits(v, ev) for (k, v), (ek, ev) in zip(hit.data, kv.layers)
                ):
                    raise AssertionError("VUA's get_closest returned other data than was put")
                del hit
        times.update(load_times)
    finally:
        dest.release()
        dest_mmap.close()
        tier.remove()
        shutil.rmtree(vllm_dir, ignore_errors=True)
        vua.remove()
        pool.shutdown()
        kv.close()
    return {
        "o_direct": tier.o_direct,
        "threads": threads,
        "seconds": times,
        "GBps": {name: median_gbps(work.nbytes, t) for name, t in times.items()},
    }


# -- faults ---------------------------------------------------------------------------------


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)  # the middle: tensor data in either format
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def truncate_half(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def zero_second_half(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))


def killed_before_publish(path: str, temporary: str) -> None:
    """The writer died after writing half its temporary: the temporary stays, the final name never appears."""
    os.rename(path, temporary)
    truncate_half(temporary)


# The faults, each (name, what it simulates). The file hit is the middle group's first block
# (vLLM) or the middle group's fragment (VUA).
FAULTS = [
    ("flipped byte", "one bit flipped in the middle of the file (bit rot, a bad copy)"),
    ("truncated file", "the file cut to half its length"),
    ("writer killed before publish", "temporary file half written and left, final name absent"),
    ("power loss after un-fsynced publish", "final file at full length, second half zeros"),
]


def damage(fault: str, path: str, temporary: str) -> None:
    """Applies ``fault`` (a name in FAULTS) to the stored file ``path``; ``temporary`` is the name its
    writer would have written it under, for a writer killed before publishing."""
    if fault == "flipped byte":
        flip_byte(path)
    elif fault == "truncated file":
        truncate_half(path)
    elif fault == "writer killed before publish":
        killed_before_publish(path, temporary)
    elif fault == "power loss after un-fsynced publish":
        zero_second_half(path)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def vllm_faults(work: Workload, workdir: str) -> list[FaultRow]:
    rows = []
    kv = KV(work, seed=1)
    group_blocks = work.split // BLOCK_TOKENS
    target = group_blocks  # the middle group's first block
    dest_mmap = mmap.mmap(-1, work.nbytes)
    dest = memoryview(dest_mmap).cast("B").cast("B", (work.blocks, work.block_bytes))
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            for fault, _ in FAULTS:
                root = tempfile.mkdtemp(prefix="vllm-fault-", dir=workdir)
                tier = VllmTier(root, kv, threads=1)  # one batch, in block order: "loaded before" means a prefix
                tier.store(pool)
                path = tier.paths[target]
                damage(fault, path, f"{path}_1234567890123.tmp")  # vLLM's temporary: "<final>_<random>.tmp"
                dest_mmap.seek(0)
                dest_mmap.write(bytes(work.nbytes))
                try:
                    tier.load(pool, dest, o_direct=tier.o_direct)
                except OSError as exc:
                    done = getattr(exc, "num_succeeded", "?")
                    detail = f"{type(exc).__name__} [errno {exc.errno}] {exc.strerror or exc} after {done} of {work.blocks} blocks"
                    if fault == "writer killed before publish":
                        detail += "; in the tier its lookup finds no file first: a miss from that block on"
                    else:
                        detail += "; the file " + ("left in place" if os.path.exists(path) else "deleted")
                    rows.append(FaultRow("vLLM native", fault, ERROR, detail))
                else:
                    bb = work.block_bytes
                    bad = [
                        b
                        for b in range(work.blocks)
                        if dest_mmap[b * bb : (b + 1) * bb] != kv.rows_mmap[b * bb : (b + 1) * bb]
                    ]
                    if bad:
                        rows.append(
                            FaultRow("vLLM native", fault, WRONG, f"no error; block(s) {bad} differ from those stored")
                        )
                    else:
                        rows.append(FaultRow("vLLM native", fault, EXACT, "all blocks exact"))
                shutil.rmtree(root, ignore_errors=True)
    finally:
        dest.release()
        dest_mmap.close()
        kv.close()
    return rows


@contextlib.contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """VUA logs a warning for each damaged group it meets; here that is the expected outcome."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def vua_faults(work: Workload, workdir: str, index_parent: str | None) -> list[FaultRow]:
    rows = []
    kv = KV(work, seed=1)
    groups = work.tokens // work.split
    target = groups // 2
    for fault, _ in FAULTS:
        side = VuaSide(workdir, kv, index_parent)
        side.fresh()
        try:
            with side.open() as store:
                store.put(kv.tokens, kv.layers)
                path = vua_fragment(store, kv.tokens, target)
            # VUA's writer's temporary: ".kv.safetensors.<pid>-<8 hex>" beside the fragment. For a
            # killed writer the index still lists the group here (a put killed mid-way records
            # nothing in it): a harder case than a real one.
            damage(fault, path, os.path.join(os.path.dirname(path), f".kv.safetensors.{os.getpid()}-deadbeef"))
            # A new process's view: a fresh handle on the same root and index.
            with quiet("vua"), side.open() as store:
                try:
                    hit = store.get_closest(kv.tokens)
                except Exception as exc:  # any exception is the outcome being measured
                    rows.append(FaultRow("VUA", fault, ERROR, f"{type(exc).__name__}: {exc}"))
                    continue
            n = 0 if hit is None else hit.tokens.shape[-1]
            exact = hit is None or all(
                same_bits(k, ek[:, :, :n]) and same_bits(v, ev[:, :, :n])
                for (k, v), (ek, ev) in zip(hit.data, kv.layers)
            )
            if not exact:
                rows.append(FaultRow("VUA", fault, WRONG, f"{n} tokens returned, not those stored"))
            else:
                kept = (
                    "the file moved aside"
                    if not os.path.exists(path) and fault != "writer killed before publish"
                    else "no file removed"
                )
                rows.append(
                    FaultRow("VUA", fault, EXACT, f"{n // work.split} of {groups} groups ({n} tokens), exact; {kept}")
                )
        finally:
            side.remove()
    kv.close()
    return rows


# -- report ---------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return f"{os.cpu_count()} cores ({cpu})"


def file_system(path: str) -> str:
    """The type of the mount holding ``path`` (as VUA itself tells a shared root apart)."""
    return file_system_type(path) or "unknown"


def table(results: dict) -> str:
    g = results["GBps"]
    w = results["workload"]
    od = "O_DIRECT" if results["o_direct"] else "buffered"
    lines = [
        f"{results['date']}, {results['machine']}, files on {results['file_system']}"
        + (f" (VUA's index on {results['index_file_system']})" if results.get("index_file_system") else "")
        + f"; {w['tokens']:,} tokens of a Llama-3-8B-shaped KV ({w['layers']} layers, bf16, {w['nbytes'] / 2**20:.0f} MiB): "
        f"vLLM {w['blocks']} files of {w['block_bytes'] / 2**20:.1f} MiB, VUA {w['tokens'] // w['split']} fragments "
        f"(split_factor {w['split']}); {results['threads']} I/O threads each; medians of {results['repeat']}",
        "",
        "| operation | vLLM native | vLLM native + fsync | VUA |",
        "|---|---|---|---|",
    ]
    fsynced = f"{g['vllm_store_fsync']:.2f} ({od})"
    if "vllm_store_buffered_fsync" in g:
        fsynced += f"; buffered: {g['vllm_store_buffered_fsync']:.2f}"
    lines.append(
        f"| store (GB/s) | {g['vllm_store']:.2f} ({od}, not durable) | {fsynced} | {g['vua_put']:.2f} (durable) |"
    )
    load = f"{g['vllm_load']:.2f} ({od})"
    if "vllm_load_buffered" in g:
        load += f"; buffered, warm: {g['vllm_load_buffered']:.2f}"
    lines.append(f"| load, page cache warm (GB/s) | {load} | - | {g['vua_get']:.2f} (every tensor checked) |")
    lines += ["", "| fault | vLLM native | VUA |", "|---|---|---|"]
    by = {(r["system"], r["fault"]): r for r in results["faults"]}
    for fault, what in FAULTS:
        cells = []
        for system in ("vLLM native", "VUA"):
            r = by[(system, fault)]
            verdict = r["verdict"] if r["verdict"] != WRONG else f"**{WRONG}**"
            cells.append(f"{verdict}: {r['detail']}")
        lines.append(f"| {fault} ({what}) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


@contextlib.contextmanager
def glusterfs_volume() -> Iterator[str]:
    """A GlusterFS volume made for this run by the tests' fixture; destroyed however the run ends."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.glusterfs import GlusterVolume

    volume = GlusterVolume.create()  # raises unittest.SkipTest saying why it cannot here
    try:
        yield volume.node_a
    finally:
        volume.destroy()


def run(args: argparse.Namespace, root: str | None) -> dict:
    work = Workload(tokens=args.tokens, layers=args.layers, split=args.split_factor)
    if root is not None:
        os.makedirs(root, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="vua-vllm-fs-", dir=root)
    kind = file_system(workdir)
    # VUA's index on local disk when the fragments are elsewhere, as a node of a cluster keeps it.
    index_parent = tempfile.mkdtemp(prefix="vua-vllm-fs-index-") if root is not None else None
    try:
        results = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "file_system": kind,
            "index_file_system": file_system(index_parent) if index_parent else None,
            "repeat": args.repeat,
            "workload": {**asdict(work), "blocks": work.blocks, "block_bytes": work.block_bytes, "nbytes": work.nbytes},
        }
        results.update(measure(work, workdir, index_parent, args.repeat))
        # Faults on the first three groups only: enough for a middle one, and a few seconds.
        fault_work = Workload(tokens=min(work.tokens, 3 * work.split), layers=work.layers, split=work.split)
        rows = vllm_faults(fault_work, workdir) + vua_faults(fault_work, workdir, index_parent)
        results["faults"] = [asdict(r) for r in rows]
        results["fault_descriptions"] = dict(FAULTS)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if index_parent is not None:
            shutil.rmtree(index_parent, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="768 tokens (96 MiB), 2 repeats")
    parser.add_argument("--tokens", type=int, help="prompt length (default 3,072: 384 MiB; --quick: 768)")
    parser.add_argument("--layers", type=int, default=32, help="layers of the model (default 32, Llama-3-8B)")
    parser.add_argument("--split-factor", type=int, default=256, help="VUA's tokens per group (default 256)")
    parser.add_argument("--repeat", type=int, help="repeats (default 5; --quick: 2)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--root", help="measure on this directory's file system (default: a temp dir on local disk)")
    where.add_argument("--glusterfs", action="store_true", help="on a GlusterFS volume made for the run (root, FUSE)")
    parser.add_argument("--out", default="bench_out", help="folder for bench_vllm_fs.json")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (768 if args.quick else 3072)
    args.repeat = args.repeat or (2 if args.quick else 5)
    s = args.split_factor
    if s % BLOCK_TOKENS or args.tokens % s or args.tokens < 3 * s:
        print(
            f"error: --split-factor must be a multiple of {BLOCK_TOKENS} and --tokens a multiple of it, "
            f"at least 3 groups (the faults hit the middle one); got {s} and {args.tokens}",
            file=sys.stderr,
        )
        return 2
    # A SIGTERM (a timeout, a CI job cancelled) unwinds like an error, so the GlusterFS volume
    # and the temporary directories are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.glusterfs:
            with glusterfs_volume() as mount:
                results = run(args, mount)
        else:
            results = run(args, args.root)
    except Exception as exc:  # the CLI says why and exits non-zero
        if type(exc).__name__ == "SkipTest":
            print(f"error: no GlusterFS here: {exc}", file=sys.stderr)
            return 1
        raise
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_vllm_fs.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    print(f"\nwrote {path}")
    # VUA's contract on damage: exact data, in full or a shorter prefix. Anything else is a bug.
    broken = [r for r in results["faults"] if r["system"] == "VUA" and r["verdict"] != EXACT]
    for r in broken:
        print(f"error: VUA returned {r['verdict']} after '{r['fault']}': {r['detail']}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
