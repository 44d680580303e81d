"""Each read path returns exactly what was put: CPU whole groups, CPU layer by layer, CUDA, GDS.

Besides the public API, this module is the unit test of ``vua._read._gds``'s alignment
arithmetic (``aligned_span``), which it imports; see tests/test_layering.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import unittest

import torch

from tests.helpers import StoreTestCase, fanout_dir, flip_byte, fragment_path, group_dir, kv_slice, overwrite, random_kv
from vua import KVDestination
from vua._read import _gds
from vua.errors import InvalidInputError


class GroupCopiesTest(StoreTestCase):
    """Uniform layouts are read a whole group at a time; others layer by layer."""

    def test_round_trip_and_damage(self):
        vua = self.store(split_factor=16, namespace="whole", io_threads=2)
        tokens = torch.arange(64)
        kv = random_kv(1, 64, dtype=torch.bfloat16)
        vua.put(tokens, kv)
        self.assertKVEqual(vua.get_closest(tokens, device="cpu").data, kv)
        path = fragment_path(self.root, vua.config.tokens_to_paths(tokens)[2])
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
        flip_byte(fragment_path(self.root, vua.config.tokens_to_paths(tokens)[2]), -7)
        with self.assertLogs("vua", level="WARNING"):
            hit = vua.get_closest(tokens, device="cpu")
        self.assertKVEqual(hit.data, kv_slice(kv, 0, 32))
        self.assertEqual(vua.put(tokens, kv), 1)  # the damaged group was moved aside (confirmed) and is rewritten

    def test_a_group_that_vanishes_is_missing_not_damaged(self):
        vua = self.store(split_factor=16, namespace="pread", network_fs=True)
        tokens = torch.arange(48)
        vua.put(tokens, random_kv(1, 48))
        group = group_dir(self.root, vua.config.tokens_to_paths(tokens)[1])
        shutil.rmtree(group)  # evicted by another node
        with self.assertLogs("vua", level="WARNING") as logs:
            self.assertEqual(vua.get_closest(tokens, device="cpu").tokens.numel(), 16)
        self.assertIn("no such file", "\n".join(logs.output))
        self.assertEqual(os.listdir(fanout_dir(self.root, vua.config.tokens_to_paths(tokens)[1])), [])
        self.assertEqual(vua.prefix_length(tokens), 16)  # the index entry is gone: nothing moved aside


class Blocks(KVDestination):
    """A caller's paged memory: per layer K and V in blocks of 8 tokens laid out (blocks, 8, heads, dim),
    as vLLM's FlashAttention caches are, handed out last block first. Each 16-token group lands
    in two strided views; nothing is contiguous with the load's token order."""

    def __init__(self, kv, tokens: int, dtype: torch.dtype | None = None):
        self.blocks = tokens // 8
        self.kv = [
            tuple(torch.zeros(self.blocks, 8, t.shape[1], t.shape[3], dtype=dtype or t.dtype) for t in pair)
            for pair in kv
        ]
        self.calls = 0

    def chunks(self, group, layer):
        self.calls += 1
        k, v = self.kv[layer]
        blocks = [self.blocks - 1 - position // 8 for position in range(group * 16, (group + 1) * 16, 8)]
        return [(k[b].transpose(0, 1), v[b].transpose(0, 1)) for b in blocks]

    def data(self, groups: int):
        """(1, heads, tokens, dim) per layer, in token order, for the first ``groups`` groups."""
        order = [self.blocks - 1 - b for b in range(groups * 2)]
        return [tuple(t[order].flatten(0, 1).transpose(0, 1)[None] for t in pair) for pair in self.kv]


WIDE = 4096  # head_dim: a head's 16 tokens are one 128 KiB run, long enough to be read in place


class GroupPages(KVDestination):
    """Pages of one group each holding every layer, (pages, layers, 2, heads, 16, dim): each K and V
    of a group is one contiguous view. ``heads_apart``: the memory is (heads, pages, layers, 2, 16,
    dim) instead, each head of a K or V one run, the heads far apart (as SGLang's layer_first pool)."""

    def __init__(self, pages: int, layers: int = 3, heads: int = 2, head_dim: int = WIDE, *, heads_apart: bool = False):
        if heads_apart:
            memory = torch.zeros(heads, pages, layers, 2, 16, head_dim, dtype=torch.bfloat16)
            self.kv = memory.permute(1, 2, 3, 0, 4, 5)
        else:
            self.kv = torch.zeros(pages, layers, 2, heads, 16, head_dim, dtype=torch.bfloat16)

    def chunks(self, group, layer):
        return [(self.kv[group, layer, 0], self.kv[group, layer, 1])]

    def whole_group(self, group):
        return self.kv[group]

    def data(self, groups: int, first: int = 0):
        """(1, heads, tokens, dim) per layer for ``groups`` pages from ``first``, in order."""
        pages = self.kv[first : first + groups]
        return [
            tuple(pages[:, layer, side].permute(1, 0, 2, 3).flatten(1, 2)[None] for side in (0, 1))
            for layer in range(self.kv.shape[1])
        ]


class DestinationTest(StoreTestCase):
    """VUA.load(..., into=): verified groups land in the caller's memory, on every host read path."""

    def test_every_host_path_lands_exact_bytes_and_cuts_at_damage(self):
        tokens = torch.arange(64)
        kv = random_kv(1, 64, dtype=torch.bfloat16, heads=4, head_dim=64)
        for network_fs in (False, True):  # memory-mapped, and preadv through a buffer
            vua = self.store(split_factor=16, namespace=f"into-{network_fs}", network_fs=network_fs, io_threads=2)
            vua.put(tokens, kv)
            for layerwise in (False, True):
                with self.subTest(network_fs=network_fs, layerwise=layerwise):
                    blocks = Blocks(kv, 64)
                    load = vua.load(tokens, "cpu", layerwise=layerwise, into=blocks)
                    if layerwise:
                        self.assertEqual([load.wait_layer_groups(layer) for layer in range(3)], [4, 4, 4])
                    self.assertEqual(load.wait(), 4)
                    self.assertKVEqual(blocks.data(4), kv)
                    self.assertEqual(blocks.calls, 4 * 3)  # each group and layer asked once
                    with self.assertRaisesRegex(InvalidInputError, "wait_layer_groups"):
                        load.wait_layer(0)
                    with self.assertRaisesRegex(InvalidInputError, "landed in the destination"):
                        load.data()
            path = fragment_path(vua.root, vua.config.tokens_to_paths(tokens)[2])
            flip_byte(path, -7)  # the last layer's V of group 2
            blocks = Blocks(kv, 64)
            with self.assertLogs("vua", level="WARNING"):
                self.assertEqual(vua.load(tokens, "cpu", into=blocks).wait(), 2)
            self.assertKVEqual(blocks.data(2), kv_slice(kv, 0, 32))

    def test_a_destination_naming_whole_groups_gets_each_in_one_view(self):
        # Pages of 16 tokens holding every layer, (pages, 16, layers, 2, heads, dim), as SGLang's
        # page-first pools do: whole_group is one strided (layers, 2, heads, 16, dim) view.
        vua = self.store(split_factor=16, io_threads=2)
        tokens = torch.arange(64)
        kv = random_kv(1, 64, heads=2, head_dim=64, dtype=torch.bfloat16)
        vua.put(tokens, kv)

        class Pages(KVDestination):
            def __init__(self, dtype=torch.bfloat16):
                self.kv = torch.zeros(4, 16, 3, 2, 2, 64, dtype=dtype)
                self.whole = 0

            def chunks(self, group, layer):
                page = self.kv[group, :, layer]  # (16, 2, heads, dim)
                return [(page[:, 0].transpose(0, 1), page[:, 1].transpose(0, 1))]

            def whole_group(self, group):
                self.whole += 1
                return self.kv[group].permute(1, 2, 3, 0, 4)

            def data(self, groups):
                return [
                    tuple(self.kv[:groups, :, layer, side].flatten(0, 1).transpose(0, 1)[None] for side in (0, 1))
                    for layer in range(3)
                ]

        pages = Pages()
        self.assertEqual(vua.load(tokens, "cpu", into=pages).wait(), 4)
        self.assertKVEqual(pages.data(4), kv)
        self.assertEqual(pages.whole, 4)  # the whole-group path, not chunks()
        layerwise = Pages()
        self.assertEqual(vua.load(tokens, "cpu", layerwise=True, into=layerwise).wait(), 4)
        self.assertKVEqual(layerwise.data(4), kv)
        self.assertEqual(layerwise.whole, 0)  # a layer-wise consumer gets layers: chunks()
        flip_byte(fragment_path(vua.root, vua.config.tokens_to_paths(tokens)[1]), -9)
        pages = Pages()
        with self.assertLogs("vua", level="WARNING"):
            self.assertEqual(vua.load(tokens, "cpu", into=pages).wait(), 1)
        self.assertKVEqual(pages.data(1), kv_slice(kv, 0, 16))
        with self.assertRaisesRegex(InvalidInputError, r"whole view of group 0 is .*float16"):
            vua.load(tokens, "cpu", into=Pages(torch.float16)).wait()

    def test_contiguous_views_are_filled_in_place_exactly_and_damage_cuts(self):
        # Each tensor of a group has a contiguous view of its own here (as SGLang's pools in the
        # pool's own order have), so the load reads the file straight into it and checks it there.
        for network_fs, heads_apart in ((False, False), (False, True), (True, False)):
            vua = self.store(
                split_factor=16, namespace=f"in-place-{network_fs}-{heads_apart}", network_fs=network_fs, io_threads=2
            )
            tokens = torch.arange(64)
            kv = random_kv(1, 64, heads=2, head_dim=WIDE, dtype=torch.bfloat16)
            vua.put(tokens, kv)
            pages = GroupPages(4, heads_apart=heads_apart)
            self.assertEqual(vua.load(tokens, "cpu", into=pages).wait(), 4)
            self.assertKVEqual(pages.data(4), kv)
            flip_byte(fragment_path(vua.root, vua.config.tokens_to_paths(tokens)[2]), -5)  # group 2's last V
            pages = GroupPages(4, heads_apart=heads_apart)
            with self.assertLogs("vua", level="WARNING") as logs:
                self.assertEqual(vua.load(tokens, "cpu", into=pages).wait(), 2, network_fs)
            self.assertIn("checksum mismatch", "\n".join(logs.output))
            self.assertKVEqual(pages.data(2), kv_slice(kv, 0, 32))

    def test_load_groups_takes_many_one_group_prompts_and_stops_at_the_first_not_stored(self):
        vua = self.store(split_factor=16, io_threads=2)
        rows = torch.arange(6 * 16).view(6, 16) * 7  # six prompts of one group each
        kv = random_kv(6, 16, heads=2, head_dim=WIDE, dtype=torch.bfloat16)
        for r in (0, 1, 2, 4, 5):  # row 3 is never stored
            vua.put(rows[r], kv_slice(kv, r, 16))
        pages = GroupPages(6)
        self.assertEqual(vua.load_groups(rows[:3], into=pages).wait(), 3)
        for r in range(3):
            self.assertKVEqual(pages.data(1, first=r), kv_slice(kv, r, 16))
        self.assertEqual(vua.load_groups(rows, into=GroupPages(6)).wait(), 3)  # up to row 3
        self.assertEqual([vua.stored_groups(rows), vua.stored_groups(rows[4:]), vua.stored_groups(rows[3:])], [3, 2, 0])
        self.assertIsNone(vua.load_groups(rows[3:], into=GroupPages(6)))
        stats = vua.stats()
        self.assertEqual((stats.groups_loaded, stats.hit_tokens), (6, 96))

        # A damaged row ends the run there; the rows before it are whole.
        flip_byte(fragment_path(vua.root, vua.config.tokens_to_paths(rows[1])[0]), -3)
        pages = GroupPages(6)
        with self.assertLogs("vua", level="WARNING"):
            self.assertEqual(vua.load_groups(rows[:3], into=pages).wait(), 1)
        self.assertKVEqual(pages.data(1), kv_slice(kv, 0, 16))

        # The second group of a longer prompt is not a prompt of one group: its key chains the first.
        vua.put(torch.arange(32) + 1000, random_kv(1, 32, heads=2, head_dim=WIDE, dtype=torch.bfloat16))
        self.assertIsNone(vua.load_groups((torch.arange(32) + 1000)[16:].view(1, 16), into=GroupPages(1)))

        for wrong in (rows[0], rows[:, :8], [[1] * 16]):
            with self.assertRaisesRegex(InvalidInputError, r"\[n, split_factor=16\]"):
                vua.load_groups(wrong, into=GroupPages(1))
            with self.assertRaisesRegex(InvalidInputError, r"\[n, split_factor=16\]"):
                vua.stored_groups(wrong)

    def test_put_groups_writes_each_prompt_from_its_row_of_a_pool(self):
        vua = self.store(split_factor=16, io_threads=2)
        pool = random_kv(8, 16, heads=2, head_dim=WIDE, dtype=torch.bfloat16)  # 8 pages of 16 tokens, every layer
        rows = [5, 2, 7]
        groups = torch.arange(3 * 16).view(3, 16) + 500
        for wrong, message in (([5, 2], "one int per row"), ([5, 2, 8], "0 to 7"), ([5, 2, 7.0], "one int per row")):
            with self.assertRaisesRegex(InvalidInputError, message):
                vua.put_groups(groups, pool, rows=wrong)
        with self.assertRaisesRegex(InvalidInputError, "in place"):
            vua.put_groups(groups, [(k.transpose(2, 3), v.transpose(2, 3)) for k, v in pool], rows=rows)
        self.assertEqual(vua.stored_groups(groups), 0)  # a refused call wrote nothing
        self.assertEqual(vua.put_groups(groups, pool, rows=rows), 3)
        self.assertEqual(vua.put_groups(groups, pool, rows=rows), 0)  # stored already: skipped
        pages = GroupPages(3)
        self.assertEqual(vua.load_groups(groups, into=pages).wait(), 3)
        for i, row in enumerate(rows):
            self.assertKVEqual(pages.data(1, first=i), kv_slice(pool, row, 16))
            self.assertKVEqual(vua.get_closest(groups[i]).data, kv_slice(pool, row, 16))  # a prompt like any other

    def test_any_object_with_chunks_is_a_destination(self):
        # Duck typing, as the docs promise: no subclass of KVDestination, no whole_group.
        vua = self.store(split_factor=16)
        tokens = torch.arange(32)
        kv = random_kv(1, 32, heads=2, head_dim=8)
        vua.put(tokens, kv)

        class Plain:
            def __init__(self):
                self.kv = [(torch.zeros_like(k[0]), torch.zeros_like(v[0])) for k, v in kv]

            def chunks(self, group, layer):
                k, v = self.kv[layer]
                return [(k[:, group * 16 : (group + 1) * 16], v[:, group * 16 : (group + 1) * 16])]

        plain = Plain()
        self.assertEqual(vua.load(tokens, "cpu", into=plain).wait(), 2)
        self.assertKVEqual([(k[None], v[None]) for k, v in plain.kv], kv)

    def test_a_load_from_an_offset_lands_its_groups_from_zero(self):
        vua = self.store(split_factor=16)
        tokens = torch.arange(64)
        kv = random_kv(1, 64, heads=2, head_dim=8)
        vua.put(tokens, kv)
        blocks = Blocks(kv, 64)
        load = vua.load(tokens, "cpu", offset=32, into=blocks)
        self.assertEqual((load.offset, load.wait()), (32, 2))
        self.assertKVEqual(blocks.data(2), [(k[:, :, 32:], v[:, :, 32:]) for k, v in kv])

    def test_with_auth_key_the_mac_is_checked_before_the_bytes_count(self):
        tokens = torch.arange(48)
        kv = random_kv(1, 48, heads=2, head_dim=64)
        for network_fs in (False, True):  # checked on opening; checked over the bytes as they are read
            vua = self.store(split_factor=16, namespace=f"mac-{network_fs}", network_fs=network_fs, auth_key=b"k" * 32)
            vua.put(tokens, kv)
            path = fragment_path(vua.root, vua.config.tokens_to_paths(tokens)[1])
            flip_byte(path, -3)
            blocks = Blocks(kv, 48)
            with self.assertLogs("vua", level="WARNING"):
                self.assertEqual(vua.load(tokens, "cpu", into=blocks).wait(), 1, network_fs)
            self.assertKVEqual(blocks.data(1), kv_slice(kv, 0, 16))

    def test_views_that_do_not_fit_are_refused_with_what_fits(self):
        vua = self.store(split_factor=16)
        tokens = torch.arange(32)
        kv = random_kv(1, 32, heads=2, head_dim=8, dtype=torch.bfloat16)
        vua.put(tokens, kv)
        # Same width, other dtype: copying the bits would go unnoticed.
        with self.assertRaisesRegex(
            InvalidInputError, r"K view for group 0, layer 0 is .*float16.*\(2, tokens, 8\) torch.bfloat16"
        ):
            vua.load(tokens, "cpu", into=Blocks(kv, 32, dtype=torch.float16)).wait()

        class Short(Blocks):
            def chunks(self, group, layer):
                return super().chunks(group, layer)[:1]

        with self.assertRaisesRegex(InvalidInputError, "cover 8 tokens; a group is split_factor=16"):
            vua.load(tokens, "cpu", into=Short(kv, 32)).wait()
        with self.assertRaisesRegex(InvalidInputError, "into must be a vua.KVDestination"):
            vua.load(tokens, "cpu", into=[torch.zeros(4)])
        self.assertKVEqual(vua.get_closest(tokens).data, kv)  # the store is as it was


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
        flip_byte(fragment_path(self.root, vua.config.tokens_to_paths(tokens)[1]), -4096)
        with self.assertLogs("vua", level="WARNING"):
            hit = vua.get_closest(tokens, device="cuda")
        self.assertKVEqual([(k.cpu(), v.cpu()) for k, v in hit.data], kv_slice(kv, 0, 16))
        vua.put(tokens, kv)  # the damaged group was moved aside: written again
        flip_byte(fragment_path(self.root, vua.config.tokens_to_paths(tokens)[1]), -4096)
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
        self.assertEqual(len(cases), 55, run.stdout)  # 54 loads and the refused-GDS fallback
        self.assertTrue(all(line.startswith("ok ") for line in cases), run.stdout)
