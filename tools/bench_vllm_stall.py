"""Does loading a stored prefix stall a vLLM server? Decoding streams beside long loads, healthy, slow and hung storage.

    python3 tools/bench_vllm_stall.py            # 9 servers, about 12 minutes on 2 cores
    python3 tools/bench_vllm_stall.py --quick    # 7 servers: no slow GlusterFS

Serves the random Llama of tools/bench_vllm_serve.py (6 layers, hidden 512, fp32) with
``vllm serve`` from the engine environment, vLLM's own prefix cache off (every hit is VUA's).
In each configuration, ``--streams`` requests decode side by side (short prompts, 800
tokens each by default, streamed, decoding until after the last load: their inter-token
latency is what other users feel), and meanwhile
``--loads`` requests arrive, one every ``--gap`` seconds, each a stored document of
``--document`` tokens plus a question of its own (their time to first token is what the
store buys). Configurations, one server each:

- decoders alone (no loads: the inter-token latency with nothing else going on); no
  connector, computing each document; no connector with vLLM's own prefix cache holding
  every document (the best a store can do: the KV already in the engine's memory);
- a warm store on local disk: ``load_mode`` "layerwise" (within the step) and "async";
- the store on the project's GlusterFS volume (tests/glusterfs.py), its brick servers
  answering ``--running`` seconds of every second (stopped the rest: overloaded servers): this code's
  asynchronous loads, and the code of ``--before`` (a commit before asynchronous loads:
  layer-wise loads with no deadline);
- that volume's brick servers stopped (SIGSTOP) for the whole run: asynchronous loads (the
  code before stalled every request for GlusterFS's 42 s ping timeout).

The store is filled once per root by a pass that computes every document. Reported per
configuration: the loads' p50/p99 time to first token, the decoders' p50/p99 inter-token
latency, and the VUA counters (hit tokens, loads cut at their deadline). Targets: with a
warm store, the decoders' p99 inter-token latency within 10% of vLLM's warm prefix cache
(async: loading costs the others nothing beyond what the requests' own tokens cost); on
hung storage no load request slower than its deadline plus the time to compute it (the no
connector row). Output: a table and ``OUT/bench_vllm_stall.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.glusterfs import GlusterVolume  # noqa: E402
from tools import bench_vllm_serve as serve  # noqa: E402

SPLIT = 256
LOAD_TIMEOUT = 2.0  # the connector's default deadline
ITL_TARGET = 0.10  # decoders' p99 inter-token latency beside warm loads, over the same KV in vLLM's memory


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def stream(port: int, model: str, prompt: list[int], tokens: int) -> tuple[float, list[float]]:
    """One streamed completion: (seconds to the first token, gaps between the later ones)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    body["stream"] = True
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    arrivals = []
    for line in response:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            arrivals.append(time.monotonic())
    conn.close()
    if not arrivals:
        raise RuntimeError("no tokens streamed")
    return arrivals[0] - started, [b - a for a, b in zip(arrivals, arrivals[1:])]


def workload(port: int, model: str, args: argparse.Namespace, documents: list[list[int]], loads: bool) -> dict:
    """The decoding streams, and (with ``loads``) the document requests arriving among them."""
    rng = random.Random(3)
    results: dict[str, list] = {"ttft": [], "itl": [], "errors": []}

    def decoder(i: int) -> None:
        try:
            _, gaps = stream(port, model, [rng.randrange(3, 32000) for _ in range(48)], args.decode_tokens)
            results["itl"].extend(gaps)
        except Exception as exc:  # reported, and the run is marked
            results["errors"].append(repr(exc))

    def loader(doc: list[int], question: list[int]) -> None:
        try:
            ttft, _ = stream(port, model, doc + question, 4)
            results["ttft"].append(ttft)
        except Exception as exc:
            results["errors"].append(repr(exc))

    threads = [threading.Thread(target=decoder, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the decoders are running
    if loads:
        for i in range(args.loads):
            doc = documents[i % len(documents)]
            question = [rng.randrange(3, 32000) for _ in range(24)]
            t = threading.Thread(target=loader, args=(doc, question))
            t.start()
            threads.append(t)
            time.sleep(args.gap)
    for t in threads:
        t.join()
    return results


def fill(port: int, model: str, documents: list[list[int]], store: str | None) -> None:
    """Computes every document once so the store (or vLLM's own prefix cache) holds it; waits for the fragments."""
    for doc in documents:
        stream(port, model, doc + [5, 6, 7], 1)
    if store is None:
        return
    groups = len(documents) * (len(documents[0]) // SPLIT)
    deadline = time.monotonic() + 300
    while count_fragments(store) < groups:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the store holds {count_fragments(store)} of {groups} groups after 300 s")
        time.sleep(0.5)


def count_fragments(store: str) -> int:
    count = 0
    for top, _, files in os.walk(store):
        count += "kv.safetensors" in files and top != store
    return count


def start(
    python: str, model: str, store: str | None, extra: dict, work: str, label: str, document: int, *, cache=False
) -> tuple:
    """A server (no connector without ``store``; vLLM's own prefix cache with ``cache``); its process and port."""
    port = serve.free_port()
    args = argparse.Namespace(prefix=document, suffix=64, output=96, batched=2048, kv_cache_tokens=4 * document + 4096)
    log_path = os.path.join(work, f"server-{label.replace(' ', '-').replace(',', '')}.log")
    # Each node's index on its local disk, as docs/many-nodes.md says: the shared root may hang.
    index = os.path.join(work, "index-" + ("local" if store is None or store.startswith(work) else "shared"))
    config = None if store is None else {"vua_root": store, "index_path": index, "split_factor": SPLIT, **extra}
    return serve.start_server(python, model, port, config, args, log_path, prefix_caching=cache), port


def summary(results: dict, before: dict, after: dict) -> dict:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        "ttft_p50_s": percentile(results["ttft"], 50),
        "ttft_p99_s": percentile(results["ttft"], 99),
        "itl_p50_ms": None if not results["itl"] else 1e3 * percentile(results["itl"], 50),
        "itl_p99_ms": None if not results["itl"] else 1e3 * percentile(results["itl"], 99),
        "itl_mean_ms": None if not results["itl"] else 1e3 * statistics.fmean(results["itl"]),
        "loads": len(results["ttft"]),
        "errors": results["errors"],
        "vua_hit_tokens": delta.get("vllm:vua_hit_tokens_total", 0.0),
        "vua_loads_timed_out": delta.get("vllm:vua_loads_timed_out_total", 0.0),
        "vua_loads_failed": delta.get("vllm:vua_loads_failed_total", 0.0),
    }


def drop_page_cache() -> None:
    """Empties this machine's page cache (root): what the FUSE client cached is read from the bricks again."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


def old_code(commit: str, work: str) -> str:
    """A directory holding the ``vua`` package of ``commit`` (for --vua-path)."""
    target = os.path.join(work, f"vua-{commit}")
    os.makedirs(target, exist_ok=True)
    archive = subprocess.run(["git", "-C", REPO, "archive", commit, "vua"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="local roots and the hung volume only")
    parser.add_argument("--streams", type=int, default=4, help="decoding requests side by side (default 4)")
    parser.add_argument(
        "--decode-tokens", type=int, default=800, help="tokens each decoder generates: past the last load (default 800)"
    )
    parser.add_argument("--loads", type=int, default=6, help="document requests per configuration (default 6)")
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between document requests (default 1.5)")
    parser.add_argument("--document", type=int, default=4096, help="tokens per stored document (default 4096)")
    parser.add_argument("--documents", type=int, default=3, help="distinct documents (default 3)")
    parser.add_argument(
        "--running", type=float, default=0.05, help="seconds of each second the slow bricks answer (default 0.05)"
    )
    parser.add_argument("--before", default="b51dc93", help="the commit whose synchronous loads are compared")
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    began = time.monotonic()
    python = serve.engine_python()
    work = tempfile.mkdtemp(prefix="vua-bench-stall-")
    model = os.path.join(work, "model")
    env = serve.engine_env()
    subprocess.run([python, os.path.join(serve.ENGINE, "make_model.py"), model, "--size", "serve"], check=True, env=env)
    subprocess.run([python, serve.__file__, "--_tokenizer", model], check=True, env=env)
    rng = random.Random(1)
    documents = [[rng.randrange(3, 32000) for _ in range(args.document)] for _ in range(args.documents)]
    rows: dict[str, dict] = {}

    def run(
        label: str, store: str | None, extra: dict, *, loads: bool = True, fill_first: bool = False, cache=False
    ) -> None:
        proc, port = start(python, model, store, extra, work, label, args.document, cache=cache)
        try:
            if fill_first:
                fill(port, model, documents, store)
            stream(port, model, list(range(3, 303)), 2)  # first-time allocations
            before = serve.scrape(port)
            results = workload(port, model, args, documents, loads)
            time.sleep(1.5)
            rows[label] = summary(results, before, serve.scrape(port))
        finally:
            serve.stop_server(proc)
        serve.log(f"{label}: {rows[label]}")

    local = os.path.join(work, "store")
    os.makedirs(local)
    run("decoders alone", None, {}, loads=False)
    run("no connector", None, {})
    # The best a store can do: the documents' KV already in the engine's memory.
    run("vLLM's prefix cache, warm", None, {}, fill_first=True, cache=True)
    run("local, layerwise", local, {"load_mode": "layerwise"}, fill_first=True)
    run("local, async", local, {})
    volume = GlusterVolume.create()
    try:
        shared = os.path.join(volume.node_a, "store")
        os.makedirs(shared)
        volume.set("network.ping-timeout", "300")  # only VUA's deadline ends a wait
        proc, port = start(python, model, shared, {}, work, "filling the shared store", args.document)
        try:
            fill(port, model, documents, shared)
        finally:
            serve.stop_server(proc)
        if not args.quick:
            slow = f"GlusterFS slow ({args.running:.0%} answering)"  # of each second
            pause = 1.0 - args.running  # of every second
            for label, path in (
                (f"{slow}, async", None),
                (f"{slow}, before ({args.before})", old_code(args.before, work)),
            ):
                serve.VUA_PATH = path  # the servers import this copy of vua (None: this checkout's)
                drop_page_cache()  # the fragments are read from the bricks, not this machine's cache
                with volume.slowed(stopped=pause, running=args.running):
                    run(label, shared, {})
            serve.VUA_PATH = None
        proc, port = start(python, model, shared, {}, work, "GlusterFS hung, async", args.document)
        try:
            stream(port, model, list(range(3, 303)), 2)
            before = serve.scrape(port)
            volume.freeze()
            try:
                results = workload(port, model, args, documents, True)
            finally:
                volume.thaw()
            time.sleep(1.5)
            rows["GlusterFS hung, async"] = summary(results, before, serve.scrape(port))
        finally:
            serve.stop_server(proc)
    finally:
        volume.destroy()

    in_memory = rows["vLLM's prefix cache, warm"]["itl_p99_ms"]
    lines = [
        "| configuration | loads' TTFT p50 / p99 (s) | decoders' ITL p50 / p99 (ms) | VUA hit tokens | loads cut |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        ttft = "-" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}"
        itl = "-" if r["itl_p50_ms"] is None else f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}"
        lines.append(f"| {label} | {ttft} | {itl} | {r['vua_hit_tokens']:.0f} | {r['vua_loads_timed_out']:.0f} |")
    async_itl = rows["local, async"]["itl_p99_ms"]
    compute = rows["no connector"]["ttft_p99_s"]
    hung = rows["GlusterFS hung, async"]["ttft_p99_s"]
    targets = {
        "warm async p99 ITL within 10% of vLLM's warm prefix cache": async_itl <= in_memory * (1 + ITL_TARGET),
        "hung store: no load slower than deadline + compute": hung <= LOAD_TIMEOUT + compute,
        "no request failed": not any(r["errors"] for r in rows.values()),
    }
    report = "\n".join(lines) + "\n\n" + "\n".join(f"- {k}: {'met' if v else 'missed'}" for k, v in targets.items())
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_vllm_stall.json"), "w") as f:
        json.dump(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                "settings": vars(args),
                "rows": rows,
                "targets": targets,
                "seconds": time.monotonic() - began,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
