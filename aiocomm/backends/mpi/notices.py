"""Notices between ranks, on a communicator of their own: what MPI does not
tell a rank that waits.

MPI has no way to say "that rank has left" or "that rank gave up on this
collective": a rank waiting for one simply waits.  So ranks tell each other,
with small msgpack messages on a duplicate of the world communicator:

* ``EXIT`` -- sent by a rank that ends normally (including ``raise
  SystemExit(n)``) to every other rank, just before it finalizes MPI.  For
  each group the two share it says how many collectives it started there
  and how many point-to-point heads it sent to the reader.  A rank waiting
  for a collective the leaver never started, or for a message it never
  sent, gets :class:`PeerLostError` at once instead of waiting out its
  timeout; messages the leaver did send are still received.
* ``BROKEN`` -- sent by a rank whose collective timed out or was cancelled,
  to the group's other members: their operations on that group fail at once,
  as they do on the ring when a peer aborts a context.  It says how many
  collectives the sender issued there: every member stands in for those it
  did not issue (:func:`~.collectives.stand_in`), in the background, since
  MPI cannot cancel a collective and the members inside one would otherwise
  keep its requests pending until the job ends.

A rank that fails with an exception sends nothing: it exits without
finalizing, and mpirun ends the job.  Notices are taken by whichever thread
is waiting (:meth:`Notices.poll`, a cheap ``Test``), so they cost nothing
while no rank waits long.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack
import numpy as np

from ... import failure_report
from ...errors import CommError, PeerLostError
from . import groups
from .collectives import stand_in

EXIT_TAG, BROKEN_TAG = 1, 2
MAX_NOTICE = 1 << 20


class Notices:
    """This rank's end of the notice channel: what it has heard, and a
    receive always posted for the next notice."""

    def __init__(self, MPI: Any, comm: Any) -> None:
        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        #: world rank -> {context: (collectives it started, p2p heads it sent to this rank)}
        self.gone: dict[int, dict[int, tuple[int, int]]] = {}
        self.heard = 0  # notices taken so far (waiters re-check when it grows)
        self._lock = threading.Lock()
        self.polled = 0.0  # monotonic time of the last poll (the fast path reads it to skip a call)
        self._buf = np.empty(MAX_NOTICE, np.uint8)
        self._status = MPI.Status()
        self._request: Any = comm.Irecv([self._buf, MPI.BYTE], MPI.ANY_SOURCE, MPI.ANY_TAG)

    def poll(self, every: float = 0.0) -> bool:
        """Take the notices that have arrived; whether there were any.  Any
        thread may call it (one tests the receive at a time; others skip);
        with ``every``, only if that many seconds passed since the last poll."""
        if every and time.monotonic() - self.polled < every:
            return False
        if not self._lock.acquire(blocking=False):
            return False
        self.polled = time.monotonic()
        try:
            got = False
            while self._request is not None and self._request.Test(self._status):
                data = bytes(self._buf[: self._status.Get_count(self.MPI.BYTE)])
                source, tag = self._status.Get_source(), self._status.Get_tag()
                self._request = self.comm.Irecv([self._buf, self.MPI.BYTE], self.MPI.ANY_SOURCE, self.MPI.ANY_TAG)
                self._take(source, tag, data)
                got = True
            if got:
                self.heard += 1
            return got
        finally:
            self._lock.release()

    def _take(self, source: int, tag: int, data: bytes) -> None:
        try:
            body = msgpack.unpackb(data)
        except Exception:
            return  # not ours to understand; nothing waits on it
        if tag == EXIT_TAG:
            self.gone[source] = {int(c): (int(e), int(h)) for c, e, h in body}
        elif tag == BROKEN_TAG:
            context, what, why, issued = body
            state = groups.by_context.get(int(context))
            if state is None:
                return
            with state.lock:
                if state.broken is None:
                    state.broken = CommError(f"rank {source} gave up on {what} on this group ({why}), which breaks "
                                             "the group on every rank")  # culprit None: a timeout blames nobody
                state.told = max(state.told, int(issued))
                state.known = max(state.known, int(issued))
            stand_in(self.MPI, state)

    # ---- what the notices mean for an operation

    def lost_collective(self, state: groups.MpiGroup, index: int) -> CommError | None:
        """The error for collective number ``index`` (counted from 1) of a
        group if a member left without starting it."""
        if not self.gone:
            return None
        members = state.members
        for world_rank, left in self.gone.items():  # in the order heard: the first to leave is the cause
            if world_rank in members and left.get(state.context, (0, 0))[0] < index:
                return PeerLostError(
                    f"rank {self.rank}: rank {world_rank} has exited without starting this collective "
                    f"(the {_ordinal(index)} on its group), so it cannot complete", world_rank)
        return None

    def lost_sender(self, state: groups.MpiGroup, src: int, pulled: int) -> PeerLostError | None:
        """The error for a receive from group rank ``src`` that waits for a
        head after ``pulled`` of them, if ``src`` left having sent no more."""
        world_rank = state.members[src]
        left = self.gone.get(world_rank)
        if left is not None and left.get(state.context, (0, 0))[1] <= pulled:
            return PeerLostError(
                f"rank {self.rank}: rank {world_rank} has exited and sent nothing more to this rank, so this "
                "receive cannot complete", world_rank)
        return None

    def lost_receiver(self, state: groups.MpiGroup, dst: int) -> PeerLostError | None:
        world_rank = state.members[dst]
        if world_rank in self.gone:
            return PeerLostError(f"rank {self.rank}: cannot send to rank {world_rank}: it has exited", world_rank)
        return None

    # ---- telling the others

    def broken(self, state: groups.MpiGroup, what: str, why: str, issued: int) -> None:
        """Tell the group's other members that ``what`` failed here (``why``),
        breaking the group, and that this rank issued ``issued`` collectives on it."""
        data = np.frombuffer(msgpack.packb([state.context, what, why, issued]), np.uint8)
        requests = [self.comm.Isend([data, self.MPI.BYTE], w, tag=BROKEN_TAG)
                    for w in state.members if w != self.rank and w not in self.gone]
        _settle(self.MPI, requests)

    def leave(self) -> None:
        """At a normal exit: tell every other rank what this one did, and
        stop listening."""
        failure_report.left(self.rank)
        requests, buffers = [], []
        for w in range(self.comm.Get_size()):
            if w == self.rank or w in self.gone:
                continue
            report = [[c, s.entered, s.heads_sent[s.members.index(w)]]
                      for c, s in list(groups.by_context.items()) if w in s.members]
            buffers.append(np.frombuffer(msgpack.packb(report), np.uint8))
            requests.append(self.comm.Isend([buffers[-1], self.MPI.BYTE], w, tag=EXIT_TAG))
        _settle(self.MPI, requests)
        with self._lock:
            request, self._request = self._request, None
            if request:
                request.Cancel()
                request.Wait()


def _settle(MPI: Any, requests: list[Any], within: float = 2.0) -> None:
    """Wait (boundedly) for small sends that complete at once in practice."""
    deadline = time.monotonic() + within
    while requests and not MPI.Request.Testall(requests) and time.monotonic() < deadline:
        time.sleep(0.0002)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_notices: Notices | None = None


def start(MPI: Any, comm: Any) -> Notices:
    """The notice channel over ``comm`` (a world duplicate of its own)."""
    global _notices
    _notices = Notices(MPI, comm)
    return _notices


def leave(MPI: Any) -> bool:
    """At exit (a hook of :func:`library.before_finalize`)."""
    if _notices is not None:
        _notices.leave()
    return True


def channel() -> Notices:
    assert _notices is not None, "the MPI world has not started"
    return _notices
