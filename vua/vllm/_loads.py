"""The worker's asynchronous loads: a request's stored prefix read off the engine's path, under a deadline.

vLLM keeps a request whose KV loads asynchronously out of the running batch
(WAITING_FOR_REMOTE_KVS) until the connector reports it finished, so other requests' steps
never wait for the store. Each load runs on a thread of its own:

1. ``VUA.load`` reads and verifies a chunk of groups into memory of the load's own (host
   memory, or device memory for CUDA caches), never into vLLM's blocks: a read that hangs in
   the file system and returns after the deadline can then only write memory nobody else
   uses;
2. under the load's lock, unless the load was cancelled, the verified groups are copied into
   the request's blocks (a memory copy, which cannot hang), chunk after chunk.

Each step the worker polls (:meth:`AsyncLoads.poll`): a load that is done is reported; one
past its deadline, or whose request was aborted, is cancelled under its lock, so no byte
lands in the blocks after that, and reported at once. A load that did not land every group
it was planned for is reported failed, and vLLM recomputes the request (the groups that did
land are not trusted to be a prefix vLLM counts).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from vua.core import VUA
from vua.integration import StoreHealth
from vua.vllm._metadata import LoadSpec
from vua.vllm._paged import PagedLayer

logger = logging.getLogger(__name__)

# Groups read per VUA.load: a load lands chunk by chunk, so the memory of its own stays
# bounded and the groups of chunks that landed before a deadline are not read again.
CHUNK_BYTES = 64 << 20


@dataclass
class _Load:
    """One request's asynchronous load, as the polling step and its thread share it."""

    spec: LoadSpec
    offset: int  # the first position read (the group holding spec.start)
    deadline: float  # time.monotonic()
    bytes: int  # K/V bytes planned
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False  # under lock: nothing lands in the blocks any more
    landed_upto: int = 0  # under lock: positions [offset, landed_upto) are in the blocks, verified
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class PollResult:
    """What one poll reports to vLLM: loads over, and which of them failed (to be recomputed)."""

    finished: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    timed_out: int = 0
    bytes_abandoned: int = 0  # planned K/V bytes of timed-out loads that did not land


class AsyncLoads:
    """One worker's loads in flight, each on a thread of its own, landed under a lock, cut at a deadline.

    Args:
        vua: the rank's store.
        layers: the paged layers in the store's layer order.
        group_of_layer: each of those layers' KV cache group (its block table's index).
        split: the store's split factor.
        timeout: seconds a load gets before any byte, plus ``timeout_per_gib`` per GiB it reads.
        health: the store's health: a load past its deadline makes it unhealthy, and loads
            started meanwhile fail at once (the request is computed) instead of each waiting
            out its deadline.
        threads: loads read at once (each also uses the store's copy threads).
    """

    def __init__(
        self,
        vua: VUA,
        layers: list[PagedLayer],
        group_of_layer: list[int],
        split: int,
        *,
        timeout: float,
        timeout_per_gib: float,
        health: StoreHealth,
        threads: int = 2,
    ):
        self.vua = vua
        self._layers = layers
        self._group_of_layer = group_of_layer
        self._split = split
        self._timeout = timeout
        self._timeout_per_gib = timeout_per_gib
        self._health = health
        self._token_bytes = sum(layer.token_bytes for layer in layers)
        self._chunk_groups = max(1, CHUNK_BYTES // max(1, self._token_bytes * split))
        self._device = layers[0].kv.device
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vua-async-load")
        self._loads: dict[str, _Load] = {}
        self._busy = 0  # load threads inside a load (reported or not), under _idle
        self._idle = threading.Condition()

    def start(self, spec: LoadSpec) -> None:
        """Starts loading ``spec``'s positions into its blocks; a later :meth:`poll` reports it."""
        offset = spec.start // self._split * self._split  # the group holding the first position vLLM lacks
        planned = (spec.end - offset) * self._token_bytes
        deadline = time.monotonic() + self._timeout + self._timeout_per_gib * planned / 2**30
        load = self._loads[spec.req_id] = _Load(spec, offset, deadline, planned)
        if not self._health.usable():  # the store is down: compute the request, without waiting a deadline
            load.cancelled = True
            load.done.set()
            return
        with self._idle:
            self._busy += 1
        self._pool.submit(self._run, load)

    def _run(self, load: _Load) -> None:
        spec = load.spec
        try:
            tokens = torch.tensor(spec.token_ids[: spec.end], dtype=torch.long)
            block_ids = [spec.block_ids[g] for g in self._group_of_layer]
            first = load.offset
            while first < spec.end and not load.cancelled:
                end = min(spec.end, first + self._chunk_groups * self._split)
                kv = self.vua.load(tokens[:end], self._device, offset=first)
                groups = 0 if kv is None else kv.wait()
                if kv is None or kv.outputs is None or not groups:
                    break
                with load.lock:
                    if load.cancelled:
                        break
                    self._land(spec, block_ids, first, kv.outputs, groups)
                    load.landed_upto = first + groups * self._split
                if load.landed_upto < end:
                    break  # a group failed a check: the prefix ends there
                first = end
            if not load.cancelled:  # in time: the store answers (a late finish proves nothing)
                self._health.succeeded()
        except OSError as exc:  # the file system refused (ENOTCONN, EIO): not a damaged group
            self._health.failed(f"a load failed: {exc}")
            logger.warning("VUAConnector: loading request %s failed: %s", spec.req_id, exc)
        except Exception:  # a bug must cost a recompute, never a wedged request
            logger.exception("VUAConnector: loading request %s failed", spec.req_id)
        finally:
            load.done.set()
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _land(
        self,
        spec: LoadSpec,
        block_ids: list[list[int]],
        first: int,
        outputs: list[tuple[torch.Tensor, torch.Tensor]],
        groups: int,
    ) -> None:
        """Copies ``groups`` verified groups (positions from ``first`` on) from the load's own outputs into the request's blocks."""
        stream = self._stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self._device))  # after the load's own copies and checks
        n = groups * self._split
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for layer, (k_out, v_out) in enumerate(outputs):  # each (1, heads, tokens, width)
                self._layers[layer].scatter(block_ids[layer], first, k_out[0, :, :n], v_out[0, :, :n], spec.start)
        if stream is not None:
            stream.synchronize()  # in the blocks before the lock is released: a cancel sees all or none

    def poll(self, aborted: set[str]) -> PollResult:
        """Reports the loads that are over: done, past their deadline, or of an aborted request.

        A load cut short here is cancelled under its lock first, so nothing lands in its
        blocks after this returns, and vLLM may give them to another request.
        """
        result = PollResult()
        now = time.monotonic()
        for req_id, load in list(self._loads.items()):
            late = now >= load.deadline
            if not (load.done.is_set() or late or req_id in aborted):
                continue
            with load.lock:
                load.cancelled = True
                landed_upto = load.landed_upto
            del self._loads[req_id]
            result.finished.add(req_id)
            if landed_upto >= load.spec.end:
                continue
            result.failed.add(req_id)
            if late and not load.done.is_set():
                result.timed_out += 1
                result.bytes_abandoned += load.bytes - max(0, landed_upto - load.offset) * self._token_bytes
                self._health.failed(f"a load of {load.bytes / 2**20:.0f} MiB passed its deadline")
                logger.warning(
                    "VUAConnector: request %s's load passed its deadline (%.1f s); it is computed instead",
                    req_id,
                    self._timeout + self._timeout_per_gib * load.bytes / 2**30,
                )
        return result

    def wait(self) -> None:
        """Waits until no load thread is reading, those already reported (cut at a deadline) too.

        For tests (a worker's flush): a thread inside a file system that hangs waits with it.
        """
        with self._idle:
            while self._busy:
                self._idle.wait()

    def shutdown(self) -> None:
        """Cancels every load; a thread inside the file system finishes on its own, landing nothing."""
        for load in self._loads.values():
            with load.lock:
                load.cancelled = True
        self._loads.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
