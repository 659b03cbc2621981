"""A record of each rank's recent operations (torch's Flight Recorder, Horovod's stall check).

Theory of operation
-------------------
Every call of either face, on either backend, makes one :class:`Entry`: the
group, the call's sequence number on that group, the operation, dtype,
shape, peer (the other rank of a send or recv, the root of a rooted
collective), its state and its times.  Collectives are numbered per group
(``Group.trace_seq``: every member numbers them alike, because a group's
collectives are matched across ranks by the order they start); sends and
receives per group and peer (``Group.trace_p2p``).  The entry is the call's
context manager: entering fills in the next of a ring of entries made once
(a tuple of the call and a time), which keeps the last
``AIOCOMM_TRACE_BUFFER`` calls (default 2,000; ``0`` records nothing), and
leaving stamps the end time and the state; so the record costs well under
a microsecond per call, and nothing is formatted until it is written.

The record is written, as JSON lines, to ``AIOCOMM_TRACE_DIR/rank-N.jsonl``
(N the world rank) when a call fails with a :class:`~aiocomm.CommError` (a
timeout above all), when the process gets ``SIGUSR1`` (while it runs,
whatever it does), when an exception ends the program or one of its
threads, and at exit when a call failed or is still in flight, or the
program called ``sys.exit`` with a failing status (``raise SystemExit(3)``
is not seen: the launcher names that rank's status).  Nothing is
written without ``AIOCOMM_TRACE_DIR``; ``aiocomm-launch`` sets it, asks the
ranks still running for their record on a failure or a timeout, and prints
the verdict that :mod:`aiocomm.trace.verdict` draws from the records
(``python -m aiocomm.trace DIR`` draws it from files written under any
launcher).

File format: a first line ``{"trace": 1, "rank", "size", "pid", "host",
"reason", "written", "buffer", "full"}`` (``full``: older operations were let go), one ``{"group": context,
"members": [world ranks], "rank": rank in group, "backend"}`` per group seen,
then one line per operation, oldest first: ``{"group", "seq", "op",
"dtype", "shape", "peer", "state", "start", "end", "error"}`` (``peer`` a
world rank or ``null``; times in seconds since the epoch, ``end`` ``null``
while the call is in flight; ``state`` one of ``started``, ``completed``,
``timed out``, ``failed``).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from time import perf_counter
from types import TracebackType
from typing import Any

import numpy as np

from ..errors import CommError

ENV_DIR = "AIOCOMM_TRACE_DIR"
ENV_BUFFER = "AIOCOMM_TRACE_BUFFER"
DEFAULT_BUFFER = 2000
FILE_PATTERN = "rank-{}.jsonl"

STARTED, COMPLETED, TIMED_OUT, FAILED = "started", "completed", "timed out", "failed"

# Operations whose second argument is a peer (a root, or the destination of a send).
_PEER_SECOND = frozenset(("broadcast", "gather", "send"))


def _buffer_size() -> int:
    raw = os.environ.get(ENV_BUFFER, "")
    try:
        return max(0, int(raw)) if raw.strip() else DEFAULT_BUFFER
    except ValueError:
        raise ValueError(f"{ENV_BUFFER}={raw!r} is not a whole number of operations") from None


_size = _buffer_size()
_ndarray = np.ndarray


class Entry:
    """One call: filled in when it starts, stamped when it ends (a context manager).

    ``info`` is ``(group, seq, op, dtype, shape, peer)`` (``peer`` a group
    rank; ``None`` for a slot never used); ``end`` is ``None`` while the
    call is in flight, its time once it completed, ``(time, state, text)``
    if it failed.  Nothing more is done per call: the file is formatted only
    when it is written.
    """

    __slots__ = ("info", "start", "end")

    info: tuple[Any, int, str, Any, Any, Any] | None
    start: float
    end: float | tuple[float, str, str] | None

    def __init__(self) -> None:
        self.info = None
        self.start = 0.0  # perf_counter
        self.end = 0.0

    def __enter__(self) -> Entry:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.end = perf_counter()
            return
        # (the error's text, never the error: its frames would keep arrays alive)
        state = TIMED_OUT if isinstance(exc, TimeoutError) else FAILED
        self.end = (perf_counter(), state, f"{kind.__name__}: {exc}")
        if isinstance(exc, CommError):
            write("timeout" if state is TIMED_OUT else "failure")


# The buffer: entries made once and used in turn, so a call allocates no
# entry and frees none (and the garbage collector never meets a stream of them).
_ring = [Entry() for _ in range(_size)]
_turn = itertools.count()


class _NotRecorded:
    """The entry of every call when the buffer is 0."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NOT_RECORDED = _NotRecorded()


class GroupLabel:
    """What the record keeps of a group (not the group: a dropped group's
    resources, its shared memory above all, must not live on in the record)."""

    __slots__ = ("context", "members", "_rank", "backend")

    def __init__(self, context: int, members: tuple[int, ...], rank: int, backend: str) -> None:
        self.context = context
        self.members = members
        self._rank = rank
        self.backend = backend  # its name

    def rank(self) -> int:
        return self._rank


def call(group: Any, stream: Any, op: str, args: tuple[Any, ...]) -> Entry | _NotRecorded:
    """The entry of one call of ``op`` on ``group`` (use it as ``with``).

    ``stream`` is the call's stream of the group (``"collectives"``, or
    ``("send", dst)`` / ``("recv", src)``), ``args`` the engine operation's
    arguments after the group: the array first, or ``(shape, dtype, src)``
    for a receive; a peer or root second where the operation has one.
    """
    if not _size:
        return _NOT_RECORDED
    i = next(_turn) % _size
    e = _ring[i]
    if e.end is None:  # its call is still in flight, _size calls later: it keeps its entry
        e = _ring[i] = Entry()
    if stream == "collectives":
        seq = group.trace_seq
        group.trace_seq = seq + 1
    else:
        counts = group.trace_p2p
        seq = counts.get(stream, 0)
        counts[stream] = seq + 1
    label = group.trace_label
    x = args[0] if args else None
    if type(x) is _ndarray or isinstance(x, _ndarray):
        e.info = (label, seq, op, x.dtype, x.shape, args[1] if op in _PEER_SECOND else None)
    elif op == "recv":
        e.info = (label, seq, op, args[1], x, args[2])
    else:
        e.info = (label, seq, op, None, None, None)
    e.end = None
    e.start = perf_counter()
    return e


# ------------------------------------------------------------------ writing


def _snapshot() -> list[tuple[tuple[Any, int, str, Any, Any, Any], float, Any]]:
    """The used entries as ``(info, start, end)``, oldest first."""
    taken = [(e.info, e.start, e.end) for e in list(_ring) if e.info is not None]
    return sorted(taken, key=lambda t: t[1])


def _guess_rank(entries: list[tuple[tuple[Any, int, str, Any, Any, Any], float, Any]]) -> str:
    for info, _, _ in entries:
        try:
            group = info[0]
            return str(group.members[group.rank()])
        except Exception:
            continue
    for var in ("AIOCOMM_RANK", "MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return os.environ[var]
    return f"pid{os.getpid()}"


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return [int(v) for v in value]
    return str(value)


def lines(reason: str) -> tuple[str, list[str]]:
    """This rank's record as JSON lines, and its world rank (as written in the file name)."""
    entries = _snapshot()
    now_wall, now = time.time(), perf_counter()
    offset = now_wall - now
    rank = _guess_rank(entries)
    groups: dict[int, Any] = {}
    ops = []
    for info, start, end in entries:
        g, seq, op, dtype, shape, peer = info
        members = g.members
        if g.context not in groups:
            groups[g.context] = g
        error = None
        if end is None:
            state = STARTED
        elif isinstance(end, tuple):
            end, state, error = end
        else:
            state = COMPLETED
        ops.append(json.dumps({
            "group": g.context, "seq": seq, "op": op, "dtype": _jsonable(dtype), "shape": _jsonable(shape),
            "peer": None if peer is None else members[peer], "state": state,
            "start": round(start + offset, 6), "end": None if end is None else round(end + offset, 6),
            "error": error,
        }))
    size = next((len(g.members) for g in groups.values() if g.context == 0), None)
    head = {"trace": 1, "rank": int(rank) if rank.isdigit() else rank, "size": size, "pid": os.getpid(),
            "host": socket.gethostname(), "reason": reason, "written": round(now_wall, 6), "buffer": _size,
            "full": len(entries) >= _size}
    out = [json.dumps(head)]
    for g in groups.values():
        out.append(json.dumps({"group": g.context, "members": list(g.members), "rank": g.rank(),
                               "backend": g.backend}))
    return rank, out + ops


def write(reason: str) -> str | None:
    """Write this rank's record to ``AIOCOMM_TRACE_DIR`` (replacing an older
    one); the file's path, or ``None`` when no directory is set or writing
    failed (never raises: the record must not hide the error being raised);
    ``AIOCOMM_TRACE_BUFFER=0`` writes nothing."""
    directory = os.environ.get(ENV_DIR)
    if not directory or not _size:
        return None
    try:
        rank, text = lines(reason)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, FILE_PATTERN.format(rank))
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(text) + "\n")
        os.replace(tmp, path)  # a reader never sees half a record
        return path
    except Exception:
        return None


def _on_sigusr1(signum: int, frame: object) -> None:
    write("SIGUSR1")


def _install() -> None:
    """With ``AIOCOMM_TRACE_DIR`` set: write the record on ``SIGUSR1`` (unless
    the program handles that signal itself) and when an exception ends the
    program."""
    if not os.environ.get(ENV_DIR) or not _size:
        return
    sigusr1 = getattr(signal, "SIGUSR1", None)
    if sigusr1 is not None and threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(sigusr1) == signal.SIG_DFL:
                signal.signal(sigusr1, _on_sigusr1)
        except (ValueError, OSError):
            pass
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        write(f"uncaught {kind.__name__}")
        previous(kind, exc, tb)

    sys.excepthook = excepthook
    previous_thread_hook = threading.excepthook

    def thread_excepthook(args: Any) -> None:
        if args.exc_type is not SystemExit:
            name = args.thread.name if args.thread is not None else "?"
            write(f"uncaught {args.exc_type.__name__} in thread {name!r}")
        previous_thread_hook(args)

    threading.excepthook = thread_excepthook
    real_exit = sys.exit

    def exit_noting(status: str | int | None = None) -> Any:
        """``sys.exit``, noting a failing status (``raise SystemExit(3)`` is not seen)."""
        global _exit_status
        if status not in (None, 0):
            _exit_status = status
        real_exit(status)

    sys.exit = exit_noting
    atexit.register(_at_exit)


_exit_status: object = None  # what a sys.exit() with a failing status was given


def _at_exit() -> None:
    """At exit, the record of a rank that leaves with a call in flight (in
    another thread), after a call failed (its last record may predate what
    it did since, or there may be none: an error that is not a
    :class:`~aiocomm.CommError`, such as an interrupt), or through
    ``sys.exit`` with a failing status."""
    for e in list(_ring):
        if e.info is not None and (e.end is None or isinstance(e.end, tuple)):
            write("exit after a failed call" if e.end is not None else "exit with a call in flight")
            return
    if _exit_status is not None:
        write(f"sys.exit({_exit_status!r})")


_install()

__all__ = ["Entry", "call", "write", "lines", "ENV_DIR", "ENV_BUFFER", "DEFAULT_BUFFER"]
