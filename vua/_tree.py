"""One walk over the fragment tree, for every maintenance command: what each group is, and the trash.

Rebuild, verify, gc and stats ask the tree the same questions and differ only in how deep
they look into each group (:class:`Check`). Walking it here, once per call, keeps one
answer to what a fan-out directory that cannot be listed, a group removed since it was
listed, a writer's file and a temporary's age mean. Fan-out directories are walked in
parallel, one per worker, and handed back in the order they were listed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Container, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from vua import _layout
from vua._files import age_seconds
from vua._publish import last_use
from vua._record import StoredGroup
from vua._stored import UnauthenticatedError, check_fragment, stored_group
from vua.errors import FragmentError, FragmentState

logger = logging.getLogger(__name__)


class Check(Enum):
    """How deep a walk looks into each group."""

    STAT = "stat"  # its last use and its fragment's size, nothing read (gc, stats)
    HEADER = "header"  # what its fragment says it is, the header validated (rebuild)
    FULL = "full"  # every checksum, the key chain, the MAC given a key; its writers' files (verify)


class GroupState(Enum):
    """What a walk found a group directory to be."""

    VALID = "valid"  # passed the walk's check (at STAT: its fragment is there)
    DAMAGED = "damaged"  # its fragment failed the check: a rewrite is due
    UNAUTHENTICATED = "unauthenticated"  # every checksum holds, the MAC does not (FULL, with a key)
    UNREADABLE = "unreadable"  # the file system refused (EIO, ESTALE, EACCES): not shown to be damaged
    UNPUBLISHED = "unpublished"  # no fragment: a writer at work or one that died, or removed since listed
    PASSED_OVER = "passed-over"  # one the caller had settled: listed, not looked into


_STATE_OF = {
    FragmentState.DAMAGED: GroupState.DAMAGED,
    FragmentState.MISSING: GroupState.UNPUBLISHED,
    FragmentState.UNREADABLE: GroupState.UNREADABLE,
}


@dataclass(frozen=True, slots=True)
class Temporary:
    """A name no reader looks up. In a fan-out directory (the trash): a group moved aside, a
    directory maker's lock, an older writer's file; in a group directory: a writer's
    unpublished fragment.

    Attributes:
        age: seconds since it last changed (a date ahead counts as that far past, see
            ``_files.age_seconds``); None when it went meanwhile or could not be statted.
        error: why it could not be statted (EIO, ESTALE, a symbolic link looping), if so.
    """

    path: str
    age: float | None
    error: OSError | None = None

    @property
    def why(self) -> str | None:
        """Why a fan-out's temporary is there, the word in its name (``_publish.temporary_name``):
        ``evicted``, ``damaged``, ``mkdir`` (a directory maker's lock); None when its name has none."""
        words = os.path.basename(self.path)[len(_layout.TMP_PREFIX) :].split("-")
        return words[1] if len(words) > 1 else None


@dataclass(frozen=True, slots=True)
class TreeGroup:
    """One group directory as a walk found it.

    Attributes:
        key_hex: its key, its directory's name.
        path: its directory.
        state: what it is.
        stored: what its fragment says it is (VALID at HEADER and FULL; the record's last use
            is the tree's at HEADER, the time of the check at FULL).
        last_use, nbytes: its last use (ns, see ``_publish.last_use``) and its fragment's size
            (VALID at STAT; 0 otherwise).
        error: why it is not VALID: the check's FragmentError, or the OSError of a listing or
            a stat.
        age: its directory's age in seconds (UNPUBLISHED at FULL); None when that went too.
        writing: writers' unpublished fragments in its directory (FULL).
    """

    key_hex: str
    path: str
    state: GroupState
    stored: StoredGroup | None = None
    last_use: int = 0
    nbytes: int = 0
    error: FragmentError | OSError | None = None
    age: float | None = None
    writing: tuple[Temporary, ...] = ()


@dataclass(frozen=True, slots=True)
class Fanout:
    """One fan-out directory as a walk found it.

    Attributes:
        groups: its group directories (none when the walk was not asked for groups).
        trash: its temporaries (only when the walk was asked for them).
        unlisted: why it could not be listed (EACCES, EIO), if so: its groups are hidden,
            not gone, so nothing may be concluded about them.
    """

    path: str
    groups: list[TreeGroup] = field(default_factory=list)
    trash: list[Temporary] = field(default_factory=list)
    unlisted: OSError | None = None


@dataclass
class ScanProgress:
    """Where a walk of the fragment tree stands; handed to progress callbacks."""

    fanouts_done: int = 0
    fanouts_total: int = 0
    groups: int = 0  # valid
    damaged: int = 0


def walk_tree(
    root: str,
    check: Check | None,
    *,
    trash: bool = False,
    mac_key: bytes | None = None,
    passed_over: Container[bytes] = frozenset(),
    workers: int = 8,
    progress: Callable[[ScanProgress], None] | None = None,
    state: ScanProgress | None = None,
) -> Iterator[Fanout]:
    """Walks the tree under ``root`` once, yielding each fan-out directory, in listing order, once looked into.

    A fan-out directory removed meanwhile yields no groups; one that cannot be listed says
    why in ``Fanout.unlisted``. Nothing is logged: each caller says what that means to it.

    Args:
        check: how deep to look into each group; None: the groups are not wanted (a walk of the trash).
        trash: stat each fan-out directory's temporaries too (``Fanout.trash``).
        mac_key: the store's MAC key (see ``_mac.mac_key``): at FULL, every MAC is verified.
        passed_over: keys of groups not to look into (PASSED_OVER), which the caller has settled.
        workers: fan-out directories looked into at once.
        progress: called with ``state`` after each fan-out directory.
        state: the counts to keep up to date, for a caller that reads them afterwards.

    Raises:
        OSError: ``root`` cannot be listed.
    """
    state = state if state is not None else ScanProgress()
    fanouts = list(_layout.iter_fanout_dirs(root))
    state.fanouts_total = len(fanouts)
    now = time.time()

    def look_into(fanout: str) -> Fanout:
        try:
            listing = _layout.list_fanout(fanout)
        except FileNotFoundError:
            return Fanout(fanout)
        except OSError as exc:  # EACCES (another user's), EIO
            return Fanout(fanout, unlisted=exc)
        groups: list[TreeGroup] = []
        if check is not None:
            groups = [_look_into(root, name, group, check, mac_key, passed_over, now) for name, group in listing.groups]
        temporaries = [_temporary(path, now) for path in listing.temporaries] if trash else []
        return Fanout(fanout, groups, temporaries)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for fanout in pool.map(look_into, fanouts):
            state.fanouts_done += 1
            state.groups += sum(group.state is GroupState.VALID for group in fanout.groups)
            state.damaged += sum(group.state is GroupState.DAMAGED for group in fanout.groups)
            if progress is not None:
                progress(state)
            yield fanout


def stat_groups(root: str, *, workers: int = 8) -> list[TreeGroup]:
    """Every group whose fragment is in the tree, with its last use and size (a walk at STAT).

    Groups removed or unreadable meanwhile are left out; fan-out directories that cannot be
    listed are passed over, saying so.
    """
    return stat_tree(root, workers=workers)[0]


def stat_tree(root: str, *, trash: bool = False, workers: int = 8) -> tuple[list[TreeGroup], list[Temporary]]:
    """:func:`stat_groups`, and with ``trash`` every fan-out directory's temporaries, from the one walk."""
    groups: list[TreeGroup] = []
    temporaries: list[Temporary] = []
    for fanout in walk_tree(root, Check.STAT, trash=trash, workers=workers):
        if fanout.unlisted is not None:
            log_unlisted(fanout.path, fanout.unlisted)
        groups += [group for group in fanout.groups if group.state is GroupState.VALID]
        temporaries += fanout.trash
    return groups, temporaries


def log_unlisted(fanout: str, exc: OSError) -> None:
    """Rebuild, gc and stats pass over a fan-out directory that cannot be listed, saying so."""
    logger.warning("cannot list %s (%s); its groups are passed over", fanout, exc.strerror or exc)


def _look_into(
    root: str,
    key_hex: str,
    group: str,
    check: Check,
    mac_key: bytes | None,
    passed_over: Container[bytes],
    now: float,
) -> TreeGroup:
    if bytes.fromhex(key_hex) in passed_over:
        return TreeGroup(key_hex, group, GroupState.PASSED_OVER)
    match check:
        case Check.STAT:
            return _stat_group(key_hex, group)
        case Check.HEADER:
            return _read_group(root, key_hex, group)
        case Check.FULL:
            return _check_group(root, key_hex, group, mac_key, now)


def _stat_group(key_hex: str, group: str) -> TreeGroup:
    try:
        used = last_use(group)
        nbytes = os.stat(os.path.join(group, _layout.FRAGMENT_FILE)).st_size
    except FileNotFoundError as exc:
        return TreeGroup(key_hex, group, GroupState.UNPUBLISHED, error=exc)
    except OSError as exc:
        return TreeGroup(key_hex, group, GroupState.UNREADABLE, error=exc)
    return TreeGroup(key_hex, group, GroupState.VALID, last_use=used, nbytes=nbytes)


def _read_group(root: str, key_hex: str, group: str) -> TreeGroup:
    try:
        stored = stored_group(root, key_hex)
    except FragmentError as exc:
        return TreeGroup(key_hex, group, _STATE_OF[exc.state], error=exc)
    return TreeGroup(key_hex, group, GroupState.VALID, stored=stored)


def _check_group(root: str, key_hex: str, group: str, mac_key: bytes | None, now: float) -> TreeGroup:
    try:
        # A writer killed between its write and its link leaves its file here.
        writing = tuple(_temporary(path, now) for path in _layout.iter_writing(group))
    except FileNotFoundError as exc:  # the group went meanwhile
        return TreeGroup(key_hex, group, GroupState.UNPUBLISHED, error=exc)
    except OSError as exc:
        return TreeGroup(key_hex, group, GroupState.UNREADABLE, error=exc)
    try:
        stored = check_fragment(root, key_hex, mac_key)
    except UnauthenticatedError as exc:
        return TreeGroup(key_hex, group, GroupState.UNAUTHENTICATED, error=exc, writing=writing)
    except FragmentError as exc:
        if exc.state is FragmentState.MISSING:
            return _unpublished(key_hex, group, exc, writing, now)
        return TreeGroup(key_hex, group, _STATE_OF[exc.state], error=exc, writing=writing)
    return TreeGroup(key_hex, group, GroupState.VALID, stored=stored, writing=writing)


def _unpublished(
    key_hex: str, group: str, missing: FragmentError, writing: tuple[Temporary, ...], now: float
) -> TreeGroup:
    """A group directory without its file: a publish at work (its file is written beside it), or
    one whose writer died; how long it has stood, and its writers' files, tell which."""
    try:
        age = age_seconds(group, now)
    except FileNotFoundError:
        return TreeGroup(key_hex, group, GroupState.UNPUBLISHED, error=missing, writing=writing)  # went too
    except OSError as exc:
        return TreeGroup(key_hex, group, GroupState.UNREADABLE, error=exc, writing=writing)
    return TreeGroup(key_hex, group, GroupState.UNPUBLISHED, error=missing, age=age, writing=writing)


def _temporary(path: str, now: float) -> Temporary:
    try:
        return Temporary(path, age_seconds(path, now))
    except FileNotFoundError:
        return Temporary(path, None)  # its writer just published or removed it
    except OSError as exc:
        return Temporary(path, None, exc)
