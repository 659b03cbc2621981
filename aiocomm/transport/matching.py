"""Matching arriving frames with posted receives: no sockets in here.

Theory of operation
-------------------
Each data frame has a key ``(kind, context, tag)`` and comes from one source
rank.  Per source a :class:`Mailbox` keeps, per key, a FIFO of *posted*
receives and a FIFO of *arrivals* (frames that came before their receive).
A frame is paired with the oldest posted receive that it fits, and its
payload is read straight into that receive's memory; with no receive posted
it lands in a buffer of its own (an :class:`Arrival`) that the receive takes
over later.  Messages announced instead of sent (``RTS``, see
:mod:`aiocomm.transport.flow`) queue the same way as an :class:`Announced`
with no buffer; once a receive takes one, the sender is cleared to send and
the payload (``RDATA``) goes straight into the receive's memory.

Invariants:

* FIFO per (source, key): the n-th receive posted gets the n-th frame sent.
* Nothing is lost by a receive that fails: a receive that does not fit the
  oldest message (another shape, dtype or operation) raises
  :class:`MismatchError` and leaves the message queued; a receive that timed
  out or was failed is skipped by later frames.  One that fails after it
  took a message (its payload still coming) gives it back first in line, and
  until it is in, nothing of its key is paired, so later messages (already
  here, as an announced message's payload may come long after them) cannot
  overtake it; messages are numbered as they come (``Mailbox.seq``), so
  several given back go back in their order.  What this does not undo: a
  later receive, still alive, that already took a later message keeps it.
* A message given back after its context was aborted is dropped, and its
  credit handed back.
* Every receive is a :class:`~aiocomm.transport.waits.Wait` on its source,
  from posting until its last byte is in, so losing the source, aborting the
  context or the deadline ends it, also halfway through its payload.
* Buffered bytes are counted: each eager frame's bytes are handed back to the
  sender's credit (:meth:`MatchEvents.credit`) once no buffer of ours holds
  them.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

import numpy as np

from .. import wire
from ..errors import MismatchError, PeerLostError, ProtocolError
from ..wire import Signature, Sink
from .waits import Op, Wait, WaitSet

Key = tuple[int, int, int]  # (kind, context, tag)
_P2P = int(wire.Kind.P2P)


def byte_view(arr: np.ndarray) -> memoryview:
    """A flat writable/readable byte view of a C-contiguous array."""
    try:
        return memoryview(arr).cast("B")  # type: ignore[arg-type]  # numpy types ndarray.__buffer__ for Python>=3.12 only
    except (TypeError, ValueError):  # a shape with a zero in it; a dtype with no buffer format (bfloat16)
        return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def sig_nbytes(sig: Signature) -> int:
    count = 1
    for d in sig.shape:
        count *= d
    return count * wire.dtype_from_name(sig.dtype).itemsize


class MatchEvents(Protocol):
    """What matching asks of the transport."""

    def credit(self, src: int, nbytes: int) -> None:
        """``nbytes`` of eager data from ``src`` are no longer buffered here."""

    def clear_to_send(self, src: int, context: int, rid: int, out: np.ndarray) -> None:
        """A receive is posted for ``src``'s announced message ``rid``; its payload goes into ``out``."""

    def allocate(self, shape: tuple[int, ...], dtype: str, src: int, op: Op | None, context: int) -> np.ndarray:
        """A new array (raises a CommError naming the size if memory runs out)."""


class PendingRecv(Wait):
    """A posted receive: a wait on its source, and the sink of its frame.

    ``out`` is its destination (``None`` until its frame says nothing more
    than its signature does: allocated when the frame arrives); ``view`` is
    set when its frame is routed to it.  ``key`` and ``matcher`` let a
    receive that fails give back what it claimed (see :meth:`done`).
    """

    __slots__ = ("out", "sig", "key", "matcher", "queue", "owing", "seq")

    def __init__(self, waits: WaitSet, src: int, op: Op, sig: Signature, out: np.ndarray | None,
                 key: Key | None = None, matcher: Matcher | None = None) -> None:
        Wait.__init__(self, waits, src, op, "waiting for data from")
        self.out = out
        self.sig = sig
        self.key = key
        self.matcher = matcher
        self.queue: collections.deque[PendingRecv] | None = None  # the posted queue it waits in
        self.owing = False  # it took an announced message whose payload is not in yet (Mailbox.owed)
        self.seq = -1  # the place of the message it took, in its source's order (see Mailbox.seq)

    def fail(self, exc: BaseException) -> None:
        queue = self.queue
        if queue is not None:  # a dead receive leaves its queue at once (a polling loop must not grow it)
            self.queue = None
            try:
                queue.remove(self)
            except ValueError:
                pass
        Wait.fail(self, exc)

    def done(self) -> None:
        """Its frame is in ``out``: wake the waiting coroutine.  A receive
        that failed meanwhile (its deadline passed while the payload was
        coming) gives the message back, first in line for the next receive."""
        self.waits.pending.discard(self)
        if self.owing and self.matcher is not None:
            self.matcher.settled(self)
        future = self.future
        if not future.done():
            future.set_result(self.out)
        elif self.matcher is not None and self.out is not None:
            self.matcher.give_back(self.peer, self.key, self.sig.encoded, self.out, self.seq)


class Arrival(Sink):
    """An eager frame that arrived before its receive was posted."""

    __slots__ = ("data", "meta", "complete", "waiter", "matcher", "src", "key", "orphaned", "seq")

    def __init__(self, matcher: Matcher, src: int, meta: bytes, data: np.ndarray, key: Key, seq: int) -> None:
        self.data = data
        self.seq = seq  # its place in its source's order
        self.view = memoryview(data)  # type: ignore[arg-type]  # (numpy's stubs: as in byte_view)
        self.meta = meta  # raw signature, checked when its receive is posted
        self.complete = False
        self.waiter: PendingRecv | None = None  # a receive posted while the payload was still coming
        self.matcher = matcher
        self.src = src
        self.key = key
        self.orphaned = False  # its context was aborted while it came: only its credit matters

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def done(self) -> None:
        self.complete = True
        if self.orphaned:
            self.matcher.events.credit(self.src, self.data.nbytes)
            return
        pending = self.waiter
        if pending is not None:  # its receive was posted while the payload was coming
            self.waiter = None
            if pending.future.done():  # ... and failed meanwhile: the message waits for the next one
                self.matcher.requeue(self)
                return
            pending.out = take(self, pending.out, pending.sig)
            self.matcher.events.credit(self.src, self.data.nbytes)
            pending.matcher = None  # nothing to give back: the message is taken
            pending.done()


class Announced:
    """A message announced by ``RTS`` whose receive is not posted yet."""

    __slots__ = ("meta", "nbytes", "rid", "seq")

    def __init__(self, meta: bytes, nbytes: int, rid: int, seq: int) -> None:
        self.meta = meta
        self.nbytes = nbytes
        self.rid = rid
        self.seq = seq


class Mailbox:
    """Matching state for frames from one source rank."""

    __slots__ = ("posted", "arrived", "cleared", "owed", "seq")

    def __init__(self) -> None:
        self.posted: dict[Key, collections.deque[PendingRecv]] = {}
        self.arrived: dict[Key, collections.deque[Arrival | Announced]] = {}
        self.cleared: dict[int, PendingRecv] = {}  # announced id -> the receive its RDATA fills
        #: Receives that took an announced message whose payload is not in yet
        #: (from its CTS until its last byte).  While one of them has failed,
        #: its message will come back first in line, so nothing of its key is
        #: paired meanwhile (:meth:`Matcher._held_up`).
        self.owed: list[PendingRecv] = []
        #: The next message's place: every message of this source is numbered
        #: as it comes, so one given back by a receive that failed goes back
        #: exactly where it was, before the ones that came after it.
        self.seq = 0


def take(arrival: Arrival, out: np.ndarray | None, sig: Signature) -> np.ndarray:
    """An arrived frame's data, in ``out`` or (``None``) as an array of ``sig``."""
    if out is None:  # signatures matched: take the buffer as it is
        return arrival.data.view(wire.dtype_from_name(sig.dtype)).reshape(sig.shape)
    byte_view(out)[:] = arrival.data  # type: ignore[call-overload]  # (numpy's stubs: as in byte_view)
    return out


class Matcher:
    """The mailboxes of one rank, one per source."""

    def __init__(
        self, rank: int, size: int, waits: WaitSet, events: MatchEvents, lost: dict[int, PeerLostError]
    ) -> None:
        self.rank = rank
        self.waits = waits
        self.events = events
        self.lost = lost  # peers known gone (owned by the connections)
        self.boxes = [Mailbox() for _ in range(size)]
        self.dropped: set[int] = set()  # aborted contexts: a message of theirs given back is dropped

    # ---- checks

    def _misfit(
        self, sig: Signature, out: np.ndarray | None, meta: bytes, nbytes: int, src: int
    ) -> MismatchError | None:
        """Why a message (``meta``, ``nbytes``) does not fit a receive, or None."""
        if meta != sig.encoded:  # equal bytes: the common case, no decoding
            try:
                wire.check_signature(sig, meta, me=self.rank, peer=src)
            except MismatchError as exc:
                return exc
        if out is None:
            if sig_nbytes(sig) != nbytes:
                raise ProtocolError(f"rank {src} sent {nbytes} bytes for {sig.describe()}")
        elif out.nbytes != nbytes:
            return MismatchError(
                f"rank {self.rank} expected a {out.nbytes}-byte segment of {sig.describe()} "
                f"from rank {src}, got {nbytes} bytes"
            )
        return None

    def _first_fitting(self, box: Mailbox, key: Key, meta: bytes, nbytes: int, src: int) -> PendingRecv | None:
        """Pop the oldest live posted receive the message fits; receives it
        does not fit fail with MismatchError (the message stays for the next)."""
        queue = box.posted.get(key)
        while queue:
            pending = queue.popleft()
            if not queue:
                del box.posted[key]
            if pending.future.done():  # timed out or failed: skipped, it takes nothing
                queue = box.posted.get(key)
                continue
            problem = self._misfit(pending.sig, pending.out, meta, nbytes, src)
            if problem is None:
                return pending
            pending.fail(problem)
            queue = box.posted.get(key)
        return None

    # ---- arriving (called by the reader, through the mesh's routing)

    def arrive(self, src: int, kind: int, context: int, tag: int, meta: bytes, nbytes: int) -> Sink:
        """An eager data frame's header is in: where its payload goes."""
        box = self.boxes[src]
        key = (kind, context, tag)
        seq = box.seq
        box.seq = seq + 1
        queue = box.posted.get(key)
        if queue and not (box.owed and self._held_up(box, key)):
            pending = queue[0]
            if meta == pending.sig.encoded and pending.out is not None and pending.out.nbytes == nbytes \
                    and not pending.future.done():
                queue.popleft()  # the common case, checked inline
                if not queue:
                    del box.posted[key]
            else:
                pending = self._first_fitting(box, key, meta, nbytes, src)  # type: ignore[assignment]
            if pending is not None:
                pending.queue = None
                pending.seq = seq
                out = pending.out
                if out is None:
                    try:
                        out = pending.out = self.events.allocate(
                            pending.sig.shape, pending.sig.dtype, src, pending.op, context
                        )
                    except Exception as exc:
                        pending.fail(exc)
                        self.events.credit(src, nbytes)
                        return Sink(None)
                pending.view = byte_view(out)
                if nbytes:
                    self.events.credit(src, nbytes)  # straight into a receive's memory: nothing buffered
                return pending
        try:
            data = self.events.allocate((nbytes,), "uint8", src, None, context)
        except Exception:
            self.events.credit(src, nbytes)
            return Sink(None)  # the context is aborted: its receives fail
        arrival = Arrival(self, src, meta, data, key, seq)
        arrivals = box.arrived.get(key)
        if arrivals is None:
            arrivals = box.arrived[key] = collections.deque()
        arrivals.append(arrival)
        return arrival

    def announce(self, src: int, kind: int, context: int, tag: int, meta: bytes, nbytes: int, rid: int) -> None:
        """An ``RTS``: clear it at once if a receive waits for it, else queue it."""
        box = self.boxes[src]
        key = (kind, context, tag)
        seq = box.seq
        box.seq = seq + 1
        held_up = box.owed and self._held_up(box, key)
        pending = None if held_up else self._first_fitting(box, key, meta, nbytes, src)
        if pending is not None:
            pending.seq = seq
            self._clear(box, pending, src, context, rid)
            return
        arrivals = box.arrived.get(key)
        if arrivals is None:
            arrivals = box.arrived[key] = collections.deque()
        arrivals.append(Announced(meta, nbytes, rid, seq))

    def _clear(self, box: Mailbox, pending: PendingRecv, src: int, context: int, rid: int) -> None:
        pending.queue = None
        if pending.out is None:
            try:
                pending.out = self.events.allocate(pending.sig.shape, pending.sig.dtype, src, pending.op, context)
            except Exception as exc:
                pending.fail(exc)
                return
        box.cleared[rid] = pending
        pending.owing = True
        box.owed.append(pending)
        self.events.clear_to_send(src, context, rid, pending.out)

    def payload(self, src: int, rid: int, nbytes: int, counted: bool = False) -> Sink:
        """An ``RDATA`` frame's header is in: the receive its announcement
        cleared (one that gave up meanwhile gives the message back when it is in).
        ``counted``: its bytes were taken from the sender's credit."""
        box = self.boxes[src]
        pending = box.cleared.pop(rid, None)
        if pending is None:
            return self._unsolicited(box, src, rid, nbytes, counted)
        assert pending.out is not None
        if pending.out.nbytes != nbytes:
            raise ProtocolError(f"rank {src} sent {nbytes} bytes for announced message {rid} of {pending.out.nbytes}")
        if counted:
            self.events.credit(src, nbytes)  # straight into a receive's memory: nothing buffered
        pending.view = byte_view(pending.out)
        return pending

    def written(self, src: int, rid: int) -> int:
        """An ``RDONE``: the payload of announced message ``rid`` is in the
        memory its receive offered (a receive that gave up meanwhile gives
        the message back).  Returns its size."""
        pending = self.boxes[src].cleared.pop(rid, None)
        if pending is None:  # its context was aborted meanwhile
            return 0
        assert pending.out is not None
        pending.done()
        return pending.out.nbytes

    def _unsolicited(self, box: Mailbox, src: int, rid: int, nbytes: int, counted: bool) -> Sink:
        """The payload of an announcement no receive has cleared: its sender
        is closing and sends what it still held, or its receive was not
        posted in time (``counted``: sent as an eager frame would have been).
        It becomes an ordinary arrival in the announcement's place (or is
        dropped if its context was aborted)."""
        for key, arrivals in box.arrived.items():
            for i, entry in enumerate(arrivals):
                if type(entry) is Announced and entry.rid == rid:
                    if entry.nbytes != nbytes:
                        raise ProtocolError(
                            f"rank {src} sent {nbytes} bytes for announced message {rid} of {entry.nbytes}"
                        )
                    try:
                        data = self.events.allocate((nbytes,), "uint8", src, None, key[1])
                    except Exception:
                        if counted:
                            self.events.credit(src, nbytes)
                        return Sink(None)
                    arrival = Arrival(self, src, entry.meta, data, key, entry.seq)
                    arrivals[i] = arrival
                    if not counted:
                        self.events.credit(src, -nbytes)  # buffered now, though never credited to the sender
                    return arrival
        if counted:
            self.events.credit(src, nbytes)
        return Sink(None)

    # ---- posting

    def post(
        self, src: int, kind: int, context: int, tag: int, sig: Signature, out: np.ndarray | None, op: Op
    ) -> asyncio.Future[np.ndarray]:
        """Post a receive from ``src``; the future gives the filled array.

        ``out`` is the destination (contiguous, exactly the frame's size) or
        ``None`` for a new array of ``sig``'s shape and dtype.  Raises
        ``MismatchError`` (consuming nothing) if the oldest message waiting
        for this key does not fit.
        """
        box = self.boxes[src]
        key = (kind, context, tag)
        arrivals = box.arrived.get(key)
        if arrivals and not (box.owed and self._held_up(box, key)):
            arrival = arrivals[0]
            problem = self._misfit(sig, out, arrival.meta, arrival.nbytes, src)
            if problem is not None:
                raise problem  # the message stays queued for a receive that fits
            arrivals.popleft()
            if not arrivals:
                del box.arrived[key]
            if type(arrival) is Announced:
                pending = PendingRecv(self.waits, src, op, sig, out, key, self)
                pending.seq = arrival.seq
                self._clear(box, pending, src, context, arrival.rid)
                return pending.future
            assert isinstance(arrival, Arrival)
            if arrival.complete:
                future = self.waits.loop.create_future()
                future.set_result(take(arrival, out, sig))
                self.events.credit(src, arrival.nbytes)
                return future
            if src in self.lost:  # its payload will never be complete
                raise self.lost[src]
            pending = PendingRecv(self.waits, src, op, sig, out, key, self)
            arrival.waiter = pending
            return pending.future
        if src in self.lost:
            raise self.lost[src]
        pending = PendingRecv(self.waits, src, op, sig, out, key, self)
        queue = box.posted.get(key)
        if queue is None:
            queue = box.posted[key] = collections.deque()
        queue.append(pending)
        pending.queue = queue
        return pending.future

    # ---- receives that failed after they claimed a message

    def _held_up(self, box: Mailbox, key: Key) -> bool:
        """Whether a receive of ``key`` failed while its announced message's
        payload is still coming: that message will be first in line again,
        so nothing of ``key`` may be paired before it is in."""
        return any(p.key == key and p.future.done() for p in box.owed)

    def settled(self, pending: PendingRecv) -> None:
        """``pending``'s announced message is in (or will never come)."""
        pending.owing = False
        owed = self.boxes[pending.peer].owed
        try:
            owed.remove(pending)
        except ValueError:
            pass

    def requeue(self, arrival: Arrival) -> None:
        """A complete message whose receive gave up: first in line again
        (point-to-point only: a collective that fails aborts its context)."""
        if arrival.key[0] != _P2P or arrival.key[1] in self.dropped:  # (no receive will ever take it)
            self.events.credit(arrival.src, arrival.data.nbytes)
            return
        box = self.boxes[arrival.src]
        arrivals = box.arrived.get(arrival.key)
        if arrivals is None:
            arrivals = box.arrived[arrival.key] = collections.deque()
        at = 0  # back in its place: before the messages that came after it
        while at < len(arrivals) and arrivals[at].seq < arrival.seq:
            at += 1
        arrivals.insert(at, arrival)
        self._pair(box, arrival.src, arrival.key)

    def _pair(self, box: Mailbox, src: int, key: Key) -> None:
        """Receives posted while messages of their key waited (behind one
        that was coming back): hand the messages over, in order."""
        queue = box.posted.get(key)
        arrivals = box.arrived.get(key)
        while queue and arrivals and not (box.owed and self._held_up(box, key)):
            pending = queue.popleft()
            pending.queue = None
            if pending.future.done():
                continue
            entry = arrivals[0]
            problem = self._misfit(pending.sig, pending.out, entry.meta, entry.nbytes, src)
            if problem is not None:  # as a receive posted now would: it fails, the message stays
                pending.fail(problem)
                continue
            arrivals.popleft()
            pending.seq = entry.seq
            if type(entry) is Announced:
                self._clear(box, pending, src, key[1], entry.rid)
            elif entry.complete:  # type: ignore[union-attr]  # (an Arrival)
                pending.out = take(entry, pending.out, pending.sig)  # type: ignore[arg-type]
                self.events.credit(src, entry.nbytes)
                pending.matcher = None
                pending.done()
            else:
                entry.waiter = pending  # type: ignore[union-attr]
        if queue is not None and not queue:
            box.posted.pop(key, None)
        if arrivals is not None and not arrivals:
            box.arrived.pop(key, None)

    def give_back(self, src: int, key: Key | None, meta: bytes, data: np.ndarray, seq: int) -> None:
        """A receive that failed while its payload came: the payload, now
        complete in the receive's memory, goes back as the first message."""
        if key is None:
            return
        arrival = Arrival(self, src, meta, data.reshape(-1).view(np.uint8), key, seq)
        arrival.complete = True
        # Its bytes were credited when it was routed; count them again as buffered.
        self.events.credit(src, -arrival.data.nbytes)
        self.requeue(arrival)

    def revoke(self, src: int, rid: int) -> None:
        """``src`` gave up on announced message ``rid`` (its send failed):
        forget the announcement; a receive it was cleared for waits again."""
        box = self.boxes[src]
        pending = box.cleared.pop(rid, None)
        if pending is not None:
            self.settled(pending)
            if pending.key is None:
                return
            if not pending.future.done():
                queue = box.posted.get(pending.key)
                if queue is None:
                    queue = box.posted[pending.key] = collections.deque()
                queue.appendleft(pending)
                pending.queue = queue
            self._pair(box, src, pending.key)  # (what waited behind it, if it had failed)
            return
        for key, arrivals in list(box.arrived.items()):
            for arrival in arrivals:
                if type(arrival) is Announced and arrival.rid == rid:
                    arrivals.remove(arrival)
                    if not arrivals:
                        del box.arrived[key]
                    return

    # ---- ending

    def drop_context(self, context: int) -> None:
        """Forget everything of an aborted context (its waits are failed by the WaitSet)."""
        self.dropped.add(context)
        for src, box in enumerate(self.boxes):
            for key in [k for k in box.posted if k[1] == context]:
                del box.posted[key]
            for key in [k for k in box.arrived if k[1] == context]:
                for arrival in box.arrived.pop(key):
                    if type(arrival) is Arrival:
                        if arrival.complete:
                            self.events.credit(src, arrival.nbytes)
                        else:
                            arrival.orphaned = True  # credited when its last byte is in
            for rid in [r for r, p in box.cleared.items() if p.op.context == context]:
                del box.cleared[rid]
            box.owed = [p for p in box.owed if p.op.context != context]

    def drop_peer(self, src: int) -> None:
        """``src`` is lost: what it announced or half sent will never come.
        Complete messages stay receivable up to the first that will never
        come whole, and none after it: a receive must not take a later
        message in its place (one announced, then a smaller one sent eagerly
        or through the inbox, and the sender killed: its receive fails with
        PeerLostError instead).  A message a receive took whose payload
        never came (``owed``: that receive timed out, or fails now) is such
        a hole too.  The waits are failed by the WaitSet."""
        box = self.boxes[src]
        holes: dict[Key, int] = {}  # per key, the first message taken by a receive whose payload never came
        for pending in box.owed:
            if pending.key is not None:
                holes[pending.key] = min(holes.get(pending.key, pending.seq), pending.seq)
        box.posted.clear()
        box.cleared.clear()
        box.owed.clear()
        for key in list(box.arrived):
            hole = holes.get(key)
            kept: collections.deque[Arrival | Announced] = collections.deque()
            for a in box.arrived[key]:
                if type(a) is not Arrival or not a.complete or (hole is not None and a.seq > hole):
                    break
                kept.append(a)
            if kept:
                box.arrived[key] = kept
            else:
                del box.arrived[key]

