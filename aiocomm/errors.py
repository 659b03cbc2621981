"""The error tree of aiocomm.

Every failure of communication is a :class:`CommError`.  The subclasses say
*what* broke; the message says *who* (which rank, which address, which shape).
Low-level causes (an ``OSError`` from the socket) are chained as ``__cause__``.

::

    CommError
    ├── PeerLostError       a peer's connection closed or broke
    ├── CommTimeoutError    (also a TimeoutError) nothing arrived in time
    ├── ProtocolError       bytes on the wire that are not aiocomm's protocol
    ├── MismatchError       (also a ValueError) ranks disagree on op/shape/dtype
    ├── OutOfMemoryError    (also a MemoryError) no memory for a message; names its size
    └── AuthenticationError a peer failed the handshake's proof of the job token
"""

from __future__ import annotations

__all__ = [
    "CommError",
    "PeerLostError",
    "CommTimeoutError",
    "ProtocolError",
    "MismatchError",
    "OutOfMemoryError",
    "AuthenticationError",
    "broken_earlier",
]


class CommError(Exception):
    """Base class of every communication failure raised by aiocomm.

    ``culprit`` is the world rank this rank holds responsible for the failure
    (the lost peer, the silent one, the one that aborted), or ``None`` when
    it started here or nobody is known to be at fault.  Launchers use it to
    blame the right rank (see :mod:`aiocomm.failure_report`).
    """

    culprit: int | None = None


class PeerLostError(CommError):
    """A peer's connection closed or broke while it was still needed.

    ``rank`` is the world rank of the lost peer (``None`` when unknown).
    """

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.culprit = rank


class CommTimeoutError(CommError, TimeoutError):
    """An operation waited longer than its timeout.

    ``ranks`` lists the world ranks that were being waited on.  ``culprit``
    is set only when the silent rank is known to be at fault (it did not
    answer a connection); a rank that sends no data may itself be waiting
    for another, so waiting for data blames nobody.
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = (), culprit: int | None = None) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.culprit = culprit


class ProtocolError(CommError):
    """Bytes that break the wire protocol: bad magic, version, length or map."""


class MismatchError(CommError, ValueError):
    """Ranks called different operations, or the same one with different
    shapes or dtypes, so their data cannot be combined."""


class OutOfMemoryError(CommError, MemoryError):
    """This rank (or, reported by ABORT, another) could not allocate memory
    for a message; the message names the size."""


class AuthenticationError(ProtocolError):
    """A peer could not prove that it knows this job's token."""


def broken_earlier(cause: CommError, what: str) -> CommError:
    """The error for a call on a group that ``cause`` broke earlier: the same
    class (so handlers keep working), saying so; raise it ``from cause``."""
    import copy

    again = copy.copy(cause)
    again.args = (f"{what}: this group was broken earlier and cannot be used again: {cause}",)
    return again
