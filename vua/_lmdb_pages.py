"""An LMDB data file checked page by page with pread before LMDB maps it.

LMDB maps its data file and trusts what it finds there: a truncated file, or a node whose
size or page number was damaged, makes it read past the file's end, and a page fault there
is SIGBUS, which no handler turns into an error. So an index generation is read once,
through pread, from its meta pages' roots to every page they reach, before it is mapped.
"""

from __future__ import annotations

import os
import struct

from vua._files import NotRegularFileError, open_regular_file
from vua.errors import StorageError


class DamagedIndexError(StorageError):
    """The index's files are damaged (a rebuild from the fragment tree replaces them)."""


def check_data_file(path: str) -> None:
    """Refuses an LMDB data file whose size disagrees with its own meta pages, or whose pages
    would make LMDB read past the file's end.

    LMDB maps the file and trusts what it finds there: a truncated file, or a node whose
    size field was damaged, is read past its end, and a page fault there is SIGBUS, not an
    error. Each meta page (pages 0 and 1) holds a magic number, the page size, the last
    page in use, the databases' root pages and a transaction id; LMDB uses the valid one
    with the higher id. From its roots every reachable page is then read once (pread, not
    the map; see :func:`_damaged_page`).

    Raises:
        DamagedIndexError: no valid meta page, the file ends before the last page, or a
            page's contents point outside the page or the file.
    """
    try:
        fd = open_regular_file(path)
    except FileNotFoundError:
        return  # a new generation: LMDB creates it
    except NotRegularFileError as exc:
        raise DamagedIndexError(f"index file {path}: {exc.strerror}") from None
    except OSError as exc:
        raise StorageError(f"cannot read the index file {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if info.st_size == 0:
            return  # created but never written (a crash at creation): LMDB initialises it
        head = os.pread(fd, 2 * _META_PAGE_MAX, 0)
        best = None  # (txn id, last page, page size, root pages)
        for offset in sorted({0, *_META_PAGE_SIZES}):
            if len(head) < offset + _META.size:
                continue
            magic, version, page_size, last_page, txn_id = _META.unpack_from(head, offset)
            if magic != _LMDB_MAGIC or version != 1 or page_size not in _META_PAGE_SIZES:
                continue
            if offset not in (0, page_size):
                continue  # a meta page lies at page 0 or page 1 of the file's own page size
            if best is None or txn_id > best[0]:
                best = (txn_id, last_page, page_size, _META_ROOTS.unpack_from(head, offset))
        if best is None:
            raise DamagedIndexError(f"index file {path} has no valid LMDB meta page")
        _, last_page, page_size, roots = best
        if (last_page + 1) * page_size > info.st_size:
            raise DamagedIndexError(
                f"index file {path} is {info.st_size} bytes but its meta page says {(last_page + 1) * page_size}"
            )
        damage = _damaged_page(fd, roots, last_page + 1, page_size)
        if damage is not None:
            raise DamagedIndexError(f"index file {path}: {damage}")
    finally:
        os.close(fd)


# LMDB's pages (64-bit build): a 16-byte header (page number u64, pad u16, flags u16, then
# for branch and leaf pages the free space's bounds lower/upper u16, for an overflow run its
# page count u32), then u16 offsets of the nodes. A node: lo, hi, flags, key size (u16 each),
# the key, then the data (leaf: its size is lo | hi << 16; branch: the child page is
# lo | hi << 16 | flags << 32). A leaf's big value lives on an overflow run (F_BIGDATA: the
# data is its page number); a named database's record is a leaf of the main one (F_SUBDATA:
# the data is a 48-byte MDB_db whose last u64 is its root).
_PAGE_HEADER = struct.Struct("<QHHHH")
_NODE = struct.Struct("<HHHH")
_P_BRANCH, _P_LEAF, _P_OVERFLOW = 0x01, 0x02, 0x04
_F_BIGDATA, _F_SUBDATA = 0x01, 0x02
_NO_PAGE = 2**64 - 1  # an empty database's root
_DB_RECORD_BYTES = 48
_MAX_DEPTH = 64


def _damaged_page(fd: int, roots: tuple[int, int], pages: int, page_size: int) -> str | None:
    """What in the trees under ``roots`` (the free and main databases) would send LMDB outside
    a page or the file, or None when nothing does.

    Reads each page once, from the file: a node offset, key or value that runs past its
    page, a child or overflow run past the last page, a page that is not what its parent
    says. LMDB itself checks page numbers against the last page when it reads; what it
    does not check (a value's size) is what makes a damaged file a SIGBUS.
    """
    seen: set[int] = set()
    stack = [(root, 0) for root in roots if root != _NO_PAGE]
    while stack:
        pgno, depth = stack.pop()
        if pgno in seen:
            continue
        if not 2 <= pgno < pages or depth > _MAX_DEPTH:
            return f"page {pgno} is outside the file's {pages} pages, or the tree is too deep"
        seen.add(pgno)
        page = os.pread(fd, page_size, pgno * page_size)
        stored, _, flags, lower, upper = _PAGE_HEADER.unpack_from(page)
        if stored != pgno or not flags & (_P_BRANCH | _P_LEAF) or not 16 <= lower <= upper <= page_size:
            return f"page {pgno} is not a tree page (number {stored}, flags {flags:#x})"
        for i in range((lower - 16) // 2):
            (at,) = struct.unpack_from("<H", page, 16 + 2 * i)
            if not upper <= at <= page_size - _NODE.size:
                return f"page {pgno}: node {i} lies outside the page"
            lo, hi, node_flags, key_size = _NODE.unpack_from(page, at)
            data_at = at + _NODE.size + key_size
            if flags & _P_BRANCH:
                if data_at > page_size:
                    return f"page {pgno}: node {i}'s key runs past the page"
                stack.append((lo | hi << 16 | node_flags << 32, depth + 1))
                continue
            size = lo | hi << 16
            if node_flags & _F_BIGDATA:
                if data_at + 8 > page_size:
                    return f"page {pgno}: node {i} runs past the page"
                (first,) = struct.unpack_from("<Q", page, data_at)
                damage = _damaged_overflow(fd, first, size, pages, page_size)
                if damage is not None:
                    return damage
                continue
            if data_at + size > page_size:
                return f"page {pgno}: node {i}'s value ({size} bytes) runs past the page"
            if node_flags & _F_SUBDATA:
                if size != _DB_RECORD_BYTES:
                    return f"page {pgno}: node {i} is a database record of {size} bytes"
                (root,) = struct.unpack_from("<Q", page, data_at + _DB_RECORD_BYTES - 8)
                if root != _NO_PAGE:
                    stack.append((root, depth + 1))
    return None


def _damaged_overflow(fd: int, first: int, size: int, pages: int, page_size: int) -> str | None:
    """What is wrong with a value's overflow run (``size`` bytes from page ``first``), or None."""
    if not 2 <= first < pages:
        return f"overflow page {first} is outside the file's {pages} pages"
    stored, _, flags, count = struct.unpack_from("<QHHI", os.pread(fd, 16, first * page_size))
    if stored != first or not flags & _P_OVERFLOW or first + count > pages or size > count * page_size - 16:
        return f"overflow run at page {first} does not hold its {size}-byte value"
    return None


# An LMDB meta page (64-bit build): a 16-byte page header, then magic and version (u32 each),
# address and map size (8 each), two 48-byte database records (the first one's leading u32
# holds the page size), the last page number and the transaction id (8 each).
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<16xII16xI92xQQ")
_META_ROOTS = struct.Struct("<80xQ40xQ")  # the free and main databases' root pages
_META_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
_META_PAGE_MAX = max(_META_PAGE_SIZES)
