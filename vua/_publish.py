"""Changing the fragment tree: publishing a fragment atomically and durably, recording uses, removing groups.

Writing goes through one ``writev`` of the header and the caller's tensor buffers (no
intermediate bytes object), into a file beside the fragment's name that is fsynced and
hard-linked into place: a reader sees a whole fragment or none.

Removing things has one vocabulary, each verb saying what it does when the file system
refuses (a read-only root, no write permission):

- :func:`move_aside`: a group's fragment out of its place, to a temporary name; raises.
- :func:`quarantine_group`: :func:`move_aside` for readers that found damage; never raises.
- :func:`remove_moved_aside`: deletes such a temporary; never raises, a refusal leaves it.
- :func:`remove_dir_if_empty`: an emptied group directory, under its lock; never raises.

Eviction (``_evict.evict_group``) is :func:`move_aside` then :func:`remove_moved_aside`.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Sequence

from vua import _layout
from vua._files import fsync_dir, write_all

_RACE_RETRY_SECONDS = (0.05, 0.1, 0.2, 0.4, 0.8)
_MKDIR_WAIT_SECONDS = 5.0  # a directory maker holds its lock for two metadata operations
DAMAGED = "damaged"  # the word in a quarantined group's temporary name


def publish_fragment(
    root: str,
    key_hex: str,
    header: bytes,
    buffers: Sequence[memoryview],
    *,
    file_mode: int | None = None,
    shared: bool = True,
) -> bool:
    """Writes a fragment durably and atomically under ``root``.

    ``shared``: ``root`` is a file system other nodes write too (the default, the careful
    one): directories are made under a lock (see :func:`make_dir`). On a local file system a
    plain ``mkdir`` is atomic, and the lock's two extra metadata operations per group wait
    on the journal behind every other writer's fsync.

    The group's directory is made (if missing), the file written beside its final name
    (see ``_layout.WRITING_PREFIX``) and fsynced, then hard-linked to that name, which
    creates the fragment atomically or fails because it exists: a reader sees a whole
    fragment or none, and two writers of one group (same bytes by construction) never mix.
    Only files are linked, never directories renamed: a distributed file system
    (GlusterFS's DHT) renames a directory on each server in turn, and two nodes renaming
    onto the same group at once left it on one server only, invisible to both.

    Returns:
        True if this call published the group, False if it already existed.

    Raises:
        OSError: the file system refused (ENOSPC, EACCES, ...); nothing partial is left.
    """
    for pause in (*_RACE_RETRY_SECONDS, None):
        try:
            return _publish_once(root, key_hex, header, buffers, file_mode, shared)
        except OSError as exc:
            # Two nodes making the same directories at once on a distributed file system:
            # the loser's handles can go stale (ESTALE) or its view miss them (ENOENT) until
            # the file system heals them, a moment later; and another process may remove an
            # empty group directory between our mkdir and our create. Start over then.
            if exc.errno not in (errno.ESTALE, errno.ENOENT) or pause is None:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")


def _publish_once(
    root: str, key_hex: str, header: bytes, buffers: Sequence[memoryview], file_mode: int | None, shared: bool
) -> bool:
    group = _layout.group_dir(root, key_hex)
    _make_fanout_dir(root, key_hex, shared)
    make_dir(group, locked=shared)  # before any look at the group: see make_dir
    final = os.path.join(group, _layout.FRAGMENT_FILE)
    if os.path.lexists(final):
        return False
    tmp = os.path.join(group, f"{_layout.WRITING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    linked = lost = False
    try:
        # 0o666 lets the umask decide, as for any file a program creates; file_mode overrides.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            if file_mode is not None:
                os.fchmod(fd, file_mode)
            write_all(fd, [memoryview(header), *buffers])
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, final)
            linked = True
        except FileExistsError:
            lost = True  # another writer published it first
    finally:
        _remove_own_file(tmp)
        if not (linked or lost):
            remove_dir_if_empty(group)  # leave the tree as it was (unless another writer is at work there)
    if lost:
        return False
    fsync_dir(group)  # the link and the unlink
    fsync_dir(os.path.dirname(group))  # the group directory itself
    return True


# Fan-out directories this process made or saw made. VUA never removes one, so a put pays for
# making (or finding) each once per process; should one vanish all the same (the store deleted
# under a running server), making the group's directory makes it again (see make_dir).
_fanouts_made: set[str] = set()


def _make_fanout_dir(root: str, key_hex: str, shared: bool) -> None:
    fanout = _layout.fanout_dir(root, key_hex)
    if fanout in _fanouts_made:
        return
    if make_dir(fanout, locked=shared):
        fsync_dir(root)  # its entry in the root, as the group's is in it
    _fanouts_made.add(fanout)


def make_dir(path: str, *, locked: bool = True) -> bool:
    """Makes a directory (and its missing parents) unless it exists, one maker at a time.

    ``locked=False``: a plain ``mkdir``, for local file systems, where it is atomic and none
    of the hazards below exist. A group directory removed between this and the file's
    creation (``remove_dir_if_empty`` does take the lock) makes the publish start over.

    Two hazards on GlusterFS, both seen in the two-node tests, shape this:
    - two nodes making the same directory at the same instant left it with an inconsistent
      layout (each server claiming the same half of the hash range), so files hashed to the
      other half were invisible to the node whose view was wrong;
    - a node that merely looked the directory up while another node was making it (the
      servers had created it but not yet stamped its GlusterFS id) healed it with an id of
      its own, so the servers disagreed on the directory's id and every use of it failed
      with ESTALE on one node, for good.
    So the directory is never looked at before its lock (a file beside it, see
    :func:`_lock_dir`) is held: whoever holds the lock makes it, and mkdir failing with
    EEXIST is how an existing directory is found; a node that finds the lock taken retries
    taking it, and does not probe the directory meanwhile.

    Returns:
        True if this call made the directory, False if it was there.

    Raises:
        OSError: the file system refused (EACCES, ENOSPC, ...), or a file stands at ``path``.
    """
    if not locked:
        try:
            os.mkdir(path)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                raise
            make_dir(parent, locked=False)
            return make_dir(path, locked=False)
        except FileExistsError:
            _require_directory(path)
            return False
        return True
    deadline = time.monotonic() + _MKDIR_WAIT_SECONDS
    while True:
        try:
            lock = _lock_dir(path)
        except FileNotFoundError:
            parent = os.path.dirname(path)
            if parent == path:
                raise
            make_dir(parent)
            continue
        except OSError:
            # No lock may be made beside it (a read-only parent, say): nor may the directory
            # be made there, so it is usable only if it exists.
            if os.path.isdir(path):
                return False
            raise
        if lock is None:
            if time.monotonic() > deadline:  # its holder died: take the lock over
                _remove_own_file(_lock_path(path))
                deadline = time.monotonic() + _MKDIR_WAIT_SECONDS
            time.sleep(0.01)
            continue
        try:
            os.mkdir(path)
        except FileExistsError:
            _require_directory(path)
            return False
        finally:
            _remove_own_file(lock)
        return True


def _require_directory(path: str) -> None:
    """Raises NotADirectoryError when a file stands where directory ``path`` should be.

    A symlink to a directory is one (a root often is: /data/vua -> /mnt/nvme0/vua). Only
    what is there counts: on a FUSE mount a directory another node made a moment ago can
    still look missing (a cached lookup), which is no reason to fail.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)


def remove_dir_if_empty(group: str) -> None:
    """Removes an emptied group directory, unless another node is making it right now.

    Never raises: a directory that is not empty (a fragment published into it meanwhile),
    is gone, or that the file system refuses to remove (a read-only root) stays; an empty
    group directory is harmless (``vua verify --fix`` removes an old one).
    """
    try:
        lock = _lock_dir(group)
    except OSError:  # a read-only root, say: the empty directory is harmless
        return
    if lock is None:
        return
    try:
        os.rmdir(group)
    except OSError:
        pass  # not empty (a fragment was published into it meanwhile) or gone
    finally:
        _remove_own_file(lock)


def _lock_path(path: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f"{_layout.TMP_PREFIX}{name}-mkdir")


def _lock_dir(path: str) -> str | None:
    """Takes the lock on making or removing directory ``path``: a file created with O_EXCL
    (atomic on any file system, GlusterFS's DHT included). Returns its path, or None when
    another process holds it."""
    lock = _lock_path(path)
    try:
        os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return None
    return lock


def temporary_name(root: str, key_hex: str, why: str) -> str:
    """A fresh temporary path in a group's fan-out directory, saying which group and why."""
    return os.path.join(
        _layout.fanout_dir(root, key_hex),
        f"{_layout.TMP_PREFIX}{key_hex}-{why}-{os.getpid()}-{secrets.token_hex(4)}",
    )


def remove_moved_aside(path: str) -> None:
    """Deletes a temporary in a fan-out directory: a group moved aside by :func:`move_aside`, a
    writer's dead file or lock; a file (or, from older writers and damage, a directory).

    Never raises: gone already is fine, and what the file system refuses to remove stays
    (a caller that must know looks with ``os.path.lexists``, as ``vua verify --fix`` does).
    """
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _remove_own_file(path)


def _remove_own_file(path: str) -> None:
    """Removes a file this process made (a writer's file, a lock); gone already or refused is fine.

    No probe of what the path is first: on a network file system every probe is a round
    trip, and publishing a group removes two such files.
    """
    try:
        os.unlink(path)
    except OSError:
        pass


def mark_used(root: str, uses: dict[str, int]) -> None:
    """Records uses in the tree: each group directory's mtime becomes its last use (key hex -> ns).

    The tree is the truth, and it is what every node sharing a root sees, so a rebuilt
    index (and eviction anywhere) keeps the LRU order. Best effort: a group evicted
    meanwhile, or a read-only root, is skipped.
    """
    for key_hex, used_ns in uses.items():
        try:
            os.utime(_layout.group_dir(root, key_hex), ns=(used_ns, used_ns))
        except OSError:
            pass


def last_use(group: str) -> int:
    """A group's last use as the tree records it: its directory's mtime (ns, see :func:`mark_used`).

    A date before 1970 reads as 0. A date in the future no honest clock gave it (a copied
    tree, a hostile touch, a node whose clock was far ahead): left alone, the group would
    look fresher than every other for ever and capacity would evict everything else
    first. It reads as now and is reset to now in the tree (best effort), so it ages from here.

    Raises:
        OSError: the directory cannot be statted.
    """
    used = os.stat(group).st_mtime_ns
    now = time.time_ns()
    if used <= now:
        return max(used, 0)
    try:
        os.utime(group, ns=(now, now))
    except OSError:
        pass  # a read-only root: it still reads as now
    return now


def move_aside(root: str, key_hex: str, why: str) -> str | None:
    """Moves a group's fragment out of its place, atomically, to a temporary name saying ``why``.

    The file is renamed (not the directory: see :func:`publish_fragment`), then the empty
    group directory removed. Readers that already opened the file keep reading it; later
    lookups no longer find the group. The temporary stays until someone deletes it
    (:func:`remove_moved_aside`).

    Returns:
        The new path, or None when the group was gone already (moved by another process).

    Raises:
        OSError: the file system refused (a read-only root, no write permission): the group
            is still in place.
    """
    group = _layout.group_dir(root, key_hex)
    target = temporary_name(root, key_hex, why)
    moved: str | None = target
    try:
        os.rename(os.path.join(group, _layout.FRAGMENT_FILE), target)
    except NotADirectoryError:  # damage: something else than a directory stands for the group
        try:
            os.rename(group, target)
        except FileNotFoundError:
            return None
        return target
    except FileNotFoundError:
        moved = None
    remove_dir_if_empty(group)  # a new fragment may have been published into it meanwhile
    return moved


def quarantine_group(root: str, key_hex: str) -> bool:
    """Moves a damaged group out of the way (:func:`move_aside`), so a later put can rewrite it.

    For readers, which must never raise over it: when the file system refuses (a read-only
    root, another user's store) the group stays and the read is cut before it all the same.
    ``vua verify --fix`` removes the moved-aside file once it is old.

    Returns:
        True if this call moved it; False when it was gone already or the file system refused.
    """
    try:
        return move_aside(root, key_hex, DAMAGED) is not None
    except OSError:  # a read-only root, another user's store: readers stop before it all the same
        return False
