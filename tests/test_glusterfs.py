"""Two nodes, one store, on a real distributed file system: GlusterFS on loopback, mounted twice.

Each node is one FUSE mount of the same two-brick volume with its own LMDB index on local
disk, as servers sharing a network file system would run. The fixture (tests/glusterfs.py)
installs GlusterFS from Debian's packages where it is missing and skips, saying why, where
this machine cannot run it (not root, no /dev/fuse).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
import uuid

import torch

from tests.glusterfs import GlusterVolume
from tests.helpers import FRAGMENT_FILE, check_hit, file_system_type, indexed_groups, prefix_kv, run_cli
from vua.core import VUA, VUAConfig
from vua.errors import InvalidInputError, StorageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
volume: GlusterVolume | None = None
_started = 0.0


def setUpModule() -> None:
    # The times go to stderr, as the engine tests' do: CI's log shows each slow stage.
    global volume, _started
    _started = time.monotonic()
    volume = GlusterVolume.create()
    print(f"glusterfs: volume up and mounted twice in {time.monotonic() - _started:.0f} s", file=sys.stderr)


def tearDownModule() -> None:
    if volume is not None:
        volume.destroy()
        print(f"glusterfs: two-node tests and teardown {time.monotonic() - _started:.0f} s in all", file=sys.stderr)


def run_node(script: str, *args: str) -> subprocess.Popen:
    """Starts one node: a fresh Python running ``script`` (a signal shows in its returncode)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# A node that puts a set of prompts (derived from a seed) in a loop until it is told to stop or killed.
WRITER = """
    import logging, os, random, sys, torch
    logging.getLogger("vua").setLevel(logging.ERROR)
    from tests.helpers import prefix_kv
    from vua.core import VUA, VUAConfig
    root, index, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    vua = VUA(VUAConfig(split_factor=16, namespace="gluster", index_path=index), root)
    rng = random.Random(1)
    import time
    deadline = time.monotonic() + seconds
    print("ready", flush=True)
    while time.monotonic() < deadline:
        base = rng.randrange(4)
        tokens = torch.cat([torch.arange(base * 1000, base * 1000 + 32), torch.tensor([rng.randrange(50) for _ in range(16 * rng.randrange(1, 7))])])
        vua.put(tokens, prefix_kv(tokens, layers=2, heads=2, head_dim=64))
    vua.close()
"""


# Processes that make the same directories (a store's fan-out and group directories) at once.
DIRECTORY_MAKER = """
    import os, sys, time
    from tests.helpers import make_dir
    root, start = sys.argv[1], float(sys.argv[2])
    groups = [os.path.join(root, f"{i:02x}", f"{i:02x}{j:030x}") for i in range(16) for j in range(12)]
    while time.time() < start:
        pass  # every maker starts at the same instant
    for group in groups:
        make_dir(os.path.dirname(group))
        make_dir(group)
"""


def directories_split_between_servers(name: str) -> list[str]:
    """Directories under ``name`` whose GlusterFS id (trusted.gfid) differs between the bricks, or is missing on one.

    Such a directory answers ESTALE on the node whose view disagrees, for good: this is what
    a lookup racing another node's mkdir left behind (see vua._publish.make_dir).
    """
    assert volume is not None
    found = {os.path.relpath(d, brick) for brick in volume.bricks for d, _, _ in os.walk(os.path.join(brick, name))}
    split = []
    for relative in sorted(found):
        ids = set()
        for brick in volume.bricks:
            try:
                ids.add(os.getxattr(os.path.join(brick, relative), "trusted.gfid"))
            except OSError as exc:
                ids.add(exc.errno)
        if len(ids) != 1:
            split.append(relative)
    return split


class TwoNodeTest(unittest.TestCase):
    def setUp(self) -> None:
        assert volume is not None
        name = f"{self.id().rsplit('.', 1)[-1]}-{time.monotonic_ns()}"
        self.root_a = os.path.join(volume.node_a, name)
        self.root_b = os.path.join(volume.node_b, name)  # the same directory, through the other mount
        self.local = tempfile.mkdtemp(prefix="vua-node-indexes-")

    def node(self, which: str, **config) -> VUA:
        root = self.root_a if which == "a" else self.root_b
        index = os.path.join(self.local, f"index-{which}-{len(os.listdir(self.local))}")
        vua = VUA(VUAConfig(split_factor=16, namespace="gluster", index_path=index, **config), root)
        self.addCleanup(vua.close)
        return vua

    def test_the_volume_is_a_network_file_system_and_reads_use_pread(self):
        a = self.node("a")
        self.assertEqual(file_system_type(self.root_a), "fuse.glusterfs")
        self.assertTrue(a.network_fs)
        with self.assertRaisesRegex(InvalidInputError, "vua gc ROOT --max-bytes"):
            VUA(VUAConfig(max_bytes=1 << 30, index_path=os.path.join(self.local, "x")), self.root_a)

    def test_a_prompt_put_on_one_node_is_read_exactly_on_the_other(self):
        a, b = self.node("a"), self.node("b")
        tokens = torch.arange(5000, 5000 + 16 * 9)
        self.assertEqual(a.put(tokens, prefix_kv(tokens)), 9)
        self.assertEqual(b.prefix_length(tokens), 16 * 9)  # the tree probe finds A's groups
        self.assertEqual(check_hit(b.get_closest(tokens), tokens), 16 * 9)
        self.assertEqual(indexed_groups(b, [bytes.fromhex(k) for k in b.config.tokens_to_paths(tokens)]), 9)
        load = b.load(tokens, layerwise=True)
        self.assertEqual(load.wait(), 9)

    def test_a_fragment_lives_on_one_server_without_a_dht_link_file(self):
        # The writer's file is named so that DHT places it with "kv.safetensors": the link
        # that publishes it stays on one brick. A link across bricks leaves a DHT link file
        # (empty, mode ---------T) that readers on the other node saw as an empty or missing
        # fragment while two nodes published the same group.
        assert volume is not None
        a = self.node("a")
        tokens = torch.arange(7000, 7000 + 16 * 16)
        self.assertEqual(a.put(tokens, prefix_kv(tokens)), 16)
        name = os.path.basename(self.root_a)
        on_bricks = [
            os.path.join(directory, FRAGMENT_FILE)
            for brick in volume.bricks
            for directory, _, files in os.walk(os.path.join(brick, name))
            if FRAGMENT_FILE in files
        ]
        link_files = [path for path in on_bricks if os.stat(path).st_mode & stat.S_ISVTX]
        self.assertEqual((len(on_bricks), link_files), (16, []))

    def test_both_nodes_put_the_same_prompts_at_the_same_instant(self):
        script = """
            import logging, sys, torch
            from tests.helpers import prefix_kv, check_hit
            logging.getLogger("vua").addHandler(logging.StreamHandler())  # a shorter prefix says why
            from vua.core import VUA, VUAConfig
            root, index = sys.argv[1], sys.argv[2]
            vua = VUA(VUAConfig(split_factor=16, namespace="gluster", index_path=index), root)
            prompts = [torch.arange(i * 1000, i * 1000 + 16 * 8) for i in range(6)]
            kv = [prefix_kv(p) for p in prompts]
            print("ready", flush=True)
            sys.stdin.readline()  # both start together
            for p, k in zip(prompts, kv):
                vua.put(p, k)
            print(sum(check_hit(vua.get_closest(p), p) == len(p) for p in prompts), flush=True)
        """
        # Both wait on their stdin once ready; a line releases them together.
        nodes = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(script), root, os.path.join(self.local, f"race-{i}")],
                env={**os.environ, "PYTHONPATH": REPO},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, root in enumerate((self.root_a, self.root_b))
        ]
        for node in nodes:
            self.assertEqual(node.stdout.readline().strip(), "ready")
        for node in nodes:
            node.stdin.write("go\n")
            node.stdin.flush()
        for node in nodes:
            out, err = node.communicate(timeout=300)
            self.assertEqual(node.returncode, 0, err[-3000:])
            self.assertEqual(out.strip(), "6", err[-3000:])  # every prompt whole on both nodes
        self.assertEqual(directories_split_between_servers(os.path.basename(self.root_a)), [])

    def test_nodes_making_the_same_directories_at_once_leave_each_with_one_id(self):
        # Three processes per node make the same 209 directories at one instant. Before
        # make_dir stopped looking a directory up until it held its lock, such rounds left
        # directories with a different id on each server (12 in 25 rounds; this test
        # failed 3 runs in 4).
        start = str(time.time() + 2.0)  # after every interpreter has started
        makers = [run_node(DIRECTORY_MAKER, root, start) for root in (self.root_a, self.root_b) for _ in range(3)]
        for maker in makers:
            _, err = maker.communicate(timeout=300)
            self.assertEqual(maker.returncode, 0, err[-3000:])
        self.assertEqual(directories_split_between_servers(os.path.basename(self.root_a)), [])

    def test_a_directory_the_servers_disagree_about_costs_its_group_only(self):
        # The fault make_dir prevents, injected on the servers: one group's directory gets a
        # different GlusterFS id on each brick (as a lookup racing another node's mkdir left
        # it once). Node B's reads stop before that group, the maintenance commands report it
        # or skip it without crashing, and its put either says what ESTALE means or (once in
        # CI, not reproduced in 15 runs by hand) finds the directory usable again.
        assert volume is not None
        a = self.node("a")
        tokens = torch.arange(9000, 9000 + 16 * 6)
        self.assertEqual(a.put(tokens, prefix_kv(tokens)), 6)
        victim = a.config.tokens_to_paths(tokens)[3]
        relative = os.path.relpath(os.path.join(self.root_a, victim[:2], victim), volume.node_a)
        for brick in volume.bricks:
            os.setxattr(os.path.join(brick, relative), "trusted.gfid", uuid.uuid4().bytes)
        logging.getLogger("vua").setLevel(logging.CRITICAL)  # the skipped group is logged, as it should be
        self.addCleanup(logging.getLogger("vua").setLevel, logging.NOTSET)
        b = self.node("b")
        self.assertEqual(check_hit(b.get_closest(tokens), tokens), 16 * 3)
        index_b = os.path.join(self.local, "maintenance-b")
        for fix in ([], ["--fix"]):
            status, out, err = run_cli("verify", self.root_b, "--index-path", index_b, "--json", *fix)
            report = json.loads(out)
            self.assertEqual(status, 1, out + err)
            self.assertEqual(
                [(p["kind"], p["key"], p["fixed"]) for p in report["problems"]], [("unreadable", victim, False)]
            )
            self.assertEqual(report["fragments"], 5)
        status, out, err = run_cli("rebuild-index", self.root_b, "--index-path", index_b)
        self.assertEqual(status, 0, err)
        self.assertIn("5 groups", out)
        # The message for ESTALE itself is checked with the fault injected in test_faults.
        try:
            b.put(tokens, prefix_kv(tokens))
        except StorageError as exc:
            self.assertIn("Stale file handle; the shared file system called a directory", str(exc))
        self.assertIn(check_hit(b.get_closest(tokens), tokens), (16 * 3, 16 * 6))  # exact bytes either way
        status, out, err = run_cli("gc", self.root_b, "--index-path", index_b, "--max-bytes", "0", "--json")
        self.assertEqual(status, 0, err)
        self.assertIn(json.loads(out)["groups_evicted"], (5, 6), err)

    def test_a_reader_survives_another_node_evicting_and_reputting(self):
        # Node A re-puts the prompts and evicts them tree-wide with no grace period, over and
        # over; node B reads them in a loop meanwhile. A memory-mapped reader died of SIGBUS here.
        reader = """
            import logging, sys, time, torch
            logging.getLogger("vua").setLevel(logging.ERROR)
            from tests.helpers import check_hit
            from vua.core import VUA, VUAConfig
            root, index, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
            vua = VUA(VUAConfig(split_factor=16, namespace="gluster", index_path=index), root)
            prompts = [torch.arange(i * 1000, i * 1000 + 16 * 8) for i in range(4)]
            reads = full = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for p in prompts:
                    n = check_hit(vua.get_closest(p), p)  # raises on any wrong byte
                    reads += 1
                    full += n == len(p)
            print(reads, full, flush=True)
        """
        b = run_node(reader, self.root_b, os.path.join(self.local, "reader"), "12")
        a = self.node("a")
        prompts = [torch.arange(i * 1000, i * 1000 + 16 * 8) for i in range(4)]
        deadline = time.monotonic() + 12
        rounds = 0
        while time.monotonic() < deadline:
            for p in prompts:
                a.put(p, prefix_kv(p))
            status, _, err = run_cli(
                "gc", self.root_a, "--index-path", a.index_path, "--max-bytes", "0", "--shared", "--grace", "0"
            )
            self.assertIn(status, (0, 1), err)  # 1: groups it could not remove, which stay stored
            rounds += 1
        out, err = b.communicate(timeout=120)
        self.assertEqual(b.returncode, 0, f"reader died ({b.returncode}): {err[-3000:]}")
        reads, _ = map(int, out.split())
        self.assertGreater(reads, 0)
        self.assertGreater(rounds, 0)

    def test_a_writer_killed_mid_put_leaves_a_readable_store(self):
        writer = run_node(WRITER, self.root_a, os.path.join(self.local, "writer"), "60")
        self.assertEqual(writer.stdout.readline().strip(), "ready")
        time.sleep(3)
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=30)
        b = self.node("b")
        for base in range(4):
            stem = torch.arange(base * 1000, base * 1000 + 32)
            check_hit(b.get_closest(stem), stem)  # exact or shorter, never wrong
        status, out, err = run_cli(
            "verify", self.root_b, "--index-path", os.path.join(self.local, "verify-b"), "--json"
        )
        report = json.loads(out)
        kinds = {p["kind"] for p in report["problems"]}
        self.assertLessEqual(kinds, set(), out)  # the killed writer's temporaries are young: not problems
        self.assertEqual(status, 0, out + err)

    def test_rebuild_index_while_the_other_node_writes(self):
        writer = run_node(WRITER, self.root_a, os.path.join(self.local, "writer"), "8")
        self.assertEqual(writer.stdout.readline().strip(), "ready")
        index_b = os.path.join(self.local, "rebuild-b")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            os.path.isdir(self.root_b) and any(len(name) == 2 for name in os.listdir(self.root_b))
        ):
            time.sleep(0.1)  # the first groups are on their way
        for _ in range(3):
            status, _, err = run_cli("rebuild-index", self.root_b, "--index-path", index_b)
            self.assertEqual(status, 0, err)
        _, err = writer.communicate(timeout=120)
        self.assertEqual(writer.returncode, 0, err[-3000:])
        b = VUA(VUAConfig(split_factor=16, namespace="gluster", index_path=index_b), self.root_b)
        self.addCleanup(b.close)
        for base in range(4):
            stem = torch.arange(base * 1000, base * 1000 + 32)
            self.assertEqual(check_hit(b.get_closest(stem), stem), 32)

    def test_verify_stats_and_gc_see_the_whole_store(self):
        a = self.node("a")
        old, recent = torch.arange(100, 100 + 16 * 4), torch.arange(7000, 7000 + 16 * 4)
        a.put(old, prefix_kv(old))
        a.put(recent, prefix_kv(recent))
        index_b = os.path.join(self.local, "verify-b")
        # B's index knows none of A's groups: they are the store's, not problems.
        status, out, _ = run_cli("verify", self.root_b, "--index-path", index_b, "--json")
        self.assertEqual(status, 0, out)
        self.assertEqual(json.loads(out)["other_nodes_groups"], 8)
        status, out, _ = run_cli("verify", self.root_b, "--index-path", index_b, "--fix", "--json")
        self.assertEqual((status, json.loads(out)["problems"]), (0, []))
        status, out, _ = run_cli("stats", self.root_b, "--index-path", index_b, "--json")
        self.assertEqual(json.loads(out)["store"]["fragments"], 8)
        # A hit on B refreshes the prompt's last use in the tree, where A's gc sees it.
        b = self.node("b")
        time.sleep(0.05)
        self.assertEqual(check_hit(b.get_closest(recent), recent), 64)
        b.close()  # flushes the batched uses into the tree
        one_prompt = (
            sum(os.path.getsize(os.path.join(dirpath, f)) for dirpath, _, files in os.walk(self.root_a) for f in files)
            // 2
        )
        status, out, _ = run_cli(
            "gc",
            self.root_a,
            "--index-path",
            os.path.join(self.local, "gc-a"),
            "--max-bytes",
            str(one_prompt),
            "--json",
        )
        summary = json.loads(out)
        self.assertEqual((status, summary["shared"], summary["groups_evicted"]), (0, True, 4), out)
        self.assertEqual(summary["trash_deleted"], 0)  # in the trash for the grace period
        logging.getLogger("vua").setLevel(logging.ERROR)
        try:
            self.assertIsNone(a.get_closest(old))  # evicted: a miss on A, whose index still listed it
            self.assertEqual(check_hit(a.get_closest(recent), recent), 64)
        finally:
            logging.getLogger("vua").setLevel(logging.NOTSET)
        status, out, _ = run_cli("gc", self.root_a, "--max-bytes", str(one_prompt), "--grace", "0", "--json")
        self.assertEqual(json.loads(out)["trash_deleted"], 4)


class SoakTest(unittest.TestCase):
    def test_short_soak(self):
        # tools/soak.py: both nodes put, read and re-put the same prompts while A evicts tree-wide.
        assert volume is not None
        name = f"soak-{time.monotonic_ns()}"
        soak = subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "tools", "soak.py"),
                os.path.join(volume.node_a, name),
                os.path.join(volume.node_b, name),
                "--seconds",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(soak.returncode, 0, soak.stdout + soak.stderr[-3000:])
        report = json.loads(soak.stdout)
        self.assertTrue(all(node["gets"] > 0 and node["wrong"] == 0 for node in report["nodes"]), soak.stdout)
