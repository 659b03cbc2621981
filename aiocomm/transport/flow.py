"""Flow control: a bounded budget for data no receive has asked for.

Theory of operation
-------------------
A rank buffers a message that arrives before its receive is posted.  To keep
that memory bounded, each rank has a budget (``AIOCOMM_BUFFER_BYTES``,
default 256 MiB) split evenly into a *window* per sender, which it announces
in the handshake.  A sender holds *credit* per connection, starting at the
window:

* A message that fits (at most half the window, and no more than the credit
  left) goes *eagerly*: header and payload at once; its bytes are taken from
  the credit.
* Any other message is *announced* (``RTS``): only its header and signature
  go out, in order with the eager ones, and the payload stays in the
  sender's memory.  The receiver matches the announcement like any message
  and, once a receive is posted for it, answers ``CTS``; the sender then
  writes the payload (``RDATA``) straight into that receive's memory.
* The receiver hands credit back (``CREDIT``) for eager bytes once no buffer
  of its own holds them (the frame went straight into a posted receive, or
  its receive took it over), in batches of a quarter of the window.

So at most a window per sender is ever buffered, and nothing waits behind a
message over budget: its announcement is a few dozen bytes, and everything
after it on the connection (collectives, other messages, other contexts)
flows on.  A blocking ``send`` of an announced message returns once a
receive took it (MPI's rendezvous protocol); ``CTS`` and ``CREDIT`` travel
back on the sender's own connection.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np

from .waits import Op, Wait, WaitSet


def window_for(budget: int, size: int) -> int:
    """Each sender's share of a rank's ``budget`` in a world of ``size``."""
    return max(budget // max(size - 1, 1), 0)


class Announcement(Wait):
    """An announced message waiting for its receiver's ``CTS``.

    A *detached* one belongs to a ``send`` that already returned: its payload
    is a copy the sender holds (within its own budget) until the receiver
    asks; it has no deadline and ends only with its peer or its context.
    """

    __slots__ = ("data", "outbox", "rid", "on_end", "revoke", "timer")

    def __init__(self, waits: WaitSet, peer: int, op: Op, data: np.ndarray, outbox: SendWindow, rid: int) -> None:
        Wait.__init__(self, waits, peer, op, "waiting for a receive to be posted by")
        self.data = data
        self.outbox = outbox
        self.rid = rid
        self.on_end: Callable[[], None] | None = None  # releases a detached copy's bytes
        self.revoke: Callable[[int, int], None] | None = None  # tells the receiver it is withdrawn
        self.timer: asyncio.TimerHandle | None = None  # the end of its grace (see PeerStream._announce_across)

    def resolve(self, value: object = None) -> None:
        self._ended()
        Wait.resolve(self, value)

    def fail(self, exc: BaseException) -> None:
        announced = self.outbox.announced
        if announced.get(self.rid) is self:  # (not a held copy that took its place: that one goes on)
            del announced[self.rid]
            if self.revoke is not None:
                self.revoke(self.op.context, self.rid)  # the receiver must not wait for a payload that will not come
        self._ended()
        Wait.fail(self, exc)

    def _ended(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()


class SendWindow:
    """The sender's side of one connection: credit left and announced messages.
    Where small messages also go through shared memory from the caller's
    thread (:mod:`.inbox`), credit changes under a lock (:meth:`share`)."""

    __slots__ = ("credit", "eager_max", "announced", "_next_id", "_lock")

    def __init__(self, window: int) -> None:
        self.credit = window
        self.eager_max = window // 2
        self.announced: dict[int, Announcement] = {}
        self._next_id = 0
        self._lock: threading.Lock | None = None

    def share(self) -> None:
        """Credit will be taken from other threads too: take it under a lock
        from now on (before any other thread may)."""
        self._lock = threading.Lock()

    def take_eager(self, nbytes: int) -> bool:
        """Whether ``nbytes`` may go eagerly now (and take them from the credit)."""
        lock = self._lock
        if lock is not None:
            with lock:
                return self._take(nbytes)
        return self._take(nbytes)

    def _take(self, nbytes: int) -> bool:
        if nbytes <= self.eager_max and nbytes <= self.credit:
            self.credit -= nbytes
            return True
        return False

    def give(self, nbytes: int) -> None:
        """Credit back (the receiver's ``CREDIT``, or a take that was not used)."""
        lock = self._lock
        if lock is not None:
            with lock:
                self.credit += nbytes
        else:
            self.credit += nbytes

    def announce(self, waits: WaitSet, peer: int, op: Op, data: np.ndarray) -> Announcement:
        rid = self._next_id
        self._next_id = rid + 1
        entry = self.announced[rid] = Announcement(waits, peer, op, data, self, rid)
        return entry

    def cleared(self, rid: int) -> Announcement | None:
        """``CTS`` for ``rid``: the announcement to send now (None if it was given up)."""
        return self.announced.pop(rid, None)

    def fail_all(self, exc: BaseException) -> None:
        for entry in list(self.announced.values()):
            entry.fail(exc)


class ReceiveBudget:
    """The receiver's side: eager bytes owed back to each sender (from the
    loop; with ``shared``, also from a caller's thread that took a message
    out of the inbox: under a lock then)."""

    __slots__ = ("window", "threshold", "owed", "_lock")

    def __init__(self, window: int, size: int, shared: bool = False) -> None:
        self.window = window
        self.threshold = max(window // 4, 1)
        self.owed = [0] * size
        self._lock = threading.Lock() if shared else None

    def consumed(self, src: int, nbytes: int) -> int:
        """Note ``nbytes`` freed; returns how much credit to send back now (0: not yet)."""
        lock = self._lock
        if lock is not None:
            with lock:
                return self._consumed(src, nbytes)
        return self._consumed(src, nbytes)

    def _consumed(self, src: int, nbytes: int) -> int:
        owed = self.owed[src] + nbytes
        if owed >= self.threshold:
            self.owed[src] = 0
            return owed
        self.owed[src] = owed
        return 0


def describe_bytes(n: int) -> str:
    """``1073741824 bytes (1.0 GiB)``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n} bytes ({n / (1 << shift):.1f} {unit})"
    return f"{n} bytes"


__all__ = ["Announcement", "SendWindow", "ReceiveBudget", "window_for", "describe_bytes"]
