"""VUA's exceptions: one small tree rooted at :class:`VUAError`.

Each class also inherits the built-in type that matches its meaning, so code
that already catches ``ValueError`` or ``OSError`` keeps working.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "VUAError",
    "InvalidInputError",
    "SplitFactorError",
    "StorageError",
    "NotAStoreError",
    "FragmentError",
    "FragmentState",
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


class FragmentState(Enum):
    """What is wrong with a fragment that could not be used, as :class:`FragmentError` says.

    DAMAGED: the file itself is wrong (malformed, truncated, a checksum or MAC that does not
        hold, something else than a regular file): a rewrite is due, readers move it aside.
    MISSING: no file there (evicted, or not yet visible on a network file system).
    UNREADABLE: not usable now, but not shown to be damaged: reading failed in a way that may
        pass (EIO, ESTALE, EACCES, a refused memory map); the group stays. A fragment of
        another layout than its reader expected carries this state too (``OtherLayoutError``).
    """

    DAMAGED = "damaged"
    MISSING = "missing"
    UNREADABLE = "unreadable"


class FragmentError(VUAError):
    """A fragment file is damaged or does not hold what its key promises.

    Reads never let this escape: the prefix simply ends before the damaged group.
    ``vua verify`` reports it.

    Args:
        message: what is wrong, naming the file.
        state: which kind of trouble (:class:`FragmentState`); DAMAGED unless given.
        damaged, missing: the older spelling of ``state``, still accepted: ``missing=True``
            is MISSING, else ``damaged=False`` is UNREADABLE. Not together with ``state``.

    Attributes:
        state: the :class:`FragmentState`.
        damaged: ``state is FragmentState.DAMAGED`` (read-only).
        missing: ``state is FragmentState.MISSING`` (read-only).
    """

    def __init__(
        self,
        message: str,
        *,
        state: FragmentState | None = None,
        damaged: bool | None = None,
        missing: bool | None = None,
    ):
        super().__init__(message)
        if state is None:
            if missing:
                state = FragmentState.MISSING
            elif damaged is False:
                state = FragmentState.UNREADABLE
            else:
                state = FragmentState.DAMAGED
        elif damaged is not None or missing is not None:
            raise TypeError("FragmentError takes state, or the older damaged/missing, not both")
        self.state = state

    @property
    def damaged(self) -> bool:
        """True when the file itself is wrong (a rewrite is due)."""
        return self.state is FragmentState.DAMAGED

    @property
    def missing(self) -> bool:
        """True when the file was not there (evicted, or not yet visible on a network file system)."""
        return self.state is FragmentState.MISSING


def missing_extra(module: str, package: str, extra: str, exc: ImportError) -> ImportError:
    """The error an integration raises when its framework is not installed, naming the fix."""
    error = ImportError(
        f"{module} needs {package}, which is not installed ({exc}); install it with "
        f"`pip install 'vua[{extra}]'` or `uv add {package}` (in this repository: `uv run --group test ...`)"
    )
    error.name = exc.name
    return error
