"""VUA's exceptions: one small tree rooted at :class:`VUAError`.

Each class also inherits the built-in type that matches its meaning, so code
that already catches ``ValueError`` or ``OSError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "VUAError",
    "InvalidInputError",
    "SplitFactorError",
    "StorageError",
    "NotAStoreError",
    "FragmentError",
    "missing_extra",
]


class VUAError(Exception):
    """Base class of every error VUA raises on purpose."""


class InvalidInputError(VUAError, ValueError):
    """Tokens or KV tensors passed to VUA are malformed; nothing on disk was changed."""


class SplitFactorError(InvalidInputError):
    """The token count is not a multiple of the configured ``split_factor``."""


class StorageError(VUAError, OSError):
    """The file system refused an operation (disk full, permission denied, unusable root)."""


class NotAStoreError(StorageError, FileNotFoundError):
    """A path given as a VUA root does not exist or holds no VUA store."""


class FragmentError(VUAError):
    """A fragment file is damaged or does not hold what its key promises.

    Reads never let this escape: the prefix simply ends before the damaged group.
    ``vua verify`` reports it.

    Attributes:
        damaged: True when the file itself is wrong (a rewrite is due), False when reading
            it failed in a way that may pass (an I/O error, say).
        missing: the file was not there (evicted, or not yet visible on a network file system).
    """

    def __init__(self, message: str, *, damaged: bool = True, missing: bool = False):
        super().__init__(message)
        self.damaged = damaged
        self.missing = missing


def missing_extra(module: str, package: str, extra: str, exc: ImportError) -> ImportError:
    """The error an integration raises when its framework is not installed, naming the fix."""
    error = ImportError(
        f"{module} needs {package}, which is not installed ({exc}); install it with "
        f"`pip install 'vua[{extra}]'` or `uv add {package}` (in this repository: `uv run --group test ...`)"
    )
    error.name = exc.name
    return error
