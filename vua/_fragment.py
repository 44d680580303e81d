"""Fragment files: one group's tokens and K/V slices, in the safetensors format.

A fragment is an ordinary safetensors file, so ``safetensors.safe_open`` reads it:

    tokens              int64 [split_factor]
    layers.{i}.key      dtype [kv_heads, split_factor, head_dim]
    layers.{i}.value    dtype [kv_heads, split_factor, head_dim]
    __metadata__        format, version, namespace, key, parent, group_index,
                        split_factor, layout (JSON), per-tensor xxh3-64 checksums,
                        and, where the writer stored them, wordsums: per K and V
                        tensor a sum that a GPU checks (see _wordsum). Files from
                        before 2026-11-28 carry kv_checksum (xxh3-64 over all K and
                        V bytes) too, which `vua verify` checks; reads need only the
                        per-tensor sums.

The header is padded with spaces (which the format allows) so tensor data starts on a
4 KiB boundary, as direct and GPUDirect reads want.

Writing goes through one ``writev`` of the header and the caller's tensor buffers (no
intermediate bytes object), into a temporary directory that is fsynced and renamed into
place: a reader sees a whole fragment or none. Reading memory-maps the file and validates
the header completely before any tensor is looked at.
"""

from __future__ import annotations

import errno
import hmac
import json
import mmap
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from vua import _dtypes, _layout, _wordsum
from vua.errors import FragmentError, missing_extra

if TYPE_CHECKING:
    import torch

FORMAT = "vua.fragment"
FORMAT_VERSION = "1"
HEADER_ALIGN = 4096
MAX_HEADER_BYTES = 16 << 20  # a 1000-layer model's header is far below this
_IOV_MAX = 1024  # Linux's limit on buffers per writev call

TOKENS = "tokens"

_BITS_BY_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _loads(text: str | bytes) -> object:
    """``json.loads`` for text read from a fragment: hostile nesting is a ValueError, like any malformed JSON.

    A header of 100k ``[`` makes the parser recurse past Python's limit; that is damage,
    not a reason to fail the caller.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _is_size(value: object) -> bool:
    """A non-negative JSON integer (``true`` is a bool in JSON, not a size, though Python calls it an int)."""
    return type(value) is int and value >= 0


def bits_dtype(itemsize: int) -> type[np.generic]:
    """The numpy integer type ``itemsize`` bytes wide: the carrier for copying a dtype's bit patterns."""
    return _BITS_BY_SIZE[itemsize]


def as_bits(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor's bit patterns (see :func:`bits_dtype`)."""
    import torch

    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(carrier).numpy()


def key_name(layer: int) -> str:
    return f"layers.{layer}.key"


def value_name(layer: int) -> str:
    return f"layers.{layer}.value"


@dataclass(frozen=True)
class Layout:
    """The shape of one group's KV: a dtype and each layer's (heads, head_dim) for K and V.

    Every group of a stored prefix must share one layout; its JSON form is written in each
    fragment and its 64-bit id in each index record, so a lookup can tell without reading
    files whether groups fit together.
    """

    dtype_name: str  # safetensors' name: "BF16", "F32", ...
    layers: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    @classmethod
    def of(cls, dtype: torch.dtype, layers: tuple[tuple[tuple[int, int], tuple[int, int]], ...]) -> Layout:
        """The layout of KV in ``dtype`` (one safetensors can store) with per-layer (heads, head_dim)."""
        name = _dtypes.name_of(dtype)
        if name is None:
            raise ValueError(f"safetensors cannot store {dtype}")
        return cls(name, layers)

    @property
    def dtype(self) -> torch.dtype:
        return _dtypes.to_torch(self.dtype_name)

    @cached_property
    def json(self) -> str:
        body = {"dtype": self.dtype_name, "layers": [list(map(list, kv)) for kv in self.layers]}
        return json.dumps(body, separators=(",", ":"))

    @cached_property
    def id(self) -> int:
        return xxhash.xxh3_64_intdigest(self.json.encode())

    @classmethod
    def from_json(cls, text: str) -> Layout:
        """Parses a layout written by :attr:`json`; raises FragmentError when malformed."""
        try:
            body = _loads(text)
            dtype = body["dtype"]
            if dtype not in _dtypes.ITEMSIZE:
                raise ValueError(f"unknown dtype {dtype!r}")
            layers = tuple(((k[0], k[1]), (v[0], v[1])) for k, v in body["layers"])
            if not all(_is_size(n) for kv in layers for shape in kv for n in shape):
                raise ValueError("a dimension is not a non-negative integer")
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise FragmentError(f"malformed layout {text[:80]!r}: {exc}") from None
        if not layers or any(n <= 0 for kv in layers for shape in kv for n in shape):
            raise FragmentError(f"layout {text[:80]!r} has no layers or an empty dimension")
        return cls(dtype, layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tensor_specs(self, split_factor: int) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, safetensors dtype name, shape) of every tensor of a fragment, in file order."""
        specs = [(TOKENS, "I64", (split_factor,))]
        for i, ((kh, kd), (vh, vd)) in enumerate(self.layers):
            specs.append((key_name(i), self.dtype_name, (kh, split_factor, kd)))
            specs.append((value_name(i), self.dtype_name, (vh, split_factor, vd)))
        return specs

    def kv_bytes(self, split_factor: int) -> int:
        """Bytes of K and V data in one group (tokens excluded)."""
        elems = sum(kh * kd + vh * vd for (kh, kd), (vh, vd) in self.layers)
        return elems * split_factor * _dtypes.ITEMSIZE[self.dtype_name]


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


def _writev_all(fd: int, buffers: Sequence[memoryview]) -> None:
    """Writes every buffer, in order, retrying short writes."""
    pending = [b for b in buffers if len(b)]
    while pending:
        batch = pending[:_IOV_MAX]
        written = os.writev(fd, batch)
        consumed = 0
        for buf in batch:
            if written >= len(buf):
                written -= len(buf)
                consumed += 1
            else:
                pending[consumed] = buf[written:]
                break
        del pending[:consumed]


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            _writev_all(fd, [memoryview(header), *buffers])
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


class NotRegularFileError(OSError):
    """A path holds something else than a regular file (a directory, a FIFO, a device)."""


def open_regular_file(path: str) -> int:
    """Opens ``path`` read-only, never blocking, and only if it is a regular file.

    O_NONBLOCK keeps a FIFO in a file's place from blocking the open; the fstat turns away
    anything that is not a regular file. Used for every file VUA reads that someone else
    could have replaced: fragments, the index's CURRENT and data file.

    Raises:
        NotRegularFileError: something else stands at ``path``.
        OSError: the open or fstat failed (FileNotFoundError, PermissionError, EIO, ...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"not a regular file (mode {stat.filemode(mode)})", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str) -> int:
    """Opens a fragment for reading (see :func:`open_regular_file`).

    Raises:
        FragmentError: with ``damaged`` True when the path holds no regular file for good
            (missing, or something else than a file); False for errors that may pass
            (EIO, ESTALE, EACCES), so the group stays.
    """
    try:
        return open_regular_file(path)
    except OSError as exc:
        error = FragmentError(f"cannot open fragment {path}: {exc.strerror}")
        error.damaged = isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, NotRegularFileError))
        raise error from None


# Authenticated fragments (VUAConfig.auth_key): the metadata's "mac" is keyed BLAKE3 over
# the whole file as written, with the MAC's own 64 hex digits read as zeros. Keyed BLAKE3 is
# a MAC by design, and its 32-byte key comes from the store's secret through BLAKE3's own
# key derivation mode, so no construction of our own is involved. BLAKE3 runs at about
# memcpy's speed per core (AVX2/AVX-512) and releases the GIL, so groups verify in parallel.
MAC_FIELD = "mac"
MAC_PLACEHOLDER = "0" * 64
_MAC_CONTEXT = "vua.fragment 2026-11-28 MAC key"


def _mac_marker(value: str) -> bytes:
    return f'"{MAC_FIELD}":"{value}"'.encode()


def mac_key(secret: bytes) -> bytes:
    """The 32-byte BLAKE3 key of a store's secret (BLAKE3's key derivation mode).

    Raises:
        ImportError: blake3 is not installed (the ``auth`` extra).
    """
    try:
        import blake3
    except ImportError as exc:
        raise missing_extra("VUAConfig(auth_key=...)", "blake3", "auth", exc) from exc
    return blake3.blake3(secret, derive_key_context=_MAC_CONTEXT).digest()


def fragment_mac(key: bytes, header: bytes, data: Sequence[memoryview | bytes | np.ndarray]) -> str:
    """Keyed BLAKE3-256 of a fragment: its header (MAC digits zeroed) and every data byte, in file order."""
    import blake3

    mac = blake3.blake3(key=key)
    mac.update(header)
    for buffer in data:
        mac.update(buffer)
    return mac.hexdigest()


def seal_header(header: bytes, key: bytes, buffers: Sequence[memoryview]) -> bytes:
    """Writes the MAC into a header encoded with ``MAC_PLACEHOLDER`` as its "mac" (same length)."""
    placeholder = _mac_marker(MAC_PLACEHOLDER)
    if header.count(placeholder) != 1:
        raise ValueError("header has no unique MAC placeholder")
    return header.replace(placeholder, _mac_marker(fragment_mac(key, header, buffers)))


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a fragment file (absolute byte offsets)."""

    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    begin: int
    end: int


class Fragment:
    """An open fragment: memory-mapped, its header fully validated, tensors as zero-copy views.

    Use as a context manager. Views handed out by :meth:`tensor` must be dropped before
    the fragment closes.

    Raises:
        FragmentError: the file is missing, truncated, or its header is malformed.
    """

    def __init__(self, path: str):
        self.path = path
        fd = open_regular(path)
        try:
            self.file_size = os.fstat(fd).st_size
            if self.file_size < 8:
                raise FragmentError(f"fragment {path} is truncated ({self.file_size} bytes)")
            # Read-only and shared: the pages are the page cache's own, nothing is copied.
            # Pages are mapped as the copy touches them; prefetch() starts disk reads early.
            try:
                self._map = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            except (OSError, ValueError) as exc:
                error = FragmentError(f"cannot map fragment {path}: {exc}")
                error.damaged = False  # the file system's refusal, not the file's bytes
                raise error from None
        finally:
            os.close(fd)  # a get may hold hundreds of fragments: the mapping needs no descriptor
        try:
            self.metadata, self.tensors, self.data_start = _parse_header(self._map, self.file_size, path)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Fragment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.__dict__.pop("layers", None)
        self.__dict__.pop("_region", None)
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes when the last one does

    def prefetch(self) -> None:
        """Asks the kernel to start reading the whole file in the background (cold reads)."""
        self._map.madvise(mmap.MADV_WILLNEED)

    def read_kv_into(self, dest: memoryview, offset: int = 0) -> None:
        """Reads K and V bytes (file order) from ``offset`` on into ``dest`` with one ``preadv``.

        The kernel copies from the page cache straight into ``dest`` (pinned staging, say),
        without mapping the pages into this process first.

        Raises:
            FragmentError: the file is shorter than its header says.
        """
        begin = self.kv_range[0] + offset
        fd = open_regular(self.path)  # a file replaced since fails the checksum
        try:
            got = 0
            while got < len(dest):
                n = os.preadv(fd, [dest[got:]], begin + got)
                if n == 0:
                    raise FragmentError(f"fragment {self.path} ended early while reading its data")
                got += n
        finally:
            os.close(fd)

    def kv_offsets(self) -> list[tuple[str, int, int]]:
        """(name, begin, end) of every K and V tensor, relative to the first K."""
        base = self.tensors[key_name(0)].begin
        return [(name, e.begin - base, e.end - base) for name, e in self.tensors.items() if name != TOKENS]

    @cached_property
    def _region(self) -> np.ndarray:
        return np.frombuffer(self._map, dtype=np.uint8)  # read-only, zero-copy

    def raw(self, name: str) -> memoryview:
        entry = self.tensors[name]
        return memoryview(self._map)[entry.begin : entry.end]

    def array(self, name: str) -> np.ndarray:
        """A read-only, zero-copy numpy view of one stored tensor's bytes, as same-width integers.

        numpy has no bf16 or fp8, and a copy needs only the bit patterns; numpy's copies
        also release the GIL, so several threads copy at once.
        """
        entry = self.tensors[name]
        return (
            self._region[entry.begin : entry.end].view(bits_dtype(_dtypes.ITEMSIZE[entry.dtype])).reshape(entry.shape)
        )

    @cached_property
    def layers(self) -> list[tuple[np.ndarray, np.ndarray, int | None, int | None]]:
        """Per layer: (K bits, V bits, K checksum, V checksum), built once per fragment.

        The read path touches every tensor of every layer; building the views in one pass
        keeps the Python work per tensor (run under the GIL) to a minimum.
        """
        sums = self.checksums
        out = []
        i = 0
        while key_name(i) in self.tensors:
            k, v = key_name(i), value_name(i)
            out.append((self.array(k), self.array(v), sums.get(k), sums.get(v)))
            i += 1
        return out

    def kv_block(self) -> np.ndarray:
        """All K and V data as one (layers, 2, heads, split, dim) integer view.

        Only for layouts whose every K and V share one shape.
        """
        first = self.tensors[key_name(0)]
        kh, split, kd = first.shape
        begin, end = self.kv_range
        data = self._region[begin:end].view(bits_dtype(_dtypes.ITEMSIZE[first.dtype]))
        try:
            return data.reshape(len(self.kv_names) // 2, 2, kh, split, kd)
        except ValueError:
            raise FragmentError(f"fragment {self.path}: K and V are not all one shape") from None

    @cached_property
    def kv_names(self) -> list[str]:
        """Every K and V tensor's name in file order: K0, V0, K1, V1, ..."""
        layers = (len(self.tensors) - 1) // 2  # the tokens, then a K and a V per layer
        return [name for i in range(layers) for name in (key_name(i), value_name(i))]

    @cached_property
    def kv_range(self) -> tuple[int, int]:
        """File offsets ``[begin, end)`` of all K and V bytes: every layer's K then V, after the tokens."""
        return self.tensors[self.kv_names[0]].begin, self.tensors[self.kv_names[-1]].end

    @cached_property
    def wordsums(self) -> list[int] | None:
        """The stored GPU-checkable sums of every K and V tensor, in file order (K0, V0, K1, ...).

        None where the writer stored none.

        Raises:
            FragmentError: the stored values are malformed or incomplete.
        """
        raw = self.metadata.get("wordsums")
        if raw is None:
            return None
        try:
            stored = _loads(raw)
            return [int(stored[name], 16) for name in self.kv_names]
        except (KeyError, ValueError, TypeError) as exc:
            raise FragmentError(f"fragment {self.path}: malformed wordsums ({exc})") from None

    def verify_group_sums(self) -> None:
        """Checks the sums over K and V bytes beyond the per-tensor xxh3 (wordsums, kv_checksum).

        Raises:
            FragmentError: a sum does not match (damaged data or metadata).
        """
        begin, end = self.kv_range
        expected = self.metadata.get("kv_checksum")
        if expected is not None and xxhash.xxh3_64_hexdigest(self._region[begin:end]) != expected:
            raise FragmentError(f"fragment {self.path}: kv_checksum mismatch (damaged data or metadata)")
        sums = self.wordsums
        if sums is None:
            return
        for name, stored in zip(self.kv_names, sums):
            entry = self.tensors[name]
            heads = entry.shape[0]
            piece = self._region[entry.begin : entry.end].reshape(heads, -1)
            if not _wordsum.whole_rows(piece.shape[1]) or _wordsum.host_wordsum(piece) != stored:
                raise FragmentError(f"fragment {self.path}: wordsums mismatch in {name} (damaged data or metadata)")

    def tensor(self, name: str) -> torch.Tensor:
        """A copy of one stored tensor (for tools and tests; the read path uses :meth:`array`)."""
        import torch

        entry = self.tensors[name]
        return torch.from_numpy(self.array(name).copy()).view(_dtypes.to_torch(entry.dtype))

    @cached_property
    def checksums(self) -> dict[str, int]:
        try:
            return {name: int(h, 16) for name, h in _loads(self.metadata["checksums"]).items()}
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise FragmentError(f"fragment {self.path} has no valid checksums: {exc}") from None

    def verify_mac(self, key: bytes) -> None:
        """Checks the fragment's keyed MAC: only a writer holding the store's secret could have made it.

        Args:
            key: :func:`mac_key` of the store's secret.

        Raises:
            FragmentError: no MAC, or one that does not verify (forged, damaged, or written
                with another key).
        """
        stored = self.metadata.get(MAC_FIELD)
        if not isinstance(stored, str) or len(stored) != 64 or stored.strip("0123456789abcdef"):
            raise FragmentError(f"fragment {self.path} has no MAC, and this store requires one (auth_key)")
        header = self._map[: self.data_start]
        if header.count(_mac_marker(stored)) != 1:
            raise FragmentError(f"fragment {self.path}: MAC field is not where a writer puts it")
        blank = header.replace(_mac_marker(stored), _mac_marker(MAC_PLACEHOLDER))
        data = memoryview(self._map)[self.data_start :]
        try:
            expected = fragment_mac(key, blank, [data])
        finally:
            data.release()
        if not hmac.compare_digest(expected, stored):
            raise FragmentError(f"fragment {self.path}: MAC does not verify (forged, damaged, or another auth_key)")

    def verify_checksum(self, name: str, data: memoryview | np.ndarray | None = None) -> None:
        """Checks one tensor's bytes (``data``, else the file's) against the stored checksum."""
        actual = xxhash.xxh3_64_intdigest(self.raw(name) if data is None else data)
        if actual != self.checksums.get(name):
            raise FragmentError(f"fragment {self.path}: checksum mismatch in {name} (damaged data)")

    def validate(
        self, *, key_hex: str, namespace: str, split_factor: int, layout: Layout | None, group_index: int | None = None
    ) -> Layout:
        """Checks that this fragment is group ``key_hex`` of ``namespace`` with the given layout.

        Returns the fragment's layout (``layout`` itself when one was given).

        Raises:
            FragmentError: any field disagrees.
        """
        meta = self.metadata
        expected = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "namespace": namespace,
            "key": key_hex,
            "split_factor": str(split_factor),
        }
        if group_index is not None:
            expected["group_index"] = str(group_index)
        for field, value in expected.items():
            if meta.get(field) != value:
                raise FragmentError(f"fragment {self.path}: metadata {field}={meta.get(field)!r}, expected {value!r}")
        if layout is None:
            layout = Layout.from_json(meta.get("layout", ""))
        elif meta.get("layout") != layout.json:
            raise FragmentError(f"fragment {self.path}: layout differs from the rest of the prefix")
        specs = layout.tensor_specs(split_factor)
        if len(specs) != len(self.tensors):
            raise FragmentError(f"fragment {self.path}: {len(self.tensors)} tensors, expected {len(specs)}")
        for name, dtype, shape in specs:
            entry = self.tensors.get(name)
            if entry is None or entry.dtype != dtype or entry.shape != shape:
                raise FragmentError(f"fragment {self.path}: tensor {name} missing or misshapen")
        return layout


# Fragments of one layout share their tensor table byte for byte; only __metadata__ (which
# VUA writes first) differs. A table validated once is reused: (table bytes, file size) ->
# entries. Bounded, since a process sees few layouts.
_TABLE_MARK = b'},"tokens":'
_validated_tables: dict[tuple[bytes, int, int], dict[str, TensorEntry]] = {}
_MAX_TABLES = 64


def _parse_header(buf: mmap.mmap, file_size: int, path: str) -> tuple[dict[str, str], dict[str, TensorEntry], int]:
    """Validates a safetensors header completely: sizes, offsets inside the file, dtypes, shapes."""
    (header_len,) = struct.unpack_from("<Q", buf, 0)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise FragmentError(f"fragment {path}: header length {header_len} does not fit a {file_size}-byte file")
    header = buf[8 : 8 + header_len]
    mark = header.find(_TABLE_MARK)
    if mark > 0:
        table_key = (header[mark + 1 :], header_len, file_size)
        cached = _validated_tables.get(table_key)
        if cached is not None:
            try:
                metadata = _loads(header[: mark + 1] + b"}").get("__metadata__")
            except (UnicodeDecodeError, ValueError, AttributeError):
                metadata = None
            if isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()):
                return metadata, cached, 8 + header_len
    metadata, tensors, data_start = _parse_full_header(header, header_len, file_size, path)
    if mark > 0 and len(_validated_tables) < _MAX_TABLES:
        _validated_tables[table_key] = tensors
    return metadata, tensors, data_start


def _parse_full_header(
    header: bytes, header_len: int, file_size: int, path: str
) -> tuple[dict[str, str], dict[str, TensorEntry], int]:
    try:
        body = _loads(header)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FragmentError(f"fragment {path}: header is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise FragmentError(f"fragment {path}: header is not a JSON object")
    metadata = body.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FragmentError(f"fragment {path}: missing or malformed __metadata__")
    data_start = 8 + header_len
    data_len = file_size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, spec in body.items():
        try:
            dtype = spec["dtype"]
            itemsize = _dtypes.ITEMSIZE[dtype]
            if not isinstance(spec["shape"], list):
                raise ValueError("shape is not a list")
            shape = tuple(spec["shape"])
            begin, end = spec["data_offsets"]
            if not all(_is_size(n) for n in (*shape, begin, end)):
                raise ValueError("negative or non-integer size")
        except (KeyError, TypeError, ValueError) as exc:
            raise FragmentError(f"fragment {path}: malformed entry for tensor {name!r} ({exc})") from None
        nbytes = itemsize
        for n in shape:
            nbytes *= n
        if not begin <= end <= data_len or end - begin != nbytes:
            raise FragmentError(f"fragment {path}: tensor {name!r} lies outside the file or has the wrong size")
        tensors[name] = TensorEntry(dtype, shape, data_start + begin, data_start + end)
    # safetensors' rule: the tensors tile the data exactly, each byte in one tensor. Overlaps
    # would let one tensor's bytes pass for another's (V aliasing K).
    position = data_start
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise FragmentError(f"fragment {path}: tensor data overlaps or leaves a gap at byte {position}")
        position = entry.end
    if position != file_size:
        raise FragmentError(f"fragment {path}: tensors cover {position - data_start} of {data_len} data bytes")
    return metadata, tensors, data_start
