"""SGLang's HiCacheController on the CPU, with a gloo group of one, and a `dynamic` zero-copy backend.

    .sglang-venv/bin/python -m tests.sglang.probe_controller

The controller gets what a scheduler would hand it: an allocator whose get_kvcache() is the
device pool, the host pool, and a gloo process group of size 1 (get_parallel() is stated with
override_permanently, as nothing publishes a parallel config outside an engine). Its storage
threads then run for real: a backup of three pages (write_storage, then ack_backup_queue), and
a prefetch of them into other host pages, where this script plays the scheduler's part
(prefetch_hit_queue -> host_indices -> prefetch_buffer, then ack_prefetch_queue), bit-exact.
Twice: with SGLang's file backend (the generic page path), then with PointerDictBackend below,
loaded as `dynamic` with interface_v1 (the zero-copy path: batch_exists, batch_set_v1,
batch_get_v1 with host indices and get_page_buffer_meta's pointers).
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import threading
import warnings

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402
from sglang.srt.managers.cache_controller import HiCacheController  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402
from sglang.srt.runtime_context import get_parallel  # noqa: E402

from tests.sglang.probe import PAGE, check, fill_random, mha_pools, page_bytes  # noqa: E402


class PointerDictBackend(HiCacheStorage):
    """A zero-copy backend in a dict: each page's (pointer, size) ranges stored as bytes."""

    def __init__(self, storage_config, kwargs):
        self.constructed_with = (storage_config, kwargs)
        self.suffix = f"_{storage_config.model_name}_{storage_config.tp_rank}_{storage_config.tp_size}"
        self.pages: dict[str, list[bytes]] = {}
        self.calls: list[str] = []

    def _meta(self, keys, host_indices):
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        per = len(ptrs) // len(keys)
        return [
            (k + self.suffix, ptrs[i * per : (i + 1) * per], sizes[i * per : (i + 1) * per]) for i, k in enumerate(keys)
        ]

    def batch_set_v1(self, keys, host_indices, extra_info=None):
        self.calls.append("batch_set_v1")
        for key, ptrs, sizes in self._meta(keys, host_indices):
            self.pages[key] = [ctypes.string_at(p, n) for p, n in zip(ptrs, sizes)]
        return [True] * len(keys)

    def batch_get_v1(self, keys, host_indices, extra_info=None):
        self.calls.append("batch_get_v1")
        results = []
        for key, ptrs, sizes in self._meta(keys, host_indices):
            chunks = self.pages.get(key)
            if chunks is None or [len(c) for c in chunks] != list(sizes):
                results.append(False)
                continue
            for p, c in zip(ptrs, chunks):
                ctypes.memmove(p, c, len(c))
            results.append(True)
        return results

    def batch_exists(self, keys, extra_info=None):
        self.calls.append("batch_exists")
        for i, k in enumerate(keys):
            if k + self.suffix not in self.pages:
                return i
        return len(keys)

    def exists(self, key):
        return key + self.suffix in self.pages

    # The abstract legacy calls; the controller never calls them with interface_v1 set.
    def get(self, key, target_location=None, target_sizes=None):
        raise NotImplementedError

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        raise NotImplementedError

    def set(self, key, value=None, target_location=None, target_sizes=None):
        raise NotImplementedError

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        raise NotImplementedError


class _Allocator:
    def __init__(self, device_pool):
        self.device_pool = device_pool

    def get_kvcache(self):
        return self.device_pool


def round_trip(backend: str, extra_config: dict) -> HiCacheController:
    device, host = mha_pools("page_first")
    fill_random(host)
    group = dist.new_group([0], backend="gloo")
    ctrl = HiCacheController(
        _Allocator(device),
        host,
        PAGE,
        group,
        threading.Event(),
        io_backend="direct",
        storage_backend=backend,
        model_name="probe-model",
        storage_backend_extra_config=extra_config,
    )
    tokens = list(range(1000, 1000 + 3 * PAGE))
    src = host.alloc(3 * PAGE)
    op_id = ctrl.write_storage(src, tokens, hash_value=get_hash_str(tokens, page_size=PAGE))
    done = ctrl.ack_backup_queue.get(timeout=60)
    check(done.id == op_id and done.completed_tokens == len(tokens), f"{backend}: backup")
    ctrl.prefetch("req-1", tokens)
    hit = ctrl.prefetch_hit_queue.get(timeout=60)  # the scheduler's part from here
    check(hit.storage_hit_count == len(tokens), f"{backend}: hit query found {hit.storage_hit_count}")
    hit.host_indices = host.alloc(hit.storage_hit_count)
    ctrl.prefetch_buffer.put(hit)
    acks = []
    while not acks or not acks[-1][1]:
        ack = ctrl.ack_prefetch_queue.get(timeout=60)
        acks.append((ack.completed_tokens, ack.completed_req))
    check(acks[0][0] == len(tokens), f"{backend}: prefetch acks {acks}")
    for i in range(3):
        check(
            page_bytes(host, int(src[i * PAGE])) == page_bytes(host, int(hit.host_indices[i * PAGE])),
            f"{backend}: page {i}",
        )
    print(
        f"{backend}: {type(ctrl.storage_backend).__name__}, page_get_func={ctrl.page_get_func.__name__}, "
        f"backup + prefetch of 3 pages bit-exact, acks {acks}"
    )
    return ctrl


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    get_parallel().override_permanently(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1, attn_dcp_rank=0)
    with tempfile.TemporaryDirectory(prefix="vua-sglang-ctrl-") as root:
        ctrl = round_trip("file", {"file_storage_path": root})
        print("  files:", sorted(os.listdir(root))[0], "...")
        ctrl.detach_storage_backend()
    extra = {
        "backend_name": "vua-probe",
        "module_path": "tests.sglang.probe_controller",
        "class_name": "PointerDictBackend",
        "interface_v1": 1,
    }
    ctrl = round_trip("dynamic", extra)
    config, kwargs = ctrl.storage_backend.constructed_with
    print(f"  dynamic constructor got ({type(config).__name__}, {kwargs!r}); extra_config {config.extra_config}")
    print(f"  calls: {sorted(set(ctrl.storage_backend.calls))}")
    ctrl.detach_storage_backend()
    dist.destroy_process_group()
    print("controller ok")


if __name__ == "__main__":
    sys.exit(main())
