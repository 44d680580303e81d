"""``VUAConfig``: how a store cuts, names and keeps KV caches, checked before a store opens."""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from vua._inputs import int64_ids, single_row
from vua._keys import group_keys, namespace_seed
from vua.errors import InvalidInputError, SplitFactorError


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
            process that may write the store. Put then seals each fragment with a MAC over its
            header and data (AES-256-GMAC under a key of the fragment's own, derived from this
            secret with BLAKE3; the ``auth`` extra), and get refuses any group whose MAC does not
            verify, so a writer without the key cannot make a reader accept its KV. None
            (default): no MAC; checksums then catch accidents, not forgeries.
        gds: read fragments for CUDA devices straight into GPU memory with GPUDirect
            Storage (``torch.cuda.gds``). Off by default; where the platform cannot, the
            first failure is logged and reads go through pinned staging as usual.
        network_fs: whether the root is on a network or FUSE file system that other nodes
            write (NFS, GlusterFS, CephFS, Lustre, ...). None (default): decided from the
            root's file system type in /proc/self/mounts. True: fragments are read with
            ``pread`` instead of a memory map (a file another node removes mid-read is then
            an error and a shorter prefix, not SIGBUS), damage is confirmed by a second read
            before a group is moved aside, and capacity is the whole store's (``vua gc``).
            False: a local file system; reads use the memory map.
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
    network_fs: bool | None = None
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
        row = single_row(tokens)
        n, s = row.shape[0], self.split_factor
        if n % s:
            # The same config trims right: the class's default split factor may not be this one's.
            trim = "VUAConfig" if isinstance(self, type) else "config"
            raise SplitFactorError(
                f"tokens_to_paths got {n} tokens, not a multiple of split_factor={s}; "
                f"cut them with {trim}.trim_to_split_factor(tokens) on this same config (here to {n - n % s})"
            )
        return [key.hex() for key in group_keys(int64_ids(row), s, namespace_seed(self.namespace))]

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


def check_config(config: VUAConfig) -> None:
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
    if config.network_fs is not None and not isinstance(config.network_fs, bool):
        fail("network_fs", "None (detect from the file system type), True or False")
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
