"""The vLLM connector against the real vllm package: its configs, scheduler, requests and factory.

No GPU: the paged KV caches are CPU tensors in the layouts vLLM hands connectors, and the
forward pass is simulated by writing known KV into a request's blocks before saving.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import unittest
from importlib.metadata import entry_points
from unittest import mock

import torch

from tests.helpers import (
    TINY_DECODER,
    counting_host_word_sums,
    flip_byte,
    fragment_path,
    fragment_word_sums,
    run_cli,
)
from vua.core import VUA, VUAConfig
from vua.errors import InvalidInputError, VUAError

# vLLM reports its own choices at INFO and WARNING (the hybrid KV cache manager turned off,
# the connector API being experimental, no compiled CUDA ops on a CPU machine); those are
# facts about vLLM, not test results, so the suite's output keeps only failures.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
for _name in ("vllm", "torch"):
    logging.getLogger(_name).setLevel(logging.ERROR)

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry
    from transformers import LlamaConfig
    from vllm import SamplingParams
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole, supports_hma
    from vllm.plugins import load_general_plugins
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        MambaSpec,
        MLAAttentionSpec,
        SlidingWindowSpec,
    )
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    from vua.vllm import PagedLayer, VUAConnector, VUAConnectorMetadata, VUAConnectorStats
except ImportError as exc:  # vllm installs on Linux with Python >= 3.11 only
    raise unittest.SkipTest(f"vllm is not installed here: {exc}") from None

BLOCK = 16
SPLIT = 32
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
NUM_BLOCKS = 64


class ConnectorHarness:
    """A real vLLM scheduler (which builds the scheduler-side connector through vLLM's
    factory) and a worker-side connector over CPU paged caches.

    With ``sliding_window``, a hybrid model: layer 0 full attention, layer 1 a sliding
    window, each its own KV cache group (vLLM's hybrid KV cache manager); ``batched``
    caps the tokens of a step, so long prompts are prefilled in chunks.
    """

    def __init__(
        self,
        root: str,
        model_dir: str,
        *,
        dtype=torch.bfloat16,
        mla=False,
        physical_bnhc=False,
        split=SPLIT,
        auth_key_file=None,
        extra_config=None,
        connector="VUAConnector",
        module_path="vua.vllm",
        sliding_window=None,
        batched=None,
        groups=None,
        load_failure_policy="recompute",
        prefix_caching=False,
        load_mode="async",
    ):
        heads, head = (1, 576) if mla else (2, 16)
        extra = {"vua_root": root, "split_factor": split, "load_mode": load_mode}
        if auth_key_file:
            extra["auth_key_file"] = auth_key_file
        extra.update(extra_config or {})
        self.vllm_config = VllmConfig(
            model_config=ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=1024),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching),
            kv_transfer_config=KVTransferConfig(
                kv_connector=connector,
                kv_role="kv_both",
                kv_connector_module_path=module_path,
                kv_connector_extra_config=extra,
                kv_load_failure_policy=load_failure_policy,
            ),
            device_config=DeviceConfig(device="cpu"),
        )
        self.vllm_config.cache_config.num_gpu_blocks = NUM_BLOCKS  # what profiling the GPU would set
        if batched:
            self.vllm_config.scheduler_config.max_num_batched_tokens = batched
        spec_cls = MLAAttentionSpec if mla else FullAttentionSpec
        spec = spec_cls(block_size=BLOCK, num_kv_heads=heads, head_size=head, dtype=dtype)
        if groups is None and sliding_window:
            window = SlidingWindowSpec(
                block_size=BLOCK, num_kv_heads=heads, head_size=head, dtype=dtype, sliding_window=sliding_window
            )
            groups = [KVCacheGroupSpec(LAYERS[:1], spec), KVCacheGroupSpec(LAYERS[1:], window)]
        self.kv_cache_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=groups or [KVCacheGroupSpec(LAYERS, spec)]
        )
        self.group_of = {
            name: g for g, group in enumerate(self.kv_cache_config.kv_cache_groups) for name in group.layer_names
        }
        self.blocks: dict[str, list[list[int]]] = {}  # per request, its blocks per KV cache group
        self.scheduler = Scheduler(
            self.vllm_config, self.kv_cache_config, StructuredOutputManager(self.vllm_config), block_size=BLOCK
        )
        self.worker = KVConnectorFactory.create_connector(
            self.vllm_config, KVConnectorRole.WORKER, self.kv_cache_config
        )
        # As vLLM's engine core sets requests up: block hashes are what its prefix cache matches.
        hash_fn = get_hash_fn_by_name(self.vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self.block_hasher = get_request_block_hasher(BLOCK, hash_fn)
        content = 576 if mla else 2 * head
        self.caches = {}
        for name in LAYERS:
            if physical_bnhc:  # memory order [blocks, block_size, heads, content], viewed as [B, H, N, C]
                cache = torch.zeros(NUM_BLOCKS, BLOCK, heads, content, dtype=dtype).permute(0, 2, 1, 3)
            else:
                cache = torch.zeros(NUM_BLOCKS, heads, BLOCK, content, dtype=dtype)
            self.caches[name] = cache
        if len(self.kv_cache_config.kv_cache_groups) > 1:
            # As vLLM lays out a hybrid model: one layer of each group shares one tensor, so a
            # block a group frees and another takes is overwritten for both layers.
            self.caches[LAYERS[1]] = self.caches[LAYERS[0]]
        self.worker.register_kv_caches(self.caches)

    def request(self, req_id: str, prompt: list[int]) -> Request:
        request = Request(req_id, prompt, SamplingParams(max_tokens=4), None, block_hasher=self.block_hasher)
        self.scheduler.add_request(request)
        return request

    def step(self, compute: dict[str, int] | None = None, *, flush: bool = True, commit: bool = False):
        """One scheduler step and the worker side of one forward pass.

        ``compute`` maps request ids to a seed: the simulated model writes KV derived from
        it into the positions it computes, before the connector saves them. ``commit``
        hands the step's outcome back to the scheduler (a sampled token where a prompt is
        done), which is when vLLM frees blocks that fell out of a sliding window.

        An asynchronous load that a step starts is waited for (with ``flush``) and reported
        to the scheduler, which admits its request in the next step, as vLLM does: that step
        runs too, and the metadata returned holds both steps' loads and saves.
        """
        output, meta, errors, loads_over = self._one_step(compute, flush=flush, commit=commit)
        if loads_over:
            output, second, more, _ = self._one_step(compute, flush=flush, commit=commit)
            meta = VUAConnectorMetadata(loads=meta.loads + second.loads, saves=meta.saves + second.saves)
            errors = errors | more
        return output, meta, {r: groups[0] for r, groups in self.blocks.items()}, errors

    def _one_step(self, compute, *, flush, commit):
        output = self.scheduler.schedule()
        meta = output.kv_connector_metadata
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        computing = {}  # request -> (first, end) of the positions this step computes
        for req in output.scheduled_new_reqs:
            self.blocks[req.req_id] = [list(group) for group in req.block_ids]
            computing[req.req_id] = (req.num_computed_tokens, req.num_computed_tokens)
        cached = output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            for group, added in zip(self.blocks[req_id], cached.new_block_ids[i] or ()):
                group.extend(added)
            computing[req_id] = (cached.num_computed_tokens[i], cached.num_computed_tokens[i])
        for name in LAYERS:
            self.worker.wait_for_layer_load(name)
            for req_id, (first, _) in computing.items():
                if compute and req_id in compute:
                    n = first + output.num_scheduled_tokens[req_id]
                    self.write_known(name, self.blocks[req_id][self.group_of[name]], first, n, compute[req_id])
            self.worker.save_kv_layer(name, self.caches[name], None)
        self.worker.wait_for_save()
        if flush:
            self.worker.flush()
        transfers = self.worker.get_transfer_results(set(output.finished_req_ids))
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        if commit or transfers.finished_recving:
            ids = list(output.num_scheduled_tokens)
            done = [
                self.scheduler.requests[r].num_computed_tokens >= self.scheduler.requests[r].num_prompt_tokens
                for r in ids
            ]
            sampled = ModelRunnerOutput(
                req_ids=ids,
                req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[7] if d and commit else [] for d in done],
                kv_connector_output=KVConnectorOutput(
                    finished_recving=transfers.finished_recving,
                    failed_recving=transfers.failed_recving,
                    invalid_block_ids=errors,
                ),
            )
            self.scheduler.update_from_output(output, sampled)
        return output, meta, errors, bool(transfers.finished_recving)

    def known(self, layer: str, seed: int, start: int, end: int) -> torch.Tensor:
        """The KV the simulated model computes for positions [start, end) of a prompt seeded ``seed``."""
        cache = self.caches[layer]
        gen = torch.Generator().manual_seed(seed * 100 + LAYERS.index(layer))
        table = torch.randn(NUM_BLOCKS * BLOCK, cache.shape[1], cache.shape[3], generator=gen)  # every position
        return table[start:end].to(cache.dtype)

    def write_known(self, layer: str, block_ids: list[int], start: int, end: int, seed: int) -> None:
        cache = self.caches[layer]
        for pos, values in zip(range(start, end), self.known(layer, seed, start, end)):
            cache[block_ids[pos // BLOCK], :, pos % BLOCK] = values

    def poison_free_blocks(self) -> None:
        """Fills every block no request holds (the null block too) with NaN, as reuse by another request would."""
        held = {
            b.block_id
            for m in self.scheduler.kv_cache_manager.coordinator.single_type_managers
            for blocks in m.req_to_blocks.values()
            for b in blocks
            if not b.is_null
        }
        for cache in self.caches.values():
            for block in set(range(NUM_BLOCKS)) - held:
                cache[block] = float("nan")

    def positions(self, layer: str, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        cache = self.caches[layer]
        return torch.stack([cache[block_ids[p // BLOCK], :, p % BLOCK] for p in range(start, end)])


class ConnectorTestCase(unittest.TestCase):
    """A tiny Llama's config saved once per class, a fresh root per test, and harnesses on it."""

    @classmethod
    def setUpClass(cls):
        cls.model_dir = tempfile.mkdtemp(prefix="vua-tiny-llama-")
        LlamaConfig(**TINY_DECODER).save_pretrained(cls.model_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.model_dir, ignore_errors=True)

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="vua-vllm-")
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def harness(self, **kwargs) -> ConnectorHarness:
        h = ConnectorHarness(self.root, self.model_dir, **kwargs)
        self.addCleanup(h.worker.shutdown)
        return h


class VLLMConnectorTest(ConnectorTestCase):
    def test_factory_loads_the_class_from_the_documented_config(self):
        h = self.harness()
        self.assertIsInstance(h.worker, VUAConnector)
        self.assertIsInstance(h.scheduler.get_kv_connector(), VUAConnector)
        ns = h.worker.vua.config.namespace
        for part in ("vua-tiny-llama-", "bfloat16", "tp0-of-1", "FullAttentionSpec-h2-d16"):
            self.assertIn(part, ns)

    def test_auth_key_file_seals_the_store(self):
        key_file, other_file = os.path.join(self.root, "secret"), os.path.join(self.root, "other")
        with open(key_file, "wb") as f:
            f.write(b"0123456789abcdef0123456789abcdef\n")
        with open(other_file, "wb") as f:
            f.write(b"another secret, sixteen bytes or more")
        self.check_round_trip(auth_key_file=key_file)  # stores, then loads through vLLM with the key
        other = self.harness(auth_key_file=other_file)
        with self.assertLogs("vua", level="WARNING"):
            self.assertIsNone(other.worker.vua.get_closest(torch.arange(100, 196), device="cpu"))
        with self.assertRaisesRegex(VUAError, "auth_key_file"):
            self.harness(auth_key_file=os.path.join(self.root, "missing"))

    def check_round_trip(self, **kwargs):
        h = self.harness(**kwargs)
        prompt = list(range(100, 200))  # 100 tokens: three groups of 32 stored
        h.request("a", prompt)
        _, meta_a, blocks, errors = h.step(compute={"a": 1})
        self.assertEqual([s.req_id for s in meta_a.saves], ["a"])
        self.assertEqual(errors, set())
        self.assertEqual(h.worker.vua.prefix_length(torch.tensor(prompt)), 96)

        h.request("b", prompt)
        _, meta_b, blocks_b, errors = h.step()
        self.assertEqual(errors, set())
        (load,) = meta_b.loads
        self.assertEqual((load.start, load.end), (0, 96))
        self.assertFalse(set(blocks_b["b"]) & set(blocks["a"]))  # another set of blocks
        for name in LAYERS:
            saved = h.positions(name, blocks["a"], 0, 96)
            loaded = h.positions(name, blocks_b["b"], 0, 96)
            self.assertTrue(torch.equal(saved.view(torch.uint8), loaded.view(torch.uint8)), name)
        return h, prompt

    def test_save_and_load_bf16(self):
        self.check_round_trip(dtype=torch.bfloat16)

    def test_save_and_load_fp16_physical_order_bnhc(self):
        self.check_round_trip(dtype=torch.float16, physical_bnhc=True)

    def test_save_and_load_fp8(self):
        self.check_round_trip(dtype=torch.float8_e4m3fn)

    def test_save_and_load_mla_latent(self):
        self.check_round_trip(dtype=torch.bfloat16, mla=True)

    def test_with_prefix_caching_only_the_groups_vllm_lacks_are_read(self):
        prompt = list(range(100, 200))  # 100 tokens: three groups of 32 stored
        first = self.harness()  # one server computes and stores the whole prompt
        first.request("a", prompt)
        _, _, blocks_a, _ = first.step(compute={"a": 1})

        # Another server on the same store, vLLM's prefix cache on, has computed a prompt
        # sharing the first 48 tokens (three blocks of 16: group 0 and half of group 1).
        h = self.harness(prefix_caching=True)
        h.request("other", prompt[:48] + list(range(900, 952)))
        h.step(compute={"other": 1}, commit=True)
        before = h.worker.vua.stats()
        h.request("b", prompt)
        _, meta, blocks, errors = h.step()
        self.assertEqual(errors, set())
        (load,) = meta.loads
        self.assertEqual((load.start, load.end), (48, 96))  # vLLM holds [0, 48)
        after = h.worker.vua.stats()
        # Groups 1 and 2 are read (group 1 holds token 48); group 0, which vLLM holds, is not
        # (before, every load read from token 0: three groups).
        self.assertEqual(after.groups_loaded - before.groups_loaded, 2)
        for name in LAYERS:
            stored = first.positions(name, blocks_a["a"], 0, 96)
            held = h.positions(name, blocks["b"], 0, 96)  # [0, 48) from vLLM's cache, the rest loaded
            self.assertTrue(torch.equal(stored.view(torch.uint8), held.view(torch.uint8)), name)

    def test_a_load_from_an_offset_checks_and_returns_only_those_groups(self):
        vua = VUA(VUAConfig(split_factor=32, namespace="offset"), self.root)
        self.addCleanup(vua.close)
        tokens = torch.arange(100, 196)
        kv = [(torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)) for _ in range(2)]
        vua.put(tokens, kv)
        load = vua.load(tokens, "cpu", offset=32)
        self.assertEqual((load.offset, load.wait()), (32, 2))
        for (k, v), (ek, ev) in zip(load.data(), kv):
            self.assertTrue(torch.equal(k, ek[:, :, 32:]) and torch.equal(v, ev[:, :, 32:]))
        other = torch.cat([tokens[:40], torch.arange(7, 63)])  # diverges inside group 1
        self.assertIsNone(vua.load(other, "cpu", offset=32))
        self.assertIsNone(vua.load(tokens, "cpu", offset=96))  # nothing stored from there on
        with self.assertRaisesRegex(VUAError, "offset=48 is not a multiple of split_factor=32.*pass 32"):
            vua.load(tokens, "cpu", offset=48)

    def test_word_sums_are_computed_where_the_cache_lives(self):
        # A CUDA cache does this by default; gpu_checksums: true makes a CPU cache take the
        # same path: save_kv_layer sums each layer's groups where the cache lives, and the
        # background writer hashes nothing for them on the host. (A sum covers whole 4 KiB
        # runs of a head: 128 tokens of these small heads.)
        prompt = list(range(100, 400))  # two groups of 128 stored
        for mla in (False, True):
            with self.subTest(mla=mla):
                self.root = tempfile.mkdtemp(prefix="vua-vllm-sums-")
                self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
                h = self.harness(mla=mla, split=128, extra_config={"gpu_checksums": True})
                h.request("a", prompt)
                with counting_host_word_sums() as host_sums:
                    _, _, blocks, _ = h.step(compute={"a": 1})
                self.assertEqual(host_sums.call_count, 0)
                self.assertEqual(h.worker.vua.prefix_length(torch.tensor(prompt)), 256)
                for key_hex in h.worker.vua.config.tokens_to_paths(torch.tensor(prompt[:256])):
                    self.assertEqual(len(fragment_word_sums(fragment_path(self.root, key_hex)) or []), 2 * len(LAYERS))
                status, out, _ = run_cli("verify", self.root)  # checks every stored word sum on the host
                self.assertEqual(status, 0, out)
                h.request("b", prompt)
                _, _, blocks_b, errors = h.step()
                self.assertEqual(errors, set())
                for name in LAYERS:
                    saved, loaded = h.positions(name, blocks["a"], 0, 256), h.positions(name, blocks_b["b"], 0, 256)
                    self.assertTrue(torch.equal(saved.view(torch.uint8), loaded.view(torch.uint8)), name)
        with self.assertRaisesRegex(VUAError, "gpu_checksums must be true, false or absent"):
            self.harness(extra_config={"gpu_checksums": "yes"})

    def test_scheduler_hit_partial_hit_and_miss(self):
        for mode, loads_async in (("async", True), ("layerwise", False)):
            with self.subTest(load_mode=mode):
                h = self.harness(load_mode=mode)
                connector = h.scheduler.get_kv_connector()
                prompt = list(range(1000, 1100))
                h.request("seed", prompt)
                h.step(compute={"seed": 2})
                asked = iter(range(1000))

                def matched(tokens, computed=0, connector=connector, asked=asked):
                    # A request of its own each time (answers are kept per request until admitted).
                    request = Request(f"q{next(asked)}", tokens, SamplingParams(), None)
                    return connector.get_num_new_matched_tokens(request, computed)

                hit = loads_async  # a hit loads asynchronously by default; a miss never does
                self.assertEqual(matched(prompt), (96, hit))  # hit: all whole groups but the last token's
                self.assertEqual(matched(prompt[:97]), (96, hit))
                self.assertEqual(matched(prompt[:96]), (64, hit))  # the last token must be computed
                self.assertEqual(matched(prompt[:50] + [7] * 50), (32, hit))  # partial: diverges in group 1
                self.assertEqual(matched(prompt, computed=48), (48, hit))  # beyond vLLM's own hits
                self.assertEqual(matched(prompt, computed=96), (0, False))
                self.assertEqual(matched(list(range(5000, 5100))), (0, False))  # miss

    def test_split_factor_must_be_a_multiple_of_the_block_size(self):
        with self.assertRaisesRegex(VUAError, "not a multiple of vLLM's block size 16"):
            ConnectorHarness(self.root, self.model_dir, split=24)

    def test_loads_and_saves_show_in_vllms_stats_and_prometheus(self):
        h, prompt = self.check_round_trip(dtype=torch.bfloat16)
        stats = h.worker.get_kv_connector_stats()
        self.assertIsInstance(stats, VUAConnectorStats)
        group_bytes = len(LAYERS) * 2 * 2 * SPLIT * 16 * 2  # layers, K|V, heads, tokens, head_size, bf16
        expected = {"lookups": 1, "hit_tokens": 96, "groups_loaded": 3, "bytes_loaded": 3 * group_bytes}
        self.assertEqual({name: stats.data[name] for name in expected}, expected)
        self.assertEqual((stats.data["groups_saved"], stats.data["load_errors"]), (3, 0))
        self.assertIsNone(h.worker.get_kv_connector_stats())  # nothing moved since the last report
        # What vLLM does with it: rebuild from the serialised data, sum over workers, log, export.
        total = VUAConnector.build_kv_connector_stats(dict(stats.data))
        total = total.aggregate(VUAConnector.build_kv_connector_stats(dict(stats.data)))
        self.assertEqual(total.reduce()["vua_hit_tokens"], 192)
        registry = CollectorRegistry()

        class Counter(prometheus_client.Counter):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, registry=registry, **kwargs)

        types = {
            prometheus_client.Gauge: prometheus_client.Gauge,
            prometheus_client.Counter: Counter,
            prometheus_client.Histogram: prometheus_client.Histogram,
        }
        prom = VUAConnector.build_prom_metrics(h.vllm_config, types, ["engine"], {0: ["0"]})
        prom.observe(total.data, engine_idx=0)
        self.assertEqual(registry.get_sample_value("vllm:vua_hit_tokens_total", {"engine": "0"}), 192)
        self.assertEqual(registry.get_sample_value("vllm:vua_groups_saved_total", {"engine": "0"}), 6)

    def test_shutdown_abandons_a_slow_save_cleanly(self):
        # The fault: a disk so slow that a save cannot finish within shutdown_timeout.
        h = self.harness(extra_config={"shutdown_timeout": 0.2})
        prompt = list(range(300, 400))
        h.request("slow", prompt)
        real_fsync = os.fsync
        release = threading.Event()

        def slow_fsync(fd):
            release.wait(30)
            real_fsync(fd)

        with mock.patch.object(os, "fsync", slow_fsync):
            h.step(compute={"slow": 3}, flush=False)
            # The save's fsync waits for release: shutdown returns with it unfinished.
            with self.assertLogs("vua.vllm", level="WARNING") as logs:
                h.worker.shutdown()
            self.assertIn("1 prompt saves unfinished", "\n".join(logs.output))
            self.assertEqual(h.worker.get_kv_connector_stats().data["saves_dropped_at_shutdown"], 1)
            release.set()
            # The save that was running goes on to publish every group; a later engine reads
            # what got published at any moment: the whole prompt or a shorter prefix.
            namespace = h.worker.vua.config.namespace
            with VUA(VUAConfig(split_factor=SPLIT, namespace=namespace), self.root) as later:
                deadline = time.monotonic() + 60
                seen = {later.prefix_length(torch.tensor(prompt[:96]))}
                while 96 not in seen and time.monotonic() < deadline:
                    time.sleep(0.05)
                    seen.add(later.prefix_length(torch.tensor(prompt[:96])))
                self.assertLessEqual(seen, {0, 32, 64, 96})
                self.assertIn(96, seen)

    def test_upstream_names_work_through_vllms_plugin_loading(self):
        # vLLM loads the vllm.general_plugins entry points in each of its processes; VUA's
        # registers its connector under its own and the original project's names.
        load_general_plugins()
        extra = {"vua_root": "", "shared_storage_path": self.root}  # the original project's key
        h = ConnectorHarness(
            self.root, self.model_dir, connector="VUAStorageConnector_V1", module_path=None, extra_config=extra
        )
        self.addCleanup(h.worker.shutdown)
        self.assertIsInstance(h.worker, VUAConnector)
        self.assertEqual(h.worker.vua.root, self.root)
        (launcher,) = [e for e in entry_points(group="console_scripts") if e.name == "vua-vllm"]
        self.assertEqual(launcher.value, "vua.vllm._plugin:main")

    def test_vllms_fail_policy_for_load_errors_gets_a_warning(self):
        # vLLM's default fails a request whose external KV did not load; VUA's answer to doubt
        # is a shorter prefix, which needs vLLM to compute the rest.
        with self.assertLogs("vua.vllm", level="WARNING") as logs:
            self.harness(load_failure_policy="fail")
        self.assertIn('"kv_load_failure_policy": "recompute"', "\n".join(logs.output))

    def test_config_errors_say_what_to_set(self):
        short_secret = os.path.join(self.root, "short-secret")
        with open(short_secret, "wb") as f:
            f.write(b"12345\n")
        cases = [
            ({"vua_root": ""}, 'needs "vua_root"'),
            ({"split_factor": "many"}, "split_factor must be an integer, got 'many'"),
            (
                {"max_bytes": "lots"},
                r"max_bytes must be a size such as 500M, 10G, 1.5TiB or a number of bytes, got 'lots'",
            ),
            ({"shutdown_timeout": "soon"}, "shutdown_timeout must be a number of seconds"),
            ({"auth_key_file": os.path.join(self.root, "missing")}, "cannot read VUAConnector's auth_key_file"),
            (
                {"auth_key_file": short_secret},  # its newline counts: secret files are read exactly
                r"holds 6 bytes; the store's secret is 16 to 64 bytes, read exactly \(a trailing newline counts\)",
            ),
        ]
        for extra, message in cases:
            with self.subTest(extra=extra), self.assertRaisesRegex(InvalidInputError, message):
                ConnectorHarness(self.root, self.model_dir, extra_config=extra)

    def test_misspelt_keys_are_refused_with_the_nearest_name(self):
        cases = [
            (
                {"split_facter": 128, "index_pth": "/x"},
                r"'split_facter' \(did you mean split_factor\?\); 'index_pth' \(did you mean index_path\?\)",
            ),
            ({"vua_rot": self.root}, r"'vua_rot' \(did you mean vua_root\?\)"),
            ({"kv_load_failure_policy": "recompute"}, "a field of kv_transfer_config itself: move it out"),
            ({"zzz": 1}, "the connector reads vua_root, shared_storage_path, index_path"),
        ]
        for extra, message in cases:
            with self.subTest(extra=extra), self.assertRaisesRegex(InvalidInputError, message):
                ConnectorHarness(self.root, self.model_dir, extra_config=extra)
        # What vLLM itself writes into the dict (--kv-offloading-size) is not the user's mistake.
        h = self.harness(extra_config={"cpu_bytes_to_use": 1 << 30})
        self.assertEqual(h.worker.vua.config.split_factor, SPLIT)

    def test_max_bytes_takes_the_sizes_vua_gc_takes(self):
        # One parser: what `vua gc --max-bytes` accepts, the connector accepts, and means the same.
        for value, expected in (("500G", 500 << 30), ("1.5TiB", 3 << 39), (4096, 4096), ("0", None)):
            with self.subTest(value=value):
                h = self.harness(extra_config={"max_bytes": value})
                self.assertEqual(h.worker.vua.config.max_bytes, expected)
                if isinstance(value, str):
                    status, out, _ = run_cli("gc", self.root, "--max-bytes", value, "--json")
                    self.assertEqual((status, json.loads(out)["max_bytes"]), (0, expected or 0))

    def test_damaged_fragment_is_reported_as_load_error(self):
        # Layer-wise, the blocks from the damaged group on are reported as load errors and
        # vLLM recomputes them; asynchronously, the load is reported failed and vLLM computes
        # the request from the start (its first load is not counted as tokens from VUA).
        for mode in ("layerwise", "async"):
            with self.subTest(load_mode=mode):
                self.root = tempfile.mkdtemp(prefix=f"vua-vllm-{mode}-")
                self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)
                h, prompt = self.check_round_trip(load_mode=mode)
                keys = h.worker.vua.config.tokens_to_paths(torch.tensor(prompt[:96]))
                path = fragment_path(self.root, keys[1])
                flip_byte(path, -1, 0xFF)  # damage the last byte of group 1's data
                h.request("c", prompt)
                with self.assertLogs("vua", level="WARNING"):
                    # Hands the load errors back to vLLM's scheduler; computes what vLLM schedules.
                    _, meta, blocks, errors = h.step(compute={"c": 1}, commit=True)
                load = meta.loads[0]
                self.assertEqual((load.start, load.end), (0, 96))
                if mode == "layerwise":
                    expected = {blocks["c"][p // BLOCK] for p in range(32, 96)}  # groups 1 and 2 must be recomputed
                    self.assertEqual(errors, expected)
                    # vLLM computes them again from there, and the connector stores group 1 again (it was moved aside).
                    self.assertEqual(h.worker.vua.prefix_length(torch.tensor(prompt)), 32)
                    self.assertEqual(h.scheduler.requests["c"].num_computed_tokens, 32)
                else:
                    # Reported failed: vLLM admits the request again and, the connector not
                    # offering the load twice, computes it from the start in the next step.
                    self.assertEqual(errors, set())
                    self.assertEqual(len(meta.loads), 1)
                    stats = h.worker.get_kv_connector_stats().data
                    self.assertEqual((stats["loads_failed"], stats["loads_timed_out"]), (1, 0))
                    self.assertEqual(h.scheduler.requests["c"].num_computed_tokens, len(prompt))
                while h.scheduler.requests["c"].num_computed_tokens < len(prompt):
                    h.step(compute={"c": 1}, commit=True)
                self.assertEqual(h.worker.vua.prefix_length(torch.tensor(prompt)), 96)
                hit = h.worker.vua.get_closest(torch.tensor(prompt[:96]))
                for name, (k, v) in zip(LAYERS, hit.data):  # what was stored again is what the model computed
                    known = h.known(name, 1, 0, 96)  # (positions, heads, K|V)
                    self.assertTrue(torch.equal(k[0].transpose(0, 1), known[..., :16]), name)
                    self.assertTrue(torch.equal(v[0].transpose(0, 1), known[..., 16:]), name)

    def test_sliding_window_model_keeps_vllms_hybrid_manager_and_round_trips(self):
        # Layer 1 has a 32-token window: while a 200-token prompt is prefilled in chunks of
        # 40 (groups of 32 straddle chunks), vLLM frees that layer's blocks behind the window
        # and, here, another request's KV lands in them at once (poisoned with NaN). Saving
        # the prompt at its end would store that; each group must be saved in the step that
        # completes it.
        h = self.harness(sliding_window=32, batched=40, dtype=torch.float32)
        self.assertTrue(supports_hma(h.worker))
        prompt = list(range(500, 700))
        h.request("a", prompt)
        steps = 0
        while h.scheduler.requests["a"].num_computed_tokens < len(prompt):
            h.step(compute={"a": 1}, commit=True)
            h.poison_free_blocks()
            steps += 1
        self.assertEqual(steps, 5)
        stored = h.worker.vua.get_closest(torch.tensor(prompt), device="cpu")
        self.assertEqual(stored.tokens.numel(), 192)
        for name, (k, v) in zip(LAYERS, stored.data):
            expected = h.known(name, 1, 0, 192).transpose(0, 1)  # (heads, tokens, K|V)
            self.assertTrue(torch.equal(k[0], expected[..., :16]), name)
            self.assertTrue(torch.equal(v[0], expected[..., 16:]), name)

        # A new request: the full-attention layer gets all 192 tokens, the windowed layer
        # the blocks vLLM gave it (its last window); nothing is written into the null block.
        h.request("b", prompt)
        _, meta, _, errors = h.step()
        self.assertEqual(errors, set())
        (load,) = meta.loads
        self.assertEqual((load.start, load.end), (0, 192))
        full, window = h.blocks["b"]
        self.assertTrue(torch.equal(h.positions(LAYERS[0], full, 0, 192), h.known(LAYERS[0], 1, 0, 192)))
        held = [p for p in range(192) if window[p // BLOCK] != 0]
        self.assertLess(len(held), 192)  # vLLM gave the windowed layer no blocks for the early tokens
        self.assertTrue(set(range(192 - 31, 192)) <= set(held))  # but all of the last window
        for p in held:
            self.assertTrue(
                torch.equal(h.positions(LAYERS[1], window, p, p + 1)[0], h.known(LAYERS[1], 1, p, p + 1)[0])
            )
        self.assertTrue(h.caches[LAYERS[1]][0].isnan().all())  # the null block

    def test_models_the_store_cannot_serve_are_refused_at_start_up(self):
        with self.assertRaisesRegex(
            InvalidInputError, r"longer than this model's sliding window \(16 tokens\).*at most 16"
        ):
            ConnectorHarness(self.root, self.model_dir, sliding_window=16)
        attention = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
        state = MambaSpec(block_size=BLOCK, shapes=((2, 4),), dtypes=(torch.float32,))
        groups = [KVCacheGroupSpec(LAYERS[:1], attention), KVCacheGroupSpec(LAYERS[1:], state)]
        with self.assertRaisesRegex(InvalidInputError, "keep a MambaSpec.*without the connector"):
            ConnectorHarness(self.root, self.model_dir, groups=groups)


class PagedLayerTest(unittest.TestCase):
    def test_gather_scatter_legacy_layouts(self):
        legacy = torch.randn(2, 8, BLOCK, 2, 4)  # [2, blocks, block_size, heads, dim]
        layer = PagedLayer(legacy, BLOCK, None)
        k, v = layer.gather([3, 5], 10, 20)
        self.assertEqual(k.shape, (1, 2, 10, 4))
        self.assertTrue(torch.equal(k[0, :, 0], legacy[0, 3, 10]))
        self.assertTrue(torch.equal(v[0, :, 9], legacy[1, 5, 3]))
        other = PagedLayer(torch.zeros_like(legacy), BLOCK, None)
        # Positions [10, 20) of blocks [1, 2]: the views of 10 and 11 are scratch (kept before 12).
        views = other.views([1, 2], 10, 20, keep_before=12)
        self.assertEqual([tuple(k.shape) for k, _ in views], [(2, 2, 4), (2, BLOCK - 12, 4), (2, 20 - BLOCK, 4)])
        at = 0
        for dest_k, dest_v in views:
            n = dest_k.shape[1]
            dest_k.copy_(k[0, :, at : at + n])
            dest_v.copy_(v[0, :, at : at + n])
            at += n
        self.assertTrue(torch.equal(other.kv[0, 1, 12:], legacy[0, 3, 12:]))
        self.assertTrue(torch.equal(other.kv[1, 2, : 20 - BLOCK], legacy[1, 5, : 20 - BLOCK]))
        self.assertFalse(other.kv[:, 1, :12].any())  # vLLM's own positions untouched
        mla = torch.randn(8, BLOCK, 6)  # [blocks, block_size, latent]
        k, v = PagedLayer(mla, BLOCK, None).gather([2], 0, 4)
        self.assertEqual((k.shape, v.shape), ((1, 1, 4, 3), (1, 1, 4, 3)))
        self.assertTrue(torch.equal(torch.cat([k, v], -1)[0, 0], mla[2, :4]))


if __name__ == "__main__":
    sys.exit(unittest.main())
