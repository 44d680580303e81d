"""Faults a production store meets: full disks, refused permissions, killed writers, many processes."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

import torch

from tests.helpers import (
    INDEX_DIR,
    StoreTestCase,
    check_hit,
    fanout_dirs,
    fragment_path,
    index_records,
    indexed_groups,
    listing,
    lock_dir,
    make_dir,
    mkdir_lock_wait,
    prefix_kv,
    read_only_mount,
    run_cli,
    temporaries,
)
from vua.core import VUA, VUAConfig
from vua.errors import StorageError


class DiskFaultTest(StoreTestCase):
    def setUp(self):
        super().setUp()
        self.vua = self.store(split_factor=16, namespace="faults")
        self.vua.put(torch.arange(16), prefix_kv(torch.arange(16)))
        self.before = listing(self.root)
        self.tokens = torch.arange(100, 164)

    def assertUnchangedAndUsable(self):
        self.assertEqual(temporaries(self.root), [])
        self.assertEqual(listing(self.root), self.before)
        self.assertEqual(self.vua.put(self.tokens, prefix_kv(self.tokens)), 4)
        self.assertEqual(check_hit(self.vua.get_closest(self.tokens, device="cpu"), self.tokens), 64)

    def test_disk_full_during_write(self):
        real_writev = os.writev

        def full(fd, buffers):
            real_writev(fd, buffers[:1])  # part of the file lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with mock.patch.object(os, "writev", full):
            with self.assertRaises(StorageError) as ctx:
                self.vua.put(self.tokens, prefix_kv(self.tokens))
        self.assertIn("No space left on device", str(ctx.exception))
        self.assertEqual(ctx.exception.__cause__.errno, errno.ENOSPC)
        self.assertUnchangedAndUsable()

    def test_disk_full_at_fsync(self):
        with mock.patch.object(os, "fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")):
            with self.assertRaisesRegex(StorageError, "No space left on device"):
                self.vua.put(self.tokens, prefix_kv(self.tokens))
        self.assertUnchangedAndUsable()

    def test_permission_denied(self):
        with mock.patch.object(os, "mkdir", side_effect=PermissionError(errno.EACCES, "Permission denied")):
            with self.assertRaisesRegex(StorageError, "Permission denied.*fix permissions"):
                self.vua.put(self.tokens, prefix_kv(self.tokens))
        self.assertUnchangedAndUsable()

    def test_stale_handle_is_reported_as_such(self):
        # GlusterFS answers ESTALE for a directory its servers disagree about: the error must
        # not send the operator to free space or fix permissions.
        stale = OSError(errno.ESTALE, "Stale file handle")
        with mock.patch.object(os, "link", side_effect=stale), mock.patch.object(time, "sleep"):
            with self.assertRaisesRegex(StorageError, "Stale file handle; the shared file system called a directory"):
                self.vua.put(self.tokens, prefix_kv(self.tokens))
        self.assertUnchangedAndUsable()

    def test_failure_after_some_groups_keeps_the_whole_ones(self):
        real_link = os.link
        calls = []

        def link_twice(src, dst):
            calls.append(dst)
            if len(calls) > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_link(src, dst)

        vua = self.store(VUAConfig(split_factor=16, namespace="faults", io_threads=1))
        with mock.patch.object(os, "link", link_twice):
            with self.assertRaises(StorageError):
                vua.put(self.tokens, prefix_kv(self.tokens))
        self.assertEqual(temporaries(self.root), [])
        self.assertEqual(check_hit(vua.get_closest(self.tokens, device="cpu"), self.tokens), 32)
        self.assertEqual(run_cli("verify", self.root)[0], 0)


def _crash_writer(root: str, seed: int, ready) -> None:
    """Puts overlapping prompts forever; the test kills it with SIGKILL."""
    vua = VUA(VUAConfig(split_factor=16, namespace="crash"), root)
    rng = random.Random(seed)
    ready.set()
    while True:
        base = rng.randrange(4)  # a few shared stems, so prefixes overlap
        tail = [rng.randrange(50) for _ in range(16 * rng.randrange(1, 9))]
        tokens = torch.cat([torch.arange(base * 1000, base * 1000 + 32), torch.tensor(tail)])
        vua.put(tokens, prefix_kv(tokens, layers=2, heads=2, head_dim=64))


class SharedRootOutageTest(StoreTestCase):
    def test_a_fragment_missing_for_a_while_keeps_its_record_an_evicted_one_does_not(self):
        # A GlusterFS server restarting answers ENOENT for the files on it while every
        # directory is still there: a lookup ends the prefix there (a miss), and the group
        # stays in the index. Eviction (any node's) removes the directory too: forgotten.
        vua = self.store(split_factor=16, namespace="outage", network_fs=True)
        tokens = torch.arange(64)
        vua.put(tokens, prefix_kv(tokens))
        keys = [bytes.fromhex(k) for k in vua.config.tokens_to_paths(tokens)]
        path = fragment_path(self.root, keys[2].hex())
        away = os.path.join(self.root, "away")
        os.rename(path, away)  # the server holding it is down
        with self.assertLogs("vua", level="WARNING"):
            self.assertEqual(check_hit(vua.get_closest(tokens), tokens), 32)
        self.assertEqual(indexed_groups(vua, keys), 4)
        os.rename(away, path)  # it is back
        self.assertEqual(check_hit(vua.get_closest(tokens), tokens), 64)
        os.rename(path, away)  # evicted: the file moved aside, the directory removed
        os.rmdir(os.path.dirname(path))
        with self.assertLogs("vua", level="WARNING"):
            self.assertEqual(check_hit(vua.get_closest(tokens), tokens), 32)
        self.assertEqual(indexed_groups(vua, keys), 2)

    def test_an_unreachable_fragment_stays_in_the_index(self):
        # The mount answers ENOTCONN (a GlusterFS client that lost its servers), EIO or
        # ETIMEDOUT: the group cannot be read now, which is not to say it is gone.
        vua = self.store(split_factor=16, namespace="unreachable", network_fs=True)
        tokens = torch.arange(48)
        vua.put(tokens, prefix_kv(tokens))
        keys = [bytes.fromhex(k) for k in vua.config.tokens_to_paths(tokens)]
        real_open = os.open
        for code in (errno.ENOTCONN, errno.EIO, errno.ETIMEDOUT):
            with self.subTest(errno=errno.errorcode[code]):

                def unreachable(path, *args, code=code, **kwargs):
                    if isinstance(path, str) and path.endswith("kv.safetensors") and keys[1].hex() in path:
                        raise OSError(code, os.strerror(code), path)
                    return real_open(path, *args, **kwargs)

                with mock.patch.object(os, "open", unreachable), self.assertLogs("vua", level="WARNING"):
                    self.assertEqual(check_hit(vua.get_closest(tokens), tokens), 16)
                self.assertEqual(indexed_groups(vua, keys), 3)
                self.assertEqual(check_hit(vua.get_closest(tokens), tokens), 48)  # reachable again


class CrashTest(StoreTestCase):
    def test_writer_killed_at_random_moments(self):
        # A fork server imports torch once, so killing and restarting a writer is cheap.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "vua.core", "tests.helpers"])
        rng = random.Random(1234)
        for round_ in range(20):
            ready = ctx.Event()
            child = ctx.Process(target=_crash_writer, args=(self.root, round_, ready))
            child.start()
            self.assertTrue(ready.wait(60))
            time.sleep(rng.uniform(0.02, 0.4))
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            self.assertEqual(child.exitcode, -signal.SIGKILL)
        vua = self.store(VUAConfig(split_factor=16, namespace="crash"))
        # Every published group is whole: each one verifies, and every hit is exact.
        status, out, _ = run_cli("verify", self.root, "--grace", "0")
        self.assertIn(status, (0, 1))
        self.assertNotIn("damaged-fragment", out)
        self.assertNotIn("garbage-index-entry", out)
        hits = 0
        for base in range(4):
            for tail in range(50):
                query = torch.cat([torch.arange(base * 1000, base * 1000 + 32), torch.full((16,), tail)])
                hits += check_hit(vua.get_closest(query, device="cpu"), query) > 0
        self.assertGreater(hits, 0)
        # A killed writer may leave temporaries and unindexed groups; --fix cleans both.
        self.assertEqual(run_cli("verify", self.root, "--fix", "--grace", "0")[0], 0)
        self.assertEqual(temporaries(self.root), [])
        status, out, _ = run_cli("verify", self.root, "--grace", "0")
        self.assertEqual(status, 0, out)
        live = {k: (r.namespace_id, r.layout_id, r.nbytes, r.group_index) for k, r in index_records(vua).items()}
        self.assertEqual(run_cli("rebuild-index", self.root)[0], 0)
        rebuilt = {k: (r.namespace_id, r.layout_id, r.nbytes, r.group_index) for k, r in index_records(vua).items()}
        self.assertEqual(rebuilt, live)


def _worker(root: str, seed: int, seconds: float, results) -> None:
    """Puts and gets overlapping prefixes; reports (puts, hits, errors)."""
    rng = random.Random(seed)
    vua = VUA(VUAConfig(split_factor=16, namespace="concurrent"), root)
    puts = hits = 0
    errors = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tokens = torch.cat(
            [torch.arange(32), torch.tensor([rng.randrange(6) for _ in range(16 * rng.randrange(1, 4))])]
        )
        try:
            if rng.random() < 0.5:
                vua.put(tokens, prefix_kv(tokens))
                puts += 1
            else:
                hits += check_hit(vua.get_closest(tokens, device="cpu"), tokens) > 0
        except Exception as exc:  # reported to the parent, which fails the test
            errors.append(repr(exc))
    vua.close()
    results.put((puts, hits, errors))


class ConcurrencyTest(StoreTestCase):
    def test_processes_putting_and_getting_overlapping_prefixes(self):
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(self.root, seed, 5.0, results)) for seed in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            self.assertEqual(p.exitcode, 0)
        self.assertEqual([e for _, _, errs in outcomes for e in errs], [])
        self.assertGreater(sum(puts for puts, _, _ in outcomes), 0)
        self.assertGreater(sum(hits for _, hits, _ in outcomes), 0)
        self.assertEqual(run_cli("verify", self.root)[0], 0)


class DirectoryMakingTest(StoreTestCase):
    """make_dir, which every put and every store opening goes through (see its docstring for GlusterFS)."""

    def test_a_directory_is_not_used_while_another_process_holds_its_lock(self):
        # Another node holds the lock and has just made the directory: on GlusterFS it may not
        # be whole on every server yet, and looking it up then can break it. make_dir must wait
        # for the lock, then find the directory made (not make it again).
        path = os.path.join(self.root, "ab")
        lock = lock_dir(path)
        assert lock is not None
        os.mkdir(path)
        made: list[bool] = []
        waiter = threading.Thread(target=lambda: made.append(make_dir(path)))
        waiter.start()
        waiter.join(0.3)
        self.assertTrue(waiter.is_alive(), "make_dir returned while another process held the lock")
        os.unlink(lock)
        waiter.join(30)
        self.assertEqual(made, [False])
        self.assertEqual(sorted(os.listdir(self.root)), ["ab"])  # no lock left behind

    def test_makes_missing_parents_and_says_what_it_made(self):
        path = os.path.join(self.root, "a", "b", "c")
        self.assertTrue(make_dir(path))
        self.assertTrue(os.path.isdir(path))
        self.assertFalse(make_dir(path))
        self.assertEqual(os.listdir(os.path.join(self.root, "a")), ["b"])  # only the directories

    def test_a_file_in_the_way_is_an_error(self):
        path = os.path.join(self.root, "ab")
        with open(path, "w"):
            pass
        with self.assertRaises(NotADirectoryError):
            make_dir(path)
        with self.assertRaises(NotADirectoryError):
            make_dir(os.path.join(path, "cd"))

    def test_the_lock_of_a_dead_maker_is_taken_over(self):
        path = os.path.join(self.root, "ab")
        lock_dir(path)  # its holder died before making the directory
        with mkdir_lock_wait(0.2):
            self.assertTrue(make_dir(path))
        self.assertEqual(os.listdir(self.root), ["ab"])

    def test_a_store_whose_fanout_directory_was_removed_under_it_makes_it_again(self):
        vua = self.store(split_factor=16)
        tokens = torch.arange(32)
        self.assertEqual(vua.put(tokens, prefix_kv(tokens)), 2)
        for fanout in fanout_dirs(self.root):
            shutil.rmtree(fanout)  # the process still remembers having made them
        vua.close()
        fresh_index = tempfile.mkdtemp(prefix="vua-fresh-index-")
        self.addCleanup(shutil.rmtree, fresh_index)
        vua = self.store(split_factor=16, index_path=fresh_index)
        self.assertEqual(vua.put(tokens, prefix_kv(tokens)), 2)
        self.assertEqual(check_hit(vua.get_closest(tokens), tokens), 32)


class ReadOnlyRootTest(StoreTestCase):
    """A root this process may not write: a real read-only bind mount of a store, and another
    user's store (``setpriv`` to nobody). Both need root to set up; they skip without it."""

    def setUp(self):
        super().setUp()
        self.tokens = torch.arange(48)
        with VUA(VUAConfig(split_factor=16, namespace="ro"), self.root) as vua:
            vua.put(self.tokens, prefix_kv(self.tokens))
        self.before = listing(self.root)
        self.elsewhere = tempfile.mkdtemp(prefix="vua-ro-index-")  # writable by this process
        self.addCleanup(shutil.rmtree, self.elsewhere, ignore_errors=True)
        self.index = os.path.join(self.elsewhere, "index")

    def read_only_mount(self) -> str:
        return read_only_mount(self, self.root)

    def test_a_read_only_mount_reads_with_an_index_of_its_own_and_refuses_puts(self):
        mount = self.read_only_mount()
        vua = self.store(VUAConfig(split_factor=16, namespace="ro", index_path=self.index), root=mount)
        self.assertTrue(vua.read_only)
        for _ in range(2):  # the second from the index rebuilt from the tree, with the uses recorded
            self.assertEqual(check_hit(vua.get_closest(self.tokens, device="cpu"), self.tokens), 48)
        with self.assertRaises(StorageError) as ctx:
            vua.put(torch.arange(100, 132), prefix_kv(torch.arange(100, 132)))
        self.assertIn(f"cannot put into {mount!r}: the root is read-only to this process", str(ctx.exception))
        vua.close()  # records the uses: in the index, and in the tree where it may (here it may not)
        self.assertEqual(listing(self.root), self.before)

    def test_a_read_only_mount_without_a_writable_index_says_to_pass_one(self):
        mount = self.read_only_mount()
        with self.assertRaises(StorageError) as ctx:
            VUA(VUAConfig(split_factor=16, namespace="ro"), mount)
        self.assertEqual(
            str(ctx.exception),
            f"the VUA root {mount!r} is read-only to this process (a read-only mount or another user's store), "
            "and so is its index: to read it, pass VUAConfig(index_path=...) a directory this process can write "
            "(the index is rebuilt there from the fragment tree)",
        )

    def test_the_command_line_on_a_read_only_mount_says_to_pass_index_path(self):
        mount = self.read_only_mount()
        index = os.path.join(mount, INDEX_DIR)
        for command in ("stats", "verify", "rebuild-index"):
            with self.subTest(command=command):
                status, out, err = run_cli(command, mount)
                self.assertEqual((status, out), (2, ""))
                self.assertEqual(
                    err.strip(),
                    f"vua {command}: cannot open the index {index}: the root is read-only to this user (a read-only "
                    "mount or another user's store); pass --index-path DIR, a directory this user can write (the "
                    "index is rebuilt there from the fragment tree)",
                )
        status, out, _ = run_cli("rebuild-index", mount, "--index-path", self.index, "--json")
        self.assertEqual((status, json.loads(out)["groups"]), (0, 3))
        status, out, _ = run_cli("stats", mount, "--index-path", self.index, "--json")
        self.assertEqual((status, json.loads(out)["fragments"]), (0, 3))
        self.assertEqual(listing(self.root), self.before)

    def test_another_users_store_reads_with_an_index_of_its_own(self):
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            self.skipTest("needs root and setpriv to run as another user")
        os.chmod(self.root, 0o755)  # readable by others, writable by its owner alone
        os.chown(self.elsewhere, 65534, 65534)
        code = (
            "import sys, torch\n"
            "from tests.helpers import check_hit\n"
            "from vua.core import VUA, VUAConfig\n"
            "from vua.errors import StorageError\n"
            "root, index = sys.argv[1], sys.argv[2]\n"
            "try:\n"
            "    VUA(VUAConfig(split_factor=16, namespace='ro'), root)\n"
            "except StorageError as exc:\n"
            "    print('without index:', exc)\n"
            "with VUA(VUAConfig(split_factor=16, namespace='ro', index_path=index), root) as vua:\n"
            "    print('read_only:', vua.read_only)\n"
            "    print('hit:', check_hit(vua.get_closest(torch.arange(48), device='cpu'), torch.arange(48)))\n"
            "    try:\n"
            "        vua.put(torch.arange(100, 116), [(torch.zeros(1, 2, 16, 4),) * 2])\n"
            "    except StorageError as exc:\n"
            "        print('put:', exc)\n"
        )
        done = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                code,
                self.root,
                self.index,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env={**os.environ, "HOME": self.elsewhere},
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertIn("and so is its index: to read it, pass VUAConfig(index_path=...)", lines[0])
        self.assertEqual(lines[1:3], ["read_only: True", "hit: 48"])
        self.assertIn("the root is read-only to this process", lines[3])
        self.assertEqual(listing(self.root), self.before)
