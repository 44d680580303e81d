"""Store calls an engine waits for, bounded: a deadline on each, and a store that keeps failing skipped for a while.

A network file system can slow down or stop answering (a frozen server, a hard NFS mount),
and a thread inside ``open()`` or ``stat()`` there cannot be interrupted. So an engine never
makes such a call on a thread it needs: :class:`BoundedCalls` runs it on a thread of its
own and waits at most a deadline, then answers as a miss would. :class:`StoreHealth`
remembers that the store failed: for ``cooldown`` seconds calls are skipped at once
(answered as misses), then one is tried again. The engine serves from recomputation
meanwhile; a stuck thread stays stuck until the file system answers, and since calls are
skipped while the store is unhealthy, stuck threads never pile up past ``workers``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StoreHealth:
    """Whether a store is worth asking now: unhealthy for ``cooldown`` seconds after a failure.

    A failure is a call past its deadline or an error that says the store cannot be reached
    (not a miss, not a damaged group). One WARNING per unhealthy period, one INFO when the
    store answers again.

    Args:
        name: what the log lines call the store (its root).
        cooldown: seconds calls are skipped after a failure before one is tried again.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, name: str, *, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._unhealthy_until: float | None = None  # None: healthy
        self.periods = 0  # unhealthy periods begun since start
        self.skipped = 0  # calls skipped while unhealthy

    def usable(self) -> bool:
        """False while the store is unhealthy (the call is then counted as skipped); True otherwise,
        also once the cooldown is over (the next call is the retry)."""
        with self._lock:
            if self._unhealthy_until is None or self._clock() >= self._unhealthy_until:
                return True
            self.skipped += 1
            return False

    def failed(self, what: str) -> None:
        """Notes a failure now: the store is unhealthy for ``cooldown`` seconds from here."""
        with self._lock:
            begins = self._unhealthy_until is None
            self._unhealthy_until = self._clock() + self.cooldown
            if begins:
                self.periods += 1
        if begins:
            logger.warning(
                "VUA store %s is not answering (%s): loads and lookups are skipped for %.0f s, then tried again; "
                "requests are computed meanwhile",
                self.name,
                what,
                self.cooldown,
            )

    def succeeded(self) -> None:
        """Notes a call that the store answered in time: healthy again."""
        with self._lock:
            was_unhealthy = self._unhealthy_until is not None
            self._unhealthy_until = None
        if was_unhealthy:
            logger.info("VUA store %s answers again: loads and lookups resume", self.name)


class BoundedCalls:
    """Runs store calls on threads of their own and waits for each at most its deadline.

    Args:
        health: the store's health, shared by every bounded call to it.
        workers: threads; also the most calls that may be stuck in the file system at once
            (past that, a call fails at once instead of queueing behind them).
        name: the threads' name prefix.
    """

    def __init__(self, health: StoreHealth, *, workers: int = 2, name: str = "vua-bounded"):
        self.health = health
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._running = 0
        self.timed_out = 0  # calls answered by their default at the deadline

    def submit(self, call: Callable[[], T]) -> Future[T] | None:
        """Starts ``call``; None when the store is unhealthy or every thread is stuck (counted as a failure)."""
        if not self.health.usable():
            return None
        with self._lock:
            if self._running >= self._workers:
                stuck = True
            else:
                stuck = False
                self._running += 1
        if stuck:
            self.health.failed(f"{self._workers} calls still inside the file system")
            return None

        def run() -> T:
            try:
                return call()
            finally:
                with self._lock:
                    self._running -= 1

        return self._pool.submit(run)

    def call(self, call: Callable[[], T], *, timeout: float, default: T, what: str) -> T:
        """``call()``'s answer if it comes within ``timeout`` seconds, else ``default`` (and the store is unhealthy).

        An OSError from the call (the file system refused: ENOTCONN, EIO) counts as a failure
        too and answers ``default``; other exceptions are the caller's.
        """
        future = self.submit(call)
        if future is None:
            return default
        return self.result(future, timeout=timeout, default=default, what=what)

    def result(self, future: Future[T], *, timeout: float, default: T, what: str) -> T:
        """The answer of a call :meth:`submit` started, waited for at most ``timeout`` seconds (see :meth:`call`)."""
        try:
            answer = future.result(timeout=timeout)
        except FutureTimeout:
            self.timed_out += 1
            self.health.failed(f"{what} took over {timeout:.2f} s")
            return default
        except OSError as exc:
            self.health.failed(f"{what}: {exc}")
            return default
        self.health.succeeded()
        return answer

    def shutdown(self) -> None:
        """Stops taking calls; a call stuck in the file system is left to finish on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
