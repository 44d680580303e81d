"""A probe of SGLang's HiCache storage interface on the CPU: real host pools, SGLang's file backend, raw pointers.

    .sglang-venv/bin/python -m tests.sglang.probe      (python -m tests.sglang.env builds the venv)

For MHA and MLA, in each host layout (layer_first, page_first, page_first_direct), it builds
the device pool SGLang builds (on the CPU) and the host pool beside it (pin_memory=False),
fills the host pool with random bytes, then:

1. round-trips pages through SGLang's own file backend, HiCacheFile: its v2 calls
   (batch_set_v2 / batch_get_v2 with a PoolTransfer; it has no v1 calls) and its legacy
   ones (batch_set / batch_get of flat pages), into other pages of the pool, bit-exact;
2. checks that get_page_buffer_meta's (pointer, size) pairs are exactly contiguous views of
   kv_buffer (expected_views says which, in order), then round-trips pages through those
   pointers as a zero-copy (interface_v1) backend would: bytes copied out of each pointer,
   then into the pointers of other pages, compared with the pool's own page views;
3. checks that SGLang's page hash is SHA-256 over the previous page's digest and the page's
   token ids as little-endian uint32.

Prints what it found; exits non-zero on the first mismatch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import struct
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")  # torchvision 0.16's "failed to load image extension", and the like
logging.disable(logging.WARNING)

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import (  # noqa: E402
    HiCacheFile,
    HiCacheStorageConfig,
    PoolName,
    PoolTransfer,
)
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402

LAYOUTS = ("layer_first", "page_first", "page_first_direct")
PAGE = 4
LAYERS = 3
DEVICE_TOKENS = 64
DTYPE = torch.bfloat16


def mha_pools(layout: str) -> tuple[MHATokenToKVPool, MHATokenToKVPoolHost]:
    device = MHATokenToKVPool(
        DEVICE_TOKENS,
        PAGE,
        DTYPE,
        head_num=2,
        head_dim=8,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
        start_layer=0,
        end_layer=LAYERS,
    )
    host = MHATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info,
        2.0,  # host_to_device_ratio
        0,  # host_size (GB); 0: use the ratio
        PAGE,
        layout,
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=device.size,
        start_layer=device.start_layer,
        end_layer=device.end_layer,
    )
    return device, host


def mla_pools(layout: str) -> tuple[MLATokenToKVPool, MLATokenToKVPoolHost]:
    device = MLATokenToKVPool(
        DEVICE_TOKENS,
        PAGE,
        DTYPE,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
        start_layer=0,
        end_layer=LAYERS,
    )
    host = MLATokenToKVPoolHost(
        device.get_device_pool_infos()[0].buffer_info,
        2.0,
        0,
        PAGE,
        layout,
        pin_memory=False,
        device="cpu",
        override_kv_cache_dim=device.kv_cache_dim,
        device_capacity_tokens=device.size,
        start_layer=device.start_layer,
        end_layer=device.end_layer,
        target_layer_num=device.layer_num,
    )
    return device, host


def fill_random(host) -> None:
    raw = host.kv_buffer.view(torch.int16)
    raw.copy_(torch.randint(-(2**15), 2**15, raw.shape, dtype=torch.int16))


def page_bytes(host, start: int) -> bytes:
    return host.get_data_page(start, flat=True).contiguous().view(torch.uint8).numpy().tobytes()


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"MISMATCH: {what}")


def storage_config(mla: bool) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name="probe/model",
    )


def file_backend_round_trip(host, mla: bool, root: str) -> str:
    """Pages 0..3 out through HiCacheFile, back into pages 4..7 (v2), then legacy set/get into 8..9."""
    backend = HiCacheFile(storage_config(mla), file_path=root)
    backend.register_mem_pool_host(host)
    backend.register_mem_host_pool_v2(host, PoolName.KV)
    alloc = host.alloc(10 * PAGE)
    src, dst, legacy = alloc[: 4 * PAGE], alloc[4 * PAGE : 8 * PAGE], alloc[8 * PAGE :]
    keys = [f"page{i}" for i in range(4)]
    written = backend.batch_set_v2([PoolTransfer(name=PoolName.KV, host_indices=src, keys=keys)])
    check(written == {PoolName.KV: [True] * 4}, f"batch_set_v2 returned {written}")
    check(backend.batch_exists(keys) == 4, "batch_exists after set")
    check(backend.batch_exists(keys[:2] + ["absent"] + keys[3:]) == 2, "batch_exists stops at the first miss")
    read = backend.batch_get_v2([PoolTransfer(name=PoolName.KV, host_indices=dst, keys=keys)])
    check(read == {PoolName.KV: [True] * 4}, f"batch_get_v2 returned {read}")
    for i in range(4):
        check(page_bytes(host, int(src[i * PAGE])) == page_bytes(host, int(dst[i * PAGE])), f"v2 page {i}")
    # Legacy (the 'generic' path HiCacheController uses without interface_v1): flat pages as values.
    pages = [host.get_data_page(int(src[i * PAGE]), flat=True) for i in range(2)]
    check(backend.batch_set(["legacy0", "legacy1"], pages) is True, "legacy batch_set")
    targets = [host.get_dummy_flat_data_page() for _ in range(2)]
    got = backend.batch_get(["legacy0", "legacy1"], targets)
    for i in range(2):
        host.set_from_flat_data_page(int(legacy[i * PAGE]), got[i])
        check(page_bytes(host, int(legacy[i * PAGE])) == page_bytes(host, int(src[i * PAGE])), f"legacy page {i}")
    names = sorted(os.listdir(root))
    host.free(alloc)
    return names[0]


def expected_views(host, start: int) -> list[torch.Tensor]:
    """The kv_buffer views that get_page_buffer_meta's pointers of the page at token ``start`` should be, in order."""
    kv, page = host.kv_buffer, start // PAGE
    mha = isinstance(host, MHATokenToKVPoolHost)
    if host.layout == "layer_first":
        if mha:  # K then V of each layer: (k_l0, v_l0, k_l1, v_l1, ...), each (PAGE, heads, head_dim)
            return [kv[kv_i, layer, start : start + PAGE] for layer in range(LAYERS) for kv_i in (0, 1)]
        return [kv[layer, start : start + PAGE] for layer in range(LAYERS)]  # one per layer, (PAGE, 1, dim)
    if host.layout == "page_first":
        if mha:  # K of the page, then V: each (PAGE, layers, heads, head_dim)
            return [kv[0, start : start + PAGE], kv[1, start : start + PAGE]]
        return [kv[start : start + PAGE]]  # (PAGE, layers, 1, dim)
    if mha:  # page_first_direct: each (layers, PAGE, heads, head_dim)
        return [kv[0, page], kv[1, page]]
    return [kv[page]]  # (layers, PAGE, 1, dim)


def pointer_round_trip(host) -> tuple[int, list[int]]:
    """Copy pages out through get_page_buffer_meta's pointers and into other pages' pointers."""
    alloc = host.alloc(4 * PAGE)
    src, dst = alloc[: 2 * PAGE], alloc[2 * PAGE :]
    src_ptrs, src_sizes = host.get_page_buffer_meta(src)
    dst_ptrs, dst_sizes = host.get_page_buffer_meta(dst)
    check(src_sizes == dst_sizes and len(src_ptrs) == len(dst_ptrs), "meta shapes")
    per_page = len(src_ptrs) // 2
    for p in range(2):
        chunk = slice(p * per_page, (p + 1) * per_page)
        views = expected_views(host, int(src[p * PAGE]))
        check(
            [(v.data_ptr(), v.nbytes) for v in views] == list(zip(src_ptrs[chunk], src_sizes[chunk])),
            f"page {p}: pointers are not the kv_buffer views expected for {host.layout}",
        )
        check(all(v.is_contiguous() for v in views), "a pointer's view is not contiguous")
        for a, b, n in zip(src_ptrs[chunk], dst_ptrs[chunk], src_sizes[chunk]):
            blob = ctypes.string_at(a, n)  # what a zero-copy backend would store under this pointer's key
            ctypes.memmove(b, blob, n)  # and land straight into the destination page
        check(page_bytes(host, int(dst[p * PAGE])) == page_bytes(host, int(src[p * PAGE])), f"pointer page {p}")
    host.free(alloc)
    return per_page, sorted(set(src_sizes))


def hash_check() -> None:
    tokens = list(range(100, 112))
    hashes = get_hash_str(tokens, page_size=PAGE)
    prior = b""
    for i, h in enumerate(hashes):
        ours = hashlib.sha256(prior + struct.pack(f"<{PAGE}I", *tokens[i * PAGE : (i + 1) * PAGE])).hexdigest()
        check(ours == h, f"page hash {i}")
        prior = bytes.fromhex(h)
    check(get_hash_str(tokens[:PAGE]) == hashes[0], "get_hash_str without page_size is one hash of all tokens")
    print(f"page hash: sha256(prior digest + tokens as <u32), {len(hashes)} pages chained: ok")


def main() -> None:
    torch.manual_seed(0)
    hash_check()
    for kind, build in (("MHA", mha_pools), ("MLA", mla_pools)):
        for layout in LAYOUTS:
            _, host = build(layout)
            fill_random(host)
            with tempfile.TemporaryDirectory(prefix="vua-sglang-probe-") as root:
                example = file_backend_round_trip(host, kind == "MLA", root)
            per_page, sizes = pointer_round_trip(host)
            print(
                f"{kind} {layout:17s} kv_buffer {tuple(host.kv_buffer.shape)}: HiCacheFile v2 + legacy ok "
                f"(file {example}); {per_page} pointers per page, sizes {sizes}: ok"
            )
    print("all bit-exact")


if __name__ == "__main__":
    main()
