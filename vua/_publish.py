"""Changing the fragment tree: publishing a fragment atomically and durably, recording uses, moving groups aside.

Writing goes through one ``writev`` of the header and the caller's tensor buffers (no
intermediate bytes object), into a temporary directory that is fsynced and renamed into
place: a reader sees a whole fragment or none.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import struct
from collections.abc import Sequence

from vua import _dtypes, _layout
from vua._files import fsync_dir, write_all

HEADER_ALIGN = 4096  # tensor data starts on a block boundary, as direct and GPUDirect reads want


def encode_header(
    metadata: dict[str, str],
    specs: Sequence[tuple[str, str, tuple[int, ...]]],
) -> bytes:
    """Returns the 8-byte length prefix plus the JSON header, padded to HEADER_ALIGN."""
    body: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = _dtypes.ITEMSIZE[dtype]
        for n in shape:
            nbytes *= n
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(body, separators=(",", ":")).encode()
    padded = -(-(8 + len(text)) // HEADER_ALIGN) * HEADER_ALIGN - 8
    return struct.pack("<Q", padded) + text + b" " * (padded - len(text))


def publish_fragment(
    root: str,
    key_hex: str,
    header: bytes,
    buffers: Sequence[memoryview],
    *,
    file_mode: int | None = None,
) -> bool:
    """Writes a fragment durably and atomically under ``root``.

    The file is written into a temporary directory beside its final place, fsynced and
    renamed; the fan-out directory is fsynced afterwards. A group that already exists is
    never rewritten: if another writer published it first, this one removes its temporary
    copy and counts as having succeeded.

    Returns:
        True if this call published the group, False if it already existed.

    Raises:
        OSError: the file system refused (ENOSPC, EACCES, ...); nothing partial is left.
    """
    final = _layout.group_dir(root, key_hex)
    if os.path.isdir(final):
        return False
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{_layout.TMP_PREFIX}{key_hex}-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        # 0o666 lets the umask decide, as for any file a program creates; file_mode overrides.
        fd = os.open(os.path.join(tmp, _layout.FRAGMENT_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            if file_mode is not None:
                os.fchmod(fd, file_mode)
            write_all(fd, [memoryview(header), *buffers])
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                shutil.rmtree(tmp, ignore_errors=True)  # first writer won; same bytes by construction
                return False
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return True


def mark_used(root: str, uses: dict[str, int]) -> None:
    """Records uses in the tree: each group directory's mtime becomes its last use (key hex -> ns).

    The tree is the truth, and it is what every node sharing a root sees, so a rebuilt
    index (and eviction anywhere) keeps the LRU order. Best effort: a group evicted
    meanwhile, or a read-only root, is skipped.
    """
    for key_hex, used_ns in uses.items():
        try:
            os.utime(_layout.group_dir(root, key_hex), ns=(used_ns, used_ns))
        except OSError:
            pass


def move_group_aside(root: str, key_hex: str, why: str) -> str | None:
    """Renames a group's directory out of its place, atomically, to a temporary name saying ``why``.

    Readers that already mapped its fragment keep working; later lookups no longer find it.

    Returns:
        The new path, or None when the group was gone already (moved by another process)
        or the root may not be changed by this process.
    """
    final = _layout.group_dir(root, key_hex)
    target = os.path.join(
        os.path.dirname(final), f"{_layout.TMP_PREFIX}{key_hex}-{why}-{os.getpid()}-{secrets.token_hex(4)}"
    )
    try:
        os.rename(final, target)
    except OSError:
        return None
    return target


def quarantine_group(root: str, key_hex: str) -> bool:
    """Moves a damaged group out of the way, so a later put can rewrite it.

    ``vua verify --fix`` removes the moved directory once it is old.

    Returns:
        True if this call moved it (when it did not, the read is cut either way).
    """
    return move_group_aside(root, key_hex, "damaged") is not None
