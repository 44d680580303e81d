"""The LMDB index: which groups are stored, answered in one read transaction.

The fragment tree is the truth and this index a cache of it. It lives in its own
directory (by default ROOT/index.lmdb, configurable so it can stay on local disk while
the fragments sit on a network file system):

    INDEX/
      CURRENT            names the live generation, replaced atomically by a rebuild
      gen-<id>/          an LMDB environment (data.mdb, lock.mdb)
      rebuild.lock       taken by whoever rebuilds, so two processes never both do

A rebuild writes a new generation beside the live one and swaps CURRENT; every process
notices the swap at its next operation (one stat) and reopens. The environment is also
reopened after a fork, since an LMDB handle must not cross one.

Since the index is only a cache, damage to it is never fatal: a CURRENT that does not name
a generation, a data file shorter than its own meta page says (LMDB would map past its
end and die of SIGBUS), or an environment LMDB calls corrupt is logged and rebuilt from
the tree, and the operation goes on with the fresh generation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import lmdb

from vua._generations import (
    _CORRUPTION,
    CURRENT_FILE,
    Handles,
    acquire_environment,
    adjust_total,
    check_mapped_size,
    layout_key,
    read_current,
    read_namespaces,
    read_total,
    record_names,
    release_environment,
    remove_records,
)
from vua._kv_layout import Layout
from vua._lmdb_pages import DamagedIndexError
from vua._rebuild import rebuild
from vua._record import RECORD_SIZE, GroupRecord, namespace_id
from vua.errors import FragmentError, StorageError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class Index:
    """A process-safe handle on a VUA index directory.

    Args:
        path: the index directory; created, and filled from ``root``'s fragment tree,
            when it does not exist yet.
        root: the fragment root the index describes.
    """

    def __init__(self, path: str, root: str, *, file_mode: int | None = None):
        self.path = path
        self.root = root
        self.file_mode = file_mode
        self._env: lmdb.Environment | None = None
        self._pid = -1
        self._current_ino = -1
        self._layouts: dict[int, Layout] = {}
        self._retired: list[lmdb.Environment] = []
        self._handles: Handles | None = None
        self._open_lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------

    def _current_path(self) -> str:
        return os.path.join(self.path, CURRENT_FILE)

    def env(self) -> Handles:
        """Returns the live environment and its databases, (re)opening it when needed.

        A missing index is built from the tree; a damaged one is rebuilt, with a warning.

        Raises:
            StorageError: the index cannot be created or opened even after a rebuild.
        """
        for _ in range(3):
            try:
                ino = os.stat(self._current_path()).st_ino
            except FileNotFoundError:
                rebuild(self.root, self.path, only_if_missing=True, file_mode=self.file_mode)
                continue
            # One tuple: a concurrent reopen never mixes generations. (No local copy: after a
            # fork the parent's handles must be unreferenced before the reopen, see _open.)
            if self._handles is not None and self._pid == os.getpid() and ino == self._current_ino:
                return self._handles
            generation = read_current(self.path)
            if generation is None:
                logger.warning("index %s: CURRENT names no generation; rebuilding it from the fragment tree", self.path)
                rebuild(self.root, self.path, replacing="", file_mode=self.file_mode)
                continue
            try:
                return self._open(ino, generation)
            except DamagedIndexError as exc:
                self.recover(generation, exc)
        raise StorageError(
            f"the index at {self.path} could not be opened even after rebuilding it; "
            "check the directory's permissions and free space, or move it with VUAConfig(index_path=...)"
        )

    def recover(self, generation: str | None, cause: BaseException) -> None:
        """Replaces a damaged generation by one rebuilt from the tree (once, whoever sees it first)."""
        generation = generation or read_current(self.path) or ""
        logger.warning("index %s is damaged (%s); rebuilding it from the fragment tree", self.path, cause)
        rebuild(self.root, self.path, replacing=generation, file_mode=self.file_mode)

    def _open(self, ino: int, generation: str) -> Handles:
        with self._open_lock:
            if self._handles is not None and self._pid == os.getpid() and ino == self._current_ino:
                return self._handles  # another thread reopened it meanwhile
            if self._pid != os.getpid():
                # The parent's handles are not ours to close; dropping them lets LMDB open the
                # same environment afresh in this process.
                self._retired = []
                self._env = self._handles = None
            handles = acquire_environment(os.path.join(self.path, generation), file_mode=self.file_mode)
            if self._env is not None:
                # Another thread may be inside a transaction on the old generation: keep its
                # handle open until this Index closes (one handle per rebuild seen).
                self._retired.append(self._env)
            self._handles = handles
            env = self._env = handles[0]
            self._pid = os.getpid()
            self._current_ino = ino
            # Slots of readers that died without closing would otherwise pin old pages forever.
            env.reader_check()
            return handles

    def close(self) -> None:
        with self._open_lock:
            if self._pid == os.getpid():
                for env in [*self._retired, *([self._env] if self._env is not None else [])]:
                    release_environment(env)
            self._retired = []
            self._env = self._handles = None

    # -- reads --------------------------------------------------------------------------

    def lookup_prefix(self, keys: Iterable[bytes]) -> list[bytes]:
        """Packed records of the leading run of ``keys`` that are indexed, in one read transaction.

        Records stay packed: comparing their leading bytes is what the hot path needs, and
        decoding 512 of them would cost more than the lookups.
        """
        keys = list(keys)

        def read(txn: lmdb.Transaction, groups: lmdb._Database, meta: lmdb._Database) -> list[bytes]:
            found: list[bytes] = []
            get = txn.get
            for key in keys:
                raw = get(key, db=groups)
                if raw is None:
                    break
                if len(raw) != RECORD_SIZE:
                    logger.warning("index entry %s is not a record; ignoring it", key.hex())
                    break
                found.append(bytes(raw))
            return found

        return self._read(read)

    def records(self, keys: Iterable[bytes]) -> list[GroupRecord | None]:
        """Each key's record; None where the key is absent or its entry is garbage."""
        keys = list(keys)

        def read(txn: lmdb.Transaction, groups: lmdb._Database, meta: lmdb._Database) -> list[GroupRecord | None]:
            return [None if (raw := txn.get(key, db=groups)) is None else GroupRecord.unpack(raw) for key in keys]

        return self._read(read)

    def layout(self, layout_id: int) -> Layout | None:
        # A layout id names its JSON for good, so a process may keep what it has read.
        known = self._layouts.get(layout_id)
        if known is not None:
            return known
        raw = self._read(lambda txn, groups, meta: txn.get(layout_key(layout_id), db=meta))
        if raw is None:
            return None
        try:
            layout = Layout.from_json(bytes(raw).decode())
        except (FragmentError, UnicodeDecodeError):
            return None
        if layout.id != layout_id:
            return None  # garbage under this key; the caller reads the layout from a fragment
        self._layouts[layout_id] = layout
        return layout

    def total_bytes(self) -> int:
        return self._read(lambda txn, groups, meta: read_total(txn, meta))

    def items(self) -> Iterator[tuple[bytes, GroupRecord | None]]:
        """Every (key, record) pair; record is None for garbage entries."""
        entries = self._read(
            lambda txn, groups, meta: [(bytes(key), GroupRecord.unpack(raw)) for key, raw in txn.cursor(db=groups)]
        )
        yield from entries

    def namespaces(self) -> dict[int, str]:
        """Every namespace recorded, by its 64-bit id (the id index records carry)."""

        return self._read(lambda txn, groups, meta: read_namespaces(txn, meta))

    # -- writes -------------------------------------------------------------------------

    def add(
        self,
        entries: Iterable[tuple[bytes, GroupRecord]],
        layouts: Iterable[Layout] = (),
        namespaces: Iterable[str] = (),
        touch: Iterable[bytes] = (),
    ) -> None:
        """Records groups, and marks the ``touch`` groups used now, in one write transaction."""
        entries = list(entries)
        layouts = list(layouts)
        namespaces = list(namespaces)
        touch = list(touch)
        now = time.time_ns()

        def apply(txn: lmdb.Transaction, groups: lmdb._Database, meta: lmdb._Database) -> None:
            added = 0
            for key, record in entries:
                old = txn.get(key, db=groups)
                if old is None or GroupRecord.unpack(old) is None:
                    added += record.nbytes
                txn.put(key, record.pack(), db=groups)
            _touch_in(txn, groups, {key: now for key in touch})
            record_names(txn, meta, layouts, {namespace_id(ns): ns for ns in namespaces})
            adjust_total(txn, meta, added)

        self._write(apply)

    def remove(self, keys: Iterable[bytes]) -> int:
        """Forgets groups; returns how many were present."""
        keys = list(keys)
        removed = [0]

        def apply(txn: lmdb.Transaction, groups: lmdb._Database, meta: lmdb._Database) -> None:
            removed[0], _ = remove_records(txn, groups, meta, keys)

        self._write(apply)
        return removed[0]

    def touch(self, uses: dict[bytes, int]) -> None:
        """Records when groups were last used (key -> time.time_ns()), for LRU eviction."""
        self._write(lambda txn, groups, meta: _touch_in(txn, groups, uses))

    def _read(self, read: Callable[[lmdb.Transaction, lmdb._Database, lmdb._Database], _T]) -> _T:
        """Runs ``read`` in a read transaction (see :meth:`_transact`)."""
        return self._transact(read, write=False)

    def _write(self, apply: Callable[[lmdb.Transaction, lmdb._Database, lmdb._Database], None]) -> None:
        """Runs ``apply`` in a write transaction (see :meth:`_transact`)."""
        self._transact(apply, write=True)

    def _transact(self, body: Callable[[lmdb.Transaction, lmdb._Database, lmdb._Database], _T], *, write: bool) -> _T:
        """Runs ``body`` in one transaction, riding out a full map, another process's map growth and damage.

        A write that fills the map doubles it and runs again; a map another process grew is
        adopted; an environment LMDB calls corrupt is rebuilt from the tree first.
        """
        what = "write" if write else "read"
        for _ in range(64 if write else 3):  # a write may double the map many times
            env, groups, meta = self.env()
            try:
                check_mapped_size(env)
                with env.begin(write=write) as txn:
                    return body(txn, groups, meta)
            except lmdb.MapFullError:
                new_size = env.info()["map_size"] * 2
                logger.info("index %s is full; growing its map to %d bytes", self.path, new_size)
                env.set_mapsize(new_size)
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # another process grew the map: adopt its size, then retry
            except (*_CORRUPTION, DamagedIndexError) as exc:
                self.recover(None, exc)
            except lmdb.Error as exc:
                raise StorageError(f"index {self.path} refused a {what}: {exc}; {self._advice()}") from exc
        raise StorageError(f"index {self.path} kept failing a {what}; run `vua rebuild-index` on it")

    def _advice(self) -> str:
        """What to do about a write LMDB refused: a full file system says so as ENOSPC or, from a commit, as EIO."""
        try:
            info = os.statvfs(self.path)
            free = info.f_bavail * info.f_frsize
        except OSError:
            free = -1
        where = "VUAConfig(index_path=...) or --index-path on the command line"
        if 0 <= free < 16 << 20:
            return (
                f"the index's file system has {free} bytes free: free space there, or move the index "
                f"to another disk with {where} (the fragments are not affected; the index is rebuilt from them)"
            )
        return f"check the index directory's disk and permissions, or move the index with {where}"


def _touch_in(txn: lmdb.Transaction, groups: lmdb._Database, uses: dict[bytes, int]) -> None:
    now = time.time_ns()
    for key, used_ns in uses.items():
        raw = txn.get(key, db=groups)
        record = None if raw is None else GroupRecord.unpack(raw)
        # Uses only move forward, but a record dated after now is a lie (a copied or damaged
        # index) that would keep its group fresher than any other for ever: a use replaces it.
        if record is not None and (record.last_used < used_ns or record.last_used > now):
            txn.put(key, record._replace(last_used=used_ns).pack(), db=groups)
