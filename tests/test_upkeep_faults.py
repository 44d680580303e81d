"""Maintenance against faults: gc and verify --fix where the root cannot be written, rebuilds racing gc,
fan-out directories this user cannot read. Each test failed against the code before its fix.

The races patch the one function whose window they open (``vua._rebuild.write_current``,
``vua._evict.evict_group``), so this module imports those two private modules; everything
else goes through the ``vua`` command and tests/helpers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import torch

from tests.helpers import (
    StoreTestCase,
    fanout_dir,
    flip_byte,
    fragment_path,
    index_records,
    random_kv,
    read_only_mount,
    run_cli,
    run_cli_json,
)
from vua import _evict, _rebuild

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UpkeepTestCase(StoreTestCase):
    """A store holding two prompts of three groups each."""

    def setUp(self):
        super().setUp()
        self.vua = self.store(split_factor=16, namespace="upkeep")
        self.prompts = [torch.arange(100, 148), torch.arange(900, 948)]
        self.kv = random_kv(1, 48, heads=1)
        for tokens in self.prompts:
            self.vua.put(tokens, self.kv)
        self.keys = [key for tokens in self.prompts for key in self.vua.config.tokens_to_paths(tokens)]

    def fragments_present(self) -> int:
        return sum(os.path.exists(fragment_path(self.root, key)) for key in self.keys)

    def own_index_path(self) -> str:
        folder = tempfile.mkdtemp(prefix="vua-index-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        return os.path.join(folder, "index")


class ReadOnlyRootTest(UpkeepTestCase):
    def test_gc_that_cannot_delete_says_so(self):
        self.vua.close()
        view, index_path = read_only_mount(self, self.root), self.own_index_path()
        status, out, err = run_cli("gc", view, "--index-path", index_path, "--max-bytes", "0", "--json")
        # Before: status 0, "evicted 6 groups", every fragment still there, only the index emptied.
        report = json.loads(out)
        self.assertEqual(
            (status, report["groups_evicted"], report["bytes_freed"], report["groups_refused"]), (1, 0, 0, 6)
        )
        self.assertIn("could not remove 6 groups", err)
        self.assertIn("Read-only file system", err)
        self.assertEqual(self.fragments_present(), 6)
        status, out, _ = run_cli("stats", view, "--index-path", index_path, "--json")
        self.assertEqual((status, json.loads(out)["fragments"]), (0, 6))  # still in its index

    def test_verify_fix_that_cannot_delete_does_not_call_it_fixed(self):
        flip_byte(fragment_path(self.root, self.keys[1]), 5000)
        self.vua.close()
        view = read_only_mount(self, self.root)
        # An index of this node's own, outside the root: the command treats it as node-local.
        status, report = run_cli_json("verify", view, "--index-path", self.own_index_path(), "--fix")
        damaged = [p for p in report["problems"] if p["kind"] == "damaged-fragment"]
        self.assertEqual(len(damaged), 1)
        self.assertFalse(damaged[0]["fixed"])  # it said fixed, before
        self.assertIn("Read-only file system", damaged[0]["detail"])
        self.assertEqual((status, report["clean"]), (1, False))


class RebuildRacingGcTest(UpkeepTestCase):
    """A rebuild reads the tree while a gc evicts; the index it leaves must not list evicted groups."""

    def gc_to_one_prompt(self) -> None:
        one_prompt = sum(r.nbytes for r in index_records(self.vua).values() if r) // 2
        status, _, _ = run_cli("gc", self.root, "--max-bytes", str(one_prompt))
        self.assertEqual(status, 0)

    def assertNoDanglingEntries(self) -> None:
        _, report = run_cli_json("verify", self.root, "--index-path", self.vua.index_path)
        self.assertEqual([p["kind"] for p in report["problems"]], [])
        self.assertEqual(self.fragments_present(), 3)

    def test_gc_between_the_rebuilds_first_read_and_its_swap(self):
        real_write_current = _rebuild.write_current

        def gc_then_swap(*args, **kwargs):  # the window: groups read, generation not yet live
            self.gc_to_one_prompt()
            real_write_current(*args, **kwargs)

        with mock.patch.object(_rebuild, "write_current", side_effect=gc_then_swap):
            self.assertEqual(run_cli("rebuild-index", self.root, "--index-path", self.vua.index_path)[0], 0)
        self.assertNoDanglingEntries()  # 3 dangling-index-entry, before

    def test_rebuild_between_gcs_index_removal_and_its_renames(self):
        real_evict = _evict.evict_group
        rebuilt = []

        def rebuild_then_evict(*args, **kwargs):  # the window: out of the index, still in the tree
            if not rebuilt:
                rebuilt.append(run_cli_json("rebuild-index", self.root, "--index-path", self.vua.index_path))
            real_evict(*args, **kwargs)

        with mock.patch.object(_evict, "evict_group", side_effect=rebuild_then_evict):
            self.gc_to_one_prompt()
        status, summary = rebuilt[0]
        self.assertEqual((status, summary["groups"]), (0, 6))
        self.assertNoDanglingEntries()


class UnreadableFanoutTest(UpkeepTestCase):
    def run_as_nobody(self, *argv: str) -> subprocess.CompletedProcess:
        """The vua command as user nobody (65534): a real EACCES on directories only root may read."""
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "vua.cli"]
        return subprocess.run([*command, *argv], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})

    def test_verify_fix_keeps_the_entries_of_a_fan_out_it_cannot_list(self):
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            self.skipTest("needs root and setpriv, to make a directory another user cannot list")
        self.vua.close()
        index_path = self.own_index_path()
        status, _, _ = run_cli("rebuild-index", self.root, "--index-path", index_path)
        self.assertEqual(status, 0)
        for path in (self.root, os.path.dirname(index_path)):
            os.chmod(path, 0o755)
        subprocess.run(["chown", "-R", "65534:65534", os.path.dirname(index_path)], check=True)
        hidden = fanout_dir(self.root, self.keys[0])
        os.chmod(hidden, 0o700)  # root's own: nobody may not list it
        probe = self.run_as_nobody("--help")
        if probe.returncode != 0:  # e.g. a Python under /root, which nobody may not enter
            self.skipTest(f"cannot run the vua command as another user here: {probe.stderr[-300:]}")
        hidden_keys = {key for key in self.keys if fanout_dir(self.root, key) == hidden}
        child = self.run_as_nobody("verify", self.root, "--index-path", index_path, "--fix", "--json")
        report = json.loads(child.stdout)
        # Before: its groups were dangling-index-entry problems, and --fix dropped their entries.
        self.assertEqual([p["kind"] for p in report["problems"]], ["unreadable"], child.stdout)
        self.assertIn("Permission denied", report["problems"][0]["detail"])
        child = self.run_as_nobody("stats", self.root, "--index-path", index_path, "--json")
        self.assertEqual(json.loads(child.stdout)["fragments"], 6, child.stderr)  # every entry kept
        self.assertGreaterEqual(len(hidden_keys), 1)
