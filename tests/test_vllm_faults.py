"""The vLLM connector when the store slows down or stops answering: nothing the engine waits on lacks a deadline.

The real vLLM scheduler and the connector through vLLM's factory (tests/test_vllm.py's
harness); the fault is the one injected: opens of fragments (and, for a scheduler whose index
lacks the groups, the tree's existence checks) block, as threads inside a frozen GlusterFS or
a hard NFS mount do, until the test lets the file system answer. tests/test_glusterfs_serve.py
freezes a real GlusterFS volume under a real vllm serve.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import unittest
from unittest import mock

import torch

from tests.helpers import frozen_file_system, wait_until

try:
    from vllm import SamplingParams
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request, RequestStatus

    from tests.test_vllm import LAYERS, NUM_BLOCKS, ConnectorHarness, ConnectorTestCase
except ImportError as exc:  # vllm installs on Linux with Python >= 3.11 only
    raise unittest.SkipTest(f"vllm is not installed here: {exc}") from None

PROMPT = list(range(100, 200))  # 100 tokens: three groups of 32 stored


class HungStoreTest(ConnectorTestCase):
    def harness(self, **extra) -> ConnectorHarness:
        settings = {"load_timeout": 0.3, "load_timeout_per_gib": 0, "unhealthy_seconds": 60}
        return super().harness(extra_config={**settings, **extra})

    def stored(self, h: ConnectorHarness) -> None:
        h.request("a", PROMPT)
        h.step(compute={"a": 1})
        self.assertEqual(h.worker.vua.prefix_length(torch.tensor(PROMPT)), 96)

    def loads_over(self, h: ConnectorHarness) -> dict[str, int]:
        """The worker's load counters since the last report."""
        stats = h.worker.get_kv_connector_stats()
        data = stats.data if stats is not None else {}
        return {name: data.get(name, 0) for name in ("loads_timed_out", "loads_failed", "lookups_skipped")}

    def test_a_hung_store_costs_a_load_its_deadline_and_other_requests_nothing(self):
        h = self.harness()
        self.stored(h)
        scheduler = h.scheduler
        with self.assertLogs("vua", level="WARNING") as logs, frozen_file_system(self.root) as answer:
            h.request("b", PROMPT)  # a hit: its load starts and hangs in open()
            _, meta, _, _ = h.step(flush=False)
            self.assertEqual([load.req_id for load in meta.loads], ["b"])
            self.assertEqual(scheduler.requests["b"].status, RequestStatus.WAITING_FOR_REMOTE_KVS)
            # A request that needs no stored KV runs meanwhile, step after step.
            h.request("c", list(range(5000, 5040)))
            _, _, blocks, _ = h.step(compute={"c": 2}, flush=False, commit=True)
            self.assertIn("c", blocks)
            self.assertEqual(scheduler.requests["c"].num_computed_tokens, 40)
            self.assertEqual(scheduler.requests["b"].status, RequestStatus.WAITING_FOR_REMOTE_KVS)
            # Past the deadline: b is reported failed and vLLM computes it.
            time.sleep(0.35)
            _, _, blocks, _ = h.step(compute={"b": 1}, flush=False, commit=True)
            self.assertEqual(scheduler.requests["b"].num_computed_tokens, len(PROMPT))
            over = self.loads_over(h)
            self.assertEqual((over["loads_timed_out"], over["loads_failed"]), (1, 1))
            b_blocks = blocks["b"]
            # The late read, once the file system answers, lands nothing in b's blocks.
            computed = {name: h.positions(name, b_blocks, 0, 96).clone() for name in LAYERS}
            loaded_before = h.worker.vua.stats().groups_loaded
            answer.set()
            self.assertTrue(wait_until(lambda: h.worker.vua.stats().groups_loaded > loaded_before))
            h.worker.flush()  # the load thread is done
            for name in LAYERS:
                self.assertTrue(torch.equal(h.positions(name, b_blocks, 0, 96), computed[name]), name)
        self.assertIn("passed its deadline", "\n".join(logs.output))
        self.assertIn("is not answering", "\n".join(logs.output))

    def test_while_unhealthy_loads_and_lookups_are_skipped_then_tried_again(self):
        h = self.harness(unhealthy_seconds=0.5)
        self.stored(h)
        connector = h.scheduler.get_kv_connector()
        with self.assertLogs("vua", level="WARNING"), frozen_file_system(self.root):
            h.request("b", PROMPT)
            h.step(flush=False)
            time.sleep(0.35)
            h.step(compute={"b": 1}, flush=False, commit=True)  # cut at its deadline
            stats = h.worker.get_kv_connector_stats()
            self.assertEqual(stats.data["loads_timed_out"], 1)
            self.assertEqual(stats.data["unhealthy_periods"], 1)
            # As vLLM hands the workers' stats to the scheduler: its lookups are skipped too.
            connector.update_connector_output(KVConnectorOutput(kv_connector_stats=stats))
            asked = Request("d", PROMPT, SamplingParams(), None)
            self.assertEqual(connector.get_num_new_matched_tokens(asked, 0), (0, False))
        # Once unhealthy_seconds have passed, the store is asked again and answers.
        time.sleep(0.6)
        again = Request("e", PROMPT, SamplingParams(), None)
        self.assertEqual(connector.get_num_new_matched_tokens(again, 0), (96, True))

    def test_the_scheduler_never_waits_for_a_lookup(self):
        # Another node's scheduler on the same root, started before the prompt was stored: its
        # own index lacks the groups, so its lookup checks the tree, and those checks hang.
        index_b = tempfile.mkdtemp(prefix="vua-index-b-")
        self.addCleanup(shutil.rmtree, index_b, ignore_errors=True)
        other = self.harness(index_path=index_b, network_fs=True)  # the lookup is bounded on shared roots
        self.stored(self.harness())
        connector = other.scheduler.get_kv_connector()
        with self.assertLogs("vua", level="WARNING") as logs, frozen_file_system(self.root, probes=True):
            request = Request("q", PROMPT, SamplingParams(), None)
            self.assertEqual(connector.get_num_new_matched_tokens(request, 0), (None, False))  # vLLM asks again
            time.sleep(0.55)  # past lookup_timeout (0.5 s)
            self.assertEqual(connector.get_num_new_matched_tokens(request, 0), (0, False))  # a miss
            fresh = Request("r", PROMPT, SamplingParams(), None)
            self.assertEqual(connector.get_num_new_matched_tokens(fresh, 0), (0, False))  # skipped at once
        self.assertIn("the scheduler's lookup took over", "\n".join(logs.output))

    def test_a_request_aborted_while_loading_gets_nothing_written_after_its_blocks_are_freed(self):
        h = self.harness(load_timeout=60)
        self.stored(h)
        scheduler = h.scheduler
        with frozen_file_system(self.root) as answer:
            h.request("b", PROMPT)
            h.step(flush=False)
            self.assertEqual(scheduler.requests["b"].status, RequestStatus.WAITING_FOR_REMOTE_KVS)
            held = {
                b.block_id for b in scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks["b"]
            }
            scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
            # vLLM keeps the blocks until the workers report the load over, which the next step does.
            h.step(flush=False)
            self.assertNotIn("b", scheduler.requests)
            h.poison_free_blocks()  # as another request reusing them would
            answer.set()
            h.worker.flush()  # the late read is over
        for name in LAYERS:
            for block in held:
                self.assertTrue(torch.isnan(h.caches[name][block].float()).all(), (name, block))
        self.assertLess(len(held), NUM_BLOCKS)

    def test_saves_past_the_queue_bound_drop_the_oldest_with_a_warning(self):
        # The fault: fsyncs that wait, as on a store that writes slower than the engine computes.
        h = self.harness(save_queue_bytes=1)  # one save waiting at most
        real_fsync = os.fsync
        writing, release = threading.Event(), threading.Event()

        def slow_fsync(fd):
            writing.set()
            release.wait(60)
            real_fsync(fd)

        prompts = {f"p{i}": list(range(1000 * (i + 1), 1000 * (i + 1) + 40)) for i in range(3)}
        with self.assertLogs("vua.vllm", level="WARNING") as logs, mock.patch.object(os, "fsync", slow_fsync):
            for i, (req_id, prompt) in enumerate(prompts.items()):
                h.request(req_id, prompt)
                h.step(compute={req_id: i}, flush=False, commit=True)  # p0 is written, p1 waits, p2 replaces it
                self.assertTrue(writing.wait(60))  # p0's write is under way
            self.assertEqual(h.worker.get_kv_connector_stats().data["saves_dropped"], 1)
            release.set()
            h.worker.flush()
        self.assertIn("1 prompt saves dropped", "\n".join(logs.output))
        stored = {req_id: h.worker.vua.prefix_length(torch.tensor(p)) for req_id, p in prompts.items()}
        self.assertEqual(stored, {"p0": 32, "p1": 0, "p2": 32})


logging.getLogger("vllm").setLevel(logging.ERROR)

if __name__ == "__main__":
    unittest.main()
