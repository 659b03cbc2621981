"""Telling the launcher why this rank failed, so it can blame the right rank.

When a rank fails *because of* another rank (that rank was lost, stopped
answering, or aborted the group), the rank that gives up first is often not
the one at fault.  A launcher that sets ``AIOCOMM_FAILURE_FILE`` gets one JSON
line per communication failure this rank raised, appended to that file::

    {"rank": 2, "pid": 4242, "error": "PeerLostError", "culprit": 1, "message": "..."}

``culprit`` is the world rank this rank holds responsible (``null`` when the
failure started here or no other rank is known to be at fault).  Writing is
best effort: a failure to write never hides the communication error itself.
"""

from __future__ import annotations

import json
import os

from .errors import CommError, broken_earlier

ENV = "AIOCOMM_FAILURE_FILE"

def record(rank: int, exc: BaseException) -> None:
    """Append ``exc`` (raised on world rank ``rank``) to the launcher's failure file, once."""
    # Once per error (a broken group raises its cause again), marked on the
    # error itself: ids of freed errors are reused.
    if not os.environ.get(ENV) or not isinstance(exc, CommError) or getattr(exc, "_aiocomm_reported", False):
        return
    exc._aiocomm_reported = True  # type: ignore[attr-defined]
    _append({"rank": rank, "pid": os.getpid(), "error": type(exc).__name__, "culprit": exc.culprit,
             "message": str(exc)})


def recovered(rank: int) -> None:
    """Note that world rank ``rank`` carried on after its failures (it is in a
    shrunken group): what it reported before is no longer why it might fail."""
    if os.environ.get(ENV):
        _append({"rank": rank, "pid": os.getpid(), "recovered": True})


def left(rank: int) -> None:
    """Note that world rank ``rank`` ended its program and is leaving the job
    (a launcher that cannot see its exit status, because mpirun ends it,
    still knows it left on its own)."""
    if os.environ.get(ENV):
        _append({"rank": rank, "pid": os.getpid(), "left": True})


def _append(entry: dict[str, object]) -> None:
    path = os.environ[ENV]
    line = json.dumps(entry)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)
    except OSError:
        pass


def raise_broken(rank: int, cause: CommError, what: str) -> None:
    """Raise for a call on a group that ``cause`` broke earlier: recorded
    (once) for the launcher, the same class, chained to the cause."""
    record(rank, cause)
    raise broken_earlier(cause, f"rank {rank}: {what}") from cause
