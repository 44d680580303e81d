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
file systems: ``_fragment_file``) and validates the header completely before any tensor
is looked at.
"""

from __future__ import annotations

import hmac
from functools import cached_property

import numpy as np
import xxhash

from vua import _dtypes
from vua._fragment_file import FragmentFile
from vua._header import FORMAT, FORMAT_VERSION, parse_header
from vua._kv_layout import TOKENS, Layout, bits_dtype, key_name, loads_untrusted, value_name
from vua._mac import ALG_FIELD, MAC_FIELD, MacStream, blank, mac_marker
from vua._record import GroupRecord, StoredGroup
from vua.errors import FragmentError, FragmentState


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


class Fragment(FragmentFile):
    """An open fragment: its header fully validated, tensors as zero-copy views (when mapped).

    The file is reached as :class:`FragmentFile` says (memory-mapped, or read with pread on
    network file systems); this class is what its bytes mean. Use as a context manager.
    Views handed out by :meth:`array` and :attr:`layers` must be dropped before the fragment
    closes.

    Raises:
        FragmentError: the file is missing, truncated, or its header is malformed.
    """

    def __init__(self, path: str, *, mapped: bool = True):
        super().__init__(path, mapped=mapped)
        try:
            self.metadata, self.tensors, self.data_start = parse_header(self._header_bytes(), self.file_size, path)
            if not self.mapped:
                # The tokens come first in the data: keep them with the header, for validation.
                tokens = self.tensors.get(TOKENS)
                self._keep_with_header(tokens.end if tokens is not None else 0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.__dict__.pop("layers", None)
        super().close()

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

    def raw(self, name: str) -> memoryview:
        """One tensor's bytes (the tokens come from memory in pread mode: read with the header)."""
        entry = self.tensors[name]
        return self.span(entry.begin, entry.end)

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
        data = self.span(begin, end)  # mapped: straight from the mapping; else the bytes read once
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
        header = bytes(self.span(0, self.data_start))
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
