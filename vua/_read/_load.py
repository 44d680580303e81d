"""The handle a caller waits on: the outputs, how many groups passed, and when each layer landed."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from vua.errors import FragmentError, InvalidInputError

if TYPE_CHECKING:
    from vua._read._platform import CudaPlatform

logger = logging.getLogger(__name__)

KVPairs = list[tuple[torch.Tensor, torch.Tensor]]


class KVLoad:
    """A load of a stored prefix, in progress or done; ``VUA.get_closest`` and ``VUA.load`` return one's result.

    Cheap to build and does no I/O: :meth:`start` runs the copy that fills it. Until then
    (and while the copy runs) the outputs hold whatever memory they were given.

    Args:
        outputs: per layer, (K, V) shaped ``(1, heads, tokens, head_dim)`` for all requested groups.
        split_factor: tokens per group.
        platform: the CUDA platform for device outputs, None for host outputs.
        offset: the prompt position of the outputs' first token (``VUA.load(..., offset=)``):
            the outputs, and the groups :meth:`wait` counts, begin there.
    """

    def __init__(self, outputs: KVPairs, split_factor: int, *, platform: CudaPlatform | None = None, offset: int = 0):
        self.outputs = outputs
        self.offset = offset
        self._split = split_factor
        self._platform = platform
        self._requested_groups = outputs[0][0].shape[2] // split_factor
        self._valid_groups = self._requested_groups
        self._lock = threading.Lock()
        self.damaged_groups: set[int] = set()  # groups whose files failed a check
        self._error: BaseException | None = None
        self._layer_ready = [threading.Event() for _ in outputs]
        self._layer_events: list[torch.cuda.Event | None] = [None] * len(outputs)
        self._finished = threading.Event()

    def start(self, copy: Callable[[], None], *, background: bool, on_done: Callable[[KVLoad], None] | None) -> None:
        """Runs ``copy`` (which fills the outputs and reports through this handle), on a thread of its own if ``background``.

        ``on_done`` is called with this load once the copy has finished without error.
        """

        def run() -> None:
            try:
                copy()
            except BaseException as exc:  # surfaced to the consumer by wait()/wait_layer()
                self._error = exc
                for ready in self._layer_ready:
                    ready.set()
            try:
                if on_done is not None and self._error is None:
                    # Before wait() returns: its caller then sees the load's bookkeeping (a
                    # damaged group moved aside and out of the index, the counters).
                    on_done(self)
            finally:
                self._finished.set()

        if background:
            threading.Thread(target=run, name="vua-load", daemon=True).start()
        else:
            run()

    # -- consumer side ------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        """Groups verified so far; final once :meth:`wait` has returned."""
        return self._valid_groups

    def wait_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Waits for one layer and returns its (K, V), each ``(1, heads, tokens, head_dim)``.

        On CUDA this waits only on the caller's current stream (no host synchronisation):
        kernels queued after it see the data. The tokens dimension covers the groups
        verified so far; later layers can only shorten the prefix, which :meth:`wait` reports.

        Raises:
            InvalidInputError: ``layer`` is not an int from 0 to the model's layers - 1.
        """
        layers = len(self.outputs)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < layers:
            raise InvalidInputError(
                f"layer must be an int from 0 to {layers - 1} (this load has {layers} layers), got {layer!r}"
            )
        self._layer_ready[layer].wait()
        if self._error is not None:
            raise self._error
        self._caller_waits_for(self._layer_events[layer])
        tokens = self._valid_groups * self._split
        k, v = self.outputs[layer]
        return k[:, :, :tokens], v[:, :, :tokens]

    def wait(self) -> int:
        """Waits for every layer and returns the number of valid groups from :attr:`offset` on (0: nothing usable)."""
        self._finished.wait()
        if self._error is not None:
            raise self._error
        self._caller_waits_for(self._layer_events[-1])
        return self._valid_groups

    def data(self) -> KVPairs:
        """The finished outputs, cut to the valid prefix (a contiguous copy only when cut)."""
        groups = self.wait()
        tokens = groups * self._split
        if groups == self._requested_groups:
            return self.outputs
        return [(k[:, :, :tokens].clone(), v[:, :, :tokens].clone()) for k, v in self.outputs]

    def _caller_waits_for(self, event: torch.cuda.Event | None) -> None:
        if event is not None and self._platform is not None:
            self._platform.current_stream().wait_event(event)

    # -- producer side: what a copy strategy reports ---------------------------------------

    def cut(self, group: int, exc: FragmentError) -> None:
        """Ends the prefix before ``group``, which failed a read or check (logged once per cut)."""
        with self._lock:
            if exc.damaged:
                self.damaged_groups.add(group)
            if group < self._valid_groups:
                self._valid_groups = group
                logger.warning("stored prefix ends before group %d: %s", self.offset // self._split + group, exc)

    def layer_landed(self, layer: int, event: torch.cuda.Event | None = None) -> None:
        """Hands out one layer: its copies are done (host) or queued before ``event`` (CUDA; by
        default the one :meth:`layer_queued` noted)."""
        if event is not None:
            self._layer_events[layer] = event
        self._layer_ready[layer].set()

    def layer_queued(self, layer: int, event: torch.cuda.Event) -> None:
        """Notes the event after a layer's copies, before its check is back (see :meth:`layer_landed`)."""
        self._layer_events[layer] = event

    def all_landed(self, event: torch.cuda.Event | None = None) -> None:
        for layer in range(len(self.outputs)):
            self.layer_landed(layer, event)
