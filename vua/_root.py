"""A store's root directory: opened (or made) with care, told apart as local or shared, and its write errors explained.

A root on a shared file system changes how VUA reads (pread, never a memory map) and where
capacity is kept (store-wide, by ``vua gc``); a mistyped root must not silently become a
fresh, empty store; and an errno from a put becomes advice a user can act on.
"""

from __future__ import annotations

import errno
import os

from vua._config import VUAConfig
from vua._files import file_system_type, is_network_file_system
from vua._publish import make_dir
from vua.errors import InvalidInputError, NotAStoreError, StorageError


def is_network_root(root: str, config: VUAConfig) -> bool:
    """Whether ``root`` is a network or FUSE file system (``config.network_fs``, else detected)."""
    kind = file_system_type(root)
    network = config.network_fs if config.network_fs is not None else is_network_file_system(kind)
    if network and config.max_bytes is not None:
        raise InvalidInputError(
            f"VUAConfig.max_bytes bounds one node's index, but the root {root!r} is a shared "
            f"{kind or 'network'} file system whose capacity is the whole store's: leave max_bytes None "
            "and run `vua gc ROOT --max-bytes N` on one node, on a timer (see the README)"
        )
    return network


def write_failure_advice(failure: OSError) -> str:
    """What to do about a put's failed write, by its errno."""
    if failure.errno == errno.ESTALE:
        # Seen on GlusterFS when a directory ended up with a different id on each server: a
        # lookup racing another node's mkdir does that. make_dir keeps VUA's writers apart;
        # a reader probing a group at the instant another node makes it is not kept out.
        return (
            f"the shared file system called a directory under the root stale ({failure.filename}); "
            "its client log says why, and a directory the servers disagree about must be repaired or removed there"
        )
    return "free space or fix permissions"


def open_root(root_path: str | bytes | os.PathLike[str] | os.PathLike[bytes], create_parents: bool) -> str:
    """The root as a path, created (and its parents with ``create_parents``) when missing."""
    try:
        root = os.fsdecode(os.fspath(root_path))  # bytes too, as os.open takes them
    except TypeError:
        raise InvalidInputError(f"root_path must be a path, got {type(root_path).__name__}") from None
    parent = os.path.dirname(os.path.abspath(root))
    # Only the parent is looked at: a root whose parent is missing cannot exist, and looking
    # the root itself up before make_dir holds its lock can break it on GlusterFS (see make_dir).
    if not create_parents and not os.path.isdir(parent):
        # A mistyped root would otherwise become a fresh, empty store somewhere unexpected.
        raise NotAStoreError(
            f"cannot create the VUA root {root!r}: its parent {parent!r} does not exist; "
            "check the path, or pass VUA(..., create_parents=True) to create it all"
        )
    try:
        make_dir(root)  # one maker at a time: nodes starting together on a shared file system
    except OSError as exc:
        raise StorageError(f"cannot use {root!r} as a VUA root: {exc.strerror}; pass a writable directory") from exc
    return root
