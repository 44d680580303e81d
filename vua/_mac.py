"""Authenticated fragments (``VUAConfig.auth_key``): a keyed MAC over each fragment's header and data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vua.errors import missing_extra

# Authenticated fragments (VUAConfig.auth_key): the metadata's "mac" is keyed BLAKE3 over
# the whole file as written, with the MAC's own 64 hex digits read as zeros. Keyed BLAKE3 is
# a MAC by design, and its 32-byte key comes from the store's secret through BLAKE3's own
# key derivation mode, so no construction of our own is involved. BLAKE3 runs at about
# memcpy's speed per core (AVX2/AVX-512) and releases the GIL, so groups verify in parallel.
MAC_FIELD = "mac"
MAC_PLACEHOLDER = "0" * 64
_MAC_CONTEXT = "vua.fragment 2026-11-28 MAC key"


def mac_marker(value: str) -> bytes:
    return f'"{MAC_FIELD}":"{value}"'.encode()


def mac_key(secret: bytes) -> bytes:
    """The 32-byte BLAKE3 key of a store's secret (BLAKE3's key derivation mode).

    Raises:
        ImportError: blake3 is not installed (the ``auth`` extra).
    """
    try:
        import blake3
    except ImportError as exc:
        raise missing_extra("VUAConfig(auth_key=...)", "blake3", "auth", exc) from exc
    return blake3.blake3(secret, derive_key_context=_MAC_CONTEXT).digest()


def fragment_mac(key: bytes, header: bytes, data: Sequence[memoryview | bytes | np.ndarray]) -> str:
    """Keyed BLAKE3-256 of a fragment: its header (MAC digits zeroed) and every data byte, in file order."""
    import blake3

    mac = blake3.blake3(key=key)
    mac.update(header)
    for buffer in data:
        mac.update(buffer)
    return mac.hexdigest()


def seal_header(header: bytes, key: bytes, buffers: Sequence[memoryview]) -> bytes:
    """Writes the MAC into a header encoded with ``MAC_PLACEHOLDER`` as its "mac" (same length)."""
    placeholder = mac_marker(MAC_PLACEHOLDER)
    if header.count(placeholder) != 1:
        raise ValueError("header has no unique MAC placeholder")
    return header.replace(placeholder, mac_marker(fragment_mac(key, header, buffers)))
