"""``vua verify``: check every fragment and the index against each other, and optionally repair.

Per fragment: the header parses within bounds, the metadata names this group, every
tensor and the whole group match the checksums written at put time, and the key equals
``xxh3_128(parent + tokens)``: the stored tokens really are the ones the key promises.
Across the store: every valid fragment is indexed, every index entry has a valid
fragment, and no writer's temporary file is older than the grace period.

With the store's MAC key (a store written with ``auth_key``), every fragment's MAC is
checked too: one that does not verify is reported as unauthenticated (forged, unsealed, or
sealed with another key), as readers with the key would refuse it.

Repair (``fix=True``) deletes damaged and unauthenticated fragments and stale temporaries
and brings the index in line with the tree, which stays the truth. When no fragment at
all verifies under the key given, the key is more likely wrong than every fragment
forged: those fragments are reported and left alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum

from vua import _layout
from vua._generations import CURRENT_FILE
from vua._index import Index
from vua._publish import DAMAGED, move_aside, remove_dir_if_empty, remove_moved_aside
from vua._rebuild import rebuild
from vua._record import GroupRecord, StoredGroup
from vua._tree import Check, GroupState, ScanProgress, Temporary, TreeGroup, walk_tree
from vua.errors import FragmentError

DEFAULT_GRACE_SECONDS = 3600.0


class ProblemKind(str, Enum):
    """What kind of thing is wrong; the values are what ``vua verify`` prints and its JSON holds."""

    DAMAGED_FRAGMENT = "damaged-fragment"
    UNAUTHENTICATED_FRAGMENT = "unauthenticated-fragment"  # checksums hold, the MAC does not
    STALE_TEMPORARY = "stale-temporary"  # a writer's or a remover's file older than the grace period
    UNINDEXED_GROUP = "unindexed-group"
    MISRECORDED_INDEX_ENTRY = "misrecorded-index-entry"  # another namespace or layout than the fragment
    DANGLING_INDEX_ENTRY = "dangling-index-entry"
    GARBAGE_INDEX_ENTRY = "garbage-index-entry"
    MISSING_INDEX = "missing-index"
    EMPTY_GROUP_DIRECTORY = "empty-group-directory"
    UNREADABLE = "unreadable"  # left alone by fix: see _unreadable

    def __str__(self) -> str:
        return self.value


# Groups in the tree that cannot be used: an index entry for one is not dangling.
_UNUSABLE = (ProblemKind.DAMAGED_FRAGMENT, ProblemKind.UNAUTHENTICATED_FRAGMENT, ProblemKind.UNREADABLE)


@dataclass
class Problem:
    """One thing wrong with a store.

    Attributes:
        kind: what is wrong.
        key: the group's key (hex); None for a stale temporary, a missing index and a fan-out
            directory that cannot be listed.
        detail: what was found, for people.
        fixed: whether ``fix`` repaired it.
        path: the file or directory at fault, where it is one (a stale temporary, an empty
            group directory, an unreadable one); None otherwise.
    """

    kind: ProblemKind
    key: str | None
    detail: str
    fixed: bool = False
    path: str | None = None


@dataclass
class VerifyReport:
    fragments: int = 0
    bytes: int = 0
    young_temporaries: int = 0  # probably writers at work (temporaries, empty group directories): not problems
    other_nodes_groups: int = 0  # valid groups a node-local index does not know: the store's, not a problem
    problems: list[Problem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when nothing is wrong, or everything wrong was repaired."""
        return all(p.fixed for p in self.problems)

    def to_json(self) -> dict:
        return {**asdict(self), "clean": self.clean}


def verify_store(
    root: str,
    index_path: str,
    *,
    fix: bool = False,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    workers: int = 8,
    progress: Callable[[ScanProgress], None] | None = None,
    node_local_index: bool = False,
    mac_key: bytes | None = None,
) -> VerifyReport:
    """Checks (and with ``fix``, repairs) the store at ``root`` with its index at ``index_path``.

    ``mac_key``: the store's MAC key (see ``_mac.mac_key``), to check every fragment's MAC.

    ``node_local_index``: the index is one node's own beside a shared root, so valid groups it
    does not know are other nodes' (counted, not problems, and not added by ``fix``: this
    node's capacity accounting must not take them over).
    """
    report = VerifyReport()
    valid: dict[bytes, StoredGroup] = {}
    unlisted: set[str] = set()  # fan-out directories that could not be listed (EACCES, EIO)
    walk = walk_tree(root, Check.FULL, trash=True, mac_key=mac_key, workers=workers, progress=progress)
    for fanout in walk:
        if fanout.unlisted is not None:
            unlisted.add(os.path.basename(fanout.path))  # its groups are hidden, not gone: see dangling entries below
            report.problems.append(_unreadable(None, fanout.path, fanout.unlisted))
            continue
        for group in fanout.groups:
            writers_done = _note_temporaries(report, group.writing, grace_seconds)
            _note_group(report, valid, group, writers_done, grace_seconds)
        _note_temporaries(report, fanout.trash, grace_seconds)
    report.fragments = len(valid)
    report.bytes = sum(entry.record.nbytes for entry in valid.values())

    index = Index(index_path, root)
    indexed: dict[bytes, GroupRecord | None] = {}
    if os.path.exists(os.path.join(index_path, CURRENT_FILE)):
        indexed = dict(index.items())
    elif not node_local_index:  # a node-local index is made when that node opens the store
        report.problems.append(Problem(ProblemKind.MISSING_INDEX, None, f"no index at {index_path}"))
    unusable_keys = {bytes.fromhex(p.key or "") for p in report.problems if p.kind in _UNUSABLE}
    for key, record in indexed.items():
        if record is None:
            report.problems.append(Problem(ProblemKind.GARBAGE_INDEX_ENTRY, key.hex(), "value is not a record"))
        elif key not in valid and key not in unusable_keys and _layout.fanout_name(key.hex()) not in unlisted:
            report.problems.append(
                Problem(ProblemKind.DANGLING_INDEX_ENTRY, key.hex(), "indexed, but no fragment in the tree")
            )
    for key, stored in valid.items():
        old = indexed.get(key)
        if key not in indexed and node_local_index:
            report.other_nodes_groups += 1
        elif key not in indexed:
            report.problems.append(
                Problem(ProblemKind.UNINDEXED_GROUP, key.hex(), "valid fragment missing from the index")
            )
        elif old is not None and old[:2] != stored.record[:2]:
            report.problems.append(
                Problem(
                    ProblemKind.MISRECORDED_INDEX_ENTRY,
                    key.hex(),
                    "index names another namespace or layout than the fragment",
                )
            )

    if fix:
        _repair(root, index, report, valid)
    index.close()
    return report


def _note_temporaries(report: VerifyReport, temporaries: Iterable[Temporary], grace_seconds: float) -> bool:
    """Counts young temporaries, reports old ones; True when all of them were old."""
    all_old = True
    for tmp in temporaries:
        if tmp.error is not None:
            report.problems.append(_unreadable(None, tmp.path, tmp.error))
        elif tmp.age is not None and tmp.age > grace_seconds:
            report.problems.append(
                Problem(ProblemKind.STALE_TEMPORARY, None, f"{tmp.path} ({tmp.age:.0f} s old)", path=tmp.path)
            )
        elif tmp.age is not None:
            report.young_temporaries += 1
            all_old = False
    return all_old


def _note_group(
    report: VerifyReport, valid: dict[bytes, StoredGroup], group: TreeGroup, writers_done: bool, grace_seconds: float
) -> None:
    """Records what a walk at FULL found a group to be: valid, or a problem, or a writer at work."""
    key_hex, error = group.key_hex, group.error
    match group.state:
        case GroupState.VALID:
            assert group.stored is not None
            valid[bytes.fromhex(key_hex)] = group.stored
        case GroupState.UNAUTHENTICATED:
            report.problems.append(Problem(ProblemKind.UNAUTHENTICATED_FRAGMENT, key_hex, str(error)))
        case GroupState.DAMAGED:
            report.problems.append(Problem(ProblemKind.DAMAGED_FRAGMENT, key_hex, str(error)))
        case GroupState.UNREADABLE:  # EIO, ESTALE: the file system refused
            assert error is not None
            report.problems.append(_unreadable(key_hex, group.path, error))
        case GroupState.UNPUBLISHED if group.age is not None and writers_done:
            # Harmless: the next put fills it; old, its writer died.
            if group.age > grace_seconds:
                report.problems.append(
                    Problem(
                        ProblemKind.EMPTY_GROUP_DIRECTORY,
                        key_hex,
                        f"{group.path} ({group.age:.0f} s old)",
                        path=group.path,
                    )
                )
            else:
                report.young_temporaries += 1
        # Otherwise gone meanwhile, or its writer (counted with its files) is at work.


def _unreadable(key_hex: str | None, path: str, exc: OSError | FragmentError) -> Problem:
    """A group or fan-out directory the file system refuses to read (EIO, ESTALE, EACCES).

    Left alone by ``fix``: the refusal may pass (an I/O error), and what the file system
    refuses to read it may refuse to remove too. On GlusterFS, ESTALE that persists means
    its servers disagree about a directory's id (see ``_publish.make_dir``), which is
    repaired on the servers; the client's log names the directory.
    """
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return Problem(
        ProblemKind.UNREADABLE,
        key_hex,
        f"{path}: {reason}; left alone: a fault of the file system (disk, network, or on GlusterFS "
        "a directory its servers disagree about), to repair there",
        path=path,
    )


def _repair(root: str, index: Index, report: VerifyReport, valid: dict[bytes, StoredGroup]) -> None:
    drop, add = [], []
    # Not one fragment verifies under the key given: that key is probably not the store's.
    wrong_key = not valid
    # Stale temporaries go first: a writer killed while making a group directory leaves its
    # lock, and an empty group directory is removed only under that lock.
    for problem in sorted(report.problems, key=lambda p: p.kind is not ProblemKind.STALE_TEMPORARY):
        key_hex = problem.key or ""  # set for every kind but stale-temporary and missing-index
        match problem.kind:
            case ProblemKind.UNAUTHENTICATED_FRAGMENT if wrong_key:
                problem.detail += " (left alone: no fragment verifies under this key; is it the store's?)"
                continue
            case ProblemKind.UNREADABLE:
                continue  # not this program's to repair (see _unreadable)
            case ProblemKind.DAMAGED_FRAGMENT | ProblemKind.UNAUTHENTICATED_FRAGMENT:
                try:
                    move_aside(root, key_hex, DAMAGED)  # out of readers' way at once...
                except OSError as exc:
                    problem.detail += f" (not removed: {exc.strerror}; run --fix as a user who may write the root)"
                    continue
                for tmp in _layout.iter_temporaries(_layout.fanout_dir(root, key_hex)):
                    if os.path.basename(tmp).startswith(f"{_layout.TMP_PREFIX}{key_hex}-{DAMAGED}-"):
                        remove_moved_aside(tmp)  # ...then gone
                drop.append(bytes.fromhex(key_hex))
            case ProblemKind.EMPTY_GROUP_DIRECTORY:
                remove_dir_if_empty(_layout.group_dir(root, key_hex))  # under its lock: see make_dir
            case ProblemKind.STALE_TEMPORARY:
                assert problem.path is not None
                remove_moved_aside(problem.path)
                if os.path.lexists(problem.path):
                    problem.detail += " (could not be removed; run --fix as a user who may write the root)"
                    continue
            case ProblemKind.DANGLING_INDEX_ENTRY | ProblemKind.GARBAGE_INDEX_ENTRY:
                drop.append(bytes.fromhex(key_hex))
            case ProblemKind.UNINDEXED_GROUP | ProblemKind.MISRECORDED_INDEX_ENTRY:
                add.append(bytes.fromhex(key_hex))
            case ProblemKind.MISSING_INDEX:
                rebuild(root, index.path)
        problem.fixed = True
    if drop:
        index.remove(drop)
    if add:
        entries = [valid[key] for key in add]
        index.add(
            [(key, entry.record) for key, entry in zip(add, entries)],
            layouts={e.layout for e in entries},
            namespaces={e.namespace for e in entries},
        )
