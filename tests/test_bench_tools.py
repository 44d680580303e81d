"""The benchmark tools run and report what their docs say, on small sizes (speed is not tested here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchVllmFsTest(unittest.TestCase):
    """``tools/bench_vllm_fs.py --quick``: VUA beside vLLM's native fs tier, 1.5 MiB of KV."""

    def test_quick_run_reports_throughput_and_faults(self):
        # Looked for, not imported: importing vLLM takes ten seconds, and the run does it anyway.
        if importlib.util.find_spec("vllm") is None:
            self.skipTest("vLLM is not installed (uv sync --group test)")
        with tempfile.TemporaryDirectory() as out:
            argv = ["--quick", "--tokens", "96", "--layers", "2", "--split-factor", "32", "--repeat", "1"]
            done = subprocess.run(
                [sys.executable, os.path.join(REPO, "tools", "bench_vllm_fs.py"), *argv, "--out", out],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"},
            )
            self.assertEqual(done.returncode, 0, done.stderr[-3000:])
            with open(os.path.join(out, "bench_vllm_fs.json")) as f:
                results = json.load(f)

        self.assertEqual(
            results["workload"],
            {
                "tokens": 96,
                "layers": 2,
                "split": 32,
                "blocks": 6,
                "block_bytes": 2 * 2 * 16 * 8 * 128 * 2,
                "nbytes": 6 * 131072,
            },
        )
        expected = {"vllm_store", "vllm_store_fsync", "vua_put", "vllm_load", "vua_get"}
        self.assertLessEqual(expected, set(results["GBps"]))
        self.assertEqual(results["o_direct"], "vllm_load_buffered" in results["GBps"])
        for name, gbps in results["GBps"].items():
            self.assertGreater(gbps, 0, name)
            self.assertEqual(len(results["seconds"][name]), 1, name)

        faults = {(r["system"], r["fault"]): r for r in results["faults"]}
        names = list(results["fault_descriptions"])
        self.assertEqual(len(names), 4)
        self.assertEqual(set(faults), {(s, f) for s in ("vLLM native", "VUA") for f in names})
        for fault in names:
            row = faults[("VUA", fault)]
            self.assertEqual(row["verdict"], "exact or shorter", row)
            # The middle of three groups was damaged: the first comes back, exact.
            self.assertTrue(row["detail"].startswith("1 of 3 groups (32 tokens), exact"), row)
        # vLLM's tier checks nothing but a file's length: the flipped byte comes back unnoticed.
        self.assertEqual(faults[("vLLM native", "flipped byte")]["verdict"], "wrong bytes")
        self.assertEqual(faults[("vLLM native", "truncated file")]["verdict"], "error")
        # The table on the terminal has both tables.
        self.assertIn("| store (GB/s) |", done.stdout)
        self.assertIn("| fault | vLLM native | VUA |", done.stdout)


class BenchSGLangTest(unittest.TestCase):
    """``tools/bench_sglang.py --quick``: VUA beside SGLang's HiCacheFile on one host pool's pages, 64 MiB."""

    def test_quick_run_reports_both_backends_and_the_targets(self):
        from tests.sglang import env

        reason = env.unsupported_reason()
        if reason:
            self.skipTest(reason)
        try:
            python = env.python()  # builds .sglang-venv on first use, as tests/test_sglang.py does
        except RuntimeError as exc:
            self.skipTest(f"the SGLang environment could not be built: {exc}")
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run(
                [python, os.path.join(REPO, "tools", "bench_sglang.py"), "--quick", "--no-cold", "--out", out],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.assertEqual(done.returncode, 0, done.stdout[-2000:] + done.stderr[-3000:])
            with open(os.path.join(out, "bench_sglang.json")) as f:
                results = json.load(f)

        page_bytes = 32 * 2 * 64 * 8 * 128 * 2  # Llama-3-8B-shaped, bf16, page_size 64: 8 MiB
        self.assertEqual(
            results["workload"],
            {
                "pages": 8,
                "page_size": 64,
                "layers": 32,
                "layout": "page_first",
                "page_bytes": page_bytes,
                "nbytes": 8 * page_bytes,
            },
        )
        self.assertEqual((results["repeat"], results["cold_method"]), (2, "off"))
        expected = {"raw_write", "vua_set", "file_set", "file_set_fsync", "memcpy", "raw_read_warm"}
        expected |= {"vua_get_warm", "file_get_warm"}
        self.assertEqual(set(results["GBps"]), expected)
        for name, gbps in results["GBps"].items():
            self.assertGreater(gbps, 0, name)
            self.assertEqual(len(results["seconds"][name]), 2, name)
        for name in ("vua_exists", "file_exists", "vua_get_warm", "file_get_warm", "vua_set"):
            self.assertGreater(results["per_call_ms"][name], 0, name)
        self.assertEqual(
            set(results["targets"]),
            {"VUA's durable set >= 0.7x the raw write", "VUA's get >= HiCacheFile's (warm)"},
        )
        self.assertIn("| set |", done.stdout)
        self.assertIn("| batch_exists |", done.stdout)
        self.assertIn("does not fsync", done.stdout)


if __name__ == "__main__":
    unittest.main()
