"""The worker's saves: prompts' KV, already copied off vLLM's blocks, written by one background thread, bounded.

A save never blocks a step: the step hands the host copies over and returns. A store that
writes slower than the engine computes (or hangs) makes the queue grow; past ``max_bytes``
of queued copies the oldest queued save is dropped, with a counted, logged warning, so memory
stays bounded. A dropped save is a future miss, never a wrong answer.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_WARN_EVERY = 100  # after the first, one warning per this many dropped saves


@dataclass
class _Save:
    write: Callable[[], None]
    bytes: int


class SaveQueue:
    """Saves written one after another on a thread of its own, at most ``max_bytes`` of them waiting.

    Args:
        max_bytes: bytes of queued saves (their host copies) kept; older ones are dropped past it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._queue: collections.deque[_Save] = collections.deque()
        self._queued_bytes = 0
        self._running = False
        self._closed = False
        self._cond = threading.Condition()
        self.dropped = 0  # saves dropped to keep the bound
        self._thread = threading.Thread(target=self._serve, name="vua-save", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], None], nbytes: int) -> None:
        """Queues ``write`` (which holds ``nbytes`` of host copies); drops the oldest queued saves past the bound."""
        dropped = 0
        with self._cond:
            if self._closed:
                return
            self._queue.append(_Save(write, nbytes))
            self._queued_bytes += nbytes
            while self._queued_bytes > self.max_bytes and len(self._queue) > 1:
                old = self._queue.popleft()
                self._queued_bytes -= old.bytes
                dropped += 1
            self.dropped += dropped
            total = self.dropped
            self._cond.notify_all()
        if dropped and (total == dropped or total // _WARN_EVERY != (total - dropped) // _WARN_EVERY):
            logger.warning(
                "VUAConnector: the store writes slower than the engine computes: %d prompt saves dropped so far "
                "to keep at most %.0f MiB of them waiting (save_queue_bytes); their groups are not stored",
                total,
                self.max_bytes / 2**20,
            )

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                save = self._queue.popleft()
                self._queued_bytes -= save.bytes
                self._running = True
            try:
                save.write()
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until every queued save is written (at most ``timeout`` seconds); True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> int:
        """Stops the thread after the save being written; returns how many queued saves were dropped."""
        with self._cond:
            self._closed = True
            left = len(self._queue) + int(self._running)
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        return left
