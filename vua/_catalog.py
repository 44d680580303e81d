"""The catalog: which groups of a prompt are usable here, and with what layout.

One unit answers that question for ``get_closest``, ``load``, ``prefix_length`` and ``put``,
from the index first, then the tree (groups another node wrote, index records that
disagree with their fragment), then the fragments themselves, which a ``GroupOpener``
(``_opener``) opens and checks one by one. What it learns on the way (uses for LRU
eviction; groups found in the tree; records healed from their fragments; damaged groups,
moved aside and forgotten) its ``Bookkeeper`` (``_bookkeeping``) writes back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor

import numpy as np

from vua import _layout
from vua._bookkeeping import Bookkeeper
from vua._fragment import Fragment, OtherLayoutError
from vua._index import Index
from vua._kv_layout import Layout
from vua._opener import GroupOpener
from vua._publish import quarantine_group
from vua._record import RECORD_HEAD, GroupRecord, StoredGroup, namespace_id
from vua._stored import read_stored_group
from vua.errors import FragmentError, InvalidInputError

logger = logging.getLogger(__name__)


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
        self._mac_key = mac_key
        self._executor = executor
        self.shared = shared  # a network or FUSE root other nodes write: pread reads, damage confirmed
        self._split = split_factor
        self._opener = GroupOpener(
            root, index, namespace=namespace, split_factor=split_factor, mac_key=mac_key, shared=shared
        )
        self._bookkeeper = Bookkeeper(root, index, namespace=namespace, mac_key=mac_key, shared=shared)

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
            self._bookkeeper.record_found(found)
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

    def open_prefix(
        self,
        keys: list[bytes],
        ids: np.ndarray,
        *,
        check_macs: bool = True,
        first: int = 0,
        one_group_each: bool = False,
    ) -> tuple[list[Fragment], Layout | None]:
        """Opens and validates the fragments of the stored prefix of ``keys`` (token ids ``ids``); cut at the first bad one.

        ``first``: start at this group instead of group 0 (the caller holds the KV before it).
        A group's key chains every token before it, and its fragment holds its own tokens,
        so groups from ``first`` on are checked exactly as in a whole prefix.

        ``one_group_each``: each key is a prompt of one group of its own (an engine's page,
        keyed by the engine), not the next group of one prompt: every fragment must be the
        first group of its prompt, and ``ids`` holds each key's tokens in turn.

        Each fragment's header must name this group, namespace and layout; its stored tokens
        must be the query's; with a MAC key, its MAC must verify (unless ``check_macs`` is
        False: the caller's copy checks them). A group that fails is moved aside when its
        file is damaged. A fragment of another layout than its index record names is not
        damage: the record is healed from the fragment and the prefix looked up once more.

        Returns:
            (open fragments of groups first..n-1, their layout); ([], None) when none is usable.
        """

        def once() -> tuple[list[Fragment], Layout | None, list[bytes]]:
            return self._open_prefix_once(keys, ids, check_macs=check_macs, first=first, one_group_each=one_group_each)

        fragments, layout, misrecorded = once()
        if misrecorded and self._bookkeeper.heal_records(misrecorded):
            for fragment in fragments:
                fragment.close()
            fragments, layout, _ = once()
        return fragments, layout

    def _open_prefix_once(
        self, keys: list[bytes], ids: np.ndarray, *, check_macs: bool, first: int, one_group_each: bool
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

        s = self._split

        def open_group(j: int) -> Fragment | None:
            group = first + j  # in the prompt: its place in ids, and (chained) in the group's header
            tokens = ids[group * s : (group + 1) * s]
            try:
                return self._opener.open_group(
                    keys[j].hex(), 0 if one_group_each else group, tokens, layout, check_mac=check_macs
                )
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
        self._bookkeeper.quarantine(damaged)
        self._bookkeeper.forget_missing(missing)
        cut_by_a_record = len(fragments) < count and keys[len(fragments)] in misrecorded
        return fragments, layout, misrecorded if cut_by_a_record else []

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
                sealed = self._mac_key is None or self._opener.sealed(key.hex(), self._mac_key)
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

    # -- what lookups and puts learn: written back by the bookkeeper ------------------------

    def record_put(self, written: Iterable[tuple[bytes, GroupRecord]], layout: Layout, used: Sequence[bytes]) -> None:
        """Records groups a put published and marks the groups it covered used (:meth:`Bookkeeper.record_put`)."""
        self._bookkeeper.record_put(written, layout, used)

    def quarantine(self, keys: Sequence[bytes]) -> None:
        """Takes damaged groups out of the tree and the index (:meth:`Bookkeeper.quarantine`)."""
        self._bookkeeper.quarantine(keys)

    def touch(self, keys: Sequence[bytes]) -> None:
        """Notes a use of a whole prefix now, recorded in batches (:meth:`Bookkeeper.touch`)."""
        self._bookkeeper.touch(keys)

    def flush_touches(self) -> None:
        """Records the uses noted so far (:meth:`Bookkeeper.flush_touches`)."""
        self._bookkeeper.flush_touches()
