"""The transport: the only code that touches sockets.

Theory of operation
-------------------
A :class:`Mesh` belongs to one process and one event loop.  It listens on the
addresses the hostfile gives its rank and keeps, per peer, one *outgoing*
connection that it opened (everything this rank sends to that peer goes on
it, so messages between a pair stay in order) and accepts the peer's own
outgoing connection (everything it receives from that peer arrives there).
Connections are opened on demand, so any rank can reach any rank; at start
each rank opens the one to its right ring neighbour and waits for its left
neighbour's, so a broken ring is reported at once.

Receiving is a matching problem.  Each frame has a key ``(kind, context,
tag)`` and comes from one source rank; per source the mesh keeps a FIFO of
*posted* receives and a FIFO of *arrivals* (frames that came first) per key.
When a frame's header arrives, :meth:`Mesh.route` pairs it with the oldest
posted receive and the payload is read straight into that receive's memory;
with no receive posted yet it lands in a fresh buffer that the receive takes
over later.  Every frame's signature is checked against the receive's, so a
mismatch between ranks fails that receive with :class:`MismatchError`.

Waiting: every receive has a deadline, kept in one set that a single timer
scans.  While a receive waits the loop polls its sockets for up to
``poll_s`` (see :func:`config.poll_seconds`) before it sleeps, so data that
comes soon is taken without a wake-up by interrupt.

Failures: a connection that breaks marks its peer lost; receives waiting on
that peer fail with :class:`PeerLostError`.  A context can be *aborted*
(:meth:`Mesh.abort`): the reason is sent to the other members as an ABORT
frame, and there and here every waiting and later operation on the context
fails at once with that reason.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import os
import socket
import time
from typing import Any, Iterable

import msgpack
import numpy as np

from . import wire
from .config import Address, WorldSpec, poll_seconds
from .errors import (
    AuthenticationError,
    CommError,
    CommTimeoutError,
    MismatchError,
    PeerLostError,
    ProtocolError,
)
from .wire import Header, Kind, Signature, Sink

log = logging.getLogger("aiocomm")

Key = tuple[int, int, int]  # (kind, context, tag)

HANDSHAKE_TIMEOUT = 10.0

_encode_head = wire.encode_frame_head
_DATA_KINDS = wire.DATA_KINDS
_ABORT = Kind.ABORT


def byte_view(arr: np.ndarray) -> memoryview:
    """A flat writable/readable byte view of a C-contiguous array."""
    try:
        return memoryview(arr).cast("B")  # a quarter of the cost of numpy's views
    except TypeError:  # a shape with a zero in it
        return memoryview(arr.reshape(-1).view(np.uint8))


class PendingRecv(Sink):
    """A posted receive waiting for its frame.

    While it waits it sits in its mesh's ``watched`` set, which the mesh's
    one deadline timer scans (a timer per receive costs more than the rest
    of a small receive's bookkeeping).  Its ``view`` (the destination's
    bytes) is made when its frame arrives.
    """

    __slots__ = ("out", "sig", "src", "future", "deadline", "watched")

    def __init__(
        self,
        out: np.ndarray | None,
        sig: Signature,
        src: int,
        future: asyncio.Future,
        deadline: float,
        watched: set[PendingRecv] | None,
    ) -> None:
        self.view = None
        self.out = out
        self.sig = sig
        self.src = src
        self.future = future
        self.deadline = deadline
        self.watched = watched
        if watched is not None:
            watched.add(self)

    def fail(self, exc: BaseException) -> None:
        if self.watched is not None:
            self.watched.discard(self)
        if not self.future.done():
            self.future.set_exception(exc)
            # Receives posted ahead may never be awaited once their collective
            # failed; the error reaches the caller through the one it awaits.
            self.future.exception()

    def done(self) -> None:
        """Its frame is in ``out``: wake the waiting coroutine."""
        if self.watched is not None:
            self.watched.discard(self)
        future = self.future
        if not future.done():
            future.set_result(self.out)


class Arrival(Sink):
    """A frame that arrived before its receive was posted."""

    __slots__ = ("data", "meta", "complete", "waiter")

    def __init__(self, meta: bytes, nbytes: int) -> None:
        self.data = np.empty(nbytes, np.uint8)
        self.view = memoryview(self.data)  # (Sink's one field, set here: no extra call per frame)
        self.meta = meta  # raw signature, checked when its receive is posted
        self.complete = False
        self.waiter: PendingRecv | None = None  # a receive posted while the payload was still coming

    def done(self) -> None:
        self.complete = True
        pending = self.waiter
        if pending is not None:  # its receive was posted while the payload was coming
            pending.out = Mesh.take(self, pending.out, pending.sig)
            pending.done()


class Mailbox:
    """Matching state for frames from one source rank."""

    __slots__ = ("posted", "arrived")

    def __init__(self) -> None:
        self.posted: dict[Key, collections.deque[PendingRecv]] = {}
        self.arrived: dict[Key, collections.deque[Arrival]] = {}


class PeerStream(asyncio.BufferedProtocol):
    """One TCP connection: handshake, then frames in both directions."""

    def __init__(self, mesh: Mesh, *, connect_to: int | None = None, address: Address | None = None) -> None:
        self.mesh = mesh
        self.connect_to = connect_to  # None for accepted connections
        self.address = address
        self.peer: int | None = None  # known once the handshake is done
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = mesh.loop.create_future()
        self.reader = wire.FrameReader(self._handshake)
        # BufferedProtocol.get_buffer is the reader's own method: uvloop looks
        # it up once per connection, and this saves a Python call per read.
        self.get_buffer = self.reader.get_buffer  # type: ignore[method-assign]
        self.closed = False  # connection_lost has run
        self.closing = True  # no data may be written: not yet connected, or closing, or closed
        self._nonce = os.urandom(wire.NONCE_SIZE)
        self.paused = False  # True while written bytes wait in our buffer for the kernel
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.lost_reason: BaseException | None = None

    # ---- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        self.closing = False
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=0)
        if self.connect_to is None:
            self.address = transport.get_extra_info("peername")
            self._write(wire.control_frame(Kind.CHALLENGE, {"nonce": self._nonce}))
            self._handshake_timer = self.mesh.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)
            self.mesh.pending_streams.add(self)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.reader.buffer_updated(nbytes)  # completed frames call their sink's done()
        except ProtocolError as exc:
            self._protocol_error(exc)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.mesh.pending_streams.discard(self)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(self._lost_error(exc))
        self._drain_waiters.clear()
        if not self.opened.done():
            self.opened.set_exception(
                self.lost_reason or ConnectionError(f"connection to {self._where()} closed during handshake")
            )
            self.opened.exception()  # mark retrieved; connect() reports it
        if self.peer is not None:
            self.mesh.stream_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # ---- writing

    def _write(self, data: bytes | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def send_frame(self, head: bytes, payload: Any = None) -> None:
        """Queue one frame: ``head`` then ``payload`` (None, or a non-empty
        C-contiguous array or buffer), written in one go, so frames from
        concurrent tasks never interleave."""
        if self.closing:
            raise self._lost_error(None)
        if payload is None:
            self.transport.write(head)
        else:
            self.transport.writelines((head, payload))  # one writev; the array itself, no copy

    def drained(self) -> asyncio.Future[None] | None:
        """A future done when everything written is in the kernel, or None if it already is."""
        if not self.paused:
            return None  # nothing waits in our buffer (even if the peer has since closed)
        if self.closed:
            raise self._lost_error(self.lost_reason)
        waiter = self.mesh.loop.create_future()
        self._drain_waiters.append(waiter)
        return waiter

    def _lost_error(self, exc: BaseException | None) -> PeerLostError:
        err = PeerLostError(
            f"rank {self.mesh.rank}: connection to rank {self.peer} ({self._where()}) is closed",
            self.peer,
        )
        err.__cause__ = exc
        return err

    def _where(self) -> str:
        if self.address is None:
            return "unknown address"
        host, port = self.address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # ---- reading

    def _handshake_expired(self) -> None:
        log.warning("rank %d: %s sent no handshake within %.0fs; closing it", self.mesh.rank, self._where(), HANDSHAKE_TIMEOUT)
        self.close()

    def _protocol_error(self, exc: ProtocolError) -> None:
        who = f"rank {self.peer}" if self.peer is not None else "unidentified peer"
        log.warning("rank %d: closing connection from %s at %s: %s", self.mesh.rank, who, self._where(), exc)
        self.lost_reason = exc
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self, header: Header, raw: bytes) -> Sink:
        """Route frames until the peer is known; then the mesh routes them."""
        meta = wire.decode_meta(raw)
        mesh = self.mesh
        if self.connect_to is None:  # accepting side
            if header.kind != Kind.HELLO:
                raise ProtocolError(f"expected HELLO, got {header.kind.name}")
            peer, peer_nonce = wire.check_hello(meta, mesh.token, self._nonce, my_rank=mesh.rank, size=mesh.size)
            self._write(wire.control_frame(Kind.WELCOME, wire.welcome_fields(mesh.token, peer_nonce, mesh.rank, peer)))
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            mesh.pending_streams.discard(self)
            self.peer = peer
            self.reader.set_route(functools.partial(mesh.route, peer))
            mesh.inbound_opened(self)
            self.opened.set_result(None)
        elif header.kind == Kind.CHALLENGE:
            fields = wire.require_map(meta, Kind.CHALLENGE, ("nonce",))
            if not isinstance(fields["nonce"], bytes):
                raise ProtocolError("malformed CHALLENGE nonce")
            self._write(
                wire.control_frame(
                    Kind.HELLO,
                    wire.hello_fields(mesh.token, fields["nonce"], mesh.rank, mesh.size, self.connect_to, self._nonce),
                )
            )
        elif header.kind == Kind.WELCOME:
            wire.check_welcome(meta, mesh.token, self._nonce, my_rank=mesh.rank, expected=self.connect_to)
            self.peer = self.connect_to
            self.reader.set_route(functools.partial(mesh.route, self.peer))
            self.opened.set_result(None)
        elif header.kind == Kind.REJECT:
            reason = meta.get("reason") if isinstance(meta, dict) else meta
            exc = ProtocolError(f"rank {self.connect_to} at {self._where()} rejected rank {mesh.rank}: {reason}")
            self.lost_reason = exc
            raise exc
        else:
            raise ProtocolError(f"unexpected {header.kind.name} frame during handshake")
        return Sink(None)


class Mesh:
    """All of one rank's connections, and the matching of what arrives."""

    def __init__(self, spec: WorldSpec, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.size = spec.size
        self.token = spec.token
        self.loop = loop or asyncio.get_running_loop()
        self.outgoing: dict[int, PeerStream] = {}
        self.inbound: dict[int, PeerStream] = {}
        self.pending_streams: set[PeerStream] = set()
        self.mailboxes = [Mailbox() for _ in range(self.size)]
        self.lost: dict[int, PeerLostError] = {}
        self.broken: dict[int, CommError] = {}  # context -> why it is unusable
        self.members: dict[int, tuple[int, ...]] = {0: tuple(range(self.size))}  # context -> world ranks
        self._connecting: dict[int, asyncio.Task[PeerStream]] = {}
        self._inbound_waiters: dict[int, asyncio.Future[None]] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._abort_tasks: set[asyncio.Task[None]] = set()
        self.connect_timeout = 60.0
        self.closed = False
        self.bytes_sent = 0  # payload bytes, for the benchmark's wire count
        self._watched: set[PendingRecv] = set()  # receives with a deadline, still waiting
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = math.inf  # when the deadline timer fires (inf: no timer)
        self.poll_s = poll_seconds(spec)  # keep polling this long while a receive waits
        self._poll_until = 0.0
        self._polling = False

    # ---- bring-up and tear-down

    async def start(self, connect_timeout: float) -> None:
        """Listen, connect to the right neighbour, wait for the left one."""
        self.connect_timeout = connect_timeout
        inherited = list(self.spec.listen_fds)
        for host, port in self.spec.addresses[self.rank]:
            try:
                if inherited:
                    # A listening socket the launcher bound for us: no port race.
                    sock = socket.socket(fileno=inherited.pop(0))
                    server = await self.loop.create_server(lambda: PeerStream(self), sock=sock, backlog=1024)
                else:
                    server = await self.loop.create_server(
                        lambda: PeerStream(self), host, port, reuse_address=True, backlog=1024
                    )
            except OSError as exc:
                raise CommError(f"rank {self.rank} cannot listen on {host}:{port}: {exc}") from exc
            self._servers.append(server)
        if self.size == 1:
            return
        right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        waiter = self._inbound_future(left)
        await self.connect(right)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), connect_timeout)
        except asyncio.TimeoutError:
            addr = ", ".join(f"{h}:{p}" for h, p in self.spec.addresses[self.rank])
            raise CommTimeoutError(
                f"rank {self.rank} (listening on {addr}) got no connection from its left neighbour "
                f"rank {left} within {connect_timeout:.1f}s",
                (left,),
            ) from None

    def _inbound_future(self, peer: int) -> asyncio.Future[None]:
        fut = self._inbound_waiters.get(peer)
        if fut is None:
            fut = self._inbound_waiters[peer] = self.loop.create_future()
            if peer in self.inbound:
                fut.set_result(None)
        return fut

    def inbound_opened(self, stream: PeerStream) -> None:
        peer = stream.peer
        assert peer is not None
        old = self.inbound.get(peer)
        if old is not None and not old.closed:
            log.warning("rank %d: rank %d connected twice; closing the newer connection", self.rank, peer)
            stream.close()
            return
        self.inbound[peer] = stream
        fut = self._inbound_future(peer)
        if not fut.done():
            fut.set_result(None)

    async def close(self) -> None:
        """Close every connection and listener (a clean exit)."""
        if self.closed:
            return
        if self._abort_tasks:  # let the other ranks learn why this one gave up
            await asyncio.wait(list(self._abort_tasks), timeout=2.0)
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
            self._watchdog_at = math.inf
        for server in self._servers:
            server.close()
        for task in self._connecting.values():
            task.cancel()
        streams = list(self.outgoing.values()) + list(self.inbound.values()) + list(self.pending_streams)
        for stream in streams:
            waiter = None if stream.closed else stream.drained()
            if waiter is not None:
                try:
                    await asyncio.wait_for(waiter, 1.0)
                except Exception:
                    pass
            stream.close()
        await asyncio.sleep(0)

    # ---- connections

    async def connect(self, peer: int, *, patient: bool = True) -> PeerStream:
        """The outgoing connection to ``peer``, opened if needed: with retries
        until the bring-up timeout, or (``patient=False``) with one attempt."""
        stream = self.outgoing.get(peer)
        if stream is not None and not stream.closed:
            return stream
        if peer in self.lost:
            raise self.lost[peer]
        task = self._connecting.get(peer)
        if task is None:
            task = self._connecting[peer] = self.loop.create_task(self._open(peer, patient))
            task.add_done_callback(lambda _t, p=peer: self._connecting.pop(p, None))
        return await asyncio.shield(task)

    async def _open(self, peer: int, patient: bool) -> PeerStream:
        window = self.connect_timeout if patient else min(self.connect_timeout, 2.0)
        deadline = self.loop.time() + window
        delay = 0.01
        addresses = self.spec.addresses[peer]
        host, port = addresses[0]
        last: BaseException | None = None
        while True:
            stream: PeerStream | None = None
            try:
                _, stream = await asyncio.wait_for(
                    self.loop.create_connection(
                        lambda: PeerStream(self, connect_to=peer, address=(host, port)), host, port
                    ),
                    max(0.01, deadline - self.loop.time()),
                )
                await asyncio.wait_for(asyncio.shield(stream.opened), max(0.01, deadline - self.loop.time()))
                self.outgoing[peer] = stream
                return stream
            except (AuthenticationError, ProtocolError) as exc:
                if stream is not None:
                    stream.close()
                raise type(exc)(f"rank {self.rank} connecting to rank {peer} at {host}:{port}: {exc}") from exc
            except (OSError, asyncio.TimeoutError) as exc:
                if stream is not None:  # connected, but no handshake in time: do not leak it
                    stream.close()
                last = exc
            if not patient or self.loop.time() + delay >= deadline:
                raise CommTimeoutError(
                    f"rank {self.rank} could not reach rank {peer} at {host}:{port} within "
                    f"{window:.1f}s (last error: {last!r})",
                    (peer,),
                ) from last
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def stream_lost(self, stream: PeerStream, exc: BaseException | None) -> None:
        peer = stream.peer
        assert peer is not None
        if self.closed:
            return
        if self.outgoing.get(peer) is stream:
            del self.outgoing[peer]
            if peer in self.inbound:
                # What ``peer`` sends us arrives on its own connection, maybe
                # still with frames (an ABORT) queued before its close: that
                # connection's end decides.
                return
        elif self.inbound.get(peer) is stream:
            del self.inbound[peer]
        else:
            return  # a duplicate we closed ourselves
        cause = stream.lost_reason or exc
        how = f": {cause}" if cause else " (closed by the peer)"
        err = PeerLostError(
            f"rank {self.rank} lost rank {peer} ({stream._where()}){how}",
            peer,
        )
        err.__cause__ = cause
        self.lost.setdefault(peer, err)
        self._fail_posted(self.lost[peer], sources=(peer,))

    # ---- sending

    def send(self, stream: PeerStream, kind: Kind, context: int, tag: int, sig: Signature, data: np.ndarray) -> None:
        """Queue one data frame on an open outgoing stream (no waiting)."""
        if context in self.broken:
            raise self.broken[context]
        nbytes = data.nbytes
        stream.send_frame(_encode_head(kind, context, tag, sig.encoded, nbytes), data if nbytes else None)
        self.bytes_sent += nbytes

    async def flush(self, streams: Iterable[PeerStream], deadline: float, sig: Signature) -> None:
        """Wait until what was queued on ``streams`` is handed to the kernel."""
        for stream in streams:
            waiter = stream.drained()
            if waiter is None:
                continue
            timeout = deadline - self.loop.time()
            try:
                await asyncio.wait_for(waiter, max(timeout, 0.0))
            except asyncio.TimeoutError:
                raise CommTimeoutError(
                    f"rank {self.rank} timed out sending {sig.describe()} to rank {stream.peer}: "
                    "it stopped reading",
                    (stream.peer,) if stream.peer is not None else (),
                ) from None

    # ---- receiving

    def route(self, src: int, header: Header, meta: bytes) -> Sink:
        """Choose where an arriving frame from ``src`` goes (called by its stream)."""
        kind, _, context, tag, payload_len, _ = header
        if kind not in _DATA_KINDS:
            if kind == _ABORT:
                self._abort_received(src, context, wire.decode_meta(meta))
                return Sink(None)
            raise ProtocolError(f"unexpected {kind.name} frame from rank {src} after the handshake")
        if context in self.broken:
            return Sink(None)
        key = (kind, context, tag)
        box = self.mailboxes[src]
        queue = box.posted.get(key)
        if queue:
            pending = queue.popleft()
            if not queue:
                del box.posted[key]
            out = pending.out
            try:
                if meta != pending.sig.encoded:  # equal bytes: the common case, no decoding
                    wire.check_signature(pending.sig, meta, me=self.rank, peer=src)
                if out is None:
                    out = pending.out = self._allocate(pending.sig, header, src)
                elif out.nbytes != payload_len:
                    raise MismatchError(
                        f"rank {self.rank} expected a {out.nbytes}-byte segment of "
                        f"{pending.sig.describe()} from rank {src}, got {payload_len} bytes"
                    )
            except MismatchError as exc:
                pending.fail(exc)
                return Sink(None)
            pending.view = byte_view(out)
            return pending
        arrival = Arrival(meta, payload_len)
        queue = box.arrived.get(key)
        if queue is None:
            queue = box.arrived[key] = collections.deque()
        queue.append(arrival)
        return arrival

    @staticmethod
    def _allocate(sig: Signature, frame: Header | Arrival, src: int) -> np.ndarray:
        nbytes = frame.payload_len if isinstance(frame, Header) else frame.data.nbytes
        dtype = np.dtype(sig.dtype)
        count = 1
        for d in sig.shape:
            count *= d
        if count * dtype.itemsize != nbytes:
            raise ProtocolError(f"rank {src} sent {nbytes} bytes for {sig.describe()}")
        return np.empty(sig.shape, dtype)

    def post(
        self,
        src: int,
        kind: Kind,
        context: int,
        tag: int,
        sig: Signature,
        out: np.ndarray | None,
        deadline: float,
    ) -> asyncio.Future[np.ndarray]:
        """Post a receive from ``src``; the future gives the filled array.

        ``out`` is the destination (contiguous, exactly the frame's size) or
        ``None`` to receive a new array of ``sig``'s shape and dtype.
        """
        if context in self.broken:
            raise self.broken[context]
        key = (kind, context, tag)
        box = self.mailboxes[src]
        future: asyncio.Future[np.ndarray] = self.loop.create_future()
        arrivals = box.arrived.get(key)
        if arrivals:
            arrival = arrivals.popleft()
            if not arrivals:
                del box.arrived[key]
            if arrival.meta != sig.encoded:  # equal bytes: the common case, no decoding
                wire.check_signature(sig, arrival.meta, me=self.rank, peer=src)
            if out is None:
                self._allocate(sig, arrival, src)  # the sizes must agree
            elif out.nbytes != arrival.data.nbytes:
                raise MismatchError(
                    f"rank {self.rank} expected a {out.nbytes}-byte segment of {sig.describe()} "
                    f"from rank {src}, got {arrival.data.nbytes} bytes"
                )
            if arrival.complete:
                future.set_result(self.take(arrival, out, sig))
                return future
            arrival.waiter = PendingRecv(out, sig, src, future, deadline, self._watched)
        else:
            if src in self.lost:
                raise self.lost[src]
            pending = PendingRecv(out, sig, src, future, deadline, self._watched)
            queue = box.posted.get(key)
            if queue is None:
                queue = box.posted[key] = collections.deque()
            queue.append(pending)
        if self.poll_s or deadline < self._watchdog_at:
            self._armed(deadline)
        return future

    def _armed(self, deadline: float) -> None:
        """A receive with this deadline was added to the watched set: poll (if
        on), and make sure the deadline timer wakes up by then."""
        if self.poll_s:
            self._poll_until = time.monotonic() + self.poll_s
            if not self._polling:
                self._polling = True
                self.loop.call_soon(self._poll)
        if deadline < self._watchdog_at:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog_at = deadline
            self._watchdog = self.loop.call_at(deadline, self._check_deadlines)

    def _poll(self) -> None:
        """Keep the loop from sleeping while receives wait, for at most
        ``poll_s`` after the latest was posted: with a callback always ready
        the loop polls its sockets (epoll with no timeout) between callbacks,
        so arriving data is handled without a wake-up by interrupt."""
        if self._watched and time.monotonic() < self._poll_until:
            self.loop.call_soon(self._poll)
        else:
            self._polling = False

    def _check_deadlines(self) -> None:
        """Fail the receives whose deadline has passed; wake again for the next one."""
        self._watchdog = None
        self._watchdog_at = math.inf
        now = self.loop.time() + 0.001  # the loop's timers round to milliseconds
        expired = [p for p in self._watched if p.deadline <= now]
        for pending in sorted(expired, key=lambda p: p.deadline):
            pending.fail(
                CommTimeoutError(
                    f"rank {self.rank} timed out waiting for {pending.sig.describe()} data from rank {pending.src}",
                    (pending.src,),
                )
            )
        if self._watched:
            self._watchdog_at = min(p.deadline for p in self._watched)
            self._watchdog = self.loop.call_at(self._watchdog_at, self._check_deadlines)

    @staticmethod
    def take(arrival: Arrival, out: np.ndarray | None, sig: Signature) -> np.ndarray:
        """An arrived frame's data, in ``out`` or (``None``) as an array of ``sig``."""
        if out is None:  # signatures matched: take the buffer as it is
            return arrival.data.view(np.dtype(sig.dtype)).reshape(sig.shape)
        byte_view(out)[:] = arrival.data
        return out

    # ---- aborting a context

    def register_context(self, context: int, members: tuple[int, ...]) -> None:
        self.members[context] = members

    def abort(self, context: int, exc: CommError) -> None:
        """Mark ``context`` broken with ``exc`` here and tell its other members."""
        if context in self.broken:
            return
        self._break(context, exc)
        fields = {"origin": self.rank, "type": type(exc).__name__, "reason": str(exc)}
        lost_rank = getattr(exc, "rank", None)
        if lost_rank is not None:
            fields["lost"] = lost_rank
        fields["culprit"] = exc.culprit if exc.culprit is not None else self.rank
        self._tell_members(context, fields, skip=())

    def _tell_members(self, context: int, fields: dict[str, Any], skip: Iterable[int]) -> None:
        frame = wire.control_frame(Kind.ABORT, fields, context=context)
        skip = set(skip)
        # A context this rank has not formed yet (its split is still to come
        # here): tell everyone; ranks outside it only note it.
        for peer in self.members.get(context, range(self.size)):
            if peer != self.rank and peer not in self.lost and peer not in skip:
                task = self.loop.create_task(self._send_abort(peer, frame))
                self._abort_tasks.add(task)
                task.add_done_callback(self._abort_tasks.discard)

    async def _send_abort(self, peer: int, frame: bytes) -> None:
        try:
            stream = await self.connect(peer, patient=False)
            stream.send_frame(frame, None)
            waiter = stream.drained()
            if waiter is not None:
                await asyncio.wait_for(waiter, 5.0)
        except Exception as exc:  # best effort: the peer may be the one that is gone
            log.debug("rank %d: could not tell rank %d about an abort: %r", self.rank, peer, exc)

    def _abort_received(self, src: int, context: int, meta: Any) -> None:
        fields = wire.require_map(meta, Kind.ABORT, ("origin", "type", "reason"))
        if context in self.broken:
            return
        reason = f"{fields['reason']} (reported by rank {fields['origin']})"
        kind = fields["type"]
        exc: CommError
        culprit = fields.get("culprit", fields["origin"])
        if kind == "PeerLostError":
            exc = PeerLostError(reason, fields.get("lost"))
        elif kind == "CommTimeoutError":
            exc = CommTimeoutError(reason, (src,))
        elif kind == "MismatchError":
            exc = MismatchError(reason)
        elif kind in ("ProtocolError", "AuthenticationError"):
            exc = ProtocolError(reason)
        else:
            exc = CommError(reason)
        exc.culprit = culprit if isinstance(culprit, int) else None
        self._break(context, exc)
        # Pass it on: a member whose data waits on this rank then learns the
        # cause on the same connection, before this rank's close.
        self._tell_members(context, fields, skip=(src, fields["origin"]))

    def _break(self, context: int, exc: CommError) -> None:
        self.broken[context] = exc
        self._fail_posted(exc, sources=range(self.size), context=context)

    def _fail_posted(self, exc: CommError, sources: Iterable[int], context: int | None = None) -> None:
        """Fail every receive waiting on ``sources`` (only those of ``context`` if given)."""
        for src in sources:
            box = self.mailboxes[src]
            for key in [k for k in box.posted if context is None or k[1] == context]:
                for pending in box.posted.pop(key):
                    pending.fail(exc)
            for key, arrivals in box.arrived.items():
                if context is None or key[1] == context:
                    for arrival in arrivals:
                        if arrival.waiter is not None and not arrival.complete:
                            arrival.waiter.fail(exc)
