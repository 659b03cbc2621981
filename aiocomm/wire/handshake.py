"""The handshake as a state machine with no sockets: frames in, frames out.

Theory of operation
-------------------
A connection is opened by the rank that will *send* on it (the dialer); the
rank that accepted it only receives data there, and answers with flow
control.  Before any data, 1.5 round trips prove that both ends hold the
job's token and agree on who they are::

    acceptor -> dialer    CHALLENGE {nonce}
    dialer   -> acceptor  HELLO     {rank, size, to, nonce, mac}
    acceptor -> dialer    WELCOME   {rank, window, host, pid, inbox, bell, mac}   or REJECT {reason}

A REJECT is sent for one failure only: a HELLO that got the group's layout
right (size, ranks) but whose ``mac`` is wrong.  Its reason is the fixed
:data:`REFUSED_PROOF`, so it tells a stranger nothing but that its guess of
the layout (no secret: the listening ports show it) was right, while a rank
of the job started with another ``AIOCOMM_TOKEN`` learns at once why it will
never get in (:class:`AuthenticationError`) instead of retrying until
``AIOCOMM_CONNECT_TIMEOUT``.  Any other bad frame closes the connection
without a word.

``mac`` is an HMAC-SHA256 keyed by the job token over the other side's nonce
and the fields, so each side proves it knows the token without sending it.
``window`` is how many bytes the acceptor will buffer for this dialer's
messages that no receive has asked for yet (see :mod:`aiocomm.transport.flow`);
``host`` and ``pid`` say where the acceptor runs, for a dialer on the same
host to write large payloads straight into its memory (0 and 0: it does not
take them that way; see :mod:`aiocomm.transport.cma`); ``inbox`` and ``bell``
are the acceptor's descriptors of its inbox for small messages from a dialer
on the same host (-1 and -1: none; see :mod:`aiocomm.transport.inbox`).

:class:`AcceptorHandshake` and :class:`DialerHandshake` take each frame's
header and raw meta (:meth:`receive`) and return the bytes to write back.  A
handshake that saw a bad frame is in its error state for good: every later
call raises the same :class:`ProtocolError`.  Handshake frames are small, so
a connection stages only :data:`HANDSHAKE_STAGE` bytes until it is done.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from ..errors import AuthenticationError, ProtocolError
from .frames import HEADER_SIZE, Header, Kind, control_frame, decode_meta, require_map

# What aiocomm.wire re-exports.
__all__ = [
    "HANDSHAKE_MAX_META",
    "HANDSHAKE_STAGE",
    "NONCE_SIZE",
    "REFUSED_PROOF",
    "AcceptorHandshake",
    "DialerHandshake",
    "check_hello",
    "check_welcome",
    "hello_fields",
    "welcome_fields",
]

NONCE_SIZE = 16
#: Largest meta section a handshake frame may have.
HANDSHAKE_MAX_META = 1024
#: Bytes a connection stages until its handshake is done.
HANDSHAKE_STAGE = HEADER_SIZE + HANDSHAKE_MAX_META
#: The reason of the one REJECT an acceptor sends: a HELLO's proof of the token failed.
REFUSED_PROOF = "authentication failed"


def _mac(token: bytes, label: bytes, nonce: bytes, *ints: int) -> bytes:
    msg = label + nonce + b"".join(i.to_bytes(8, "little", signed=True) for i in ints)
    return hmac.new(token, msg, hashlib.sha256).digest()


def hello_fields(token: bytes, challenge_nonce: bytes, rank: int, size: int, to: int, nonce: bytes) -> dict[str, Any]:
    """The dialer's HELLO map answering an acceptor's challenge."""
    return {
        "rank": rank,
        "size": size,
        "to": to,
        "nonce": nonce,
        "mac": _mac(token, b"hello", challenge_nonce, rank, size, to),
    }


def check_hello(
    meta: Any, token: bytes, challenge_nonce: bytes, *, my_rank: int, size: int
) -> tuple[int, bytes]:
    """Validate a HELLO on the accepting side; returns (peer rank, peer nonce)."""
    m = require_map(meta, Kind.HELLO, ("rank", "size", "to", "nonce", "mac"))
    rank, peer_size, to, nonce, mac = m["rank"], m["size"], m["to"], m["nonce"], m["mac"]
    if (
        not all(isinstance(v, int) for v in (rank, peer_size, to))
        or not isinstance(nonce, bytes)
        or not isinstance(mac, bytes)
    ):
        raise ProtocolError(f"malformed HELLO map {m!r}")
    if peer_size != size:
        raise ProtocolError(f"peer claiming rank {rank} has group size {peer_size}, rank {my_rank} has {size}")
    if to != my_rank:
        raise ProtocolError(f"peer claiming rank {rank} wanted rank {to} but reached rank {my_rank}")
    if not 0 <= rank < size or rank == my_rank:
        raise ProtocolError(f"peer claims invalid rank {rank} (group size {size}, this is rank {my_rank})")
    if not hmac.compare_digest(mac, _mac(token, b"hello", challenge_nonce, rank, size, to)):
        raise AuthenticationError(
            f"peer claiming rank {rank} failed authentication (AIOCOMM_TOKEN differs: another job?)"
        )
    return rank, nonce


def welcome_fields(token: bytes, peer_nonce: bytes, rank: int, peer: int, window: int = 0,
                   place: tuple[int, int] = (0, 0), inbox: tuple[int, int] = (-1, -1)) -> dict[str, Any]:
    host, pid = place
    fd, bell = inbox
    return {"rank": rank, "window": window, "host": host, "pid": pid, "inbox": fd, "bell": bell,
            "mac": _mac(token, b"welcome", peer_nonce, rank, peer, window, host, pid, fd, bell)}


def check_welcome(meta: Any, token: bytes, my_nonce: bytes, *, my_rank: int,
                  expected: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """Validate a WELCOME on the dialing side; returns the acceptor's window,
    place (host id, pid) and inbox (descriptors of its inbox and bell)."""
    m = require_map(meta, Kind.WELCOME, ("rank", "window", "host", "pid", "inbox", "bell", "mac"))
    if m["rank"] != expected:
        raise ProtocolError(f"rank {my_rank} connected to rank {m['rank']!r} but expected rank {expected}")
    window, host, pid = m["window"], m["host"], m["pid"]
    if not isinstance(window, int) or window < 0:
        raise ProtocolError(f"rank {expected} sent a malformed window {window!r}")
    if not isinstance(host, int) or not isinstance(pid, int) or not -(1 << 63) <= host < 1 << 63 \
            or not 0 <= pid < 1 << 63:
        raise ProtocolError(f"rank {expected} sent a malformed place {host!r}, {pid!r}")
    fd, bell = m["inbox"], m["bell"]
    if not isinstance(fd, int) or not isinstance(bell, int) or not -1 <= fd < 1 << 31 or not -1 <= bell < 1 << 31:
        raise ProtocolError(f"rank {expected} sent a malformed inbox {fd!r}, {bell!r}")
    if not isinstance(m["mac"], bytes) or not hmac.compare_digest(
        m["mac"], _mac(token, b"welcome", my_nonce, expected, my_rank, window, host, pid, fd, bell)
    ):
        raise AuthenticationError(f"rank {expected} failed authentication (AIOCOMM_TOKEN differs: another job?)")
    return window, (host, pid), (fd, bell)


class Handshake:
    """What both sides share: the identity checked so far, and a sticky error."""

    def __init__(self, token: bytes, rank: int, size: int) -> None:
        self.token = token
        self.rank = rank
        self.size = size
        self.nonce = os.urandom(NONCE_SIZE)
        self.peer: int | None = None  # known once done
        self.done = False
        self.error: ProtocolError | None = None
        #: In the error state: bytes to send before closing (an acceptor's REJECT), or none.
        self.refusal = b""
        #: The rank a peer claimed in a HELLO whose proof failed (acceptor), else None.
        self.claimed: int | None = None

    def receive(self, header: Header, meta: bytes) -> bytes:
        """Take one frame; return the bytes to send back (maybe none)."""
        if self.error is not None:
            raise self.error
        if self.done:
            raise ProtocolError(f"{header.kind.name} frame after the handshake ended")
        try:
            return self._receive(header.kind, decode_meta(meta))
        except ProtocolError as exc:
            self.error = exc
            raise

    def _receive(self, kind: Kind, meta: Any) -> bytes:
        raise NotImplementedError


class AcceptorHandshake(Handshake):
    """The accepting side: challenge, then check the HELLO and welcome."""

    def __init__(self, token: bytes, rank: int, size: int, window: int, place: tuple[int, int] = (0, 0),
                 inbox: tuple[int, int] = (-1, -1)) -> None:
        super().__init__(token, rank, size)
        self.window = window
        self.place = place  # (host id, pid) offered to dialers on this host; (0, 0): none
        self.inbox = inbox  # (inbox, bell) descriptors offered to dialers on this host; (-1, -1): none

    def start(self) -> bytes:
        return control_frame(Kind.CHALLENGE, {"nonce": self.nonce})

    def _receive(self, kind: Kind, meta: Any) -> bytes:
        if kind != Kind.HELLO:
            raise ProtocolError(f"expected HELLO, got {kind.name}")
        try:
            peer, peer_nonce = check_hello(meta, self.token, self.nonce, my_rank=self.rank, size=self.size)
        except AuthenticationError:
            # The layout checks passed (check_hello tests the mac last): say why, and only that.
            self.claimed = meta["rank"]
            self.refusal = control_frame(Kind.REJECT, {"reason": REFUSED_PROOF})
            raise
        self.peer = peer
        self.done = True
        return control_frame(Kind.WELCOME, welcome_fields(self.token, peer_nonce, self.rank, peer, self.window,
                                                                 self.place, self.inbox))


class DialerHandshake(Handshake):
    """The dialing side: answer the challenge, then check the WELCOME."""

    def __init__(self, token: bytes, rank: int, size: int, to: int) -> None:
        super().__init__(token, rank, size)
        self.to = to
        self.window = 0  # the acceptor's, once done
        self.place = (0, 0)  # the acceptor's (host id, pid), once done
        self.inbox = (-1, -1)  # the acceptor's inbox and bell descriptors, once done
        self.challenged = False

    def _receive(self, kind: Kind, meta: Any) -> bytes:
        if kind == Kind.CHALLENGE and not self.challenged:
            fields = require_map(meta, Kind.CHALLENGE, ("nonce",))
            if not isinstance(fields["nonce"], bytes):
                raise ProtocolError("malformed CHALLENGE nonce")
            self.challenged = True
            return control_frame(
                Kind.HELLO, hello_fields(self.token, fields["nonce"], self.rank, self.size, self.to, self.nonce)
            )
        if kind == Kind.WELCOME and self.challenged:
            self.window, self.place, self.inbox = check_welcome(meta, self.token, self.nonce, my_rank=self.rank,
                                                    expected=self.to)
            self.peer = self.to
            self.done = True
            return b""
        if kind == Kind.REJECT:
            reason = meta.get("reason") if isinstance(meta, dict) else meta
            if self.challenged and reason == REFUSED_PROOF:
                raise AuthenticationError(
                    f"rank {self.to} refused the proof of the job token that rank {self.rank} sent: "
                    f"AIOCOMM_TOKEN differs between rank {self.rank} and the process listening there "
                    "(ranks started by hand with different tokens, or a rank of another job at that address?)"
                )
            raise ProtocolError(f"rank {self.to} rejected rank {self.rank}: {reason}")
        raise ProtocolError(f"unexpected {kind.name} frame during the handshake")
