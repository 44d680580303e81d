"""VUA's loads and saves in vLLM's own stats: the periodic "KV Transfer metrics" log line and Prometheus."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from vua.core import StoreStats

# The asynchronous loads' counters (the worker's), then the bounded calls' and the save queue's.
LOAD_COUNTERS = ("loads_timed_out", "load_bytes_abandoned", "loads_failed")
HEALTH_COUNTERS = ("unhealthy_periods", "lookups_skipped", "lookups_timed_out", "saves_dropped")
# The store's counters, then the connector's own.
FIELDS = (
    [f.name for f in fields(StoreStats)]
    + ["load_error_blocks", "saves_dropped_at_shutdown"]
    + list(LOAD_COUNTERS)
    + list(HEALTH_COUNTERS)
)

_HELP = {
    "lookups": "Loads VUA was asked for (hits or not).",
    "lookup_tokens": "Tokens VUA loads asked about, in whole groups.",
    "hit_tokens": "Tokens VUA loaded and verified.",
    "groups_loaded": "Groups VUA loaded and verified.",
    "bytes_loaded": "K/V bytes VUA loaded and verified.",
    "load_seconds": "Seconds VUA spent loading.",
    "load_errors": "Groups that failed a read or a check in VUA (the prefix ended before them).",
    "groups_saved": "Groups VUA published.",
    "bytes_saved": "Bytes of the fragments VUA published.",
    "save_seconds": "Seconds VUA spent saving.",
    "load_error_blocks": "Blocks the VUA connector reported as load errors (vLLM recomputes them).",
    "saves_dropped_at_shutdown": "Prompt saves abandoned when the engine shut down.",
    "loads_timed_out": "Asynchronous loads cut at their deadline (load_timeout); their requests were computed.",
    "load_bytes_abandoned": "K/V bytes of loads cut at their deadline that did not land.",
    "loads_failed": "Asynchronous loads that did not land every planned group (vLLM recomputed the request).",
    "unhealthy_periods": "Times the store stopped answering in time and was skipped for unhealthy_seconds.",
    "lookups_skipped": "Loads and lookups skipped because the store was unhealthy.",
    "lookups_timed_out": "Lookups answered as misses at their deadline (lookup_timeout).",
    "saves_dropped": "Prompt saves dropped to keep the save queue within save_queue_bytes.",
}


@dataclass
class VUAConnectorStats(KVConnectorStats):
    """Counter increments since the last report, summed over workers (``data``: field -> value)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = dict.fromkeys(FIELDS, 0)

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {
            f"vua_{name}": round(value, 3) if isinstance(value, float) else value
            for name, value in self.data.items()
            if value
        }


class VUAPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per field, ``vllm:vua_<field>_total``, labelled per engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            name: self._counter_cls(name=f"vllm:vua_{name}_total", documentation=_HELP[name], labelnames=labelnames)
            for name in FIELDS
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in transfer_stats_data.items():
            counter = self.counters.get(name)
            if counter is not None and value:
                counter.labels(*labels).inc(value)
