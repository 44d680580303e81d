"""Hostile and failing files: whatever stands in a fragment's or the index's place, reads end
the prefix (or rebuild the index) and never raise, block or die of a signal.

Each test reproduces one finding of the damage probes first (it fails against the code
before the fix), then checks the fix. Cases that used to kill the process (SIGBUS) run in
a child process, so a regression is a failed test rather than a dead test runner.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from unittest import mock

import lmdb
import torch

from tests.helpers import (
    INDEX_CURRENT_FILE,
    TMP_PREFIX,
    StoreTestCase,
    edited_record,
    evict_group,
    fanout_dir,
    forget_in_index,
    fragment_metadata,
    fragment_path,
    group_dir,
    index_data_file_is_sound,
    index_env,
    index_generation,
    index_records,
    index_total_bytes,
    index_writes_fail,
    kv_slice,
    listing,
    overwrite,
    prefix_kv,
    quarantine_group,
    random_kv,
    rewrite_header,
    run_cli,
    run_cli_json,
    small_tmpfs,
    temporaries,
)
from vua import _evict
from vua.core import VUAConfig
from vua.errors import FragmentError, FragmentState, InvalidInputError, StorageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``script`` in a fresh Python with the repository importable; a signal shows in returncode."""
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class HostileStoreTestCase(StoreTestCase):
    """A store with three stored groups and a ``get`` that asserts the prefix it returns."""

    def setUp(self):
        super().setUp()
        self.vua = self.store(split_factor=16, namespace="hostile")
        self.tokens = torch.arange(700, 748)  # three groups
        self.kv = random_kv(1, 48, heads=1)
        self.vua.put(self.tokens, self.kv)
        self.keys = self.vua.config.tokens_to_paths(self.tokens)

    def path(self, group: int) -> str:
        return fragment_path(self.root, self.keys[group])

    def verify(self, *flags: str) -> dict:
        """``vua verify``'s report on this store (its JSON)."""
        return run_cli_json("verify", self.root, "--index-path", self.vua.index_path, *flags)[1]

    def assertPrefix(self, groups: int, vua=None) -> None:
        self.assertHit((vua or self.vua).get_closest(self.tokens, device="cpu"), groups, self.kv)


class NonRegularFragmentTest(HostileStoreTestCase):
    def test_directory_in_place_of_the_fragment(self):
        os.unlink(self.path(1))
        os.mkdir(self.path(1))
        with self.assertLogs("vua", level="WARNING"):
            self.assertPrefix(1)
        # Moved aside as damage, so the next put writes the group again.
        self.assertEqual(self.vua.put(self.tokens, self.kv), 1)
        self.assertPrefix(3)

    def test_the_state_says_damaged_or_missing(self):
        os.unlink(self.path(1))
        with self.assertRaises(FragmentError) as missing:
            fragment_metadata(self.path(1))
        self.assertEqual((missing.exception.state, missing.exception.damaged), (FragmentState.MISSING, False))
        os.mkdir(self.path(1))
        with self.assertRaises(FragmentError) as damaged:
            fragment_metadata(self.path(1))
        self.assertEqual((damaged.exception.state, damaged.exception.missing), (FragmentState.DAMAGED, False))

    def test_fifo_in_place_of_the_fragment_does_not_block(self):
        os.unlink(self.path(1))
        os.mkfifo(self.path(1))

        def stuck(signum, frame):
            raise TimeoutError("get_closest blocked on a FIFO")

        previous = signal.signal(signal.SIGALRM, stuck)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        signal.alarm(20)
        try:
            with self.assertLogs("vua", level="WARNING"):
                self.assertPrefix(1)
            self.assertEqual(self.vua.prefix_length(self.tokens), 16)  # the FIFO group went aside
        finally:
            signal.alarm(0)

    def test_verify_reports_and_removes_a_non_regular_fragment(self):
        os.unlink(self.path(2))
        os.mkfifo(self.path(2))
        report = self.verify()
        self.assertEqual([p["kind"] for p in report["problems"]], ["damaged-fragment"])
        self.assertTrue(self.verify("--fix")["clean"])
        self.assertTrue(self.verify()["clean"])


class HostileHeaderTest(HostileStoreTestCase):
    def nest(self, group: int) -> None:
        with open(self.path(group), "wb") as f:
            f.write(struct.pack("<Q", 100_000) + b"[" * 100_000)

    def test_deeply_nested_header(self):
        self.nest(1)
        with self.assertLogs("vua", level="WARNING"):
            self.assertPrefix(1)

    def test_deeply_nested_header_in_the_cli_and_a_rebuild(self):
        self.nest(2)
        report = self.verify()
        self.assertEqual([p["kind"] for p in report["problems"]], ["damaged-fragment"])
        self.assertIn("nested too deeply", report["problems"][0]["detail"])
        status, summary = run_cli_json("rebuild-index", self.root, "--index-path", self.vua.index_path)
        self.assertEqual((status, summary["groups"], summary["damaged"]), (0, 2, 1))
        # A store opened with no index at all builds it from the tree, skipping the damage.
        fresh = self.store(VUAConfig(split_factor=16, namespace="hostile", index_path=self.root + "-idx"))
        self.addCleanup(lambda: __import__("shutil").rmtree(self.root + "-idx", ignore_errors=True))
        with self.assertLogs("vua", level="WARNING"):
            self.assertPrefix(2, fresh)

    def test_true_as_a_dimension(self):
        def edit(body):
            body["layers.0.key"]["shape"][0] = True  # heads == 1, so the byte count still adds up
            return json.dumps(body, separators=(",", ":"))

        rewrite_header(self.path(0), edit)
        with self.assertRaisesRegex(FragmentError, "non-integer"):
            fragment_metadata(self.path(0))
        with self.assertLogs("vua", level="WARNING"):
            self.assertPrefix(0)

    def test_overlapping_tensors_are_refused(self):
        def edit(body):
            body["layers.0.value"]["data_offsets"] = body["layers.0.key"]["data_offsets"]  # V aliases K
            return json.dumps(body, separators=(",", ":"))

        rewrite_header(self.path(0), edit)
        with self.assertRaisesRegex(FragmentError, "overlaps"):
            fragment_metadata(self.path(0))


# Run in a child: before the fix, LMDB mapped a truncated data.mdb and died of SIGBUS.
_OPEN_AND_GET = """
    import logging, sys, torch
    logging.basicConfig(level=logging.WARNING)
    from tests.helpers import check_hit
    from vua.core import VUA, VUAConfig
    vua = VUA(VUAConfig(split_factor=16, namespace="idx"), sys.argv[1])
    print(check_hit(vua.get_closest(torch.arange(64), device="cpu"), torch.arange(64)))
    vua.close()
"""


class DamagedIndexTest(StoreTestCase):
    def setUp(self):
        super().setUp()

        vua = self.store(split_factor=16, namespace="idx")
        tokens = torch.arange(64)
        vua.put(tokens, prefix_kv(tokens))
        for i in range(200):  # enough records for a data file of many pages
            other = torch.arange(i * 1000, i * 1000 + 32)
            vua.put(other, prefix_kv(other))
        vua.close()
        self.data_file = os.path.join(index_generation(vua.index_path), "data.mdb")

    def assertOpensAndReadsAll(self):
        child = run_child(_OPEN_AND_GET, self.root)
        self.assertEqual(child.returncode, 0, f"child died: {child.returncode}\n{child.stderr[-2000:]}")
        self.assertEqual(child.stdout.strip(), "64")
        self.assertIn("rebuilding it from the fragment tree", child.stderr)

    def test_truncated_data_file(self):
        size = os.path.getsize(self.data_file)
        for fraction in (0.25, 0.5, 0.9):
            with self.subTest(fraction=fraction):
                os.truncate(self.data_file, max(int(size * fraction) // 4096 * 4096, 8192))
                self.assertOpensAndReadsAll()
                self.data_file = os.path.join(index_generation(os.path.join(self.root, "index.lmdb")), "data.mdb")
                size = os.path.getsize(self.data_file)

    def test_data_file_truncated_while_a_process_has_it_open(self):
        child = run_child(
            """
            import logging, os, sys, torch
            from tests.helpers import check_hit, index_generation
            from vua.core import VUA, VUAConfig
            logging.basicConfig(level=logging.WARNING)
            vua = VUA(VUAConfig(split_factor=16, namespace="idx"), sys.argv[1])
            tokens = torch.arange(64)
            print(check_hit(vua.get_closest(tokens, device="cpu"), tokens))
            os.truncate(os.path.join(index_generation(vua.index_path), "data.mdb"), 8192)  # in place, while mapped
            print(check_hit(vua.get_closest(tokens, device="cpu"), tokens))
            vua.close()
            """,
            self.root,
        )
        # Before: the second get died of SIGBUS (returncode -7).
        self.assertEqual(child.returncode, 0, f"child died: {child.returncode}\n{child.stderr[-2000:]}")
        self.assertEqual(child.stdout.split(), ["64", "64"])
        self.assertIn("was cut to 8192 bytes while open", child.stderr)

    def test_random_bytes_found_by_the_fuzz_test(self):
        # tests/test_fuzz.py's index trials (seed 13, trial 20) wrote 4 KiB of random bytes
        # at this offset of this store's data file, and every get died of SIGBUS: LMDB
        # followed what the damaged page said past the file's end. The file's pages are
        # now checked before it is mapped, and it is rebuilt from the tree instead.
        child = run_child(
            """
            import os, random, sys, torch
            from tests.helpers import check_hit, index_generation, overwrite, prefix_kv
            from vua.core import VUA, VUAConfig
            root = sys.argv[1]
            vua = VUA(VUAConfig(split_factor=16, namespace="fuzz"), root)
            tokens = torch.arange(64)
            vua.put(tokens, prefix_kv(tokens))
            for i in range(60):
                other = torch.arange(i * 1000, i * 1000 + 32)
                vua.put(other, prefix_kv(other))
            vua.close()
            data = os.path.join(index_generation(vua.index_path), "data.mdb")
            overwrite(data, 53279, random.Random(int(sys.argv[2])).randbytes(4096))
            vua = VUA(VUAConfig(split_factor=16, namespace="fuzz"), root)
            print(check_hit(vua.get_closest(tokens, device="cpu"), tokens))
            vua.close()
            """,
            os.path.join(self.root, "fuzzed"),
            "7",
        )
        self.assertEqual(child.returncode, 0, f"child died: {child.returncode}\n{child.stderr[-2000:]}")
        self.assertEqual(child.stdout.strip(), "64")

    def test_random_bytes_in_the_data_file(self):
        overwrite(self.data_file, 0, os.urandom(os.path.getsize(self.data_file)))
        self.assertOpensAndReadsAll()

    def test_check_data_file_accepts_a_good_one_and_refuses_a_short_one(self):
        self.assertTrue(index_data_file_is_sound(self.data_file))
        os.truncate(self.data_file, os.path.getsize(self.data_file) - 4096)
        self.assertFalse(index_data_file_is_sound(self.data_file))


class CurrentFileTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.vua = self.store(split_factor=16, namespace="cur")
        self.tokens = torch.arange(32)
        self.kv = random_kv(1, 32)
        self.vua.put(self.tokens, self.kv)
        self.vua.close()
        self.current = os.path.join(self.vua.index_path, INDEX_CURRENT_FILE)

    def assertStoreWorks(self):
        with self.assertLogs("vua._index", level="WARNING"):
            vua = self.store(split_factor=16, namespace="cur")
        hit = vua.get_closest(self.tokens, device="cpu")
        self.assertEqual(hit.tokens.numel(), 32)
        self.assertKVEqual(hit.data, kv_slice(self.kv, 0, 32))
        self.assertIsNotNone(index_generation(self.vua.index_path))

    def test_a_path_outside_the_store(self):
        outside = os.path.join(self.root, "..", os.path.basename(self.root) + "-outside")
        self.addCleanup(lambda: __import__("shutil").rmtree(outside, ignore_errors=True))
        with open(self.current, "w") as f:
            f.write("../../" + os.path.basename(outside) + "\n")
        self.assertStoreWorks()
        self.assertFalse(os.path.exists(outside))

    def test_binary_garbage(self):
        with open(self.current, "wb") as f:
            f.write(b"\xff\xfe\x00gen-\x80")
        self.assertStoreWorks()

    def test_a_directory(self):
        os.unlink(self.current)
        os.mkdir(self.current)
        self.assertStoreWorks()


class IndexFaultTest(HostileStoreTestCase):
    def test_map_grown_by_another_process(self):
        self.assertPrefix(3)
        generation = index_generation(self.vua.index_path)
        child = run_child(
            """
            import sys, lmdb
            env = lmdb.open(sys.argv[1], max_dbs=4)
            env.set_mapsize(env.info()["map_size"] * 4)
            meta = env.open_db(b"meta")
            with env.begin(write=True, db=meta) as txn:
                txn.put(b"grown", b"1")
            """,
            generation,
        )
        self.assertEqual(child.returncode, 0, child.stderr)
        self.assertPrefix(3)
        self.assertEqual(self.vua.prefix_length(self.tokens), 48)
        self.assertEqual(self.vua.put(torch.arange(48), random_kv(1, 48)), 3)

    def test_full_index_does_not_fail_reads(self):
        # The fault: every write transaction of the index fails as on a full file system.
        forget_in_index(self.vua, [bytes.fromhex(self.keys[2])])  # so the get discovers it in the tree
        with index_writes_fail(lmdb.DiskError("No space left on device")):
            with self.assertLogs("vua", level="WARNING") as logs:
                self.assertPrefix(3)
        self.assertTrue(any("could not record" in line for line in logs.output))

    def test_new_index_on_a_full_file_system(self):
        mount = small_tmpfs(self, os.path.join(self.root, "full"), "64k")
        with open(os.path.join(mount, "filler"), "wb") as f:
            try:
                f.write(b"\0" * (128 << 10))
            except OSError:
                pass
        child = run_child(
            """
            import sys
            from vua.core import VUA, VUAConfig
            from vua.errors import StorageError
            try:
                VUA(VUAConfig(index_path=sys.argv[2]), sys.argv[1])
            except StorageError as exc:
                print("StorageError", exc)
            """,
            self.root,
            os.path.join(mount, "index"),
        )
        self.assertEqual(child.returncode, 0, f"child died: {child.returncode}\n{child.stderr[-2000:]}")
        self.assertIn("No space left on device", child.stdout)

    def misrecord(self, group: int, field: str):
        """Rewrites one group's index record with another namespace or layout id; returns the true record."""
        key = bytes.fromhex(self.keys[group])
        record = index_records(self.vua)[key]
        env, groups, _ = index_env(self.vua)
        with env.begin(write=True, db=groups) as txn:
            txn.put(key, record._replace(**{field: getattr(record, field) ^ 1}).pack())
        return key, record

    def test_record_of_another_namespace_heals(self):
        key, record = self.misrecord(1, "namespace_id")
        self.assertEqual([p["kind"] for p in self.verify()["problems"]], ["misrecorded-index-entry"])
        self.assertPrefix(3)  # the fragment agrees with the prefix: the record is healed
        self.assertTrue(self.verify()["clean"])
        healed = index_records(self.vua)[key]
        self.assertEqual(healed, record._replace(last_used=healed.last_used))

    def test_record_of_another_layout_heals_on_put(self):
        key, record = self.misrecord(0, "layout_id")
        self.assertEqual(self.vua.put(self.tokens, self.kv), 0)  # the fragment fits: no rewrite
        self.assertEqual(index_records(self.vua)[key].layout_id, record.layout_id)
        self.assertPrefix(3)

    def test_a_put_of_another_layout_is_refused_and_destroys_nothing(self):
        other = random_kv(1, 48, heads=2)  # same namespace and tokens, another model's layout
        before = listing(self.root)
        with self.assertRaisesRegex(
            InvalidInputError,
            r"namespace 'hostile' holds group 0 of this prompt as 3 layers of 1 KV heads x 8, F32, and this "
            r"put's KV is 3 layers of 2 KV heads x 8, F32: .* its own namespace .* nothing was written",
        ):
            self.vua.put(self.tokens, other)  # it replaced every group, one warning each, before
        self.assertEqual(listing(self.root), before)
        self.assertPrefix(3)
        self.assertEqual(self.store(split_factor=16, namespace="other-model").put(self.tokens, other), 3)

    def test_an_index_from_another_layouts_store_heals_and_destroys_nothing(self):
        # Another store of the same namespace, in another dtype, lends this one its index
        # (copied in place, or two roots given one index_path).
        other_root = os.path.join(self.root, "other")
        other = self.store(split_factor=16, namespace="hostile", root=other_root)
        other.put(self.tokens, [(k.half(), v.half()) for k, v in self.kv])
        other.close()
        self.vua.close()
        shutil.rmtree(self.vua.index_path)
        shutil.copytree(other.index_path, self.vua.index_path)
        vua = self.store(split_factor=16, namespace="hostile")
        with self.assertLogs("vua", level="WARNING") as logs:
            self.assertPrefix(3, vua)  # every get missed and moved the good groups aside, before
        self.assertTrue(any("recorded them as the fragments say" in line for line in logs.output), logs.output)
        self.assertTrue(all(os.path.exists(self.path(g)) for g in range(3)))
        self.assertTrue(run_cli_json("verify", self.root, "--index-path", vua.index_path)[1]["clean"])

    def test_eviction_racing_a_quarantine_leaves_no_temporaries(self):
        # The fault: a reader quarantines the group between eviction's rename and its removal
        # (_evict.remove_moved_aside, the one function patched).
        real_remove = _evict.remove_moved_aside
        key_hex = self.keys[2]

        def racing_remove(path):
            quarantine_group(self.root, key_hex)  # a reader found damage in the same group just now
            real_remove(path)

        with mock.patch.object(_evict, "remove_moved_aside", side_effect=racing_remove):
            evict_group(self.root, key_hex)
        self.assertEqual(temporaries(self.root), [])
        self.assertFalse(os.path.exists(group_dir(self.root, key_hex)))


class IndexFileModeTest(StoreTestCase):
    def test_file_mode_applies_to_the_index_files(self):
        vua = self.store(split_factor=16, namespace="mode", file_mode=0o600)
        vua.put(torch.arange(16), random_kv(1, 16))
        generation = index_generation(vua.index_path)
        for path in (
            os.path.join(generation, "data.mdb"),
            os.path.join(generation, "lock.mdb"),
            os.path.join(vua.index_path, INDEX_CURRENT_FILE),
            fragment_path(self.root, vua.config.tokens_to_paths(torch.arange(16))[0]),
        ):
            self.assertEqual(os.stat(path).st_mode & 0o7777, 0o600, path)

    def test_file_mode_holds_under_a_strict_umask(self):
        self.addCleanup(os.umask, os.umask(0o077))
        vua = self.store(split_factor=16, namespace="mode", file_mode=0o640)
        vua.put(torch.arange(16), random_kv(1, 16))
        generation = index_generation(vua.index_path)
        for name in ("data.mdb", "lock.mdb"):  # data.mdb was 0o600: LMDB creates it through the umask
            self.assertEqual(os.stat(os.path.join(generation, name)).st_mode & 0o7777, 0o640, name)


class TreeDateTest(HostileStoreTestCase):
    """Dates read from the tree (a group directory's mtime is its last use) that no clock gave honestly."""

    def reopened_with_dates(self, ns: int):
        """A new store on the same root, its groups dated ``ns`` and its index gone (every record from the tree)."""
        self.vua.close()  # flushes the put's pending uses into the tree first
        for key_hex in self.keys:
            os.utime(group_dir(self.root, key_hex), ns=(ns, ns))
        shutil.rmtree(self.vua.index_path)
        return self.store(split_factor=16, namespace="hostile")

    def test_a_group_dated_before_1970(self):
        vua = self.reopened_with_dates(-86400 * 10**9)  # struct.error packing the record, before
        self.assertPrefix(3, vua)
        self.assertTrue(all(0 <= r.last_used <= time.time_ns() for r in index_records(vua).values() if r))

    def test_a_group_dated_in_the_future_ages_from_now(self):
        vua = self.reopened_with_dates(4102444800 * 10**9)  # 2100
        self.assertPrefix(3, vua)
        now = time.time_ns()
        for key_hex in self.keys:  # read as now, in the index and in the tree
            self.assertLessEqual(index_records(vua)[bytes.fromhex(key_hex)].last_used, now)
            self.assertLessEqual(os.stat(group_dir(self.root, key_hex)).st_mtime_ns, now)
        # So a newer prompt outlives it: capacity for one prompt keeps the newer one (before,
        # the 2100 groups outlived everything else for ever).
        newer = torch.arange(5000, 5048)
        vua.put(newer, self.kv)
        nbytes = sum(r.nbytes for r in index_records(vua).values() if r) // 2
        status, out, _ = run_cli("gc", self.root, "--max-bytes", str(nbytes), "--json")
        self.assertEqual((status, json.loads(out)["groups_evicted"]), (0, 3))
        self.assertPrefix(0, vua)
        self.assertHit(vua.get_closest(newer, device="cpu"), 3, self.kv)

    def test_an_index_record_dated_in_the_future_is_evicted_in_its_turn(self):
        one_prompt = sum(r.nbytes for r in index_records(self.vua).values() if r)
        capped = self.store(split_factor=16, namespace="hostile", max_bytes=one_prompt)
        env, groups, _ = index_env(capped)
        with env.begin(write=True, db=groups) as txn:
            for key_hex in self.keys:
                key = bytes.fromhex(key_hex)
                txn.put(key, edited_record(txn.get(key), last_used=4102444800 * 10**9))
        capped.put(torch.arange(5000, 5048), self.kv)  # over capacity: the dates ahead read as now...
        self.assertTrue(all(r.last_used <= time.time_ns() for r in index_records(capped).values() if r))
        capped.put(torch.arange(6000, 6048), self.kv)  # ...and age from there: this put evicts them
        self.assertPrefix(0, capped)

    def test_a_temporary_dated_in_the_future_is_stale(self):
        fanout = fanout_dir(self.root, self.keys[0])
        tmp = os.path.join(fanout, f"{TMP_PREFIX}{self.keys[0]}-damaged-1-abcd")
        with open(tmp, "wb") as f:
            f.write(b"left by a writer whose clock was far ahead")
        os.utime(tmp, ns=(4102444800 * 10**9,) * 2)
        report = self.verify("--fix")
        self.assertEqual([(p["kind"], p["path"]) for p in report["problems"]], [("stale-temporary", tmp)])
        self.assertFalse(os.path.exists(tmp))


class FullIndexDiskTest(StoreTestCase):
    def test_a_put_on_a_full_index_disk_says_what_to_do(self):
        mount = small_tmpfs(self, os.path.join(self.root, "small"), "1m")
        vua = self.store(VUAConfig(split_factor=16, namespace="full", index_path=os.path.join(mount, "index")))
        vua.put(torch.arange(16), random_kv(1, 16))
        fd = os.open(os.path.join(mount, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while True:  # the fault: the index's file system fills up (a real ENOSPC from tmpfs)
                os.write(fd, bytes(4096))
        except OSError:
            pass
        finally:
            os.close(fd)
        with self.assertRaises(StorageError) as caught:
            for i in range(2000):
                vua.put(torch.arange(1000 + 100 * i, 1064 + 100 * i), random_kv(1, 64))
        self.assertRegex(str(caught.exception), r"has \d+ bytes free: free space there, or move the index")
        self.assertIn("--index-path", str(caught.exception))


class IndexMetaTest(HostileStoreTestCase):
    def test_a_total_of_the_wrong_size_is_replaced(self):
        env, _, meta = index_env(self.vua)
        with env.begin(write=True, db=meta) as txn:
            txn.put(b"total_bytes", b"\x01\x02\x03")  # struct.error in every put, before
        self.assertEqual(self.vua.put(torch.arange(48), random_kv(1, 48)), 3)
        self.assertGreater(index_total_bytes(self.vua), 0)
        self.assertPrefix(3)


class LoadArgumentTest(HostileStoreTestCase):
    def test_a_layer_out_of_range_is_an_invalid_input(self):
        load = self.vua.load(self.tokens, "cpu", layerwise=True)
        for layer in (99, -1, 3, "0"):  # 99 was a bare IndexError; -1 a silent last layer
            with self.subTest(layer=layer), self.assertRaisesRegex(InvalidInputError, r"from 0 to 2 .*3 layers"):
                load.wait_layer(layer)
        self.assertEqual(load.wait(), 3)
        self.assertTrue(torch.equal(load.wait_layer(2)[0], self.kv[2][0]))


class SymlinkedFragmentTest(HostileStoreTestCase):
    def test_a_link_to_a_valid_copy_outside_the_root_ends_the_prefix(self):
        outside = os.path.join(self.root, "elsewhere.safetensors")
        shutil.copyfile(self.path(1), outside)  # a valid fragment, but not the store's own file
        os.unlink(self.path(1))
        os.symlink(outside, self.path(1))
        with self.assertLogs("vua", level="WARNING") as logs:
            self.assertPrefix(1)  # it was followed and served, before
        self.assertTrue(any("a symbolic link" in line for line in logs.output), logs.output)
        self.assertFalse(os.path.islink(self.path(1)))  # moved aside: the next put writes the group
        self.assertEqual(self.vua.put(self.tokens, self.kv), 1)
        self.assertPrefix(3)
