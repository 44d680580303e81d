"""Shared test helpers: temporary stores, random KV in the transformers legacy layout, and the
one place tests reach into a store's internals (issue 22).

Tests use the public API (``vua.core``, ``vua.errors``, ``vua.integration``, ``vua.serdes``,
the ``vua`` command through :func:`run_cli`). What it cannot show or do is here, in small
functions named for what a test needs: where a group's files are, what a fragment's header
says, a forged fragment, the index's records and files, the tree's directory making. Only
unit tests of one private module and fault injection that patches the one function it
breaks import a private module themselves (tests/test_layering.py holds the list).

torch and the store are imported where used, so a child process that needs only the file
system helpers (tests/test_glusterfs.py's directory makers) starts at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import unittest
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple
from unittest import mock

import lmdb

from vua import _bookkeeping, _evict, _files, _generations, _index, _keys, _layout, _lmdb_pages, _mac, _publish
from vua._fragment import Fragment
from vua._record import GroupRecord
from vua.cli import main

if TYPE_CHECKING:
    import torch

    from vua._kv_layout import Layout
    from vua.core import VUA, VUAConfig

# A decoder small enough to build from a config in milliseconds (no hub, random weights),
# for the transformers tests and the local model directory vLLM's configs read.
TINY_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=1024,
)


def random_kv(
    batch: int,
    seq: int,
    *,
    layers: int = 3,
    heads: int = 2,
    head_dim: int = 8,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value), each (batch, heads, seq, head_dim), reproducible from ``seed`` (float32 by default)."""
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(seed)

    def one() -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype)
        return torch.randint(-100, 100, (batch, heads, seq, head_dim), generator=gen).to(dtype)

    return [(one(), one()) for _ in range(layers)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN-safe, works for fp8)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def overwrite(path: str, offset: int, data: bytes) -> None:
    """Damages a file in place: writes ``data`` at ``offset`` (negative: from the end). Every test's byte damage goes through here."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        f.write(data)


def flip_byte(path: str, offset: int, mask: int = 0x01) -> None:
    """XORs ``mask`` into the byte at ``offset`` (negative: from the end)."""
    with open(path, "rb") as f:
        f.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        byte = f.read(1)[0]
    overwrite(path, offset, bytes([byte ^ mask]))


def rewrite_header(path: str, edit: Callable[[dict], object]) -> None:
    """Replaces a fragment's JSON header by ``edit(header dict)``, keeping the header's length.

    ``edit`` changes the dict in place (returning None) or returns the new header as text or
    bytes. Raises ValueError when the new header does not fit the old one's length.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        body = json.loads(f.read(length))
    result = edit(body)
    text = json.dumps(body, separators=(",", ":")) if result is None else result
    raw = text.encode() if isinstance(text, str) else bytes(text)  # type: ignore[arg-type]
    if len(raw) > length:
        raise ValueError("edited header does not fit")
    overwrite(path, 8, raw + b" " * (length - len(raw)))


def kv_slice(kv, row: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (1, heads, n, head_dim) slice of batch row ``row``, as get_closest returns it."""
    return [(k[row : row + 1, :, :n], v[row : row + 1, :, :n]) for k, v in kv]


def listing(root: str) -> list[tuple[str, int]]:
    """Every file under ``root`` with its size, the index excluded (it is a cache)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.endswith(".lmdb")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            out.append((os.path.relpath(path, root), os.path.getsize(path)))
    return sorted(out)


# -- real file systems for faults: need root, and skip the test without it ------------------


def read_only_mount(test: unittest.TestCase, path: str) -> str:
    """``path`` bind-mounted read-only at a fresh directory (writes fail with EROFS, even for
    root); unmounted at the test's cleanup."""
    mount = tempfile.mkdtemp(prefix="vua-ro-mount-")
    test.addCleanup(os.rmdir, mount)  # cleanups run last-in first-out: after the umount
    bound = subprocess.run(["mount", "--bind", path, mount], capture_output=True, text=True)
    if bound.returncode:
        test.skipTest(f"cannot bind-mount here (needs root): {bound.stderr.strip()}")
    test.addCleanup(subprocess.run, ["umount", "-l", mount], check=True)
    remounted = subprocess.run(["mount", "-o", "remount,bind,ro", mount], capture_output=True, text=True)
    if remounted.returncode:
        test.skipTest(f"cannot remount read-only here: {remounted.stderr.strip()}")
    return mount


def small_tmpfs(test: unittest.TestCase, path: str, size: str) -> str:
    """A tmpfs of ``size`` (e.g. "64k") mounted at the new directory ``path``, to fill up for
    real ENOSPC; unmounted at the test's cleanup."""
    os.mkdir(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    if mounted.returncode != 0:
        test.skipTest(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    test.addCleanup(subprocess.run, ["umount", "-l", path])
    return path


class StoreTestCase(unittest.TestCase):
    """A test case with a fresh temporary root per test and a ``store()`` factory."""

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="vua-test-")
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def store(self, config: VUAConfig | type[VUAConfig] | None = None, root: str | None = None, **kwargs) -> VUA:
        from vua.core import VUA, VUAConfig

        if config is None:
            config = VUAConfig(split_factor=kwargs.pop("split_factor", 16), **kwargs)
        vua = VUA(config, root or self.root)
        self.addCleanup(vua.close)
        return vua

    def assertHit(self, hit, groups: int, kv, split: int = 16) -> None:
        """Asserts ``hit`` holds exactly the first ``groups`` groups of ``kv`` (None when 0)."""
        if groups == 0:
            self.assertIsNone(hit)
            return
        self.assertIsNotNone(hit)
        self.assertEqual(hit.tokens.numel(), groups * split)
        self.assertKVEqual(hit.data, kv_slice(kv, 0, groups * split))

    def assertKVEqual(self, got, expected) -> None:
        self.assertEqual(len(got), len(expected))
        for i, ((gk, gv), (ek, ev)) in enumerate(zip(got, expected)):
            self.assertTrue(same_bits(gk, ek), f"layer {i} key differs")
            self.assertTrue(same_bits(gv, ev), f"layer {i} value differs")


def prefix_kv(
    tokens: torch.Tensor, *, layers: int = 2, heads: int = 2, head_dim: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV that depends on every token before a position, as a real model's does.

    Any process can recompute it from the tokens alone, so a reader checks a hit against
    exactly what a writer must have put. Shaped (1, heads, n, head_dim), float32.
    """
    import torch

    ids = tokens.reshape(-1).to(torch.float64)
    running = torch.cumsum(ids * 1.000001, 0) % 1e6  # (n,)
    out = []
    for layer in range(layers):
        base = running[None, None, :, None] + torch.arange(heads * head_dim, dtype=torch.float64).view(
            1, heads, 1, head_dim
        )
        out.append(((base + layer).float(), (base - layer).float()))
    return out


def check_hit(hit, query: torch.Tensor) -> int:
    """Asserts a hit holds exactly prefix_kv of its tokens; returns its length (0 for None)."""
    import torch

    if hit is None:
        return 0
    n = hit.tokens.shape[-1]
    assert torch.equal(hit.tokens.reshape(-1), query.reshape(-1)[:n]), "hit tokens are not a prefix of the query"
    expected = prefix_kv(
        query.reshape(-1)[:n], layers=len(hit.data), heads=hit.data[0][0].shape[1], head_dim=hit.data[0][0].shape[3]
    )
    for (k, v), (ek, ev) in zip(hit.data, expected):
        assert torch.equal(k, ek) and torch.equal(v, ev), "hit data differs from what was put"
    return n


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Runs ``vua ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def run_cli_json(*argv: str) -> tuple[int, dict]:
    """Runs ``vua ARGV --json`` in this process: (exit status, the JSON document it printed)."""
    status, out, _ = run_cli(*argv, "--json")
    return status, json.loads(out)


def layout_of(kv: list[tuple[torch.Tensor, torch.Tensor]], split: int = 16) -> Layout:
    """The layout a put of ``kv`` (batch 1) stores."""
    import torch

    from vua._inputs import checked_put

    tokens = torch.zeros(kv[0][0].shape[2] // split * split, dtype=torch.long)
    return checked_put(tokens, kv, 0, split)[1]


# -- where a store keeps things (docs/architecture.md: ROOT/<2 hex>/<32 hex key>/kv.safetensors) --

FRAGMENT_FILE = _layout.FRAGMENT_FILE  # a group's fragment, in its directory
WRITING_PREFIX = _layout.WRITING_PREFIX  # a writer's unpublished fragment, beside it
TMP_PREFIX = _layout.TMP_PREFIX  # a group moved aside (or a directory maker's lock), in a fan-out directory
INDEX_DIR = _layout.DEFAULT_INDEX_DIR  # the index under the root, unless VUAConfig.index_path says otherwise
EVICTED = _evict.EVICTED  # the word in an evicted group's name in the trash


def fragment_path(root: str, key_hex: str) -> str:
    """The fragment file of the group ``key_hex`` (a hex key from ``VUAConfig.tokens_to_paths``)."""
    return _layout.fragment_path(root, key_hex)


def group_dir(root: str, key_hex: str) -> str:
    """The directory of the group ``key_hex``."""
    return _layout.group_dir(root, key_hex)


def fanout_dir(root: str, key_hex: str) -> str:
    """The fan-out directory holding the group ``key_hex`` (and groups whose keys start alike)."""
    return _layout.fanout_dir(root, key_hex)


def fanout_dirs(root: str) -> list[str]:
    """Every fan-out directory of the tree."""
    return list(_layout.iter_fanout_dirs(root))


def fragment_files(root: str) -> list[str]:
    """Every published fragment file in the tree."""
    return [
        os.path.join(group, FRAGMENT_FILE) for fanout in fanout_dirs(root) for _, group in _layout.iter_groups(fanout)
    ]


def temporaries(root: str) -> list[str]:
    """Every temporary in the tree: in fan-out directories, and writers' files in group directories."""
    found = []
    for fanout in _layout.iter_fanout_dirs(root):
        found.extend(_layout.iter_temporaries(fanout))
        for _, group in _layout.iter_groups(fanout):
            found.extend(_layout.iter_writing(group))
    return found


def file_system_type(path: str) -> str:
    """The type of the file system ``path`` is on, as the store tells network file systems apart."""
    return _files.file_system_type(path)


# -- fragments: what their headers say, and forgeries ---------------------------------------


def fragment_metadata(path: str) -> dict[str, str]:
    """A fragment's metadata, the header read and validated completely as a reader opens it.

    Raises:
        FragmentError: what a reader refuses; its state says missing, damaged or unreadable.
    """
    with Fragment(path) as fragment:
        return dict(fragment.metadata)


def fragment_word_sums(path: str) -> list[int] | None:
    """The word sums a fragment stores for its K and V tensors, in file order (None: it stores none)."""
    with Fragment(path) as fragment:
        return fragment.wordsums


class TensorBytes(NamedTuple):
    """Where one stored tensor's bytes lie in its fragment file."""

    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def fragment_kv_tensors(path: str) -> dict[str, TensorBytes]:
    """Every K and V tensor of a fragment, in file order (K0, V0, K1, ...): its shape and bytes' place."""
    with Fragment(path) as fragment:
        return {
            name: TensorBytes(fragment.tensors[name].shape, fragment.tensors[name].begin, fragment.tensors[name].end)
            for name in fragment.kv_names
        }


def verify_fragment_checksums(path: str) -> None:
    """Checks every K and V tensor of a fragment against its stored xxh3 checksum, as a host read does.

    Raises:
        FragmentError: a checksum does not match (or the fragment cannot be opened).
    """
    with Fragment(path) as fragment:
        for name in fragment.kv_names:
            fragment.verify_checksum(name)


def chain_start(namespace: str) -> str:
    """The parent (hex) that group 0's fragment names: where every key chain of ``namespace`` starts."""
    return _keys.namespace_seed(namespace).hex()


def forge_group(
    root: str,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    tokens: torch.Tensor,
    group: int,
    *,
    key_hex: str,
    parent_hex: str,
    namespace: str,
    split: int = 16,
    auth_key: bytes | None = None,
    host_word_sums: bool = False,
    edit_header: Callable[[bytes], bytes] | None = None,
) -> None:
    """Puts a forged fragment in the place of the group ``key_hex``, as a writer of this version writes one.

    The fragment holds group ``group`` of ``tokens`` and of ``kv`` (batch 1), names ``key_hex``
    and ``parent_hex``, and carries valid xxh3 checksums (and word sums with
    ``host_word_sums``); it is sealed with ``auth_key`` (a store's secret) or left unsealed.
    ``edit_header`` rewrites the encoded header before it is written. The group's directory
    is moved aside first (to ``ROOT/moved-KEY``), so the forgery is published in a fresh one.
    """
    from vua._writer import GroupSource

    source = GroupSource(
        kv,
        layout_of(kv, split),
        split,
        namespace,
        host_wordsums=host_word_sums,
        mac_key=None if auth_key is None else _mac.mac_key(auth_key),
    )
    header, buffers = source.fragment(_keys.tokens_as_int64(tokens), 0, group, key_hex, parent_hex)
    if edit_header is not None:
        header = edit_header(header)
    os.rename(group_dir(root, key_hex), os.path.join(root, f"moved-{key_hex}"))
    if not _publish.publish_fragment(root, key_hex, header, buffers):
        raise AssertionError(f"group {key_hex} was published again meanwhile")


def keyed_blake3_mac(auth_key: bytes, fragment: bytes) -> str:
    """The MAC the first authenticated stores wrote (keyed BLAKE3, no ``mac_alg``) over a
    fragment's bytes whose ``mac`` value reads as 64 zeros."""
    return _mac.mac_value(_mac.mac_key(auth_key), _mac.BLAKE3, "0" * 64, fragment, [])


@contextlib.contextmanager
def fragment_reads() -> Iterator[list[int]]:
    """Records the bytes of every read of a fragment into a caller's buffers (pread, network
    roots) while active: one count per call, in the list yielded."""
    real_read_into = Fragment.read_into
    counts: list[int] = []

    def counting(fragment, buffers, offset):
        counts.append(sum(len(b) for b in buffers))
        return real_read_into(fragment, buffers, offset)

    with mock.patch.object(Fragment, "read_into", counting):
        yield counts


def wait_until(condition: Callable[[], bool], seconds: float = 60.0) -> bool:
    """Polls ``condition`` until it holds (True) or ``seconds`` have passed (False)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@contextlib.contextmanager
def frozen_file_system(root: str, *, every_open: bool = False, probes: bool = False) -> Iterator[threading.Event]:
    """A file system that stops answering, as a frozen network server does: while active, every
    open of a fragment under ``root`` (with ``every_open``, of any file there: a put's too; with
    ``probes``, every existence check there) blocks until the event yielded is set, as a thread
    inside a FUSE or hard NFS wait does. Leaving the block sets it, so the blocked threads go on
    (the server answers again)."""
    answer = threading.Event()
    real_open, real_lexists = os.open, os.path.lexists

    def under_root(path: object) -> bool:
        return isinstance(path, str) and path.startswith(root)

    def frozen_open(path, *args, **kwargs):
        if under_root(path) and (every_open or path.endswith(_layout.FRAGMENT_FILE)):
            answer.wait()
        return real_open(path, *args, **kwargs)

    def frozen_lexists(path):
        if probes and under_root(path):
            answer.wait()
        return real_lexists(path)

    try:
        with mock.patch.object(os, "open", frozen_open), mock.patch.object(os.path, "lexists", frozen_lexists):
            yield answer
    finally:
        answer.set()


@contextlib.contextmanager
def counting_host_word_sums() -> Iterator[mock.MagicMock]:
    """Counts the word sums computed on the host while active: the mock yielded wraps the function."""
    from vua import _wordsum

    with mock.patch.object(_wordsum, "host_wordsum", wraps=_wordsum.host_wordsum) as spy:
        yield spy


def open_stored_prefix(store: VUA, tokens: torch.Tensor) -> list[Fragment]:
    """The fragments of the stored prefix of ``tokens``, opened and validated as a get opens
    them (memory-mapped on a local root) and left open: the caller closes each."""
    ids = _keys.tokens_as_int64(tokens)
    keys = _keys.group_keys(ids, store.config.split_factor, store._seed)
    return store._catalog.open_prefix(keys, ids)[0]


# -- the tree: removing groups, making directories ------------------------------------------


def evict_group(root: str, key_hex: str, *, keep: bool = False) -> None:
    """Evicts one group from the tree as gc does (``keep``: leaves it in the trash, as on a shared root)."""
    _evict.evict_group(root, key_hex, keep=keep)


def quarantine_group(root: str, key_hex: str) -> bool:
    """Moves a damaged group aside as a reader that found the damage does; True if this call moved it."""
    return _publish.quarantine_group(root, key_hex)


def make_dir(path: str) -> bool:
    """Makes a directory as every put and store opening does (one maker at a time); True if this call made it."""
    return _publish.make_dir(path)


def lock_dir(path: str) -> str | None:
    """Takes the lock a maker of directory ``path`` holds; its path, or None when another holds it."""
    return _publish._lock_dir(path)


@contextlib.contextmanager
def mkdir_lock_wait(seconds: float) -> Iterator[None]:
    """While active, a directory maker takes over a lock held longer than ``seconds`` (its holder died)."""
    with mock.patch.object(_publish, "_MKDIR_WAIT_SECONDS", seconds):
        yield


# -- the store's index, which tests inspect and damage -----------------------------------

INDEX_CURRENT_FILE = _generations.CURRENT_FILE  # names the live generation
INDEX_LOCK_FILE = _generations.LOCK_FILE  # a rebuild's lock


def index_records(store: VUA) -> dict[bytes, GroupRecord | None]:
    """Every index entry of the store: key -> record (None for garbage)."""
    return dict(store._index.items())


def index_total_bytes(store: VUA) -> int:
    return store._index.total_bytes()


def indexed_groups(store: VUA, keys: list[bytes]) -> int:
    """How many leading groups of ``keys`` the store's index itself records (no tree probe)."""
    return len(store._index.lookup_prefix(keys))


def forget_in_index(store: VUA, keys: list[bytes]) -> None:
    """Drops groups from the index only, as if another node had written them."""
    store._index.remove(keys)


def index_env(store: VUA) -> tuple[lmdb.Environment, lmdb._Database, lmdb._Database]:
    """The index's LMDB environment and its groups and meta databases, for injecting damage."""
    return store._index.env()


@contextlib.contextmanager
def opened_index(index_path: str, root: str) -> Iterator[tuple[lmdb.Environment, lmdb._Database, lmdb._Database]]:
    """The index at ``index_path`` opened afresh, without a store (as the vua command opens it):
    its LMDB environment and groups and meta databases; closed on exit."""
    index = _index.Index(index_path, root)
    try:
        yield index.env()
    finally:
        index.close()


def index_records_at(index_path: str, root: str) -> dict[bytes, GroupRecord | None]:
    """Every entry of the index at ``index_path`` (opened without a store): key -> record (None for garbage)."""
    index = _index.Index(index_path, root)
    try:
        return dict(index.items())
    finally:
        index.close()


def edited_record(raw: bytes, **fields: int) -> bytes:
    """An index record's bytes with ``fields`` (GroupRecord's: namespace_id, layout_id, nbytes,
    group_index, last_used) replaced: a record that lies."""
    record = GroupRecord.unpack(raw)
    assert record is not None, "not a record"
    return record._replace(**fields).pack()


def index_generation(index_path: str) -> str | None:
    """The directory of the index's live generation (LMDB's data.mdb and lock.mdb); None when
    CURRENT names none a reader would open."""
    name = _generations.read_current(index_path)
    return None if name is None else os.path.join(index_path, name)


def index_data_file_is_sound(path: str) -> bool:
    """Whether the LMDB data file at ``path`` passes the check made before LMDB may map it."""
    try:
        _lmdb_pages.check_data_file(path)
    except _lmdb_pages.DamagedIndexError:
        return False
    return True


@contextlib.contextmanager
def index_writes_fail(error: BaseException) -> Iterator[None]:
    """While active, every write transaction of an index that records uses or adds groups
    raises ``error`` (what LMDB raises on a full file system), and uses are written at once."""
    with (
        mock.patch.object(_index, "_touch_in", side_effect=error),
        mock.patch.object(_index, "adjust_total", side_effect=error),
        mock.patch.object(_bookkeeping, "_TOUCH_FLUSH_SECONDS", 0.0),
    ):
        yield


@contextlib.contextmanager
def initial_index_map_size(nbytes: int) -> Iterator[None]:
    """While active, a new index's LMDB map starts at ``nbytes`` (it grows by doubling when full)."""
    with mock.patch.object(_generations, "_INITIAL_MAP_SIZE", nbytes):
        yield
