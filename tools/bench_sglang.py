"""VUA as SGLang's HiCache storage tier beside SGLang's own file backend, on the same host-pool pages.

    .sglang-venv/bin/python tools/bench_sglang.py              # ~1 GiB of pages, a few minutes
    .sglang-venv/bin/python tools/bench_sglang.py --quick      # 64 MiB, two repeats
    .sglang-venv/bin/python tools/bench_sglang.py --root DIR   # on DIR's file system

Started with another Python, it re-runs itself with the SGLang environment's
(``python -m tests.sglang.env`` builds it, and so does this tool where it is missing).

It builds the host pool SGLang builds for a Llama-3-8B-shaped MHA model (32 layers, 8 KV
heads, head_dim 128, bf16: 8 MiB a page of 64 tokens) on the CPU (pin_memory=False),
fills its source pages with random bytes, and in one run, on the same pages:

- VUA (``vua.sglang.VUAStorage`` created by SGLang's ``dynamic`` factory, interface_v1):
  ``batch_set_v1`` (durable: every fragment fsynced, then published), ``batch_get_v1``
  into other pages of the pool, ``batch_exists``;
- SGLang's own file backend, ``HiCacheFile``: ``batch_set_v2`` / ``batch_get_v2`` with a
  ``PoolTransfer`` (it has no zero-copy v1 calls: a page goes through a flat copy each way,
  ``get_data_page(flat=True)`` / ``get_dummy_flat_data_page`` + ``set_from_flat_data_page``,
  what SGLang's controller's generic path does too). Its write is
  ``numpy().tofile(tmp)`` then ``os.replace``: no fsync anywhere, so a set returns before
  the bytes are on disk. "HiCacheFile + fsync" is the same write with an fsync of each file
  and of the directory added (a like-for-like durable write);
- this machine's limits on the same bytes: memcpy of the pages into the destination pages;
  a raw write of each page's bytes straight from the pool to a file of its own (writev, then
  fsync; the directory fsynced at the end) on as many threads as VUA writes with; a raw
  read of those files straight into the destination pages (preadv), warm and cold.

Calls carry at most 128 pages (SGLang's STORAGE_BATCH_SIZE). Each set starts from an empty
directory (both backends skip pages already stored); each get lands in zeroed destination
pages and is compared with the source pages bit for bit (torch.equal) before it counts.
Gets are timed with the page cache warm and cold: cold after ``sync`` and ``echo 1 >
/proc/sys/vm/drop_caches`` (root), or, where that is not writable, after ``sync`` and
posix_fadvise(DONTNEED) of every file the reads touch (the output says which).

Figures are medians of ``--repeat`` rounds, the systems alternating within each round;
ratios are medians of the per-round ratios. Targets: VUA's get at least as fast as
HiCacheFile's (warm and cold); VUA's durable set at least 0.7x the raw write.

Output: a markdown table on the terminal and ``OUT/bench_sglang.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GB = 1e9
HEADS, HEAD_DIM = 8, 128
CALL_PAGES = 128  # SGLang's STORAGE_BATCH_SIZE: the most pages one storage call carries
SET_TARGET = 0.7  # VUA's durable set over the raw write
GET_TARGET = 1.0  # VUA's get over HiCacheFile's


def _sglang_python() -> None:
    """Re-runs this tool with the SGLang environment's Python when this one has no SGLang."""
    if importlib.util.find_spec("sglang") is not None:
        return
    sys.path.insert(0, REPO)
    from tests.sglang import env

    reason = env.unsupported_reason()
    if reason:
        sys.exit(f"error: {reason}")
    try:
        exe = env.python()  # builds .sglang-venv where missing (a few minutes)
    except RuntimeError as exc:
        sys.exit(f"error: the SGLang environment could not be built: {exc}")
    os.execv(exe, [exe, os.path.abspath(__file__), *sys.argv[1:]])


if __name__ == "__main__":
    _sglang_python()

warnings.filterwarnings("ignore")  # torchvision's stand-in, and the like
logging.disable(logging.INFO)  # SGLang's chatter; warnings still show
os.environ.pop("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", None)  # it would move HiCacheFile's directory

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import (  # noqa: E402
    HiCacheFile,
    HiCacheStorageConfig,
    PoolName,
    PoolTransfer,
)
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

sys.path.insert(0, REPO)
from vua._files import file_system_type  # noqa: E402
from vua.core import VUAConfig  # noqa: E402

DTYPE = torch.bfloat16


# -- the pool and its pages ---------------------------------------------------------------


class Pages:
    """A host pool with ``n`` source pages (random bytes) and ``n`` destination pages."""

    def __init__(self, n: int, layers: int, page: int, layout: str, seed: int = 0):
        device = MHATokenToKVPool(
            page,
            page,
            DTYPE,
            head_num=HEADS,
            head_dim=HEAD_DIM,
            layer_num=layers,
            device="cpu",
            enable_memory_saver=False,
            start_layer=0,
            end_layer=layers,
        )
        self.host = MHATokenToKVPoolHost(
            device.get_device_pool_infos()[0].buffer_info,
            2 * n * page / device.size,  # host_to_device_ratio: room for 2n pages (it adds one)
            0,
            page,
            layout,
            pin_memory=False,
            device="cpu",
            device_capacity_tokens=device.size,
            start_layer=0,
            end_layer=layers,
        )
        del device
        self.n, self.layers, self.page, self.layout = n, layers, page, layout
        indices = self.host.alloc(2 * n * page)
        assert indices is not None and indices.numel() == 2 * n * page, "the host pool is too small"
        self.src_indices, self.dst_indices = indices[: n * page], indices[n * page :]
        self.src = [int(self.src_indices[i * page]) for i in range(n)]
        self.dst = [int(self.dst_indices[i * page]) for i in range(n)]
        gen = torch.Generator().manual_seed(seed)
        for s in self.src:
            for chunk in self.chunks(s):
                raw = chunk.view(torch.int16)
                raw.copy_(torch.randint(-(2**15), 2**15, raw.shape, dtype=torch.int16, generator=gen))
        self.zero_dst()
        self.page_bytes = sum(c.nbytes for c in self.chunks(self.src[0]))
        self.nbytes = n * self.page_bytes

    def chunks(self, start: int) -> list[torch.Tensor]:
        """The page at host token ``start`` as contiguous views of kv_buffer, in the flat page's order."""
        kv, p = self.host.kv_buffer, self.page
        if self.layout == "layer_first":  # (2, L, T, H, D): per K|V, per layer
            return [kv[i, layer, start : start + p] for i in (0, 1) for layer in range(self.layers)]
        if self.layout == "page_first":  # (2, T, L, H, D)
            return [kv[0, start : start + p], kv[1, start : start + p]]
        return [kv[0, start // p], kv[1, start // p]]  # page_first_direct: (2, pages, L, P, H, D)

    def buffers(self, start: int) -> list[memoryview]:
        return [memoryview(c.view(torch.uint8).numpy()).cast("B") for c in self.chunks(start)]

    def zero_dst(self) -> None:
        for d in self.dst:
            for chunk in self.chunks(d):
                chunk.zero_()

    def same(self, pages: int | None = None) -> bool:
        """Every destination page equals its source page, bit for bit."""
        for s, d in list(zip(self.src, self.dst))[: self.n if pages is None else pages]:
            for a, b in zip(self.chunks(s), self.chunks(d)):
                if not torch.equal(a.view(torch.int16), b.view(torch.int16)):
                    return False
        return True

    def memcpy(self) -> None:
        for s, d in zip(self.src, self.dst):
            for a, b in zip(self.chunks(s), self.chunks(d)):
                b.copy_(a)


def page_keys(count: int, page: int, seed: int) -> list[str]:
    """SGLang's page keys: SHA-256 chained over each page's token ids (little-endian uint32)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128_000, (count * page,), generator=gen, dtype=torch.int32).numpy()
    keys, prior = [], b""
    for i in range(count):
        prior = hashlib.sha256(prior + ids[i * page : (i + 1) * page].astype("<u4").tobytes()).digest()
        keys.append(prior.hex())
    return keys


def calls(keys: list[str], indices: torch.Tensor, page: int) -> list[tuple[list[str], torch.Tensor]]:
    """(keys, host_indices) of each storage call, at most CALL_PAGES pages each."""
    return [
        (keys[i : i + CALL_PAGES], indices[i * page : (i + len(keys[i : i + CALL_PAGES])) * page])
        for i in range(0, len(keys), CALL_PAGES)
    ]


# -- the backends ---------------------------------------------------------------------------


def storage_config(layout: str, extra: dict | None = None) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=layout == "page_first",
        model_name="bench/llama-3-8b-shaped",
        extra_config=extra,
    )


def vua_backend(pages: Pages, root: str, index: str):
    """VUAStorage as SGLang makes it: the dynamic factory, then register_mem_pool_host."""
    extra = {
        "backend_name": "vua",
        "module_path": "vua.sglang",
        "class_name": "VUAStorage",
        "interface_v1": 1,
        "root": root,
        "index_path": index,
    }
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(pages.layout, extra), pages.host)
    backend.register_mem_pool_host(pages.host)
    return backend


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HiCacheFileFsync(HiCacheFile):
    """HiCacheFile with what a durable write needs added: each page's file fsynced, then the directory."""

    def _write_page(self, pool_name: str, key: str, host_pool, page_offset: int) -> bool:
        ok = super()._write_page(pool_name, key, host_pool, page_offset)
        if ok:
            fsync_path(os.path.join(self.file_path, f"{self._get_suffixed_key(self._log_key(pool_name, key))}.bin"))
        return ok

    def batch_set_v2(self, transfers, extra_info=None):
        out = super().batch_set_v2(transfers, extra_info)
        fsync_path(self.file_path)
        return out


def file_backend(pages: Pages, root: str, *, fsync: bool) -> HiCacheFile:
    backend = (HiCacheFileFsync if fsync else HiCacheFile)(storage_config(pages.layout), file_path=root)
    backend.register_mem_pool_host(pages.host)
    backend.register_mem_host_pool_v2(pages.host, PoolName.KV)
    return backend


def file_transfer(keys: list[str], indices: torch.Tensor) -> list[PoolTransfer]:
    return [PoolTransfer(name=PoolName.KV, host_indices=indices, keys=keys)]


# -- the raw limits -------------------------------------------------------------------------


class Raw:
    """Each page's bytes in a file of its own under ``root``, written and read straight from the pool."""

    def __init__(self, pages: Pages, root: str, pool: ThreadPoolExecutor):
        self.pages, self.root, self.pool = pages, root, pool
        self.paths = [os.path.join(root, f"page{i:05d}.bin") for i in range(pages.n)]

    def write(self) -> None:
        os.makedirs(self.root)

        def one(i: int) -> None:
            fd = os.open(self.paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                views = self.pages.buffers(self.pages.src[i])
                done = os.writev(fd, views)
                if done != self.pages.page_bytes:  # a short write: the rest, plainly
                    data = b"".join(bytes(v) for v in views)
                    while done < len(data):
                        done += os.write(fd, data[done:])
                os.fsync(fd)
            finally:
                os.close(fd)

        list(self.pool.map(one, range(self.pages.n)))
        fsync_path(self.root)

    def read(self) -> None:
        def one(i: int) -> None:
            fd = os.open(self.paths[i], os.O_RDONLY)
            try:
                views = [v for v in self.pages.buffers(self.pages.dst[i])]
                offset = 0
                for view in views:
                    while len(view):
                        got = os.preadv(fd, [view], offset)
                        if got <= 0:
                            raise OSError(f"{self.paths[i]}: short read")
                        offset += got
                        view = view[got:]
            finally:
                os.close(fd)

        list(self.pool.map(one, range(self.pages.n)))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# -- cold reads -----------------------------------------------------------------------------


def cold_method() -> str:
    """How the page cache is dropped here: drop_caches (root), else posix_fadvise per file."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return "drop_caches"
    except OSError:
        return "fadvise"


def drop_cache(method: str, dirs: list[str]) -> None:
    os.sync()
    if method == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return
    for top in dirs:
        for folder, _, files in os.walk(top):
            for name in files:
                with contextlib.suppress(OSError):
                    fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)


# -- the bench ------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def measure(args: argparse.Namespace, workdir: str, index_parent: str) -> dict:
    pages = Pages(args.pages, args.layers, args.page_size, args.layout)
    keys = page_keys(pages.n, pages.page, seed=1)
    src_calls = calls(keys, pages.src_indices, pages.page)
    dst_calls = calls(keys, pages.dst_indices, pages.page)
    threads = VUAConfig().io_threads
    pool = ThreadPoolExecutor(max_workers=threads)
    raw = Raw(pages, os.path.join(workdir, "raw"), pool)
    t: dict[str, list[float]] = {}
    per_call: dict[str, list[float]] = {}

    def note(name: str, seconds: float) -> None:
        t.setdefault(name, []).append(seconds)

    def note_call(name: str, seconds: float) -> None:
        per_call.setdefault(name, []).append(seconds)

    # -- sets: each from an empty directory, the page cache flushed (untimed) between them -----
    vua = vua_root = vua_index = None
    file_dir = os.path.join(workdir, "hicache")
    file_fsync_dir = os.path.join(workdir, "hicache-fsync")
    for rnd in range(args.repeat):
        raw.remove()
        os.sync()
        note("raw_write", timed(raw.write))

        if vua is not None:
            vua.close()
            shutil.rmtree(vua_root, ignore_errors=True)
            shutil.rmtree(vua_index, ignore_errors=True)
        vua_root = os.path.join(workdir, f"vua-{rnd}")
        vua_index = os.path.join(index_parent, f"index-{rnd}")
        vua = vua_backend(pages, vua_root, vua_index)
        os.sync()

        def vua_set(backend=vua) -> None:
            for k, idx in src_calls:
                start = time.perf_counter()
                check(all(backend.batch_set_v1(k, idx)), "VUA's batch_set_v1 stored fewer pages than asked")
                note_call("vua_set", time.perf_counter() - start)

        note("vua_set", timed(vua_set))

        for name, folder, fsync in (("file_set", file_dir, False), ("file_set_fsync", file_fsync_dir, True)):
            shutil.rmtree(folder, ignore_errors=True)
            os.sync()
            backend = file_backend(pages, folder, fsync=fsync)

            def file_set(backend: HiCacheFile = backend, name: str = name) -> None:
                for k, idx in src_calls:
                    start = time.perf_counter()
                    out = backend.batch_set_v2(file_transfer(k, idx))
                    note_call(name, time.perf_counter() - start)
                    check(out == {PoolName.KV: [True] * len(k)}, f"HiCacheFile's batch_set_v2 returned {out}")

            note(name, timed(file_set))
        os.sync()  # HiCacheFile's own set left its pages to the kernel: written back here, untimed
    shutil.rmtree(file_dir, ignore_errors=True)
    hicache = file_backend(pages, file_fsync_dir, fsync=False)  # reads what the durable variant wrote

    # -- exists: per call, the index (VUA) or a stat per page (HiCacheFile) ------------------
    for _ in range(max(5, 2 * args.repeat)):
        for k, _idx in src_calls:
            start = time.perf_counter()
            found = vua.batch_exists(k)
            note_call("vua_exists", time.perf_counter() - start)
            check(found == len(k), f"VUA's batch_exists found {found} of {len(k)}")
            start = time.perf_counter()
            found = hicache.batch_exists(k)
            note_call("file_exists", time.perf_counter() - start)
            check(found == len(k), f"HiCacheFile's batch_exists found {found} of {len(k)}")

    # -- gets -------------------------------------------------------------------------------
    def vua_get(name: str) -> Callable[[], None]:
        def run() -> None:
            for k, idx in dst_calls:
                start = time.perf_counter()
                got = vua.batch_get_v1(k, idx)
                note_call(name, time.perf_counter() - start)
                check(all(got), f"VUA's batch_get_v1 loaded {sum(got)} of {len(k)} pages")

        return run

    def file_get(name: str) -> Callable[[], None]:
        def run() -> None:
            for k, idx in dst_calls:
                start = time.perf_counter()
                got = hicache.batch_get_v2(file_transfer(k, idx))
                note_call(name, time.perf_counter() - start)
                check(got == {PoolName.KV: [True] * len(k)}, f"HiCacheFile's batch_get_v2 returned {got}")

        return run

    def checked(name: str, fn: Callable[[], None], setup: Callable[[], None] | None = None) -> None:
        pages.zero_dst()
        if setup is not None:
            setup()
        note(name, timed(fn))
        check(pages.same(), f"{name}: the destination pages differ from the source pages")

    # Warm: one untimed pass of each reads every file into the page cache.
    warm = {
        "memcpy": pages.memcpy,
        "raw_read_warm": raw.read,
        "vua_get_warm": vua_get("vua_get_warm"),
        "file_get_warm": file_get("file_get_warm"),
    }
    for fn in warm.values():
        fn()
    per_call.pop("vua_get_warm", None)
    per_call.pop("file_get_warm", None)
    for _ in range(args.repeat):
        for name, fn in warm.items():
            checked(name, fn)

    method = "off" if args.no_cold else cold_method()
    if method != "off":
        dirs = [raw.root, vua_root, vua_index, file_fsync_dir]
        cold = {
            "raw_read_cold": raw.read,
            "vua_get_cold": vua_get("vua_get_cold"),
            "file_get_cold": file_get("file_get_cold"),
        }
        for _ in range(args.repeat):
            for name, fn in cold.items():
                checked(name, fn, setup=lambda: drop_cache(method, dirs))

    vua.close()
    pool.shutdown()
    return {
        "threads": threads,
        "cold_method": method,
        "seconds": t,
        "per_call_seconds": per_call,
        "pages_per_call": [len(k) for k, _ in src_calls],
        "nbytes": pages.nbytes,
        "page_bytes": pages.page_bytes,
    }


def summarise(r: dict) -> dict:
    """GB/s (medians), ratios (medians of per-round ratios), per-call latencies, targets."""
    t, n = r["seconds"], r["nbytes"]
    r["GBps"] = {name: n / statistics.median(s) / GB for name, s in t.items()}

    def ratio(ours: str, other: str) -> float | None:
        if ours not in t or other not in t:
            return None
        return statistics.median(b / a for a, b in zip(t[ours], t[other]))  # >1: ours faster

    r["ratios"] = {
        key: value
        for key, value in {
            "vua_set_vs_raw_write": ratio("vua_set", "raw_write"),
            "vua_set_vs_file_set_fsync": ratio("vua_set", "file_set_fsync"),
            "vua_set_vs_file_set": ratio("vua_set", "file_set"),
            "vua_get_warm_vs_file": ratio("vua_get_warm", "file_get_warm"),
            "vua_get_warm_vs_memcpy": ratio("vua_get_warm", "memcpy"),
            "vua_get_warm_vs_raw_read": ratio("vua_get_warm", "raw_read_warm"),
            "file_get_warm_vs_memcpy": ratio("file_get_warm", "memcpy"),
            "vua_get_cold_vs_file": ratio("vua_get_cold", "file_get_cold"),
            "vua_get_cold_vs_raw_read": ratio("vua_get_cold", "raw_read_cold"),
        }.items()
        if value is not None
    }
    r["per_call_ms"] = {name: 1e3 * statistics.median(s) for name, s in r["per_call_seconds"].items()}
    q = r["ratios"]
    targets = {
        "VUA's durable set >= 0.7x the raw write": (q["vua_set_vs_raw_write"], SET_TARGET),
        "VUA's get >= HiCacheFile's (warm)": (q["vua_get_warm_vs_file"], GET_TARGET),
    }
    if "vua_get_cold_vs_file" in q:
        targets["VUA's get >= HiCacheFile's (cold)"] = (q["vua_get_cold_vs_file"], GET_TARGET)
    r["targets"] = {name: {"ratio": v, "target": x, "met": v >= x} for name, (v, x) in targets.items()}
    return r


def table(r: dict) -> str:
    g, q, c, w = r["GBps"], r["ratios"], r["per_call_ms"], r["workload"]
    calls_note = f"{len(r['pages_per_call'])} call(s) of {max(r['pages_per_call'])} pages"
    cold = {
        "drop_caches": "cold: sync + drop_caches",
        "fadvise": "cold: sync + posix_fadvise(DONTNEED) per file (drop_caches not writable here)",
        "off": "cold reads not measured (--no-cold)",
    }[r["cold_method"]]
    lines = [
        f"{r['date']}, {r['machine']}, files on {r['file_system']}; SGLang {r['sglang']}, torch {r['torch']}",
        f"{w['pages']} pages of {w['page_bytes'] / 2**20:.0f} MiB ({w['nbytes'] / 2**20:.0f} MiB; Llama-3-8B-shaped MHA, "
        f"{w['layers']} layers, {HEADS} KV heads, head_dim {HEAD_DIM}, bf16, page_size {w['page_size']}, "
        f"layout {w['layout']}), {calls_note}; VUA {r['threads']} I/O threads; medians of {r['repeat']}; {cold}",
        "",
        "| operation (GB/s) | VUA | HiCacheFile | HiCacheFile + fsync | machine limit | VUA / HiCacheFile | VUA / limit |",
        "|---|---|---|---|---|---|---|",
        f"| set | {g['vua_set']:.2f} (durable) | {g['file_set']:.2f} (no fsync) | {g['file_set_fsync']:.2f} "
        f"| raw write + fsync {g['raw_write']:.2f} | {q['vua_set_vs_file_set_fsync']:.2f}x (+ fsync); "
        f"{q['vua_set_vs_file_set']:.2f}x (own) | {q['vua_set_vs_raw_write']:.2f}x |",
        f"| get, page cache warm | {g['vua_get_warm']:.2f} | {g['file_get_warm']:.2f} | - "
        f"| memcpy {g['memcpy']:.2f}; raw read {g['raw_read_warm']:.2f} | {q['vua_get_warm_vs_file']:.2f}x "
        f"| {q['vua_get_warm_vs_memcpy']:.2f}x memcpy; {q['vua_get_warm_vs_raw_read']:.2f}x raw read |",
    ]
    if "vua_get_cold" in g:
        lines.append(
            f"| get, cold | {g['vua_get_cold']:.2f} | {g['file_get_cold']:.2f} | - | raw read {g['raw_read_cold']:.2f} "
            f"| {q['vua_get_cold_vs_file']:.2f}x | {q['vua_get_cold_vs_raw_read']:.2f}x raw read |"
        )
    per = max(r["pages_per_call"])
    lines += [
        "",
        f"| per call ({per} pages), ms | VUA | HiCacheFile |",
        "|---|---|---|",
        f"| batch_exists | {c['vua_exists']:.2f} | {c['file_exists']:.2f} |",
        f"| set | {c['vua_set']:.0f} | {c['file_set']:.0f} (+ fsync: {c['file_set_fsync']:.0f}) |",
        f"| get, warm | {c['vua_get_warm']:.0f} | {c['file_get_warm']:.0f} |",
    ]
    if "vua_get_cold" in c:
        lines.append(f"| get, cold | {c['vua_get_cold']:.0f} | {c['file_get_cold']:.0f} |")
    lines += ["", "| target | ratio | status |", "|---|---|---|"]
    for name, x in r["targets"].items():
        lines.append(f"| {name} | {x['ratio']:.2f}x | {'met' if x['met'] else '**MISSED**'} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM"


def file_system(path: str) -> str:
    """The type of the mount holding ``path`` (as VUA itself tells a shared root apart)."""
    return file_system_type(path) or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 MiB of pages, 2 repeats")
    parser.add_argument("--pages", type=int, help="pages stored and loaded (default: 1 GiB of them; --quick: 64 MiB)")
    parser.add_argument("--page-size", type=int, default=64, help="tokens a page (default 64)")
    parser.add_argument("--layers", type=int, default=32, help="layers (default 32, Llama-3-8B)")
    parser.add_argument(
        "--layout", default="page_first", choices=("layer_first", "page_first", "page_first_direct"), help="host layout"
    )
    parser.add_argument("--repeat", type=int, help="rounds (default 3; --quick: 2)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold gets")
    parser.add_argument("--root", help="measure on this directory's file system (default: a temp dir on local disk)")
    parser.add_argument("--out", default="bench_out", help="folder for bench_sglang.json")
    args = parser.parse_args(argv)
    page_bytes = args.layers * 2 * args.page_size * HEADS * HEAD_DIM * DTYPE.itemsize
    if args.pages is None:
        args.pages = max(1, round((64 * 2**20 if args.quick else 2**30) / page_bytes))
    args.repeat = args.repeat or (2 if args.quick else 3)
    if args.page_size < 4 or args.pages < 1 or args.repeat < 1:
        parser.error("--page-size must be at least 4 (VUA's minimum), --pages and --repeat at least 1")
    if args.root is not None:
        os.makedirs(args.root, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="vua-bench-sglang-", dir=args.root)
    index_parent = tempfile.mkdtemp(prefix="vua-bench-sglang-index-")  # VUA's index on local disk, as a node keeps it
    try:
        import sglang

        results = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "file_system": file_system(workdir),
            "sglang": sglang.__version__,
            "torch": torch.__version__,
            "repeat": args.repeat,
            "workload": {
                "pages": args.pages,
                "page_size": args.page_size,
                "layers": args.layers,
                "layout": args.layout,
                "page_bytes": page_bytes,
                "nbytes": args.pages * page_bytes,
            },
            "hicache_file_fsyncs": False,  # sglang/srt/mem_cache/hicache_storage.py HiCacheFile.set: tofile + os.replace
        }
        results.update(measure(args, workdir, index_parent))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(index_parent, ignore_errors=True)
    summarise(results)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_sglang.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    print("\nHiCacheFile's own set does not fsync (tofile, then os.replace): it returns before the bytes are on disk.")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
