"""The core store: put, get_closest, keys, layout on disk, namespaces, bad input."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

import safetensors.torch
import torch
import xxhash
from safetensors import safe_open

from tests.helpers import (
    StoreTestCase,
    check_hit,
    flip_byte,
    group_dir,
    indexed_groups,
    kv_slice,
    listing,
    prefix_kv,
    random_kv,
    run_cli,
    same_bits,
)
from vua.core import VUA, ClosestKV, SplitFactorError, VUAConfig
from vua.errors import FragmentError, FragmentState, InvalidInputError, NotAStoreError, StorageError, VUAError

ROOT_OF_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class KeyTest(unittest.TestCase):
    def test_fixed_tokens_have_fixed_keys(self):
        # Written down once: a change here means every stored cache becomes unreachable.
        self.assertEqual(
            VUAConfig.tokens_to_paths(torch.arange(512)),
            ["0c2fa7256bcddddcd845c6825af509f5", "6939b2b8828b51983a1c3029d8fb1630"],
        )
        config = VUAConfig(split_factor=128, namespace="llama-3.1-8b/bf16/tp0-of-2")
        self.assertEqual(
            config.tokens_to_paths(torch.arange(256)),
            ["505639b5faa08fd4f1adb0825f13748d", "5214a126379114cfba37e914da72165f"],
        )

    def test_key_is_the_documented_chain(self):
        tokens = torch.arange(1000, 1512)
        seed = xxhash.xxh3_128_digest(b"vua/group-key/v1\x00" + b"ns")
        ids = tokens.numpy().astype("<i8")
        h0 = xxhash.xxh3_128_digest(seed + ids[:256].tobytes())
        h1 = xxhash.xxh3_128_digest(h0 + ids[256:].tobytes())
        self.assertEqual(VUAConfig(namespace="ns").tokens_to_paths(tokens), [h0.hex(), h1.hex()])

    def test_token_dtype_does_not_change_keys(self):
        ids = torch.randint(0, 0xFFFF, (768,))
        keys = {tuple(VUAConfig.tokens_to_paths(ids.to(dt))) for dt in (torch.uint16, torch.int32, torch.int64)}
        self.assertEqual(len(keys), 1)
        self.assertEqual(len(next(iter(keys))), 3)

    def test_keys_need_whole_groups_and_2d_rows_work(self):
        ids = torch.arange(768)
        self.assertEqual(VUAConfig.tokens_to_paths(ids), VUAConfig.tokens_to_paths(ids[None, :]))
        self.assertEqual(len(VUAConfig.tokens_to_paths(ids)), 3)
        self.assertEqual(VUAConfig.tokens_to_paths(ids[:0]), [])
        # As the original project documents: a partial group is the caller's to trim.
        with self.assertRaisesRegex(SplitFactorError, r"700 tokens, not a multiple of split_factor=256.*here to 512"):
            VUAConfig.tokens_to_paths(ids[:700])
        self.assertEqual(VUAConfig.tokens_to_path(ids), VUAConfig.tokens_to_paths(ids))  # the other spelling

    def test_namespace_changes_every_key(self):
        a = VUAConfig(namespace="a").tokens_to_paths(torch.arange(512))
        b = VUAConfig(namespace="b").tokens_to_paths(torch.arange(512))
        self.assertFalse(set(a) & set(b))

    def test_trim_keeps_rank(self):
        self.assertEqual(VUAConfig.trim_to_split_factor(torch.arange(600)).shape, (512,))
        self.assertEqual(VUAConfig.trim_to_split_factor(torch.arange(600)[None]).shape, (1, 512))
        self.assertEqual(VUAConfig(split_factor=128).trim_to_split_factor(torch.arange(600)[None]).shape, (1, 512))
        self.assertEqual(VUAConfig(split_factor=100).trim_to_split_factor(torch.arange(250)).shape, (200,))


class RoundTripTest(StoreTestCase):
    def test_every_dtype_round_trips_bit_for_bit(self):
        dtypes = [
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.float8_e4m3fn,
            torch.float8_e5m2,
            torch.int8,
            torch.uint8,
            torch.int32,
        ]
        vua = self.store()
        for i, dtype in enumerate(dtypes):
            with self.subTest(dtype=dtype):
                tokens = torch.randint(0, 50_000, (48,)) + i * 100_000  # distinct prefixes per dtype
                source = random_kv(1, 48, dtype=torch.float32 if dtype.itemsize == 1 else dtype, seed=i)
                kv = [(k.to(dtype), v.to(dtype)) for k, v in source]
                self.assertEqual(vua.put(tokens, kv), 3)
                hit = vua.get_closest(tokens, device="cpu")
                self.assertIsInstance(hit, ClosestKV)
                self.assertTrue(torch.equal(hit.tokens, tokens))
                self.assertKVEqual(hit.data, kv)

    def test_query_longer_shorter_and_diverging(self):
        vua = self.store()
        tokens = torch.arange(64)
        kv = random_kv(1, 64)
        vua.put(tokens, kv)

        longer = torch.cat([tokens, torch.arange(1000, 1040)])
        hit = vua.get_closest(longer, device="cpu")
        self.assertTrue(torch.equal(hit.tokens, tokens))
        self.assertKVEqual(hit.data, kv_slice(kv, 0, 64))

        shorter = tokens[:40]  # two whole groups and a partial one
        hit = vua.get_closest(shorter, device="cpu")
        self.assertTrue(torch.equal(hit.tokens, tokens[:32]))
        self.assertKVEqual(hit.data, kv_slice(kv, 0, 32))

        diverging = tokens.clone()
        diverging[35] = 9999  # group 2 differs
        hit = vua.get_closest(diverging, device="cpu")
        self.assertEqual(hit.tokens.numel(), 32)
        self.assertKVEqual(hit.data, kv_slice(kv, 0, 32))

        self.assertIsNone(vua.get_closest(tokens[1:], device="cpu"))
        self.assertIsNone(vua.get_closest(tokens[:15], device="cpu"))

    def test_query_rank_is_kept(self):
        vua = self.store()
        tokens = torch.arange(32, dtype=torch.int32)
        vua.put(tokens[None], random_kv(1, 32))
        self.assertEqual(vua.get_closest(tokens[None], device="cpu").tokens.shape, (1, 32))
        self.assertEqual(vua.get_closest(tokens, device="cpu").tokens.shape, (32,))
        self.assertEqual(vua.get_closest(tokens[None], device="cpu").tokens.dtype, torch.int32)

    def test_kv_longer_than_tokens_and_noncontiguous_kv(self):
        vua = self.store()
        tokens = torch.arange(32)
        kv = random_kv(1, 40)  # positions 32..39 must be ignored
        # A (batch, seq, heads, dim) tensor transposed to (batch, heads, seq, dim): not contiguous.
        bshd = torch.randn(1, 40, 2, 8)
        kv[1] = (bshd.transpose(1, 2), kv[1][1])
        vua.put(tokens, kv)
        hit = vua.get_closest(tokens, device="cpu")
        self.assertKVEqual(hit.data, kv_slice(kv, 0, 32))

    def test_put_skips_stored_groups(self):
        vua = self.store()
        tokens = torch.arange(64)
        self.assertEqual(vua.put(tokens[:32], random_kv(1, 32)), 2)
        self.assertEqual(vua.put(tokens, random_kv(1, 64)), 2)
        self.assertEqual(vua.put(tokens, random_kv(1, 64)), 0)
        self.assertEqual(len(glob.glob(os.path.join(self.root, "*", "*", "kv.safetensors"))), 4)

    def test_put_with_offset_and_prefix_length(self):
        vua = self.store()
        tokens = torch.arange(64)
        kv = random_kv(1, 64)
        vua.put(tokens[:32], kv_slice(kv, 0, 32))
        self.assertEqual(vua.prefix_length(tokens), 32)
        tail = [(k[:, :, 32:], v[:, :, 32:]) for k, v in kv]  # only the KV past the stored prefix
        self.assertEqual(vua.put(tokens, tail, offset=32), 2)
        self.assertEqual(vua.prefix_length(tokens), 64)
        self.assertEqual(vua.prefix_length(tokens[None, :40]), 32)
        self.assertKVEqual(vua.get_closest(tokens, device="cpu").data, kv)
        with self.assertRaisesRegex(InvalidInputError, "offset must be a multiple"):
            vua.put(tokens, tail, offset=20)

    def test_first_writer_wins(self):
        vua = self.store()
        tokens = torch.arange(32)
        first, second = random_kv(1, 32, seed=1), random_kv(1, 32, seed=2)
        vua.put(tokens, first)
        other = self.store(VUAConfig(split_factor=16, index_path=os.path.join(self.root, "elsewhere")))
        self.assertEqual(other.put(tokens, second), 0)  # found on disk although its index was empty
        self.assertKVEqual(vua.get_closest(tokens, device="cpu").data, first)

    def test_batched_put_and_get(self):
        vua = self.store()
        tokens = torch.stack([torch.arange(48), torch.arange(48) + 1000, torch.arange(48)])
        tokens[2, 20] = -5  # row 2 shares group 0 with row 0 only
        kv = random_kv(3, 48)
        for k, v in kv:  # equal prefixes have equal KV
            k[2, :, :16], v[2, :, :16] = k[0, :, :16], v[0, :, :16]
        self.assertEqual(vua.put(tokens, kv), 3 + 3 + 2)
        hits = vua.get_closest([tokens[0], tokens[1], tokens[2], torch.arange(5000, 5048)], device="cpu")
        self.assertEqual(len(hits), 4)
        self.assertKVEqual(hits[0].data, kv_slice(kv, 0, 48))
        self.assertKVEqual(hits[1].data, kv_slice(kv, 1, 48))
        self.assertKVEqual(hits[2].data, kv_slice(kv, 2, 48))
        self.assertIsNone(hits[3])

    def test_namespaces_are_isolated(self):
        a = self.store(split_factor=16, namespace="model-a/bf16")
        b = self.store(split_factor=16, namespace="model-b/bf16")
        tokens = torch.arange(32)
        a.put(tokens, random_kv(1, 32))
        self.assertIsNone(b.get_closest(tokens, device="cpu"))
        self.assertEqual(b.put(tokens, random_kv(1, 32, seed=5)), 2)
        self.assertKVEqual(a.get_closest(tokens, device="cpu").data, random_kv(1, 32))
        self.assertKVEqual(b.get_closest(tokens, device="cpu").data, random_kv(1, 32, seed=5))

    def test_missing_index_is_rebuilt_from_fragments(self):
        vua = self.store()
        tokens = torch.arange(48)
        kv = random_kv(1, 48)
        vua.put(tokens, kv)
        vua.close()
        shutil.rmtree(os.path.join(self.root, "index.lmdb"))
        fresh = self.store()
        keys = [bytes.fromhex(k) for k in fresh.config.tokens_to_paths(tokens)]
        self.assertEqual(indexed_groups(fresh, keys), 3)  # rebuilt at open, before any get
        self.assertKVEqual(fresh.get_closest(tokens, device="cpu").data, kv)

    def test_index_path_is_configurable(self):
        index_dir = tempfile.mkdtemp(prefix="vua-index-")
        self.addCleanup(shutil.rmtree, index_dir, ignore_errors=True)
        vua = self.store(split_factor=16, index_path=index_dir)
        vua.put(torch.arange(16), random_kv(1, 16))
        self.assertFalse(os.path.exists(os.path.join(self.root, "index.lmdb")))
        self.assertTrue(os.path.exists(os.path.join(index_dir, "CURRENT")))


class FragmentFormatTest(StoreTestCase):
    def test_fragment_is_a_safetensors_file_with_metadata(self):
        vua = self.store(split_factor=16, namespace="ns")
        tokens = torch.arange(32)
        kv = random_kv(1, 32, dtype=torch.bfloat16)
        vua.put(tokens, kv)
        keys = vua.config.tokens_to_paths(tokens)
        path = os.path.join(self.root, keys[1][:2], keys[1], "kv.safetensors")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            self.assertEqual(meta["namespace"], "ns")
            self.assertEqual(meta["group_index"], "1")
            self.assertEqual(meta["parent"], keys[0])
            self.assertEqual(meta["key"], keys[1])
            self.assertEqual(meta["split_factor"], "16")
            self.assertEqual(meta["format"], "vua.fragment")
            self.assertTrue(torch.equal(f.get_tensor("tokens"), tokens[16:]))
            self.assertTrue(same_bits(f.get_tensor("layers.2.value"), kv[2][1][0, :, 16:32]))
        loaded = safetensors.torch.load_file(path)
        self.assertEqual(len(loaded), 1 + 2 * 3)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
        self.assertEqual((8 + header_len) % 4096, 0)  # tensor data is 4 KiB-aligned

    def test_umask_decides_file_mode_unless_configured(self):
        old = os.umask(0o027)
        try:
            self.store().put(torch.arange(16), random_kv(1, 16))
            path = glob.glob(os.path.join(self.root, "*", "*", "kv.safetensors"))[0]
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)
            self.store(split_factor=16, file_mode=0o644).put(torch.arange(100, 116), random_kv(1, 16))
            modes = {os.stat(p).st_mode & 0o777 for p in glob.glob(os.path.join(self.root, "*", "*", "kv.safetensors"))}
            self.assertEqual(modes, {0o640, 0o644})
        finally:
            os.umask(old)


class BadInputTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.vua = self.store()
        self.vua.put(torch.arange(100, 132), random_kv(1, 32))
        self.before = listing(self.root)

    def assertRejected(self, error, tokens, data, fragment):
        with self.assertRaises(error) as ctx:
            self.vua.put(tokens, data)
        self.assertIsInstance(ctx.exception, VUAError)
        self.assertIn(fragment, str(ctx.exception))
        self.assertEqual(listing(self.root), self.before)

    def test_split_factor(self):
        self.assertRejected(SplitFactorError, torch.arange(20), random_kv(1, 20), "trim_to_split_factor")
        self.assertTrue(issubclass(SplitFactorError, ValueError))

    def test_split_factor_advice_is_this_stores_own_trim(self):
        # The class-level VUAConfig.trim_to_split_factor cuts to 256: wrong for this store.
        store = self.store(split_factor=32)
        tokens, kv = torch.arange(300), random_kv(1, 300)
        with self.assertRaises(SplitFactorError) as ctx:
            store.put(tokens, kv)
        message = str(ctx.exception)
        self.assertIn("split_factor=32", message)
        self.assertIn("vua.config.trim_to_split_factor(tokens) (here to 288)", message)
        self.assertNotIn("VUAConfig.trim_to_split_factor", message)
        trimmed = store.config.trim_to_split_factor(tokens)  # the advice, followed
        self.assertEqual(store.put(trimmed, kv), 9)
        with self.assertRaises(SplitFactorError) as ctx:
            store.config.tokens_to_paths(tokens)
        self.assertIn("config.trim_to_split_factor(tokens) on this same config (here to 288)", str(ctx.exception))
        self.assertNotIn("VUAConfig.", str(ctx.exception))

    def test_token_rank_and_dtype(self):
        self.assertRejected(
            InvalidInputError, torch.arange(32).view(1, 1, 32), random_kv(1, 32), "[n], [1, n] or [B, n]"
        )
        self.assertRejected(InvalidInputError, torch.arange(32).float(), random_kv(1, 32), "tokens.long()")
        with self.assertRaisesRegex(InvalidInputError, "list of 1-D tensors"):
            self.vua.get_closest(torch.zeros(2, 32, dtype=torch.long), device="cpu")

    def test_kv_shorter_than_tokens(self):
        self.assertRejected(InvalidInputError, torch.arange(32), random_kv(1, 16), "fewer than the 32 tokens")

    def test_kv_batch_disagrees(self):
        self.assertRejected(InvalidInputError, torch.arange(32), random_kv(2, 32), "batch 2 but tokens has 1 rows")

    def test_mixed_dtypes(self):
        kv = random_kv(1, 32)
        kv[1] = (kv[1][0].half(), kv[1][1].half())
        self.assertRejected(InvalidInputError, torch.arange(32), kv, "one dtype")

    def test_malformed_data(self):
        self.assertRejected(InvalidInputError, torch.arange(32), [], "non-empty list")
        self.assertRejected(InvalidInputError, torch.arange(32), [(torch.zeros(1, 2, 32, 8),)], "(key, value) pair")
        self.assertRejected(
            InvalidInputError, torch.arange(32), [(torch.zeros(2, 32, 8), torch.zeros(2, 32, 8))], "4-D tensor"
        )

    @unittest.skipIf(torch.cuda.is_available(), "this machine has CUDA")
    def test_cuda_device_without_cuda(self):
        with self.assertRaisesRegex(InvalidInputError, "no CUDA device; pass device='cpu'"):
            self.vua.get_closest(torch.arange(100, 132), device="cuda")
        with self.assertRaisesRegex(InvalidInputError, "not supported"):
            self.vua.get_closest(torch.arange(100, 132), device="meta")

    def test_messages_say_what_to_pass(self):
        cases = [
            (lambda: self.vua.get_closest([1, 2, 3]), "pass torch.tensor(ids)"),
            (lambda: self.vua.get_closest(torch.arange(32), device="gpu"), "pass 'cpu', 'cuda' or 'cuda:N'"),
            (lambda: self.vua.get_closest(torch.arange(32), device=7.5), "not a torch device"),
            (lambda: VUAConfig.trim_to_split_factor([1, 2, 3]), "torch.tensor(ids)"),
            (lambda: self.vua.get_closest(torch.arange(32, device="meta")), "meta device"),
            (lambda: self.vua.prefix_length(torch.arange(32).to_sparse()), "to_dense()"),
        ]
        for call, fragment in cases:
            with self.subTest(fragment), self.assertRaises(InvalidInputError) as ctx:
                call()
            self.assertIn(fragment, str(ctx.exception))
        # KV in the [batch, seq, heads, head_dim] layout: the message names the transpose.
        seq_first = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in random_kv(1, 32, heads=4)]
        self.assertRejected(InvalidInputError, torch.arange(32), seq_first, "pass k.transpose(1, 2)")
        self.assertRejected(
            InvalidInputError, torch.arange(32), [(torch.zeros(1, 2, 32, 8).to_sparse(),) * 2], "to_dense()"
        )
        meta_kv = [(torch.zeros(1, 2, 32, 8, device="meta"),) * 2]
        self.assertRejected(InvalidInputError, torch.arange(32), meta_kv, "meta device")

    def test_config_values_are_checked(self):
        bad = {
            "namespace": [5, b"bytes", None, "\udc80"],
            "split_factor": [True, 0, -16, 16.0, "16"],
            "max_bytes": ["1G", -1, 1.5],
            "file_mode": [0o7777, 0o4644, 0o1000000, -1, "644"],
            "io_threads": [0, None],
            "staging_bytes": [-1],
            "verify_checksums": [1, None],
            "gpu_checksums": ["yes"],
            "index_path": [5],
        }
        for field, values in bad.items():
            for value in values:
                with self.subTest(field=field, value=value), self.assertRaises(InvalidInputError) as ctx:
                    VUA(VUAConfig(**{field: value}), os.path.join(self.root, "other"))
                self.assertIn(f"VUAConfig.{field} must be", str(ctx.exception))
        self.assertFalse(os.path.exists(os.path.join(self.root, "other")))  # refused before touching the disk

    def test_mistyped_root_is_refused(self):
        deep = os.path.join(self.root, "mnt", "kv-typo", "store")
        with self.assertRaisesRegex(NotAStoreError, "parent .* does not exist; check the path"):
            VUA(VUAConfig, deep)
        self.assertFalse(os.path.exists(os.path.join(self.root, "mnt")))
        VUA(VUAConfig, deep, create_parents=True).close()
        self.assertTrue(os.path.isdir(deep))

    def test_mistyped_index_path_is_refused(self):
        root, typo = os.path.join(self.root, "store"), os.path.join(self.root, "x", "nonexistent", "idx")
        with self.assertRaises(NotAStoreError) as ctx:
            VUA(VUAConfig(index_path=typo), root)
        self.assertEqual(
            str(ctx.exception),
            f"cannot create the index at {typo}: its parent {os.path.dirname(typo)} does not exist; "
            "check VUAConfig.index_path, or pass VUA(..., create_parents=True) to create it all",
        )
        self.assertFalse(os.path.exists(os.path.join(self.root, "x")))
        self.assertFalse(os.path.exists(root))  # refused before anything was made
        VUA(VUAConfig(index_path=typo), root, create_parents=True).close()
        self.assertTrue(os.path.isdir(typo))

    def test_an_index_path_naming_a_file_is_refused(self):
        index_file = os.path.join(self.root, "index-file")
        with open(index_file, "w") as f:
            f.write("not an index")
        for create_parents in (False, True):  # NotADirectoryError escaped, before
            with (
                self.subTest(create_parents=create_parents),
                self.assertRaisesRegex(NotAStoreError, "VUAConfig.index_path .*index-file is not a directory"),
            ):
                VUA(VUAConfig(index_path=index_file), os.path.join(self.root, "store"), create_parents=create_parents)
        status, _, err = run_cli("stats", self.root, "--index-path", index_file)
        self.assertEqual(status, 2)
        self.assertIn("--index-path", err)

    def test_root_given_as_bytes(self):
        tokens = torch.arange(32)
        vua = self.store(VUAConfig(split_factor=16), os.fsencode(self.root))  # TypeError, before
        self.assertEqual((vua.root, vua.put(tokens, prefix_kv(tokens))), (self.root, 2))
        self.assertEqual(check_hit(vua.get_closest(tokens), tokens), 32)

    def test_root_may_be_a_symlink_to_a_directory(self):
        # A common deployment: /data/vua -> /mnt/nvme0/vua.
        real = os.path.join(self.root, "real")
        os.mkdir(real)
        link = os.path.join(self.root, "link")
        os.symlink(real, link)
        vua = VUA(VUAConfig(split_factor=16), link)
        self.addCleanup(vua.close)
        tokens = torch.arange(32)
        self.assertEqual(vua.put(tokens, prefix_kv(tokens)), 2)
        self.assertEqual(check_hit(vua.get_closest(tokens), tokens), 32)
        self.assertTrue(os.path.islink(link))

    def test_unusable_root(self):
        path = os.path.join(self.root, "a-file")
        with open(path, "w") as f:
            f.write("x")
        with self.assertRaisesRegex(StorageError, "writable directory"):
            VUA(VUAConfig, path)
        self.assertTrue(issubclass(StorageError, OSError))


class FragmentErrorTest(unittest.TestCase):
    def test_one_state_and_the_older_booleans(self):
        cases = [
            ({}, FragmentState.DAMAGED, True, False),
            ({"state": FragmentState.UNREADABLE}, FragmentState.UNREADABLE, False, False),
            ({"state": FragmentState.MISSING}, FragmentState.MISSING, False, True),
            ({"damaged": False}, FragmentState.UNREADABLE, False, False),
            ({"damaged": False, "missing": True}, FragmentState.MISSING, False, True),
        ]
        for kwargs, state, damaged, missing in cases:
            exc = FragmentError("fragment x: wrong", **kwargs)
            self.assertEqual((exc.state, exc.damaged, exc.missing), (state, damaged, missing), kwargs)
        with self.assertRaises(AttributeError):
            exc.damaged = True  # type: ignore[misc]
        with self.assertRaisesRegex(TypeError, "not both"):
            FragmentError("x", state=FragmentState.MISSING, missing=True)


class NoPickleTest(unittest.TestCase):
    def test_no_pickle_anywhere(self):
        # Loading a pickle runs code; a store shared by many machines must never do that.
        forbidden = re.compile(
            r"import pickle|(?<!safetensors\.)torch\.load\(|allow_pickle=True|import dill|cloudpickle"
        )
        for folder in ("vua", "tools", "examples"):
            for dirpath, _, files in os.walk(os.path.join(ROOT_OF_REPO, folder)):
                for name in files:
                    if name.endswith(".py"):
                        with open(os.path.join(dirpath, name)) as f:
                            found = forbidden.search(f.read())
                        self.assertIsNone(found, f"{name} uses {found and found.group()}")


class ReadmeExampleTest(unittest.TestCase):
    def test_original_example_runs_verbatim(self):
        code = textwrap.dedent(
            """
            import os
            import torch
            from vua.core import VUA, VUAConfig

            cache_dir = "./vua_cache"
            os.makedirs(cache_dir, exist_ok=True)
            vua = VUA(VUAConfig, cache_dir)

            tokens = torch.randint(0, 0xFFFF, (1, 512), dtype=torch.uint16)
            trimmed_tokens = VUAConfig.trim_to_split_factor(tokens)
            kvcache = [[torch.randn(1, 2, trimmed_tokens.size(1), 64), torch.randn(1, 2, trimmed_tokens.size(1), 64)]]
            vua.put(trimmed_tokens, kvcache)

            result = vua.get_closest(trimmed_tokens, device="cpu")
            print("Retrieved tokens:", result.tokens)
            print("Retrieved data:", result.data)
            assert torch.equal(result.data[0][0], kvcache[0][0]) and torch.equal(result.data[0][1], kvcache[0][1])
            """
        )
        with tempfile.TemporaryDirectory() as cwd:
            env = dict(os.environ, PYTHONPATH=ROOT_OF_REPO)
            done = subprocess.run(
                [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("Retrieved tokens: tensor([[", done.stdout)
            self.assertIn("Retrieved data: [(tensor([[[[", done.stdout)
            self.assertEqual(len(glob.glob(os.path.join(cwd, "vua_cache", "*", "*", "kv.safetensors"))), 2)


class SerdesTest(unittest.TestCase):
    def test_round_trip_and_interop_every_dtype(self):
        from vua.serdes import bytes_to_tensor, tensor_to_bytes

        for dtype in (
            torch.float32,
            torch.bfloat16,
            torch.float16,
            torch.float8_e4m3fn,
            torch.float8_e5m2,
            torch.int64,
            torch.bool,
        ):
            with self.subTest(dtype=dtype):
                t = torch.randn(3, 5).to(dtype)
                raw = tensor_to_bytes(t, "x")
                self.assertTrue(same_bits(safetensors.torch.load(raw)["x"], t))
                self.assertTrue(same_bits(bytes_to_tensor(raw, "x"), t))
                theirs = safetensors.torch.save({"y": t})
                self.assertTrue(same_bits(bytes_to_tensor(theirs, "y"), t))

    def test_bad_bytes_and_names(self):
        from vua.serdes import bytes_to_tensor, tensor_to_bytes

        with self.assertRaisesRegex(InvalidInputError, "not a safetensors file"):
            bytes_to_tensor(b"nonsense", "x")
        with self.assertRaisesRegex(InvalidInputError, "no tensor named 'z'"):
            bytes_to_tensor(tensor_to_bytes(torch.zeros(2), "x"), "z")


if __name__ == "__main__":
    unittest.main()


class StatsTest(StoreTestCase):
    def test_counters_follow_puts_hits_misses_and_damage(self):
        vua = self.store(split_factor=16, namespace="stats")
        tokens = torch.arange(48)
        kv = random_kv(1, 48)
        self.assertEqual(vua.put(tokens, kv), 3)
        self.assertEqual(vua.put(tokens, kv), 0)  # already stored: nothing published
        self.assertIsNotNone(vua.get_closest(tokens))
        self.assertIsNone(vua.get_closest(torch.arange(1000, 1032)))
        stats = vua.stats()
        group_bytes = 3 * 2 * 2 * 16 * 8 * 4  # layers, K|V, heads, tokens, head_dim, float32
        self.assertEqual(
            (stats.lookups, stats.lookup_tokens, stats.hit_tokens, stats.groups_loaded, stats.bytes_loaded),
            (2, 48 + 32, 48, 3, 3 * group_bytes),
        )
        self.assertEqual((stats.groups_saved, stats.load_errors), (3, 0))
        self.assertEqual(stats.bytes_saved, sum(size for name, size in listing(self.root)))
        self.assertGreater(stats.load_seconds, 0)
        self.assertGreater(stats.save_seconds, 0)
        flip_byte(os.path.join(self.root, listing(self.root)[0][0]), -3)  # one group's last V byte
        with self.assertLogs("vua", level="WARNING"):
            vua.get_closest(tokens)
        self.assertEqual(vua.stats().load_errors, 1)


class MissReasonTest(StoreTestCase):
    """A miss whose cause is a setting (namespace, split factor, layout) says so once, at WARNING."""

    def assertOneWarning(self, logs, *parts: str) -> None:
        lines = [line for line in logs.output if line.startswith("WARNING:")]
        self.assertEqual(len(lines), 1, lines)
        for part in parts:
            self.assertIn(part, lines[0])

    def test_another_namespace(self):
        tokens = torch.arange(64)
        self.store(split_factor=16, namespace="model-a").put(tokens, random_kv(1, 64))
        reader = self.store(split_factor=16, namespace="model-b")
        with self.assertLogs("vua", level="WARNING") as logs:
            for _ in range(3):  # once per cause per store, not per get
                self.assertIsNone(reader.get_closest(tokens, device="cpu"))
            self.assertEqual(reader.prefix_length(tokens), 0)
        self.assertOneWarning(
            logs,
            "this store's namespace 'model-b' (split_factor 16)",
            "stored under namespace 'model-a' (split_factor 16)",
            "VUAConfig(namespace='model-a')",
        )

    def test_another_split_factor(self):
        tokens = torch.arange(64)
        self.store(split_factor=32, namespace="m").put(tokens, random_kv(1, 64))
        reader = self.store(split_factor=16, namespace="m")
        with self.assertLogs("vua", level="WARNING") as logs:
            self.assertEqual(reader.prefix_length(tokens), 0)  # the scheduler's question says it too
            self.assertIsNone(reader.get_closest(tokens, device="cpu"))
        self.assertOneWarning(
            logs, "this store's split_factor 16 (namespace 'm')", "stored with split_factor 32", "split_factor=32)"
        )

    def test_another_layout_past_a_prefix(self):
        # Groups 0-1 put by one model, groups 2-3 of the same prompt by another one sharing the namespace.
        tokens = torch.arange(64)
        other_root = tempfile.mkdtemp(prefix="vua-other-")
        self.addCleanup(shutil.rmtree, other_root, ignore_errors=True)
        self.store(split_factor=16, namespace="shared").put(tokens[:32], random_kv(1, 32, heads=2))
        self.store(split_factor=16, namespace="shared", root=other_root).put(tokens, random_kv(1, 64, heads=4))
        for key in VUAConfig(split_factor=16, namespace="shared").tokens_to_paths(tokens)[2:]:
            shutil.copytree(group_dir(other_root, key), group_dir(self.root, key))
        self.assertEqual(run_cli("rebuild-index", self.root)[0], 0)  # the index now records both layouts
        reader = self.store(split_factor=16, namespace="shared")
        with self.assertLogs("vua", level="WARNING") as logs:
            for _ in range(2):
                self.assertEqual(reader.get_closest(tokens, device="cpu").tokens.numel(), 32)
        self.assertOneWarning(
            logs, "miss past group 2", "layers of 2 KV heads", "group 2 with layout", "layers of 4 KV heads", "'shared'"
        )

    def test_a_plain_miss_says_nothing(self):
        vua = self.store(split_factor=16, namespace="m")
        vua.put(torch.arange(64), random_kv(1, 64))
        with self.assertNoLogs("vua", level="WARNING"):
            self.assertIsNone(vua.get_closest(torch.arange(1000, 1064), device="cpu"))
            self.assertEqual(vua.get_closest(torch.arange(80), device="cpu").tokens.numel(), 64)
