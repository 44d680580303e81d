"""What a store has done since it opened: counters for loads and saves, for dashboards and vLLM's stats."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import asdict, dataclass


@dataclass
class StoreStats:
    """Cumulative counters of one :class:`vua.core.VUA` (all loads and puts since it opened).

    Attributes:
        lookups: loads asked for (``get_closest``, ``load``), hits or not.
        lookup_tokens: tokens those loads asked about, in whole groups.
        hit_tokens: tokens loaded and verified.
        groups_loaded, bytes_loaded: groups and K/V bytes loaded and verified.
        load_seconds: time from a load's start to its last verified byte.
        load_errors: groups that failed a read or a check while being copied (the prefix
            ended before the first of them; at least one per load cut short).
        groups_saved, bytes_saved: groups published by puts (a group another writer
            published first is not counted).
        save_seconds: time spent in puts.
    """

    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    groups_loaded: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    load_errors: int = 0
    groups_saved: int = 0
    bytes_saved: int = 0
    save_seconds: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


class StatsRecorder:
    """Thread-safe accumulation into a :class:`StoreStats` (loads finish on I/O threads)."""

    def __init__(self) -> None:
        self._stats = StoreStats()
        self._lock = threading.Lock()

    def add(self, **counts: int | float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def snapshot(self) -> StoreStats:
        with self._lock:
            return dataclasses.replace(self._stats)
