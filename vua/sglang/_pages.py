"""SGLang's pages as VUA sees them: a page key as a group's tokens, a host pool's page as per-layer (K, V) views."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from vua.errors import InvalidInputError

KEY_TOKENS = 4  # a page key's 32 bytes fill four int64 tokens


def page_tokens(keys: list[str], page: int) -> torch.Tensor:
    """The ``[len(keys), page]`` int64 "tokens" each page's group stores in place of token ids:
    its key's 32 bytes, then zeros.

    SGLang's keys are 64 hex characters (a SHA-256 digest): those bytes are used as they
    are, so a fragment shows the key SGLang asked for. Any other string (a backend
    suffix, a future key format) is hashed with SHA-256 first. Built as one array: the
    controller asks about 128 pages a call, and a tensor per key cost 10 us each.

    Raises:
        InvalidInputError: a key is not a string.
    """
    digests = bytearray()
    for key in keys:
        if not isinstance(key, str):
            raise InvalidInputError(f"an SGLang page key is a string, got {type(key).__name__}")
        try:
            digest = bytes.fromhex(key) if len(key) == 64 else b""
        except ValueError:
            digest = b""
        digests += digest if len(digest) == 32 else hashlib.sha256(key.encode("utf-8")).digest()
    tokens = torch.zeros(len(keys), page, dtype=torch.int64)
    if keys:
        tokens[:, :KEY_TOKENS] = torch.frombuffer(digests, dtype=torch.int64).view(len(keys), KEY_TOKENS)
    return tokens


class PageViews:
    """One SGLang host pool's pages as VUA stores them: per stored layer, (K, V) views ``(heads, page, dim)``.

    MHA pages are stored in the pool's own byte order, as one "layer" whose K and V each hold
    the whole page, so a page moves between the pool and its file in long runs (read into
    the pool in place, each run checked where it landed) instead of a transposing copy:

    - ``page_first`` ``(2, T, L, H, D)``: a page's K is one run ``(page, L, H, D)``, stored as
      one "head" ``(1, page, L*H*D)`` (kind ``mha-page``);
    - ``layer_first`` ``(2, L, T, H, D)`` and ``page_first_direct`` ``(2, pages, L, P, H, D)``:
      a page's K is a run ``(page, H, D)`` per layer, stored with the layers as "heads"
      ``(L, page, H*D)`` (kind ``mha-layer``): pages written from either layout load into the other.

    An MLA pool holds one latent vector per token and layer, stored per layer as VUA's
    (K, V) pair cut in two along its width (one "head", kind ``mla``): ``layer_first``
    ``(L, T, 1, C)``, ``page_first`` ``(T, L, 1, C)``, ``page_first_direct`` ``(pages, L, P, 1, C)``.
    Its pages load into any of the three layouts.
    """

    # kv_buffer's dimensions per layout: MHA's has K|V in front, MLA's one vector per token.
    _DIMS = {"layer_first": (5, 4), "page_first": (5, 4), "page_first_direct": (6, 5)}

    def __init__(self, pool: Any):
        self.kv: torch.Tensor = pool.kv_buffer
        self.page = int(pool.page_size)
        self.layout = str(pool.layout)
        mha_dims, mla_dims = self._DIMS.get(self.layout, (None, None))
        if self.kv.dim() == mha_dims and self.kv.shape[0] == 2:
            self.kind = "mha-page" if self.layout == "page_first" else "mha-layer"
            self.layers = self.kv.shape[1] if self.layout == "layer_first" else self.kv.shape[2]
            self.stored_layers = 1
        elif self.kv.dim() == mla_dims and self.kv.shape[-2] == 1:
            self.kind = "mla"
            self.layers = self.kv.shape[0] if self.layout == "layer_first" else self.kv.shape[1]
            self.stored_layers = self.layers
            width = self.kv.shape[-1]
            self._cut = width - width // 2  # where the latent is cut into VUA's (K, V)
        else:
            raise InvalidInputError(
                f"VUAStorage does not know SGLang host pools of layout {self.layout!r} with a kv_buffer of shape "
                f"{tuple(self.kv.shape)}; it knows layer_first, page_first and page_first_direct, MHA and MLA"
            )

    def model_layer(self, start: int, layer: int) -> tuple[torch.Tensor, ...]:
        """The page at host token ``start`` in one of the model's layers, token-major: MHA's (K, V), each
        ``(page, H, D)``; MLA's latent ``(page, 1, C)``. The same bytes in every layout."""
        kv, p = self.kv, self.page
        if self.kind == "mla":
            if self.layout == "layer_first":
                return (kv[layer, start : start + p],)
            if self.layout == "page_first":
                return (kv[start : start + p, layer],)
            return (kv[start // p, layer],)
        if self.layout == "layer_first":
            return kv[0, layer, start : start + p], kv[1, layer, start : start + p]
        if self.layout == "page_first":
            return kv[0, start : start + p, layer], kv[1, start : start + p, layer]
        return kv[0, start // p, layer], kv[1, start // p, layer]

    def layer(self, start: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) views of the page at host token ``start`` in stored layer ``layer``, ``(heads, page, dim)`` each."""
        if self.kind != "mla":
            whole = self.whole(start)
            assert whole is not None
            return whole[0, 0], whole[0, 1]
        (latent,) = self.model_layer(start, layer)
        latent = latent.transpose(0, 1)  # (P, 1, C) -> (1, P, C)
        return latent[..., : self._cut], latent[..., self._cut :]

    def whole(self, start: int) -> torch.Tensor | None:
        """The page at host token ``start``, every stored layer's K and V, as one ``(layers, 2, heads, page, dim)`` view.

        A load then takes the page as one whole group instead of layer by layer. None for
        an MLA pool whose latent width is odd (its K and V halves differ in width).
        """
        kv, p = self.kv, self.page
        # views, never copies: a load lands in them
        if self.kind == "mha-page":  # (2, T, L, H, D) -> (2, P, L*H*D) -> (1, 2, 1, P, L*H*D)
            return kv[:, start : start + p].view(2, p, -1)[None, :, None]
        if self.kind == "mha-layer":  # (2, L, P, H, D) -> (1, 2, L, P, H*D)
            page = kv[:, :, start : start + p] if self.layout == "layer_first" else kv[:, start // p]
            return page.view(*page.shape[:3], -1)[None]
        width = kv.shape[-1]
        if width % 2:
            return None
        if self.layout == "layer_first":  # (L, T, 1, C)
            latent = kv[:, start : start + p]
        elif self.layout == "page_first":  # (T, L, 1, C)
            latent = kv[start : start + p].transpose(0, 1)
        else:  # page_first_direct: (N, L, P, 1, C)
            latent = kv[start // p]
        # (L, P, 1, C) -> (L, P, 1, 2, C/2) -> (L, 2, 1, P, C/2): K and V are the latent's halves
        return latent.unflatten(-1, (2, width // 2)).permute(0, 3, 2, 1, 4)

    def pool(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per stored layer, (K, V) of the whole pool as ``(pool pages, heads, page, dim)`` views, page ``i`` at
        host token ``i * page``: a put takes its pages straight from there (``VUA.put_groups``).

        None for MLA, whose K and V (the latent's halves) are not runs in the pool: its pages are gathered.
        """
        kv, p = self.kv, self.page
        if self.kind == "mha-page":  # (2, T, L, H, D): page i's K is kv[0, i*P:(i+1)*P], one run
            return [(kv[0].view(-1, 1, p, kv[0, 0].numel()), kv[1].view(-1, 1, p, kv[1, 0].numel()))]
        if self.kind == "mha-layer":
            if self.layout == "layer_first":  # (2, L, T, H, D) -> per K|V (pages, L, P, H*D)
                k, v = (kv[i].view(self.layers, -1, p, kv.shape[-2] * kv.shape[-1]).transpose(0, 1) for i in (0, 1))
            else:  # page_first_direct: (2, N, L, P, H, D) -> per K|V (N, L, P, H*D)
                k, v = (kv[i].view(*kv.shape[1:4], -1) for i in (0, 1))
            return [(k, v)]  # views, never copies
        return None

    def gather(
        self, starts: list[int], into: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per stored layer, (K, V) of the pages at ``starts``, ``(pages, heads, page, dim)``: a put's data (one copy).

        ``into``: per stored layer, (K, V) buffers of at least ``len(starts)`` pages (from :meth:`buffers`)
        to copy into, reused from call to call: fresh memory costs a page fault per 4 KiB on first touch.
        """
        out = []
        n = len(starts)
        for layer in range(self.stored_layers):
            pairs = [self.layer(start, layer) for start in starts]
            if into is None:
                out.append((torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])))
            else:
                k_buf, v_buf = into[layer][0][:n], into[layer][1][:n]
                torch.stack([k for k, _ in pairs], out=k_buf)
                torch.stack([v for _, v in pairs], out=v_buf)
                out.append((k_buf, v_buf))
        return out

    def buffers(self, pages: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per stored layer, (K, V) buffers for :meth:`gather` of up to ``pages`` pages, touched once."""
        out = []
        for layer in range(self.stored_layers):
            k, v = self.layer(0, layer)
            out.append((torch.zeros((pages, *k.shape), dtype=k.dtype), torch.zeros((pages, *v.shape), dtype=v.dtype)))
        return out

    @property
    def page_bytes(self) -> int:
        """One page's K and V bytes, every layer."""
        return sum(k.nbytes + v.nbytes for k, v in (self.layer(0, layer) for layer in range(self.stored_layers)))
