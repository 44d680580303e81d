"""Authenticated fragments (``VUAConfig.auth_key``): a keyed MAC over each fragment's header and data.

A fragment's metadata carries ``mac_alg`` and ``mac`` (64 hex digits), and the MAC covers the
whole file as written: the header (with the MAC's tag digits read as zeros) and every data
byte, in file order.

- ``aes256-gmac`` (what writers use): AES-256-GCM over no plaintext, the file as associated
  data, i.e. GMAC (NIST SP 800-38D), with a key of its own for every fragment: keyed BLAKE3
  of a random 128-bit salt under the store's key. ``mac`` is the salt's 32 hex digits, then
  the 16-byte tag's. A key is used once, so GCM's fixed nonce is never reused under it.
  OpenSSL's GHASH (carry-less multiply, AES-NI) runs at about memcpy's speed per core and
  releases the GIL, nearly twice keyed BLAKE3's speed here; the read path pays it on every
  byte of an authenticated get.
- no ``mac_alg``: keyed BLAKE3-256 of the file (``mac`` its digest), as the first
  authenticated stores were written; still verified, never written.

Both are standard MACs from well-kept libraries (cryptography's OpenSSL, blake3); the store's
32-byte key comes from its secret through BLAKE3's key derivation mode.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from vua.errors import InvalidInputError, missing_extra

MAC_FIELD = "mac"
ALG_FIELD = "mac_alg"
GMAC = "aes256-gmac"
BLAKE3 = None  # the original algorithm, written without an ALG_FIELD
_MAC_CONTEXT = "vua.fragment 2026-11-28 MAC key"
_FRAGMENT_KEY_LABEL = b"vua.fragment aes256-gmac key; salt: "
_NONCE = bytes(12)  # every fragment's key is its own: one message per key

Buffers = Sequence[memoryview | bytes]


def mac_key(secret: bytes) -> bytes:
    """The store's 32-byte MAC key, from its secret (BLAKE3's key derivation mode).

    Raises:
        ImportError: blake3 or cryptography is not installed (the ``auth`` extra).
    """
    try:
        import blake3
        from cryptography.hazmat.primitives.ciphers import Cipher  # noqa: F401  (needed by every put and get)
    except ImportError as exc:
        raise missing_extra("VUAConfig(auth_key=...)", "blake3 and cryptography", "auth", exc) from exc
    return blake3.blake3(secret, derive_key_context=_MAC_CONTEXT).digest()


def read_secret(path: str, what: str) -> bytes:
    """A store's secret (``VUAConfig.auth_key``) from a file: its bytes, exactly.

    A secret never goes in a command line, where every user of the machine can read it.
    Nothing is stripped: random secret bytes may begin or end with what looks like
    whitespace (about 1 secret in 22), and dropping it would make another key than the one
    ``VUAConfig(auth_key=...)`` was given. Write the file with no trailing newline.
    ``what`` names the setting in errors (e.g. "auth_key_file").

    Raises:
        InvalidInputError: the file cannot be read, or does not hold 16 to 64 bytes.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read(65)  # one byte past the limit is enough to refuse a longer file
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read {what} {path!r}: {exc.strerror}; point it at a file holding the store's secret "
            "(16 to 64 bytes)"
        ) from None
    if not 16 <= len(secret) <= 64:
        raise InvalidInputError(
            f"{what} {path!r} holds {len(secret) if len(secret) <= 64 else 'more than 64'} bytes; the store's secret "
            "is 16 to 64 bytes, read exactly (a trailing newline counts) "
            "(e.g. python3 -c 'import secrets, sys; sys.stdout.buffer.write(secrets.token_bytes(32))' > FILE)"
        )
    return secret


def mac_marker(value: str) -> bytes:
    return f'"{MAC_FIELD}":"{value}"'.encode()


def writer_fields() -> dict[str, str]:
    """The MAC fields of a header about to be sealed: the algorithm, a fresh salt and a zero tag."""
    return {ALG_FIELD: GMAC, MAC_FIELD: secrets.token_hex(16) + "0" * 32}


def blank(alg: str | None, value: str) -> str:
    """The ``mac`` value as the MAC reads it: the tag's digits as zeros (GMAC keeps its salt)."""
    return value[:32] + "0" * 32 if alg == GMAC else "0" * 64


class MacStream:
    """A fragment's MAC over its bytes fed in file order (header with the tag zeroed first).

    Raises (from the constructor):
        ValueError: an algorithm this version does not know.
    """

    def __init__(self, key: bytes, alg: str | None, blank_value: str):
        import blake3

        self._prefix = ""
        if alg == GMAC:
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

            self._prefix = blank_value[:32]
            fragment_key = blake3.blake3(_FRAGMENT_KEY_LABEL + bytes.fromhex(self._prefix), key=key).digest()
            self._gmac = Cipher(algorithms.AES(fragment_key), modes.GCM(_NONCE)).encryptor()
        elif alg is BLAKE3:
            self._blake3 = blake3.blake3(key=key)
        else:
            raise ValueError(f"unknown MAC algorithm {alg!r}")

    def update(self, data: memoryview | bytes) -> None:
        if self._prefix:
            self._gmac.authenticate_additional_data(data)
        else:
            self._blake3.update(data)

    def value(self) -> str:
        """The ``mac`` value of the bytes fed so far (once: the stream ends here)."""
        if self._prefix:
            self._gmac.finalize()
            return self._prefix + self._gmac.tag.hex()
        return self._blake3.hexdigest()


def mac_value(key: bytes, alg: str | None, blank_value: str, header: bytes, data: Buffers) -> str:
    """The ``mac`` value of a fragment whose header reads ``blank_value`` in its place.

    Raises:
        ValueError: an algorithm this version does not know.
    """
    stream = MacStream(key, alg, blank_value)
    stream.update(header)
    for buffer in data:
        stream.update(buffer)
    return stream.value()


def seal_header(header: bytes, key: bytes, buffers: Buffers, fields: dict[str, str]) -> bytes:
    """Writes the MAC into a header encoded with ``fields`` (see :func:`writer_fields`); same length."""
    placeholder = mac_marker(fields[MAC_FIELD])
    if header.count(placeholder) != 1:
        raise ValueError("header has no unique MAC placeholder")
    value = mac_value(key, fields[ALG_FIELD], fields[MAC_FIELD], header, buffers)
    return header.replace(placeholder, mac_marker(value))
