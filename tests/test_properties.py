"""Random sequences of put, get, evict, reopen, rebuild and damage, checked against a plain dict.

The model tracks, per whole-group prefix, whether the store must have it (``certain``)
or may have it (``possible``). Every get must return exact data, no longer than the
possible prefix and no shorter than the certain one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.helpers import check_hit, fragment_path, index_records, index_total_bytes, prefix_kv, run_cli
from vua.core import VUA, VUAConfig

SPLIT = 4
prompts = st.lists(st.integers(0, 2), min_size=SPLIT, max_size=4 * SPLIT).map(
    lambda ids: tuple(ids[: len(ids) // SPLIT * SPLIT])
)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="vua-prop-")
        self.config = VUAConfig(split_factor=SPLIT, namespace="prop", io_threads=2)
        self.vua = VUA(self.config, self.root)
        self.certain: set[tuple[int, ...]] = set()
        self.possible: set[tuple[int, ...]] = set()
        self.tainted: set[tuple[int, ...]] = set()  # damaged: only a read's quarantine clears it

    def teardown(self):
        self.vua.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def groups(prompt: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [prompt[: (i + 1) * SPLIT] for i in range(len(prompt) // SPLIT)]

    def bound(self, prompt: tuple[int, ...], members: set) -> int:
        n = 0
        for g in self.groups(prompt):
            if g not in members:
                break
            n = len(g)
        return n

    @rule(prompt=prompts)
    def put(self, prompt):
        tokens = torch.tensor(prompt, dtype=torch.long)
        self.vua.put(tokens, prefix_kv(tokens))
        for g in self.groups(prompt):
            self.possible.add(g)
            if g not in self.tainted:
                self.certain.add(g)

    @rule(prompt=prompts)
    def get(self, prompt):
        query = torch.tensor(prompt, dtype=torch.long)
        n = check_hit(self.vua.get_closest(query, device="cpu"), query)
        self.assertBetween(self.bound(prompt, self.certain), n, self.bound(prompt, self.possible))
        for g in self.groups(prompt):
            if len(g) > n and g in self.tainted:  # the read found it damaged and moved it away
                self.tainted.discard(g)
                self.possible.discard(g)
                break

    def assertBetween(self, low, n, high):
        assert low <= n <= high, f"got {n} tokens, expected between {low} and {high}"

    @rule(fraction=st.sampled_from([0, 0.3, 0.7]))
    def evict(self, fraction):
        limit = int(index_total_bytes(self.vua) * fraction)
        run_cli("gc", self.root, "--max-bytes", str(limit))
        self.certain.clear()  # which groups went is the LRU's business; data must stay exact

    @rule()
    def reopen(self):
        self.vua.close()
        self.vua = VUA(self.config, self.root)

    @rule()
    def rebuild_index(self):
        assert run_cli("rebuild-index", self.root, "--index-path", self.vua.index_path)[0] == 0

    @precondition(lambda self: self.possible)
    @rule(data=st.data())
    def damage(self, data):
        group = data.draw(st.sampled_from(sorted(self.possible)))
        key = self.config.tokens_to_paths(torch.tensor(group))[-1]
        path = fragment_path(self.root, key)
        if not os.path.exists(path):
            return
        os.truncate(path, os.path.getsize(path) // 2)
        self.certain.discard(group)
        self.tainted.add(group)

    @invariant()
    def index_total_matches_records(self):
        records = [r for _, r in index_records(self.vua).items() if r is not None]
        assert index_total_bytes(self.vua) == sum(r.nbytes for r in records)


StoreMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class StorePropertyTest(StoreMachine.TestCase):
    pass


if __name__ == "__main__":
    unittest.main()
