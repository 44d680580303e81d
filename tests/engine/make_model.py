"""Saves a small randomly initialised Llama (no hub: built from a config) for the engine tests and bench.

    python tests/engine/make_model.py DIR [--size tiny|bench|serve] [--sliding-window N]

``tiny`` (about 2M parameters, 2 layers) keeps the engine tests quick on two cores;
``bench`` (about 150M parameters, 12 layers) is the model ``tools/bench_vllm.py`` times;
``serve`` (about 56M parameters, 6 layers, hidden 512) the one ``tools/bench_vllm_serve.py``
serves under load.
Weights are drawn with a wide spread so greedy decoding has clear winners: the tests
compare generated token ids, and a near-uniform distribution would let the last bit of
a float decide between two tokens.
"""

from __future__ import annotations

import argparse

SIZES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "bench": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4
    ),
    "serve": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument(
        "--sliding-window",
        type=int,
        default=None,
        help="a hybrid model: every other layer (the first, third, ...) attends to this many tokens",
    )
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096 if args.size == "tiny" else 32000,
        max_position_embeddings=16384,
        initializer_range=0.2,
        torch_dtype="float32",
        **SIZES[args.size],
    )
    if args.sliding_window:
        # vLLM's Llama reads per-layer attention kinds from layer_types (as Gemma 3 and
        # gpt-oss configs have them) and gives each kind its own KV cache group.
        config.layer_types = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)
        ]
        config.sliding_window = args.sliding_window
    model = LlamaForCausalLM(config)
    model.save_pretrained(args.dir, safe_serialization=True)
    print(sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    main()
