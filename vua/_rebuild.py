"""Rebuilding an index from the fragment tree, which is the truth the index caches.

A rebuild writes a new generation beside the live one and swaps CURRENT; every process
notices the swap at its next operation (one stat) and reopens (see ``_index``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import lmdb

from vua._generations import (
    GEN_PREFIX,
    Handles,
    acquire_environment,
    adjust_total,
    check_mapped_size,
    read_current,
    rebuild_lock,
    record_names,
    release_environment,
    remove_records,
    write_current,
)
from vua._kv_layout import Layout
from vua._record import GroupRecord
from vua._stored import log_unusable
from vua._tree import Check, GroupState, ScanProgress, log_unlisted, walk_tree
from vua.errors import FragmentError, StorageError

logger = logging.getLogger(__name__)


class ScanEntry(NamedTuple):
    """A valid group found in the tree."""

    key: bytes
    record: GroupRecord
    layout: Layout
    namespace: str


# The groups one walk settles: a later walk need not read them again. Not one found without
# its fragment (a writer may be about to publish it), nor one unreadable for now.
_SETTLED = (GroupState.VALID, GroupState.DAMAGED)


def scan_tree(
    root: str,
    *,
    workers: int = 8,
    progress: Callable[[ScanProgress], None] | None = None,
    state: ScanProgress | None = None,
    settled: set[bytes] | None = None,
    listed: set[bytes] | None = None,
) -> Iterator[ScanEntry]:
    """Yields (key, record, layout, namespace) for every valid fragment under ``root`` (a walk at HEADER).

    Damaged fragments are logged, counted in ``state.damaged`` and skipped, as are (logged,
    not counted) groups removed while the scan runs and files that cannot be read for now.
    ``settled``: groups to pass over without reading their files; every group this scan
    finds valid or damaged is added. ``listed``: every group directory the listing showed is
    added (read or not).
    """
    if not os.path.isdir(root):
        return  # a store nothing was written to yet
    settled = settled if settled is not None else set()
    walk = walk_tree(root, Check.HEADER, passed_over=settled, workers=workers, progress=progress, state=state)
    for fanout in walk:
        if fanout.unlisted is not None:
            log_unlisted(fanout.path, fanout.unlisted)
        for group in fanout.groups:
            key = bytes.fromhex(group.key_hex)
            if listed is not None:
                listed.add(key)
            if group.state in _SETTLED:
                settled.add(key)
            if group.stored is not None:
                yield ScanEntry(key, *group.stored)
            elif isinstance(group.error, FragmentError):
                log_unusable(group.key_hex, group.error)


@dataclass
class RebuildSummary:
    """What a rebuild found."""

    groups: int
    damaged: int
    bytes: int
    seconds: float


def rebuild(
    root: str,
    index_path: str,
    *,
    only_if_missing: bool = False,
    replacing: str | None = None,
    workers: int = 8,
    progress: Callable[[ScanProgress], None] | None = None,
    file_mode: int | None = None,
) -> RebuildSummary | None:
    """Builds a fresh index generation from the fragment tree and swaps it in atomically.

    Safe while other processes read and write: they switch to the new generation at their
    next operation, and a final pass over the tree picks up groups published meanwhile.
    Groups that still slip past are found by the lookup's tree probe, so none is lost.

    Args:
        only_if_missing: do nothing when CURRENT already names a generation.
        replacing: the damaged generation's name ("" for a damaged CURRENT): do nothing
            when CURRENT has moved on meanwhile (another process rebuilt it first).
        file_mode: permission bits for the index's files (the umask decides when None).

    Returns:
        A summary; None when there was nothing to do.
    """
    started = time.perf_counter()
    with rebuild_lock(index_path, file_mode):
        live = read_current(index_path)
        if only_if_missing and live is not None:
            return None
        if replacing is not None and live is not None and live != replacing:
            return None
        generation = f"{GEN_PREFIX}{time.time_ns()}-{os.getpid()}"
        state = ScanProgress()
        previous = _live_generation(index_path, live, file_mode)
        try:
            try:
                settled: set[bytes] = set()
                entries = scan_tree(root, workers=workers, progress=progress, state=state, settled=settled)
                seen, nbytes = _fill(index_path, generation, entries, previous=previous, file_mode=file_mode)
                write_current(index_path, generation, file_mode)
            except BaseException:
                shutil.rmtree(os.path.join(index_path, generation), ignore_errors=True)  # never went live
                raise
            # Groups published while the tree was being walked: a listing of the directories,
            # reading only the files of groups the first pass did not settle.
            listed: set[bytes] = set()
            late = list(scan_tree(root, workers=workers, settled=settled, listed=listed))
            late_seen, late_bytes = _fill(index_path, generation, late, previous=previous, file_mode=file_mode)
            # And groups removed since the first pass read them: a gc evicting while this
            # rebuild ran dropped them from the generation live then, not from this one.
            gone = seen - listed
            seen -= gone
            nbytes -= _drop(index_path, generation, gone, file_mode=file_mode)
        finally:
            if previous is not None:
                release_environment(previous[0])
        seen |= late_seen
        for name in os.listdir(index_path):
            if name.startswith(GEN_PREFIX) and name != generation:
                # Other processes holding it open keep their mapping until they reopen.
                shutil.rmtree(os.path.join(index_path, name), ignore_errors=True)
        logger.info("rebuilt index %s from %s: %d groups", index_path, root, len(seen))
        return RebuildSummary(len(seen), state.damaged, nbytes + late_bytes, time.perf_counter() - started)


def _live_generation(index_path: str, live: str | None, file_mode: int | None) -> Handles | None:
    """The generation a rebuild replaces, when there is a readable one: it may know later uses."""
    if live is None:
        return None
    try:
        handles = acquire_environment(os.path.join(index_path, live), file_mode=file_mode)
    except StorageError:
        return None  # damaged: the tree's record of uses is what there is
    try:
        check_mapped_size(handles[0])  # this process may have had it open since before a truncation
    except StorageError:
        release_environment(handles[0])
        return None
    return handles


def _drop(index_path: str, generation: str, keys: set[bytes], *, file_mode: int | None = None) -> int:
    """Removes ``keys`` from ``generation``; returns the bytes their records counted."""
    if not keys:
        return 0
    env, groups, meta = acquire_environment(os.path.join(index_path, generation), file_mode=file_mode)
    try:
        with env.begin(write=True) as txn:
            _, freed = remove_records(txn, groups, meta, keys)
    except lmdb.Error as exc:
        raise StorageError(f"cannot write the index at {index_path}: {exc}") from exc
    finally:
        release_environment(env)
    return freed


def _fill(
    index_path: str,
    generation: str,
    entries: Iterable[ScanEntry],
    *,
    previous: Handles | None = None,
    file_mode: int | None = None,
) -> tuple[set[bytes], int]:
    """Writes entries straight into ``generation`` (not yet necessarily live), in batches.

    Each group keeps the later of its last use in the tree and in ``previous`` (the index
    being replaced), so a rebuild never resets the LRU order.

    Returns the keys written and their bytes.
    """
    env, groups, meta = acquire_environment(os.path.join(index_path, generation), file_mode=file_mode)
    seen: set[bytes] = set()
    total = [0]
    batch: list[ScanEntry] = []

    def keep_later_uses(previous: Handles) -> None:
        """Gives each entry of the batch the later of its two last uses; one read of ``previous``."""
        now = time.time_ns()  # a previous record dated later than now is a lie, not a later use
        try:
            with previous[0].begin(db=previous[1]) as old_txn:
                for i, (key, record, layout, namespace) in enumerate(batch):
                    raw = old_txn.get(key)
                    old = None if raw is None else GroupRecord.unpack(raw)
                    if old is not None and record.last_used < old.last_used <= now:
                        batch[i] = ScanEntry(key, record._replace(last_used=old.last_used), layout, namespace)
        except lmdb.Error:
            pass  # an unreadable old index knows nothing the tree does not

    def flush() -> None:
        if previous is not None:
            keep_later_uses(previous)
        while True:
            try:
                with env.begin(write=True) as txn:
                    added = 0
                    for key, record, layout, namespace in batch:
                        if txn.put(key, record.pack(), db=groups, overwrite=False):
                            added += record.nbytes
                        record_names(txn, meta, [layout], {record.namespace_id: namespace})
                    adjust_total(txn, meta, added)
                total[0] += added
                break
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
        batch.clear()

    try:
        for entry in entries:
            seen.add(entry.key)
            batch.append(entry)
            if len(batch) >= 10_000:
                flush()
        flush()
    except lmdb.Error as exc:
        raise StorageError(f"cannot write the index at {index_path}: {exc}") from exc
    finally:
        release_environment(env)
    return seen, total[0]
