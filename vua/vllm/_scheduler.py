"""The scheduler side: how much of a prompt is stored, and each step's loads and saves for the workers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from vua.core import VUA
from vua.vllm._metadata import LoadSpec, RequestState, SaveSpec, VUAConnectorMetadata
from vua.vllm._settings import ConnectorSettings

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class SchedulerSide:
    """Answers from the index alone (no fragment is read on the scheduler's path), for every rank."""

    def __init__(self, settings: ConnectorSettings):
        self.settings = settings
        # A hit counts only if every tensor-parallel rank has its shard.
        self.rank_stores: list[VUA] = [settings.open_store(rank) for rank in range(settings.tp_size)]
        self._pending_loads: dict[str, int] = {}  # request -> tokens to load, until its blocks are known
        self._requests: dict[str, RequestState] = {}
        if settings.load_failure_policy != "recompute":
            logger.warning(
                "VUAConnector: vLLM's kv_load_failure_policy is %r: a request whose stored KV fails "
                "verification (damaged, or removed by another node mid-read) fails with an error instead of "
                'being computed. Add "kv_load_failure_policy": "recompute" to --kv-transfer-config.',
                settings.load_failure_policy,
            )

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` that every rank has stored."""
        split = self.settings.split_factor
        prompt = list(request.prompt_token_ids or [])
        limit = (len(prompt) - 1) // split * split  # the last token must run
        if limit <= num_computed_tokens:
            return 0, False
        tokens = torch.tensor(prompt[:limit], dtype=torch.long)
        stored = min(store.prefix_length(tokens) for store in self.rank_stores)
        return max(0, stored - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._pending_loads[request.request_id] = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> VUAConnectorMetadata:
        meta = VUAConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            blocks = [list(group) for group in new.block_ids]
            state = self._requests[new.req_id] = RequestState(list(new.prompt_token_ids or []), blocks)
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

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        # Saves copy out of the blocks within the step, so vLLM may free them now.
        self._requests.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    def shutdown(self) -> None:
        for store in self.rank_stores:
            store.close()
