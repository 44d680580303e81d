"""The unit test of ``vua._tree``: the one walk over the fragment tree that maintenance makes
(rebuild, verify, gc, stats), and what each depth of check tells of a group.

As the unit test of that private module it imports it; everything else goes through the
``vua`` command and tests/helpers.py.
"""

from __future__ import annotations

import errno
import json
import os
import time
import unittest
from unittest import mock

import torch

from tests.helpers import (
    EVICTED,
    TMP_PREFIX,
    WRITING_PREFIX,
    StoreTestCase,
    evict_group,
    fanout_dir,
    flip_byte,
    fragment_path,
    group_dir,
    random_kv,
    run_cli,
    temporaries,
)
from vua import _tree


class TreeWalkTest(StoreTestCase):
    """The one walk over the tree that rebuild, verify, gc and stats make."""

    def setUp(self):
        super().setUp()
        vua = self.store(split_factor=16, namespace="walk")
        vua.put(torch.arange(48), random_kv(1, 48))
        vua.put(torch.arange(1000, 1016), random_kv(1, 16))
        self.keys = vua.config.tokens_to_paths(torch.arange(48))
        self.evicted = vua.config.tokens_to_paths(torch.arange(1000, 1016))[0]
        vua.close()  # its pending uses are in the tree now, not arriving mid-test

    def states(self, check: _tree.Check | None, **walk) -> dict[str, _tree.GroupState]:
        return {g.key_hex: g.state for f in _tree.walk_tree(self.root, check, **walk) for g in f.groups}

    def test_each_depth_of_check_tells_what_it_can(self):
        valid, damaged, unpublished = self.keys
        flip_byte(fragment_path(self.root, damaged), -1)  # data, not the header
        os.unlink(fragment_path(self.root, unpublished))
        writer = os.path.join(group_dir(self.root, unpublished), WRITING_PREFIX + "1-live")
        open(writer, "wb").close()
        evict_group(self.root, self.evicted, keep=True)
        ahead = time.time() + 7200  # a node's clock two hours fast: that far past, not young for ever
        trashed = next(t for t in temporaries(self.root) if os.path.dirname(t) == fanout_dir(self.root, self.evicted))
        os.utime(trashed, (ahead, ahead))
        State = _tree.GroupState
        header_only = {valid: State.VALID, damaged: State.VALID, unpublished: State.UNPUBLISHED}
        self.assertEqual(self.states(_tree.Check.STAT), header_only)
        self.assertEqual(self.states(_tree.Check.HEADER), header_only)
        self.assertEqual(
            self.states(_tree.Check.FULL), {valid: State.VALID, damaged: State.DAMAGED, unpublished: State.UNPUBLISHED}
        )
        self.assertEqual(self.states(_tree.Check.HEADER, passed_over={bytes.fromhex(valid)})[valid], State.PASSED_OVER)
        full = {g.key_hex: g for f in _tree.walk_tree(self.root, _tree.Check.FULL) for g in f.groups}
        self.assertEqual([t.path for t in full[unpublished].writing], [writer])
        self.assertLess(full[unpublished].writing[0].age, 60)
        self.assertIsNotNone(full[unpublished].age)
        self.assertEqual(full[valid].stored.record.nbytes, os.path.getsize(fragment_path(self.root, valid)))
        trash = [t for f in _tree.walk_tree(self.root, None, trash=True) for t in f.trash]
        self.assertEqual([(t.path, t.why) for t in trash], [(trashed, EVICTED)])
        self.assertGreater(trash[0].age, 7000)
        self.assertEqual(self.states(None), {})

    def test_stat_reads_a_future_last_use_as_now(self):
        future = 4102444800 * 10**9  # 2100
        os.utime(group_dir(self.root, self.keys[0]), ns=(future, future))
        groups = {g.key_hex: g for g in _tree.stat_groups(self.root)}
        self.assertEqual(set(groups), {*self.keys, self.evicted})
        self.assertLessEqual(groups[self.keys[0]].last_use, time.time_ns())
        self.assertEqual(groups[self.keys[1]].nbytes, os.path.getsize(fragment_path(self.root, self.keys[1])))

    def test_gc_passes_over_a_fan_out_directory_it_cannot_list(self):
        hidden = fanout_dir(self.root, self.keys[0])
        hidden_keys = [key for key in (*self.keys, self.evicted) if fanout_dir(self.root, key) == hidden]
        real_scandir = os.scandir

        def refusing_scandir(path=".", *rest):
            if os.fspath(path) == hidden:
                raise PermissionError(errno.EACCES, "Permission denied", hidden)
            return real_scandir(path, *rest)

        with mock.patch.object(os, "scandir", refusing_scandir), self.assertLogs("vua", "WARNING") as logs:
            status, out, _ = run_cli("gc", self.root, "--max-bytes", "0", "--json")
        # Before: status 2, the trash's walk of the tree stopped at the directory the groups' walk passed over.
        self.assertEqual((status, json.loads(out)["groups_before"]), (0, 4 - len(hidden_keys)))
        self.assertTrue(any(f"cannot list {hidden}" in line for line in logs.output), logs.output)
        for key in hidden_keys:
            self.assertTrue(os.path.exists(fragment_path(self.root, key)))

    def test_verify_reports_a_temporary_it_cannot_stat(self):
        fanout = fanout_dir(self.root, self.keys[0])
        broken = os.path.join(fanout, f"{TMP_PREFIX}{self.keys[0]}-damaged-1-abcd")
        open(broken, "wb").close()
        real_stat = os.stat

        def failing_stat(path, *rest, **kwargs):
            if os.fspath(path) == broken:
                raise OSError(errno.EIO, "Input/output error", broken)
            return real_stat(path, *rest, **kwargs)

        with mock.patch.object(os, "stat", failing_stat):
            status, out, _ = run_cli("verify", self.root, "--json")
        # Before: status 2, verify stopped at the first temporary it could not stat.
        report = json.loads(out)
        problems = [(p["kind"], p["key"], p["path"]) for p in report["problems"]]
        self.assertEqual((status, problems, report["fragments"]), (1, [("unreadable", None, broken)], 4))
        self.assertIn("Input/output error", report["problems"][0]["detail"])


if __name__ == "__main__":
    unittest.main()
