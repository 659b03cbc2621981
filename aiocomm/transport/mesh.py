"""The mesh: one rank's transport, composed of parts with one job each.

=====================  ===============================================
part                   job
=====================  ===============================================
``connections``        listening, dialling, the stream registry, lost peers
``stream``             one connection: asyncio glue, handshake, writes
``matching``           pairing frames with posted receives (no sockets)
``flow``               the budget for unexpected data: credit, RTS/CTS
``cma``                large payloads written into a receive's memory on this host
``inbox``              messages below 2 MiB from peers on this host, through shared memory
``waits``              every wait, its deadline, who can end it; polling
``contexts``           groups on the wire, and aborting them
=====================  ===============================================

:class:`Mesh` wires them together and is what the engine (:mod:`aiocomm.group`)
calls: ``open`` a peer, ``send`` a frame, ``post`` a receive, ``flush``,
``abort`` a context.  It owns the events that cross parts: a lost peer fails
its waits and its half-received messages; an aborted context fails its waits
everywhere and tells the other members.

Imports point one way: ``mesh`` imports ``connections``, which imports
``stream``; those two ask what they need of the layer above through a
protocol of their own (:class:`~.connections.ConnectionsOwner`, which the
mesh is, and :class:`~.stream.StreamOwner`, which the connections are).
``tests/test_transport_layers.py`` keeps it so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .. import results, wire
from ..config import WorldSpec, buffer_budget, poll_seconds, transport
from ..errors import CommError, CommTimeoutError, OutOfMemoryError, PeerLostError, ProtocolError
from ..wire import Header, Kind, Signature, Sink
from . import cma, inbox, workers
from .connections import CLOSE_SECONDS, Connections
from .contexts import Contexts, abort_error, abort_fields
from .flow import ReceiveBudget, describe_bytes, window_for
from .matching import Matcher, byte_view
from .stream import PeerStream
from .waits import Op, Wait, WaitSet

log = logging.getLogger("aiocomm")

_encode_head = wire.encode_frame_head
_DATA_KINDS = wire.DATA_KINDS
_RTS_TRAILER = wire.RTS_TRAILER
_HEADER_SIZE = wire.HEADER_SIZE
_P2P = int(Kind.P2P)
_RTS = int(Kind.RTS)
_SMALL = inbox.SMALL
#: Arrays offered to senders that may still write into them after this rank
#: stopped waiting (the sender was lost, or this mesh closed): kept for the
#: life of the process (a few, at most the receives pending at that moment).
_KEPT: list[np.ndarray] = []
_EMPTY = b""
#: Seconds between the loop's looks at the rings it waits on (see Mesh._wait_on).
POLL_RINGS = 0.01
#: Seconds a caller taking a message part by part waits for its next part
#: before it hands the rest to the loop (its sender was held up).
PART_PATIENCE = 0.001
#: Seconds a sender waits for room for its next part before it rings the
#: receiver's bell (its loop then takes what is there), and before it sleeps
#: between looks.
STALL_RING, STALL_SLEEP = 0.0001, 0.002


class _Taking:
    """A message the loop takes out of a ring part by part (``Ring.partial``):
    where its bytes go, and its size.  ``start``: where its first record
    begins in the ring, if a caller's thread may have left it there."""

    __slots__ = ("sink", "view", "total", "start")

    def __init__(self, sink: Sink, view: memoryview | None, total: int, start: int = -1) -> None:
        self.sink = sink
        self.view = view
        self.total = total
        self.start = start


class _Caller:
    """A message a caller's thread takes part by part (``Ring.partial``).

    Every part is in ``got`` before the ring's head passes it (a part says
    where in the message it goes, so taking one twice is harmless), and
    ``last_in`` is set before the head passes the last one; so whenever the
    caller stops (an exception at any point included), the loop can take
    the message over (:meth:`Mesh._adopt`): ``got`` as it is, then what is
    left in the ring from ``start`` (where the first record begins) on.  It
    does so once the caller leaves it (``handed``), or at once when the
    order of what comes after it requires (a frame from the socket sent
    after it; its sender lost)."""

    __slots__ = ("context", "meta", "got", "total", "start", "handed", "last_in")

    def __init__(self, context: int, meta: bytes, got: memoryview, start: int) -> None:
        self.context = context
        self.meta = meta
        self.got = got
        self.total = len(got)
        self.start = start
        self.handed = False
        self.last_in = False


def _part_at(src: int, ring: inbox.Ring, start: int, mark: int, total: int) -> int:
    """Where in the message being taken part by part (its first record
    beginning at ``start`` in ``ring``) the record just peeked goes (its
    ``mark`` and ``total`` as ``Ring.peek`` gave them)."""
    if total == -1:
        return mark  # (a later part says where it goes)
    if ring.control[inbox.HEAD] == start:
        return 0  # (its first part, which a caller's thread left in the ring)
    raise ProtocolError(f"rank {src} began a message in this rank's inbox before its last was whole")


#: The context of the bring-up barrier (never a group's: those are 0 or odd).
BRING_UP_CONTEXT = (1 << 64) - 2


class Mesh:
    """All of one rank's connections, and the matching of what arrives."""

    def __init__(self, spec: WorldSpec, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.size = spec.size
        self.token = spec.token
        self.loop = loop or asyncio.get_running_loop()
        budget = buffer_budget()
        self.window = window_for(budget, self.size)
        self.waits = WaitSet(self.loop, self.rank, poll_seconds(spec))
        self.contexts = Contexts(self.size)
        self.broken = self.contexts.broken
        # (host id, pid), for peers on this host to write large payloads into (cma); (0, 0): no
        self.place = (cma.host_id(), os.getpid()) if transport() != "tcp" and cma.available() is None else (0, 0)
        # Small messages from peers on this host come through shared memory (inbox).
        self.inbox: inbox.Inbox | None = None
        if self.place[1] and self.size > 1 and inbox.available() is None:
            try:
                self.inbox = inbox.Inbox(self.size)
            except OSError as exc:
                log.info("rank %d: no inbox for small messages from this host (%s): they come over TCP",
                         self.rank, exc)
        self.inbox_fds = (self.inbox.fd, self.inbox.bell) if self.inbox is not None else (-1, -1)
        #: Bytes of the complete frames routed from each peer's connection (see
        #: inbox: a record's mark), and of those routed, complete or not
        self.routed = [0] * self.size
        self._started = [0] * self.size
        self._waiting: set[int] = set()  # peers whose ring the loop waits on (a receive is posted)
        self._polling: asyncio.TimerHandle | None = None  # looks at those rings now and then
        self.connections = Connections(self)
        self.lost = self.connections.lost
        self.budget = ReceiveBudget(self.window, self.size, shared=self.inbox is not None)
        self.matcher = Matcher(self.rank, self.size, self.waits, self, self.lost)
        self._abort_tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.bytes_sent = 0  # payload bytes, for the benchmark's wire count
        self.sent_in_parts = 0  # messages sent whole through a peer's inbox in parts (either face)
        self.parts_handed = 0  # async sends in parts handed to a worker thread after their first part
        # (the parts paths count under it: they run on the loop, worker threads and blocking senders;
        # bytes_sent's other updates do not, and may lose one: it is for the benchmark's wire count)
        self._counts = threading.Lock()
        self._parts_workers: dict[int, workers.Worker] = {}  # destination -> its thread for them
        self.hold_budget = budget  # what this rank may hold of its own sends not yet received
        self.held = 0
        # Large payloads from peers on this host written straight into the
        # receive's memory (cma): the receives' arrays offered to a sender
        # that may still write into them.
        self.offered: dict[tuple[int, int], np.ndarray] = {}  # (src, announced id) -> the receive's array
        self.bytes_written_across = 0  # payload bytes peers wrote into this rank's memory

    # ---- bring-up and tear-down

    async def start(self, connect_timeout: float) -> None:
        """Listen, form the ring, and make sure every rank is up."""
        if self.inbox is not None:
            self.loop.add_reader(self.inbox.bell, self._rung)
        await self.connections.listen()
        if self.size == 1:
            return
        await self.connections.bring_up(connect_timeout)
        await self._barrier(connect_timeout)
        self.connections.formed = True

    async def _barrier(self, timeout: float) -> None:
        """``size - 1`` empty steps around the ring: after step ``s`` a rank
        knows that the ``s + 1`` ranks to its left are up, so in the end that
        every rank listens (a later refused dial then means a lost rank)."""
        op = Op("forming the world", BRING_UP_CONTEXT, timeout, self.loop.time() + timeout)
        right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        stream = await self.connections.open(right, op)
        nothing = np.empty(0, np.uint8)
        sig = wire.signature("bring-up", nothing.dtype, (0,))
        for step in range(self.size - 1):
            self.send(stream, Kind.COLL, BRING_UP_CONTEXT, step, sig, nothing, op)
            await self.post(left, Kind.COLL, BRING_UP_CONTEXT, step, sig, nothing, op)

    async def close(self) -> None:
        """Close every connection and listener (a clean exit)."""
        if self.closed:
            return
        # One budget for the notices and the clean close after them: a peer
        # that is gone or frozen (the usual reason for notices) then holds up
        # the exit once, not once for each.  (What was written before flows
        # meanwhile; held payloads, queued only now, get a budget of their own.)
        budget_end = self.loop.time() + CLOSE_SECONDS
        if self._abort_tasks:  # let the other ranks learn why this one gave up
            await asyncio.wait(list(self._abort_tasks), timeout=max(0.0, budget_end - self.loop.time()))
        self.closed = True
        _KEPT.extend(self.offered.values())  # a sender may still write into them: never free them
        self.offered.clear()
        held = self._send_held()
        self.waits.fail_all(CommError(f"rank {self.rank}: aiocomm was shut down while this operation waited"))
        self.waits.close()
        await self.connections.close(None if held else budget_end)
        if self.inbox is not None:
            self.loop.remove_reader(self.inbox.bell)
            if self._polling is not None:
                self._polling.cancel()
                self._polling = None
            self.inbox.close()
        await asyncio.sleep(0)

    def _send_held(self) -> int:
        """Closing: send the payloads of sends that returned before their
        receive was posted (copies this rank held), so they are delivered as
        an eager send's bytes are after an exit.  How many there were."""
        sent = 0
        for stream in list(self.connections.outgoing.values()):
            outbox = stream.outbox
            if outbox is None or stream.closing:
                continue
            for rid, entry in list(outbox.announced.items()):
                if entry.on_end is not None:  # a detached (held) send
                    stream.send_payload(outbox.cleared(rid) or entry)
                    sent += 1
        return sent

    @property
    def through_inbox(self) -> int:
        """Messages that came to this rank through its inbox (shared memory) so far."""
        return self.inbox.taken() if self.inbox is not None else 0

    def fds(self) -> list[int]:
        return self.connections.fds() + (self.inbox.fds() if self.inbox is not None else [])

    # ---- the engine's calls

    async def open(self, peer: int, op: Op) -> PeerStream:
        if op.context in self.broken:
            raise self.broken[op.context]
        return await self.connections.open(peer, op)

    def send(self, stream: PeerStream, kind: Kind, context: int, tag: int, sig: Signature, data: np.ndarray, op: Op,
             detach: bool = False) -> Wait | None:
        """Queue one data frame on an open outgoing stream (no waiting).
        Returns None, or the wait of an announced message (its payload goes
        once the receiver posts a receive); ``detach``: see ``PeerStream.send_data``."""
        if context in self.broken:
            raise self.broken[context]
        self.bytes_sent += data.nbytes
        if data.dtype.kind == "V":  # bfloat16 (ml_dtypes') has no buffer format for the socket: send its bits
            data = data.view(np.uint16)
        return stream.send_data(kind, context, tag, sig, data, op, detach)

    def hold(self, nbytes: int) -> bool:
        """Take ``nbytes`` of this rank's budget for a copy of an announced send, if it fits."""
        if self.held + nbytes > self.hold_budget:
            return False
        self.held += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.held -= nbytes

    async def flush(self, streams: Iterable[PeerStream], op: Op, announced: list[Wait] | None = None) -> None:
        """Wait until announced messages are sent and what was queued on
        ``streams`` is handed to the kernel."""
        if announced:
            for wait in announced:
                await wait.future
            announced.clear()
        for stream in list(streams):  # (a concurrent collective may open another meanwhile)
            if stream.paused:
                drain = stream.drained(op)
                if drain is not None:
                    await drain.future

    def post(
        self, src: int, kind: Kind, context: int, tag: int, sig: Signature, out: np.ndarray | None, op: Op
    ) -> asyncio.Future[np.ndarray]:
        """Post a receive from ``src``; the future gives the filled array."""
        if context in self.broken:
            raise self.broken[context]
        if kind == _P2P and self.inbox is not None:
            # (wait on the peer's ring from now on, then take what is there: in this order, see inbox)
            ring = self.inbox.ring(src)
            if src not in self._waiting:
                self._wait_on(src, ring)
            self._drain(src, ring, self.routed[src])
        return self.matcher.post(src, kind, context, tag, sig, out, op)

    # ---- arriving frames (called by the acceptor side of each stream)

    def route(self, src: int, header: Header, meta: bytes) -> Sink:
        kind, flags, context, tag, payload_len, meta_len = header
        if self.inbox is not None:
            at = self._started[src]  # (every frame before this one is complete: this many bytes)
            self._started[src] = at + _HEADER_SIZE + meta_len + payload_len
            self.routed[src] = at
            ring = self.inbox.ring(src)
            if ring.pending():
                # (the small messages sent before this frame go first; a message
                # a caller takes part by part too, if this frame may be of its key)
                self._drain(src, ring, at, kind == _P2P or kind == _RTS)
        if kind in _DATA_KINDS:
            if context in self.broken:
                self.credit(src, payload_len)
                return Sink(None)
            return self.matcher.arrive(src, kind, context, tag, meta, payload_len)
        if kind == Kind.RDATA:
            if self.offered:
                self.offered.pop((src, tag), None)
            return self.matcher.payload(src, tag, payload_len, flags == wire.RDATA_COUNTED)
        if kind == Kind.RDONE:
            if self.offered.pop((src, tag), None) is None:
                raise ProtocolError(f"rank {src} wrote announced message {tag} into memory this rank never offered")
            self.bytes_written_across += self.matcher.written(src, tag)
            return Sink(None)
        if kind == Kind.RTS:
            if flags not in _DATA_KINDS or len(meta) < _RTS_TRAILER.size:
                raise ProtocolError(f"malformed RTS frame from rank {src}")
            if context not in self.broken:
                rid, nbytes = _RTS_TRAILER.unpack_from(meta, len(meta) - _RTS_TRAILER.size)
                self.matcher.announce(src, flags, context, tag, meta[: -_RTS_TRAILER.size], nbytes, rid)
            return Sink(None)
        if kind == Kind.REVOKE:
            if self.offered:
                self.offered.pop((src, tag), None)
            self.matcher.revoke(src, tag)
            return Sink(None)
        if kind == Kind.ABORT:
            self._abort_received(src, context, wire.decode_meta(meta))
            return Sink(None)
        if kind == Kind.LOST:
            self._lost_heard(src, context, wire.decode_meta(meta))
            return Sink(None)
        raise ProtocolError(f"unexpected {Kind(kind).name} frame from rank {src} after the handshake")

    def frames_read(self, src: int, between_frames: bool) -> None:
        """After each read from ``src``: the small messages that waited for
        the frames now complete (a record marked after a frame is taken only
        once that frame's last byte is in: a receive that failed meanwhile
        gives it back first in line, as over TCP alone)."""
        if between_frames:
            self.routed[src] = self._started[src]
        if self.inbox is not None:
            ring = self.inbox.ring(src)
            if ring.pending():
                self._drain(src, ring, self.routed[src])

    # ---- small messages through the inbox (see inbox)

    def _drain(self, src: int, ring: inbox.Ring, upto: int, steal: bool = False) -> None:
        """Route the records of ``src``'s ring whose marks are at most
        ``upto`` bytes of its connection, as frames from the socket are."""
        with ring.lock:
            self._drain_locked(src, ring, upto, steal)

    def _drain_locked(self, src: int, ring: inbox.Ring, upto: int, steal: bool = False) -> None:
        """:meth:`_drain`, its ring's lock held.  ``steal``: take over a
        message a caller's thread is taking part by part (else nothing
        after it is taken meanwhile)."""
        while not ring.dead:
            partial = ring.partial
            if partial is not None and type(partial) is _Caller:
                if not (steal or partial.handed):
                    return
                partial = self._adopt(src, ring, partial)
            record = ring.peek()
            if record is None:
                return
            mark, context, meta, at, nbytes, after, total = record
            if partial is not None:  # the next part of the message the loop is taking
                where = _part_at(src, ring, partial.start, mark, total)
                view = partial.view
                if view is not None and nbytes:
                    view[where : where + nbytes] = ring.payload(at, nbytes)
                if where + nbytes < partial.total:
                    ring.advance(after, False)
                    continue
                ring.partial = None
                ring.advance(after)
                partial.sink.done()
                continue
            if mark > upto:
                return
            if total < 0:
                raise ProtocolError(f"rank {src} wrote part of a message into this rank's inbox without its start")
            sink = self._arrival(src, context, meta, total)
            view = sink.view
            if view is not None and nbytes:
                view[:nbytes] = ring.payload(at, nbytes)
            if total == nbytes:
                ring.advance(after)
                sink.done()
            else:  # the first part of a larger message
                ring.partial = _Taking(sink, view, total)
                ring.advance(after, False)

    def _adopt(self, src: int, ring: inbox.Ring, handed: _Caller) -> _Taking | None:
        """The loop takes over a message a caller's thread began to take (see
        :class:`_Caller`): where the message goes now, or None (it was whole:
        it went)."""
        sink = self._arrival(src, handed.context, handed.meta, handed.total)
        view = sink.view
        if view is not None:
            view[:] = handed.got  # (the parts not in yet are written over as they come)
        if not handed.last_in:
            taking = ring.partial = _Taking(sink, view, handed.total, handed.start)
            return taking
        record = ring.peek()
        if record is not None and record[6] == -1:  # (its last part, still in the ring)
            ring.advance(record[5], False)
        ring.partial = None
        ring.taken += 1
        sink.done()
        return None

    def _arrival(self, src: int, context: int, meta: bytes, total: int) -> Sink:
        """Where a message of ``total`` bytes from ``src``'s ring goes: to
        matching, or nowhere (its context was aborted: its credit goes back)."""
        if context in self.broken:
            self.credit(src, total)
            return Sink(None)
        return self.matcher.arrive(src, _P2P, context, 0, meta, total)

    def _drain_soon(self, src: int) -> None:
        assert self.inbox is not None
        self._drain(src, self.inbox.ring(src), self.routed[src])

    def _wait_on(self, src: int, ring: inbox.Ring) -> None:
        """Wait on ``src``'s ring (a receive from it is posted here): the
        sender rings the bell for it, and the loop looks at it every
        :data:`POLL_RINGS` seconds too (a sender stopped between its write
        and its bell must not leave a complete message unseen)."""
        self._waiting.add(src)
        ring.waiting(True)
        if self._polling is None:
            self._polling = self.loop.call_later(POLL_RINGS, self._poll_rings)

    def _poll_rings(self) -> None:
        self._polling = None
        self._rung(bell=False)
        if self._waiting and not self.closed:
            self._polling = self.loop.call_later(POLL_RINGS, self._poll_rings)

    def _rung(self, bell: bool = True) -> None:
        """The bell: a peer wrote into a ring this loop waits on."""
        assert self.inbox is not None
        if bell:
            if self.inbox.quiet():  # (a sender waits for room for a part: take what is there)
                for src in self.inbox.stalled():
                    self._drain(src, self.inbox.ring(src), self.routed[src])
        for src in list(self._waiting):
            ring = self.inbox.ring(src)
            # (nothing waits for it here now, and no message is halfway through it)
            if ring.partial is None and not any(self.matcher.boxes[src].posted.values()):
                self._waiting.discard(src)
                ring.waiting(False)
            self._drain(src, ring, self.routed[src])

    def send_small(self, dst: int, context: int, sig: Signature, data: np.ndarray, until: float | None = None,
                   timeout: float = 0.0) -> bool:
        """Send a message of at most ``inbox.SMALL`` bytes through ``dst``'s
        inbox, from any thread, if it can go that way now (an open connection
        to a peer on this host with room in its ring and credit).  Whether it
        went; if not, nothing happened.  With ``until`` (a blocking caller's
        deadline, monotonic, after ``timeout`` seconds), a message smaller
        than ``cma.CMA_FROM`` goes that way too, part by part (see
        :meth:`_send_parts`)."""
        way = self._outlet(dst, context, data)
        if way is None:
            return False
        stream, outlet = way
        nbytes = data.nbytes
        if nbytes > _SMALL:
            if until is None or nbytes >= cma.CMA_FROM:
                return False
            return self._send_parts(stream, outlet, dst, context, sig, data, until, timeout)
        payload = byte_view(data)
        lock = outlet.lock
        # (the loop never waits for the lock, which a thread holds while a message in parts waits for room;
        # a blocking caller waits for it until its deadline)
        if not (lock.acquire(timeout=max(0.0, until - time.monotonic())) if until is not None else lock.acquire(False)):
            return False
        try:
            if not self._put_first(stream, outlet, context, sig, payload, -1):
                return False
            outlet.ring_if_waiting()
        finally:
            lock.release()
        self.bytes_sent += nbytes
        return True

    def _outlet(self, dst: int, context: int, data: np.ndarray) -> tuple[PeerStream, inbox.Outlet] | None:
        """The open connection to ``dst`` and its outlet into ``dst``'s inbox,
        if ``data`` may go that way (a peer on this host, a group not aborted,
        contiguous bytes); else None."""
        stream = self.connections.outgoing.get(dst)
        outlet = stream.outlet if stream is not None else None
        if stream is None or outlet is None or context in self.broken or not data.flags.c_contiguous:
            return None
        return stream, outlet

    @staticmethod
    def _put_first(stream: PeerStream, outlet: inbox.Outlet, context: int, sig: Signature, payload: memoryview,
                   total: int) -> bool:
        """Take credit for a message and write its record (``total`` < 0) or
        its first part (of ``total`` bytes) into ``outlet``, if the
        connection is open and there is credit and room; with the outlet's
        lock.  Whether it was written (if not, the credit is back)."""
        outbox = stream.outbox
        assert outbox is not None
        nbytes = len(payload) if total < 0 else total
        if stream.closing or outlet.torn or not outbox.take_eager(nbytes):
            return False
        try:
            put = outlet.put(stream.bytes_out, context, sig.encoded, payload if total < 0 else payload[:_SMALL],
                             total)
        except BaseException:  # (a signal handler's exception, say: the credit must not be lost)
            outbox.give(nbytes)
            raise
        if not put:
            outbox.give(nbytes)
        return put

    def _send_parts(self, stream: PeerStream, outlet: inbox.Outlet, dst: int, context: int, sig: Signature,
                    data: np.ndarray, until: float, timeout: float) -> bool:
        """:meth:`send_small` of a message larger than ``inbox.SMALL``: in
        parts, the first only if there is room for it now (else nothing
        happened: the socket's way), the others as the receiver makes room.
        Once the first is in, the message is finished or the connection is
        closed (the receiver never takes half a message)."""
        payload = byte_view(data)
        lock = outlet.lock
        if not lock.acquire(timeout=max(0.0, until - time.monotonic())):  # (then the loop's way, after it in order)
            return False
        try:
            if not self._put_first(stream, outlet, context, sig, payload, len(payload)):
                return False
            self._finish_parts(stream, outlet, dst, context, sig, payload, until, timeout, None)
        finally:
            lock.release()
        return True

    def in_parts(self, nbytes: int) -> bool:
        """Whether a message of ``nbytes`` goes through a peer's inbox in parts (if that peer is on this host)."""
        return self.inbox is not None and _SMALL < nbytes < cma.CMA_FROM

    def send_parts_soon(self, dst: int, context: int, sig: Signature, data: np.ndarray, until: float,
                        timeout: float, finished: Callable[[BaseException | None], None]
                        ) -> threading.Event | None:
        """On the loop (the async face): :meth:`_send_parts` without waiting
        for room.  The first part goes now if it can (else None: nothing
        happened, the socket's way); the rest goes from this peer's worker
        thread (a daemon: an exit does not wait for it, and the receiver then
        never takes half a message), which holds the outlet's lock until it
        is done and then calls ``finished(error or None)`` from that thread.
        Setting the returned event stops it at the next part, closing the
        connection: it reads the caller's array until ``finished``."""
        nbytes = data.nbytes
        way = self._outlet(dst, context, data) if self.in_parts(nbytes) else None
        if way is None:
            return None
        stream, outlet = way
        payload = byte_view(data)
        lock = outlet.lock
        if self.closed or not lock.acquire(False):  # (the loop never waits for it: a thread may hold it)
            return None
        stop = threading.Event()
        first = False
        handed: workers.Job | None = None
        worker: workers.Worker | None = None
        try:
            first = self._put_first(stream, outlet, context, sig, payload, nbytes)
            if not first:
                return None
            # The rest from this peer's worker thread, which takes the lock over.
            # (Writing more parts here, while they fit, made 512 KiB slower on
            # 4 ranks: the loop then copies what the worker would copy while
            # the loop goes on.)
            handed = workers.Job(self._parts_job(stream, outlet, dst, context, sig, payload, until, timeout, stop),
                                 finished)
            worker = self._parts_workers.get(dst)
            if worker is None:
                worker = self._parts_workers[dst] = workers.Worker(f"aiocomm-parts-{dst}")
            self.parts_handed += 1
            worker.submit(handed)
        except BaseException as exc:
            if handed is not None and worker is not None and not worker.withdraw(handed):
                stop.set()  # (its thread has it, and the lock: it stops at its next part and closes the connection)
                raise
            handed = None  # (the lock is released here, whatever follows)
            if first:  # (here, as a stopped sender would)
                outlet.torn = True
                self._tear(stream, CommError(
                    f"rank {self.rank}: a send of {sig.describe()} to rank {dst} could not go on after its first "
                    f"part ({type(exc).__name__}); the connection to rank {dst} was closed"))
            raise
        finally:
            if handed is None:  # (else the worker's)
                lock.release()
        return stop

    def parts_running(self) -> int:
        """Async sends whose parts a worker thread is sending now."""
        return sum(worker.running for worker in list(self._parts_workers.values()))

    def _parts_job(self, stream: PeerStream, outlet: inbox.Outlet, dst: int, context: int, sig: Signature,
                   payload: memoryview, until: float, timeout: float, stop: threading.Event) -> Callable[[], None]:
        """What a worker thread runs to send the parts of a message after its
        first (see :meth:`send_parts_soon`), holding the outlet's lock until
        it ends (an error: its connection is closed; the caller gets it
        through ``finished``)."""
        def rest() -> None:
            try:
                self._finish_parts(stream, outlet, dst, context, sig, payload, until, timeout, stop)
            finally:
                outlet.lock.release()

        return rest

    def _finish_parts(self, stream: PeerStream, outlet: inbox.Outlet, dst: int, context: int, sig: Signature,
                      payload: memoryview, until: float, timeout: float, stop: threading.Event | None) -> None:
        """After a message's first part, with the outlet's lock: the other
        parts, or (on any exception) the connection closed, so that the
        receiver never takes half a message."""
        try:
            outlet.ring_if_waiting()
            self._put_rest(stream, outlet, dst, context, payload, until, timeout, sig, stop)
        except BaseException as exc:
            outlet.torn = True  # (nothing more goes this way; the loop closes the connection)
            reason = CommError(
                f"rank {self.rank}: a send of {sig.describe()} to rank {dst} stopped halfway through shared "
                f"memory ({type(exc).__name__}); the connection to rank {dst} was closed so that it never "
                "receives a torn message")
            try:
                self.loop.call_soon_threadsafe(self._tear, stream, reason)
            except RuntimeError:  # (the loop is closed: so is the connection)
                pass
            raise
        self._sent_in_parts(len(payload))

    def _sent_in_parts(self, nbytes: int) -> None:
        with self._counts:
            self.bytes_sent += nbytes
            self.sent_in_parts += 1

    def _put_rest(self, stream: PeerStream, outlet: inbox.Outlet, dst: int, context: int, payload: memoryview,
                  until: float, timeout: float, sig: Signature, stop: threading.Event | None) -> None:
        """Write the parts of ``payload`` after its first, waiting for room as
        the receiver takes them: spinning, then with its bell rung, then
        sleeping between looks; until ``until`` (CommTimeoutError), or until
        ``stop`` is set (CommError)."""
        total = len(payload)
        off = _SMALL
        clock = time.monotonic
        since = clock()
        rung = False
        while off < total:
            if stop is not None and stop.is_set():
                raise CommError(f"rank {self.rank}: a send of {sig.describe()} to rank {dst} was cancelled halfway")
            end = min(off + _SMALL, total)
            if outlet.put_more(off, context, payload[off:end]):
                off = end
                outlet.ring_if_waiting()
                since = clock()
                rung = False
                continue
            if stream.closing or dst in self.lost or self.closed:
                raise self.lost.get(dst) or PeerLostError(
                    f"rank {self.rank}: the connection to rank {dst} closed during a send of {sig.describe()}", dst)
            if context in self.broken:  # (its group was aborted: the send fails, as over TCP)
                raise self.broken[context]
            now = clock()
            if now >= until:
                raise CommTimeoutError(
                    f"rank {self.rank} timed out after {timeout:g}s sending {sig.describe()} to rank {dst}: it did "
                    "not make room in shared memory for the rest of it in time; pass a larger timeout= or set "
                    "AIOCOMM_TIMEOUT (seconds)", (dst,))
            if now - since < STALL_RING:
                os.sched_yield()
                continue
            if not rung:
                outlet.stall()  # (its loop takes the parts there into a buffer, if no receive does)
                rung = True
            if now - since < STALL_SLEEP:
                os.sched_yield()
            else:
                time.sleep(0.0002)

    def _tear(self, stream: PeerStream, reason: CommError) -> None:
        if not stream.closing:
            stream.abort(reason)

    def take_small(self, src: int, context: int, sig: Signature, shape: tuple[int, ...], dtype: np.dtype,
                   until: float) -> np.ndarray | None:
        """A message from ``src`` of ``context`` taken straight out of its
        ring, from any thread (spinning until the monotonic time ``until``),
        if it is next in order and nothing here waits before it; else None
        (nothing was taken: the loop's way then).  A message of another
        signature raises ``MismatchError`` and stays.  A message in parts is
        taken as its parts come; if they stop coming, the loop takes the rest
        (None: the loop's way then gives the whole message)."""
        box = self.matcher.boxes[src]
        key = (_P2P, context, 0)
        assert self.inbox is not None
        ring = self.inbox.ring(src)
        if not ring.used():
            return None  # (a peer on another host, or one that never sent this way: no spinning for it)
        routed = self.routed
        while True:
            if box.posted.get(key) or box.arrived.get(key) or box.owed or context in self.broken:
                return None  # (the loop's matching has something before it)
            if not ring.empty():
                taking: _Caller | None = None
                try:
                    with ring.lock:
                        if ring.dead or src in self.lost or self.closed or ring.partial is not None:
                            return None  # (its sender was lost, the engine shut down, or the loop takes a message)
                        record = ring.peek()
                        if record is None:
                            continue
                        mark, got, meta, at, nbytes, after, total = record
                        if got != context or mark > routed[src] or total < 0 or box.arrived.get(key) \
                                or box.posted.get(key):
                            return None
                        if meta != sig.encoded:
                            wire.check_signature(sig, meta, me=self.rank, peer=src)  # MismatchError: it stays
                        out = np.empty(shape, dtype)
                        if out.nbytes != total:
                            raise ProtocolError(f"rank {src} sent {total} bytes for {sig.describe()}")
                        if nbytes == total:
                            if nbytes:
                                byte_view(out)[:] = ring.payload(at, nbytes)
                            ring.advance(after)
                        else:  # (the first part of a larger message: all of it as it comes, see _Caller)
                            taking = _Caller(context, meta, byte_view(out), ring.control[inbox.HEAD])
                            ring.partial = taking
                    if taking is not None and not self._take_parts(src, ring, taking):
                        return None
                finally:
                    if taking is not None:  # (nothing, if it is whole; else the loop takes it: see _Caller)
                        self._hand_over(src, ring, taking)
                back = self.budget.consumed(src, total)
                if back:
                    try:
                        self.loop.call_soon_threadsafe(self._credit_back, src, back)
                    except RuntimeError:  # (the loop is closed: no one to give credit to)
                        pass
                return out
            if src in self.lost or time.monotonic() >= until:
                return None
            os.sched_yield()  # (lets the GIL go: this rank's loop may need it)

    def _take_parts(self, src: int, ring: inbox.Ring, taking: _Caller) -> bool:
        """:meth:`take_small`'s message in parts (its first record still in
        the ring): all of it, as it comes (True), or not (False: its sender
        paused :data:`PART_PATIENCE` seconds or was lost, or the loop took the
        message over; an exception: this thread was interrupted).  Unless it
        is whole, the caller hands it to the loop (:meth:`_hand_over`), which
        gives the whole message to the receive posted next."""
        got, total, start = taking.got, taking.total, taking.start
        clock = time.monotonic
        since = clock()
        while True:
            if not ring.empty():
                with ring.lock:
                    if ring.partial is not taking:
                        return False  # (the loop took it over)
                    record = ring.peek() if not ring.dead else None
                    if record is not None:
                        mark, _, _, at, nbytes, after, more = record
                        where = _part_at(src, ring, start, mark, more)
                        got[where : where + nbytes] = ring.payload(at, nbytes)
                        if where + nbytes < total:
                            ring.advance(after, False)
                            since = clock()
                            continue
                        taking.last_in = True  # (before the head passes it: see _Caller)
                        ring.advance(after)
                        ring.partial = None
                        return True
            if ring.dead or src in self.lost or self.closed or ring.partial is not taking \
                    or clock() - since > PART_PATIENCE:
                return False
            os.sched_yield()

    def _hand_over(self, src: int, ring: inbox.Ring, taking: _Caller) -> None:
        """A caller's thread leaves a message in parts to the loop (or to
        nobody: its sender was lost, and the loop's way says so); nothing,
        if the message is whole or the loop took it over already."""
        with ring.lock:
            if ring.partial is not taking:
                return
            if ring.dead:
                ring.partial = None
                return
            taking.handed = True
        try:
            self.loop.call_soon_threadsafe(self._drain_soon, src)
        except RuntimeError:  # (the loop is closed: nobody receives it)
            pass

    def _credit_back(self, src: int, nbytes: int) -> None:
        stream = self.connections.inbound.get(src)
        if stream is not None and not stream.closing:
            stream.send_frame(_encode_head(Kind.CREDIT, 0, nbytes, _EMPTY, 0))

    # ---- what matching asks of the transport (matching.MatchEvents)

    def credit(self, src: int, nbytes: int) -> None:
        back = self.budget.consumed(src, nbytes)
        if back:
            stream = self.connections.inbound.get(src)
            if stream is not None and not stream.closing:
                stream.send_frame(_encode_head(Kind.CREDIT, 0, back, _EMPTY, 0))

    def clear_to_send(self, src: int, context: int, rid: int, out: np.ndarray) -> None:
        stream = self.connections.inbound.get(src)
        if stream is not None and not stream.closing:
            offer = _EMPTY
            if self.place[1] and out.nbytes >= cma.CMA_FROM and src not in self.lost:
                offer = cma.offer(self.place[0], out)
                self.offered[(src, rid)] = out  # alive until the sender says it will not write into it
            stream.send_frame(_encode_head(Kind.CTS, context, rid, offer, 0))

    def allocate(self, shape: tuple[int, ...], dtype: str, src: int, op: Op | None, context: int) -> np.ndarray:
        try:
            # (large ones on memory an earlier one gave back: fresh memory costs its page faults)
            return results.empty(shape, wire.dtype_from_name(dtype))
        except MemoryError as exc:
            nbytes = int(np.prod(shape, dtype=np.int64)) * wire.dtype_from_name(dtype).itemsize
            what = op.what if op is not None else "a message that arrived before its receive"
            err = OutOfMemoryError(
                f"rank {self.rank} ran out of memory allocating {describe_bytes(nbytes)} for {what} from rank {src}"
            )
            err.__cause__ = exc
            self.abort(context, err)
            raise err from exc

    # ---- lost peers and aborted contexts

    def peer_lost(self, peer: int, err: PeerLostError) -> None:
        # Collectives waiting here on other members of a group ``peer`` is in:
        # those members may wait on ``peer`` without a connection to it, and
        # would hear of its loss only at their timeout.  Tell them.
        groups = self.waits.collectives_with(peer)
        for key in [k for k in self.offered if k[0] == peer]:
            _KEPT.append(self.offered.pop(key))  # (a live process may be halfway through writing it)
        if self.inbox is not None:  # what it sent before it went is delivered, as from its socket
            ring = self.inbox.ring(peer)
            with ring.lock:  # (one hold: no caller takes what it writes after, a peer cut off may still live)
                self._drain_locked(peer, ring, self.routed[peer], True)
                ring.dead = True
            self._waiting.discard(peer)
        self.waits.fail_peer(peer, err)
        self.matcher.drop_peer(peer)
        if groups:
            notice = {"lost": peer, "reason": str(err)}
            for context, members in groups.items():
                self._tell(members, wire.control_frame(Kind.LOST, notice, context=context), skip=(peer,))

    def _lost_heard(self, src: int, context: int, meta: Any) -> None:
        """A ``LOST`` notice: rank ``src`` lost a peer while a collective of
        group ``context`` waited there (see :meth:`peer_lost`)."""
        fields = wire.require_map(meta, Kind.LOST, ("lost", "reason"))
        peer = fields["lost"]
        if not isinstance(peer, int) or not 0 <= peer < self.size:
            raise ProtocolError(f"rank {src} sent a LOST notice naming {peer!r}, not a rank of this world")
        if peer == self.rank:
            return  # (rank src gave up on this one: it closes its connections, and says so that way)
        if peer in self.lost or peer in self.connections.inbound:
            # Its own connection decides: what it sent before it ended (its
            # last data, maybe still coming) is delivered, then its end fails
            # what waits on it -- a notice read first must not cut that short.
            return
        self.waits.heard_lost(context, peer, PeerLostError(
            f"rank {self.rank} waited in a collective on rank {peer}, which rank {src} lost: {fields['reason']}",
            peer))

    def cut_off(self, peer: int, err: PeerLostError) -> None:
        """Take ``peer`` for lost from now on, as if it had died (the survivors
        gave up on it): its connections close, and it is never let back."""
        self.connections.peer_lost(peer, err)

    def abort(self, context: int, exc: CommError) -> None:
        """Mark ``context`` broken with ``exc`` here and tell its other members."""
        if self._break(context, exc):
            self._tell_members(context, abort_fields(exc, self.rank), skip=())

    def _break(self, context: int, exc: CommError) -> bool:
        if not self.contexts.break_(context, exc):
            return False
        self.waits.fail_context(context, exc)
        self.matcher.drop_context(context)
        return True

    def _abort_received(self, src: int, context: int, meta: Any) -> None:
        exc, fields = abort_error(meta)
        if self._break(context, exc):
            # Pass it on: a member whose data waits on this rank then learns the
            # cause on the same connection, before this rank's close.
            self._tell_members(context, fields, skip=(src, fields["origin"]))

    def _tell_members(self, context: int, fields: dict[str, Any], skip: Iterable[int]) -> None:
        self._tell(self.contexts.members_of(context), wire.control_frame(Kind.ABORT, fields, context=context), skip)

    def _tell(self, members: Iterable[int], frame: bytes, skip: Iterable[int]) -> None:
        """Send control ``frame`` (an ABORT, a LOST notice) to ``members``, best effort."""
        skipped = set(skip)
        for peer in members:
            if peer != self.rank and peer not in self.lost and peer not in skipped:
                task = self.loop.create_task(self._send_notice(peer, frame))
                self._abort_tasks.add(task)
                task.add_done_callback(self._abort_tasks.discard)

    async def _send_notice(self, peer: int, frame: bytes) -> None:
        try:
            stream = await self.connections.dial_once(peer, 2.0)
            stream.send_frame(frame, None)
            done = stream.drained_future()
            if done is not None:
                await asyncio.wait_for(done, 5.0)
        except Exception as exc:  # best effort: the peer may be the one that is gone
            log.debug("rank %d: could not tell rank %d about an abort or a loss: %r", self.rank, peer, exc)

    def register_context(self, context: int, members: tuple[int, ...]) -> None:
        self.contexts.register(context, members)

