"""Capacity: evict least recently used groups until the store fits ``max_bytes``.

Order is (last used, then deepest group first). Puts and hits refresh a whole prefix at
once, so a prefix is never older than any of its suffixes and is evicted after them.

Two scopes:
- ``enforce_capacity``: after a put on a local store, over the groups its index knows.
- ``collect_garbage`` (``vua gc``): over the whole fragment tree, which is what every node
  of a shared store sees; a group's last use is its directory's mtime, which every node
  refreshes on hits. Run it on one node.

A group leaves the index first, then its fragment is moved aside (``_publish.move_aside``:
one atomic rename, so a reader moving the same group aside as damaged never races a
half-removed group), then unlinked, never truncated. On a local file system a reader that already
mapped the fragment keeps its pages. On a shared (network) root another node may be
reading the file right now, so the moved-aside directory stays for a grace period (the
trash) and a later gc deletes it; a reader that still loses gets a shorter prefix.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from vua._index import Index
from vua._publish import move_aside, remove_moved_aside
from vua._tree import Temporary, stat_tree

logger = logging.getLogger(__name__)

EVICTED = "evicted"  # the word in a moved-aside directory's name
DEFAULT_TRASH_GRACE_SECONDS = 600.0


def enforce_capacity(index: Index, root: str, max_bytes: int) -> int:
    """Evicts groups until the indexed bytes are at most ``max_bytes``; returns bytes freed."""
    total = index.total_bytes()
    if total <= max_bytes:
        return 0
    now = time.time_ns()
    entries = [(key, record) for key, record in index.items() if record]
    future = {key: now for key, record in entries if record.last_used > now}
    if future:  # dated ahead (a copied or damaged index): they age from now on, not never
        index.touch(future)
    records = sorted((min(record.last_used, now), -record.group_index, key, record.nbytes) for key, record in entries)
    done = _evict_oldest(root, index, [(key, nbytes) for *_, key, nbytes in records], total - max_bytes)
    logger.debug("evicted %d groups (%d bytes) to stay under %d bytes", done.groups, done.bytes, max_bytes)
    if done.refused:
        logger.warning(
            "could not evict %d groups from %s (%s): the store stays over its %d bytes",
            done.refused,
            root,
            done.refusal,
            max_bytes,
        )
    return done.bytes


@dataclass
class Evictions:
    """What an eviction pass did: groups and bytes removed, and what the file system refused to remove."""

    groups: int = 0
    bytes: int = 0
    refused: int = 0
    refusal: str | None = None  # why, the first time (e.g. "Read-only file system")


def _evict_oldest(
    root: str, index: Index, oldest_first: list[tuple[bytes, int]], excess: int, *, keep: bool = False
) -> Evictions:
    """Evicts groups ((key, bytes), least recently used first) until ``excess`` bytes are freed.

    A group the file system refuses to remove (a read-only root, no write permission) is
    put back in the index and counted as refused, not evicted.
    """
    victims: list[tuple[bytes, int]] = []
    wanted = 0
    for key, nbytes in oldest_first:
        if wanted >= excess:
            break
        victims.append((key, nbytes))
        wanted += nbytes
    keys = [key for key, _ in victims]
    records = index.records(keys)  # to put back what cannot be removed
    index.remove(keys)
    done = Evictions()
    kept, evicted = [], []
    for (key, nbytes), record in zip(victims, records):
        try:
            evict_group(root, key.hex(), keep=keep)
        except OSError as exc:
            done.refused += 1
            done.refusal = done.refusal or exc.strerror or str(exc)
            if record is not None:
                kept.append((key, record))
            continue
        evicted.append(key)
        done.groups += 1
        done.bytes += nbytes
    if kept:
        index.add(kept)
    # Once more, now that the groups are out of the tree: a rebuild that listed them before
    # may have swapped in a generation that still holds them (it drops the groups gone from
    # its last listing of the tree; this covers the ones that were still there then).
    index.remove(evicted)
    return done


@dataclass
class GarbageSummary:
    """What a tree-wide gc found and did."""

    groups: int  # in the tree before
    bytes_before: int
    groups_evicted: int
    bytes_freed: int
    trash_deleted: int  # moved-aside directories older than the grace period, now deleted
    groups_refused: int = 0  # victims the file system would not let this process remove
    refusal: str | None = None  # why (e.g. "Read-only file system")

    @property
    def bytes_after(self) -> int:
        return self.bytes_before - self.bytes_freed


def collect_garbage(
    root: str, index: Index, max_bytes: int, *, shared: bool, grace_seconds: float = DEFAULT_TRASH_GRACE_SECONDS
) -> GarbageSummary:
    """Evicts the least recently used groups of the whole tree until it holds at most ``max_bytes``.

    Sizes and last uses come from the tree (one stat per group), so every node's puts and
    hits count; ties go deepest group first where this node's index knows the group. The
    tree is walked once, for the groups and the trash together: on a network root each
    listing is a round trip per fan-out directory.

    Args:
        shared: the root is shared by nodes (a network file system): evicted groups stay in
            the trash for ``grace_seconds`` before a later gc deletes them.
    """
    groups, trash = stat_tree(root, trash=True)
    total = sum(group.nbytes for group in groups)
    keys = [bytes.fromhex(group.key_hex) for group in groups]
    depth = {key: record.group_index for key, record in zip(keys, index.records(keys)) if record is not None}
    order = sorted(zip(keys, groups), key=lambda kg: (kg[1].last_use, -depth.get(kg[0], 0)))
    grace = grace_seconds if shared else 0.0
    victims = [(key, g.nbytes) for key, g in order]
    # With no grace period this run's victims go at once: the trash listed above predates them.
    done = _evict_oldest(root, index, victims, total - max_bytes, keep=grace > 0)
    deleted = _empty_trash(trash, grace)
    logger.info(
        "gc: evicted %d of %d groups (%d bytes), deleted %d from the trash",
        done.groups,
        len(groups),
        done.bytes,
        deleted,
    )
    return GarbageSummary(len(groups), total, done.groups, done.bytes, deleted, done.refused, done.refusal)


def evict_group(root: str, key_hex: str, *, keep: bool = False) -> None:
    """Removes a group: :func:`move_aside` as evicted, then :func:`remove_moved_aside`; a group already gone is fine.

    ``keep``: leave the moved-aside directory in the trash (shared roots); its mtime becomes
    the time of eviction, from which the grace period runs.

    Raises:
        OSError: the file system refused to move it (a read-only root, no write permission).
    """
    doomed = move_aside(root, key_hex, EVICTED)
    if doomed is None:
        return
    if keep:
        try:
            os.utime(doomed)
        except OSError:
            pass
    else:
        remove_moved_aside(doomed)


def _empty_trash(trash: list[Temporary], grace_seconds: float) -> int:
    """Deletes the evicted groups among ``trash`` moved aside more than ``grace_seconds`` ago."""
    deleted = 0
    for tmp in trash:
        if tmp.why == EVICTED and tmp.age is not None and tmp.age >= grace_seconds:
            remove_moved_aside(tmp.path)
            deleted += 1
    return deleted
