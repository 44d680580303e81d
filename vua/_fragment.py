"""Fragment files: one group's tokens and K/V slices, in the safetensors format, read and validated.

A fragment is an ordinary safetensors file, so ``safetensors.safe_open`` reads it:

    tokens              int64 [split_factor]
    layers.{i}.key      dtype [kv_heads, split_factor, head_dim]
    layers.{i}.value    dtype [kv_heads, split_factor, head_dim]
    __metadata__        format, version, namespace, key, parent, group_index,
                        split_factor, layout (JSON), per-tensor xxh3-64 checksums,
                        and, where the writer stored them, wordsums: per K and V
                        tensor a sum that a GPU checks (see _wordsum), and a keyed
                        MAC (see _mac). Older files carry kv_checksum (xxh3-64 over
                        all K and V bytes) too, which `vua verify` checks; reads need
                        only the per-tensor sums.

The header is encoded and parsed in ``_header``; the file is written by ``_writer`` and
published by ``_publish``. Reading memory-maps the file (or reads it with pread on network
file systems) and validates the header completely before any tensor is looked at.
"""

from __future__ import annotations

import hmac
import mmap
import os
import struct
from functools import cached_property

import numpy as np
import xxhash

from vua import _dtypes
from vua._files import NotRegularFileError, open_regular_file, read_all
from vua._header import FORMAT, FORMAT_VERSION, MAX_HEADER_BYTES, parse_header
from vua._kv_layout import TOKENS, Layout, bits_dtype, key_name, loads_untrusted, value_name
from vua._mac import ALG_FIELD, MAC_FIELD, MacStream, blank, mac_marker
from vua._record import GroupRecord, StoredGroup
from vua.errors import FragmentError, FragmentState

_FIRST_READ = 64 << 10  # pread mode: one read takes a typical header and the tokens


def open_regular(path: str) -> int:
    """Opens a fragment for reading (see :func:`open_regular_file`).

    Raises:
        FragmentError: DAMAGED when something else than a regular file stands there; MISSING
            when nothing does (the catalog decides whether that is damage); UNREADABLE for
            errors that may pass (EIO, ESTALE, EACCES), so the group stays.
    """
    try:
        return open_regular_file(path)
    except FileNotFoundError:
        raise FragmentError(f"cannot open fragment {path}: no such file", state=FragmentState.MISSING) from None
    except OSError as exc:
        something_else = (IsADirectoryError, NotADirectoryError, NotRegularFileError)
        state = FragmentState.DAMAGED if isinstance(exc, something_else) else FragmentState.UNREADABLE
        raise FragmentError(f"cannot open fragment {path}: {exc.strerror}", state=state) from None


def _close_quietly(fd: int) -> None:
    """Closes a descriptor opened for reading. A FUSE file system reports errors at close too
    (GlusterFS: ENOENT once another node removed the file); the read itself decided already."""
    try:
        os.close(fd)
    except OSError:
        pass


class OtherLayoutError(FragmentError):
    """A fragment names another layout than the one expected (its index record's, or the prefix's).

    Not damage by itself: the record may be the one that lies (an index copied from another
    store, two roots sharing an index). Whoever catches it reads the fragment's own header
    to tell (see ``Catalog.open_prefix``). Its state is UNREADABLE: the group stays.
    """

    def __init__(self, message: str):
        super().__init__(message, state=FragmentState.UNREADABLE)


class MacCheck:
    """One fragment's MAC being computed over the bytes a read fed it; :meth:`verify` compares."""

    def __init__(self, stream: MacStream, stored: str, path: str):
        self._stream = stream
        self._stored = stored
        self._path = path

    def update(self, data: memoryview | bytes) -> None:
        self._stream.update(data)

    def verify(self) -> None:
        """Raises FragmentError unless the bytes fed are what a holder of the key wrote."""
        if not hmac.compare_digest(self._stream.value(), self._stored):
            raise FragmentError(f"fragment {self._path}: MAC does not verify (forged, damaged, or another auth_key)")


class Fragment:
    """An open fragment: memory-mapped, its header fully validated, tensors as zero-copy views.

    Use as a context manager. Views handed out by :meth:`tensor` must be dropped before
    the fragment closes.

    Raises:
        FragmentError: the file is missing, truncated, or its header is malformed.
    """

    def __init__(self, path: str, *, mapped: bool = True):
        self.path = path
        self._map: mmap.mmap | None = None
        # Without a mapping the descriptor stays open, so every later read sees this file
        # even if another node replaces it; close() releases whichever this fragment holds.
        self._fd: int | None = open_regular(path)
        try:
            self.file_size = os.fstat(self._fd).st_size
            if self.file_size < 8:
                raise FragmentError(f"fragment {path} is truncated ({self.file_size} bytes)")
            if mapped:
                # Read-only and shared: the pages are the page cache's own, nothing is copied.
                # Pages are mapped as the copy touches them; prefetch() starts disk reads early.
                try:
                    self._map = mmap.mmap(self._fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                except (OSError, ValueError) as exc:
                    # The file system's refusal, not the file's bytes.
                    raise FragmentError(f"cannot map fragment {path}: {exc}", state=FragmentState.UNREADABLE) from None
                # A get may hold hundreds of fragments: the mapping needs no descriptor.
                fd, self._fd = self._fd, None
                _close_quietly(fd)
                head: bytes | mmap.mmap = self._map
            else:
                head = self._pread(0, min(self.file_size, _FIRST_READ))
                if len(head) < 8:
                    raise FragmentError(f"fragment {path} is truncated ({len(head)} bytes read)")
                (header_len,) = struct.unpack_from("<Q", head, 0)
                if len(head) < 8 + header_len <= min(self.file_size, 8 + MAX_HEADER_BYTES):
                    head += self._pread(len(head), 8 + header_len - len(head))
            self.metadata, self.tensors, self.data_start = parse_header(head, self.file_size, path)
            if self._map is None:
                # The tokens come first in the data: keep them with the header, for validation.
                tokens = self.tensors.get(TOKENS)
                end = tokens.end if tokens is not None and tokens.end <= len(head) + _FIRST_READ else len(head)
                self._head = bytes(head) + self._pread(len(head), max(0, end - len(head)))
        except BaseException:
            self.close()
            raise

    def _pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the open file (pread mode); fewer only where the file ended."""
        assert self._fd is not None
        buffer = bytearray(length)
        got = self._read_at(self._fd, [memoryview(buffer)], offset)
        return bytes(buffer[:got])

    def _read_at(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        """:func:`read_all` with its errors as this fragment's: an I/O error or a stale handle is not the file's bytes."""
        try:
            return read_all(fd, buffers, offset)
        except OSError as exc:
            raise FragmentError(
                f"reading fragment {self.path} failed: {exc.strerror or exc}", state=FragmentState.UNREADABLE
            ) from None

    def __enter__(self) -> Fragment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.__dict__.pop("layers", None)
        self.__dict__.pop("region", None)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _close_quietly(fd)
        try:
            if self._map is not None:
                self._map.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes when the last one does

    @property
    def mapped(self) -> bool:
        """Whether the file is memory-mapped (else read with pread: network and FUSE file systems)."""
        return self._map is not None

    def prefetch(self) -> None:
        """Asks the kernel to start reading the whole file in the background (cold reads)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_WILLNEED)
        elif self._fd is not None:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_WILLNEED)

    def read_into(self, buffers: list[memoryview], offset: int) -> None:
        """Fills ``buffers``, in order, with the file's bytes from ``offset`` on (one ``preadv`` where it can).

        Raises:
            FragmentError: the file is shorter than its header says (DAMAGED), or the read
                failed (an I/O error or a vanished file on a network file system: UNREADABLE).
        """
        fd = self._fd if self._fd is not None else open_regular(self.path)  # a file replaced since fails the checksum
        try:
            got = self._read_at(fd, buffers, offset)
        finally:
            if fd != self._fd:
                _close_quietly(fd)
        if got < sum(len(b) for b in buffers):
            raise FragmentError(f"fragment {self.path} ended early while reading its data")

    def read_kv_into(self, dest: memoryview, offset: int = 0) -> None:
        """Reads K and V bytes (file order) from ``offset`` on into ``dest`` (see :meth:`read_into`).

        The kernel copies from the page cache straight into ``dest`` (pinned staging, say),
        without mapping the pages into this process first.
        """
        self.read_into([dest], self.kv_range[0] + offset)

    def kv_offsets(self) -> list[tuple[str, int, int]]:
        """(name, begin, end) of every K and V tensor, relative to the first K."""
        base = self.tensors[key_name(0)].begin
        return [(name, e.begin - base, e.end - base) for name, e in self.tensors.items() if name != TOKENS]

    @cached_property
    def region(self) -> np.ndarray:
        """The whole file as read-only uint8 numpy: zero-copy when mapped, else read into memory once."""
        if self._map is not None:
            return np.frombuffer(self._map, dtype=np.uint8)
        whole = np.empty(self.file_size, dtype=np.uint8)
        self.read_into([memoryview(whole)], 0)
        whole.flags.writeable = False
        return whole

    def raw(self, name: str) -> memoryview:
        """One tensor's bytes (the tokens come from memory in pread mode: read with the header)."""
        entry = self.tensors[name]
        if self._map is not None:
            return memoryview(self._map)[entry.begin : entry.end]
        if entry.end <= len(self._head):
            return memoryview(self._head)[entry.begin : entry.end]
        return memoryview(self.region)[entry.begin : entry.end]

    def array(self, name: str) -> np.ndarray:
        """A read-only, zero-copy numpy view of one stored tensor's bytes, as same-width integers.

        numpy has no bf16 or fp8, and a copy needs only the bit patterns; numpy's copies
        also release the GIL, so several threads copy at once.
        """
        entry = self.tensors[name]
        return self.region[entry.begin : entry.end].view(bits_dtype(_dtypes.ITEMSIZE[entry.dtype])).reshape(entry.shape)

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
        data = self.region[begin:end].view(bits_dtype(_dtypes.ITEMSIZE[first.dtype]))
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
            stored = loads_untrusted(raw)
            return [int(stored[name], 16) for name in self.kv_names]
        except (KeyError, ValueError, TypeError) as exc:
            raise FragmentError(f"fragment {self.path}: malformed wordsums ({exc})") from None

    @cached_property
    def checksums(self) -> dict[str, int]:
        try:
            return {name: int(h, 16) for name, h in loads_untrusted(self.metadata["checksums"]).items()}
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
        check = self.start_mac(key)
        begin, end = self.kv_range
        data = memoryview(self._map if self._map is not None else self.region)[begin:end]
        try:
            check.update(data)
        finally:
            data.release()
        check.verify()

    def start_mac(self, key: bytes) -> MacCheck:
        """The fragment's MAC check, fed with everything before the K and V data (header and tokens).

        The caller feeds every K and V byte in file order (where it landed, for a read that
        checks what it returns), then calls :meth:`MacCheck.verify`. The tokens fed are the
        ones validated against the query when the fragment was opened.

        Raises:
            FragmentError: no well-formed MAC, or an algorithm this version does not know.
        """
        stored = self.metadata.get(MAC_FIELD)
        if not isinstance(stored, str) or len(stored) != 64 or stored.strip("0123456789abcdef"):
            raise FragmentError(f"fragment {self.path} has no MAC, and this store requires one (auth_key)")
        alg = self.metadata.get(ALG_FIELD)
        header = bytes(self._map[: self.data_start] if self._map is not None else self._head[: self.data_start])
        if header.count(mac_marker(stored)) != 1:
            raise FragmentError(f"fragment {self.path}: MAC field is not where a writer puts it")
        blank_value = blank(alg, stored)
        try:
            stream = MacStream(key, alg, blank_value)
        except ValueError as exc:
            raise FragmentError(f"fragment {self.path}: {exc}") from None
        stream.update(header.replace(mac_marker(stored), mac_marker(blank_value)))
        stream.update(self.raw(TOKENS))  # the data before K0 (validate() checks the writer's order)
        return MacCheck(stream, stored, self.path)

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
            raise OtherLayoutError(f"fragment {self.path}: layout differs from the rest of the prefix")
        specs = layout.tensor_specs(split_factor)
        if len(specs) != len(self.tensors):
            raise FragmentError(f"fragment {self.path}: {len(self.tensors)} tensors, expected {len(specs)}")
        position = self.data_start
        for name, dtype, shape in specs:
            entry = self.tensors.get(name)
            if entry is None or entry.dtype != dtype or entry.shape != shape:
                raise FragmentError(f"fragment {self.path}: tensor {name} missing or misshapen")
            # In the writer's order (tokens, K0, V0, K1, ...): reads take runs of tensors as one range.
            if entry.begin != position:
                raise FragmentError(f"fragment {self.path}: tensor {name} is out of the writer's order")
            position = entry.end
        return layout

    def stored_group(self, key_hex: str, *, last_used: int) -> StoredGroup:
        """Validates the header as group ``key_hex`` of the namespace it names; its index record, layout, namespace.

        For discovery and rebuilds, where nothing but the file says what the group is.

        Raises:
            FragmentError: the header is malformed or names another key.
        """
        meta = self.metadata
        namespace = meta.get("namespace", "")
        try:
            split_factor = int(meta.get("split_factor", ""))
            group_index = int(meta.get("group_index", ""))
        except ValueError as exc:
            raise FragmentError(f"fragment {self.path}: malformed metadata ({exc})") from None
        layout = self.validate(
            key_hex=key_hex, namespace=namespace, split_factor=split_factor, layout=None, group_index=group_index
        )
        return StoredGroup(GroupRecord.of(namespace, layout, self.file_size, group_index, last_used), layout, namespace)
