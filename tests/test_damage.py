"""Damaged stores: every read returns the longest valid prefix or None, logs why, never raises."""

from __future__ import annotations

import os
import struct

import torch

from tests.helpers import (
    StoreTestCase,
    chain_start,
    flip_byte,
    forge_group,
    fragment_metadata,
    fragment_path,
    index_env,
    indexed_groups,
    overwrite,
    random_kv,
)
from vua.core import VUAConfig


class DamageTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.vua = self.store(split_factor=16, namespace="dmg")
        self.tokens = torch.arange(500, 548)  # three groups
        self.kv = random_kv(1, 48, dtype=torch.bfloat16)
        self.vua.put(self.tokens, self.kv)
        self.keys = self.vua.config.tokens_to_paths(self.tokens)

    def path(self, group: int) -> str:
        return fragment_path(self.root, self.keys[group])

    def assertPrefix(self, groups: int, warns: str | None = "vua") -> None:
        def get():
            return self.vua.get_closest(self.tokens, device="cpu")

        if warns:
            with self.assertLogs(warns, level="WARNING") as logs:
                hit = get()
            self.assertTrue(logs.output)
        else:
            hit = get()
        self.assertHit(hit, groups, self.kv)

    def test_truncated_fragment(self):
        os.truncate(self.path(1), os.path.getsize(self.path(1)) - 100)
        self.assertPrefix(1)

    def test_flipped_header_byte(self):
        flip_byte(self.path(2), 20, 0x55)
        self.assertPrefix(2)

    def test_header_length_out_of_range(self):
        overwrite(self.path(0), 0, struct.pack("<Q", 1 << 40))
        self.assertPrefix(0)

    def test_flipped_data_byte_fails_the_checksum(self):
        flip_byte(self.path(1), -3)
        self.assertPrefix(1)

    def test_tokens_that_do_not_match_the_key(self):
        # A well-formed fragment with correct checksums, published under group 1's key,
        # holding other tokens: what a hash collision would look like.
        forged = self.tokens.clone()
        forged[20] = 7
        forge_group(self.root, self.kv, forged, 1, key_hex=self.keys[1], parent_hex=self.keys[0], namespace="dmg")
        self.assertPrefix(1)

    def test_fragment_of_another_group_in_place(self):
        os.replace(self.path(0), self.path(2))
        self.assertPrefix(0)

    def test_missing_fragment_file(self):
        os.unlink(self.path(1))
        self.assertPrefix(1)

    def test_garbage_in_the_index_heals_from_the_tree(self):
        env, groups, _ = index_env(self.vua)
        with env.begin(write=True, db=groups) as txn:
            txn.put(bytes.fromhex(self.keys[0]), b"garbage")
        self.assertPrefix(3, warns="vua._index")
        self.assertEqual(indexed_groups(self.vua, [bytes.fromhex(k) for k in self.keys]), 3)
        self.assertPrefix(3, warns=None)

    def test_group_of_other_namespace_is_refused(self):
        other = self.store(VUAConfig(split_factor=16, namespace="other"))
        # Same directory name, other namespace's fragment: forged by moving it into place.
        other.put(self.tokens, self.kv)
        other_keys = other.config.tokens_to_paths(self.tokens)
        os.replace(fragment_path(self.root, other_keys[1]), self.path(1))
        self.assertPrefix(1)

    def test_damage_never_raises_for_a_batch(self):
        os.unlink(self.path(0))
        with self.assertLogs("vua", level="WARNING"):
            hits = self.vua.get_closest([self.tokens, self.tokens[:16]], device="cpu")
        self.assertEqual(hits, [None, None])

    def test_damaged_group_is_rewritten_by_the_next_put(self):
        os.truncate(self.path(1), 100)
        self.assertPrefix(1)
        self.assertEqual(self.vua.put(self.tokens, self.kv), 1)
        self.assertPrefix(3, warns=None)

    def test_layerwise_load_reports_the_shorter_prefix(self):
        flip_byte(self.path(2), -1)
        with self.assertLogs("vua", level="WARNING"):
            load = self.vua.load(self.tokens, "cpu", layerwise=True)
            groups = load.wait()
        self.assertEqual(groups, 2)
        for i in range(3):
            k, v = load.wait_layer(i)
            self.assertEqual(k.shape[2], 32)
            self.assertTrue(torch.equal(k, self.kv[i][0][:, :, :32]))


class KeyChainTest(StoreTestCase):
    def test_keys_in_fragment_metadata_chain(self):
        vua = self.store(split_factor=16, namespace="chain")
        tokens = torch.arange(64)
        vua.put(tokens, random_kv(1, 64))
        keys = vua.config.tokens_to_paths(tokens)
        for j, key in enumerate(keys):
            parent = fragment_metadata(fragment_path(self.root, key))["parent"]
            self.assertEqual(parent, keys[j - 1] if j else chain_start("chain"))
