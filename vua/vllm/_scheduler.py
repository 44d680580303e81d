"""The scheduler side: how much of a prompt is stored, and each step's loads and saves for the workers.

The scheduler never waits on a shared store: there a lookup runs as a bounded call (it
probes the tree, which a hung file system would freeze) and, while it runs, vLLM is told
"not known yet" (``None``) and asks again next step, the other requests being scheduled
meanwhile; past ``lookup_timeout`` the answer is a miss and the store is unhealthy (skipped
for ``unhealthy_seconds``); on a local root it reads the local index and disk in place. With asynchronous loads (the default) a hit is reported as
``(tokens, True)``: vLLM keeps the request out of the batch until the workers report its
load over.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from vua.core import VUA
from vua.integration import BoundedCalls, StoreHealth
from vua.vllm._metadata import LoadSpec, RequestState, SaveSpec, VUAConnectorMetadata
from vua.vllm._settings import ConnectorSettings

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# How long the scheduler waits for a lookup before answering "not known yet": an index
# lookup takes well under a millisecond, so only a slow file system makes vLLM ask again.
_INLINE_WAIT_SECONDS = 0.005


class SchedulerSide:
    """Answers from the index alone (no fragment is read on the scheduler's path), for every rank."""

    def __init__(self, settings: ConnectorSettings):
        self.settings = settings
        # A hit counts only if every tensor-parallel rank has its shard.
        self.rank_stores: list[VUA] = [settings.open_store(rank) for rank in range(settings.tp_size)]
        self._pending_loads: dict[str, int] = {}  # request -> tokens to load, until its blocks are known
        self._requests: dict[str, RequestState] = {}
        self.health = StoreHealth(settings.root, cooldown=settings.unhealthy_seconds)
        self._bounded = BoundedCalls(self.health, name="vua-lookup")
        self._shared = any(store.network_fs for store in self.rank_stores)  # lookups may hang there
        self._lookups: dict[str, tuple[Future[int], float]] = {}  # request -> its lookup running, and its deadline
        self._answers: dict[str, tuple[int, int]] = {}  # request -> (tokens stored, vLLM's computed) until admitted
        self._async_new: list[LoadSpec] = []  # asynchronous loads for the next step's metadata
        self._async_loading: dict[str, int] = {}  # request -> where its load ends, until it is scheduled
        if settings.load_failure_policy != "recompute":
            logger.warning(
                "VUAConnector: vLLM's kv_load_failure_policy is %r: a request whose stored KV fails "
                "verification (damaged, or removed by another node mid-read) fails with an error instead of "
                'being computed. Add "kv_load_failure_policy": "recompute" to --kv-transfer-config.',
                settings.load_failure_policy,
            )

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` that every rank has stored, and whether they load asynchronously;
        None while the lookup runs (vLLM asks again next step)."""
        split = self.settings.split_factor
        req_id = request.request_id
        prompt = list(request.prompt_token_ids or [])
        limit = (len(prompt) - 1) // split * split  # the last token must run
        if limit <= num_computed_tokens:
            return 0, False
        if self._async_loading.pop(req_id, None) is not None:
            # vLLM asks again only after the asynchronous load failed (cut at its deadline, or
            # a group that failed a check): this request is computed.
            self._answers[req_id] = (0, num_computed_tokens)
        stored = self._stored_tokens(req_id, prompt[:limit])
        if stored is None:
            return None, False
        self._answers[req_id] = (stored, num_computed_tokens)
        new = max(0, stored - num_computed_tokens)
        return new, new > 0 and self.settings.load_mode == "async"

    def _stored_tokens(self, req_id: str, prompt: list[int]) -> int | None:
        """The request's stored prefix (every rank's), from a bounded lookup on a shared root; None while it runs.

        On a local root the lookup reads the local index and disk, and runs here: a thread
        hop would only make vLLM ask again when the machine is busy.
        """
        if req_id in self._answers:
            return self._answers[req_id][0]
        tokens = torch.tensor(prompt, dtype=torch.long)
        if not self._shared:
            return self._lookup(tokens) if self.health.usable() else 0
        running = self._lookups.get(req_id)
        if running is None:
            future = self._bounded.submit(lambda: self._lookup(tokens))
            if future is None:  # the store is unhealthy: a miss, at once
                return 0
            running = self._lookups[req_id] = (future, time.monotonic() + self.settings.lookup_timeout)
        future, deadline = running
        concurrent.futures.wait([future], timeout=_INLINE_WAIT_SECONDS)
        if not future.done() and time.monotonic() < deadline:
            return None
        del self._lookups[req_id]
        # Past the deadline this answers 0 at once and marks the store unhealthy.
        return self._bounded.result(future, timeout=0, default=0, what="the scheduler's lookup")

    def _lookup(self, tokens: torch.Tensor) -> int:
        return min(store.prefix_length(tokens) for store in self.rank_stores)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        req_id = request.request_id
        _, computed = self._answers.pop(req_id, (0, 0))  # vLLM's own tokens when it asked
        if num_external_tokens <= 0:
            return
        if self.settings.load_mode != "async":
            self._pending_loads[req_id] = num_external_tokens
            return
        # The request waits outside the batch; the workers start its load with the next step's
        # metadata, into every block it holds (vLLM's own from ``computed`` on are skipped).
        end = computed + num_external_tokens
        prompt = list(request.prompt_token_ids or [])[:end]
        block_ids = [list(group) for group in blocks.get_block_ids()]
        self._async_new.append(LoadSpec(req_id, prompt, block_ids, computed, end))
        self._async_loading[req_id] = end

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> VUAConnectorMetadata:
        meta = VUAConnectorMetadata(loads=self._async_new)
        self._async_new = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            blocks = [list(group) for group in new.block_ids]
            state = self._requests[new.req_id] = RequestState(list(new.prompt_token_ids or []), blocks)
            # A request whose asynchronous load landed: its groups are stored already.
            state.saved_upto = (
                self._async_loading.pop(new.req_id, 0) // self.settings.split_factor * self.settings.split_factor
            )
            self._plan(meta, new.req_id, state, new.num_computed_tokens, scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            known = self._requests.get(req_id)
            if known is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new_blocks is not None:
                known.blocks = [list(group) for group in new_blocks]  # a resumed request gets its blocks anew
            elif new_blocks is not None:
                for group, added in zip(known.blocks, new_blocks):
                    group.extend(added)
            self._plan(meta, req_id, known, cached.num_computed_tokens[i], scheduled.get(req_id, 0))
        return meta

    def _plan(
        self, meta: VUAConnectorMetadata, req_id: str, state: RequestState, computed: int, scheduled: int
    ) -> None:
        """Adds a request's load (tokens found in the store) and the save of the groups this step completes."""
        split = self.settings.split_factor
        # vLLM went back (a load error, or a preempted request recomputed): the groups from
        # there on are computed again and saved again (the worker skips those stored).
        state.saved_upto = min(state.saved_upto, computed // split * split)
        external = self._pending_loads.pop(req_id, 0)
        complete = min(computed + scheduled, len(state.prompt)) // split * split
        if not external and complete <= state.saved_upto:
            return  # most steps (decoding): nothing to load or save
        blocks = [list(group) for group in state.blocks]  # this step's block tables, as the workers get them
        if external:
            meta.loads.append(LoadSpec(req_id, state.prompt[:computed], blocks, computed - external, computed))
            state.saved_upto = max(state.saved_upto, computed)  # loaded groups are stored already
        if complete > state.saved_upto:
            meta.saves.append(SaveSpec(req_id, state.prompt[:complete], blocks, state.saved_upto))
            state.saved_upto = complete

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """A worker's load that passed its deadline makes the store unhealthy here too: lookups
        are skipped, so requests are not sent to wait out deadlines one after another."""
        stats = getattr(connector_output, "kv_connector_stats", None)
        data = getattr(stats, "data", None) or {}
        if data.get("loads_timed_out") or data.get("unhealthy_periods"):
            self.health.failed("a worker's load passed its deadline")

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy out of the blocks within the step, so vLLM may free them now. A request
        # aborted while loading keeps its blocks until the workers report its load over
        # (vLLM holds them for a request in WAITING_FOR_REMOTE_KVS), so False holds there too.
        req_id = request.request_id
        self._requests.pop(req_id, None)
        self._pending_loads.pop(req_id, None)
        self._answers.pop(req_id, None)
        self._lookups.pop(req_id, None)
        self._async_loading.pop(req_id, None)
        return False, None

    def shutdown(self) -> None:
        self._bounded.shutdown()
        for store in self.rank_stores:
            store.close()
