"""An index's generations on disk: LMDB environments, the CURRENT file naming the live one, and their checks.

    INDEX/
      CURRENT            names the live generation, replaced atomically by a rebuild
      gen-<id>/          an LMDB environment (data.mdb, lock.mdb)
      rebuild.lock       taken by whoever rebuilds, so two processes never both do

Everything here treats the files as possibly damaged: CURRENT must name a generation in
the one form a rebuild writes, and a data file must agree with its own meta pages before
LMDB maps it (LMDB would read past the end of a truncated file and die of SIGBUS).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import lmdb

from vua._files import fsync_dir, open_regular_file
from vua._kv_layout import Layout
from vua._lmdb_pages import DamagedIndexError, check_data_file
from vua._record import GroupRecord
from vua.errors import StorageError

CURRENT_FILE = "CURRENT"
LOCK_FILE = "rebuild.lock"
GEN_PREFIX = "gen-"
_GEN_NAME = re.compile(r"gen-[0-9]{1,24}-[0-9]{1,12}")
_INITIAL_MAP_SIZE = 1 << 30  # address space only; grown by doubling on MapFullError
_MAX_READERS = 1024
_LOCK_FILE_BYTES = 80 << 10  # LMDB's reader table for _MAX_READERS slots (64 bytes each) and its header
_TOTAL_BYTES = b"total_bytes"

Handles = tuple[lmdb.Environment, lmdb._Database, lmdb._Database]  # an environment, its groups and meta databases

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


# The meta database's keys: the JSON of every layout and the name of every namespace that
# index records refer to by id, and the total size of the groups recorded.


def layout_key(layout_id: int) -> bytes:
    return b"layout:" + struct.pack("<Q", layout_id)


def namespace_key(ns_id: int) -> bytes:
    return b"ns:" + struct.pack("<Q", ns_id)


def record_names(
    txn: lmdb.Transaction, meta: lmdb._Database, layouts: list[Layout], namespaces: dict[int, str]
) -> None:
    """Records the JSON of ``layouts`` and the names of ``namespaces`` (id -> name) in ``txn``."""
    for layout in layouts:
        txn.put(layout_key(layout.id), layout.json.encode(), db=meta)
    for ns_id, name in namespaces.items():
        txn.put(namespace_key(ns_id), name.encode(), db=meta)


def adjust_total(txn: lmdb.Transaction, meta: lmdb._Database, delta: int) -> None:
    total = max(0, read_total(txn, meta) + delta)  # a garbage entry counts as 0 and is overwritten
    txn.put(_TOTAL_BYTES, struct.pack("<Q", min(total, 2**64 - 1)), db=meta)


def remove_records(
    txn: lmdb.Transaction, groups: lmdb._Database, meta: lmdb._Database, keys: Iterable[bytes]
) -> tuple[int, int]:
    """Removes the records of ``keys`` in ``txn``, keeping the total in step: (how many were there, their bytes)."""
    present = freed = 0
    for key in keys:
        raw = txn.pop(key, db=groups)
        if raw is not None:
            present += 1
            record = GroupRecord.unpack(raw)
            freed += record.nbytes if record else 0
    adjust_total(txn, meta, -freed)
    return present, freed


def read_namespaces(txn: lmdb.Transaction, meta: lmdb._Database) -> dict[int, str]:
    """Every namespace recorded, by its 64-bit id."""
    prefix = namespace_key(0)[:3]
    return {
        struct.unpack("<Q", bytes(key)[3:])[0]: bytes(value).decode("utf-8", "replace")
        for key, value in txn.cursor(db=meta)
        if bytes(key).startswith(prefix) and len(key) == len(prefix) + 8
    }


def read_total(txn: lmdb.Transaction, meta: lmdb._Database) -> int:
    raw = txn.get(_TOTAL_BYTES, db=meta)
    return 0 if raw is None or len(raw) != 8 else struct.unpack("<Q", raw)[0]


# LMDB allows one handle per environment per process, so every Index of this process on
# the same generation shares it. Reset in a forked child.
_open_envs: dict[str, list] = {}  # path -> [(environment, groups db, meta db), users, page size]
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
                handles = (env, env.open_db(b"groups"), env.open_db(b"meta"))
                entry = _open_envs[path] = [handles, 0, env.stat()["psize"]]
            except lmdb.Error as exc:
                env.close()
                error = DamagedIndexError if isinstance(exc, _CORRUPTION) else StorageError
                raise error(f"index generation {path}: {exc}") from exc
        entry[1] += 1
        return entry[0]


def check_mapped_size(env: lmdb.Environment) -> None:
    """Refuses an environment whose data file was cut short after it was opened (truncated in place).

    LMDB reads pages through its map, and a page past the file's end is SIGBUS, which no
    handler can turn into an error. Run before each transaction: one stat, and the last
    page number from the meta page (inside the file, checked first). What stays possible
    is a truncation between this check and the transaction's reads: a window of
    microseconds, against a writer that must be deliberately damaging the index.

    Raises:
        DamagedIndexError: the file ends before the pages its meta page says are in use.
    """
    entry = _open_envs.get(env.path())
    if entry is None:
        return  # closed meanwhile: the transaction will fail on its own
    page_size = entry[2]
    data_file = os.path.join(env.path(), "data.mdb")
    try:
        size = os.stat(data_file).st_size
    except OSError as exc:
        raise DamagedIndexError(f"index file {data_file}: {exc.strerror}") from None
    if size < 2 * page_size:
        raise DamagedIndexError(f"index file {data_file} was cut to {size} bytes while open")
    needed = (env.info()["last_pgno"] + 1) * page_size
    # Files only grow: another process may have grown it after the stat above; look again.
    if needed > size and needed > os.stat(data_file).st_size:
        raise DamagedIndexError(f"index file {data_file} was cut to {size} bytes while open; it needs {needed}")


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
        env = lmdb.open(
            path,
            map_size=_INITIAL_MAP_SIZE,
            max_dbs=4,
            max_readers=_MAX_READERS,
            # The index is rebuildable from the fragments, so a commit need not wait for the
            # meta page; data pages are still synced, which keeps the file consistent.
            metasync=False,
            readahead=False,
            mode=0o666,  # the umask applies when file_mode is None, as for fragments
        )
        if file_mode is not None:
            # LMDB creates its files through the umask; file_mode is what the caller asked for.
            _chmod_own(os.path.join(path, "data.mdb"), file_mode)
        return env
    except _CORRUPTION as exc:
        raise DamagedIndexError(f"index generation {path}: {exc}") from exc
    except (lmdb.Error, OSError) as exc:
        detail = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc).removeprefix(f"{path}: ")
        raise StorageError(
            f"cannot open the index at {path}: {detail}. Check that the directory is writable, has free space "
            "and is on a local file system (LMDB does not work on NFS); set VUAConfig(index_path=...) to move it."
        ) from exc


def _chmod_own(path: str, file_mode: int) -> None:
    """Gives ``path`` the mode ``file_mode`` when this user owns it (another user's file is theirs to set)."""
    info = os.stat(path)
    if info.st_uid == os.geteuid() and info.st_mode & 0o7777 != file_mode:
        os.chmod(path, file_mode)


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


@contextmanager
def rebuild_lock(index_path: str, file_mode: int | None = None) -> Iterator[None]:
    """Holds the index's rebuild lock (made with the index directory when missing).

    Raises:
        StorageError: the directory or the lock file cannot be made or opened for writing.
    """
    try:
        os.makedirs(index_path, exist_ok=True)
        fd = os.open(os.path.join(index_path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise StorageError(
            f"cannot lock the index {index_path} to build it: {exc.strerror or exc} ({exc.filename}); the index must be "
            "in a directory this process can write: move it with VUAConfig(index_path=...) (--index-path in the "
            "vua command)"
        ) from exc
    try:
        if file_mode is not None and os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, file_mode)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_current(index_path: str, generation: str, file_mode: int | None) -> None:
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
