"""A stored group as the tree holds it: what its fragment says it is, and the full check of one.

The read path (``_catalog``) and maintenance (``_tree``'s walk, for rebuild and verify) ask
the same two questions of a group on disk: what is it (header validated: namespace, layout,
record), and is every byte of it what its writer wrote (every checksum, the key chain, the
MAC). Both answers live here, below all of them.
"""

from __future__ import annotations

import logging
import time

import xxhash

from vua import _layout, _wordsum
from vua._fragment import Fragment
from vua._keys import chain_key
from vua._kv_layout import TOKENS
from vua._publish import last_use
from vua._record import StoredGroup
from vua.errors import FragmentError, FragmentState

logger = logging.getLogger(__name__)


def read_stored_group(root: str, key_hex: str) -> StoredGroup | None:
    """What group ``key_hex``'s fragment says it is (header validated); None when it cannot be used.

    See :func:`stored_group`; why it cannot be used is logged (:func:`log_unusable`).
    """
    try:
        return stored_group(root, key_hex)
    except FragmentError as exc:
        log_unusable(key_hex, exc)
        return None


def stored_group(root: str, key_hex: str) -> StoredGroup:
    """What group ``key_hex``'s fragment says it is (header validated).

    Its last use is the tree's record of it (the directory's mtime).

    Raises:
        FragmentError: DAMAGED, MISSING (evicted by a node since it was listed) or
            UNREADABLE for now (EIO, ESTALE, ...).
    """
    # pread, not a memory map: on a network file system the file may vanish mid-read.
    with Fragment(_layout.fragment_path(root, key_hex), mapped=False) as fragment:
        return fragment.stored_group(key_hex, last_used=tree_last_use(root, key_hex))


def log_unusable(key_hex: str, exc: FragmentError) -> None:
    match exc.state:
        case FragmentState.MISSING:  # removed since it was listed: on a shared root, another node's eviction
            logger.debug("group %s is gone: %s", key_hex, exc)
        case FragmentState.DAMAGED:
            logger.warning("skipping damaged fragment %s: %s", key_hex, exc)
        case FragmentState.UNREADABLE:
            logger.warning("skipping fragment %s, unreadable for now: %s", key_hex, exc)


def tree_last_use(root: str, key_hex: str) -> int:
    """A group's last use as the tree records it (see ``_publish.last_use``).

    Publishing sets it; hits refresh it in batches (see ``_publish.mark_used``), so a
    rebuilt index, or another node, sees the same LRU order as this node's index.
    """
    try:
        return last_use(_layout.group_dir(root, key_hex))
    except OSError:
        return time.time_ns()


class UnauthenticatedError(FragmentError):
    """A fragment whose checksums hold but whose MAC does not verify under the key given."""


def check_fragment(root: str, key_hex: str, mac_key: bytes | None = None) -> StoredGroup:
    """Fully checks one group; returns what it is (its index record, layout and namespace).

    ``mac_key``: the store's MAC key, for a store with ``auth_key`` (its MAC must verify too).

    Raises:
        UnauthenticatedError: all is well but the MAC.
        FragmentError: what is wrong with it.
    """
    # pread, not a memory map: on a network file system the file may vanish mid-read.
    with Fragment(_layout.fragment_path(root, key_hex), mapped=False) as fragment:
        stored = fragment.stored_group(key_hex, last_used=time.time_ns())
        try:
            parent = bytes.fromhex(fragment.metadata.get("parent", ""))
        except ValueError as exc:
            raise FragmentError(f"malformed metadata: {exc}") from None
        for name in fragment.tensors:
            fragment.verify_checksum(name)
        _verify_group_sums(fragment)
        if chain_key(parent, fragment.raw(TOKENS)).hex() != key_hex:
            raise FragmentError("stored tokens do not hash to the group's key")
        if mac_key is not None:
            try:
                fragment.verify_mac(mac_key)
            except FragmentError as exc:
                raise UnauthenticatedError(str(exc)) from None
        return stored


def _verify_group_sums(fragment: Fragment) -> None:
    """Checks the sums over K and V bytes beyond the per-tensor xxh3 (wordsums, kv_checksum).

    Reads check only the per-tensor sums (and the word sums on a GPU); this checks every
    sum a fragment carries, on the host.

    Raises:
        FragmentError: a sum does not match (damaged data or metadata).
    """
    begin, end = fragment.kv_range
    expected = fragment.metadata.get("kv_checksum")
    if expected is not None and xxhash.xxh3_64_hexdigest(fragment.region[begin:end]) != expected:
        raise FragmentError(f"fragment {fragment.path}: kv_checksum mismatch (damaged data or metadata)")
    sums = fragment.wordsums
    if sums is None:
        return
    for name, stored in zip(fragment.kv_names, sums):
        entry = fragment.tensors[name]
        piece = fragment.region[entry.begin : entry.end].reshape(entry.shape[0], -1)  # (heads, bytes)
        if not _wordsum.whole_rows(piece.shape[1]) or _wordsum.host_wordsum(piece) != stored:
            raise FragmentError(f"fragment {fragment.path}: wordsums mismatch in {name} (damaged data or metadata)")
