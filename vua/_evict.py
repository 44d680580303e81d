"""Capacity: evict least recently used groups until the store fits ``max_bytes``.

Order is (last used, then deepest group first). Puts and hits refresh a whole prefix at
once, so a prefix is never older than any of its suffixes and is evicted after them.

A group leaves the index first and its files are unlinked afterwards (never truncated):
a reader that already mapped the fragment keeps its pages until it closes it, and a
reader that had not yet looked it up simply gets a shorter prefix. The group directory is
renamed aside before its files go, so a reader moving the same group aside at that moment
(it found damage) and the eviction never leave a half-removed directory behind.
"""

from __future__ import annotations

import logging
import shutil

from vua._index import Index
from vua._publish import move_group_aside

logger = logging.getLogger(__name__)


def enforce_capacity(index: Index, root: str, max_bytes: int) -> int:
    """Evicts groups until the indexed bytes are at most ``max_bytes``; returns bytes freed."""
    total = index.total_bytes()
    if total <= max_bytes:
        return 0
    candidates = sorted(
        ((record.last_used, -record.group_index, key, record.nbytes) for key, record in index.items() if record),
    )
    victims, freed = [], 0
    for _, _, key, nbytes in candidates:
        if total - freed <= max_bytes:
            break
        victims.append(key)
        freed += nbytes
    index.remove(victims)
    for key in victims:
        discard_group(root, key.hex())
    logger.debug("evicted %d groups (%d bytes) to stay under %d bytes", len(victims), freed, max_bytes)
    return freed


def discard_group(root: str, key_hex: str) -> None:
    """Removes a group: one atomic rename out of its place, then the files; a group already gone is fine."""
    doomed = move_group_aside(root, key_hex, "evicted")
    if doomed is not None:
        shutil.rmtree(doomed, ignore_errors=True)
