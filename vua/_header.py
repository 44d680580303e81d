"""A fragment's safetensors header, both ways: encoded for a writer, parsed and validated completely for a reader.

The header is the one place a fragment's structure is described (tensor names, dtypes,
shapes and byte ranges, and ``__metadata__``), so its writing and its reading live together:
a change of format is a change here. It is padded with spaces (which the format allows) so
tensor data starts on a 4 KiB boundary, as direct and GPUDirect reads want.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vua import _dtypes
from vua._kv_layout import is_size, loads_untrusted
from vua.errors import FragmentError

FORMAT = "vua.fragment"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 16 << 20  # a 1000-layer model's header is far below this
HEADER_ALIGN = 4096  # tensor data starts on a block boundary, as direct and GPUDirect reads want


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a fragment file (absolute byte offsets)."""

    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    begin: int
    end: int


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


# Fragments of one layout share their tensor table byte for byte; only __metadata__ (which
# VUA writes first) differs. A table validated once is reused: (table bytes, file size) ->
# entries. Bounded, since a process sees few layouts.
_TABLE_MARK = b'},"tokens":'
_validated_tables: dict[tuple[bytes, int, int], dict[str, TensorEntry]] = {}
_MAX_TABLES = 64


def parse_header(
    buf: bytes | mmap.mmap, file_size: int, path: str
) -> tuple[dict[str, str], dict[str, TensorEntry], int]:
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
                metadata = loads_untrusted(header[: mark + 1] + b"}").get("__metadata__")
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
        body = loads_untrusted(header)
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
            if not all(is_size(n) for n in (*shape, begin, end)):
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
