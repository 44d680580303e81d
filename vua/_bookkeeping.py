"""What the catalog learns while it answers, written back to the index and the tree.

A lookup finds things out on the way: groups were used (LRU eviction needs to know, so uses
are recorded in batches), groups sit in the tree that the index lacks or misrecords (they
are recorded as their fragments say), groups are damaged (they are moved aside and
forgotten, so the next put writes them afresh). None of it decides what a lookup returns;
all of it is for later lookups, evictions and other nodes. A failure to record is logged,
never raised: the answer it would have improved was already given.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence

from vua import _layout
from vua._index import Index
from vua._kv_layout import Layout
from vua._publish import mark_used, quarantine_group
from vua._record import GroupRecord, StoredGroup
from vua._stored import check_fragment, stored_group
from vua.errors import FragmentError, StorageError

logger = logging.getLogger(__name__)

_TOUCH_FLUSH_SECONDS = 5.0
# A fragment missing on a shared root is forgotten once it has been missing this long: past
# GlusterFS's 42 s ping timeout, so a server that restarts does not cost good groups.
_MISSING_GRACE_SECONDS = 60.0
_MISSING_REMEMBERED = 100_000  # groups seen missing at most (their first sighting each)


class Bookkeeper:
    """Records uses, found groups and healed records of one namespace, and quarantines damaged groups.

    Args:
        root: the fragment root.
        index: the store's index.
        namespace: the namespace whose groups are recorded.
        mac_key: the store's MAC key (None: no MAC), for the second look at damage on a shared root.
        shared: the root is a network or FUSE file system other nodes write (damage is confirmed).
    """

    def __init__(self, root: str, index: Index, *, namespace: str, mac_key: bytes | None, shared: bool):
        self.root = root
        self.index = index
        self.namespace = namespace
        self._mac_key = mac_key
        self.shared = shared
        self._touch_lock = threading.Lock()
        self._pending_touches: dict[bytes, int] = {}  # key -> time of its last use (ns)
        self._last_touch_flush = time.monotonic()
        self._missing_since: dict[bytes, float] = {}  # shared roots: key -> when first found missing

    # -- groups recorded --------------------------------------------------------------------

    def record_put(self, written: Iterable[tuple[bytes, GroupRecord]], layout: Layout, used: Sequence[bytes]) -> None:
        """Records groups a put published, and marks every group it covered used now, in one transaction.

        A prefix is then never older than its suffix, so LRU eviction takes suffixes first.
        """
        self.index.add(written, layouts=[layout], namespaces=[self.namespace], touch=used)
        self.touch(used)  # in the tree too (batched), where rebuilds and other nodes see it

    def record_found(self, found: list[tuple[bytes, StoredGroup]]) -> None:
        """Records groups found in the tree (the index lacked or misrecorded them), as their fragments say."""
        try:
            self.index.add(
                [(key, stored.record) for key, stored in found],
                layouts={stored.layout for _, stored in found},
                namespaces={stored.namespace for _, stored in found},
            )
        except StorageError as exc:  # the data is good; recording it is for next time
            logger.warning("could not record groups found in the tree: %s", exc)

    def heal_records(self, keys: Sequence[bytes]) -> bool:
        """Records what the fragments of ``keys`` are, where their index records named another layout.

        The fragment is the truth: an index copied from another store (or shared by two roots)
        must not get good groups moved aside. Returns True when a record was healed.
        """
        found: list[tuple[bytes, StoredGroup]] = []
        damaged: list[bytes] = []
        for key in keys:
            try:
                stored = stored_group(self.root, key.hex())
            except FragmentError as exc:
                if exc.damaged:
                    damaged.append(key)
                continue
            if stored.namespace == self.namespace:
                found.append((key, stored))
        self.quarantine(damaged)
        if found:
            logger.warning(
                "the index recorded %d groups with another layout than their fragments hold "
                "(an index from another store, or shared by two roots?); recorded them as the fragments say",
                len(found),
            )
            self.record_found(found)
        return bool(found)

    # -- groups taken out -------------------------------------------------------------------

    def quarantine(self, keys: Sequence[bytes]) -> None:
        """Takes damaged groups out of the tree and the index, so the next put rewrites them.

        On a shared (network) root a group is moved aside only when a second, full read
        shows the damage again: another node may have replaced the file under the first
        read, and moving a good group aside would take it from every node.
        """
        confirmed = [key for key in keys if not self.shared or self._still_damaged(key.hex())]
        for key in confirmed:
            quarantine_group(self.root, key.hex())
        self.forget(confirmed)

    def _still_damaged(self, key_hex: str) -> bool:
        try:
            check_fragment(self.root, key_hex, self._mac_key)
        except FragmentError as exc:
            return exc.damaged
        logger.warning("group %s read whole and valid on a second look (replaced meanwhile?); keeping it", key_hex)
        return False

    def forget_missing(self, keys: Sequence[bytes]) -> None:
        """Drops groups whose fragment a lookup found missing; on a shared root, one whose directory is
        still there only once it has been missing for a grace period.

        Eviction (by any node) moves the file aside and removes the group's directory, so a
        directory without its file is a publish in its last step or a file system that
        reports a file as missing for a while: a GlusterFS server restarting answers ENOENT
        for the files on it while the directories, on every server, are still there. A
        record dropped for that would lose the group's last use (LRU order) and cost every
        lookup a tree probe until it is found again. So on a shared root such a group is
        forgotten when it was missing before, ``_MISSING_GRACE_SECONDS`` or more ago; a
        local root, and a group whose directory is gone, are forgotten at once.
        """
        if not self.shared:
            self.forget(keys)
            return
        now = time.monotonic()
        due = []
        with self._touch_lock:
            if len(self._missing_since) > _MISSING_REMEMBERED:
                self._missing_since.clear()  # bounded memory: the grace starts over
            for key in keys:
                first = self._missing_since.setdefault(key, now)
                if now - first >= _MISSING_GRACE_SECONDS or not os.path.isdir(_layout.group_dir(self.root, key.hex())):
                    due.append(key)
                    del self._missing_since[key]
        self.forget(due)

    def forget(self, keys: Sequence[bytes]) -> None:
        """Drops groups from this node's index (their files are gone or moved aside)."""
        if not keys:
            return
        try:
            self.index.remove(keys)
        except StorageError as exc:  # the lookup's fragment checks still catch them
            logger.warning("could not drop groups from the index: %s", exc)

    # -- uses, for LRU eviction -------------------------------------------------------------

    def touch(self, keys: Sequence[bytes]) -> None:
        """Notes a use of a whole prefix now; recorded in the index and the tree in batches."""
        now = time.time_ns()
        with self._touch_lock:
            self._pending_touches.update(dict.fromkeys(keys, now))
            due = time.monotonic() - self._last_touch_flush > _TOUCH_FLUSH_SECONDS
        if due:
            self.flush_touches()

    def flush_touches(self) -> None:
        """Records the uses noted since the last flush, in the index and the tree."""
        with self._touch_lock:
            uses, self._pending_touches = self._pending_touches, {}
            self._last_touch_flush = time.monotonic()
        if not uses:
            return
        try:
            self.index.touch(uses)
        except StorageError as exc:
            # Bookkeeping only: the read that made these uses succeeded, and eviction order
            # is still kept by the tree's record below.
            logger.warning("could not record %d uses in the index: %s", len(uses), exc)
        mark_used(self.root, {key.hex(): used for key, used in uses.items()})
