"""Every wait of the transport, its deadline, and who can end it.

Theory of operation
-------------------
An operation (one collective, one send, one receive) is an :class:`Op`: what
it is, its context (group), and one deadline for the whole operation.  Each
thing it waits for is a :class:`Wait` registered in the mesh's
:class:`WaitSet` under one peer: a receive's data, the first connection to a
peer, a peer reading what was written, a peer posting the receive for an
announced message.  So for any wait there is one place that creates it (the
code that starts waiting) and three that can end it early, all here:

* :meth:`WaitSet.fail_peer` when the peer is lost -- or, for a
  collective's wait (its ``op.members`` name its group), when another
  member of the group says it lost that peer (:meth:`WaitSet.heard_lost`):
  a rank may wait on a peer it never talked to, and so would never see its
  connection close,
* :meth:`WaitSet.fail_context` when the context is aborted (here or by an
  ABORT from another rank),
* the deadline timer, which fails waits whose operation ran out of time with
  a :class:`CommTimeoutError` that says what was waited for, for how long,
  and how to change it.

One timer serves the whole set (a timer per receive costs more than the rest
of a small receive's bookkeeping).  While waits are pending the loop may
*poll* for a short while before it sleeps (see ``config.poll_seconds``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from ..errors import CommError, CommTimeoutError
from ..wire import Signature, Sink

CONNECTING = "connecting to"
#: The context of an operation that belongs to no group (a clean close, say):
#: a wire context is unsigned, so no abort ever names this one.
NO_CONTEXT = -1


class Op:
    """One operation: what it is (for messages), its context and its deadline.

    ``what`` may be given as the call's :class:`~aiocomm.wire.Signature`, or
    a function that says it: it is put in words only when a message needs it
    (most calls never fail).  ``members``: a collective's group (world
    ranks), whose members tell one another of a lost peer; None for the rest."""

    __slots__ = ("_what", "context", "timeout", "deadline", "members")

    def __init__(self, what: str | Signature | Callable[[], str], context: int, timeout: float,
                 deadline: float, members: tuple[int, ...] | None = None) -> None:
        self._what = what
        self.context = context
        self.timeout = timeout
        self.deadline = deadline
        self.members = members

    @property
    def what(self) -> str:
        what = self._what
        if isinstance(what, str):
            return what
        return what.describe() if isinstance(what, Signature) else what()


class Wait(Sink):
    """One thing an operation waits for, from one peer; ``future`` gives its outcome.

    It is a :class:`Sink` so that a receive can be the destination of the
    frame it waits for.  ``what`` describes the wait for a timeout message
    ("waiting for data from", "connecting to", ...).
    """

    __slots__ = ("future", "peer", "op", "waits", "what")

    def __init__(self, waits: WaitSet, peer: int, op: Op, what: str) -> None:
        self.view = None
        self.future: asyncio.Future[Any] = waits.loop.create_future()
        self.peer = peer
        self.op = op
        self.what = what
        self.waits = waits
        waits.add(self)

    def resolve(self, value: Any = None) -> None:
        self.waits.pending.discard(self)
        future = self.future
        if not future.done():
            future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        self.waits.pending.discard(self)
        future = self.future
        if not future.done():
            future.set_exception(exc)
            # A wait posted ahead may never be awaited once its operation
            # failed; the error reaches the caller through the one it awaits.
            future.exception()

    def timed_out(self, me: int) -> CommTimeoutError:
        op = self.op
        return CommTimeoutError(
            f"rank {me} timed out after {op.timeout:g}s {self.what} rank {self.peer} in {op.what}; "
            f"the whole operation may take at most timeout={op.timeout:g}s: pass a larger timeout= "
            "or set AIOCOMM_TIMEOUT (seconds)",
            (self.peer,),
            # Only a peer that does not answer a connection is known to be at
            # fault: one that sends no data may be waiting for another rank.
            culprit=self.peer if self.what == CONNECTING else None,
        )


class WaitSet:
    """The pending waits of one mesh, one deadline timer, and polling."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rank: int, poll_s: float) -> None:
        self.loop = loop
        self.rank = rank
        self.pending: set[Wait] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # when the timer fires (inf: no timer)
        self.poll_s = poll_s  # keep polling this long after a wait is added (0: never)
        self._poll_until = 0.0
        self._polling = False
        self.closed = False
        #: (context, peer) -> the error: another member of the group lost that peer
        self.heard: dict[tuple[int, int], BaseException] = {}

    def add(self, wait: Wait) -> None:
        self.pending.add(wait)
        if self.heard and wait.op.members is not None:
            heard = self.heard.get((wait.op.context, wait.peer))
            if heard is not None:  # (soon: the wait is not whole yet, a subclass may still be setting up)
                self.loop.call_soon(wait.fail, heard)
        deadline = wait.op.deadline
        if self.poll_s:
            self._poll_until = time.monotonic() + self.poll_s
            if not self._polling:
                self._polling = True
                self.loop.call_soon(self._poll)
        if deadline < self._timer_at and not self.closed:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._expire)

    # ---- ending waits early

    def fail_where(self, match: Callable[[Wait], bool], exc: BaseException) -> None:
        for wait in [w for w in self.pending if match(w)]:
            wait.fail(exc)

    def fail_peer(self, peer: int, exc: BaseException) -> None:
        """``peer`` is lost: every wait on it fails with ``exc``."""
        self.fail_where(lambda w: w.peer == peer, exc)

    def collectives_with(self, peer: int) -> dict[int, tuple[int, ...]]:
        """The groups (context -> members) of the collectives waiting here that ``peer`` belongs to."""
        return {w.op.context: w.op.members for w in self.pending if w.op.members is not None and peer in w.op.members}

    def heard_lost(self, context: int, peer: int, exc: BaseException) -> None:
        """Another member of group ``context`` lost ``peer``: this rank's
        collective waits on ``peer`` in that group fail with ``exc``, now and
        later.  (Only those: a collective that needs nothing more of
        ``peer`` here -- it may have ended its part and exited -- goes on.)"""
        self.heard[(context, peer)] = exc
        self.fail_where(lambda w: w.peer == peer and w.op.context == context and w.op.members is not None, exc)

    def fail_context(self, context: int, exc: CommError) -> None:
        """``context`` is aborted: every wait of its operations fails with ``exc``."""
        self.fail_where(lambda w: w.op.context == context, exc)

    def fail_all(self, exc: BaseException) -> None:
        self.fail_where(lambda w: True, exc)

    # ---- deadlines and polling

    def _expire(self) -> None:
        """Fail the waits whose deadline has passed; wake again for the next one."""
        self._timer = None
        self._timer_at = math.inf
        now = self.loop.time() + 0.001  # the loop's timers round to milliseconds
        expired = sorted((w for w in self.pending if w.op.deadline <= now), key=lambda w: w.op.deadline)
        for wait in expired:
            wait.fail(wait.timed_out(self.rank))
        if self.pending and not self.closed:
            self._timer_at = min(w.op.deadline for w in self.pending)
            self._timer = self.loop.call_at(self._timer_at, self._expire)

    def _poll(self) -> None:
        """Keep the loop from sleeping while waits are pending, for at most
        ``poll_s`` after the latest was added: with a callback always ready
        the loop polls its sockets (epoll with no timeout) between callbacks,
        so arriving data is handled without a wake-up by interrupt."""
        if self.pending and time.monotonic() < self._poll_until:
            self.loop.call_soon(self._poll)
        else:
            self._polling = False

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
