"""What the index keeps per group: a fixed-size record, built in one place for every writer of the index."""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

from vua._kv_layout import Layout

_RECORD = struct.Struct("<QQQIQ")
RECORD_SIZE = _RECORD.size
RECORD_HEAD = 16  # namespace id and layout id: equal for every group of a usable prefix


def namespace_id(namespace: str) -> int:
    return xxhash.xxh3_64_intdigest(namespace.encode("utf-8"))


class GroupRecord(NamedTuple):
    """What a lookup needs about one stored group, without opening its fragment."""

    namespace_id: int
    layout_id: int
    nbytes: int  # size of the fragment file
    group_index: int
    last_used: int  # time.time_ns() of the last put or hit, for LRU eviction

    @classmethod
    def of(cls, namespace: str, layout: Layout, nbytes: int, group_index: int, last_used: int) -> GroupRecord:
        """The record of a group of ``namespace`` and ``layout`` whose fragment file is ``nbytes`` long."""
        return cls(namespace_id(namespace), layout.id, nbytes, group_index, last_used)

    def pack(self) -> bytes:
        return _RECORD.pack(*self)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> GroupRecord | None:
        """Decodes a record; None when the bytes are not one (garbage in the index)."""
        if len(raw) != _RECORD.size:
            return None
        return cls(*_RECORD.unpack(raw))


class StoredGroup(NamedTuple):
    """A group as its fragment describes it: the index record, the layout and the namespace."""

    record: GroupRecord
    layout: Layout
    namespace: str
