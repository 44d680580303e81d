"""The catalog: which groups of a prompt are usable here, and with what layout.

One unit answers that question for ``get_closest``, ``load``, ``prefix_length`` and ``put``,
from the index first, then the tree (groups another node wrote, index records that
disagree with their fragment), then the fragments themselves (open and validate). It also
keeps the store's bookkeeping of what it learnt: uses for LRU eviction, batched; groups
found in the tree, recorded; damaged groups, moved aside and forgotten.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor

import numpy as np

from vua import _layout
from vua._fragment import Fragment, OtherLayoutError
from vua._index import Index
from vua._kv_layout import TOKENS, Layout
from vua._publish import mark_used, quarantine_group
from vua._record import RECORD_HEAD, GroupRecord, StoredGroup, namespace_id
from vua._stored import check_fragment, read_stored_group, stored_group
from vua.errors import FragmentError, InvalidInputError, StorageError

logger = logging.getLogger(__name__)

_TOUCH_FLUSH_SECONDS = 5.0
_MISSING_RETRY_SECONDS = (0.05, 0.1, 0.2)  # a group directory without its file, on a second look and later
_SHARED_MISSING_RETRY_SECONDS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)  # FUSE caches a lookup for a second
_RECENT_NS = 30 * 10**9  # a group used this recently by this node should exist


class Catalog:
    """The groups of one namespace in a store: the index, the fragment tree and the fragments.

    Args:
        root: the fragment root.
        index: the store's index.
        namespace: the namespace whose groups count.
        split_factor: tokens per group.
        mac_key: the store's MAC key; fragments must carry a MAC made with it (None: no MAC).
        executor: where fragments are opened in parallel (a callable, since it is rebuilt after a fork).
        shared: the root is a network or FUSE file system other nodes write (see ``VUAConfig.network_fs``).
    """

    def __init__(
        self,
        root: str,
        index: Index,
        *,
        namespace: str,
        split_factor: int,
        mac_key: bytes | None,
        executor: Callable[[], Executor],
        shared: bool = False,
    ):
        self.root = root
        self.index = index
        self.namespace = namespace
        self._ns_id = namespace_id(namespace)
        self._split = split_factor
        self._mac_key = mac_key
        self._executor = executor
        self.shared = shared  # a network or FUSE root other nodes write: pread reads, damage confirmed
        self._touch_lock = threading.Lock()
        self._pending_touches: dict[bytes, int] = {}  # key -> time of its last use (ns)
        self._last_touch_flush = time.monotonic()

    # -- which groups are usable ------------------------------------------------------------

    def usable_groups(self, keys: list[bytes], *, read_headers: bool = True) -> tuple[int, int]:
        """How many leading groups of ``keys`` are stored for this namespace in one layout, and its id.

        The index answers first. Past its usable run the tree decides: a group the index lacks
        but the tree holds (another node may have written it) and a record that disagrees
        with the prefix (another namespace or layout) are checked against their fragment's
        header, and recorded for next time when the fragment fits. Without ``read_headers``
        (schedulers that must not read files) a fragment file the index lacks counts as
        stored, and a disagreeing record ends the run.

        Returns:
            (groups, layout id); (0, 0) when none is stored.
        """
        packed = self.index.lookup_prefix(keys)
        count, layout_id = self._usable_run(packed)
        found: list[tuple[bytes, StoredGroup]] = []  # groups the index lacked or misrecorded
        while count < len(keys):
            key_hex = keys[count].hex()
            indexed = count < len(packed)
            if not indexed and not os.path.lexists(_layout.fragment_path(self.root, key_hex)):
                break
            if not read_headers:
                if indexed:
                    break  # a disagreeing record: only the fragment can tell
                count += 1
                continue
            stored = read_stored_group(self.root, key_hex)
            if stored is None or stored.namespace != self.namespace or (count and stored.layout.id != layout_id):
                break
            found.append((keys[count], stored))
            if indexed:  # the healed record may join the run to the records after it
                packed[count] = stored.record.pack()
                count, layout_id = self._usable_run(packed)
            else:
                packed.append(stored.record.pack())
                count, layout_id = count + 1, layout_id if count else stored.layout.id
        if found:
            logger.debug("found %d groups in the tree that the index lacked or misrecorded", len(found))
            self._record_found(found)
        return count, layout_id

    def _usable_run(self, packed: list[bytes]) -> tuple[int, int]:
        """The leading records of this namespace sharing the first one's layout: (count, layout id)."""
        first = GroupRecord.unpack(packed[0]) if packed else None
        if first is None or first.namespace_id != self._ns_id:
            return 0, 0
        head = packed[0][:RECORD_HEAD]
        groups = 0
        for raw in packed:  # a group of another layout ends the usable prefix
            if raw[:RECORD_HEAD] != head:
                break
            groups += 1
        return groups, first.layout_id

    def _record_found(self, found: list[tuple[bytes, StoredGroup]]) -> None:
        try:
            self.index.add(
                [(key, stored.record) for key, stored in found],
                layouts={stored.layout for _, stored in found},
                namespaces={stored.namespace for _, stored in found},
            )
        except StorageError as exc:  # the data is good; recording it is for next time
            logger.warning("could not record groups found in the tree: %s", exc)

    def open_prefix(
        self, keys: list[bytes], ids: np.ndarray, *, check_macs: bool = True, first: int = 0
    ) -> tuple[list[Fragment], Layout | None]:
        """Opens and validates the fragments of the stored prefix of ``keys`` (token ids ``ids``); cut at the first bad one.

        ``first``: start at this group instead of group 0 (the caller holds the KV before it).
        A group's key chains every token before it, and its fragment holds its own tokens,
        so groups from ``first`` on are checked exactly as in a whole prefix.

        Each fragment's header must name this group, namespace and layout; its stored tokens
        must be the query's; with a MAC key, its MAC must verify (unless ``check_macs`` is
        False: the caller's copy checks them). A group that fails is moved aside when its
        file is damaged. A fragment of another layout than its index record names is not
        damage: the record is healed from the fragment and the prefix looked up once more.

        Returns:
            (open fragments of groups first..n-1, their layout); ([], None) when none is usable.
        """
        fragments, layout, misrecorded = self._open_prefix_once(keys, ids, check_macs=check_macs, first=first)
        if misrecorded and self._heal_records(misrecorded):
            for fragment in fragments:
                fragment.close()
            fragments, layout, _ = self._open_prefix_once(keys, ids, check_macs=check_macs, first=first)
        return fragments, layout

    def _open_prefix_once(
        self, keys: list[bytes], ids: np.ndarray, *, check_macs: bool, first: int
    ) -> tuple[list[Fragment], Layout | None, list[bytes]]:
        """:meth:`open_prefix` from the index as it is: also the groups whose fragment named another
        layout than their record, when one of them cut the prefix."""
        keys = keys[first:]  # from here on, group j of this list is group first + j of the prompt
        count, layout_id = self.usable_groups(keys)
        if not count:
            return [], None, []
        layout = self.index.layout(layout_id)
        if layout is None:  # the index lost its layout entry: take it from the first fragment
            stored = read_stored_group(self.root, keys[0].hex())
            if stored is None:
                return [], None, []
            layout = stored.layout
        damaged: list[bytes] = []
        missing: list[bytes] = []
        misrecorded: list[bytes] = []

        def open_group(j: int) -> Fragment | None:
            try:
                return self._open_group(keys[j].hex(), first + j, layout, ids, check_mac=check_macs)
            except OtherLayoutError as exc:
                logger.debug("group %d names another layout than its index record: %s", first + j, exc)
                misrecorded.append(keys[j])
                return None
            except FragmentError as exc:
                logger.warning("stored prefix ends before group %d: %s", first + j, exc)
                if exc.damaged:
                    damaged.append(keys[j])
                elif exc.missing:
                    missing.append(keys[j])
                return None

        opened = (
            list(self._executor().map(open_group, range(count))) if count > 4 else [open_group(j) for j in range(count)]
        )
        fragments: list[Fragment] = []
        for fragment in opened:
            if fragment is None:
                break
            fragments.append(fragment)
        for fragment in opened[len(fragments) :]:
            if fragment is not None:
                fragment.close()
        self.quarantine(damaged)
        self._forget(missing)
        cut_by_a_record = len(fragments) < count and keys[len(fragments)] in misrecorded
        return fragments, layout, misrecorded if cut_by_a_record else []

    def _heal_records(self, keys: Sequence[bytes]) -> bool:
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
            self._record_found(found)
        return bool(found)

    def _open_group(self, key_hex: str, j: int, layout: Layout, ids: np.ndarray, *, check_mac: bool) -> Fragment:
        s = self._split
        fragment = self._open_fragment(key_hex)
        try:
            fragment.validate(key_hex=key_hex, namespace=self.namespace, split_factor=s, layout=layout, group_index=j)
            if bytes(fragment.raw(TOKENS)) != ids[j * s : (j + 1) * s].tobytes():
                raise FragmentError(
                    f"fragment {fragment.path}: stored tokens differ from the query (hash collision or damage)"
                )
            if self._mac_key is not None and check_mac:
                fragment.verify_mac(self._mac_key)
        except FragmentError:
            fragment.close()
            raise
        return fragment

    def _open_fragment(self, key_hex: str) -> Fragment:
        """Opens a group's fragment, riding out a file that is not visible yet.

        A group directory without its file is a publish in its last step (the directory is
        made just before the file is linked in), so a few short retries tell. On a shared
        root a group this node put or read moments ago can also look missing for a while
        (GlusterFS heals a directory two nodes made at once on a later lookup), so there the
        retries run longer for a group its index saw used recently. Still missing then, the
        group ends the prefix as missing, not damaged: the next put publishes it again.

        Raises:
            FragmentError: ``missing`` when there is no file; ``damaged`` when something
                else stands in its place.
        """
        path = _layout.fragment_path(self.root, key_hex)
        pauses: tuple[float, ...] | None = None
        while True:
            try:
                return Fragment(path, mapped=not self.shared)
            except FragmentError as exc:
                if not exc.missing:
                    raise
                if pauses is None:
                    pauses = self._missing_retries(key_hex, os.path.isdir(os.path.dirname(path)))
                if not pauses:
                    raise
                time.sleep(pauses[0])
                pauses = pauses[1:]

    def _missing_retries(self, key_hex: str, directory_there: bool) -> tuple[float, ...]:
        """Pauses before giving up on a missing fragment file (see :meth:`_open_fragment`)."""
        if self.shared:
            (record,) = self.index.records([bytes.fromhex(key_hex)])
            if record is not None and time.time_ns() - record.last_used < _RECENT_NS:
                return _SHARED_MISSING_RETRY_SECONDS
        return _MISSING_RETRY_SECONDS if directory_there else ()

    def stored_for_put(self, keys: list[bytes], layout: Layout) -> list[bool]:
        """Which of ``keys`` are stored with this namespace and ``layout``, so a put may skip them.

        An index record of another namespace or layout is checked against its fragment, which
        decides. A fragment of this namespace and layout stays (the put rewrites the record).
        One of this namespace in another layout refuses the put: two models (or dtypes)
        sharing a namespace by mistake would otherwise replace each other's groups, one by
        one. Anything else (damaged; another namespace's, which only damage or a hash
        collision makes) is moved aside, so the put publishes the group afresh.

        With a MAC key, a group without a MAC (written before ``auth_key`` was set) is moved
        aside and written again, sealed: readers with the key would refuse it.

        Raises:
            InvalidInputError: this namespace holds one of these groups in another layout
                (checked before anything is written).
        """
        present = []
        for g, (key, record) in enumerate(zip(keys, self.index.records(keys))):
            if record is None:
                present.append(False)
                continue
            if record.namespace_id == self._ns_id and record.layout_id == layout.id:
                sealed = self._mac_key is None or self._sealed(key.hex(), self._mac_key)
                if not sealed:
                    logger.warning("group %s has no MAC and this store requires one; writing it again", key.hex())
                    quarantine_group(self.root, key.hex())
                present.append(sealed)
                continue
            stored = read_stored_group(self.root, key.hex())
            if stored is not None and stored.namespace == self.namespace and stored.layout != layout:
                raise InvalidInputError(
                    f"namespace {self.namespace!r} holds group {g} of this prompt as {stored.layout.describe()}, "
                    f"and this put's KV is {layout.describe()}: a namespace holds one model's KV in one dtype. "
                    "Give each model and dtype its own namespace (e.g. VUAConfig(namespace='llama-3.1-8b/bf16')); "
                    "nothing was written"
                )
            if stored is None or stored.namespace != self.namespace:
                logger.warning("group %s holds another namespace than its index record; replacing it", key.hex())
                quarantine_group(self.root, key.hex())
            present.append(False)
        return present

    def _sealed(self, key_hex: str, mac_key: bytes) -> bool:
        """Whether a group's fragment carries a well-formed MAC (its header only: the data is checked on reads)."""
        try:
            with Fragment(_layout.fragment_path(self.root, key_hex), mapped=not self.shared) as fragment:
                fragment.start_mac(mac_key)
        except FragmentError:
            return False
        return True

    def record_put(self, written: Iterable[tuple[bytes, GroupRecord]], layout: Layout, used: Sequence[bytes]) -> None:
        """Records groups a put published, and marks every group it covered used now, in one transaction.

        A prefix is then never older than its suffix, so LRU eviction takes suffixes first.
        """
        self.index.add(written, layouts=[layout], namespaces=[self.namespace], touch=used)
        self.touch(used)  # in the tree too (batched), where rebuilds and other nodes see it

    # -- bookkeeping ------------------------------------------------------------------------

    def quarantine(self, keys: Sequence[bytes]) -> None:
        """Takes damaged groups out of the tree and the index, so the next put rewrites them.

        On a shared (network) root a group is moved aside only when a second, full read
        shows the damage again: another node may have replaced the file under the first
        read, and moving a good group aside would take it from every node.
        """
        confirmed = [key for key in keys if not self.shared or self._still_damaged(key.hex())]
        for key in confirmed:
            quarantine_group(self.root, key.hex())
        self._forget(confirmed)

    def _still_damaged(self, key_hex: str) -> bool:
        try:
            check_fragment(self.root, key_hex, self._mac_key)
        except FragmentError as exc:
            return exc.damaged
        logger.warning("group %s read whole and valid on a second look (replaced meanwhile?); keeping it", key_hex)
        return False

    def _forget(self, keys: Sequence[bytes]) -> None:
        """Drops groups from this node's index (their files are gone or moved aside)."""
        if not keys:
            return
        try:
            self.index.remove(keys)
        except StorageError as exc:  # the lookup's fragment checks still catch them
            logger.warning("could not drop groups from the index: %s", exc)

    def touch(self, keys: Sequence[bytes]) -> None:
        """Notes a use of a whole prefix now; recorded in the index and the tree in batches."""
        now = time.time_ns()
        with self._touch_lock:
            self._pending_touches.update(dict.fromkeys(keys, now))
            due = time.monotonic() - self._last_touch_flush > _TOUCH_FLUSH_SECONDS
        if due:
            self.flush_touches()

    def flush_touches(self) -> None:
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
