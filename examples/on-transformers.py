"""Skip a prompt's prefill with VUA in a Hugging Face transformers loop.

Runs the same prompt twice against one store: the first time VUA has nothing, so the
model computes the whole prompt and VUA stores its KV cache; the second time VUA restores
the stored prefix and the model computes only the last few tokens. It prints the time to
first token both ways and checks that the greedy generations are identical.

By default it runs offline: a randomly initialised Llama-shaped model and a prompt made of
the text in examples/data/prompt.txt, byte by byte.

    uv run examples/on-transformers.py                       # offline, CPU
    uv run examples/on-transformers.py --device cuda         # on a GPU
    uv run examples/on-transformers.py --model Qwen/Qwen2.5-0.5B-Instruct   # a real model (needs the hub)
    uv run examples/on-transformers.py --cache-dir /mnt/kv   # keep the store between runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vua.core import VUA, VUAConfig
from vua.integrations.transformers import generate, model_namespace, prefill

HERE = os.path.dirname(os.path.abspath(__file__))


def offline_model_and_prompt(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A random Llama-shaped model (99M parameters) and a byte-level prompt."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32_000,
        max_position_embeddings=8192,
    )
    model = LlamaForCausalLM(config).to(device).eval()
    with open(os.path.join(HERE, "data", "prompt.txt"), "rb") as f:
        text = f.read()
    return model, torch.tensor(list(text), dtype=torch.long)


def hub_model_and_prompt(name: str, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype="auto").to(device).eval()
    with open(os.path.join(HERE, "data", "prompt.txt")) as f:
        text = f.read()
    return model, tokenizer(text, return_tensors="pt").input_ids[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face model name (default: an offline random Llama-shaped model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--cache-dir", help="store root (default: a temporary directory, removed afterwards)")
    parser.add_argument("--split-factor", type=int, default=256, help="tokens per stored group (default 256)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate greedily (default 16)")
    args = parser.parse_args()

    model, prompt = (
        hub_model_and_prompt(args.model, args.device) if args.model else offline_model_and_prompt(args.device)
    )
    root = args.cache_dir or tempfile.mkdtemp(prefix="vua-transformers-")
    vua = VUA(VUAConfig(split_factor=args.split_factor, namespace=model_namespace(model)), root)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: {args.model or 'random Llama-shaped'} ({params:.0f}M parameters) on {args.device}; "
        f"prompt: {prompt.numel()} tokens; store: {root}"
    )

    outputs = []
    for label in ("first run (compute, then store)", "second run (restore from VUA)"):
        result = prefill(model, vua, prompt)[0]
        print(
            f"{label}: {result.cached_tokens} tokens restored, {prompt.numel() - result.cached_tokens} computed, "
            f"time to first token {result.seconds:.2f} s, {result.stored_groups} groups stored"
        )
        outputs.append(result.seconds)
    speedup = outputs[0] / outputs[1]
    print(f"time to first token: {outputs[0]:.2f} s -> {outputs[1]:.2f} s ({speedup:.1f}x faster)")

    started = time.perf_counter()
    with torch.no_grad():
        plain = model.generate(prompt[None].to(args.device), max_new_tokens=args.new_tokens, do_sample=False)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    restored = generate(model, vua, prompt, max_new_tokens=args.new_tokens)[0]
    restored_s = time.perf_counter() - started
    same = torch.equal(plain, restored)
    print(
        f"greedy generation of {args.new_tokens} tokens: {plain_s:.2f} s without VUA, {restored_s:.2f} s with; "
        f"identical: {same}"
    )
    vua.close()
    if args.cache_dir is None:
        shutil.rmtree(root)
    if not same:
        raise SystemExit("generations differ: please report this as a bug")


if __name__ == "__main__":
    main()
