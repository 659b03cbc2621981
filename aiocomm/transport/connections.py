"""Connections: listening, dialling, the registry of streams, and lost peers.

Per peer a rank keeps one *outgoing* connection that it dialled (everything
it sends that peer goes on it, so messages between a pair stay in order) and
accepts the peer's own outgoing connection (everything it receives from that
peer arrives there).  Connections are opened on demand, so any rank can reach
any rank; at start each rank dials its right ring neighbour and waits for
its left one, so a broken ring is reported at once.

Two phases:

* *Bring-up* (``init``): peers may not be listening yet, so a refused dial is
  retried with backoff until ``AIOCOMM_CONNECT_TIMEOUT``.
* *Formed* (after the bring-up barrier, every rank is known to listen): a
  refused or reset dial, or a connection closed during its handshake, means
  the peer is gone: :class:`PeerLostError` at once.  A dial that hangs (a
  frozen peer) is bounded by the deadline of the operations waiting for it.

A wrong token fails fast.  A dialer whose proof of the token is refused
(a REJECT, see :mod:`aiocomm.wire.handshake`) raises
:class:`AuthenticationError` at once.  A rank that refused a HELLO during
bring-up cannot tell a rank of its job that holds another token from a
stranger claiming that rank, so it checks: it dials the claimed rank at its
hostfile address itself, and only if *that* rank refuses its proof does
bring-up fail (a stranger cannot fake that).  A rank whose bring-up fails so
keeps listening for :data:`AUTH_LINGER` seconds before it raises, so that
the peers it refused get its REJECT too instead of a refused connection.

Unauthenticated connections cost little: they stage a few hundred bytes, at
most :data:`MAX_PENDING_HANDSHAKES` may be pending (the oldest is dropped
for a newer one), and each must finish within :data:`HANDSHAKE_TIMEOUT`.

The connections own their streams (they are each stream's
:class:`~aiocomm.transport.stream.StreamOwner`) and are owned in turn by a
:class:`ConnectionsOwner` (the mesh), known only through that protocol:
imports in this package point down, never up.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from ..config import WorldSpec
from ..errors import AuthenticationError, CommError, CommTimeoutError, PeerLostError, ProtocolError
from ..wire import AcceptorHandshake, DialerHandshake, Header, Sink
from .stream import DataOwner, PeerStream
from .waits import CONNECTING, Op, Wait

log = logging.getLogger("aiocomm")
T = TypeVar("T")

#: Seconds an accepted connection has to complete its handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Accepted connections whose handshake is not done yet, at most.
MAX_PENDING_HANDSHAKES = 64
#: Seconds a rank whose bring-up failed the token check keeps answering
#: (refusing) its peers' handshakes before it raises.
AUTH_LINGER = 2.0
#: Seconds a clean close waits for written data to drain and peers to close
#: (with the notices a rank that gave up sends first: one budget, see ``Mesh.close``).
CLOSE_SECONDS = 2.0
#: Seconds the drain gets at least when the notices before it took the budget.
DRAIN_FLOOR = 0.5


def backoff(first: float = 0.01, cap: float = 0.5) -> Iterator[float]:
    """Delays between dial attempts: doubling from ``first`` up to ``cap``."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


class ConnectionsOwner(DataOwner, Protocol):
    """What the connections ask of the mesh that owns them: what their
    streams' data needs (passed on), the world, and hearing of lost peers."""

    spec: WorldSpec
    window: int  # the bytes each sender may send this rank unasked (announced in the handshake)

    def peer_lost(self, peer: int, err: PeerLostError) -> None:
        """``peer`` is gone (its connections are closed already)."""


class Connections:
    """All of one rank's connections, and which peers are gone."""

    def __init__(self, owner: ConnectionsOwner) -> None:
        self.owner = owner
        self.spec = owner.spec
        self.loop = owner.loop
        self.rank = owner.spec.rank
        self.size = owner.spec.size
        self.waits = owner.waits
        # What a stream asks of its owner beyond its own life goes straight to
        # the mesh (a frame's route is looked up once per connection, not per frame).
        self.route: Callable[[int, Header, bytes], Sink] = owner.route
        self.frames_read: Callable[[int, bool], None] = owner.frames_read
        self.hold: Callable[[int], bool] = owner.hold
        self.place = owner.place
        self.inbox_fds = owner.inbox_fds
        self.release: Callable[[int], None] = owner.release
        self.outgoing: dict[int, PeerStream] = {}
        self.inbound: dict[int, PeerStream] = {}
        self.lost: dict[int, PeerLostError] = {}
        self.formed = False  # every rank is known to be listening
        self.connect_timeout = 60.0
        self._pending: dict[PeerStream, asyncio.TimerHandle] = {}  # accepted, handshake not done (oldest first)
        self._dialing: dict[int, asyncio.Task[PeerStream]] = {}
        self._inbound_waiters: dict[int, asyncio.Future[None]] = {}
        self._dropped = 0  # unauthenticated connections dropped for newer ones
        self._next_drop_log = 0.0
        self._servers: list[asyncio.Server] = []
        self.closed = False
        self._bring_up_deadline: float | None = None
        # Fails when a rank of the hostfile refuses this rank's proof of the token during bring-up.
        self._refused: asyncio.Future[None] = self.loop.create_future()

    # ---- listening and accepting

    async def listen(self) -> None:
        spec = self.spec
        inherited = list(spec.listen_fds)
        for host, port in spec.addresses[self.rank]:
            try:
                if inherited:
                    # A listening socket the launcher bound for us: no port race.
                    sock = socket.socket(fileno=inherited.pop(0))
                    server = await self.loop.create_server(self._acceptor, sock=sock, backlog=1024)
                else:
                    server = await self.loop.create_server(self._acceptor, host, port, reuse_address=True, backlog=1024)
            except OSError as exc:
                raise CommError(f"rank {self.rank} cannot listen on {host}:{port}: {exc}") from exc
            self._servers.append(server)

    def _acceptor(self) -> PeerStream:
        return PeerStream(self, AcceptorHandshake(self.spec.token, self.rank, self.size, self.owner.window,
                                                    self.place, self.inbox_fds))

    def accepted(self, stream: PeerStream) -> None:
        """A connection came in: it has ``HANDSHAKE_TIMEOUT`` to prove itself."""
        if self.closed:
            stream.close()
            return
        while len(self._pending) >= MAX_PENDING_HANDSHAKES:
            oldest = next(iter(self._pending))
            self._dropped += 1
            now = self.loop.time()
            if now >= self._next_drop_log:  # a flood is logged once in a while, not once per connection
                self._next_drop_log = now + 10.0
                log.warning("rank %d: %d connections are waiting for a handshake; dropping the oldest, from %s "
                            "(%d dropped so far)", self.rank, len(self._pending), oldest.where(), self._dropped)
            self._forget_pending(oldest)
            oldest.close()
        self._pending[stream] = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired, stream)

    def _forget_pending(self, stream: PeerStream) -> None:
        timer = self._pending.pop(stream, None)
        if timer is not None:
            timer.cancel()

    def _handshake_expired(self, stream: PeerStream) -> None:
        self._pending.pop(stream, None)
        log.warning(
            "rank %d: %s sent no handshake within %.0fs; closing it", self.rank, stream.where(), HANDSHAKE_TIMEOUT
        )
        stream.close()

    def handshake_done(self, stream: PeerStream) -> None:
        self._forget_pending(stream)
        if stream.dialer:
            return  # the dial that opened it registers it
        peer = stream.peer
        assert peer is not None
        if peer in self.lost:  # a lost peer stays lost: what it sends now could not be matched in order
            log.warning("rank %d: rank %d, lost earlier, connected again; closing it", self.rank, peer)
            stream.close()
            return
        old = self.inbound.get(peer)
        if old is not None and not old.closed:
            log.warning("rank %d: rank %d connected twice; closing the newer connection", self.rank, peer)
            stream.close()
            return
        self.inbound[peer] = stream
        fut = self._inbound_future(peer)
        if not fut.done():
            fut.set_result(None)

    def _inbound_future(self, peer: int) -> asyncio.Future[None]:
        fut = self._inbound_waiters.get(peer)
        if fut is None:
            fut = self._inbound_waiters[peer] = self.loop.create_future()
            if peer in self.inbound:
                fut.set_result(None)
        return fut

    # ---- bring-up

    async def bring_up(self, connect_timeout: float) -> None:
        """Dial the right neighbour and wait for the left one, within ``connect_timeout``."""
        self.connect_timeout = connect_timeout
        size = self.size
        right, left = (self.rank + 1) % size, (self.rank - 1) % size
        deadline = self._bring_up_deadline = self.loop.time() + connect_timeout
        waiter = self._inbound_future(left)
        try:
            await self._unless_refused(self._watched_dial(right, deadline))
            try:
                await asyncio.wait_for(self._unless_refused(waiter), max(0.0, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                addr = ", ".join(f"{h}:{p}" for h, p in self.spec.addresses[self.rank])
                raise CommTimeoutError(
                    f"rank {self.rank} (listening on {addr}) got no connection from its left neighbour "
                    f"rank {left} within {connect_timeout:.1f}s (AIOCOMM_CONNECT_TIMEOUT)",
                    (left,),
                    culprit=left,
                ) from None
        except AuthenticationError:
            await asyncio.sleep(AUTH_LINGER)  # the peers this rank refused learn it from its REJECT
            raise

    async def _unless_refused(self, fut: asyncio.Future[T]) -> T:
        """``fut``'s result, unless a rank refuses this rank's proof first.
        (Neither future is cancelled when the caller is.)"""
        refused = self._refused
        await asyncio.wait((fut, refused), return_when=asyncio.FIRST_COMPLETED)
        if fut.done():
            return fut.result()
        refused.result()  # raises
        raise AssertionError("unreachable")

    def _watched_dial(self, peer: int, deadline: float) -> asyncio.Task[PeerStream]:
        """A bring-up dial of ``peer``: if ``peer`` refuses this rank's proof, bring-up fails."""
        task = self._dial_task(peer, deadline)

        def watch(t: asyncio.Task[PeerStream]) -> None:
            exc = None if t.cancelled() else t.exception()  # (retrieved: a probe's other errors do not matter)
            if isinstance(exc, AuthenticationError) and not self._refused.done():
                self._refused.set_exception(exc)
                self._refused.exception()  # retrieved: bring-up may be over

        task.add_done_callback(watch)
        return task

    def refused(self, claimed: int, where: str) -> None:
        """A connection from ``where`` claiming to be rank ``claimed`` failed
        the token check.  During bring-up that may be rank ``claimed``
        started with another token, or a stranger: dial rank ``claimed`` to
        see (once at a time; not if an authenticated connection to it is open)."""
        if self.formed or self.closed or self._bring_up_deadline is None or not 0 <= claimed < self.size:
            return
        stream = self.outgoing.get(claimed)
        if stream is not None and not stream.closed:
            return  # it proved it shares our token: that was a stranger
        log.info("rank %d: checking rank %d's token after a connection from %s claiming to be it failed",
                 self.rank, claimed, where)
        self._watched_dial(claimed, self._bring_up_deadline)

    # ---- dialling

    async def open(self, peer: int, op: Op) -> PeerStream:
        """The outgoing connection to ``peer``, dialled if needed; the wait
        belongs to ``op`` (its deadline, its context) and to ``peer``."""
        stream = self.outgoing.get(peer)
        if stream is not None and not stream.closed:
            return stream
        if peer in self.lost:
            raise self.lost[peer]
        task = self._dial_task(peer, None if self.formed else self.loop.time() + self.connect_timeout)
        wait = Wait(self.waits, peer, op, CONNECTING)

        def finished(t: asyncio.Task[PeerStream]) -> None:
            if t.cancelled():
                wait.fail(CommError(f"rank {self.rank}: connecting to rank {peer} was cancelled (shutting down)"))
            elif t.exception() is not None:
                wait.fail(t.exception())  # type: ignore[arg-type]
            else:
                wait.resolve(t.result())

        if task.done():
            finished(task)
        else:
            task.add_done_callback(finished)
        return await wait.future  # type: ignore[no-any-return]

    def _dial_task(self, peer: int, deadline: float | None) -> asyncio.Task[PeerStream]:
        task = self._dialing.get(peer)
        if task is None:
            task = self._dialing[peer] = self.loop.create_task(self._dial(peer, deadline))

            def forget(t: asyncio.Task[PeerStream]) -> None:
                if self._dialing.get(peer) is t:
                    self._dialing.pop(peer, None)
                if not t.cancelled():
                    t.exception()  # (seen: a best-effort dial whose waiter gave up is no error to log at exit)

            task.add_done_callback(forget)
        return task

    async def _dial(self, peer: int, deadline: float | None) -> PeerStream:
        """Dial ``peer``: during bring-up retry until ``deadline``; once formed, a
        refusal means the peer is gone."""
        host, port = self.spec.addresses[peer][0]
        last: BaseException | None = None

        def dialer() -> PeerStream:
            return PeerStream(self, DialerHandshake(self.spec.token, self.rank, self.size, peer), (host, port))

        for delay in backoff():
            stream: PeerStream | None = None
            try:
                connecting = self.loop.create_connection(dialer, host, port)
                if deadline is None:
                    _, stream = await connecting
                    await stream.opened
                else:
                    left = max(0.01, deadline - self.loop.time())
                    # (not unpacked into `stream` itself: its declared Optional would
                    # become the type wait_for is inferred to return)
                    _, dialed = await asyncio.wait_for(connecting, left)
                    stream = dialed
                    await asyncio.wait_for(asyncio.shield(stream.opened), max(0.01, deadline - self.loop.time()))
                self.outgoing[peer] = stream
                return stream
            except (AuthenticationError, ProtocolError) as exc:
                if stream is not None:
                    stream.close()
                raise type(exc)(f"rank {self.rank} connecting to rank {peer} at {host}:{port}: {exc}") from exc
            except (OSError, asyncio.TimeoutError) as exc:
                if stream is not None:  # connected, but no handshake: do not leak it
                    stream.close()
                last = exc
            if self.formed and not isinstance(last, asyncio.TimeoutError):
                err = PeerLostError(
                    f"rank {self.rank} lost rank {peer}: connecting to it at {host}:{port} failed ({last!r}); "
                    "every rank was listening once the world formed, so rank "
                    f"{peer} is gone",
                    peer,
                )
                err.__cause__ = last
                self.peer_lost(peer, err)
                raise err
            if deadline is None or self.loop.time() + delay >= deadline:
                raise CommTimeoutError(
                    f"rank {self.rank} could not reach rank {peer} at {host}:{port} within "
                    f"{self.connect_timeout:.1f}s (AIOCOMM_CONNECT_TIMEOUT; last error: {last!r})",
                    (peer,),
                    culprit=peer,
                ) from last
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def dial_once(self, peer: int, timeout: float) -> PeerStream:
        """The outgoing connection to ``peer`` within ``timeout`` (best effort, for ABORTs)."""
        stream = self.outgoing.get(peer)
        if stream is not None and not stream.closed:
            return stream
        task = self._dial_task(peer, self.loop.time() + timeout)
        return await asyncio.wait_for(asyncio.shield(task), timeout)

    # ---- losing peers

    def stream_lost(self, stream: PeerStream, exc: BaseException | None) -> None:
        self._forget_pending(stream)
        peer = stream.peer
        if peer is None or self.closed:
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
        err = PeerLostError(f"rank {self.rank} lost rank {peer} ({stream.where()}){how}", peer)
        err.__cause__ = cause
        self.peer_lost(peer, err)

    def peer_lost(self, peer: int, err: PeerLostError) -> None:
        if peer in self.lost:
            return
        self.lost[peer] = err
        # Close our side too, so the peer learns it is lost here (say, after
        # it broke the protocol) instead of sending on into the void.
        for streams in (self.outgoing, self.inbound):
            stream = streams.pop(peer, None)
            if stream is not None:
                stream.close()
        self.owner.peer_lost(peer, err)

    # ---- teardown

    def streams(self) -> list[PeerStream]:
        return list(self.outgoing.values()) + list(self.inbound.values()) + list(self._pending)

    def fds(self) -> list[int]:
        """Every socket descriptor (for a forked child to let go of)."""
        fds = []
        for stream in self.streams():
            sock = stream.transport.get_extra_info("socket") if stream.transport is not None else None
            if sock is not None and sock.fileno() >= 0:
                fds.append(sock.fileno())
        for server in self._servers:
            fds.extend(s.fileno() for s in server.sockets or () if s.fileno() >= 0)
        return fds

    async def close(self, deadline: float | None = None) -> None:
        """Close every connection, gracefully (see below) until ``deadline``
        (loop time; :data:`CLOSE_SECONDS` from now if None), which gets at
        least :data:`DRAIN_FLOOR` seconds."""
        self.closed = True
        for server in self._servers:
            server.close()
        for task in list(self._dialing.values()):
            task.cancel()
        for stream, timer in list(self._pending.items()):
            timer.cancel()
            stream.close()
        self._pending.clear()
        # A graceful close: what was written drains, then each side says it
        # is done writing and reads on until the peer closes too.  Closing a
        # socket with unread bytes in it (flow control from the peer) would
        # reset the connection and destroy data the peer has not read yet.
        streams = list(self.outgoing.values()) + list(self.inbound.values())
        now = self.loop.time()
        deadline = now + CLOSE_SECONDS if deadline is None else max(deadline, now + DRAIN_FLOOR)
        for stream in streams:
            done = stream.drained_future()
            if done is not None:
                try:
                    await asyncio.wait_for(done, max(0.0, deadline - self.loop.time()))
                except Exception:
                    pass
            stream.finish_writing()
        ends = [stream.ended for stream in streams if not stream.closed]
        if ends:
            await asyncio.wait(ends, timeout=max(0.05, deadline - self.loop.time()))
        for stream in streams:
            stream.close()
