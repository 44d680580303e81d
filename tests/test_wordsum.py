"""The word sums a GPU checks after its copy: the definition, what writers store, what it catches.

The unit test of ``vua._wordsum``, which it imports; what a store writes and reads goes
through the public API and tests/helpers.py.
"""

from __future__ import annotations

import unittest

import numpy as np
import torch

from tests.helpers import (
    StoreTestCase,
    forge_group,
    fragment_kv_tensors,
    fragment_path,
    fragment_word_sums,
    random_kv,
    run_cli_json,
)
from vua._wordsum import as_words, device_wordsums, host_wordsum, matches, tensor_wordsums
from vua.errors import InvalidInputError
from vua.integration import word_sums

MASK = (1 << 64) - 1


def by_the_definition(data: bytes) -> int:
    """The sum written out word by word, as _wordsum's docstring defines it."""
    total = 0
    for i in range(len(data) // 8):
        row, col = divmod(i, 512)
        word = int.from_bytes(data[8 * i : 8 * i + 8], "little")
        col_weight = ((col + 1) * 0x9E3779B97F4A7C15 & MASK) | 1
        row_weight = ((row + 1) * 0xC2B2AE3D27D4EB4F & MASK) | 1
        total += row_weight * col_weight * word
    return total & MASK


def on_torch(data: np.ndarray, chunks: int = 1) -> int:
    """The device code, run on the CPU (it is plain tensor arithmetic)."""
    words = torch.from_numpy(data.copy()).view(torch.int64).view(1, chunks, -1, 512)
    return int(device_wordsums(words)[0])


class DefinitionTest(unittest.TestCase):
    def setUp(self):
        self.data = np.random.default_rng(3).integers(0, 256, 4 * 4096, dtype=np.uint8)

    def test_host_and_device_code_follow_the_definition(self):
        expected = by_the_definition(self.data.tobytes())
        self.assertEqual(host_wordsum(self.data.reshape(1, -1)), expected)
        # Cut into chunks (a tensor's heads) the bytes sum the same, on either side.
        self.assertEqual(host_wordsum(self.data.reshape(2, -1)), expected)
        self.assertTrue(matches(on_torch(self.data), expected))
        self.assertTrue(matches(on_torch(self.data, chunks=4), expected))

    def test_damage_changes_the_sum(self):
        stored = host_wordsum(self.data.reshape(1, -1))
        flipped = self.data.copy()
        flipped[5000] ^= 0x10
        moved_rows = np.concatenate([self.data[4096:8192], self.data[:4096], self.data[8192:]])
        moved_words = self.data.copy()
        moved_words[:8], moved_words[8:16] = self.data[8:16], self.data[:8]
        for damaged in (flipped, moved_rows, moved_words):
            self.assertNotEqual(host_wordsum(damaged.reshape(1, -1)), stored)
            self.assertFalse(matches(on_torch(damaged), stored))

    def test_as_words_cuts_a_run_of_groups_per_group(self):
        # (heads, groups * split, head_dim) bf16, heads apart in memory as in a roomy cache
        run = torch.randn(2, 64, 128).to(torch.bfloat16)[:, :48]
        per_group = device_wordsums(as_words(run, 3))
        for g in range(3):
            one = run[:, 16 * g : 16 * (g + 1)].contiguous().view(torch.uint8).reshape(2, -1).numpy()
            self.assertTrue(matches(int(per_group[g]), host_wordsum(one)))

    def test_narrow_heads_at_odd_strides(self):
        # head_dim 2 in bf16 (4 bytes a token), heads 2,055 tokens apart: no int64 view of the
        # caller's tensor exists, and the sums are still those of the stored bytes.
        roomy = torch.randn(1, 3, 2048 + 7, 2).to(torch.bfloat16)[:, :, :2048]
        sums = tensor_wordsums([(roomy, roomy)], 2048, 1024)
        for g in range(2):
            stored = roomy[0, :, 1024 * g : 1024 * (g + 1)].contiguous().view(torch.uint8).reshape(3, -1)
            self.assertTrue(matches(int(sums[0, g, 1]), host_wordsum(stored.numpy())))


class StoredSumTest(StoreTestCase):
    """Writers store the sum the device code computes over the fragment's K and V bytes."""

    def stored_and_recomputed(self, path: str) -> tuple[list[int] | None, list[int]]:
        recomputed = []
        for entry in fragment_kv_tensors(path).values():
            data = np.fromfile(path, dtype=np.uint8)[entry.begin : entry.end]
            recomputed.append(on_torch(data, chunks=entry.shape[0]))
        return fragment_word_sums(path), recomputed

    def test_every_group_of_a_strided_batch(self):
        vua = self.store(split_factor=16, namespace="sums", gpu_checksums=True)
        # A cache with room for 64 tokens holding 48: heads are 64 tokens apart in memory.
        roomy = random_kv(2, 64, heads=2, head_dim=128, dtype=torch.bfloat16)
        kv = [(k[:, :, :48], v[:, :, :48]) for k, v in roomy]
        tokens = torch.stack([torch.arange(48), torch.arange(100, 148)])
        vua.put(tokens, kv)
        on_device = tensor_wordsums(kv, 48, 16)  # what a put from CUDA tensors stores instead
        for r, row in enumerate(tokens):
            for g, key in enumerate(vua.config.tokens_to_paths(row)):
                stored, recomputed = self.stored_and_recomputed(fragment_path(self.root, key))
                self.assertEqual(len(stored), 6)  # 3 layers x (K, V)
                self.assertTrue(all(map(matches, recomputed, stored)))
                self.assertTrue(all(map(matches, on_device[r, g].tolist(), stored)))

    def test_who_stores_sums_by_default(self):
        tokens = torch.arange(16)
        kv = random_kv(1, 16, heads=2, head_dim=128, dtype=torch.bfloat16)
        for setting, expected in ((None, torch.cuda.is_available()), (False, False), (True, True)):
            vua = self.store(split_factor=16, namespace=f"default-{setting}", gpu_checksums=setting)
            vua.put(tokens, kv)
            key = vua.config.tokens_to_paths(tokens)[0]
            stored = fragment_word_sums(fragment_path(self.root, key))
            self.assertEqual(stored is not None, expected, f"gpu_checksums={setting}")

    def test_a_put_with_the_integrations_word_sums_stores_them_as_given(self):
        # vua.integration.word_sums + put(word_sums=): what the vLLM connector does with sums
        # computed where the cache lives. Wrong sums are stored as given (a GPU read then
        # refuses the group); a malformed argument is refused before anything is written.
        tokens = torch.arange(32)
        kv = random_kv(1, 32, heads=2, head_dim=128, dtype=torch.bfloat16)
        sums = word_sums(kv, 32, 16)
        vua = self.store(split_factor=16, namespace="given", gpu_checksums=False)
        with self.assertRaisesRegex(InvalidInputError, "word_sums must be the int64"):
            vua.put(tokens, kv, word_sums=sums.numpy())
        with self.assertRaisesRegex(InvalidInputError, r"shaped \(1, 1, 6\), expected \(1, 2, 6\)"):
            vua.put(tokens, kv, word_sums=sums[:, :1])
        self.assertEqual(vua.prefix_length(tokens), 0)
        sums[0, 1, 5] += 1  # group 1's last V
        self.assertEqual(vua.put(tokens, kv, word_sums=sums), 2)
        for g, key in enumerate(vua.config.tokens_to_paths(tokens)):
            stored, recomputed = self.stored_and_recomputed(fragment_path(self.root, key))
            self.assertTrue(all(map(matches, sums[0, g].tolist(), stored)))  # as given
            self.assertEqual(
                [matches(r, s) for r, s in zip(recomputed, stored)], [True] * 6 if g == 0 else [True] * 5 + [False]
            )

    def test_groups_of_partial_rows_store_none_and_still_read(self):
        vua = self.store(split_factor=16, namespace="small", gpu_checksums=True)
        kv = random_kv(1, 32)  # 16 tokens x 8 floats: 512-byte chunks
        vua.put(torch.arange(32), kv)
        key = vua.config.tokens_to_paths(torch.arange(32))[0]
        self.assertIsNone(fragment_word_sums(fragment_path(self.root, key)))
        self.assertKVEqual(vua.get_closest(torch.arange(32)).data, kv)

    def test_verify_reports_a_wrong_stored_sum(self):
        vua = self.store(split_factor=16, namespace="forged", gpu_checksums=True)
        tokens = torch.arange(32)
        kv = random_kv(1, 32, heads=2, head_dim=128, dtype=torch.bfloat16)
        vua.put(tokens, kv)
        keys = vua.config.tokens_to_paths(tokens)
        self.assertTrue(run_cli_json("verify", self.root, "--index-path", vua.index_path)[1]["clean"])
        # Group 1 again, byte for byte, but for a stored sum one off.
        good = format(fragment_word_sums(fragment_path(self.root, keys[1]))[3], "016x")  # layer 1's value
        wrong = format((int(good, 16) + 1) & MASK, "016x")
        forge_group(
            self.root,
            kv,
            tokens,
            1,
            key_hex=keys[1],
            parent_hex=keys[0],
            namespace="forged",
            host_word_sums=True,
            edit_header=lambda header: header.replace(good.encode(), wrong.encode()),
        )
        _, report = run_cli_json("verify", self.root, "--index-path", vua.index_path)
        self.assertEqual([(p["kind"], p["key"]) for p in report["problems"]], [("damaged-fragment", keys[1])])
        self.assertIn("wordsums mismatch in layers.1.value", report["problems"][0]["detail"])


if __name__ == "__main__":
    unittest.main()
