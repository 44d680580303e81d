"""Sizes as people write them ("500G", "1.5TiB", "10M" or a number of bytes): one parser for
the ``vua`` command's ``--max-bytes`` and the vLLM connector's ``max_bytes``, so a size that
one accepts the other accepts too."""

from __future__ import annotations

import re

from vua.errors import InvalidInputError

# A number, then an optional binary multiple K, M, G or T (written K, Ki, KB or KiB alike), or B.
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:iB?|B)?|B)?\Z", re.IGNORECASE)


def parse_size(value: int | str, what: str = "a size") -> int:
    """A size in bytes from an int or text: '500M', '10G', '1.5TiB', '2KB', '4096' (multiples are binary).

    Args:
        value: a non-negative int (bytes), or text as above.
        what: what the value is, for the error message (e.g. ``"--max-bytes"``).

    Raises:
        InvalidInputError: anything else (a negative number, a bool, a float, an unknown unit).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise InvalidInputError(f"{what} must be a size such as 500M, 10G, 1.5TiB or a number of bytes, got {value!r}")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    return int(number * 1024 ** ("KMGT".find(unit) + 1)) if unit else int(number)


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB': the reverse of parse_size, for messages."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
