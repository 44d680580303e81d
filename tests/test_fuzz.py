"""Seeded fuzzing of stored fragments and index files.

Every trial damages a fresh store in one or more of the ways a failing disk, a careless
operator or an attacker without the store's secrets would, then asserts the promises:
reads never raise, block or die of a signal, every hit is exactly what was put (or
shorter), and ``vua verify --fix`` leaves a clean store that takes the prompt again.

CI runs a few seconds' worth. For a longer hand run:
    VUA_FUZZ_TRIALS=2000 VUA_FUZZ_SEED=7 uv run --group test python -m unittest tests.test_fuzz
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap

import torch

from tests.helpers import (
    StoreTestCase,
    check_hit,
    flip_byte,
    fragment_path,
    overwrite,
    prefix_kv,
    rewrite_header,
    run_cli_json,
)
from vua.core import VUA, VUAConfig

TRIALS = int(os.environ.get("VUA_FUZZ_TRIALS", "40"))
SEED = int(os.environ.get("VUA_FUZZ_SEED", "20261128"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = torch.arange(3000, 3064)  # four groups of 16


def _alias_value_to_key(body: dict) -> None:
    body["layers.0.value"]["data_offsets"] = body["layers.0.key"]["data_offsets"]


def _true_dimension(body: dict) -> None:
    body["tokens"]["shape"] = [True] * len(body["tokens"]["shape"])


def damage_fragment(rng: random.Random, path: str, donors: list[str], outside: str) -> str:
    """Damages the fragment at ``path`` one random way; returns the way's name."""
    size = os.path.getsize(path)
    way = rng.choice(
        [
            "flip",
            "truncate",
            "extend",
            "zero-fill",
            "other-file",
            "dangling-symlink",
            "outside-symlink",
            "delete",
            "directory",
            "fifo",
            "nested-json",
            "overlap",
            "true-dimension",
        ]
    )
    if way == "flip":
        flip_byte(path, rng.randrange(size), 1 << rng.randrange(8))
    elif way == "truncate":
        os.truncate(path, rng.randrange(size))
    elif way == "extend":
        with open(path, "ab") as f:
            f.write(rng.randbytes(rng.randrange(1, 5000)))
    elif way == "zero-fill":
        begin = rng.randrange(size)
        overwrite(path, begin, b"\0" * rng.randrange(1, size - begin + 1))
    elif way == "other-file":
        shutil.copyfile(rng.choice(donors), path)
    elif way in ("dangling-symlink", "outside-symlink"):
        os.unlink(path)
        os.symlink(outside if way == "outside-symlink" else path + ".nowhere", path)
    elif way == "delete":
        os.unlink(path)
    elif way == "directory":
        os.unlink(path)
        os.mkdir(path)
    elif way == "fifo":
        os.unlink(path)
        os.mkfifo(path)
    elif way == "nested-json":
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", 50_000) + b"[" * 50_000)
    elif way == "overlap":
        rewrite_header(path, _alias_value_to_key)
    elif way == "true-dimension":
        rewrite_header(path, _true_dimension)
    return way


class FragmentFuzzTest(StoreTestCase):
    def test_damaged_fragments(self):
        rng = random.Random(SEED)
        outside = os.path.join(self.root, "outside.bin")
        with open(outside, "wb") as f:
            f.write(os.urandom(20_000))
        seen = set()
        for trial in range(TRIALS):
            root = os.path.join(self.root, f"trial-{trial}")
            vua = VUA(VUAConfig(split_factor=16, namespace="fuzz"), root)
            other = VUA(VUAConfig(split_factor=16, namespace="fuzz-other"), root)
            try:
                vua.put(TOKENS, prefix_kv(TOKENS))
                other.put(TOKENS, prefix_kv(TOKENS))
                keys = vua.config.tokens_to_paths(TOKENS)
                donors = [fragment_path(root, k) for k in other.config.tokens_to_paths(TOKENS)]
                donors += [fragment_path(root, k) for k in keys]
                donors = [shutil.copy(d, os.path.join(self.root, f"donor-{i}")) for i, d in enumerate(donors)]
                ways = [
                    damage_fragment(rng, fragment_path(root, key), donors, outside)
                    for key in rng.sample(keys, rng.randint(1, 3))
                ]
                seen.update(ways)
                with self.subTest(trial=trial, ways=ways):
                    self.check_reads(vua, ways)
                    self.assertTrue(run_cli_json("verify", root, "--index-path", vua.index_path, "--fix")[1]["clean"])
                    _, report = run_cli_json("verify", root, "--index-path", vua.index_path)
                    self.assertTrue(report["clean"], [p["kind"] for p in report["problems"]])
                    vua.put(TOKENS, prefix_kv(TOKENS))
                    self.assertEqual(check_hit(vua.get_closest(TOKENS, device="cpu"), TOKENS), 64)
            finally:
                vua.close()
                other.close()
                shutil.rmtree(root, ignore_errors=True)
        if TRIALS >= 40:
            self.assertGreaterEqual(len(seen), 10, "the seed should exercise most kinds of damage")

    def check_reads(self, vua: VUA, ways: list[str]) -> None:
        logging.disable(logging.WARNING)  # each damage logs by design; the assertions are below
        try:
            check_hit(vua.get_closest(TOKENS, device="cpu"), TOKENS)  # exact or shorter
            load = vua.load(TOKENS, "cpu", layerwise=True)
            if load is not None:
                groups = load.wait()
                self.assertLessEqual(groups, 4)
            self.assertIn(vua.prefix_length(TOKENS), (0, 16, 32, 48, 64))
            check_hit(vua.get_closest(TOKENS, device="cpu"), TOKENS)  # and again, after quarantines
        finally:
            logging.disable(logging.NOTSET)


# One child process runs every index trial: a damaged index used to kill its process with
# SIGBUS, which must show as a failed test, not a dead test runner.
_INDEX_TRIALS = """
    import logging, os, random, shutil, sys, tempfile
    import torch
    logging.disable(logging.CRITICAL)
    from tests.helpers import check_hit, edited_record, index_env, index_generation, overwrite, prefix_kv, run_cli_json
    from vua.core import VUA, VUAConfig

    rng = random.Random(int(sys.argv[1]))
    tokens = torch.arange(64)
    for trial in range(int(sys.argv[2])):
        root = tempfile.mkdtemp(dir=sys.argv[3])
        vua = VUA(VUAConfig(split_factor=16, namespace="fuzz"), root)
        vua.put(tokens, prefix_kv(tokens))
        for i in range(60):
            other = torch.arange(i * 1000, i * 1000 + 32)
            vua.put(other, prefix_kv(other))
        way = rng.choice(
            ["truncate", "random-bytes", "meta-bytes", "current", "lock-file", "truncate-while-open",
             "record-lies", "total-bytes", "another-stores-index"]
        )
        if way == "record-lies":  # records that lie about namespace, layout, size or date
            env, groups, _ = index_env(vua)
            with env.begin(write=True, db=groups) as txn:
                for key, raw in list(txn.cursor()):
                    if rng.random() < 0.5:
                        field = rng.choice(["namespace_id", "layout_id", "nbytes", "group_index", "last_used"])
                        bits = 32 if field == "group_index" else 64
                        lie = rng.choice([0, rng.getrandbits(bits), 2**bits - 1])
                        txn.put(key, edited_record(raw, **{field: lie}))
        elif way == "total-bytes":  # the meta entry: the wrong size, or a value near the limit
            env, _, meta = index_env(vua)
            with env.begin(write=True, db=meta) as txn:
                txn.put(b"total_bytes", rng.choice([rng.randbytes(rng.randrange(0, 16)), bytes([255]) * 8]))
        elif way == "truncate-while-open":
            generation = index_generation(vua.index_path)
            os.truncate(os.path.join(generation, "data.mdb"), rng.randrange(8192, 4 * 8192))
            check_hit(vua.get_closest(tokens, device="cpu"), tokens)  # in this process, which has it mapped
        vua.close()
        generation = index_generation(vua.index_path)
        data = os.path.join(generation, "data.mdb")
        size = os.path.getsize(data)
        if way == "another-stores-index":  # same namespace, another dtype: its records name another layout
            other_root = tempfile.mkdtemp(dir=sys.argv[3])
            other = VUA(VUAConfig(split_factor=16, namespace="fuzz"), other_root)
            other.put(tokens, [(k.half(), v.half()) for k, v in prefix_kv(tokens)])
            other.close()
            shutil.rmtree(vua.index_path)
            shutil.copytree(other.index_path, vua.index_path)
            shutil.rmtree(other_root)
        elif way == "truncate":
            os.truncate(data, rng.randrange(size))
        elif way in ("random-bytes", "meta-bytes"):
            offset = rng.randrange(8192) if way == "meta-bytes" else rng.randrange(size)
            overwrite(data, offset, rng.randbytes(rng.choice([1, 8, 64, 4096])))
        elif way == "current":
            with open(os.path.join(vua.index_path, "CURRENT"), "wb") as f:
                f.write(rng.choice([b"../../elsewhere", rng.randbytes(40), b"gen-1-1", b""]))
        else:
            with open(os.path.join(generation, "lock.mdb"), "wb") as f:
                f.write(rng.randbytes(rng.randrange(1, 9000)))
        vua = VUA(VUAConfig(split_factor=16, namespace="fuzz"), root)
        got = check_hit(vua.get_closest(tokens, device="cpu"), tokens)
        vua.prefix_length(tokens)
        vua.put(tokens, prefix_kv(tokens))
        assert check_hit(vua.get_closest(tokens, device="cpu"), tokens) == 64, way
        vua.close()
        assert run_cli_json("verify", root, "--index-path", vua.index_path, "--fix")[1]["clean"], way
        assert run_cli_json("verify", root, "--index-path", vua.index_path)[1]["clean"], way
        print(trial, way, got, flush=True)
        shutil.rmtree(root)
"""


class IndexFuzzTest(StoreTestCase):
    def test_damaged_index_files(self):
        trials = max(5, TRIALS // 3)
        child = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_INDEX_TRIALS), str(SEED), str(trials), self.root],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        self.assertEqual(
            child.returncode,
            0,
            f"index fuzz child failed ({child.returncode}):\n{child.stdout[-1000:]}{child.stderr[-3000:]}",
        )
        self.assertEqual(len(child.stdout.splitlines()), trials)
