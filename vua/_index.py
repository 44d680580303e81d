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

import fcntl
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import lmdb

from vua import _layout
from vua._fragment import Fragment, Layout, NotRegularFileError, fsync_dir, open_regular_file
from vua.errors import FragmentError, StorageError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

CURRENT_FILE = "CURRENT"
LOCK_FILE = "rebuild.lock"
_GEN_PREFIX = "gen-"
_GEN_NAME = re.compile(r"gen-[0-9]{1,24}-[0-9]{1,12}")
_INITIAL_MAP_SIZE = 1 << 30  # address space only; grown by doubling on MapFullError
_MAX_READERS = 1024
_LOCK_FILE_BYTES = 80 << 10  # LMDB's reader table for _MAX_READERS slots (64 bytes each) and its header

# LMDB's errors that mean the environment's bytes are wrong; the cure is a rebuild.
_CORRUPTION = (
    lmdb.CorruptedError,
    lmdb.InvalidError,
    lmdb.PageNotFoundError,
    lmdb.VersionMismatchError,
    lmdb.PageFullError,  # a page whose free-space counters are garbage
    lmdb.BadTxnError,
    lmdb.CursorFullError,  # a cycle of garbage page numbers
)


class DamagedIndexError(StorageError):
    """The index's files are damaged (a rebuild from the fragment tree replaces them)."""


_RECORD = struct.Struct("<QQQIQ")
RECORD_HEAD = 16  # namespace id and layout id: equal for every group of a usable prefix
_TOTAL_BYTES = b"total_bytes"


class GroupRecord(NamedTuple):
    """What a lookup needs about one stored group, without opening its fragment."""

    namespace_id: int
    layout_id: int
    nbytes: int  # size of the fragment file
    group_index: int
    last_used: int  # time.time_ns() of the last put or hit, for LRU eviction

    def pack(self) -> bytes:
        return _RECORD.pack(*self)

    @classmethod
    def unpack(cls, raw: bytes) -> GroupRecord | None:
        """Decodes a record; None when the bytes are not one (garbage in the index)."""
        if len(raw) != _RECORD.size:
            return None
        return cls(*_RECORD.unpack(raw))


def namespace_id(namespace: str) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(namespace.encode("utf-8"))


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
        self._handles: tuple[lmdb.Environment, lmdb._Database, lmdb._Database] | None = None
        self._open_lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------

    def _current_path(self) -> str:
        return os.path.join(self.path, CURRENT_FILE)

    def env(self) -> tuple[lmdb.Environment, lmdb._Database, lmdb._Database]:
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
            if self._env is not None and self._pid == os.getpid() and ino == self._current_ino:
                return self._handles  # one tuple: a concurrent reopen never mixes generations
            generation = read_current(self.path)
            if generation is None:
                logger.warning("index %s: CURRENT names no generation; rebuilding it from the fragment tree", self.path)
                rebuild(self.root, self.path, replacing="", file_mode=self.file_mode)
                continue
            try:
                self._open(ino, generation)
            except DamagedIndexError as exc:
                self.recover(generation, exc)
                continue
            return self._handles
        raise StorageError(
            f"the index at {self.path} could not be opened even after rebuilding it; "
            "check the directory's permissions and free space, or move it with VUAConfig(index_path=...)"
        )

    def recover(self, generation: str | None, cause: BaseException) -> None:
        """Replaces a damaged generation by one rebuilt from the tree (once, whoever sees it first)."""
        generation = generation or read_current(self.path) or ""
        logger.warning("index %s is damaged (%s); rebuilding it from the fragment tree", self.path, cause)
        rebuild(self.root, self.path, replacing=generation, file_mode=self.file_mode)

    def _open(self, ino: int, generation: str) -> None:
        with self._open_lock:
            if self._env is not None and self._pid == os.getpid() and ino == self._current_ino:
                return  # another thread reopened it meanwhile
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

    def close(self) -> None:
        with self._open_lock:
            if self._pid == os.getpid():
                for env in [*self._retired, *([self._env] if self._env is not None else [])]:
                    release_environment(env)
            self._retired = []
            self._env = None

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
                if len(raw) != _RECORD.size:
                    logger.warning("index entry %s is not a record; ignoring it", key.hex())
                    break
                found.append(raw)
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
        raw = self._read(lambda txn, groups, meta: txn.get(b"layout:" + struct.pack("<Q", layout_id), db=meta))
        if raw is None:
            return None
        try:
            layout = Layout.from_json(raw.decode())
        except (FragmentError, UnicodeDecodeError):
            return None
        if layout.id != layout_id:
            return None  # garbage under this key; the caller reads the layout from a fragment
        self._layouts[layout_id] = layout
        return layout

    def total_bytes(self) -> int:
        raw = self._read(lambda txn, groups, meta: txn.get(_TOTAL_BYTES, db=meta))
        return 0 if raw is None or len(raw) != 8 else struct.unpack("<Q", raw)[0]

    def items(self) -> Iterator[tuple[bytes, GroupRecord | None]]:
        """Every (key, record) pair; record is None for garbage entries."""
        entries = self._read(
            lambda txn, groups, meta: [(bytes(key), GroupRecord.unpack(raw)) for key, raw in txn.cursor(db=groups)]
        )
        yield from entries

    def namespaces(self) -> dict[int, str]:
        """Every namespace recorded, by its 64-bit id (the id index records carry)."""

        def read(txn: lmdb.Transaction, groups: lmdb._Database, meta: lmdb._Database) -> dict[int, str]:
            return {
                struct.unpack("<Q", key[3:])[0]: bytes(value).decode("utf-8", "replace")
                for key, value in txn.cursor(db=meta)
                if bytes(key).startswith(b"ns:") and len(key) == 11
            }

        return self._read(read)

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
            for layout in layouts:
                txn.put(b"layout:" + struct.pack("<Q", layout.id), layout.json.encode(), db=meta)
            for ns in namespaces:
                txn.put(b"ns:" + struct.pack("<Q", namespace_id(ns)), ns.encode(), db=meta)
            _adjust_total(txn, meta, added)

        self._write(apply)

    def remove(self, keys: Iterable[bytes]) -> int:
        """Forgets groups; returns how many were present."""
        keys = list(keys)
        removed = [0]

        def apply(txn: lmdb.Transaction, groups: lmdb._Database, meta: lmdb._Database) -> None:
            freed = 0
            removed[0] = 0
            for key in keys:
                raw = txn.pop(key, db=groups)
                if raw is not None:
                    removed[0] += 1
                    record = GroupRecord.unpack(raw)
                    freed += record.nbytes if record else 0
            _adjust_total(txn, meta, -freed)

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
                with env.begin(write=write) as txn:
                    return body(txn, groups, meta)
            except lmdb.MapFullError:
                new_size = env.info()["map_size"] * 2
                logger.info("index %s is full; growing its map to %d bytes", self.path, new_size)
                env.set_mapsize(new_size)
            except lmdb.MapResizedError:
                env.set_mapsize(0)  # another process grew the map: adopt its size, then retry
            except _CORRUPTION as exc:
                self.recover(None, exc)
            except lmdb.Error as exc:
                raise StorageError(f"index {self.path} refused a {what}: {exc}") from exc
        raise StorageError(f"index {self.path} kept failing a {what}; run `vua rebuild-index` on it")


def _touch_in(txn: lmdb.Transaction, groups: lmdb._Database, uses: dict[bytes, int]) -> None:
    for key, used_ns in uses.items():
        raw = txn.get(key, db=groups)
        record = None if raw is None else GroupRecord.unpack(raw)
        if record is not None and record.last_used < used_ns:
            txn.put(key, record._replace(last_used=used_ns).pack(), db=groups)


def _adjust_total(txn: lmdb.Transaction, meta: lmdb._Database, delta: int) -> None:
    raw = txn.get(_TOTAL_BYTES, db=meta)
    total = 0 if raw is None else struct.unpack("<Q", raw)[0]
    txn.put(_TOTAL_BYTES, struct.pack("<Q", max(0, total + delta)), db=meta)


# LMDB allows one handle per environment per process, so every Index of this process on
# the same generation shares it. Reset in a forked child.
_open_envs: dict[str, list] = {}  # path -> [(environment, groups db, meta db), users]
_open_envs_lock = threading.Lock()
_open_envs_pid = os.getpid()


def acquire_environment(
    path: str, *, file_mode: int | None = None
) -> tuple[lmdb.Environment, lmdb._Database, lmdb._Database]:
    """This process's handle on the LMDB generation at ``path`` and its two databases.

    The databases are opened once, with the environment: ``open_db`` takes the write lock,
    and doing that while another thread of this process writes can deadlock on the GIL.

    Raises:
        DamagedIndexError: the generation's files are damaged.
        StorageError: LMDB refused it for another reason.
    """
    global _open_envs_pid
    path = os.path.realpath(path)
    with _open_envs_lock:
        if _open_envs_pid != os.getpid():
            _open_envs.clear()  # the parent's handles must not be used (nor closed) here
            _open_envs_pid = os.getpid()
        entry = _open_envs.get(path)
        if entry is None:
            env = open_environment(path, file_mode=file_mode)
            try:
                entry = _open_envs[path] = [(env, env.open_db(b"groups"), env.open_db(b"meta")), 0]
            except lmdb.Error as exc:
                env.close()
                error = DamagedIndexError if isinstance(exc, _CORRUPTION) else StorageError
                raise error(f"index generation {path}: {exc}") from exc
        entry[1] += 1
        return entry[0]


def release_environment(env: lmdb.Environment) -> None:
    """Drops one user of ``env``; the last one closes it."""
    with _open_envs_lock:
        for path, entry in list(_open_envs.items()):
            if entry[0][0] is env:
                entry[1] -= 1
                if entry[1] == 0:
                    del _open_envs[path]
                    env.close()
                return


def open_environment(path: str, *, file_mode: int | None = None) -> lmdb.Environment:
    """Opens (creating) one LMDB generation with VUA's settings; use acquire_environment.

    Raises:
        DamagedIndexError: the data file is damaged (checked before LMDB maps it).
        StorageError: LMDB refused for another reason (permissions, space, NFS).
    """
    check_data_file(os.path.join(path, "data.mdb"))
    try:
        os.makedirs(path, exist_ok=True)
        _preallocate_lock_file(os.path.join(path, "lock.mdb"), file_mode)
        return lmdb.open(
            path,
            map_size=_INITIAL_MAP_SIZE,
            max_dbs=4,
            max_readers=_MAX_READERS,
            # The index is rebuildable from the fragments, so a commit need not wait for the
            # meta page; data pages are still synced, which keeps the file consistent.
            metasync=False,
            readahead=False,
            mode=0o666 if file_mode is None else file_mode,  # the umask applies, as for fragments
        )
    except _CORRUPTION as exc:
        raise DamagedIndexError(f"index generation {path}: {exc}") from exc
    except (lmdb.Error, OSError) as exc:
        raise StorageError(
            f"cannot open the index at {path}: {exc}. Check that the directory is writable, has free space "
            "and is on a local file system (LMDB does not work on NFS); set VUAConfig(index_path=...) to move it."
        ) from exc


def check_data_file(path: str) -> None:
    """Refuses an LMDB data file whose size disagrees with its own meta pages.

    LMDB maps the file and trusts its meta page's last page number; a truncated file
    would be read past its end, and a page fault there is SIGBUS, not an error. Each meta
    page (pages 0 and 1) holds a magic number, the page size, the last page in use and a
    transaction id; LMDB uses the valid one with the higher id.

    Raises:
        DamagedIndexError: no valid meta page, or the file ends before the last page.
    """
    try:
        fd = open_regular_file(path)
    except FileNotFoundError:
        return  # a new generation: LMDB creates it
    except NotRegularFileError as exc:
        raise DamagedIndexError(f"index file {path}: {exc.strerror}") from None
    except OSError as exc:
        raise StorageError(f"cannot read the index file {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if info.st_size == 0:
            return  # created but never written (a crash at creation): LMDB initialises it
        head = os.pread(fd, 2 * _META_PAGE_MAX, 0)
    finally:
        os.close(fd)
    best = None  # (txn id, last page, page size)
    for offset in sorted({0, *_META_PAGE_SIZES}):
        if len(head) < offset + _META.size:
            continue
        magic, version, page_size, last_page, txn_id = _META.unpack_from(head, offset)
        if magic != _LMDB_MAGIC or version != 1 or page_size not in _META_PAGE_SIZES:
            continue
        if offset not in (0, page_size):
            continue  # a meta page lies at page 0 or page 1 of the file's own page size
        if best is None or txn_id > best[0]:
            best = (txn_id, last_page, page_size)
    if best is None:
        raise DamagedIndexError(f"index file {path} has no valid LMDB meta page")
    _, last_page, page_size = best
    if (last_page + 1) * page_size > info.st_size:
        raise DamagedIndexError(
            f"index file {path} is {info.st_size} bytes but its meta page says {(last_page + 1) * page_size}"
        )


# An LMDB meta page (64-bit build): a 16-byte page header, then magic and version (u32 each),
# address and map size (8 each), two 48-byte database records (the first one's leading u32
# holds the page size), the last page number and the transaction id (8 each).
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<16xII16xI92xQQ")
_META_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
_META_PAGE_MAX = max(_META_PAGE_SIZES)


def _preallocate_lock_file(path: str, file_mode: int | None) -> None:
    """Creates LMDB's lock file with its blocks allocated, when it does not exist yet.

    LMDB sizes the file with ftruncate and writes its reader table through a shared
    mapping: on a full file system the first write to a page without a block is a SIGBUS.
    Allocated here, a full file system is an ENOSPC error instead. An existing lock file is
    left alone: other processes have it mapped, and its size sets their reader count.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return
    try:
        if file_mode is not None:
            os.fchmod(fd, file_mode)
        os.posix_fallocate(fd, 0, _LOCK_FILE_BYTES)
    except OSError:
        os.close(fd)
        os.unlink(path)  # an unallocated lock file would bring the SIGBUS back
        raise
    os.close(fd)


def read_current(index_path: str) -> str | None:
    """The live generation's directory name, as CURRENT holds it; None when CURRENT is missing or damaged.

    CURRENT's content names a directory inside the index, so it is checked against the
    only form a rebuild writes (never a path: ``../../x`` would open an environment outside
    the store), and read without blocking from a regular file only.
    """
    try:
        fd = open_regular_file(os.path.join(index_path, CURRENT_FILE))
    except OSError:
        return None
    try:
        raw = os.read(fd, 256)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not _GEN_NAME.fullmatch(name) or not os.path.isdir(os.path.join(index_path, name)):
        return None
    return name


# -- rebuilding from the fragment tree ----------------------------------------------------


@contextmanager
def _rebuild_lock(index_path: str, file_mode: int | None = None) -> Iterator[None]:
    os.makedirs(index_path, exist_ok=True)
    fd = os.open(os.path.join(index_path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        if file_mode is not None and os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, file_mode)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_group_record(root: str, key_hex: str) -> tuple[GroupRecord, Layout, str] | None:
    """Reads and validates one fragment's header; None (with a warning) when it is damaged."""
    path = _layout.fragment_path(root, key_hex)
    try:
        with Fragment(path) as fragment:
            meta = fragment.metadata
            namespace = meta.get("namespace", "")
            split_factor = int(meta.get("split_factor", "0"))
            layout = fragment.validate(key_hex=key_hex, namespace=namespace, split_factor=split_factor, layout=None)
            record = GroupRecord(
                namespace_id(namespace),
                layout.id,
                fragment.file_size,
                int(meta.get("group_index", "0")),
                tree_last_use(root, key_hex),
            )
            return record, layout, namespace
    except (FragmentError, ValueError) as exc:
        logger.warning("skipping damaged fragment %s: %s", key_hex, exc)
        return None


def tree_last_use(root: str, key_hex: str) -> int:
    """A group's last use as the tree records it: its directory's mtime (ns).

    Publishing sets it; hits refresh it in batches (see ``_fragment.mark_used``), so a
    rebuilt index, or another node, sees the same LRU order as this node's index.
    """
    try:
        return os.stat(_layout.group_dir(root, key_hex)).st_mtime_ns
    except OSError:
        return time.time_ns()


ScanEntry = tuple[bytes, GroupRecord, Layout, str]


@dataclass
class ScanProgress:
    """Where a walk of the fragment tree stands; handed to progress callbacks."""

    fanouts_done: int = 0
    fanouts_total: int = 0
    groups: int = 0
    damaged: int = 0


def scan_tree(
    root: str,
    *,
    workers: int = 8,
    progress: Callable[[ScanProgress], None] | None = None,
    state: ScanProgress | None = None,
) -> Iterator[ScanEntry]:
    """Yields (key, record, layout, namespace) for every valid fragment under ``root``.

    Fan-out directories are read in parallel; damaged fragments are logged, counted in
    ``state.damaged`` and skipped.
    """
    state = state if state is not None else ScanProgress()

    def scan(fanout: str) -> tuple[list[ScanEntry], int]:
        found, damaged = [], 0
        for key_hex, _ in _layout.iter_groups(fanout):
            result = read_group_record(root, key_hex)
            if result is None:
                damaged += 1
            else:
                found.append((bytes.fromhex(key_hex), *result))
        return found, damaged

    fanouts = list(_layout.iter_fanout_dirs(root)) if os.path.isdir(root) else []
    state.fanouts_total = len(fanouts)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for found, damaged in pool.map(scan, fanouts):
            state.fanouts_done += 1
            state.groups += len(found)
            state.damaged += damaged
            if progress is not None:
                progress(state)
            yield from found


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
    with _rebuild_lock(index_path, file_mode):
        live = read_current(index_path)
        if only_if_missing and live is not None:
            return None
        if replacing is not None and live is not None and live != replacing:
            return None
        generation = f"{_GEN_PREFIX}{time.time_ns()}-{os.getpid()}"
        state = ScanProgress()
        previous = _live_generation(index_path, live, file_mode)
        try:
            try:
                entries = scan_tree(root, workers=workers, progress=progress, state=state)
                seen, nbytes = _fill(index_path, generation, entries, previous=previous, file_mode=file_mode)
                _write_current(index_path, generation, file_mode)
            except BaseException:
                shutil.rmtree(os.path.join(index_path, generation), ignore_errors=True)  # never went live
                raise
            # Groups published while the tree was being walked; cheap, since most are known.
            late = [entry for entry in scan_tree(root, workers=workers) if entry[0] not in seen]
            late_seen, late_bytes = _fill(index_path, generation, late, previous=previous, file_mode=file_mode)
        finally:
            if previous is not None:
                release_environment(previous[0])
        seen |= late_seen
        for name in os.listdir(index_path):
            if name.startswith(_GEN_PREFIX) and name != generation:
                # Other processes holding it open keep their mapping until they reopen.
                shutil.rmtree(os.path.join(index_path, name), ignore_errors=True)
        logger.info("rebuilt index %s from %s: %d groups", index_path, root, len(seen))
        return RebuildSummary(len(seen), state.damaged, nbytes + late_bytes, time.perf_counter() - started)


def _write_current(index_path: str, generation: str, file_mode: int | None) -> None:
    """Points CURRENT at ``generation`` atomically (and durably)."""
    current = os.path.join(index_path, CURRENT_FILE)
    if os.path.isdir(current) and not os.path.islink(current):
        shutil.rmtree(current)  # damage in CURRENT's place; a rename cannot replace a directory
    tmp = current + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        if file_mode is not None:
            os.fchmod(f.fileno(), file_mode)
        f.write(generation + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, current)
    fsync_dir(index_path)


def _live_generation(
    index_path: str, live: str | None, file_mode: int | None
) -> tuple[lmdb.Environment, lmdb._Database, lmdb._Database] | None:
    """The generation a rebuild replaces, when there is a readable one: it may know later uses."""
    if live is None:
        return None
    try:
        return acquire_environment(os.path.join(index_path, live), file_mode=file_mode)
    except StorageError:
        return None  # damaged: the tree's record of uses is what there is


def _fill(
    index_path: str,
    generation: str,
    entries: Iterable[ScanEntry],
    *,
    previous: tuple[lmdb.Environment, lmdb._Database, lmdb._Database] | None = None,
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

    def keep_later_uses() -> None:
        """Gives each entry of the batch the later of its two last uses; one read of ``previous``."""
        try:
            with previous[0].begin(db=previous[1]) as old_txn:
                for i, (key, record, layout, namespace) in enumerate(batch):
                    raw = old_txn.get(key)
                    old = None if raw is None else GroupRecord.unpack(raw)
                    if old is not None and old.last_used > record.last_used:
                        batch[i] = (key, record._replace(last_used=old.last_used), layout, namespace)
        except lmdb.Error:
            pass  # an unreadable old index knows nothing the tree does not

    def flush() -> None:
        if previous is not None:
            keep_later_uses()
        while True:
            try:
                with env.begin(write=True) as txn:
                    added = 0
                    for key, record, layout, namespace in batch:
                        if txn.put(key, record.pack(), db=groups, overwrite=False):
                            added += record.nbytes
                        txn.put(b"layout:" + struct.pack("<Q", layout.id), layout.json.encode(), db=meta)
                        txn.put(b"ns:" + struct.pack("<Q", record.namespace_id), namespace.encode(), db=meta)
                    _adjust_total(txn, meta, added)
                total[0] += added
                break
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
        batch.clear()

    try:
        for entry in entries:
            seen.add(entry[0])
            batch.append(entry)
            if len(batch) >= 10_000:
                flush()
        flush()
    except lmdb.Error as exc:
        raise StorageError(f"cannot write the index at {index_path}: {exc}") from exc
    finally:
        release_environment(env)
    return seen, total[0]
