"""Integrations with inference frameworks, each importing its framework only when imported.

- ``vua.integrations.transformers``: Hugging Face transformers (DynamicCache).
- ``vua.vllm``: the vLLM KV connector (at ``vua.vllm`` so vLLM's config can name it).
"""
