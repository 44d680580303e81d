"""Why a lookup missed, when the cause is a setting: the store's namespace, split factor or layout.

Keys are chained from the namespace and cut by the split factor, so a reader opened with
another namespace or split factor than the writer finds nothing at all, and a prefix whose
groups were put with two layouts ends where the layout changes. Each is a plain miss to the
lookup; this unit tells the user, with one WARNING per cause per store object naming both
sides. It looks only at the index (no file is read), and only after a miss.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from vua._index import Index
from vua._keys import group_keys, namespace_seed
from vua._kv_layout import Layout
from vua._record import namespace_id
from vua.errors import StorageError

logger = logging.getLogger(__name__)

# Split factors tried for another writer's groups: powers of two, which is what engines and
# users pick (vLLM's block sizes are); any other value is not guessed.
_SPLIT_CANDIDATES = tuple(2**k for k in range(4, 14))  # 16 .. 8192
_MAX_NAMESPACES = 64  # a store with more is searched in its first 64 (the search runs on a miss)
_PROBE_INTERVAL_SECONDS = 1.0  # at most one search a second: misses of new prompts are the common case


class MissReasons:
    """Explains misses caused by a setting, once per cause (namespace, split_factor, layout).

    Args:
        index: the store's index.
        namespace: the store's namespace.
        split_factor: the store's split factor.
    """

    def __init__(self, index: Index, *, namespace: str, split_factor: int):
        self._index = index
        self._namespace = namespace
        self._ns_id = namespace_id(namespace)
        self._split = split_factor
        self._warned: set[str] = set()
        self._last_probe = -_PROBE_INTERVAL_SECONDS
        self._lock = threading.Lock()

    def after_lookup(self, ids: np.ndarray, keys: list[bytes], groups: int, layout: Layout | None) -> None:
        """Called after a lookup of a prompt (token ids ``ids``, group keys ``keys``) found ``groups`` groups
        of ``layout``; logs why it found no more, when a setting is the reason and that reason was not logged yet."""
        try:
            if groups == 0 and not {"namespace", "split_factor"} <= self._warned:
                self._explain_empty(ids)
            elif 0 < groups < len(keys) and layout is not None and "layout" not in self._warned:
                self._explain_layout(keys, groups, layout)
        except StorageError as exc:  # an explanation is a courtesy: a failing index says so elsewhere
            logger.debug("could not look for the reason of a miss: %s", exc)

    def _warn_once(self, cause: str, message: str, *args: object) -> None:
        with self._lock:
            if cause in self._warned:
                return
            self._warned.add(cause)
        logger.warning(message + " (logged once per store)", *args)

    def _explain_empty(self, ids: np.ndarray) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last_probe < _PROBE_INTERVAL_SECONDS:
                return
            self._last_probe = now
        names = sorted(self._index.namespaces().values())[:_MAX_NAMESPACES]
        if self._namespace not in names:
            names.append(self._namespace)
        splits = sorted({self._split, *(s for s in _SPLIT_CANDIDATES if s <= len(ids))})
        candidates = []  # (namespace, split factor, first group's key)
        for name in names:
            seed = namespace_seed(name)
            for s in splits:
                if (name, s) != (self._namespace, self._split) and s <= len(ids):
                    candidates.append((name, s, group_keys(ids[:s], s, seed)[0]))
        records = self._index.records([key for _, _, key in candidates])
        for (name, s, _), record in zip(candidates, records):
            if record is None or record.namespace_id != namespace_id(name):
                continue
            if name != self._namespace:
                self._warn_once(
                    "namespace",
                    "miss: nothing of this prompt is stored under this store's namespace %r (split_factor %d), "
                    "but its first group is stored under namespace %r (split_factor %d): if the writer's KV is "
                    "this model's, open this store with VUAConfig(%s) to find it (another model's KV "
                    "is rightly kept apart)",
                    self._namespace,
                    self._split,
                    name,
                    s,
                    f"namespace={name!r}" + (f", split_factor={s}" if s != self._split else ""),
                )
            else:
                self._warn_once(
                    "split_factor",
                    "miss: nothing of this prompt is stored with this store's split_factor %d (namespace %r), "
                    "but its first group is stored with split_factor %d: the writer was opened with another "
                    "split_factor; open the reader with VUAConfig(split_factor=%d) to find it",
                    self._split,
                    self._namespace,
                    s,
                    s,
                )
            return

    def _explain_layout(self, keys: list[bytes], groups: int, layout: Layout) -> None:
        (record,) = self._index.records([keys[groups]])
        if record is None or record.namespace_id != self._ns_id or record.layout_id == layout.id:
            return
        other = self._index.layout(record.layout_id)
        self._warn_once(
            "layout",
            "miss past group %d: the groups before it are stored with layout %s, group %d with layout %s; "
            "two models (or dtypes) put KV under one namespace %r, and each must have its own",
            groups,
            layout.describe(),
            groups,
            other.describe() if other is not None else f"id {record.layout_id:016x}",
            self._namespace,
        )
