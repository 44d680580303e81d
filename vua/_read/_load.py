"""A load's two sides: the :class:`KVLoad` a caller waits on, and the :class:`LoadProgress` a copy reports to."""

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


class LoadProgress:
    """What the copy strategy filling a load reports: groups that failed, layers that landed, the end.

    Args:
        groups, layers: the groups requested and the model's layers.
        first_group: the group of the prompt the load begins at (for log messages).
    """

    def __init__(self, groups: int, layers: int, first_group: int = 0):
        self.requested_groups = groups
        self.valid_groups = groups  # lowered by cut()
        self.first_group = first_group
        self.damaged_groups: set[int] = set()  # groups whose files failed a check
        self.error: BaseException | None = None
        self.layer_ready = [threading.Event() for _ in range(layers)]
        self.layer_events: list[torch.cuda.Event | None] = [None] * layers
        self.finished = threading.Event()
        self._lock = threading.Lock()

    def start(self, copy: Callable[[], None], *, background: bool, on_done: Callable[[], None] | None) -> None:
        """Runs ``copy`` (which reports here), on a thread of its own if ``background``.

        ``on_done`` is called once the copy has finished without error, before the load's
        ``wait()`` returns: its caller then sees the load's bookkeeping (a damaged group
        moved aside and out of the index, the counters).
        """

        def run() -> None:
            try:
                copy()
            except BaseException as exc:  # surfaced to the consumer by wait()/wait_layer()
                self.error = exc
                for ready in self.layer_ready:
                    ready.set()
            try:
                if on_done is not None and self.error is None:
                    on_done()
            finally:
                self.finished.set()

        if background:
            threading.Thread(target=run, name="vua-load", daemon=True).start()
        else:
            run()

    def cut(self, group: int, exc: FragmentError) -> None:
        """Ends the prefix before ``group``, which failed a read or check (logged once per cut)."""
        with self._lock:
            if exc.damaged:
                self.damaged_groups.add(group)
            if group < self.valid_groups:
                self.valid_groups = group
                logger.warning("stored prefix ends before group %d: %s", self.first_group + group, exc)

    def layer_landed(self, layer: int, event: torch.cuda.Event | None = None) -> None:
        """Hands out one layer: its copies are done (host) or queued before ``event`` (CUDA; by
        default the one :meth:`layer_queued` noted)."""
        if event is not None:
            self.layer_events[layer] = event
        self.layer_ready[layer].set()

    def layer_queued(self, layer: int, event: torch.cuda.Event) -> None:
        """Notes the event after a layer's copies, before its check is back (see :meth:`layer_landed`)."""
        self.layer_events[layer] = event

    def all_landed(self, event: torch.cuda.Event | None = None) -> None:
        for layer in range(len(self.layer_ready)):
            self.layer_landed(layer, event)


class KVLoad:
    """A load of a stored prefix, in progress or done; ``VUA.get_closest`` and ``VUA.load`` return one's result.

    Until the copy is over, the outputs hold whatever memory they were given; the methods
    here wait for the parts they return.

    Args:
        progress: what the copy filling this load reports.
        outputs: per layer, (K, V) shaped ``(1, heads, tokens, head_dim)`` for all requested
            groups; None for a load into the caller's destination (``VUA.load(..., into=)``).
        split_factor: tokens per group.
        platform: the CUDA platform for device outputs, None for host outputs.
        offset: the prompt position of the outputs' first token (``VUA.load(..., offset=)``):
            the outputs, and the groups :meth:`wait` counts, begin there.
    """

    def __init__(
        self,
        progress: LoadProgress,
        outputs: KVPairs | None,
        split_factor: int,
        *,
        platform: CudaPlatform | None = None,
        offset: int = 0,
    ):
        self.outputs = outputs
        self.offset = offset
        self._progress = progress
        self._split = split_factor
        self._platform = platform

    @property
    def num_groups(self) -> int:
        """Groups verified so far; final once :meth:`wait` has returned."""
        return self._progress.valid_groups

    @property
    def damaged_groups(self) -> frozenset[int]:
        """Groups (from :attr:`offset`) whose files failed a check: damaged, not merely unreadable."""
        return frozenset(self._progress.damaged_groups)

    def wait_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Waits for one layer and returns its (K, V), each ``(1, heads, tokens, head_dim)``.

        On CUDA this waits only on the caller's current stream (no host synchronisation):
        kernels queued after it see the data. The tokens dimension covers the groups
        verified so far; later layers can only shorten the prefix, which :meth:`wait` reports.

        Raises:
            InvalidInputError: ``layer`` is not an int from 0 to the model's layers - 1, or
                the load lands in the caller's destination (use :meth:`wait_layer_groups`).
        """
        if self.outputs is None:
            raise InvalidInputError(
                "this load lands in the destination given as into=, and has no outputs of its own: "
                "wait_layer_groups(layer) says how many groups of the destination hold that layer"
            )
        groups = self.wait_layer_groups(layer)
        tokens = groups * self._split
        k, v = self.outputs[layer]
        return k[:, :, :tokens], v[:, :, :tokens]

    def wait_layer_groups(self, layer: int) -> int:
        """Waits for one layer and returns how many groups (from :attr:`offset`) of it are verified so far.

        For a load into a destination, those groups' views hold that layer; later layers can
        only lower the count, which :meth:`wait` reports. On CUDA this waits only on the
        caller's current stream, as :meth:`wait_layer` does.

        Raises:
            InvalidInputError: ``layer`` is not an int from 0 to the model's layers - 1.
        """
        progress = self._progress
        layers = len(progress.layer_ready)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < layers:
            raise InvalidInputError(
                f"layer must be an int from 0 to {layers - 1} (this load has {layers} layers), got {layer!r}"
            )
        progress.layer_ready[layer].wait()
        if progress.error is not None:
            raise progress.error
        self._caller_waits_for(progress.layer_events[layer])
        return progress.valid_groups

    def wait(self) -> int:
        """Waits for every layer and returns the number of valid groups from :attr:`offset` on (0: nothing usable)."""
        progress = self._progress
        progress.finished.wait()
        if progress.error is not None:
            raise progress.error
        self._caller_waits_for(progress.layer_events[-1])
        return progress.valid_groups

    def data(self) -> KVPairs:
        """The finished outputs, cut to the valid prefix (a contiguous copy only when cut).

        Raises:
            InvalidInputError: the load landed in the caller's destination (``into=``).
        """
        groups = self.wait()
        if self.outputs is None:
            raise InvalidInputError("this load landed in the destination given as into=: its data are there")
        tokens = groups * self._split
        if groups == self._progress.requested_groups:
            return self.outputs
        return [(k[:, :, :tokens].clone(), v[:, :, :tokens].clone()) for k, v in self.outputs]

    def _caller_waits_for(self, event: torch.cuda.Event | None) -> None:
        if event is not None and self._platform is not None:
            self._platform.current_stream().wait_event(event)
