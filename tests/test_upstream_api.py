"""The original project's API, as its own test suite drives it, on the CPU."""

from __future__ import annotations

import torch

from tests.helpers import StoreTestCase, random_kv
from vua.core import VUA, VUAConfig
from vua.serdes import bytes_to_tensor, tensor_to_bytes


class UpstreamApiTest(StoreTestCase):
    def test_put_get_as_upstream_does(self):
        cache = VUA(VUAConfig, self.root)
        self.addCleanup(cache.close)
        self.assertEqual(cache.config().split_factor, cache.config.split_factor)  # accessor and attribute

        tokens = torch.randint(0, 0xFFFF, (1, 3000), dtype=torch.uint16, generator=torch.Generator().manual_seed(0))
        trimmed = VUAConfig.trim_to_split_factor(tokens)
        half = VUAConfig.trim_to_split_factor(tokens[:, :1500])
        quarter = VUAConfig.trim_to_split_factor(tokens[:, :750])
        quarter_plus_other = VUAConfig.trim_to_split_factor(torch.cat([tokens[:, :750], tokens[:, 2250:]], dim=1))
        self.assertEqual(len(VUAConfig.tokens_to_path(half)), half.shape[1] // VUAConfig.split_factor)

        cache.put(half, random_kv(1, half.shape[1], layers=4, heads=2, head_dim=16, dtype=torch.float16))
        for query, expected in ((trimmed, half), (quarter, quarter), (quarter_plus_other, quarter)):
            self.assertTrue(torch.equal(cache.get_closest(query, device="cpu").tokens, expected))
        batch = cache.get_closest([quarter, quarter_plus_other], device="cpu")
        self.assertEqual([r.tokens.shape[-1] for r in batch], [quarter.shape[1]] * 2)

        seqs = torch.randint(0, 0xFFFF, (3, cache.config().split_factor * 10), dtype=torch.uint16)
        self.assertEqual(cache.put(seqs, random_kv(3, seqs.shape[1], layers=2, heads=2, head_dim=16)), 30)

    def test_serdes_default_name(self):
        x = torch.randn(100, 5, 10)
        self.assertTrue(torch.equal(bytes_to_tensor(tensor_to_bytes(x)), x))
