"""One vLLM engine in this process, on the CPU: runs token-id prompts and writes what came out as JSON.

Run by tests/test_engine.py (and tools/bench_vllm.py) with the engine environment's Python
(see tests/engine/env.py), never imported by the main suite:

    python tests/engine/run_engine.py --model DIR --prompts P.json --out R.json [--store ROOT] ...

P.json is a list of prompts, each a list of token ids, run in order, one ``generate`` call
each unless ``--together``. R.json: per prompt its generated token ids, ``num_cached_tokens``
and seconds; the VUA counters vLLM's Prometheus metrics show; and, with ``--stop-after-last``,
nothing more happens after the last prompt (the engine is shut down at once).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model directory (config.json and weights)")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    parser.add_argument("--out", required=True, help="where to write the results (JSON)")
    parser.add_argument("--store", help="a VUA root: run with the VUA connector on it (else without one)")
    parser.add_argument("--index-path", help="the store's index directory (a node's own, beside a shared root)")
    parser.add_argument("--split-factor", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--together", action="store_true", help="one generate call for all prompts")
    parser.add_argument(
        "--prefix-caching", action="store_true", help="vLLM's own prefix cache on (off by default: every hit is VUA's)"
    )
    parser.add_argument("--upstream-names", action="store_true", help="VUAStorageConnector_V1 + shared_storage_path")
    parser.add_argument("--kv-cache-gib", default="1", help="vLLM's CPU KV cache space (VLLM_CPU_KVCACHE_SPACE)")
    args = parser.parse_args()

    # Set before vLLM is imported; its engine processes inherit them.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = args.kv_cache_gib
    # vllm-cpu keeps one core for its scheduler, and one more when a KV connector is set; on
    # a small machine that gives engines with and without the connector different numbers of
    # compute cores (on two cores: two against one), so their speeds would not compare and
    # their float sums would run in another order. The same reservation for every engine.
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"

    # Imported here so --help works without vLLM.
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    transfer = None
    if args.store:
        if args.upstream_names:  # the original project's names, found through vLLM's plugin entry point
            transfer = KVTransferConfig(
                kv_connector="VUAStorageConnector_V1",
                kv_role="kv_both",
                kv_load_failure_policy="recompute",
                kv_connector_extra_config={"shared_storage_path": args.store, "split_factor": args.split_factor},
            )
        else:
            transfer = KVTransferConfig(
                kv_connector="VUAConnector",
                kv_role="kv_both",
                kv_connector_module_path="vua.vllm",
                kv_load_failure_policy="recompute",  # a group that fails verification is computed
                kv_connector_extra_config={
                    "vua_root": args.store,
                    "split_factor": args.split_factor,
                    **({"index_path": args.index_path} if args.index_path else {}),
                },
            )
    started = time.perf_counter()
    llm = LLM(
        model=args.model,
        skip_tokenizer_init=True,
        dtype=args.dtype,
        seed=0,
        enforce_eager=True,
        enable_prefix_caching=args.prefix_caching,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=8,
        kv_transfer_config=transfer,
        disable_log_stats=False,
    )
    startup = time.perf_counter() - started
    with open(args.prompts) as f:
        prompts = json.load(f)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, detokenize=False, ignore_eos=True)
    results = []
    batches = [prompts] if args.together else [[p] for p in prompts]
    for batch in batches:
        t = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        seconds = time.perf_counter() - t
        for output in outputs:
            results.append(
                {
                    "token_ids": list(output.outputs[0].token_ids),
                    "num_cached_tokens": output.num_cached_tokens,
                    "seconds": seconds,
                }
            )
    metrics = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:vua_"):
            metrics[metric.name] = metrics.get(metric.name, 0) + getattr(metric, "value", 0)
    with open(args.out, "w") as f:
        hybrid = not llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
        json.dump(
            {"results": results, "metrics": metrics, "startup_seconds": startup, "hybrid_kv_cache_manager": hybrid}, f
        )
    llm.llm_engine.engine_core.shutdown()  # what a server does on SIGTERM: pending saves get their bound
    os._exit(0)  # nothing else runs after the engine is gone (no interpreter teardown waiting on threads)


if __name__ == "__main__":
    main()
