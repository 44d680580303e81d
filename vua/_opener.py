"""Opening one group's fragment for a query, and checking it is the group the query asked for.

The catalog decides which groups to open; this unit opens one: in the store's read mode
(memory-mapped, or read with pread on a shared root), riding out a file that is not visible
yet, then checking that its header names this group, namespace and layout, that its tokens
are the query's and, with a MAC key, that its MAC verifies. A group that fails is closed
again and its error says why (missing, damaged, unreadable for now, another layout).
"""

from __future__ import annotations

import os
import time

import numpy as np

from vua import _layout
from vua._fragment import Fragment
from vua._index import Index
from vua._kv_layout import TOKENS, Layout
from vua.errors import FragmentError

_MISSING_RETRY_SECONDS = (0.05, 0.1, 0.2)  # a group directory without its file, on a second look and later
_SHARED_MISSING_RETRY_SECONDS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0)  # FUSE caches a lookup for a second
_RECENT_NS = 30 * 10**9  # a group used this recently by this node should exist


class GroupOpener:
    """Opens and checks the fragments of one namespace's groups.

    Args:
        root: the fragment root.
        index: the store's index (how recently a group was used, on a shared root).
        namespace: the namespace the groups must name.
        split_factor: tokens per group.
        mac_key: the store's MAC key; fragments must carry a MAC made with it (None: no MAC).
        shared: the root is a network or FUSE file system other nodes write: fragments are
            read with pread, not mapped, and a missing one is waited for longer.
    """

    def __init__(
        self, root: str, index: Index, *, namespace: str, split_factor: int, mac_key: bytes | None, shared: bool
    ):
        self.root = root
        self.index = index
        self.namespace = namespace
        self._split = split_factor
        self._mac_key = mac_key
        self.shared = shared

    def open_group(
        self, key_hex: str, group_index: int, tokens: np.ndarray, layout: Layout, *, check_mac: bool
    ) -> Fragment:
        """Opens the group with key ``key_hex``, checked as group ``group_index`` of its prompt holding ``tokens``.

        Args:
            tokens: the group's own token ids (int64), as the query has them.
            layout: the layout of the prefix the group belongs to.
            check_mac: verify the MAC here (with a MAC key); False where the caller's copy does.

        Raises:
            FragmentError: see :meth:`open_fragment`; also a header that names another group,
                namespace or layout (:class:`~vua._fragment.OtherLayoutError`), tokens that are
                not the query's, a MAC that does not verify.
        """
        fragment = self.open_fragment(key_hex)
        try:
            fragment.validate(
                key_hex=key_hex,
                namespace=self.namespace,
                split_factor=self._split,
                layout=layout,
                group_index=group_index,
            )
            if bytes(fragment.raw(TOKENS)) != tokens.tobytes():
                raise FragmentError(
                    f"fragment {fragment.path}: stored tokens differ from the query (hash collision or damage)"
                )
            if self._mac_key is not None and check_mac:
                fragment.verify_mac(self._mac_key)
        except FragmentError:
            fragment.close()
            raise
        return fragment

    def open_fragment(self, key_hex: str) -> Fragment:
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
        """Pauses before giving up on a missing fragment file (see :meth:`open_fragment`)."""
        if self.shared:
            (record,) = self.index.records([bytes.fromhex(key_hex)])
            if record is not None and time.time_ns() - record.last_used < _RECENT_NS:
                return _SHARED_MISSING_RETRY_SECONDS
        return _MISSING_RETRY_SECONDS if directory_there else ()

    def sealed(self, key_hex: str, mac_key: bytes) -> bool:
        """Whether a group's fragment carries a well-formed MAC (its header only: the data is checked on reads)."""
        try:
            with Fragment(_layout.fragment_path(self.root, key_hex), mapped=not self.shared) as fragment:
                fragment.start_mac(mac_key)
        except FragmentError:
            return False
        return True
