"""Contexts (groups on the wire), who belongs to them, and aborting them.

Every frame carries a context id, so collectives of different groups never
mix.  A context is *broken* once any member gives up on an operation in it:
the reason goes to the other members as an ``ABORT`` frame, and everywhere
every waiting and later operation on the context fails with that reason.
This module keeps the state and translates reasons to and from ``ABORT``
maps (once, here); the mesh sends the frames.
"""

from __future__ import annotations

from typing import Any

from ..errors import (
    AuthenticationError,
    CommError,
    CommTimeoutError,
    MismatchError,
    OutOfMemoryError,
    PeerLostError,
    ProtocolError,
)
from ..wire import Kind, require_map

# The error classes an ABORT may name; anything else arrives as a CommError.
_ABORT_TYPES: dict[str, type[CommError]] = {
    cls.__name__: cls
    for cls in (PeerLostError, CommTimeoutError, MismatchError, ProtocolError, OutOfMemoryError, CommError)
}
_ABORT_TYPES[AuthenticationError.__name__] = ProtocolError


def abort_fields(exc: CommError, me: int) -> dict[str, Any]:
    """The ``ABORT`` map that tells other members why ``me`` gave up."""
    fields: dict[str, Any] = {
        "origin": me,
        "type": type(exc).__name__,
        "reason": str(exc),
        # Who is at fault: what this rank knows, else this rank itself, except
        # for a timeout, which says only that a peer was silent.
        "culprit": exc.culprit if exc.culprit is not None else (None if isinstance(exc, CommTimeoutError) else me),
    }
    lost = getattr(exc, "rank", None)
    if lost is not None:
        fields["lost"] = lost
    return fields


def abort_error(meta: Any) -> tuple[CommError, dict[str, Any]]:
    """The error an ``ABORT`` map reports (raises ``ProtocolError`` if malformed)."""
    fields = require_map(meta, Kind.ABORT, ("origin", "type", "reason"))
    cls = _ABORT_TYPES.get(fields["type"], CommError) if isinstance(fields["type"], str) else CommError
    reason = f"{fields['reason']} (reported by rank {fields['origin']})"
    exc: CommError
    if cls is PeerLostError:
        lost = fields.get("lost")
        exc = PeerLostError(reason, lost if isinstance(lost, int) else None)
    elif cls is CommTimeoutError:
        exc = CommTimeoutError(reason, (src,) if isinstance((src := fields["origin"]), int) else ())
    else:
        exc = cls(reason)
    culprit = fields.get("culprit", fields["origin"])
    exc.culprit = culprit if isinstance(culprit, int) else None
    return exc, fields


class Contexts:
    """Members and broken state of every context this rank knows."""

    WORLD = 0

    def __init__(self, size: int) -> None:
        self.size = size
        self.members: dict[int, tuple[int, ...]] = {self.WORLD: tuple(range(size))}
        self.broken: dict[int, CommError] = {}  # context -> why it is unusable

    def register(self, context: int, members: tuple[int, ...]) -> None:
        self.members[context] = members

    def members_of(self, context: int) -> tuple[int, ...]:
        """A context this rank has not formed yet (its split is still to come
        here) counts everyone: ranks outside it only note an abort."""
        return self.members.get(context, tuple(range(self.size)))

    def break_(self, context: int, exc: CommError) -> bool:
        """Mark ``context`` broken; False if it already was."""
        if context in self.broken:
            return False
        self.broken[context] = exc
        return True
