"""Point-to-point messages over MPI, with a protocol that never delivers a
torn message.

A ``send`` that times out must not leave MPI reading the caller's array
after it returned: the caller may change it, and the receiver would get a
mix of old and new bytes.  MPI cannot withdraw a send.  So:

* A message of up to :data:`EAGER_BYTES` is one MPI message -- a head (its
  signature) and a private copy of the data.  Once handed to MPI it is
  delivered whole, however late.
* A larger message is sent from the caller's array, but only after the
  receiver asked for it, and the receiver keeps it only once the sender
  confirmed that it did not give up meanwhile::

      sender                         receiver
      RTS(head, signature)   --->    fits: post the data receive into a new array
                             <---    CTS(head)
      data (from x)          --->
      DONE(head)             --->    verdict: keep the array
      ... or, having given up:
      REVOKE(head, sent?)    --->    verdict: drop it (draining the data if it was sent)

  A sender that gives up before the CTS sends no data; one that gives up
  after sends REVOKE before returning, so what MPI reads from ``x`` after
  that is thrown away.  Heads from one source arrive in order (one tag), so
  the head after an RTS is always its verdict.

Heads travel on :data:`HEAD_TAG`, CTS on :data:`CTS_TAG`, data on
:data:`DATA_TAG`, all on the group's communicator.  Every head a receive
takes from MPI stays in its :class:`Inbox` until a receive consumes it: a
receive that does not fit, or gives up, loses nothing.  The heads sent to
each rank are counted, so a rank that exits can say how many it sent (see
:mod:`.notices`).
"""

from __future__ import annotations

import collections
import math
import struct
from typing import Any

import numpy as np

from ... import wire
from ...errors import ProtocolError
from .. import GroupState
from .collectives import flat_bytes
from .progress import Steps, abandon_request

HEAD_TAG, DATA_TAG, CTS_TAG = 1, 2, 3
MSG, RTS, DONE, REVOKE = 1, 2, 3, 4
#: Messages up to this size travel with their head, copied.
EAGER_BYTES = 64 << 10
MAX_SIGNATURE = 4096
_HEAD = struct.Struct("<BBQI")  # kind, flag, seq, signature length


def _head(kind: int, seq: int, signature: bytes = b"", flag: int = 0, data: np.ndarray | None = None) -> bytes:
    """A head's bytes (with a copy of ``data``, for a MSG)."""
    head = _HEAD.pack(kind, flag, seq, len(signature)) + signature
    return head if data is None else head + data.tobytes()


class Head:
    """A head taken from MPI, as a receive sees it."""

    __slots__ = ("kind", "flag", "seq", "signature", "data")

    def __init__(self, raw: memoryview) -> None:
        if len(raw) < _HEAD.size:
            raise ProtocolError(f"a point-to-point head of {len(raw)} bytes")
        self.kind, self.flag, self.seq, n = _HEAD.unpack_from(raw)
        self.signature = bytes(raw[_HEAD.size : _HEAD.size + n])
        self.data = bytearray(raw[_HEAD.size + n :]) if self.kind == MSG else None


class Accepted:
    """A large message this rank asked for (CTS sent): its data receive."""

    __slots__ = ("seq", "out", "data", "cts", "cts_buf")

    def __init__(self, seq: int, out: np.ndarray, data: Any, cts: Any, cts_buf: np.ndarray) -> None:
        self.seq = seq
        self.out: np.ndarray = out  # the array the receive returns
        self.data = data  # its receive and status
        self.cts = cts
        self.cts_buf = cts_buf


class Inbox:
    """The receiving end of one source on one group."""

    __slots__ = ("heads", "pulled", "waiting", "accepted", "_buf")

    def __init__(self) -> None:
        self.heads: collections.deque[Head] = collections.deque()  # taken from MPI, not yet consumed
        self.pulled = 0  # heads taken from MPI so far
        self.waiting = False  # a receive waits for the next head
        self.accepted: Accepted | None = None
        self._buf = np.empty(_HEAD.size + MAX_SIGNATURE + EAGER_BYTES, np.uint8)

    def pull(self, MPI: Any, comm: Any, src: int) -> Steps[None]:
        """Take the next head from MPI.  Given up on, the receive is
        cancelled; a head that arrived all the same is kept."""
        status = MPI.Status()
        request = comm.Irecv([self._buf, MPI.BYTE], src, tag=HEAD_TAG)
        self.waiting = True
        try:
            yield request, status
        except BaseException:
            if request:  # still active (mpi4py makes a completed request false)
                request.Cancel()
                request.Wait(status)
            if status.Is_cancelled():
                raise
            self._take(MPI, status)
            raise
        finally:
            self.waiting = False
        self._take(MPI, status)

    def _take(self, MPI: Any, status: Any) -> None:
        self.heads.append(Head(self._buf.data[: status.Get_count(MPI.BYTE)]))
        self.pulled += 1


def send_steps(MPI: Any, group: GroupState, x: np.ndarray, dst: int) -> Steps[None]:
    state = group.handle
    comm = state.comm
    signature = wire.signature("send", x.dtype, x.shape).encoded

    def head(kind: int, seq: int = -1, flag: int = 0, data: np.ndarray | None = None) -> tuple[Any, bytes, int]:
        n = state.heads_sent[dst]
        state.heads_sent[dst] = n + 1
        buf = _head(kind, n if seq < 0 else seq, signature if kind in (MSG, RTS) else b"", flag, data)
        return comm.Isend([buf, MPI.BYTE], dst, tag=HEAD_TAG), buf, n

    if x.nbytes <= EAGER_BYTES:
        request, buf, _ = head(MSG, data=x)
        try:
            yield request
        except BaseException:
            abandon_request(request, buf)  # a private copy: delivered whole whenever it goes
            raise
        return
    rts, rts_buf, seq = head(RTS)
    data: Any = None
    try:
        yield rts
        while True:  # a CTS of an earlier message this rank withdrew may come first: skip it
            cts_buf = np.empty(1, np.uint64)
            status = MPI.Status()
            cts = comm.Irecv([cts_buf, MPI.BYTE], dst, tag=CTS_TAG)
            try:
                yield cts, status
            except BaseException:
                if cts:
                    cts.Cancel()
                    cts.Wait(status)
                raise  # a CTS that came all the same is not acted on: REVOKE says no data follows
            if int(cts_buf[0]) == seq:
                break
        data = comm.Isend([flat_bytes(x), MPI.BYTE], dst, tag=DATA_TAG)
        yield data
    except BaseException:
        revoke, revoke_buf, _ = head(REVOKE, seq, flag=int(data is not None))
        abandon_request(revoke, revoke_buf)
        abandon_request(rts, rts_buf)
        if data is not None:
            abandon_request(data, x)  # drained by the receiver, which will throw it away
        raise
    done, done_buf, _ = head(DONE, seq)
    try:
        yield done
    except BaseException:
        abandon_request(done, done_buf)
        raise


def _drop(inbox: Inbox) -> Steps[None]:
    """Drop the withdrawn message first in line (an RTS, then its REVOKE):
    a data receive this rank posted for it is cancelled if no data was
    sent, else drained into the array nobody will get."""
    accepted = inbox.accepted
    if accepted is not None and accepted.seq == inbox.heads[0].seq and not inbox.heads[1].flag:
        receive, _ = accepted.data
        if receive:
            receive.Cancel()  # no data was sent: nothing can match it
    yield from _consume(inbox)


def _consume(inbox: Inbox) -> Steps[None]:
    """Take the message first in line (an RTS and its verdict) off the
    inbox, once the data receive and CTS this rank posted for it are done."""
    accepted = inbox.accepted
    if accepted is not None and accepted.seq == inbox.heads[0].seq:
        if accepted.data[0]:  # (a completed request is false: testing it again would blank its status)
            yield accepted.data
        if accepted.cts:
            yield accepted.cts
        inbox.accepted = None
    inbox.heads.popleft()
    inbox.heads.popleft()


def recv_steps(MPI: Any, group: GroupState, shape: tuple[int, ...], dtype: np.dtype, src: int) -> Steps[np.ndarray]:
    """The next message from ``src``: one whose signature does not fit
    raises :class:`MismatchError` and stays first in line."""
    state = group.handle
    comm = state.comm
    inbox = state.inboxes.get(src)
    if inbox is None:
        inbox = state.inboxes[src] = Inbox()
    sig = wire.signature("send", dtype, shape)
    me, peer = group.members[group.rank()], group.members[src]
    while True:
        if not inbox.heads:
            yield from inbox.pull(MPI, comm, src)
        head = inbox.heads[0]
        if head.kind in (DONE, REVOKE):  # the verdict of a message a receive dropped: nothing waits for it
            inbox.heads.popleft()
            continue
        if head.kind == RTS and len(inbox.heads) > 1 and inbox.heads[1].kind == REVOKE:
            yield from _drop(inbox)  # withdrawn, whatever its type
            continue
        if head.signature != sig.encoded and head.kind == RTS and len(inbox.heads) < 2 and comm.Iprobe(src, HEAD_TAG):
            yield from inbox.pull(MPI, comm, src)  # its verdict has come: it may have been withdrawn
            continue
        wire.check_signature(sig, head.signature, me=me, peer=peer)  # MismatchError: it stays first in line
        if head.kind == MSG:
            inbox.heads.popleft()
            assert head.data is not None
            if len(head.data) != dtype.itemsize * math.prod(shape):
                raise ProtocolError(f"rank {peer} sent {len(head.data)} bytes for {sig.describe()}")
            got: np.ndarray = np.frombuffer(head.data, dtype).reshape(shape)
            return got
        if head.kind != RTS:
            raise ProtocolError(f"rank {peer} sent a point-to-point head of kind {head.kind}")
        accepted = inbox.accepted
        if accepted is None or accepted.seq != head.seq:
            out = np.empty(shape, dtype)
            status = MPI.Status()
            receive = comm.Irecv([flat_bytes(out), MPI.BYTE], src, tag=DATA_TAG)  # posted before the CTS goes
            cts_buf = np.array([head.seq], np.uint64)
            accepted = inbox.accepted = Accepted(
                head.seq, out, (receive, status), comm.Isend([cts_buf, MPI.BYTE], src, tag=CTS_TAG), cts_buf)
        while len(inbox.heads) < 2:  # the head after an RTS is its verdict
            yield from inbox.pull(MPI, comm, src)
        verdict = inbox.heads[1]
        if verdict.kind not in (DONE, REVOKE) or verdict.seq != head.seq:
            raise ProtocolError(f"rank {peer} sent a head of kind {verdict.kind} where the verdict on its "
                                f"message {head.seq} belongs")
        if verdict.kind == REVOKE:
            yield from _drop(inbox)  # withdrawn: its data, if any came, is thrown away
            continue
        yield from _consume(inbox)
        status = accepted.data[1]
        if status.Get_count(MPI.BYTE) != accepted.out.nbytes:
            raise ProtocolError(f"rank {peer} sent {status.Get_count(MPI.BYTE)} bytes for {sig.describe()}")
        result: np.ndarray = accepted.out
        return result

