"""What the scheduler side tells the worker side each step, and what it remembers per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LoadSpec:
    """Load tokens [start, end) of a request from the store into its blocks."""

    req_id: str
    token_ids: list[int]  # the prompt up to ``end``
    block_ids: list[list[int]]  # per KV cache group; vLLM's null block where a group keeps none
    start: int
    end: int


@dataclass
class SaveSpec:
    """Store the groups of a request's prompt that this step completes, [start, len(token_ids)), read from its blocks.

    Sliding-window layers free a prompt's early blocks while later chunks are prefilled,
    so each group is saved in the step that computes its last token, not when the prompt
    is done.
    """

    req_id: str
    token_ids: list[int]  # the prompt up to the end of the last group completed this step
    block_ids: list[list[int]]  # per KV cache group
    start: int  # the first token not planned for saving before (a group boundary)


@dataclass
class VUAConnectorMetadata(KVConnectorMetadata):
    """One step's loads and saves, built by the scheduler side for the workers."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class RequestState:
    """A running request as the scheduler side tracks it."""

    prompt: list[int]
    blocks: list[list[int]]  # its KV cache blocks per KV cache group, in token order
    saved_upto: int = 0  # tokens whose save is planned (whole groups)
