"""Shared helpers of the rt_* workers (runtime failure promises).

Workers print one fact per line, which tests/test_runtime_faults.py parses:

    FAILED <ErrorClass> at <unix time>: <message>
    INFO {"json": ...}             details of the last FAILED line
    RESULT ...                     an operation that was expected to fail returned
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import aiocomm


def say(*parts: object) -> None:
    """One whole line in one write: a forked child shares the parent's stdout,
    and print() writes the text and its newline separately."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (" ".join(map(str, parts)) + "\n").encode())


def chain(exc: BaseException) -> list[str]:
    out, seen, c = [], set(), exc.__cause__
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        out.append(f"{type(c).__name__}: {c}")
        c = c.__cause__
    return out


def report(exc: BaseException, t0: float | None = None, tag: str = "", **extra: object) -> dict:
    """Print the FAILED and INFO lines of ``exc`` (``t0``: time.monotonic() at the call's start)."""
    msg = str(exc).replace("\n", " | ")
    info = {
        "tag": tag,
        "type": type(exc).__name__,
        "mro": [k.__name__ for k in type(exc).__mro__],
        "commerror": isinstance(exc, aiocomm.CommError),
        "culprit": getattr(exc, "culprit", None),
        "message": msg,
        "elapsed": None if t0 is None else round(time.monotonic() - t0, 3),
        "cause_chain": chain(exc),
        **extra,
    }
    say(f"FAILED {type(exc).__name__} at {time.time():.3f}: {msg}")
    say("INFO " + json.dumps(info, default=repr))
    return info


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmSize, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def raise_nofile(want: int = 20000) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_go() -> str:
    """Block until the test writes a line on stdin ('' at EOF)."""
    return sys.stdin.readline().strip()


def ring_sync(world) -> None:
    """A tiny sync that only touches ring neighbours (the connections formed
    at init): send to the right, receive from the left."""
    import numpy as np

    r, n = world.rank(), world.size()
    aiocomm.send(np.array([r], np.int64), (r + 1) % n, timeout=30)
    got = aiocomm.recv((1,), np.int64, (r - 1) % n, timeout=30)
    assert int(got[0]) == (r - 1) % n, got
