"""What the scheduler side tells the worker side each step, and what it remembers per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class LoadSpec:
    """Load tokens [start, end) of a request from the store into its blocks."""

    req_id: str
    token_ids: list[int]  # the prompt up to ``end``
    block_ids: list[int]
    start: int
    end: int


@dataclass
class SaveSpec:
    """Store the whole groups of a request's computed prompt, read from its blocks."""

    req_id: str
    token_ids: list[int]  # the prompt cut to whole groups
    block_ids: list[int]


@dataclass
class VUAConnectorMetadata(KVConnectorMetadata):
    """One step's loads and saves, built by the scheduler side for the workers."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class RequestState:
    """A running request as the scheduler side tracks it."""

    prompt: list[int]
    blocks: list[int]  # its KV cache blocks, in token order
    saved: bool = False  # its prompt's save was planned
