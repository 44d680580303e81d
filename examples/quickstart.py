"""A store-and-restore walk-through of VUA's core API.

Stores the KV cache of a 4,096-token prompt shaped like a small Llama model's, then asks
for prompts that share all, part and none of it, printing what came back and how long
each step took.

    uv run examples/quickstart.py [--cache-dir DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from vua.core import VUA, VUAConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="store root (default: a temporary directory, removed afterwards)")
    parser.add_argument("--device", default="cpu", help="where restored tensors go (default: cpu)")
    args = parser.parse_args()
    root = args.cache_dir or tempfile.mkdtemp(prefix="vua-quickstart-")

    layers, kv_heads, head_dim, tokens_n = 16, 8, 64, 4096
    config = VUAConfig(split_factor=256, namespace="quickstart/llama-shaped/bf16")
    vua = VUA(config, root)
    print(f"store at {root}: split_factor={config.split_factor}, namespace={config.namespace!r}")

    prompt = torch.randint(0, 32_000, (1, tokens_n))
    kv = [
        (
            torch.randn(1, kv_heads, tokens_n, head_dim, dtype=torch.bfloat16),
            torch.randn(1, kv_heads, tokens_n, head_dim, dtype=torch.bfloat16),
        )
        for _ in range(layers)
    ]
    size_mib = sum(k.nbytes + v.nbytes for k, v in kv) / 2**20

    started = time.perf_counter()
    written = vua.put(prompt, kv)
    print(
        f"put     {tokens_n} tokens, {size_mib:.0f} MiB of KV: {written} groups written, durable, "
        f"in {1e3 * (time.perf_counter() - started):.1f} ms"
    )

    cases = {
        "same prompt": prompt,
        "prompt + 700 new tokens": torch.cat([prompt, torch.randint(0, 32_000, (1, 700))], dim=1),
        "first 3,000 tokens kept, the last 1,096 new": torch.cat(
            [prompt[:, :3000], torch.randint(0, 32_000, (1, 1096))], dim=1
        ),
        "unrelated prompt": torch.randint(0, 32_000, (1, tokens_n)),
    }
    for name, query in cases.items():
        started = time.perf_counter()
        hit = vua.get_closest(query, device=args.device)
        ms = 1e3 * (time.perf_counter() - started)
        if hit is None:
            print(f"get     {name}: nothing stored ({ms:.2f} ms)")
            continue
        n = hit.tokens.shape[-1]
        exact = all(
            torch.equal(k, ok[:, :, :n].to(k.device)) and torch.equal(v, ov[:, :, :n].to(v.device))
            for (k, v), (ok, ov) in zip(hit.data, kv)
        )
        print(
            f"get     {name}: {n} of {query.shape[-1]} tokens restored to {hit.data[0][0].device}, "
            f"{len(hit.data)} layers of {tuple(hit.data[0][0].shape)}, identical to what was put: {exact} ({ms:.1f} ms)"
        )

    vua.close()
    if args.cache_dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
