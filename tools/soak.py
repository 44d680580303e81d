"""Soak a shared store from two nodes: put, read, evict and re-put the same prompts at once.

    uv run tools/soak.py ROOT_A ROOT_B [--seconds 300]

ROOT_A and ROOT_B are the same store as two nodes see it (two mounts of one network file
system; or one local directory twice). Each node is its own process with its own index on
local disk. For the whole run both nodes put and read a fixed set of prompts that share
stems; node A also runs a tree-wide gc to half the set's size every couple of seconds, with
no grace period, so groups are evicted and re-published under the readers' feet. Every
hit is checked byte for byte against KV recomputed from its tokens.

Passes (exit 0) when no node process crashed or raised, no byte was wrong, and at the end
every prompt, put once more, is read in full and exact from both nodes. Prints one JSON
summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import random
import sys
import tempfile
import time

import torch

from vua import _evict
from vua._index import Index
from vua.core import VUA, VUAConfig

SPLIT = 16
NAMESPACE = "soak"


def prompts() -> list[torch.Tensor]:
    """Prompts of 4 to 12 groups on three stems, so prefixes are shared across prompts."""
    rng = random.Random(7)
    out = []
    for i in range(12):
        stem = torch.arange(1000 * (i % 3), 1000 * (i % 3) + 2 * SPLIT)
        tail = torch.tensor([rng.randrange(30_000) for _ in range(SPLIT * rng.randrange(2, 11))])
        out.append(torch.cat([stem, tail]))
    return out


def kv_of(
    tokens: torch.Tensor, layers: int = 2, heads: int = 2, head_dim: int = 64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV that depends on every token up to each position, as a model's does: (1, heads, n, head_dim) float32."""
    running = torch.cumsum(tokens.to(torch.float64) * 1.000001, 0) % 1e6  # (n,)
    base = running[None, None, :, None] + torch.arange(heads * head_dim, dtype=torch.float64).view(
        1, heads, 1, head_dim
    )
    return [((base + layer).float(), (base - layer).float()) for layer in range(layers)]


def exact_length(hit: object, query: torch.Tensor) -> int:
    """The hit's length when it is exactly the stored KV of a prefix of ``query``; -1 when any byte is wrong."""
    if hit is None:
        return 0
    n = hit.tokens.shape[-1]  # type: ignore[attr-defined]
    if not torch.equal(hit.tokens, query[:n]):  # type: ignore[attr-defined]
        return -1
    expected = kv_of(query[:n])
    same = all(torch.equal(k, ek) and torch.equal(v, ev) for (k, v), (ek, ev) in zip(hit.data, expected))  # type: ignore[attr-defined]
    return n if same else -1


def node(name: str, root: str, seconds: float, gc_bytes: int, results: multiprocessing.Queue) -> None:
    """One node's loop: puts and verified gets of random prompts; node A also runs gc."""
    counts = {
        "node": name,
        "puts": 0,
        "gets": 0,
        "full": 0,
        "shorter": 0,
        "misses": 0,
        "wrong": 0,
        "gc": 0,
        "errors": [],
    }
    index_dir = tempfile.mkdtemp(prefix=f"vua-soak-index-{name}-")
    store = VUA(VUAConfig(split_factor=SPLIT, namespace=NAMESPACE, index_path=index_dir), root)
    rng = random.Random(name)
    all_prompts = prompts()
    deadline = time.monotonic() + seconds
    next_gc = time.monotonic() + 2
    try:
        while time.monotonic() < deadline:
            tokens = rng.choice(all_prompts)
            if rng.random() < 0.4:
                store.put(tokens, kv_of(tokens))
                counts["puts"] += 1
            else:
                got = exact_length(store.get_closest(tokens), tokens)
                counts["gets"] += 1
                key = "wrong" if got < 0 else "misses" if got == 0 else "full" if got == len(tokens) else "shorter"
                counts[key] += 1
            if gc_bytes and time.monotonic() > next_gc:
                index = Index(index_dir, root)
                _evict.collect_garbage(root, index, gc_bytes, shared=True, grace_seconds=0.0)
                index.close()
                counts["gc"] += 1
                next_gc = time.monotonic() + 2
    except Exception as exc:  # reported, and the run fails
        counts["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        store.close()
    results.put(counts)


def final_check(root_a: str, root_b: str) -> dict[str, int]:
    """Every prompt, put once more from A, must read in full and exact from both nodes."""
    logging.getLogger("vua").setLevel(logging.ERROR)
    stores = [
        VUA(VUAConfig(split_factor=SPLIT, namespace=NAMESPACE, index_path=tempfile.mkdtemp()), root)
        for root in (root_a, root_b)
    ]
    full = {"prompts": 0, "full_on_both": 0}
    for tokens in prompts():
        stores[0].put(tokens, kv_of(tokens))
        full["prompts"] += 1
        full["full_on_both"] += all(exact_length(s.get_closest(tokens), tokens) == len(tokens) for s in stores)
    for store in stores:
        store.close()
    return full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root_a")
    parser.add_argument("root_b")
    parser.add_argument("--seconds", type=float, default=300.0)
    args = parser.parse_args(argv)
    set_bytes = sum(len(p) for p in prompts()) * 2 * 2 * 2 * 64 * 4  # upper bound: layers, K|V, heads, dim, fp32
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    nodes = [
        context.Process(target=node, args=("A", args.root_a, args.seconds, set_bytes // 2, results)),
        context.Process(target=node, args=("B", args.root_b, args.seconds, 0, results)),
    ]
    for process in nodes:
        process.start()
    reports = [results.get(timeout=args.seconds + 300) for _ in nodes]
    for process in nodes:
        process.join(60)
    exit_codes = [process.exitcode for process in nodes]
    final = final_check(args.root_a, args.root_b)
    ok = (
        exit_codes == [0, 0]
        and all(not r["errors"] and r["wrong"] == 0 for r in reports)
        and final["full_on_both"] == final["prompts"]
    )
    print(json.dumps({"ok": ok, "seconds": args.seconds, "exit_codes": exit_codes, "nodes": reports, "final": final}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
