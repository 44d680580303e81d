"""The vua command, capacity and eviction, shared storage across nodes, and the index's upkeep."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

import torch

from tests.helpers import (
    FRAGMENT_FILE,
    INDEX_DIR,
    INDEX_LOCK_FILE,
    WRITING_PREFIX,
    StoreTestCase,
    check_hit,
    evict_group,
    flip_byte,
    fragment_files,
    fragment_path,
    group_dir,
    index_env,
    index_records,
    index_records_at,
    index_total_bytes,
    indexed_groups,
    initial_index_map_size,
    lock_dir,
    open_stored_prefix,
    opened_index,
    prefix_kv,
    random_kv,
    run_cli,
    temporaries,
)
from vua.cli import human_size, main, parse_size
from vua.core import VUA, VUAConfig
from vua.errors import FragmentError, InvalidInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CommandTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.vua = self.store(split_factor=16, namespace="cli/a")
        self.vua.put(torch.arange(48), random_kv(1, 48))
        self.store(split_factor=16, namespace="cli/b").put(torch.arange(16), random_kv(1, 16))

    def test_stats(self):
        status, out, _ = run_cli("stats", self.root, "--json")
        self.assertEqual(status, 0)
        stats = json.loads(out)
        self.assertEqual(stats["fragments"], 4)
        self.assertEqual(stats["namespaces"], {"cli/a": 3, "cli/b": 1})
        self.assertEqual(stats["bytes"], sum(os.path.getsize(p) for p in self.fragment_files()))
        self.assertIsNotNone(stats["oldest_use"])

    def fragment_files(self) -> list[str]:
        return fragment_files(self.root)

    def test_verify_clean_then_damaged_then_fixed(self):
        self.assertEqual(run_cli("verify", self.root)[0], 0)
        victim = self.fragment_files()[0]
        flip_byte(victim, -1)
        stale = os.path.join(self.root, "00", ".tmp-abandoned")
        os.makedirs(stale)
        os.utime(stale, (time.time() - 7200, time.time() - 7200))
        young = os.path.join(self.root, "00", ".tmp-writing-now")
        os.makedirs(young)
        status, out, _ = run_cli("verify", self.root, "--json")
        self.assertEqual(status, 1)
        kinds = sorted(p["kind"] for p in json.loads(out)["problems"])
        self.assertEqual(kinds, ["damaged-fragment", "stale-temporary"])
        self.assertEqual(json.loads(out)["young_temporaries"], 1)
        self.assertEqual(run_cli("verify", self.root, "--fix")[0], 0)
        self.assertFalse(os.path.exists(victim))
        self.assertFalse(os.path.exists(stale))
        self.assertTrue(os.path.exists(young))  # a live writer's directory is left alone
        status, out, _ = run_cli("verify", self.root, "--json")
        self.assertEqual((status, json.loads(out)["problems"], json.loads(out)["fragments"]), (0, [], 3))

    def test_verify_reports_an_unreadable_group_and_leaves_it_alone(self):
        # EIO from a disk, ESTALE from a network file system: not damage to delete, and not
        # a reason for verify to stop. The fault is injected on one group's directory.
        victim = os.path.dirname(self.fragment_files()[0])
        real_scandir = os.scandir

        def failing_scandir(path=".", *rest):
            if os.fspath(path) == victim:
                raise OSError(errno.EIO, "Input/output error", victim)
            return real_scandir(path, *rest)

        with mock.patch.object(os, "scandir", failing_scandir):
            status, out, _ = run_cli("verify", self.root, "--json")
            report = json.loads(out)
            problems = [(p["kind"], p["key"]) for p in report["problems"]]
            self.assertEqual(
                (status, problems, report["fragments"]), (1, [("unreadable", os.path.basename(victim))], 3)
            )
            status, out, _ = run_cli("verify", self.root, "--fix")
            self.assertEqual(status, 1)
            self.assertIn("left alone", out)
            self.assertNotIn("run `vua verify --fix`", out)  # it just ran
        self.assertTrue(os.path.exists(os.path.join(victim, FRAGMENT_FILE)))
        status, out, _ = run_cli("verify", self.root, "--json")
        self.assertEqual((status, json.loads(out)["problems"], json.loads(out)["fragments"]), (0, [], 4))

    def test_verify_fixes_writers_files_left_in_group_directories(self):
        # A writer killed between writing its file and linking it leaves the file in the
        # group's directory: beside a fragment another writer published, or alone.
        published = os.path.dirname(self.fragment_files()[0])
        beside = os.path.join(published, WRITING_PREFIX + "111-dead")
        orphan_group = group_dir(self.root, "ab" * 16)
        os.makedirs(orphan_group)
        alone = os.path.join(orphan_group, WRITING_PREFIX + "222-dead")
        live_group = group_dir(self.root, "cd" * 16)
        os.makedirs(live_group)
        live = os.path.join(live_group, WRITING_PREFIX + "333-writing")
        for path in (beside, alone, live):
            with open(path, "wb") as f:
                f.write(b"partial")
        # A writer killed between making a group's directory and releasing its lock.
        locked_group = group_dir(self.root, "ef" * 16)
        os.makedirs(locked_group)
        dead_lock = lock_dir(locked_group)
        hour_ago = time.time() - 3600
        for path in (beside, alone, orphan_group, locked_group, dead_lock):
            os.utime(path, (hour_ago, hour_ago))
        status, out, _ = run_cli("verify", self.root, "--json")
        report = json.loads(out)
        kinds = sorted(p["kind"] for p in report["problems"])
        self.assertEqual((status, kinds), (1, ["empty-group-directory"] * 2 + ["stale-temporary"] * 3))
        self.assertEqual(report["young_temporaries"], 1)  # the live writer's file
        self.assertEqual(run_cli("verify", self.root, "--fix")[0], 0)
        for gone in (beside, orphan_group, locked_group, dead_lock):
            self.assertFalse(os.path.lexists(gone), gone)
        self.assertTrue(os.path.exists(live))  # a live writer's file is left alone
        status, out, _ = run_cli("verify", self.root, "--json")
        self.assertEqual((status, json.loads(out)["fragments"]), (0, 4))

    def test_verify_finds_index_disagreements(self):
        keys = self.vua.config.tokens_to_paths(torch.arange(48))
        shutil.rmtree(group_dir(self.root, keys[2]))  # indexed, gone from the tree
        env, groups, _ = index_env(self.vua)
        with env.begin(write=True, db=groups) as txn:
            txn.delete(bytes.fromhex(keys[0]))  # in the tree, not indexed
            txn.put(b"\x01" * 16, b"junk")
        status, out, _ = run_cli("verify", self.root, "--json")
        kinds = sorted(p["kind"] for p in json.loads(out)["problems"])
        self.assertEqual((status, kinds), (1, ["dangling-index-entry", "garbage-index-entry", "unindexed-group"]))
        self.assertEqual(run_cli("verify", self.root, "--fix")[0], 0)
        self.assertEqual(run_cli("verify", self.root)[0], 0)
        self.assertEqual(self.vua.get_closest(torch.arange(48), device="cpu").tokens.numel(), 32)

    def test_rebuild_index_equals_live_index(self):
        live = {k: (r.namespace_id, r.layout_id, r.nbytes, r.group_index) for k, r in index_records(self.vua).items()}
        status, out, _ = run_cli("rebuild-index", self.root, "--json")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out)["groups"], 4)
        rebuilt = {
            k: (r.namespace_id, r.layout_id, r.nbytes, r.group_index) for k, r in index_records(self.vua).items()
        }
        self.assertEqual(rebuilt, live)
        self.assertEqual(index_total_bytes(self.vua), sum(r[2] for r in live.values()))
        # The open store switched to the new generation and still serves.
        self.assertEqual(self.vua.get_closest(torch.arange(48), device="cpu").tokens.numel(), 48)

    def test_rebuild_counts_damage_not_groups_removed_meanwhile(self):
        keys = self.vua.config.tokens_to_paths(torch.arange(48))
        with open(fragment_path(self.root, keys[2]), "r+b") as f:
            f.truncate(10)  # no header left: damaged
        # What a scan meets when another node evicts a group between listing its directory
        # and opening its file: the directory, without the fragment.
        os.unlink(fragment_path(self.root, keys[1]))
        with self.assertLogs("vua", level="DEBUG") as logs:
            status, out, _ = run_cli("rebuild-index", self.root, "--json")
        self.assertEqual(status, 0)
        summary = json.loads(out)
        self.assertEqual((summary["groups"], summary["damaged"]), (2, 1))
        warnings = [line for line in logs.output if line.startswith("WARNING")]
        self.assertEqual(len(warnings), 1)
        self.assertIn(f"damaged fragment {keys[2]}", warnings[0])
        self.assertTrue(any(f"group {keys[1]} is gone" in line for line in logs.output))

    def test_rebuild_script_and_module_entry_points(self):
        env = dict(os.environ, PYTHONPATH=REPO)
        for argv in (
            [sys.executable, os.path.join(REPO, "tools", "rebuild_index.py"), self.root],
            [sys.executable, "-m", "vua", "rebuild-index", self.root],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("4 groups", done.stdout)

    def test_gc(self):
        total = index_total_bytes(self.vua)
        status, out, _ = run_cli("gc", self.root, "--max-bytes", str(total // 2), "--json")
        self.assertEqual(status, 0)
        result = json.loads(out)
        self.assertLessEqual(result["bytes_after"], total // 2)
        self.assertEqual(len(self.fragment_files()), len(list(index_records(self.vua).items())))

    def test_gc_lists_each_fanout_directory_once_and_empties_the_trash(self):
        # On a network root each listing is a round trip: gc walks the tree once for its
        # groups and its trash together. Counted through the audit event every os.scandir raises.
        victim = os.path.basename(os.path.dirname(self.fragment_files()[0]))
        evict_group(self.root, victim, keep=True)  # in the trash, as a shared root's gc leaves it
        script = (
            "import collections, json, os, sys\n"
            "root = sys.argv[1]\n"
            "listed = collections.Counter()\n"
            "def count(event, args):\n"
            "    if event == 'os.scandir' and os.path.dirname(os.fsdecode(args[0])) == root:\n"
            "        listed[os.path.basename(os.fsdecode(args[0]))] += 1\n"
            "sys.addaudithook(count)\n"
            "from vua.cli import main\n"
            "status = main(['gc', root, '--max-bytes', '0', '--json'])\n"
            "print(json.dumps({'status': status, 'listed': listed}))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, self.root],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=REPO),
            timeout=120,
        )
        printed, _, last_line = done.stdout.rstrip().rpartition("\n")  # gc's JSON, then the counts
        gc_summary, counts = json.loads(printed), json.loads(last_line)
        fanouts = {name for name in os.listdir(self.root) if name != INDEX_DIR and not name.startswith(".")}
        self.assertEqual((counts["status"], gc_summary["groups_evicted"], gc_summary["trash_deleted"]), (0, 3, 1))
        self.assertEqual(counts["listed"], dict.fromkeys(fanouts, 1), done.stderr)
        self.assertEqual(self.fragment_files(), [])
        self.assertEqual(temporaries(self.root), [])

    def test_errors(self):
        status, _, err = run_cli("stats", os.path.join(self.root, "missing"))
        self.assertEqual(status, 2)
        self.assertIn("no such directory", err)
        empty = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, empty)
        status, _, err = run_cli("verify", empty)
        self.assertEqual(status, 2)
        self.assertIn("not a VUA store", err)
        self.assertFalse(os.listdir(empty))  # nothing created in a directory that is not a store
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            main(["gc", self.root, "--max-bytes", "lots"])

    def test_mistyped_index_path_is_refused(self):
        typo = os.path.join(self.root, "x", "nonexistent", "idx")
        for command in (["stats"], ["verify"], ["rebuild-index"], ["gc", "--max-bytes", "1G"]):
            with self.subTest(command=command[0]):
                status, out, err = run_cli(*command, self.root, "--index-path", typo)
                self.assertEqual((status, out), (2, ""))
                self.assertEqual(
                    err.strip(),
                    f"vua {command[0]}: cannot create the index at {typo}: its parent {os.path.dirname(typo)} "
                    "does not exist; check --index-path, or create its parent directory first",
                )
                self.assertFalse(os.path.exists(os.path.join(self.root, "x")))

    def test_an_index_lock_that_cannot_be_opened_is_a_vua_error(self):
        index = os.path.join(self.root, INDEX_DIR)
        lock = os.path.join(index, INDEX_LOCK_FILE)
        os.unlink(lock)
        os.mkdir(lock)  # the fault: LMDB's directory is writable, the lock file cannot be opened (EISDIR)
        status, _, err = run_cli("rebuild-index", self.root)
        self.assertEqual(status, 2)
        self.assertIn(f"vua rebuild-index: cannot lock the index {index} to build it: Is a directory ({lock})", err)
        self.assertNotIn("[Errno", err)

    def test_bare_command_lists_commands(self):
        status, out, _ = run_cli()
        self.assertEqual(status, 2)
        for name in ("rebuild-index", "verify", "stats", "gc"):
            self.assertIn(name, out)

    def test_errors_in_json_with_json(self):
        status, out, err = run_cli("stats", os.path.join(self.root, "missing"), "--json")
        self.assertEqual((status, err), (2, ""))
        self.assertIn("no such directory", json.loads(out)["error"])
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stdout(io.StringIO()) as out:
            main(["gc", self.root, "--json"])  # --max-bytes missing: a usage error
        self.assertEqual(ctx.exception.code, 2)
        self.assertIn("--max-bytes", json.loads(out.getvalue())["error"])

    def test_file_as_root(self):
        path = os.path.join(self.root, "a-file")
        with open(path, "w") as f:
            f.write("x")
        status, _, err = run_cli("verify", path)
        self.assertEqual(status, 2)
        self.assertIn("is a file, not a directory", err)

    def test_commands_do_not_import_torch(self):
        # Importing torch takes seconds; stats, gc, verify and rebuild-index need none of it.
        code = (
            "import sys; from vua.cli import main\n"
            "for cmd in (['stats'], ['verify'], ['rebuild-index'], ['gc', '--max-bytes', '1G']):\n"
            "    assert main([cmd[0], sys.argv[1], *cmd[1:]]) == 0, cmd\n"
            "print('torch' in sys.modules)"
        )
        env = dict(os.environ, PYTHONPATH=REPO)
        done = subprocess.run(
            [sys.executable, "-c", code, self.root], capture_output=True, text=True, env=env, timeout=120
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split()[-1], "False")

    def test_rebuild_keeps_last_use(self):
        old, new = torch.arange(1000, 1032), torch.arange(2000, 2032)
        vua = self.store(split_factor=16, namespace="lru-rebuild")
        vua.put(old, prefix_kv(old))
        time.sleep(0.01)
        vua.put(new, prefix_kv(new))
        time.sleep(0.01)
        self.assertEqual(check_hit(vua.get_closest(old, device="cpu"), old), 32)  # old is now the recent one
        vua.close()  # records pending hits, in the index and in the tree

        def last_use(index_path: str) -> dict[str, int]:
            return {k.hex(): r.last_used for k, r in index_records_at(index_path, self.root).items() if r is not None}

        index_path = os.path.join(self.root, INDEX_DIR)
        before = last_use(index_path)
        self.assertEqual(run_cli("rebuild-index", self.root)[0], 0)
        self.assertEqual(last_use(index_path), before)
        # From the tree alone (another node's index, or a lost one) the order is the same.
        shutil.rmtree(index_path)
        self.assertEqual(run_cli("rebuild-index", self.root)[0], 0)
        from_tree = last_use(index_path)
        keys_old = VUAConfig(split_factor=16, namespace="lru-rebuild").tokens_to_paths(old)
        keys_new = VUAConfig(split_factor=16, namespace="lru-rebuild").tokens_to_paths(new)
        self.assertGreater(min(from_tree[k] for k in keys_old), max(from_tree[k] for k in keys_new))
        # ...so gc takes the groups not used since.
        one_prompt = sum(os.path.getsize(fragment_path(self.root, k)) for k in keys_old)
        self.assertEqual(run_cli("gc", self.root, "--max-bytes", str(one_prompt))[0], 0)
        survivors = set(last_use(index_path))
        self.assertTrue(set(keys_old) <= survivors)
        self.assertFalse(set(keys_new) & survivors)

    def test_human_size(self):
        self.assertEqual(
            [human_size(n) for n in (0, 1023, 1536, 5 * 2**20, 3 * 2**40)],
            ["0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 TiB"],
        )

    def test_parse_size(self):
        self.assertEqual(parse_size("1024"), 1024)
        self.assertEqual(parse_size("2K"), 2048)
        self.assertEqual(parse_size("1.5G"), 1.5 * 2**30)
        self.assertEqual(parse_size("3TiB"), 3 * 2**40)
        self.assertEqual(parse_size("500GB"), parse_size("500Gi"))
        self.assertEqual(parse_size(4096), 4096)  # the vLLM connector's JSON may hold an int
        for bad in ("5X", "-1", "", -1, 1.5, True, None):
            with self.subTest(bad=bad), self.assertRaisesRegex(InvalidInputError, "must be a size such as 500M"):
                parse_size(bad)  # type: ignore[arg-type]

    def test_gc_refuses_a_malformed_size_with_the_spellings_it_takes(self):
        err = io.StringIO()
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stderr(err):
            main(["gc", self.root, "--max-bytes", "5X"])
        self.assertEqual(ctx.exception.code, 2)
        self.assertIn(
            "--max-bytes must be a size such as 500M, 10G, 1.5TiB or a number of bytes, got '5X'", err.getvalue()
        )


class CapacityTest(StoreTestCase):
    def fragment_bytes(self, vua: VUA, tokens: torch.Tensor) -> int:
        return sum(os.path.getsize(fragment_path(self.root, k)) for k in vua.config.tokens_to_paths(tokens))

    def test_lru_eviction_keeps_hit_prefixes(self):
        probe = self.store(split_factor=16, namespace="probe")
        a, b, c = torch.arange(0, 32), torch.arange(1000, 1032), torch.arange(2000, 2032)
        probe.put(a, prefix_kv(a))
        group_bytes = os.path.getsize(fragment_path(self.root, probe.config.tokens_to_paths(a)[0]))
        vua = self.store(VUAConfig(split_factor=16, namespace="lru", max_bytes=4 * group_bytes + group_bytes // 2))
        vua.put(a, prefix_kv(a))
        vua.put(b, prefix_kv(b))
        self.assertEqual(check_hit(vua.get_closest(a, device="cpu"), a), 32)  # refreshes a
        vua.put(c, prefix_kv(c))  # 6 groups > 4.5: b's two go
        self.assertEqual(check_hit(vua.get_closest(a, device="cpu"), a), 32)
        self.assertEqual(check_hit(vua.get_closest(c, device="cpu"), c), 32)
        self.assertIsNone(vua.get_closest(b, device="cpu"))
        self.assertLessEqual(index_total_bytes(vua), vua.config.max_bytes)

    def test_suffix_goes_before_its_prefix(self):
        tokens = torch.arange(64)
        vua = self.store(split_factor=16, namespace="order")
        vua.put(tokens, prefix_kv(tokens))
        group_bytes = self.fragment_bytes(vua, tokens) // 4
        capped = self.store(VUAConfig(split_factor=16, namespace="order", max_bytes=2 * group_bytes))
        capped.put(torch.arange(16, 32), prefix_kv(torch.arange(16, 32)))  # triggers eviction down to 2 groups
        hit = capped.get_closest(tokens, device="cpu")
        # Same last-use time for the whole 4-group prompt: the two deepest went first.
        self.assertEqual(check_hit(hit, tokens), 16)

    def test_reader_that_mapped_a_group_survives_its_eviction(self):
        tokens = torch.arange(32)
        vua = self.store(split_factor=16, namespace="mapped")
        vua.put(tokens, prefix_kv(tokens))
        fragments = open_stored_prefix(vua, tokens)
        self.assertEqual(len(fragments), 2)
        self.assertEqual(run_cli("gc", self.root, "--max-bytes", "0")[0], 0)
        self.assertIsNone(vua.get_closest(tokens, device="cpu"))
        expected = prefix_kv(tokens)[0][0][0, :, 16:32]
        self.assertTrue(
            torch.equal(torch.from_numpy(fragments[1].array("layers.0.key").copy()).view(torch.float32), expected)
        )
        for f in fragments:
            f.close()

    def test_a_mapped_group_written_again_since_is_not_read_from_the_new_file(self):
        # A reader that opened a group, then reads it again by path (in place, or for staging),
        # must not take the new file's bytes with the old header: the group was evicted and put again.
        tokens = torch.arange(32)
        vua = self.store(split_factor=16, namespace="rewritten")
        vua.put(tokens, prefix_kv(tokens))
        fragments = open_stored_prefix(vua, tokens)
        self.addCleanup(lambda: [f.close() for f in fragments])
        self.assertEqual(run_cli("gc", self.root, "--max-bytes", "0")[0], 0)
        vua.put(tokens, prefix_kv(tokens))  # the same group, in a new file
        with self.assertRaisesRegex(FragmentError, "replaced since it was opened") as caught:
            with fragments[1].held_open():
                pass
        self.assertFalse(caught.exception.damaged)  # not damage: nothing is moved aside
        with self.assertRaisesRegex(FragmentError, "replaced since it was opened"):
            fragments[1].read_into([memoryview(bytearray(16))], fragments[1].kv_range[0])
        self.assertEqual(check_hit(vua.get_closest(tokens, device="cpu"), tokens), 32)  # the new files serve


class SharedStorageTest(StoreTestCase):
    def test_node_finds_groups_written_by_another_node(self):
        """Two processes, one shared root, an index each: the second reads what the first wrote."""
        index_a, index_b = tempfile.mkdtemp(), tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, index_a)
        self.addCleanup(shutil.rmtree, index_b)
        tokens = torch.arange(5000, 5064)
        writer = (
            "import sys, torch; sys.path.insert(0, sys.argv[3])\n"
            "from tests.helpers import prefix_kv\n"
            "from vua.core import VUA, VUAConfig\n"
            "v = VUA(VUAConfig(split_factor=16, namespace='shared', index_path=sys.argv[2]), sys.argv[1])\n"
            "t = torch.arange(5000, 5064)\n"
            "print(v.put(t[:32], prefix_kv(t[:32])), v.put(t, prefix_kv(t)))\n"
        )
        node_b = self.store(VUAConfig(split_factor=16, namespace="shared", index_path=index_b))
        self.assertIsNone(node_b.get_closest(tokens, device="cpu"))
        done = subprocess.run(
            [sys.executable, "-c", writer, self.root, index_a, REPO], capture_output=True, text=True, timeout=120
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split(), ["2", "2"])
        self.assertEqual(check_hit(node_b.get_closest(tokens, device="cpu"), tokens), 64)
        keys = [bytes.fromhex(k) for k in node_b.config.tokens_to_paths(tokens)]
        self.assertEqual(indexed_groups(node_b, keys), 4)  # recorded in b's own index
        self.assertFalse(os.path.exists(os.path.join(self.root, "index.lmdb")))


class IndexUpkeepTest(StoreTestCase):
    def test_map_full_grows_the_map(self):
        with initial_index_map_size(64 * 1024):
            vua = self.store(split_factor=1, namespace="grow")
            tokens = torch.arange(3000)
            vua.put(tokens, [(torch.zeros(1, 1, 3000, 1), torch.zeros(1, 1, 3000, 1))])
            env, _, _ = index_env(vua)
            self.assertGreater(env.info()["map_size"], 64 * 1024)
            self.assertEqual(indexed_groups(vua, [bytes.fromhex(k) for k in vua.config.tokens_to_paths(tokens)]), 3000)

    def test_index_is_reopened_after_fork(self):
        vua = self.store(split_factor=16, namespace="fork")
        tokens = torch.arange(64)
        vua.put(tokens[:32], prefix_kv(tokens[:32]))
        vua.get_closest(tokens, device="cpu")  # the parent's handle and threads are live
        pid = os.fork()
        if pid == 0:  # child: use the inherited store object for a put and a get
            code = 1
            try:
                vua.put(tokens, prefix_kv(tokens))
                code = 0 if check_hit(vua.get_closest(tokens, device="cpu"), tokens) == 64 else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        self.assertEqual(check_hit(vua.get_closest(tokens, device="cpu"), tokens), 64)

    def test_rebuilds_while_threads_read_and_write(self):
        vua = self.store(split_factor=16, namespace="swap")
        tokens = torch.arange(64)
        vua.put(tokens, prefix_kv(tokens))
        errors, stop = [], threading.Event()

        def reader(seed: int) -> None:
            n = 0
            while not stop.is_set():
                try:
                    extra = torch.tensor([seed * 100 + n % 7] * 16)
                    query = torch.cat([tokens, extra])
                    vua.put(query, prefix_kv(query))
                    if check_hit(vua.get_closest(query, device="cpu"), query) != 80:
                        errors.append("short hit")
                except Exception as exc:  # collected and asserted below
                    errors.append(repr(exc))
                n += 1

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for _ in range(5):
            self.assertEqual(run_cli("rebuild-index", self.root)[0], 0)
        stop.set()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(run_cli("verify", self.root)[0], 0)

    def test_reader_slots_of_dead_processes_are_reclaimed(self):
        vua = self.store(split_factor=16, namespace="slots")
        vua.put(torch.arange(16), prefix_kv(torch.arange(16)))
        holder = (
            "import sys, os, time\n"
            "from tests.helpers import opened_index\n"
            "with opened_index(sys.argv[1], sys.argv[2]) as (env, groups, _):\n"
            "    txn = env.begin()\n"
            "    print(os.getpid(), flush=True)\n"
            "    time.sleep(60)\n"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", holder, vua.index_path, self.root],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        child_pid = int(child.stdout.readline())
        env, _, _ = index_env(vua)
        self.assertIn(str(child_pid), env.readers())
        child.kill()
        child.wait()
        child.stdout.close()
        with opened_index(vua.index_path, self.root) as (fresh_env, _, _):  # opening runs the reader check
            self.assertNotIn(f" {child_pid} ", fresh_env.readers())
