"""VUA's store: ``put`` the KV cache of token prefixes, ``get_closest`` the longest stored one.

    from vua.core import VUA, VUAConfig

    vua = VUA(VUAConfig(split_factor=256, namespace="llama-3.1-8b/bf16"), "/mnt/kv")
    vua.put(tokens, past_key_values)               # tokens [n] / [1, n] / [B, n]
    hit = vua.get_closest(prompt, device="cuda")   # ClosestKV(tokens, data) or None

Layers of the design, bottom up: ``_keys`` (token groups to chained hashes), ``_layout``
(where groups live under the root), ``_fragment`` (one group's safetensors file),
``_index`` (LMDB: which groups exist), ``_writer`` and ``_reader`` (the data paths), and
this module, which validates input and ties them together.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch

from vua import _dtypes, _evict, _layout, _wordsum
from vua._fragment import TOKENS, Fragment, Layout, mac_key, mark_used, publish_fragment, quarantine_group
from vua._index import RECORD_HEAD, GroupRecord, Index, namespace_id, read_group_record
from vua._keys import group_keys, namespace_seed, tokens_as_int64
from vua._reader import KVLoad
from vua._staging import HostBlockPool, PinnedStaging
from vua._writer import GroupSource, host_kv
from vua.errors import FragmentError, InvalidInputError, NotAStoreError, SplitFactorError, StorageError, VUAError

__all__ = ["VUA", "VUAConfig", "ClosestKV", "KVLoad", "SplitFactorError", "VUAError"]

logger = logging.getLogger(__name__)

KVData = Sequence[tuple[torch.Tensor, torch.Tensor]]
_TOUCH_FLUSH_SECONDS = 5.0


class _config_method:
    """Makes a VUAConfig method callable on the class itself (using the defaults) or an instance."""

    def __init__(self, func: Callable[..., Any]):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: object, cls: type) -> Callable[..., Any]:
        return types.MethodType(self.func, obj if obj is not None else cls)


@dataclass(frozen=True)
class VUAConfig:
    """How a store cuts, names and keeps KV caches.

    ``VUAConfig`` itself (the class) stands for the defaults, so ``VUA(VUAConfig, root)``
    and ``VUAConfig.trim_to_split_factor(tokens)`` work as well as an instance.

    Attributes:
        split_factor: tokens per group; prefixes are stored and found in whole groups.
        namespace: what the KV belongs to (model, dtype, parallel rank, layout). Entries
            put under one namespace are never returned under another.
        index_path: the LMDB index directory; default ``ROOT/index.lmdb``. Keep it on a
            local disk when the root is on a network file system.
        max_bytes: capacity of the store; ``put`` evicts least recently used groups to stay
            below it. None: unbounded.
        file_mode: permission bits of new fragment and index files; None follows the umask.
        io_threads: threads for parallel fragment reads and writes.
        verify_checksums: check every tensor read against its checksum from put time.
        staging_bytes: size of each of the two pinned buffers used for CUDA reads (grown
            to one group per I/O thread when groups are large).
        host_pool_bytes: host memory of dropped CPU results kept for reuse by later reads
            (saves zeroing fresh pages); 0 turns recycling off.
        gpu_checksums: store with each group a word sum a GPU can check, so CUDA reads
            are verified on the GPU after the copy instead of hashed on the host. None
            (default): computed on the GPU for puts from CUDA tensors (nearly free), and
            on the host for CPU tensors only where torch sees a CUDA device (it costs
            about a tenth of put throughput on a small CPU). True: always; False: never.
            Groups without one are still verified, with xxh3 on the host.
        auth_key: a secret (16 to 64 bytes, e.g. ``secrets.token_bytes(32)``) shared by every
            process that may write the store. Put then seals each fragment with a keyed MAC
            (keyed BLAKE3, the ``auth`` extra) over its header and data, and get refuses any group whose MAC does not
            verify, so a writer without the key cannot make a reader accept its KV. None
            (default): no MAC; checksums then catch accidents, not forgeries.
        gds: read fragments for CUDA devices straight into GPU memory with GPUDirect
            Storage (``torch.cuda.gds``). Off by default; where the platform cannot, the
            first failure is logged and reads go through pinned staging as usual.
    """

    split_factor: int = 256
    namespace: str = ""
    index_path: str | None = None
    max_bytes: int | None = None
    file_mode: int | None = None
    io_threads: int = min(16, os.cpu_count() or 1)
    verify_checksums: bool = True
    staging_bytes: int = 256 << 20
    host_pool_bytes: int = 2 << 30
    gpu_checksums: bool | None = None
    gds: bool = False
    auth_key: bytes | None = field(default=None, repr=False)  # a secret: kept out of reprs and logs

    def __call__(self) -> VUAConfig:
        """Returns this config: ``vua.config()`` is the original project's accessor, and
        ``vua.config.split_factor`` keeps working beside it."""
        return self

    @_config_method
    def tokens_to_paths(self, tokens: torch.Tensor) -> list[str]:
        """Returns the hex key of every group of ``tokens`` (``[n]`` or ``[1, n]``).

        Raises:
            SplitFactorError: n is not a multiple of ``split_factor``; trim the tokens with
                :meth:`trim_to_split_factor` first.
        """
        row = _single_row(tokens)
        n, s = row.shape[0], self.split_factor
        if n % s:
            raise SplitFactorError(
                f"tokens_to_paths got {n} tokens, not a multiple of split_factor={s}; "
                f"cut them with VUAConfig.trim_to_split_factor(tokens) (here to {n - n % s})"
            )
        return [key.hex() for key in group_keys(_int64_ids(row), s, namespace_seed(self.namespace))]

    tokens_to_path = tokens_to_paths  # the original project's other spelling

    @_config_method
    def trim_to_split_factor(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cuts the last dimension of ``tokens`` down to a multiple of ``split_factor``.

        Keeps the rank: ``[n]`` stays 1-D and ``[1, n]`` stays 2-D. Returns a view.

        Raises:
            InvalidInputError: ``tokens`` is not a torch.Tensor.
        """
        if not isinstance(tokens, torch.Tensor):
            raise InvalidInputError(
                f"trim_to_split_factor takes a torch.Tensor of token ids, got {type(tokens).__name__}; "
                "wrap a list with torch.tensor(ids)"
            )
        n = tokens.shape[-1]
        return tokens[..., : n - n % self.split_factor]


class ClosestKV(NamedTuple):
    """The longest stored prefix of a query.

    Attributes:
        tokens: the query's tokens cut to the prefix, with the query's rank.
        data: per layer, ``(key, value)`` shaped ``(1, kv_heads, len(prefix), head_dim)``,
            on the device asked for.
    """

    tokens: torch.Tensor
    data: list[tuple[torch.Tensor, torch.Tensor]]


def _check_storage(t: torch.Tensor, what: str) -> None:
    """Refuses tensors whose bytes cannot be read: sparse or other layouts, the meta device."""
    if t.layout != torch.strided:
        raise InvalidInputError(f"{what} is a {t.layout} tensor; pass a dense one (t.to_dense())")
    if t.device.type == "meta":
        raise InvalidInputError(f"{what} is on the meta device and holds no data; pass a materialised tensor")


def _single_row(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise InvalidInputError(
            f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}; "
            "wrap a list of ids with torch.tensor(ids)"
        )
    _check_storage(tokens, "tokens")
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        return tokens[0]
    if tokens.dim() != 1:
        raise InvalidInputError(
            f"tokens must be shaped [n] or [1, n], got {list(tokens.shape)}; pass a batch to "
            "get_closest as a list of 1-D tensors"
        )
    return tokens


def _check_config(config: VUAConfig) -> None:
    """Refuses config values that would fail later, or quietly do harm, with what to pass instead."""

    def fail(field: str, wanted: str) -> NoReturn:
        value = getattr(config, field)
        raise InvalidInputError(f"VUAConfig.{field} must be {wanted}, got {value!r} ({type(value).__name__})")

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(config.split_factor) or config.split_factor <= 0:
        fail("split_factor", "a positive integer (tokens per group), e.g. 256")
    if not isinstance(config.namespace, str):
        fail("namespace", "a str naming what the KV belongs to, e.g. 'llama-3.1-8b/bf16'")
    try:
        config.namespace.encode("utf-8")
    except UnicodeEncodeError:
        fail("namespace", "text that encodes as UTF-8 (no lone surrogates)")
    if config.index_path is not None and not isinstance(config.index_path, (str, os.PathLike)):
        fail("index_path", "None or a directory path")
    if config.max_bytes is not None and (not is_int(config.max_bytes) or config.max_bytes < 0):
        fail("max_bytes", "None or a number of bytes as an int, e.g. 500 << 30 for 500 GiB")
    if config.file_mode is not None and (not is_int(config.file_mode) or not 0 <= config.file_mode <= 0o777):
        fail("file_mode", "None or permission bits from 0o000 to 0o777 (no setuid, setgid or sticky bits), e.g. 0o640")
    if not is_int(config.io_threads) or config.io_threads < 1:
        fail("io_threads", "a positive integer")
    for name in ("staging_bytes", "host_pool_bytes"):
        if not is_int(getattr(config, name)) or getattr(config, name) < 0:
            fail(name, "a non-negative number of bytes as an int")
    for name in ("verify_checksums", "gds"):
        if not isinstance(getattr(config, name), bool):
            fail(name, "True or False")
    if config.gpu_checksums is not None and not isinstance(config.gpu_checksums, bool):
        fail("gpu_checksums", "None (automatic), True or False")
    key = config.auth_key
    if key is not None and (not isinstance(key, bytes) or not 16 <= len(key) <= 64):
        # Never echo the value: it is a secret.
        raise InvalidInputError(
            "VUAConfig.auth_key must be None or 16 to 64 bytes of secret, e.g. secrets.token_bytes(32); "
            f"got a {type(key).__name__}" + (f" of length {len(key)}" if isinstance(key, (bytes, str)) else "")
        )


def _int64_ids(row: torch.Tensor) -> np.ndarray:
    try:
        return tokens_as_int64(row)
    except TypeError as exc:
        raise InvalidInputError(f"{exc}; convert with tokens.long()") from None


class VUA:
    """A KV-cache store rooted at a directory.

    Args:
        config: a :class:`VUAConfig` instance, or the class itself for the defaults.
        root_path: the fragment root; created if missing (its parent must exist unless
            ``create_parents``). It may be on a network file system shared by many nodes,
            each with its own local ``index_path``.
        create_parents: create missing parent directories of ``root_path`` too.

    Raises:
        InvalidInputError: a config value is out of range (the message says what to pass).
        NotAStoreError: the root's parent does not exist (a mistyped path, most likely).
        StorageError: the root or the index cannot be created or written.
    """

    def __init__(
        self,
        config: VUAConfig | type[VUAConfig],
        root_path: str | os.PathLike[str],
        *,
        create_parents: bool = False,
    ):
        if isinstance(config, type) and issubclass(config, VUAConfig):
            config = config()
        if not isinstance(config, VUAConfig):
            raise InvalidInputError(f"config must be a VUAConfig, got {type(config).__name__}")
        _check_config(config)
        self.config = config
        try:
            self.root = os.fspath(root_path)
        except TypeError:
            raise InvalidInputError(f"root_path must be a path, got {type(root_path).__name__}") from None
        parent = os.path.dirname(os.path.abspath(self.root))
        if not os.path.isdir(self.root) and not os.path.isdir(parent) and not create_parents:
            # A mistyped root would otherwise become a fresh, empty store somewhere unexpected.
            raise NotAStoreError(
                f"cannot create the VUA root {self.root!r}: its parent {parent!r} does not exist; "
                "check the path, or pass VUA(..., create_parents=True) to create it all"
            )
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot use {self.root!r} as a VUA root: {exc.strerror}; pass a writable directory"
            ) from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"VUA root {self.root!r} is not writable; fix its permissions or pick another directory")
        self.index_path = config.index_path or os.path.join(self.root, _layout.DEFAULT_INDEX_DIR)
        self._index = Index(self.index_path, self.root, file_mode=config.file_mode)
        self._index.env()  # fail now, not on the first put, when the index is unusable
        self._seed = namespace_seed(config.namespace)
        self._mac_key = None if config.auth_key is None else mac_key(config.auth_key)
        self._ns_id = namespace_id(config.namespace)
        self._pid = os.getpid()
        self._executor = ThreadPoolExecutor(max_workers=max(1, config.io_threads), thread_name_prefix="vua-io")
        self._staging: dict[torch.device, PinnedStaging] = {}
        self._host_pool = HostBlockPool(config.host_pool_bytes) if config.host_pool_bytes else None
        self._touch_lock = threading.Lock()
        self._pending_touches: dict[bytes, int] = {}  # key -> time of its last use (ns)
        self._last_touch_flush = time.monotonic()

    def __enter__(self) -> VUA:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Records pending LRU refreshes and releases the index and threads."""
        self._flush_touches()
        self._index.close()
        self._executor.shutdown(wait=True)

    def _pool(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():  # threads do not survive a fork
            self._executor = ThreadPoolExecutor(max_workers=max(1, self.config.io_threads), thread_name_prefix="vua-io")
            self._staging = {}
            self._pid = os.getpid()
        return self._executor

    # -- put ----------------------------------------------------------------------------

    def put(self, tokens: torch.Tensor, data: KVData, *, offset: int = 0) -> int:
        """Stores the KV cache of ``tokens``, group by group.

        Groups already stored are skipped; the rest are written in parallel, each durable
        (fsynced and atomically published) when this returns, and recorded in the index in
        one transaction.

        Args:
            tokens: ``[n]``, ``[1, n]`` or a batch ``[B, n]`` of token ids; n must be a
                multiple of ``split_factor``.
            data: per layer, ``(key, value)`` shaped ``[B, kv_heads, seq, head_dim]`` with
                ``seq >= n - offset`` (positions past n are ignored), one dtype for all, on any device.
            offset: the token position ``data`` starts at, a multiple of split_factor: for
                callers that hold only the KV past an already stored prefix (groups before
                it are not written).

        Returns:
            The number of groups this call wrote.

        Raises:
            SplitFactorError: n is not a multiple of split_factor (nothing written).
            InvalidInputError: tokens or data are malformed (nothing written).
            StorageError: the file system refused a write; groups already published stay
                valid, nothing partial is left.
        """
        rows, layout, layers = self._check_put(tokens, data, offset)
        if not rows or rows[0].numel() == 0:
            return 0
        s = self.config.split_factor
        n = rows[0].numel()
        wordsums, host_wordsums = self._gpu_checksums(layers, n - offset)
        host_layers = [(host_kv(k, n - offset), host_kv(v, n - offset)) for k, v in layers]
        source = GroupSource(
            host_layers,
            layout,
            s,
            self.config.namespace,
            first_group=offset // s,
            wordsums=wordsums,
            host_wordsums=host_wordsums,
            mac_key=self._mac_key,
        )

        work = []  # (row, group, key, parent, ids)
        every_key: list[bytes] = []
        for r, row in enumerate(rows):
            ids = _int64_ids(row)
            keys = group_keys(ids, s, self._seed)
            every_key.extend(keys)
            present = self._stored_groups(keys, layout)
            parents = [self._seed, *keys[:-1]]
            work.extend((r, g, keys[g], parents[g], ids) for g in range(offset // s, len(keys)) if not present[g])
        unique: dict[bytes, tuple[int, int, bytes, bytes, np.ndarray]] = {}
        for item in work:
            unique.setdefault(item[2], item)  # a batch may repeat a prefix: its first row is written

        def write(item: tuple[int, int, bytes, bytes, np.ndarray]) -> tuple[bytes, GroupRecord, bool]:
            r, g, key, parent, ids = item
            header, buffers = source.fragment(ids, r, g, key.hex(), parent.hex())
            published = publish_fragment(self.root, key.hex(), header, buffers, file_mode=self.config.file_mode)
            return key, source.record(header, buffers, g), published

        started = time.perf_counter()
        results, failure = [], None
        for future in [self._pool().submit(write, item) for item in unique.values()]:
            try:
                results.append(future.result())
            except OSError as exc:
                failure = failure or exc
        # Record what did get published even when another group failed: those are whole.
        # Groups already stored are refreshed too: a prefix is never older than its suffix,
        # so LRU eviction takes suffixes first.
        self._index.add(
            ((k, rec) for k, rec, _ in results), layouts=[layout], namespaces=[self.config.namespace], touch=every_key
        )
        self._touch(every_key)  # in the tree too (batched), where rebuilds and other nodes see it
        written = sum(1 for *_, published in results if published)
        logger.debug(
            "put: %d rows, %d new groups, %d written in %.1f ms",
            len(rows),
            len(unique),
            written,
            1e3 * (time.perf_counter() - started),
        )
        if failure is not None:
            raise StorageError(
                f"writing a fragment under {self.root!r} failed: {failure.strerror or failure}; "
                "free space or fix permissions, then put again (stored groups stay valid)"
            ) from failure
        if self.config.max_bytes is not None:
            self._flush_touches()
            _evict.enforce_capacity(self._index, self.root, self.config.max_bytes)
        return written

    def _gpu_checksums(
        self, layers: list[tuple[torch.Tensor, torch.Tensor]], tokens: int
    ) -> tuple[np.ndarray | None, bool]:
        """Where a put's word sums come from: (sums computed on the GPU, compute on the host)."""
        wanted = self.config.gpu_checksums
        if wanted is False:
            return None, False
        devices = {t.device for kv in layers for t in kv}
        if len(devices) == 1 and devices.pop().type == "cuda":
            sums = _wordsum.tensor_wordsums(layers, tokens, self.config.split_factor)
            return (None if sums is None else sums.cpu().numpy().view(np.uint64)), False
        return None, bool(wanted) or torch.cuda.is_available()

    def _check_put(
        self, tokens: torch.Tensor, data: KVData, offset: int = 0
    ) -> tuple[list[torch.Tensor], Layout, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Validates put's arguments; raises before anything touches the disk."""
        if not isinstance(tokens, torch.Tensor):
            raise InvalidInputError(
                f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}; "
                "wrap a list of ids with torch.tensor(ids)"
            )
        _check_storage(tokens, "tokens")
        if tokens.dim() == 1:
            rows = [tokens]
        elif tokens.dim() == 2:
            rows = list(tokens)
        else:
            raise InvalidInputError(f"tokens must be shaped [n], [1, n] or [B, n], got {list(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InvalidInputError(
                f"tokens must hold integer ids, got dtype {tokens.dtype}; convert with tokens.long()"
            )
        n, s = tokens.shape[-1], self.config.split_factor
        if n % s:
            raise SplitFactorError(
                f"put got {n} tokens, not a multiple of split_factor={s}; cut them with "
                f"VUAConfig.trim_to_split_factor(tokens) (here to {n - n % s}) and the KV to match"
            )
        if not isinstance(offset, int) or offset % s or not 0 <= offset <= n:
            raise InvalidInputError(f"offset must be a multiple of split_factor={s} between 0 and {n}, got {offset!r}")
        batch = len(rows)
        if not isinstance(data, (list, tuple)) or not data:
            raise InvalidInputError("data must be a non-empty list over layers of (key, value) tensor pairs")
        layers, shapes, dtypes = [], [], set()
        for i, pair in enumerate(data):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InvalidInputError(f"data[{i}] must be a (key, value) pair, got {type(pair).__name__}")
            for name, t in zip(("key", "value"), pair):
                if isinstance(t, torch.Tensor):
                    _check_storage(t, f"data[{i}] {name}")
                if not isinstance(t, torch.Tensor) or t.dim() != 4:
                    got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise InvalidInputError(
                        f"data[{i}] {name} must be a 4-D tensor [batch, kv_heads, seq, head_dim], got {got}"
                    )
                if t.shape[0] != batch:
                    raise InvalidInputError(
                        f"data[{i}] {name} has batch {t.shape[0]} but tokens has {batch} rows; they must agree"
                    )
                if t.shape[2] < n - offset:
                    hint = (
                        f"; it looks laid out [batch, seq, heads, head_dim] (dimension 1 has {t.shape[1]}): "
                        "VUA takes [batch, kv_heads, seq, head_dim], so pass k.transpose(1, 2)"
                        if t.shape[1] >= n - offset
                        else "; pass the KV of every token"
                    )
                    raise InvalidInputError(
                        f"data[{i}] {name} shaped {list(t.shape)} covers {t.shape[2]} positions in dimension 2, "
                        f"fewer than the {n - offset} tokens{hint}"
                    )
                if t.shape[1] == 0 or t.shape[3] == 0:
                    raise InvalidInputError(f"data[{i}] {name} has an empty head or head_dim dimension")
                dtypes.add(t.dtype)
            k, v = pair
            layers.append((k, v))
            shapes.append(((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3])))
        if len(dtypes) != 1:
            raise InvalidInputError(
                f"all layers must share one dtype, got {sorted(map(str, dtypes))}; cast them with .to(dtype)"
            )
        dtype = dtypes.pop()
        if _dtypes.name_of(dtype) is None:
            raise InvalidInputError(f"dtype {dtype} cannot be stored in safetensors; cast the KV to a supported dtype")
        return rows, Layout.of(dtype, tuple(shapes)), layers

    # -- get ----------------------------------------------------------------------------

    def get_closest(
        self, tokens: torch.Tensor | Sequence[torch.Tensor], device: str | torch.device = "cpu"
    ) -> ClosestKV | None | list[ClosestKV | None]:
        """Returns the longest stored prefix of ``tokens``, in whole groups, with its KV.

        Every group returned was checked: header, namespace, its stored tokens against the
        query's and (by default) every tensor's checksum. A group that fails ends the
        prefix there, with a logged warning; wrong data is never returned.

        On a CUDA device the data is safe to use on the caller's current stream without
        synchronising the host: that stream waits on the copies through CUDA events. The
        host waits only for the GPU's check of the groups (a word sum computed after each
        copy), since the prefix length must be known when this returns; groups stored
        without a word sum are checked on the host and their copies left queued.

        Args:
            tokens: ``[n]`` or ``[1, n]``; or a list of 1-D tensors for a batch.
            device: where the returned tensors live.

        Returns:
            A :class:`ClosestKV`, None when no group is stored, or a list of those for a list.
        """
        if isinstance(tokens, (list, tuple)):
            if not all(isinstance(t, torch.Tensor) for t in tokens):
                raise InvalidInputError(
                    "a list passed to get_closest is a batch and must hold one 1-D tensor per prompt; "
                    "for a single prompt given as a list of ids, pass torch.tensor(ids)"
                )
            return [self.get_closest(t, device) for t in tokens]
        load = self.load(tokens, device)
        if load is None:
            return None
        groups = load.wait()
        if groups == 0:
            return None
        return ClosestKV(tokens[..., : groups * self.config.split_factor], load.data())

    def prefix_length(self, tokens: torch.Tensor) -> int:
        """How many leading tokens of ``tokens`` are stored, in whole groups, without reading fragments.

        Answers from the index, plus one directory probe per group past it (for groups
        other nodes wrote). For schedulers that must not do I/O; a later get verifies the
        data and may find less.
        """
        row = _single_row(tokens)
        keys = group_keys(_int64_ids(row), self.config.split_factor, self._seed)
        packed = self._index.lookup_prefix(keys)
        count, _ = self._usable_run(packed)
        if count == len(packed):
            while count < len(keys) and os.path.isdir(_layout.group_dir(self.root, keys[count].hex())):
                count += 1
        return count * self.config.split_factor

    def load(
        self, tokens: torch.Tensor, device: str | torch.device = "cpu", *, layerwise: bool = False
    ) -> KVLoad | None:
        """Starts loading the longest stored prefix of ``tokens``; for engines that overlap I/O with compute.

        With ``layerwise=True`` the copies run on a background thread and the caller can
        take layer i as soon as it has landed with :meth:`KVLoad.wait_layer`. The final
        prefix length is :meth:`KVLoad.wait`'s answer (a damaged group can shorten it).

        Returns:
            A running :class:`KVLoad`, or None when no group of ``tokens`` is stored.
        """
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidInputError(
                f"device {device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:N'"
            ) from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise InvalidInputError(
                    f"device {str(device)!r} asked for, but torch sees no CUDA device; pass device='cpu'"
                )
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        elif device.type != "cpu":
            raise InvalidInputError(f"device {str(device)!r} is not supported; pass 'cpu' or a CUDA device")
        row = _single_row(tokens)
        ids = _int64_ids(row)
        keys = group_keys(ids, self.config.split_factor, self._seed)
        started = time.perf_counter()
        fragments, layout = self._open_prefix(keys, ids)
        logger.debug(
            "lookup: %d of %d groups usable in %.2f ms",
            len(fragments),
            len(keys),
            1e3 * (time.perf_counter() - started),
        )
        if not fragments:
            return None
        staging = None
        if device.type == "cuda":
            staging = self._staging.get(device)
            if staging is None:
                staging = self._staging[device] = PinnedStaging(device, self.config.staging_bytes)

        def on_done(load: KVLoad) -> None:
            self._touch(keys[: load.num_groups])
            self._quarantine([keys[g] for g in load.damaged_groups])

        return KVLoad(
            fragments,
            layout,
            self.config.split_factor,
            device,
            self._pool(),
            staging=staging,
            host_pool=self._host_pool,
            # A group whose MAC verified at open needs no second hash of the same bytes: the
            # MAC is the stronger check, and one pass fewer is what makes authentication cheap.
            verify_checksums=self.config.verify_checksums and self._mac_key is None,
            gds=self.config.gds,
            background=layerwise,
            on_done=on_done,
        )

    def _stored_groups(self, keys: list[bytes], layout: Layout) -> list[bool]:
        """Which of ``keys`` are stored with this namespace and ``layout``, so a put may skip them.

        An index record of another namespace or layout is garbage or stale: the fragment
        decides. One that holds this namespace and layout stays (put rewrites the record);
        anything else is moved aside, so the put publishes the group afresh.
        """
        present = []
        for key, record in zip(keys, self._index.records(keys)):
            if record is None:
                present.append(False)
                continue
            if record.namespace_id == self._ns_id and record.layout_id == layout.id:
                present.append(True)
                continue
            found = read_group_record(self.root, key.hex())
            if found is None or found[0].namespace_id != self._ns_id or found[1] != layout:
                logger.warning(
                    "group %s holds another namespace or layout than its index record; replacing it", key.hex()
                )
                quarantine_group(self.root, key.hex())
            present.append(False)
        return present

    def _indexed_prefix(self, keys: list[bytes]) -> tuple[int, int]:
        """How many leading groups are stored, and their layout id, from the index.

        An index record that disagrees with the prefix (another namespace or layout) is
        checked against its fragment and healed when the fragment fits. Another node sharing
        the root may have written groups this node's index has not seen; one probe per
        missing group finds them, and they are recorded for next time.

        Returns:
            (groups, layout id); (0, 0) when none is stored.
        """
        packed = self._index.lookup_prefix(keys)
        count, layout_id = self._usable_run(packed)
        healed = []  # (key, record, layout, namespace) the index misrecorded or lacked
        # Past the usable run the fragment decides: a record that disagrees is checked, and
        # so is a group the index lacks but the tree holds (another node may have written it).
        while count < len(keys):
            key_hex = keys[count].hex()
            indexed = count < len(packed)
            if not indexed and not os.path.isdir(_layout.group_dir(self.root, key_hex)):
                break
            found = read_group_record(self.root, key_hex)
            if found is None or found[0].namespace_id != self._ns_id or (count and found[0].layout_id != layout_id):
                break
            healed.append((keys[count], *found))
            if indexed:  # the healed record may join the run to the records after it
                packed[count] = found[0].pack()
                count, layout_id = self._usable_run(packed)
            else:
                packed.append(found[0].pack())
                count, layout_id = count + 1, layout_id if count else found[0].layout_id
        if healed:
            logger.debug("found %d groups in the tree that the index lacked or misrecorded", len(healed))
            try:
                self._index.add(
                    [(k, r) for k, r, _, _ in healed],
                    layouts={d[2] for d in healed},
                    namespaces={d[3] for d in healed},
                )
            except StorageError as exc:  # the data is good; recording it is for next time
                logger.warning("could not record groups found in the tree: %s", exc)
        return count, layout_id

    def _usable_run(self, packed: list[bytes]) -> tuple[int, int]:
        """The leading records of this namespace sharing the first one's layout: (count, layout id)."""
        if not packed:
            return 0, 0
        first = GroupRecord.unpack(packed[0])
        if first.namespace_id != self._ns_id:
            return 0, 0
        head = packed[0][:RECORD_HEAD]
        groups = 0
        for raw in packed:  # a group of another layout ends the usable prefix
            if raw[:RECORD_HEAD] != head:
                break
            groups += 1
        return groups, first.layout_id

    def _open_prefix(self, keys: list[bytes], ids: np.ndarray) -> tuple[list[Fragment], Layout | None]:
        """Opens and validates the fragments of the stored prefix; cut at the first bad one."""
        count, layout_id = self._indexed_prefix(keys)
        if not count:
            return [], None
        layout = self._index.layout(layout_id)
        s = self.config.split_factor

        damaged: list[bytes] = []

        def open_group(j: int) -> Fragment | None:
            key_hex = keys[j].hex()
            try:
                fragment = Fragment(_layout.fragment_path(self.root, key_hex))
            except FragmentError as exc:
                logger.warning("stored prefix ends before group %d: %s", j, exc)
                if exc.damaged:
                    damaged.append(keys[j])
                return None
            try:
                fragment.validate(
                    key_hex=key_hex, namespace=self.config.namespace, split_factor=s, layout=layout, group_index=j
                )
                if bytes(fragment.raw(TOKENS)) != ids[j * s : (j + 1) * s].tobytes():
                    raise FragmentError(
                        f"fragment {fragment.path}: stored tokens differ from the query (hash collision or damage)"
                    )
                if self._mac_key is not None:
                    fragment.verify_mac(self._mac_key)
                return fragment
            except FragmentError as exc:
                logger.warning("stored prefix ends before group %d: %s", j, exc)
                damaged.append(keys[j])
                fragment.close()
                return None

        if layout is None:  # index lost its layout entry: take it from the first fragment
            found = read_group_record(self.root, keys[0].hex())
            if found is None:
                return [], None
            layout = found[1]
        opened = (
            list(self._pool().map(open_group, range(count))) if count > 4 else [open_group(j) for j in range(count)]
        )
        fragments = []
        for fragment in opened:
            if fragment is None:
                break
            fragments.append(fragment)
        for fragment in opened[len(fragments) :]:
            if fragment is not None:
                fragment.close()
        self._quarantine(damaged)
        return fragments, layout

    def _quarantine(self, keys: Sequence[bytes]) -> None:
        """Takes damaged groups out of the tree and the index, so the next put rewrites them."""
        if not keys:
            return
        for key in keys:
            quarantine_group(self.root, key.hex())
        try:
            self._index.remove(keys)
        except StorageError as exc:  # the lookup's fragment checks still catch them
            logger.warning("could not drop damaged groups from the index: %s", exc)

    # -- LRU bookkeeping -----------------------------------------------------------------

    def _touch(self, keys: Sequence[bytes]) -> None:
        """Notes a use of a whole prefix now; recorded in the index and the tree in batches."""
        now = time.time_ns()
        with self._touch_lock:
            self._pending_touches.update(dict.fromkeys(keys, now))
            due = time.monotonic() - self._last_touch_flush > _TOUCH_FLUSH_SECONDS
        if due:
            self._flush_touches()

    def _flush_touches(self) -> None:
        with self._touch_lock:
            uses, self._pending_touches = self._pending_touches, {}
            self._last_touch_flush = time.monotonic()
        if not uses:
            return
        try:
            self._index.touch(uses)
        except StorageError as exc:
            # Bookkeeping only: the read that made these uses succeeded, and eviction order
            # is still kept by the tree's record below.
            logger.warning("could not record %d uses in the index: %s", len(uses), exc)
        mark_used(self.root, {key.hex(): used for key, used in uses.items()})
