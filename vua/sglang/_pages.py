"""SGLang's pages as VUA sees them: a page key as a group's tokens, a host pool's page as per-layer (K, V) views."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from vua.errors import InvalidInputError

KEY_TOKENS = 4  # a page key's 32 bytes fill four int64 tokens


def key_tokens(key: str, page: int) -> torch.Tensor:
    """The ``page`` int64 "tokens" a page's group stores in place of token ids: its key's 32 bytes, then zeros.

    SGLang's keys are 64 hex characters (a SHA-256 digest): those bytes are used as they
    are, so a fragment shows the key SGLang asked for. Any other string (a backend
    suffix, a future key format) is hashed with SHA-256 first.

    Raises:
        InvalidInputError: ``key`` is not a string.
    """
    if not isinstance(key, str):
        raise InvalidInputError(f"an SGLang page key is a string, got {type(key).__name__}")
    try:
        digest = bytes.fromhex(key) if len(key) == 64 else b""
    except ValueError:
        digest = b""
    if len(digest) != 32:
        digest = hashlib.sha256(key.encode("utf-8")).digest()
    tokens = torch.zeros(page, dtype=torch.int64)
    tokens[:KEY_TOKENS] = torch.frombuffer(bytearray(digest), dtype=torch.int64)
    return tokens


class PageViews:
    """One SGLang host pool's pages as per-layer (K, V) views, ``(heads, page, dim)`` each.

    MHA pools hold K and V per layer; an MLA pool holds one latent vector per token and
    layer, stored as VUA's (K, V) pair cut in two along its width (one "head"). Every
    host layout is indexing on ``kv_buffer``, so a page lands in place whatever its order:

    - MHA: layer_first ``(2, L, T, H, D)``, page_first ``(2, T, L, H, D)``,
      page_first_direct ``(2, pages, L, P, H, D)``;
    - MLA: layer_first ``(L, T, 1, C)``, page_first ``(T, L, 1, C)``,
      page_first_direct ``(pages, L, P, 1, C)``.
    """

    # kv_buffer's dimensions per layout: MHA's has K|V in front, MLA's one vector per token.
    _DIMS = {"layer_first": (5, 4), "page_first": (5, 4), "page_first_direct": (6, 5)}

    def __init__(self, pool: Any):
        self.kv: torch.Tensor = pool.kv_buffer
        self.page = int(pool.page_size)
        self.layout = str(pool.layout)
        mha_dims, mla_dims = self._DIMS.get(self.layout, (None, None))
        if self.kv.dim() == mha_dims and self.kv.shape[0] == 2:
            self.kind = "mha"
            self.layers = self.kv.shape[1] if self.layout == "layer_first" else self.kv.shape[2]
        elif self.kv.dim() == mla_dims and self.kv.shape[-2] == 1:
            self.kind = "mla"
            self.layers = self.kv.shape[0] if self.layout == "layer_first" else self.kv.shape[1]
            width = self.kv.shape[-1]
            self._cut = width - width // 2  # where the latent is cut into VUA's (K, V)
        else:
            raise InvalidInputError(
                f"VUAStorage does not know SGLang host pools of layout {self.layout!r} with a kv_buffer of shape "
                f"{tuple(self.kv.shape)}; it knows layer_first, page_first and page_first_direct, MHA and MLA"
            )

    def layer(self, start: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) views of the page beginning at host token ``start``, in ``layer``."""
        kv, p = self.kv, self.page
        if self.kind == "mha":
            if self.layout == "layer_first":
                k, v = kv[0, layer, start : start + p], kv[1, layer, start : start + p]
            elif self.layout == "page_first":
                k, v = kv[0, start : start + p, layer], kv[1, start : start + p, layer]
            else:
                k, v = kv[0, start // p, layer], kv[1, start // p, layer]
            return k.transpose(0, 1), v.transpose(0, 1)  # (P, H, D) -> (H, P, D)
        if self.layout == "layer_first":
            latent = kv[layer, start : start + p]
        elif self.layout == "page_first":
            latent = kv[start : start + p, layer]
        else:
            latent = kv[start // p, layer]
        latent = latent.transpose(0, 1)  # (P, 1, C) -> (1, P, C)
        return latent[..., : self._cut], latent[..., self._cut :]

    def whole(self, start: int) -> torch.Tensor | None:
        """The page at host token ``start``, every layer's K and V, as one ``(layers, 2, heads, page, dim)`` view.

        A load then copies the page in one strided copy instead of one per layer and tensor.
        None for an MLA pool whose latent width is odd (its K and V halves differ in width).
        """
        kv, p = self.kv, self.page
        if self.kind == "mha":
            if self.layout == "layer_first":  # (2, L, T, H, D)
                return kv[:, :, start : start + p].permute(1, 0, 3, 2, 4)
            if self.layout == "page_first":  # (2, T, L, H, D)
                return kv[:, start : start + p].permute(2, 0, 3, 1, 4)
            return kv[:, start // p].permute(1, 0, 3, 2, 4)  # page_first_direct: (2, N, L, P, H, D)
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

    def gather(
        self, starts: list[int], into: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (K, V) of the pages at ``starts``, ``(pages, heads, page, dim)``: a put's data (one copy).

        ``into``: per layer, (K, V) buffers of at least ``len(starts)`` pages (from :meth:`buffers`) to
        copy into, reused from call to call: fresh memory costs a page fault per 4 KiB on first touch.
        """
        out = []
        n = len(starts)
        for layer in range(self.layers):
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
        """Per layer, (K, V) buffers for :meth:`gather` of up to ``pages`` pages, touched once."""
        out = []
        for layer in range(self.layers):
            k, v = self.layer(0, layer)
            out.append((torch.zeros((pages, *k.shape), dtype=k.dtype), torch.zeros((pages, *v.shape), dtype=v.dtype)))
        return out

    @property
    def page_bytes(self) -> int:
        """One page's K and V bytes, every layer."""
        return sum(k.nbytes + v.nbytes for k, v in (self.layer(0, layer) for layer in range(self.layers)))
