"""Where things live under a VUA root: fan-out directories, group directories, the index.

    ROOT/
      index.lmdb/            default LMDB index (configurable: keep it off network file systems)
      3f/                    fan-out level: the first two hex digits of the key
        3fa0...e1/           one directory per group, named by its 32-digit hex key
          kv.safetensors     the fragment: tokens and every layer's K and V slice
          .kv.safetensors.*  a writer's unpublished fragment (hard-linked into place when complete)
        .tmp-3fa0...e1-...   a group moved aside (evicted, damaged), or a directory maker's lock

Paths are built only from hex keys, so nothing a caller passes can escape the root.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import NamedTuple

from vua.errors import NotAStoreError

FRAGMENT_FILE = "kv.safetensors"
TMP_PREFIX = ".tmp-"
# A writer's file sits beside the fragment it becomes, named ".kv.safetensors.<suffix>": the
# rsync-style temporary name GlusterFS's DHT places on the same server as "kv.safetensors",
# so publishing it (a hard link in the same directory) stays on one server and leaves no
# DHT link file behind (one that readers on other nodes saw as an empty or missing fragment).
WRITING_PREFIX = f".{FRAGMENT_FILE}."
DEFAULT_INDEX_DIR = "index.lmdb"
FANOUT_DIGITS = 2

_KEY_HEX = re.compile(r"[0-9a-f]{32}\Z")
_FANOUT_HEX = re.compile(r"[0-9a-f]{2}\Z")


def is_key_hex(name: str) -> bool:
    """True when ``name`` is a 32-digit lowercase hex group key."""
    return _KEY_HEX.match(name) is not None


def fanout_name(key_hex: str) -> str:
    """Returns the name of the fan-out directory that holds the group ``key_hex``."""
    return key_hex[:FANOUT_DIGITS]


def fanout_dir(root: str, key_hex: str) -> str:
    """Returns the fan-out directory that holds the group ``key_hex``."""
    return os.path.join(root, key_hex[:FANOUT_DIGITS])


def group_dir(root: str, key_hex: str) -> str:
    """Returns the directory of the group ``key_hex``."""
    return os.path.join(root, key_hex[:FANOUT_DIGITS], key_hex)


def fragment_path(root: str, key_hex: str) -> str:
    """Returns the path of the fragment file of the group ``key_hex``."""
    return os.path.join(root, key_hex[:FANOUT_DIGITS], key_hex, FRAGMENT_FILE)


def iter_fanout_dirs(root: str) -> Iterator[str]:
    """Yields the path of every fan-out directory under ``root``."""
    with os.scandir(root) as entries:
        for entry in entries:
            if _FANOUT_HEX.match(entry.name) and entry.is_dir(follow_symlinks=False):
                yield entry.path


class FanoutListing(NamedTuple):
    """One fan-out directory's entries, from one listing."""

    groups: list[tuple[str, str]]  # (key_hex, group_dir) of every published group
    temporaries: list[str]  # every moved-aside group, lock, or older writer's temporary


def list_fanout(fanout: str) -> FanoutListing:
    """Lists one fan-out directory once: its groups and its temporaries (see :class:`FanoutListing`)."""
    prefix = os.path.basename(fanout)
    listing = FanoutListing([], [])
    with os.scandir(fanout) as entries:
        for entry in entries:
            name = entry.name
            if is_key_hex(name) and name.startswith(prefix):
                listing.groups.append((name, entry.path))
            elif name.startswith(TMP_PREFIX):
                listing.temporaries.append(entry.path)
    return listing


def iter_groups(fanout: str) -> Iterator[tuple[str, str]]:
    """Yields ``(key_hex, group_dir)`` for every published group in one fan-out directory."""
    yield from list_fanout(fanout).groups


def iter_writing(group: str) -> Iterator[str]:
    """Yields the path of every writer's unpublished fragment in one group directory."""
    with os.scandir(group) as entries:
        for entry in entries:
            if entry.name.startswith(WRITING_PREFIX):
                yield entry.path


def iter_temporaries(fanout: str) -> Iterator[str]:
    """Yields the path of every moved-aside group, lock, or older writer's temporary in one fan-out directory."""
    yield from list_fanout(fanout).temporaries


def check_index_path(index_path: str, *, setting: str, otherwise: str, create_parents: bool = False) -> None:
    """Refuses an index path that cannot be an index: something else than a directory stands
    there, or its parent does not exist (a mistyped path, most likely).

    The index is made when missing, so a typo would otherwise become a fresh, empty index
    somewhere unexpected, as a mistyped root would become a fresh store.

    Args:
        setting: where the path came from, for the message (``VUAConfig.index_path``, ``--index-path``).
        otherwise: how to create it all on purpose, for the message.
        create_parents: missing parents will be made: only what stands at the path matters.

    Raises:
        NotAStoreError: a file (or anything but a directory) is there, or the parent directory does not exist.
    """
    if os.path.lexists(index_path) and not os.path.isdir(index_path):
        raise NotAStoreError(
            f"{setting} {index_path} is not a directory; pass the directory the index is kept in (made when missing)"
        )
    parent = os.path.dirname(os.path.abspath(index_path))
    if not create_parents and not os.path.isdir(parent):
        raise NotAStoreError(
            f"cannot create the index at {index_path}: its parent {parent} does not exist; "
            f"check {setting}, or {otherwise}"
        )


def may_write(path: str) -> bool:
    """Whether this process may write ``path``, or create it in its nearest existing ancestor
    (False on a read-only mount, or in another user's directory)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return os.access(path, os.W_OK | os.X_OK)
