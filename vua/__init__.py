"""VUA: a KV-cache store for LLM inference on a file system.

``from vua.core import VUA, VUAConfig`` is the main entry point. Importing ``vua`` never
imports transformers or vllm, and imports torch only when a store name (``vua.VUA`` and
the like) is first used, so the ``vua`` command starts in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vua.errors import (
    FragmentError,
    FragmentState,
    InvalidInputError,
    NotAStoreError,
    SplitFactorError,
    StorageError,
    VUAError,
)

if TYPE_CHECKING:
    from vua.core import VUA, ClosestKV, KVDestination, KVLoad, StoreStats, VUAConfig

__all__ = [
    "VUA",
    "VUAConfig",
    "ClosestKV",
    "KVDestination",
    "KVLoad",
    "StoreStats",
    "VUAError",
    "InvalidInputError",
    "SplitFactorError",
    "StorageError",
    "NotAStoreError",
    "FragmentError",
    "FragmentState",
]
__version__ = "0.2.0"

_FROM_CORE = {"VUA", "VUAConfig", "ClosestKV", "KVDestination", "KVLoad", "StoreStats"}


def __getattr__(name: str) -> Any:
    if name in _FROM_CORE:
        from vua import core

        return getattr(core, name)
    raise AttributeError(f"module 'vua' has no attribute {name!r}")
