"""SGLang's per-page calls with flat pages (a backend without ``interface_v1``).

SGLang then hands the backend each page as one flat tensor (the host pool's
``get_data_page(flat=True)``): every layer's K and V of the page, in the pool's own order.
VUA stores such a page as a group of one layer and one head, K the first half of each
token's bytes and V the rest, in a namespace of its own (``.../flat``), so flat pages and
the zero-copy calls' pages never meet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from vua.core import VUA, KVDestination
from vua.errors import InvalidInputError, VUAError
from vua.sglang._pages import page_tokens

logger = logging.getLogger(__name__)


class FlatPages:
    """Flat pages in one store, opened on first use by ``open_store``; a run of pages ends at its first miss."""

    def __init__(self, open_store: Callable[[], VUA], page: Callable[[], int], dummy_page: Callable[[], torch.Tensor]):
        self._open_store = open_store
        self._page = page  # the host pool's page size, once SGLang registered it
        self._dummy_page = dummy_page
        self._store: VUA | None = None

    @property
    def store(self) -> VUA:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def get(self, key: str, target: Any | None = None) -> torch.Tensor | None:
        """One flat page, into ``target`` if it is a tensor (else a fresh page); None when it is not loaded."""
        return self.batch_get([key], [target])[0]

    def batch_get(self, keys: list[str], targets: Any | None = None) -> list[torch.Tensor | None]:
        """Flat pages, each into its target where that is a tensor (else a fresh page), in one load; the run
        ends at its first miss (None from there on)."""
        if not keys:
            return []
        targets = targets if targets is not None and len(targets) == len(keys) else [None] * len(keys)
        intos = [t if isinstance(t, torch.Tensor) else self._dummy_page() for t in targets]
        page = self._page()
        done = 0
        try:
            tokens = page_tokens(keys, page)
            load = self.store.load_groups(tokens, "cpu", into=_FlatDestination(intos, page))
            done = 0 if load is None else load.wait()
        except VUAError as exc:
            logger.warning("VUAStorage: %d flat pages not loaded: %s", len(keys), exc)
        return [*intos[:done], *[None] * (len(keys) - done)]

    def batch_set(self, keys: list[str], values: Any | None) -> bool:
        """Stores flat pages, durably; True when every one is stored (those that were stay whole either way)."""
        if values is None or len(values) != len(keys) or not all(isinstance(v, torch.Tensor) for v in values):
            logger.warning("VUAStorage: batch_set needs one flat page tensor per key")
            return False
        page = self._page()
        try:
            tokens = page_tokens(keys, page)
            halves = [flat_halves(v.reshape(-1), page) for v in values]
            data = [(torch.stack([k for k, _ in halves]), torch.stack([v for _, v in halves]))]
            self.store.put(tokens, data)
        except VUAError as exc:
            logger.warning("VUAStorage: storing %d flat pages failed: %s", len(keys), exc)
            return False
        return True

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self._store = None


class _FlatDestination(KVDestination):
    """Flat page tensors, group ``i`` the ``i``-th: each one layer of one head, K its first half per token, V the rest."""

    def __init__(self, targets: list[torch.Tensor], page: int):
        self._halves = [flat_halves(t.view(-1), page) for t in targets]  # views: the load must land in each target

    def chunks(self, group: int, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._halves[group]]


def flat_halves(flat: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat page viewed as ``(1, page, width)`` and cut in two along the width: the (K, V) VUA stores."""
    width = flat.numel() // page
    if width * page != flat.numel() or width < 2:
        raise InvalidInputError(f"a flat page of {flat.numel()} elements is not {page} tokens of two halves")
    whole = flat.view(1, page, width)
    cut = width - width // 2
    return whole[..., :cut], whole[..., cut:]
