"""Restoring a prompt's KV into real transformers models gives the logits of the model's own cache."""

from __future__ import annotations

import inspect
import os
import sys
import unittest

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.helpers import TINY_DECODER, StoreTestCase
from vua.core import VUAConfig
from vua.errors import InvalidInputError
from vua.integrations.transformers import (
    cache_keyword,
    cache_to_kv,
    generate,
    model_namespace,
    output_cache,
    prefill,
)

SPLIT = 16
SHAPE = TINY_DECODER
# bf16 logits of a restored prefix differ from a full recompute only by matmul blocking;
# this bound is a few bf16 ulps of the logits' magnitude here (measured max 0.03).
BF16_ATOL = 0.08


def build(kind: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="eager"))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, attn_implementation="eager"))
    return model.to(dtype).eval()


def own_cache_continuation(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of ``prompt[n:]`` computed from the model's own in-memory cache of ``prompt[:n]``."""
    own = output_cache(model(prompt[None, :n], use_cache=True))
    return model(prompt[None, n:], **{cache_keyword(model): own}).logits


class RestoreTest(StoreTestCase):
    def store_for(self, model):
        return self.store(VUAConfig(split_factor=SPLIT, namespace=model_namespace(model)))

    @torch.no_grad()
    def check_model(self, kind: str, dtype: torch.dtype):
        model = self.build = build(kind, dtype)
        vua = self.store_for(model)
        prompt = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(1))

        first = prefill(model, vua, prompt)[0]
        self.assertEqual((first.cached_tokens, first.stored_groups), (0, 6))
        self.assertTrue(torch.equal(first.logits, model(prompt[None]).logits))  # same call, same operations

        def compare(query: torch.Tensor, result) -> None:
            n = result.cached_tokens
            # Bit for bit what the model computes from its own in-memory cache of the prefix:
            # the restored cache holds the same bits, and the continuation runs the same kernels.
            self.assertTrue(torch.equal(result.logits, own_cache_continuation(model, query, n)))
            # Against a full recompute only up to rounding: a 4-query attention may sum in
            # another order than a 100-query one, and that order depends on the CPU's kernels
            # (seen: 1 fp32 ulp, 1.2e-7, on an Intel Xeon; 0 on an AMD EPYC). 1e-5 is ~100 ulps
            # of these logits (|x| < 2), far below any change a wrong KV would make.
            full = model(query[None]).logits[:, n:]
            atol = 1e-5 if dtype == torch.float32 else BF16_ATOL
            torch.testing.assert_close(result.logits.float(), full.float(), atol=atol, rtol=0)

        # Full prefix: 96 of 100 tokens restored, 4 computed.
        again = prefill(model, vua, prompt)[0]
        self.assertEqual((again.cached_tokens, again.stored_groups), (96, 0))
        compare(prompt, again)

        # Partial prefix plus remainder: the prompt diverges in group 3.
        other = prompt.clone()
        other[50:] = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(2))
        partial = prefill(model, vua, other)[0]
        self.assertEqual(partial.cached_tokens, 48)
        compare(other, partial)

    def test_llama_fp32(self):
        self.check_model("llama", torch.float32)

    def test_qwen2_fp32(self):
        self.check_model("qwen2", torch.float32)

    def test_llama_bf16_close(self):
        self.check_model("llama", torch.bfloat16)

    def test_qwen2_bf16_close(self):
        self.check_model("qwen2", torch.bfloat16)

    @torch.no_grad()
    def test_batch_with_different_cached_lengths(self):
        model = build("llama")
        vua = self.store_for(model)
        a = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(3))
        b = torch.randint(0, 512, (90,), generator=torch.Generator().manual_seed(4))
        prefill(model, vua, [a[:40], b])  # a: 2 groups stored, b: 5 groups
        results = prefill(model, vua, [a, b])
        self.assertEqual([r.cached_tokens for r in results], [32, 80])
        for prompt, result in zip((a, b), results):
            n = result.cached_tokens
            # Bit for bit what the model gives from its own in-memory cache of the prefix...
            self.assertTrue(torch.equal(result.logits, own_cache_continuation(model, prompt, n)))
            # ...and a full recompute up to float rounding: a 10-query attention matmul may
            # sum in another order than a 90-query one (seen: 1.8e-7).
            torch.testing.assert_close(result.logits, model(prompt[None]).logits[:, n:], atol=1e-5, rtol=0)

    @torch.no_grad()
    def test_greedy_generation_is_unchanged(self):
        model = build("qwen2")
        vua = self.store_for(model)
        prompt = torch.randint(0, 512, (75,), generator=torch.Generator().manual_seed(5))
        plain = model.generate(prompt[None], max_new_tokens=12, do_sample=False)
        cold = generate(model, vua, prompt, max_new_tokens=12)[0]  # computes and stores
        warm = generate(model, vua, prompt, max_new_tokens=12)[0]  # restores 64 tokens
        self.assertTrue(torch.equal(cold, plain))
        self.assertTrue(torch.equal(warm, plain))
        self.assertEqual(vua.get_closest(prompt, device="cpu").tokens.numel(), 64)

    def test_namespaces_differ_between_models_and_dtypes(self):
        names = {
            model_namespace(build("llama")),
            model_namespace(build("qwen2")),
            model_namespace(build("llama", torch.bfloat16)),
        }
        self.assertEqual(len(names), 3)

    def test_cache_helpers(self):
        model = build("llama")
        self.assertIn(cache_keyword(model), inspect.signature(model.forward).parameters)
        cache = output_cache(model(torch.arange(20)[None], use_cache=True))
        kv = cache_to_kv(cache)
        self.assertEqual(len(kv), 2)
        self.assertEqual(kv[0][0].shape, (1, 2, 20, 16))
        self.assertEqual(kv[0][0].data_ptr(), cache.layers[0].keys.data_ptr())  # no copy

    @torch.no_grad()
    def test_put_takes_the_cache_a_forward_returns(self):
        # The README's loop, vua.put(tokens, past_key_values), with what transformers 5 returns.
        model = build("llama")
        vua = self.store_for(model)
        prompt = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(7))
        cache = output_cache(model(prompt[None], use_cache=True))
        self.assertIsInstance(cache, DynamicCache)
        self.assertEqual(vua.put(vua.config.trim_to_split_factor(prompt), cache), 2)
        hit = vua.get_closest(prompt, device="cpu")
        self.assertEqual(hit.tokens.numel(), 32)
        for (k, v), layer in zip(hit.data, cache.layers, strict=True):
            self.assertTrue(torch.equal(k, layer.keys[:, :, :32]) and torch.equal(v, layer.values[:, :, :32]))

    @torch.no_grad()
    def test_put_refuses_a_cache_that_does_not_hold_the_prompt_from_its_start(self):
        # A sliding-window layer keeps only its last window: positions 0.. are gone, and
        # storing the positions it kept under the prompt's first tokens would be wrong KV.
        config = Qwen2Config(
            **SHAPE, use_sliding_window=True, sliding_window=16, max_window_layers=0, attn_implementation="eager"
        )
        model = Qwen2ForCausalLM(config).eval()
        store = self.store(VUAConfig(split_factor=8, namespace=model_namespace(model)))
        prompt = torch.arange(40)
        cache = output_cache(model(prompt[None], use_cache=True))
        with self.assertRaisesRegex(InvalidInputError, r"layer 0 \(DynamicSlidingWindowLayer\) keeps 15 of the 40"):
            store.put(prompt, cache)
        with self.assertRaisesRegex(InvalidInputError, "holds no KV tensors .*run the model with this cache first"):
            store.put(prompt, DynamicCache(config=model.config))
        self.assertEqual(os.listdir(self.root), ["index.lmdb"])  # nothing stored

    @torch.no_grad()
    def test_no_transformers_warnings(self):
        # transformers renames what VUA uses now and then (5.24: past_key_values -> cache)
        # and warns through its loggers first; VUA follows a rename before the old name goes.
        model = build("llama")
        vua = self.store_for(model)
        prompt = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(6))
        with self.assertNoLogs("transformers", level="WARNING"):
            prefill(model, vua, prompt)
            prefill(model, vua, prompt)
            generate(model, vua, prompt, max_new_tokens=3)


class LazyImportTest(unittest.TestCase):
    def test_importing_vua_does_not_import_frameworks(self):
        import subprocess

        code = "import sys, vua, vua.core, vua.cli; print('transformers' in sys.modules, 'vllm' in sys.modules)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        self.assertEqual(done.stdout.split(), ["False", "False"], done.stderr)
