"""The write path: slice a batch's KV into per-group buffers without copying, and publish them.

A fragment's bytes are gathered straight from the caller's tensors: for every layer and
head, one group's tokens are a contiguous run of ``split_factor * head_dim`` elements (the
innermost two dimensions of ``(batch, heads, seq, head_dim)`` are contiguous), so a
fragment is one ``writev`` of the header plus ``layers * 2 * heads`` views into the
caller's memory.
"""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from typing import NamedTuple

import numpy as np
import torch
import xxhash

from vua import _wordsum
from vua._header import FORMAT, FORMAT_VERSION, encode_header
from vua._kv_layout import TOKENS, Layout
from vua._mac import seal_header, writer_fields
from vua._publish import publish_fragment
from vua._record import GroupRecord
from vua.errors import InvalidInputError


def host_kv(t: torch.Tensor, n: int) -> torch.Tensor:
    """Returns ``t[:, :, :n]`` on the CPU with its two innermost dimensions contiguous.

    A CPU tensor that already has that property is returned as a view (no copy).
    """
    t = t[:, :, :n]
    if t.device.type != "cpu":
        return t.to("cpu")
    if not heads_are_runs(t):
        return t.contiguous()
    return t


def heads_are_runs(t: torch.Tensor) -> bool:
    """Whether each head's ``(seq, head_dim)`` of a ``[batch, heads, seq, head_dim]`` tensor is one
    contiguous run: what a fragment is written from without a copy."""
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of all memory ``t`` spans (the caller keeps ``t`` alive)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    nbytes = extent * t.element_size() if t.numel() else 0
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")


class GroupSource:
    """Builds the fragment of any (row, group) of one ``put`` call from the caller's tensors."""

    def __init__(
        self,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        layout: Layout,
        split_factor: int,
        namespace: str,
        *,
        first_group: int = 0,
        wordsums: np.ndarray | None = None,
        host_wordsums: bool = False,
        mac_key: bytes | None = None,
    ):
        self._tensors = [t for kv in layers for t in kv]  # keep alive while views exist
        self._raw_arrays = [np.frombuffer(_raw_bytes(t), dtype=np.uint8) for t in self._tensors]
        self._layout = layout
        self._split = split_factor
        self._namespace = namespace
        self._specs = layout.tensor_specs(split_factor)
        self._kv_names = [spec[0] for spec in self._specs[1:]]  # the tokens come first
        self._first_group = first_group  # the tensors start at this group's first token
        # GPU-checkable sums (see _wordsum): computed already, uint64 (rows, groups from
        # first_group, tensors), or to compute here from the host bytes, or neither.
        self._wordsums = wordsums
        self._host_wordsums = host_wordsums
        self._mac_key = mac_key  # the store's MAC key (see _mac.mac_key), or None

    @classmethod
    def of_put(
        cls,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        layout: Layout,
        split_factor: int,
        namespace: str,
        *,
        tokens: int,
        offset: int,
        gpu_checksums: bool | None,
        mac_key: bytes | None,
        device_sums: np.ndarray | None = None,
    ) -> GroupSource:
        """The source of a put of ``tokens`` tokens whose KV (``layers``, on any device) starts at ``offset``.

        Word sums come from the GPU for CUDA tensors (nearly free there), else from the host
        where ``gpu_checksums`` asks or torch sees a CUDA device (see ``VUAConfig``).
        ``device_sums``: those sums computed already where the KV was on the device (uint64
        ``(rows, groups from offset, tensors)``, see ``_wordsum.tensor_wordsums``), so no
        host thread hashes them again.
        """
        n = tokens - offset
        wordsums, host_wordsums = None, False
        if device_sums is not None:
            expected = (len(layers[0][0]), n // split_factor, 2 * len(layers))
            if device_sums.shape != expected:
                raise InvalidInputError(f"device word sums shaped {device_sums.shape}, expected {expected}")
            wordsums = device_sums
        elif gpu_checksums is not False:
            devices = {t.device for kv in layers for t in kv}
            if len(devices) == 1 and devices.pop().type == "cuda":
                sums = _wordsum.tensor_wordsums(layers, n, split_factor)
                wordsums = None if sums is None else sums.cpu().numpy().view(np.uint64)
            else:
                host_wordsums = bool(gpu_checksums) or torch.cuda.is_available()
        return cls(
            [(host_kv(k, n), host_kv(v, n)) for k, v in layers],
            layout,
            split_factor,
            namespace,
            first_group=offset // split_factor,
            wordsums=wordsums,
            host_wordsums=host_wordsums,
            mac_key=mac_key,
        )

    def _tensor_piece(self, i: int, row: int, group: int) -> np.ndarray:
        """Tensor ``i``'s bytes in group ``group`` of batch row ``row``: uint8 ``(heads, run)``, a view.

        Each head's run of ``split_factor * head_dim`` elements is contiguous in the
        caller's tensor; the heads need not be adjacent.
        """
        t = self._tensors[i]
        item = t.element_size()
        base = (row * t.stride(0) + (group - self._first_group) * self._split * t.stride(2)) * item
        run = self._split * t.shape[-1] * item
        start = self._raw_arrays[i][base:]
        return np.lib.stride_tricks.as_strided(start, (t.shape[1], run), (t.stride(1) * item, 1), writeable=False)

    def _group_wordsums(self, row: int, group: int, pieces: Sequence[np.ndarray]) -> list[int] | None:
        """Every K and V tensor's word sum for one group (its ``pieces``), in file order; None when not stored."""
        if self._wordsums is not None:
            return [int(v) for v in self._wordsums[row, group - self._first_group]]
        if not self._host_wordsums:
            return None
        if not all(_wordsum.whole_rows(p.shape[1]) for p in pieces):
            return None
        return [_wordsum.host_wordsum(p) for p in pieces]

    def fragment(
        self, ids: np.ndarray, row: int, group: int, key_hex: str, parent_hex: str
    ) -> tuple[bytes, list[memoryview]]:
        """Returns the header and data buffers of group ``group`` of batch row ``row``.

        Args:
            ids: the row's token ids (int64).
        """
        s = self._split
        token_bytes = memoryview(ids[group * s : (group + 1) * s]).cast("B")
        buffers = [token_bytes]
        checksums = {TOKENS: format(xxhash.xxh3_64_intdigest(token_bytes), "016x")}
        pieces = [self._tensor_piece(i, row, group) for i in range(len(self._tensors))]
        for name, piece in zip(self._kv_names, pieces):
            chunks = [memoryview(run) for run in piece]  # zero-copy
            hasher = xxhash.xxh3_64()
            for chunk in chunks:
                hasher.update(chunk)
            checksums[name] = hasher.hexdigest()
            buffers.extend(chunks)
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "namespace": self._namespace,
            "key": key_hex,
            "parent": parent_hex,
            "group_index": str(group),
            "split_factor": str(s),
            "layout": self._layout.json,
            "checksums": json.dumps(checksums, separators=(",", ":")),
        }
        sums = self._group_wordsums(row, group, pieces)
        if sums is not None:  # what a GPU checks after its copy
            metadata["wordsums"] = json.dumps(
                {name: format(value, "016x") for name, value in zip(self._kv_names, sums)}, separators=(",", ":")
            )
        if self._mac_key is None:
            return encode_header(metadata, self._specs), buffers
        fields = writer_fields()
        metadata.update(fields)
        header = encode_header(metadata, self._specs)
        return seal_header(header, self._mac_key, buffers, fields), buffers

    def record(self, header: bytes, buffers: Sequence[memoryview], group: int) -> GroupRecord:
        nbytes = len(header) + sum(len(b) for b in buffers)
        return GroupRecord.of(self._namespace, self._layout, nbytes, group, time.time_ns())


class GroupToWrite(NamedTuple):
    """One group a put writes."""

    row: int  # of the batch
    group: int  # index in the row
    key: bytes
    parent: bytes  # the previous group's key (the namespace seed for group 0)
    ids: np.ndarray  # the row's token ids


class Written(NamedTuple):
    key: bytes
    record: GroupRecord
    published: bool  # False: another writer published the same group first


def write_groups(
    root: str,
    source: GroupSource,
    groups: Iterable[GroupToWrite],
    executor: Executor,
    *,
    file_mode: int | None,
    shared: bool = True,
) -> tuple[list[Written], OSError | None]:
    """Builds and publishes each group's fragment, in parallel; every one is durable when this returns.

    ``shared``: other nodes write ``root`` too (see ``publish_fragment``).

    Returns:
        (the groups published or found published, the first error), so a caller records the
        groups that are whole even when another failed.
    """

    def write(item: GroupToWrite) -> Written:
        header, buffers = source.fragment(item.ids, item.row, item.group, item.key.hex(), item.parent.hex())
        published = publish_fragment(root, item.key.hex(), header, buffers, file_mode=file_mode, shared=shared)
        return Written(item.key, source.record(header, buffers, item.group), published)

    results, failure = [], None
    for future in [executor.submit(write, item) for item in groups]:
        try:
            results.append(future.result())
        except OSError as exc:
            failure = failure or exc
    return results, failure
