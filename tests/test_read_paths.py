"""Each read path returns exactly what was put: CPU whole groups, CPU layer by layer, CUDA, GDS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import unittest

import torch

from tests.helpers import StoreTestCase, flip_byte, kv_slice, overwrite, random_kv
from vua import _layout
from vua._read import _gds


class GroupCopiesTest(StoreTestCase):
    """Uniform layouts are read a whole group at a time; others layer by layer."""

    def test_round_trip_and_damage(self):
        vua = self.store(split_factor=16, namespace="whole", io_threads=2)
        tokens = torch.arange(64)
        kv = random_kv(1, 64, dtype=torch.bfloat16)
        vua.put(tokens, kv)
        self.assertKVEqual(vua.get_closest(tokens, device="cpu").data, kv)
        path = _layout.fragment_path(self.root, vua.config.tokens_to_paths(tokens)[2])
        overwrite(path, -5, b"\x00\x01\x02")
        with self.assertLogs("vua", level="WARNING"):
            hit = vua.get_closest(tokens, device="cpu")
        self.assertKVEqual(hit.data, kv_slice(kv, 0, 32))

    def test_layers_of_different_shapes_take_the_tensor_path(self):
        vua = self.store(split_factor=16, namespace="mixed")
        tokens = torch.arange(32)
        kv = random_kv(1, 32, heads=2, head_dim=8)
        kv[1] = (torch.randn(1, 4, 32, 8), torch.randn(1, 4, 32, 16))  # another layer shape
        vua.put(tokens, kv)
        self.assertKVEqual(vua.get_closest(tokens, device="cpu").data, kv)

    def test_gds_option_is_harmless_without_a_gpu(self):
        vua = self.store(split_factor=16, namespace="gds", gds=True)
        tokens = torch.arange(32)
        kv = random_kv(1, 32, heads=2, head_dim=128, dtype=torch.bfloat16)
        vua.put(tokens, kv)
        self.assertKVEqual(vua.get_closest(tokens, device="cpu").data, kv)
        # Direct reads cover whole 4 KiB blocks around the K and V bytes.
        self.assertEqual(_gds.aligned_span(4096 + 128, 3 * 4096 + 1), (4096, 3 * 4096))


class PreadReadTest(StoreTestCase):
    """network_fs=True: fragments are read with preadv into the outputs, never memory-mapped."""

    def test_round_trip_layerwise_mixed_shapes_and_damage(self):
        vua = self.store(split_factor=16, namespace="pread", network_fs=True, io_threads=2)
        self.assertTrue(vua.network_fs)
        tokens = torch.arange(64)
        kv = random_kv(1, 64, dtype=torch.bfloat16, heads=4, head_dim=64)
        vua.put(tokens, kv)
        self.assertKVEqual(vua.get_closest(tokens, device="cpu").data, kv)
        load = vua.load(tokens, "cpu", layerwise=True)
        for layer in range(len(kv)):
            k, v = load.wait_layer(layer)
            self.assertKVEqual([(k, v)], [kv[layer]])
        self.assertEqual(load.wait(), 4)
        mixed = random_kv(1, 32, heads=2, head_dim=8, seed=3)
        mixed[1] = (torch.randn(1, 4, 32, 8), torch.randn(1, 4, 32, 16))
        vua.put(torch.arange(500, 532), mixed)
        self.assertKVEqual(vua.get_closest(torch.arange(500, 532), device="cpu").data, mixed)
        flip_byte(_layout.fragment_path(self.root, vua.config.tokens_to_paths(tokens)[2]), -7)
        with self.assertLogs("vua", level="WARNING"):
            hit = vua.get_closest(tokens, device="cpu")
        self.assertKVEqual(hit.data, kv_slice(kv, 0, 32))
        self.assertEqual(vua.put(tokens, kv), 1)  # the damaged group was moved aside (confirmed) and is rewritten

    def test_a_group_that_vanishes_is_missing_not_damaged(self):
        vua = self.store(split_factor=16, namespace="pread", network_fs=True)
        tokens = torch.arange(48)
        vua.put(tokens, random_kv(1, 48))
        group = _layout.group_dir(self.root, vua.config.tokens_to_paths(tokens)[1])
        shutil.rmtree(group)  # evicted by another node
        with self.assertLogs("vua", level="WARNING") as logs:
            self.assertEqual(vua.get_closest(tokens, device="cpu").tokens.numel(), 16)
        self.assertIn("no such file", "\n".join(logs.output))
        self.assertEqual(os.listdir(_layout.fanout_dir(self.root, vua.config.tokens_to_paths(tokens)[1])), [])
        self.assertEqual(vua.prefix_length(tokens), 16)  # the index entry is gone: nothing moved aside


@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA device (tools/gpu_check.py runs the full set)")
class CudaReadTest(StoreTestCase):
    def test_gpu_equals_cpu_without_host_sync(self):
        vua = self.store(split_factor=16, namespace="cuda")
        tokens = torch.arange(96)
        kv = random_kv(1, 96, dtype=torch.bfloat16, layers=4)
        vua.put(tokens, kv)
        hit = vua.get_closest(tokens, device="cuda")
        copies = [(k.clone(), v.clone()) for k, v in hit.data]  # same stream, no synchronize
        self.assertKVEqual([(k.cpu(), v.cpu()) for k, v in copies], kv)
        load = vua.load(tokens, "cuda", layerwise=True)
        for i in range(4):
            k, v = load.wait_layer(i)
            self.assertTrue(torch.equal(k.clone().cpu().view(torch.uint8), kv[i][0].view(torch.uint8)))
        self.assertEqual(load.wait(), 6)

    def test_gpu_word_sums_catch_damage(self):
        vua = self.store(split_factor=16, namespace="cuda-damage", gpu_checksums=True)
        tokens = torch.arange(48)
        kv = random_kv(1, 48, heads=2, head_dim=128, dtype=torch.bfloat16)  # 4 KiB chunks: word sums stored
        vua.put(tokens, kv)
        flip_byte(_layout.fragment_path(self.root, vua.config.tokens_to_paths(tokens)[1]), -4096)
        with self.assertLogs("vua", level="WARNING"):
            hit = vua.get_closest(tokens, device="cuda")
        self.assertKVEqual([(k.cpu(), v.cpu()) for k, v in hit.data], kv_slice(kv, 0, 16))
        vua.put(tokens, kv)  # the damaged group was moved aside: written again
        flip_byte(_layout.fragment_path(self.root, vua.config.tokens_to_paths(tokens)[1]), -4096)
        with self.assertLogs("vua", level="WARNING"):
            load = vua.load(tokens, "cuda", layerwise=True)
            layers = [load.wait_layer(i) for i in range(3)]
            self.assertEqual(load.wait(), 1)
        _, last_v = layers[2]  # the damaged layer is the last: it comes out cut
        self.assertEqual(last_v.shape[2], 16)
        self.assertTrue(torch.equal(last_v.cpu().view(torch.uint8), kv[2][1][:, :, :16].view(torch.uint8)))

    def test_gds_reads_or_falls_back_with_the_same_result(self):
        vua = self.store(split_factor=16, namespace="cuda-gds", gds=True)
        tokens = torch.arange(48)
        kv = random_kv(1, 48, heads=2, head_dim=128, dtype=torch.bfloat16)
        vua.put(tokens, kv)
        for _ in range(2):  # the second read runs after any fallback decision
            hit = vua.get_closest(tokens, device="cuda")
            self.assertKVEqual([(k.cpu(), v.cpu()) for k, v in hit.data], kv)


class CudaDryRunTest(unittest.TestCase):
    """Every CUDA read path's logic (staged whole groups, layer-wise, GPUDirect with its fallback),
    run on the CPU through tools/cuda_dry_run.py's stand-in platform: exact data, damage cut."""

    def test_cuda_paths_on_a_stand_in_platform(self):
        script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "cuda_dry_run.py")
        run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr[-3000:])
        cases = run.stdout.splitlines()
        self.assertEqual(len(cases), 31, run.stdout)  # 30 loads and the refused-GDS fallback
        self.assertTrue(all(line.startswith("ok ") for line in cases), run.stdout)
