"""One process of SGLang with VUA as its HiCache storage: real host pools, SGLang's own backend factory.

    .sglang-venv/bin/python -m tests.sglang.run_backend '{"op": "put", "root": ..., ...}'

Run by tests/test_sglang.py in the SGLang environment (tests/sglang/env.py). Builds the
device and host pools SGLang builds (on the CPU, pin_memory=False), fills the host pool with
random bytes from a seed, creates VUAStorage through ``StorageBackendFactory.create_backend
("dynamic", ...)`` (wrapped in SGLang's fault injector when its environment variables are
set) and registers the host pool as SGLang's controller does. Then, by ``op``:

- ``put``: stores ``pages`` pages under a chain of page keys (batch_set_v1, or batch_set of
  flat pages with ``"flat": true``);
- ``get``: asks how many of ``keys`` are stored and loads them into fresh pages of the pool
  (batch_exists, then batch_get_v1 or batch_get);
- ``"freeze": true`` with ``put`` or ``get``: the store's file opens hang during the call (as
  on a frozen network file system), then answer again; says whether the pool's pages stayed
  as they were (get) and stores what they held at the call (put) although SGLang reuses them;
- ``controller``: a backup and a prefetch of three pages through SGLang's HiCacheController
  (its storage threads, a gloo group of one).

``"runs": [{...}, ...]`` does several, each with its own arguments over the common ones, in
one process. Prints one JSON line (a list for ``runs``): keys, per page a SHA-256 of its KV in a layout-independent order (per
layer K then V, each (heads, page, dim)), the results, the fragments' paths and the
backend's metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.INFO)  # SGLang's chatter; VUA's warnings still show on stderr

import torch  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from tests.helpers import frozen_file_system, wait_until  # noqa: E402
from tests.sglang.probe import PAGE, mha_pools, mla_pools, storage_config  # noqa: E402
from vua.sglang._pages import PageViews, page_tokens  # noqa: E402


def page_keys(count: int, seed: int) -> list[str]:
    """SGLang-style keys: SHA-256 chained over each page's token ids (little-endian uint32)."""
    keys, prior = [], b""
    for page in range(count):
        tokens = [(seed * 7919 + page * PAGE + i) % 50000 for i in range(PAGE)]
        prior = hashlib.sha256(prior + b"".join(t.to_bytes(4, "little") for t in tokens)).digest()
        keys.append(prior.hex())
    return keys


def page_digest(pages: PageViews, start: int) -> str:
    digest = hashlib.sha256()
    for layer in range(pages.layers):
        for t in pages.model_layer(start, layer):
            digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def flat_digest(flat: torch.Tensor) -> str:
    return hashlib.sha256(flat.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def make_backend(args: dict, host, mla: bool):
    extra = args.get("extra_config") or {  # a config as the docs give it, or this one
        "backend_name": "vua",
        "module_path": "vua.sglang",
        "class_name": "VUAStorage",
        "root": args["root"],
        "index_path": args["index"],
        **({"interface_v1": 1} if not args.get("flat") else {}),
        **args.get("extra", {}),
    }
    config = dataclasses.replace(
        storage_config(mla),  # SGLang's config as the probe builds it, made this run's
        tp_rank=args.get("tp_rank", 0),
        tp_size=args.get("tp_size", 1),
        is_page_first_layout=args["layout"] == "page_first",
        model_name="test/model",
        extra_config=extra,
    )
    backend = StorageBackendFactory.create_backend("dynamic", config, host)
    backend.register_mem_pool_host(host)  # as HiCacheController does right after
    return backend


def through_controller(args: dict) -> dict:
    """A backup and a prefetch of three pages through SGLang's HiCacheController and its storage threads."""
    import torch.distributed as dist
    from sglang.srt.runtime_context import get_parallel

    from tests.sglang.probe_controller import round_trip

    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    get_parallel().override_permanently(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1, attn_dcp_rank=0)
    extra = {
        "backend_name": "vua",
        "module_path": "vua.sglang",
        "class_name": "VUAStorage",
        "interface_v1": 1,
        "root": args["root"],
        "index_path": args["index"],
    }
    ctrl = round_trip("dynamic", extra)  # exits non-zero unless backup and prefetch are bit-exact
    backend = ctrl.storage_backend
    stats = backend.get_stats()
    ctrl.detach_storage_backend()
    dist.destroy_process_group()
    return {"backend": type(backend).__name__, "vua": stats.vua.as_dict()}


def _inner_store(backend):
    return getattr(backend, "_backend", backend)._store  # SGLang's fault injector wraps it


def frozen_get(args: dict, backend, pages: PageViews, keys, indices, starts) -> dict:
    """batch_get_v1 while the store's file opens hang; the pages are looked at again after the late read."""
    before = [page_digest(pages, s) for s in starts]
    store = _inner_store(backend)
    with frozen_file_system(args["root"]) as answer:
        started = time.monotonic()
        got = list(backend.batch_get_v1(keys, indices))
        seconds = time.monotonic() - started
        answer.set()  # the file system answers again: the late read goes on, into staging alone
        late_read = wait_until(lambda: store.stats().groups_loaded >= len(keys))
    untouched = [page_digest(pages, s) for s in starts] == before
    return {"got": got, "seconds": seconds, "late_read_done": late_read, "pages_untouched": untouched}


def frozen_put(args: dict, backend, raw, pages: PageViews, keys, indices, starts) -> dict:
    """batch_set_v1 while every open under the root hangs; SGLang reuses the pages once it has returned."""
    at_call = [page_digest(pages, s) for s in starts]
    store = _inner_store(backend)
    with frozen_file_system(args["root"], every_open=True) as answer:
        started = time.monotonic()
        stored = list(backend.batch_set_v1(keys, indices))
        seconds = time.monotonic() - started
        raw.copy_(torch.randint(-(2**15), 2**15, raw.shape, dtype=torch.int16))  # other pages' bytes now
        answer.set()  # the late write goes on, from its own copy
        late_write = wait_until(lambda: store.stats().groups_saved >= len(keys))
    return {"stored": stored, "seconds": seconds, "late_write_done": late_write, "pages": at_call}


def run_once(args: dict) -> dict:
    """One backend on fresh pools of ``args["layout"]``, doing ``args["op"]``."""
    mla = args["kind"] == "mla"
    _, host = (mla_pools if mla else mha_pools)(args["layout"])
    torch.manual_seed(args.get("seed", 0))
    raw = host.kv_buffer.view(torch.int16)
    raw.copy_(torch.randint(-(2**15), 2**15, raw.shape, dtype=torch.int16))
    backend = make_backend(args, host, mla)
    pages = PageViews(host)
    out: dict = {"wrapped": type(backend).__name__}
    if args["op"] == "put":
        keys = page_keys(args["pages"], args.get("seed", 0))
        indices = host.alloc(len(keys) * PAGE)
        starts = [int(indices[i * PAGE]) for i in range(len(keys))]
        if args.get("flat"):
            flats = [host.get_data_page(s, flat=True) for s in starts]
            out["stored"] = [bool(backend.batch_set(keys, flats))] * len(keys)
            out["pages"] = [flat_digest(f) for f in flats]
        elif args.get("freeze"):
            out.update(frozen_put(args, backend, raw, pages, keys, indices, starts))
        else:
            out["stored"] = list(backend.batch_set_v1(keys, indices))
            out["pages"] = [page_digest(pages, s) for s in starts]
        out["keys"] = keys
        inner = getattr(backend, "_backend", backend)  # SGLang's fault injector wraps it
        store = inner._flat.store if args.get("flat") else inner._store
        out["paths"] = [store.config.tokens_to_paths(row)[0] for row in page_tokens(keys, PAGE)]
        out["namespace"] = store.config.namespace
    else:
        keys = args["keys"]
        out["exists"] = backend.batch_exists(keys)
        indices = host.alloc(len(keys) * PAGE)
        starts = [int(indices[i * PAGE]) for i in range(len(keys))]
        if args.get("flat"):
            targets = [host.get_dummy_flat_data_page() for _ in keys]
            got = backend.batch_get(keys, targets)
            out["got"] = [g is not None for g in got]
            out["pages"] = [flat_digest(g) if g is not None else None for g in got]
        elif args.get("freeze"):
            out.update(frozen_get(args, backend, pages, keys, indices, starts))
        else:
            out["got"] = list(backend.batch_get_v1(keys, indices))
            out["pages"] = [page_digest(pages, s) if ok else None for s, ok in zip(starts, out["got"])]
    stats = backend.get_stats()
    out["metrics"] = {
        "prefetch_pgs": sum(stats.prefetch_pgs),
        "backup_pgs": sum(stats.backup_pgs),
        "vua": None if getattr(stats, "vua", None) is None else stats.vua.as_dict(),
    }
    backend.close()
    return out


def main() -> None:
    args = json.loads(sys.argv[1])
    if args["op"] == "controller":
        print(json.dumps(through_controller(args)))
    elif "runs" in args:  # several in one process: SGLang's import costs seconds
        print(json.dumps([run_once({**args, **run}) for run in args.pop("runs")]))
    else:
        print(json.dumps(run_once(args)))


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    sys.exit(main())
