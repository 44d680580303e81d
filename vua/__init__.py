"""VUA: a KV-cache store for LLM inference on a file system.

``from vua.core import VUA, VUAConfig`` is the main entry point. Importing ``vua`` never
imports transformers or vllm; their integrations load them when used.
"""

from vua.core import VUA, ClosestKV, KVLoad, VUAConfig
from vua.errors import (
    FragmentError,
    InvalidInputError,
    NotAStoreError,
    SplitFactorError,
    StorageError,
    VUAError,
)

__all__ = [
    "VUA",
    "VUAConfig",
    "ClosestKV",
    "KVLoad",
    "VUAError",
    "InvalidInputError",
    "SplitFactorError",
    "StorageError",
    "NotAStoreError",
    "FragmentError",
]
__version__ = "0.2.0"
