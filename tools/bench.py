"""VUA's benchmark: speed as ratios to this machine's own limits, measured in the same run.

    uv run tools/bench.py                 # full run (a few minutes), table + JSON + PNG
    uv run tools/bench.py --quick         # smaller workloads, for a quick look
    uv run tools/bench.py --root DIR      # on the file system of DIR (an NFS or GlusterFS mount, say)

Workloads:
- the KV cache of a Llama-3-8B-shaped model (32 layers, 8 KV heads, head_dim 128, bf16:
  128 KiB a token) for 2,048 and 8,192 tokens, split_factor 256;
- key derivation and index lookups for a 131,072-token prompt;
- many small fragments (100,000 groups by default) for put and get rates.

Limits, measured on the same bytes, each timed alternately with the VUA figure it bounds
(the ratio reported is the median of the side-by-side ratios; figures are medians):
- memcpy: a torch copy into an already-touched buffer (the warm-read limit);
- raw write: one writev plus fsync of the same bytes into one file (the durable-write limit);
- raw cold read: a sequential read of VUA's own fragment files, each dropped from the
  page cache first (posix_fadvise), into a buffer already touched;
- naive: safetensors save_file (+ fsync) and load_file + torch.cat, one file per group.

Shown beside the warm get, not a target's limit: the fragment files' own warm read (preads
from the page cache on as many threads as VUA reads with, nothing checked), as a ratio to
memcpy: on a FUSE or network mount the kernel's copy out of the page cache can be well
below memcpy, and a warm get cannot beat it.

Output: a table on the terminal, ``OUT/bench.json`` and ``OUT/bench.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from vua import _layout
from vua._files import file_system_type, is_network_file_system, read_all
from vua._keys import group_keys, namespace_seed, tokens_as_int64
from vua.core import VUA, VUAConfig

GB = 1e9
LAYERS, HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
SPLIT = 256


def timed(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> list[float]:
    """Wall times of ``repeat`` calls of ``fn`` (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def drop_cache(paths: list[str]) -> None:
    """Evicts files from the page cache (they are clean after fsync), so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(paths: list[str]) -> None:
    """Reads files sequentially, one after the other, into one already-touched buffer."""
    size = max(os.path.getsize(p) for p in paths)
    buf = torch.ones(size, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            read_all(fd, [view[: os.fstat(fd).st_size]], 0)
        finally:
            os.close(fd)


def read_files_parallel(paths: list[str], threads: int) -> Callable[[], None]:
    """A warm read of the files on ``threads`` threads (as VUA's reads run), each file with preads into
    its own already-touched buffer: what the file system's page cache gives, before any check."""
    buffers = [memoryview(torch.ones(os.path.getsize(p), dtype=torch.uint8).numpy()) for p in paths]
    pool = ThreadPoolExecutor(max_workers=threads)

    def read_one(i: int) -> None:
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            view = buffers[i]
            for offset in range(0, len(view), 1 << 20):
                read_all(fd, [view[offset : offset + (1 << 20)]], offset)
        finally:
            os.close(fd)

    return lambda: list(pool.map(read_one, range(len(paths))))


def anon_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples anonymous resident memory every millisecond; reports the peak above the start."""

    def __enter__(self) -> PeakSampler:
        self.base = anon_rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anon_rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def peak_extra_in_child(root: str, tokens: torch.Tensor) -> int:
    """Peak anonymous memory a get adds, measured in a fresh process.

    In this process malloc keeps memory freed by earlier gets and hands it back, which
    would hide the cost; a new process starts from nothing.
    """
    tokens_path = os.path.join(os.path.dirname(root), "peak_tokens.npy")
    np.save(tokens_path, tokens.numpy(), allow_pickle=False)
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--peak-probe", root, tokens_path],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(tokens_path)
    return int(done.stdout.split()[-1])


def peak_probe(root: str, tokens_path: str) -> int:
    tokens = torch.from_numpy(np.load(tokens_path, allow_pickle=False))
    vua = open_store(VUAConfig(split_factor=SPLIT, namespace="bench/llama-3-8b/bf16"), root)
    vua.get_closest(tokens[..., :SPLIT], device="cpu")  # warm up imports and threads, not measured
    with PeakSampler() as peak:
        hit = vua.get_closest(tokens, device="cpu")
    assert hit is not None
    print(peak.extra)
    return 0


def llama_kv(tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(1, HEADS, tokens, HEAD_DIM, generator=gen, dtype=torch.float32).to(DTYPE) for _ in range(2))
        for _ in range(LAYERS)
    ]


def fragment_paths(vua: VUA, tokens: torch.Tensor) -> list[str]:
    return [_layout.fragment_path(vua.root, k) for k in vua.config.tokens_to_paths(tokens)]


def paired(
    limit: Callable[[], object],
    ours: Callable[[], object],
    trials: int,
    *,
    limit_setup: Callable[[], object] | None = None,
    ours_setup: Callable[[], object] | None = None,
) -> tuple[float, float, float]:
    """Times the machine's limit and VUA alternately, on the same bytes.

    This machine is shared and its speed drifts; a ratio of two runs taken side by side
    cancels most of the drift, and the median of the per-pair ratios ignores outliers.

    Returns:
        (median limit seconds, median VUA seconds, median of limit/VUA time ratios).
    """
    limit_times, our_times, ratios = [], [], []
    for _ in range(trials):
        (t_limit,) = timed(limit, 1, setup=limit_setup)
        (t_ours,) = timed(ours, 1, setup=ours_setup)
        limit_times.append(t_limit)
        our_times.append(t_ours)
        ratios.append(t_limit / t_ours)
    return statistics.median(limit_times), statistics.median(our_times), statistics.median(ratios)


def bench_llama(tokens_n: int, workdir: str, repeat: int) -> dict[str, float]:
    """One Llama-3-8B-shaped prompt: limits, naive path and VUA on the same bytes."""
    import safetensors.torch

    kv = llama_kv(tokens_n, seed=tokens_n)
    tokens = torch.randint(0, 128_000, (1, tokens_n))
    nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
    r: dict[str, float] = {"tokens": tokens_n, "bytes": nbytes}
    trials = repeat + 2

    # Limits. memcpy: the same bytes into a buffer whose pages are already touched.
    flat = torch.cat([t.reshape(-1) for kv_pair in kv for t in kv_pair])
    dest = torch.empty_like(flat)
    dest.copy_(flat)
    # Raw durable write: one file, one writev of the same buffers, one fsync.
    raw_path = os.path.join(workdir, "raw.bin")
    buffers = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for kv_pair in kv for t in kv_pair]

    def raw_write() -> None:
        fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            written = os.writev(fd, buffers)
            assert written == nbytes
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_raw() -> None:
        if os.path.exists(raw_path):
            os.unlink(raw_path)

    # Naive path: safetensors save_file (+ fsync, for durability) and load_file + cat per group.
    naive_dir = os.path.join(workdir, "naive")

    def naive_put() -> None:
        os.makedirs(naive_dir)
        for g in range(tokens_n // SPLIT):
            part = {
                f"{i}.{j}": t[0, :, g * SPLIT : (g + 1) * SPLIT].contiguous()
                for i, pair in enumerate(kv)
                for j, t in enumerate(pair)
            }
            path = os.path.join(naive_dir, f"{g}.safetensors")
            safetensors.torch.save_file(part, path)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def naive_get() -> None:
        parts = [
            safetensors.torch.load_file(os.path.join(naive_dir, f"{g}.safetensors")) for g in range(tokens_n // SPLIT)
        ]
        [torch.cat([p[f"{i}.{j}"] for p in parts], dim=1) for i in range(LAYERS) for j in range(2)]

    r["clone_GBps"] = nbytes / statistics.median(timed(lambda: flat.clone(), repeat)) / GB
    r["naive_put_GBps"] = (
        nbytes
        / statistics.median(timed(naive_put, repeat, setup=lambda: shutil.rmtree(naive_dir, ignore_errors=True)))
        / GB
    )
    r["naive_warm_get_GBps"] = nbytes / statistics.median(timed(naive_get, repeat)) / GB
    shutil.rmtree(naive_dir)

    # VUA, each figure taken alternately with its limit.
    root = os.path.join(workdir, "vua")
    config = VUAConfig(split_factor=SPLIT, namespace="bench/llama-3-8b/bf16")
    stores: list[VUA] = []

    def fresh_store() -> None:
        remove_raw()
        for s in stores:
            s.close()
        stores.clear()
        shutil.rmtree(root, ignore_errors=True)
        stores.append(open_store(config, root))

    t_limit, t_ours, ratio = paired(
        raw_write, lambda: stores[0].put(tokens, kv), trials, limit_setup=remove_raw, ours_setup=fresh_store
    )
    r["raw_write_GBps"], r["put_GBps"], r["put_vs_raw_write"] = nbytes / t_limit / GB, nbytes / t_ours / GB, ratio
    remove_raw()
    vua = stores[0]
    hit = vua.get_closest(tokens, device="cpu")
    assert hit is not None and hit.tokens.shape[-1] == tokens_n
    assert all(torch.equal(a, b) for pair, ref in zip(hit.data, kv) for a, b in zip(pair, ref)), (
        "VUA returned wrong data"
    )
    del hit

    t_limit, t_ours, ratio = paired(lambda: dest.copy_(flat), lambda: vua.get_closest(tokens, device="cpu"), trials + 2)
    r["memcpy_GBps"], r["warm_get_GBps"], r["warm_get_vs_memcpy"] = nbytes / t_limit / GB, nbytes / t_ours / GB, ratio

    paths = fragment_paths(vua, tokens)
    # Not a target's limit: how much of memcpy the file system's own warm reads reach here
    # (the kernel's copy out of the page cache), for reading the warm get's ratio.
    _, t_read, ratio = paired(lambda: dest.copy_(flat), read_files_parallel(paths, config.io_threads), trials)
    r["raw_warm_read_GBps"], r["raw_warm_read_vs_memcpy"] = nbytes / t_read / GB, ratio
    t_limit, t_ours, ratio = paired(
        lambda: read_files(paths),
        lambda: vua.get_closest(tokens, device="cpu"),
        trials,
        limit_setup=lambda: drop_cache(paths),
        ours_setup=lambda: drop_cache(paths),
    )
    r["raw_cold_read_GBps"], r["cold_get_GBps"], r["cold_get_vs_raw_read"] = (
        nbytes / t_limit / GB,
        nbytes / t_ours / GB,
        ratio,
    )
    r["get_peak_extra_MiB"] = peak_extra_in_child(root, tokens) / 2**20
    r["get_peak_budget_MiB"] = nbytes / 2**20 + 64
    vua.close()
    shutil.rmtree(root)

    # The same warm get from a store with authenticated fragments (VUAConfig.auth_key).
    sealed = open_store(replace(config, auth_key=b"bench-secret-key-32-bytes-long!!"), root)
    sealed.put(tokens, kv)
    hit = sealed.get_closest(tokens, device="cpu")
    assert hit is not None and hit.tokens.shape[-1] == tokens_n, "authenticated store lost the prompt"
    del hit
    t_limit, t_ours, ratio = paired(lambda: dest.copy_(flat), lambda: sealed.get_closest(tokens, device="cpu"), trials)
    r["auth_warm_get_GBps"], r["auth_warm_get_vs_memcpy"] = nbytes / t_ours / GB, ratio
    sealed.close()
    shutil.rmtree(root)

    r["warm_get_vs_clone"] = r["warm_get_GBps"] / r["clone_GBps"]
    r["put_vs_naive"] = r["put_GBps"] / r["naive_put_GBps"]
    r["warm_get_vs_naive"] = r["warm_get_GBps"] / r["naive_warm_get_GBps"]
    return r


def bench_keys_and_lookup(workdir: str, repeat: int) -> dict[str, float]:
    """Keys and index lookups for a 131,072-token prompt (512 groups of 256)."""
    n = 131_072
    tokens = torch.randint(0, 128_000, (n,))
    seed = namespace_seed("bench/lookup")
    r: dict[str, float] = {}
    r["keys_131k_ms"] = 1e3 * statistics.median(timed(lambda: group_keys(tokens_as_int64(tokens), SPLIT, seed), 20))

    root = os.path.join(workdir, "lookup")
    vua = open_store(VUAConfig(split_factor=SPLIT, namespace="bench/lookup"), root)
    tiny = [(torch.zeros(1, 1, n, 1, dtype=torch.float16), torch.zeros(1, 1, n, 1, dtype=torch.float16))]
    vua.put(tokens, tiny)
    keys = group_keys(tokens_as_int64(tokens), SPLIT, seed)
    other = tokens.clone()
    other[0] += 1
    miss_keys = group_keys(tokens_as_int64(other), SPLIT, seed)
    assert vua._catalog.usable_groups(keys)[0] == 512 and vua._catalog.usable_groups(miss_keys)[0] == 0
    r["lookup_hit_131k_ms"] = 1e3 * statistics.median(timed(lambda: vua._catalog.usable_groups(keys), 50))
    r["lookup_miss_131k_ms"] = 1e3 * statistics.median(timed(lambda: vua._catalog.usable_groups(miss_keys), 50))
    r["get_miss_131k_ms"] = 1e3 * statistics.median(timed(lambda: vua.get_closest(other, device="cpu"), 20))
    vua.close()
    shutil.rmtree(root)
    return r


def bench_small(workdir: str, groups: int) -> dict[str, float]:
    """Many small fragments: split_factor 16, 2 layers x 1 head x 16 dims, fp16."""
    split, per_put = 16, 64  # 64 prompts of one group each per put call
    root = os.path.join(workdir, "small")
    vua = open_store(VUAConfig(split_factor=split, namespace="bench/small"), root)
    kv = [(torch.randn(per_put, 1, split, 16).half(), torch.randn(per_put, 1, split, 16).half()) for _ in range(2)]
    batches = [
        torch.arange(b * per_put * split, (b + 1) * per_put * split).view(per_put, split)
        for b in range(groups // per_put)
    ]
    start = time.perf_counter()
    for batch in batches:
        vua.put(batch, kv)
    put_s = time.perf_counter() - start
    stored = len(batches) * per_put
    sample = [batches[i % len(batches)][i % per_put] for i in range(0, 2000)]
    start = time.perf_counter()
    for t in sample:
        assert vua.get_closest(t, device="cpu") is not None
    get_s = time.perf_counter() - start
    lookups = [vua.config.tokens_to_paths(t) for t in sample]
    start = time.perf_counter()
    for keys in lookups:
        vua._catalog.usable_groups([bytes.fromhex(k) for k in keys])
    lookup_s = time.perf_counter() - start
    vua.close()
    shutil.rmtree(root)
    return {
        "small_groups": stored,
        "small_put_groups_per_s": stored / put_s,
        "small_get_per_s": len(sample) / get_s,
        "small_lookup_us": 1e6 * lookup_s / len(lookups),
    }


_local_indexes: str | None = None  # with --root on a network file system: each store's index goes here


def open_store(config: VUAConfig, root: str) -> VUA:
    """A store at ``root``; on a network file system its index stays on local disk, as a node's would."""
    if _local_indexes is not None:
        config = replace(config, index_path=tempfile.mkdtemp(dir=_local_indexes))
    return VUA(config, root)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, torch {torch.__version__}"


def verdict(value: float, target: float, *, at_least: bool = True) -> str:
    """A table cell that shows at a glance whether a figure meets its target."""
    met = value >= target if at_least else value <= target
    return "met" if met else "**MISSED**"


def table(results: dict) -> str:
    targets = ratio_targets(results)
    lines = [f"machine: {results['machine']}; files on {results.get('file_system') or 'an unknown file system'}", ""]
    lines.append("| workload | figure | limit | ratio | target | status |")
    lines.append("|---|---|---|---|---|---|")
    for r in results["llama"]:
        t = f"Llama-3-8B KV, {r['tokens']} tokens ({r['bytes'] / 2**20:.0f} MiB)"
        put, warm, cold = r["put_vs_raw_write"], r["warm_get_vs_memcpy"], r["cold_get_vs_raw_read"]
        lines.append(
            f"| {t}: durable put | {r['put_GBps']:.2f} GB/s | raw writev+fsync {r['raw_write_GBps']:.2f} GB/s "
            f"| {put:.2f}x | >= {targets['put']}x | {verdict(put, targets['put'])} |"
        )
        lines.append(
            f"| {t}: warm get | {r['warm_get_GBps']:.2f} GB/s | memcpy {r['memcpy_GBps']:.2f} GB/s "
            f"(clone {r['clone_GBps']:.2f}; the files' own warm read {r['raw_warm_read_GBps']:.2f}, "
            f"{r['raw_warm_read_vs_memcpy']:.2f}x) | {warm:.2f}x | >= {targets['warm get']}x "
            f"| {verdict(warm, targets['warm get'])} |"
        )
        lines.append(
            f"| {t}: cold get | {r['cold_get_GBps']:.2f} GB/s | raw read of the files {r['raw_cold_read_GBps']:.2f} GB/s "
            f"| {cold:.2f}x | >= {targets['cold get']}x | {verdict(cold, targets['cold get'])} |"
        )
        if "auth_warm_get_vs_memcpy" in r:
            auth = r["auth_warm_get_vs_memcpy"]
            lines.append(
                f"| {t}: warm get, authenticated (auth_key) | {r['auth_warm_get_GBps']:.2f} GB/s | memcpy | "
                f"{auth:.2f}x | >= {AUTH_TARGET}x | {verdict(auth, AUTH_TARGET)} |"
            )
        lines.append(
            f"| {t}: naive safetensors | put {r['naive_put_GBps']:.2f}, get {r['naive_warm_get_GBps']:.2f} GB/s | "
            f"| VUA {r['put_vs_naive']:.1f}x / {r['warm_get_vs_naive']:.1f}x faster | | |"
        )
        peak, budget = r["get_peak_extra_MiB"], r["get_peak_budget_MiB"]
        lines.append(
            f"| {t}: peak extra memory in get | {peak:.0f} MiB | result + 64 MiB = {budget:.0f} MiB | | <= budget "
            f"| {verdict(peak, budget, at_least=False)} |"
        )
    k = results["lookup"]
    for label, key, digits, limit in (
        ("keys for 131,072 tokens", "keys_131k_ms", 2, 3.0),
        ("index lookup, 131,072 tokens, hit (512 groups)", "lookup_hit_131k_ms", 3, 1.0),
        ("index lookup, 131,072 tokens, miss", "lookup_miss_131k_ms", 3, 1.0),
    ):
        lines.append(
            f"| {label} | {k[key]:.{digits}f} ms | | | <= {limit:g} ms | {verdict(k[key], limit, at_least=False)} |"
        )
    lines.append(f"| get_closest miss, 131,072 tokens (hashing included) | {k['get_miss_131k_ms']:.2f} ms | | | | |")
    s = results["small"]
    lines.append(
        f"| {s['small_groups']:,} small groups: durable put | {s['small_put_groups_per_s']:,.0f} groups/s | | | | |"
    )
    lines.append(f"| {s['small_groups']:,} small groups: get one group | {s['small_get_per_s']:,.0f} gets/s | | | | |")
    lines.append(f"| {s['small_groups']:,} small groups: index lookup | {s['small_lookup_us']:.0f} us | | | | |")
    return "\n".join(lines)


# Each ratio's target: VUA's speed over this machine's own limit, measured in the same run.
RATIO_TARGETS = {"put": 0.7, "warm get": 0.6, "cold get": 0.7}
NETWORK_RATIO_TARGETS = {"put": 0.8, "warm get": 0.6, "cold get": 0.8}  # against that file system's own limits


def ratio_targets(results: dict) -> dict[str, float]:
    return NETWORK_RATIO_TARGETS if is_network_file_system(results.get("file_system", "")) else RATIO_TARGETS


AUTH_TARGET = 0.5  # warm get with auth_key on, against memcpy
_RATIO_KEYS = {"put": "put_vs_raw_write", "warm get": "warm_get_vs_memcpy", "cold get": "cold_get_vs_raw_read"}


def chart(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(9, 4.6))
    labels, values, targets = [], [], []
    for r in results["llama"]:
        for name, target in ratio_targets(results).items():
            labels.append(f"{name}\n{r['tokens']} tok")
            values.append(r[_RATIO_KEYS[name]])
            targets.append(target)
    xs = list(range(len(labels)))
    colors = ["#3b7dd8" if v >= t else "#d8443b" for v, t in zip(values, targets)]
    bars = ax.bar(xs, values, color=colors, width=0.6)
    for x, bar, value, target in zip(xs, bars, values, targets):
        ax.text(x, bar.get_height() + 0.02, f"{value:.2f}x", ha="center", va="bottom", fontsize=8)
        # The target as a black segment across the bar, drawn over it so a short bar shows its gap.
        ax.hlines(target, x - 0.4, x + 0.4, color="black", linewidth=2, zorder=3)
    ax.axhline(1.0, color="#888", linewidth=0.8, linestyle="--")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylim(0, max([*values, *targets, 1.0]) * 1.12)
    ax.set_ylabel("ratio to this machine's limit")
    ax.set_title("VUA on a Llama-3-8B-shaped KV cache (bf16, split_factor 256)")
    handles = [
        Patch(color="#3b7dd8", label="VUA / machine limit: target met"),
        Patch(color="#d8443b", label="target missed"),
        Line2D([], [], color="black", linewidth=2, label="target"),
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,048 tokens only, 10,000 small groups, fewer repeats")
    parser.add_argument("--tokens", default="2048,8192", help="comma-separated prompt lengths (default 2048,8192)")
    parser.add_argument("--small-groups", type=int, default=100_000, help="groups in the small-fragment workload")
    parser.add_argument(
        "--root",
        "--workdir",
        dest="workdir",
        help="the file system to measure on, VUA and its limits alike (default: a temporary directory on "
        "this disk); on a network file system each store's index stays on local disk",
    )
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and bench.png")
    parser.add_argument("--peak-probe", nargs=2, metavar=("ROOT", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_probe:
        return peak_probe(*args.peak_probe)

    token_counts = [2048] if args.quick else [int(t) for t in args.tokens.split(",")]
    small = 10_000 if args.quick else args.small_groups
    repeat = 2 if args.quick else 3
    global _local_indexes
    if args.workdir is not None:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="vua-bench-", dir=args.workdir)
    kind = file_system_type(workdir)
    if is_network_file_system(kind):
        _local_indexes = tempfile.mkdtemp(prefix="vua-bench-indexes-")
    try:
        results = {"machine": machine(), "file_system": kind, "date": time.strftime("%Y-%m-%d")}
        results["llama"] = [bench_llama(n, workdir, repeat) for n in token_counts]
        results["lookup"] = bench_keys_and_lookup(workdir, repeat)
        results["small"] = bench_small(workdir, small)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if _local_indexes is not None:
            shutil.rmtree(_local_indexes, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(results, f, indent=2)
    chart(results, os.path.join(args.out, "bench.png"))
    print(table(results))
    print(f"\nwrote {args.out}/bench.json and {args.out}/bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
