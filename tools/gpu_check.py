"""VUA's checks that need a CUDA GPU: one line per check, a summary, exit 0 only if all pass.

    python3 tools/gpu_check.py [--tokens 4096] [--root DIR]

Runs in a few minutes on one GPU:
1. a get to the GPU equals a CPU get bit for bit;
2. a kernel launched on the current stream right after get_closest reads correct data
   (the copies are asynchronous; the stream must wait for them);
3. pinned host memory does not grow over 200 gets (torch.cuda.host_memory_stats);
4. host-to-device throughput of a warm get >= 0.7x a raw pinned-to-device copy of the
   same bytes;
5. the layer-wise load hands out correct layers on the GPU (and its speed, for information);
   word sums computed on the GPU by a put from CUDA tensors equal the host's;
6. the transformers integration gives the logits of an in-memory cache on the GPU;
7. a flipped bit in a fragment is caught by the GPU's check after the copy;
8. GPUDirect Storage reads (``gds=True``) equal a CPU get, or report why the platform
   refused them (use ``--root`` on a local disk: tmpfs and some overlays refuse O_DIRECT).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from vua import _layout
from vua._fragment import Fragment
from vua._read import _gds
from vua.core import VUA, KVDestination, VUAConfig

results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def llama_kv(tokens: int, layers: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(tokens)
    return [
        tuple(torch.randn(1, 8, tokens, 128, generator=gen).to(torch.bfloat16) for _ in range(2)) for _ in range(layers)
    ]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def best_time(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``run``, each timed from an idle GPU to an idle GPU."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--root", help="store directory (default: a temporary one)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    dev = torch.device("cuda", 0)
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    root = args.root or tempfile.mkdtemp(prefix="vua-gpu-")
    vua = VUA(VUAConfig(split_factor=256, namespace="gpu-check"), root)
    try:
        kv = llama_kv(args.tokens)
        tokens = torch.randint(0, 128_000, (1, args.tokens))
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        started = time.perf_counter()
        vua.put(tokens, kv)
        print(
            f"put {nbytes / 2**20:.0f} MiB ({args.tokens} tokens, Llama-3-8B shape, bf16) in "
            f"{time.perf_counter() - started:.2f} s",
            flush=True,
        )

        # 1. GPU result equals CPU result.
        cpu = vua.get_closest(tokens, device="cpu")
        gpu = vua.get_closest(tokens, device=dev)
        torch.cuda.synchronize()
        equal = all(same(a, b) for pa, pb in zip(cpu.data, gpu.data) for a, b in zip(pa, pb))
        check(
            "gpu equals cpu",
            equal and gpu.data[0][0].device.type == "cuda",
            f"{len(gpu.data)} layers x (K, V) {tuple(gpu.data[0][0].shape)} on {gpu.data[0][0].device}",
        )
        del gpu

        # 2. No race: consume on the current stream right after the call returns.
        races = 0
        for _ in range(20):
            hit = vua.get_closest(tokens, device=dev)
            last = hit.data[-1][1].clone()  # queued behind the asynchronous copies, or racing them
            first = hit.data[0][0][:, :, :256].clone()
            torch.cuda.synchronize()
            races += not (same(last, cpu.data[-1][1]) and same(first, cpu.data[0][0][:, :, :256]))
            del hit
        check("no race on the current stream", races == 0, f"{races} of 20 reads saw incomplete data")

        # 3. Pinned host memory stays flat.
        small = tokens[:, :1024]

        def pinned() -> int:
            stats = torch.cuda.host_memory_stats()
            keys = [k for k in stats if "bytes" in k and k.endswith("current") and "reserved" in k]
            keys = keys or [k for k in stats if "bytes" in k and k.endswith("current")]
            return int(stats[keys[0]]) if keys else -1

        for _ in range(10):
            vua.get_closest(small, device=dev)
        torch.cuda.synchronize()
        before = pinned()
        for _ in range(200):
            vua.get_closest(small, device=dev)
        torch.cuda.synchronize()
        after = pinned()
        check(
            "pinned memory flat over 200 gets",
            0 < before and after <= before,
            f"{before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB pinned (torch.cuda.host_memory_stats)",
        )

        # 4. Throughput against a raw pinned-to-device copy of the same bytes.
        raw_src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        raw_dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        raw = gbps(nbytes, best_time(lambda: raw_dst.copy_(raw_src, non_blocking=True), 5))
        raw_src = raw_dst = None  # give the memory back
        got = gbps(nbytes, best_time(lambda: vua.get_closest(tokens, device=dev), 5))
        check(
            "warm get to GPU >= 0.7x raw H2D",
            got >= 0.7 * raw,
            f"{got:.1f} GB/s vs raw pinned->device {raw:.1f} GB/s ({got / raw:.2f}x)",
        )
        times = []
        for _ in range(3):
            started = time.perf_counter()
            hit = vua.get_closest(tokens, device="cpu")
            times.append(time.perf_counter() - started)
            del hit
        src = torch.cat([t.reshape(-1) for pair in kv for t in pair])
        dst = torch.empty_like(src)
        dst.copy_(src)
        started = time.perf_counter()
        dst.copy_(src)
        memcpy = gbps(nbytes, time.perf_counter() - started)
        print(
            f"info  warm get to CPU on this host: {gbps(nbytes, min(times)):.1f} GB/s (memcpy {memcpy:.1f} GB/s)",
            flush=True,
        )
        del src, dst

        # 5. Layer-wise load.
        load = vua.load(tokens, dev, layerwise=True)
        ok = True
        for i in range(len(kv)):
            k, v = load.wait_layer(i)
            k2, v2 = k.clone(), v.clone()
            ok &= same(k2, cpu.data[i][0]) and same(v2, cpu.data[i][1])
        check(
            "layer-wise load on the GPU",
            ok and load.wait() == args.tokens // 256,
            f"{len(kv)} layers, each consumed as it landed",
        )
        layerwise = gbps(nbytes, best_time(lambda: vua.load(tokens, dev, layerwise=True).wait(), 3))
        print(f"info  layer-wise load to GPU: {layerwise:.1f} GB/s", flush=True)

        # 5a. Layer-wise into paged blocks of the caller's (vLLM's path): (blocks, 16, heads, dim)
        # per layer, blocks in reverse order, so every view is strided and out of token order.
        class Paged(KVDestination):
            def __init__(self) -> None:
                heads, dim = kv[0][0].shape[1], kv[0][0].shape[3]
                self.blocks = args.tokens // 16
                shape = (self.blocks, 16, heads, dim)
                self.kv = [
                    (torch.empty(shape, dtype=k.dtype, device=dev), torch.empty(shape, dtype=k.dtype, device=dev))
                    for k, _ in kv
                ]

            def chunks(self, group: int, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
                k, v = self.kv[layer]
                ids = [self.blocks - 1 - b for b in range(group * 16, (group + 1) * 16)]
                return [(k[b].transpose(0, 1), v[b].transpose(0, 1)) for b in ids]

        paged = Paged()
        load = vua.load(tokens, dev, layerwise=True, into=paged)
        ok = all(load.wait_layer_groups(i) == args.tokens // 256 for i in range(len(kv)))
        order = [paged.blocks - 1 - b for b in range(paged.blocks)]
        for i, (k, v) in enumerate(paged.kv):
            for got, want in ((k, cpu.data[i][0]), (v, cpu.data[i][1])):
                ok &= same(got[order].flatten(0, 1).transpose(0, 1)[None], want)
        check("layer-wise load into paged blocks on the GPU", ok and load.wait() == args.tokens // 256, "exact")
        into = gbps(nbytes, best_time(lambda: vua.load(tokens, dev, layerwise=True, into=paged).wait(), 3))
        print(f"info  layer-wise load into paged blocks (vLLM's path): {into:.1f} GB/s", flush=True)

        # 5b. Word sums computed on the GPU (a put from CUDA tensors) equal the host's.
        gpu_root = os.path.join(root, "from-gpu")
        with VUA(VUAConfig(split_factor=256, namespace="gpu-check"), gpu_root) as store:
            store.put(tokens, [(k.to(dev), v.to(dev)) for k, v in kv])
            keys = store.config.tokens_to_paths(tokens)
            agree = 0
            for key in keys:
                with (
                    Fragment(_layout.fragment_path(gpu_root, key)) as a,
                    Fragment(_layout.fragment_path(root, key)) as b,
                ):
                    agree += a.wordsums is not None and a.wordsums == b.wordsums
            hit = store.get_closest(tokens, device=dev)
            equal = all(same(a, b) for pa, pb in zip(cpu.data, hit.data) for a, b in zip(pa, pb))
            del hit
        check(
            "word sums from a GPU put equal the host's",
            agree == len(keys) and equal,
            f"{agree} of {len(keys)} groups agree; the store reads back bit-equal: {equal}",
        )

        # 6. transformers on the GPU.
        try:
            from transformers import LlamaConfig, LlamaForCausalLM

            from vua.integrations.transformers import model_namespace, prefill

            torch.manual_seed(0)
            model = (
                LlamaForCausalLM(
                    LlamaConfig(
                        hidden_size=256,
                        intermediate_size=512,
                        num_hidden_layers=2,
                        num_attention_heads=4,
                        num_key_value_heads=2,
                        vocab_size=1000,
                    )
                )
                .to(dev)
                .eval()
            )
            store = VUA(VUAConfig(split_factor=64, namespace=model_namespace(model)), os.path.join(root, "hf"))
            prompt = torch.randint(0, 1000, (300,))
            prefill(model, store, prompt)
            warm = prefill(model, store, prompt)[0]
            n = warm.cached_tokens
            with torch.no_grad():
                # The stored KV came from the first, full-prompt forward: crop that in memory.
                own = model(prompt[None].to(dev), use_cache=True).past_key_values
                own.crop(n - 300)  # drop the last 300 - n positions
                expected = model(prompt[None, n:].to(dev), past_key_values=own).logits
                full = model(prompt[None].to(dev)).logits[:, n:]
            diff = (warm.logits - full).abs().max().item()
            check(
                "transformers restore on the GPU",
                n == 256 and torch.equal(warm.logits, expected),
                f"{n} of 300 tokens restored; logits equal to an in-memory cache's; max diff to a full recompute {diff:.2e}",
            )
            store.close()
        except ImportError as exc:
            print(f"skip  transformers: {exc}")

        # 7. The GPU's own check of each group (its word sum) catches damage.
        damaged_root = os.path.join(root, "damaged")
        with VUA(VUAConfig(split_factor=256, namespace="gpu-check"), damaged_root) as store:
            three = tokens[:, :768]
            small_kv = [(k[:, :, :768], v[:, :, :768]) for k, v in kv]
            store.put(three, small_kv)
            path = _layout.fragment_path(damaged_root, store.config.tokens_to_paths(three)[1])
            with open(path, "r+b") as f:
                f.seek(-4096, os.SEEK_END)
                byte = f.read(1)
                f.seek(-4096, os.SEEK_END)
                f.write(bytes([byte[0] ^ 0x01]))
            hit = store.get_closest(three, device=dev)
            ok = hit is not None and hit.tokens.shape[-1] == 256
            ok = ok and all(same(a, b[:, :, :256]) for pa, pb in zip(hit.data, small_kv) for a, b in zip(pa, pb))
            check("gpu word sums catch a flipped bit", ok, "group 1 of 3 damaged: 256 tokens returned, all correct")

        # 8. GPUDirect Storage, where the platform has it.
        with VUA(VUAConfig(split_factor=256, namespace="gpu-check", gds=True), root) as store:
            hit = store.get_closest(tokens, device=dev)
            equal = all(same(a, b) for pa, pb in zip(cpu.data, hit.data) for a, b in zip(pa, pb))
            del hit
            speed = gbps(nbytes, best_time(lambda: store.get_closest(tokens, device=dev), 3))
            fallback = _gds._disabled_reason  # set when the platform refused a direct read
            detail = f"{speed:.1f} GB/s, bit-equal to the CPU get: {equal}"
            if not _gds.usable() and fallback is None:
                print(f"skip  GPUDirect Storage: torch has no cuFile support; {detail} via staging", flush=True)
            elif fallback is not None:
                print(f"skip  GPUDirect Storage refused here ({fallback}); {detail} via staging", flush=True)
                check("gds fallback correct", equal, detail)
            else:
                check("gds reads equal cpu", equal, detail + " (direct reads skip the page cache)")
    finally:
        vua.close()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    failed = [name for name, ok, _ in results if not ok]
    print(
        f"summary: {len(results) - len(failed)} passed, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
