"""One TCP connection: asyncio glue around the socket-free layers.

A :class:`PeerStream` is an ``asyncio.BufferedProtocol``.  Until its
handshake (:mod:`aiocomm.wire.handshake`) is done it stages only a few
hundred bytes and routes frames to the handshake; then it routes them to its
owner.  The *dialer* of a connection sends data on it; the *acceptor* only
receives data there and sends flow control (``CTS``, ``CREDIT``) back, which
the dialer's side handles itself (:class:`~aiocomm.transport.flow.SendWindow`).

Everything that waits on this connection is a
:class:`~aiocomm.transport.waits.Wait` on its peer: a drain (the kernel
taking what was written) or an announced message.  When the connection
ends they fail with :class:`PeerLostError` naming the peer and address.

A stream knows nothing of what owns it beyond :class:`StreamOwner` (in
practice :class:`~aiocomm.transport.connections.Connections`, which passes
the data on to the mesh): imports in this package point down, never up.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import math
import socket
from typing import Any, Protocol

import numpy as np

from .. import wire
from ..errors import CommError, PeerLostError, ProtocolError
from ..wire import AcceptorHandshake, DialerHandshake, Header, Kind, Signature, Sink
from . import cma
from .flow import Announcement, SendWindow
from .inbox import Outlet
from .waits import NO_CONTEXT, Op, Wait, WaitSet

log = logging.getLogger("aiocomm")

Address = tuple[str, int]
_encode_head = wire.encode_frame_head
_EMPTY = b""
#: What a drain outside any operation (a clean close, an ABORT) belongs to:
#: no deadline (its caller bounds it) and no group's context.
_NO_OPERATION = Op("a write outside any operation (a clean close, an ABORT)", NO_CONTEXT, math.inf, math.inf)


class DataOwner(Protocol):
    """What a stream's data needs from above (of the mesh, in the end): the
    loop and waits it uses, where its frames go, and the budget for copies
    of detached sends."""

    loop: asyncio.AbstractEventLoop
    waits: WaitSet  # where the stream's waits are registered
    #: (host id, pid) of this rank, for payloads written straight into its
    #: memory by peers on this host (see :mod:`.cma`); (0, 0): not taken that way
    place: tuple[int, int]
    #: this rank's inbox and bell descriptors, for small messages from peers
    #: on this host (see :mod:`.inbox`); (-1, -1): none
    inbox_fds: tuple[int, int]

    def route(self, src: int, header: Header, meta: bytes) -> Sink:
        """Where a frame from ``src`` goes, on a connection ``src`` dialled."""

    def frames_read(self, src: int, between_frames: bool) -> None:
        """A read of the connection ``src`` dialled was routed (and whether
        every frame routed so far on it is complete)."""

    def hold(self, nbytes: int) -> bool:
        """Take ``nbytes`` of this rank's budget for a copy of an announced send, if it fits."""

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`hold` took."""


class StreamOwner(DataOwner, Protocol):
    """What a stream asks of whoever owns it: what its data needs, and the events of its life."""

    rank: int  # this rank, for messages

    def accepted(self, stream: PeerStream) -> None:
        """An acceptor stream's connection came in (its handshake is not done)."""

    def handshake_done(self, stream: PeerStream) -> None:
        """``stream`` knows its peer; it routes frames from now on."""

    def refused(self, claimed: int, where: str) -> None:
        """A connection from ``where`` claiming to be rank ``claimed`` failed the token check."""

    def stream_lost(self, stream: PeerStream, exc: BaseException | None) -> None:
        """``stream``'s connection ended (its own waits have failed already)."""


class PeerStream(asyncio.BufferedProtocol):
    """One connection to or from a peer."""

    def __init__(
        self, owner: StreamOwner, handshake: AcceptorHandshake | DialerHandshake, address: Address | None = None
    ) -> None:
        self.owner = owner
        self.handshake = handshake
        self.dialer = isinstance(handshake, DialerHandshake)
        self.address = address
        self.peer: int | None = None  # known once the handshake is done
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = owner.loop.create_future()
        self.ended: asyncio.Future[None] = owner.loop.create_future()  # done when connection_lost has run
        self.reader = wire.FrameReader(self._handshake_frame, stage_size=wire.HANDSHAKE_STAGE,
                                       max_meta=wire.HANDSHAKE_MAX_META)
        # BufferedProtocol.get_buffer is the reader's own method: uvloop looks
        # it up once per connection, and this saves a Python call per read.
        self.get_buffer = self.reader.get_buffer  # type: ignore[method-assign]
        self.closed = False  # connection_lost has run
        self.closing = True  # no data may be written: not yet connected, or closing, or closed
        self.paused = False  # True while written bytes wait in our buffer for the kernel
        self._drains: list[Wait] = []
        self.lost_reason: BaseException | None = None
        self.outbox: SendWindow | None = None  # the dialer's credit and announced messages
        #: The dialer writes large payloads straight into the receiver's
        #: memory (:mod:`.cma`): the acceptor is on this host and takes them.
        self.writes_across = False
        self.peer_place = (0, 0)  # the acceptor's (host id, pid), from its WELCOME
        #: The dialer's ring in the acceptor's inbox (:mod:`.inbox`): small
        #: messages to a peer on this host, written from any thread.
        self.outlet: Outlet | None = None
        #: Bytes of the frames queued on this connection since its handshake
        #: (a ring record's place among them: see :mod:`.inbox`).
        self.bytes_out = 0
        #: An acceptor's owner hears of every read once its frames are routed
        #: (set once the handshake is done; see DataOwner.frames_read).
        self._after_read: Any = None

    # ---- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        self.closing = False
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]  # a stream transport: it has this
        if not self.dialer:
            self.address = transport.get_extra_info("peername")
            self.owner.accepted(self)
            if not self.closing:
                self._write(self.handshake.start())  # type: ignore[union-attr]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.reader.buffer_updated(nbytes)  # completed frames call their sink's done()
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self._after_read is not None:
            self._after_read(self.reader.between_frames)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closing = True
        outlet, self.outlet = self.outlet, None
        if outlet is not None:
            with outlet.lock:  # (a sender in another thread holds it while it rings the bell)
                outlet.close()
        if not self.ended.done():
            self.ended.set_result(None)
        error = self.lost_error(self.lost_reason or exc)
        for wait in self._drains:
            wait.fail(error)
        self._drains.clear()
        if self.outbox is not None:
            self.outbox.fail_all(error)
        if not self.opened.done():
            self.opened.set_exception(
                self.lost_reason or ConnectionError(f"connection to {self.where()} closed during the handshake")
            )
            self.opened.exception()  # mark retrieved; the dialer reports it
        self.owner.stream_lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        drains, self._drains = self._drains, []
        for wait in drains:
            wait.resolve(None)

    # ---- writing

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closing:
            self.transport.write(data)

    def send_frame(self, head: bytes, payload: Any = None) -> None:
        """Queue one frame: ``head`` then ``payload`` (None, or a non-empty
        C-contiguous array or buffer), written in one go, so frames from
        concurrent tasks never interleave."""
        if self.closing:
            raise self.lost_error(self.lost_reason)
        if payload is None:
            self.bytes_out += len(head)  # (counted before it is queued: a ring record's mark is never short)
            self.transport.write(head)  # type: ignore[union-attr]
        else:
            self.bytes_out += len(head) + payload.nbytes
            self.transport.writelines((head, payload))  # type: ignore[union-attr]  # one writev; the array itself, no copy

    def send_data(self, kind: Kind, context: int, tag: int, sig: Signature, data: np.ndarray, op: Op,
                  detach: bool = False) -> Wait | None:
        """Send one data frame: eagerly if the receiver's budget allows (None
        is returned), else announced: the returned wait ends when its payload
        is written.  With ``detach`` (a point-to-point send) an announced
        message is copied, if this rank's own budget allows, and None is
        returned: the send need not wait for the receive (see :mod:`.flow`)."""
        nbytes = data.nbytes
        outbox = self.outbox
        assert outbox is not None and self.peer is not None
        if nbytes == 0:
            self.send_frame(_encode_head(kind, context, tag, sig.encoded, 0))
            return None
        if self.writes_across and nbytes >= cma.CMA_FROM and kind == Kind.P2P and not self.closing \
                and data.flags.c_contiguous:
            return self._announce_across(kind, context, tag, sig, data, op, detach)
        if outbox.take_eager(nbytes):
            self.send_frame(_encode_head(kind, context, tag, sig.encoded, nbytes), data)
            return None
        if self.closing:
            raise self.lost_error(self.lost_reason)
        owner = self.owner
        held = detach and owner.hold(nbytes)
        if held:
            data = data.copy()
            op = Op(op.what, op.context, math.inf, math.inf)  # no deadline: it ends with its peer or context
        entry = outbox.announce(owner.waits, self.peer, op, data)
        entry.revoke = self._revoke
        if held:
            entry.on_end = lambda: owner.release(nbytes)
        meta = sig.encoded + wire.RTS_TRAILER.pack(entry.rid, nbytes)
        self.send_frame(wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.RTS, kind, context, tag, 0, len(meta)) + meta)
        return None if held else entry

    def _announce_across(self, kind: Kind, context: int, tag: int, sig: Signature, data: np.ndarray, op: Op,
                         detach: bool) -> Wait:
        """Announce a large message to a peer on this host, keeping the
        caller's array: if a receive is posted in time, the receiver's ``CTS``
        offers its memory and the payload is written there (one copy).  If
        none is, after a grace as long as the copy itself would take, the
        message goes on as it would have without this path: eagerly as
        ``RDATA`` if the receiver's credit allows, else as a held copy
        (``detach``), else it waits for the receive."""
        outbox = self.outbox
        assert outbox is not None and self.peer is not None
        entry = outbox.announce(self.owner.waits, self.peer, op, data)
        entry.revoke = self._revoke
        entry.timer = self.owner.loop.call_later(cma.grace(data.nbytes), self._grace_over, entry, detach)
        meta = sig.encoded + wire.RTS_TRAILER.pack(entry.rid, data.nbytes)
        self.send_frame(wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.RTS, kind, context, tag, 0, len(meta)) + meta)
        return entry

    def _grace_over(self, entry: Announcement, detach: bool) -> None:
        outbox = self.outbox
        entry.timer = None
        if outbox is None or outbox.announced.get(entry.rid) is not entry or self.closing:
            return  # cleared, given up, or the connection is ending (its waits fail)
        nbytes = entry.data.nbytes
        if outbox.take_eager(nbytes):
            del outbox.announced[entry.rid]
            self.send_frame(wire.HEADER.pack(wire.MAGIC, wire.VERSION, Kind.RDATA, wire.RDATA_COUNTED,
                                             entry.op.context, entry.rid, nbytes, 0), entry.data)
            entry.resolve(None)  # (the send then waits for the kernel to take it, as an eager one does)
            return
        owner = self.owner
        if detach and owner.hold(nbytes):
            try:
                copy = entry.data.copy()
            except MemoryError:
                owner.release(nbytes)
                return  # (it waits for its receive, as one over this rank's budget does)
            op = Op(entry.op.what, entry.op.context, math.inf, math.inf)
            held = outbox.announced[entry.rid] = Announcement(owner.waits, entry.peer, op, copy, outbox, entry.rid)
            held.revoke = self._revoke
            held.on_end = lambda: owner.release(nbytes)
            entry.resolve(None)

    def send_payload(self, entry: Announcement, offer: bytes = _EMPTY) -> None:
        """The payload of announced message ``entry`` (taken from the
        outbox): written into the memory ``offer`` names if it is on this
        host, then ``RDONE``; else as ``RDATA``."""
        data = entry.data
        if offer and self.writes_across:
            host, pid, address, nbytes, mark_at, mark = cma.OFFER.unpack(offer)
            if (host, pid) == self.peer_place and nbytes == data.nbytes:  # (only into the peer it dialled)
                try:
                    cma.write(pid, address, data, mark_at, mark)
                except OSError as exc:  # refused (ptrace rules), or the peer is going: the socket then
                    if exc.errno in (errno.EPERM, errno.ENOSYS):  # (for good: the others are the peer's end)
                        self.writes_across = False
                    log.info("rank %d: writing into rank %d's memory failed (%s): this payload goes over TCP",
                             self.owner.rank, self.peer, exc)
                else:
                    self.send_frame(_encode_head(Kind.RDONE, entry.op.context, entry.rid, _EMPTY, 0))
                    entry.resolve(None)
                    return
        self.send_frame(_encode_head(Kind.RDATA, entry.op.context, entry.rid, _EMPTY, data.nbytes), data)
        entry.resolve(None)

    def _revoke(self, context: int, rid: int) -> None:
        if not self.closing:
            self.send_frame(_encode_head(Kind.REVOKE, context, rid, _EMPTY, 0))

    def drained(self, op: Op) -> Wait | None:
        """A wait that ends when everything written is in the kernel, or None if it already is."""
        if not self.paused:
            return None  # nothing waits in our buffer (even if the peer has since closed)
        if self.closed:
            raise self.lost_error(self.lost_reason)
        return self._drain(op)

    def drained_future(self) -> asyncio.Future[None] | None:
        """Like :meth:`drained` for writes outside any operation (a clean
        close, an ABORT): the future of a wait with no deadline (the caller
        bounds it), which fails if the connection ends first; or None if
        nothing waits to drain or the connection is closed already."""
        if not self.paused or self.closed:
            return None
        return self._drain(_NO_OPERATION).future

    def _drain(self, op: Op) -> Wait:
        assert self.peer is not None  # only registered streams (handshake done) are drained
        wait = Wait(self.owner.waits, self.peer, op, "waiting for what it wrote to be read by")
        self._drains.append(wait)
        return wait

    def lost_error(self, exc: BaseException | None) -> PeerLostError:
        err = PeerLostError(
            f"rank {self.owner.rank}: connection to rank {self.peer} ({self.where()}) is closed"
            + (f": {exc}" if exc else ""),
            self.peer,
        )
        err.__cause__ = exc
        return err

    def where(self) -> str:
        if self.address is None:
            return "unknown address"
        host, port = self.address[:2]
        return f"{host}:{port}"

    def finish_writing(self) -> None:
        """Say this side is done writing (the peer then closes its side)."""
        self.closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                pass

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def unsent(self) -> bool:
        """Whether bytes written here still wait in the transport's buffer."""
        transport = self.transport
        return transport is not None and not self.closing and bool(transport.get_write_buffer_size())

    def give_up_writes(self, what: str) -> None:
        """``what`` (an operation that wrote here) failed.  If part of what it
        wrote still waits in the transport's buffer, that may be the caller's
        own array (frames are written without a copy), which the caller may
        change now: close the connection rather than let the peer receive a
        torn message.  (The peer's operations then fail with PeerLostError.)"""
        transport = self.transport
        if transport is None or self.closing or not transport.get_write_buffer_size():
            return
        self.abort(CommError(
            f"rank {self.owner.rank}: {what} failed while part of its data was still unsent; the connection "
            f"to rank {self.peer} was closed so that it never receives a torn message"))

    def abort(self, reason: BaseException) -> None:
        self.lost_reason = reason
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    # ---- reading

    def _protocol_error(self, exc: ProtocolError) -> None:
        who = f"rank {self.peer}" if self.peer is not None else "unidentified peer"
        log.warning("rank %d: closing connection from %s at %s: %s", self.owner.rank, who, self.where(), exc)
        hs = self.handshake
        if hs.refusal and not hs.done:
            # A peer that got the layout right failed the token check: tell it
            # (the REJECT goes out before the close), and let the connections
            # check whether the rank it claimed really holds another token.
            self._write(hs.refusal)
            self.lost_reason = exc
            self.close()
            if hs.claimed is not None:
                self.owner.refused(hs.claimed, self.where())
            return
        self.abort(exc)

    def _handshake_frame(self, header: Header, meta: bytes) -> Sink:
        """Frames until the handshake is done go to its state machine."""
        hs = self.handshake
        reply = hs.receive(header, meta)  # ProtocolError: the connection is closed
        self._write(reply)
        if hs.done:
            assert hs.peer is not None
            self.peer = hs.peer
            self.reader.grow()
            if self.dialer:
                self.outbox = SendWindow(hs.window)
                place = self.peer_place = hs.place
                mine = self.owner.place
                self.writes_across = mine[1] != 0 and place[1] != 0 and place[0] == mine[0]
                if self.writes_across and hs.inbox[0] >= 0:
                    try:
                        self.outlet = Outlet(place[1], hs.inbox[0], hs.inbox[1], self.owner.rank)
                        self.outbox.share()  # (before any caller's thread can see the outlet)
                    except OSError as exc:
                        log.info("rank %d: no shared-memory ring to rank %d (%s): its small messages go over TCP",
                                 self.owner.rank, hs.peer, exc)
                self.reader.set_route(self._route_back)
            else:
                self.reader.set_route(functools.partial(self.owner.route, hs.peer))
                if self.owner.inbox_fds[0] >= 0:  # (only the inbox's order needs to hear of reads)
                    self._after_read = functools.partial(self.owner.frames_read, hs.peer)
            self.owner.handshake_done(self)
            if not self.opened.done():
                self.opened.set_result(None)
        return Sink(None)

    def _route_back(self, header: Header, meta: bytes) -> Sink:
        """Flow control from the acceptor, on a connection this rank dialled."""
        kind = header[0]
        outbox = self.outbox
        assert outbox is not None
        if kind == Kind.CTS:
            if meta and len(meta) != cma.OFFER.size:
                raise ProtocolError(f"malformed CTS frame from rank {self.peer}")
            entry = outbox.cleared(header[3])
            if entry is not None:
                self.send_payload(entry, meta)
        elif kind == Kind.CREDIT:
            outbox.give(header[3])
        else:
            raise ProtocolError(f"unexpected {kind.name} frame from rank {self.peer} on a connection it accepted")
        return Sink(None)
