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

from .errors import CommError

ENV = "AIOCOMM_FAILURE_FILE"

_reported: set[int] = set()  # id() of errors already written (a broken group re-raises its cause)


def record(rank: int, exc: BaseException) -> None:
    """Append ``exc`` (raised on world rank ``rank``) to the launcher's failure file, once."""
    path = os.environ.get(ENV)
    if not path or not isinstance(exc, CommError) or id(exc) in _reported:
        return
    _reported.add(id(exc))
    line = json.dumps(
        {
            "rank": rank,
            "pid": os.getpid(),
            "error": type(exc).__name__,
            "culprit": exc.culprit,
            "message": str(exc),
        }
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)
    except OSError:
        pass
