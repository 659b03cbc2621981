"""Matching, flow control, waits, aborts and the handshake, without sockets."""

import asyncio

import numpy as np
import pytest

from aiocomm import wire
from aiocomm.errors import (
    AuthenticationError,
    CommError,
    CommTimeoutError,
    MismatchError,
    OutOfMemoryError,
    PeerLostError,
    ProtocolError,
)
from aiocomm.transport.contexts import abort_error, abort_fields
from aiocomm.transport.flow import ReceiveBudget, SendWindow
from aiocomm.transport.matching import Matcher
from aiocomm.transport.waits import Op, Wait, WaitSet
from aiocomm.wire import Kind, Sink

P2P = int(Kind.P2P)


class Events:
    """Records what matching asks of the transport."""

    def __init__(self, fail_alloc_over: int | None = None) -> None:
        self.credited: list[tuple[int, int]] = []
        self.cleared: list[tuple[int, int, int]] = []
        self.fail_alloc_over = fail_alloc_over

    def credit(self, src, nbytes):
        self.credited.append((src, nbytes))

    def clear_to_send(self, src, context, rid, out):
        self.cleared.append((src, context, rid))

    def allocate(self, shape, dtype, src, op, context):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.fail_alloc_over is not None and nbytes > self.fail_alloc_over:
            raise OutOfMemoryError(f"no memory for {nbytes} bytes")
        return np.empty(shape, dtype)


def make(loop, events=None, size=3):
    waits = WaitSet(loop, rank=0, poll_s=0.0)
    lost: dict[int, PeerLostError] = {}
    matcher = Matcher(0, size, waits, events or Events(), lost)
    return matcher, waits, lost


def op(loop, context=0, timeout=30.0, what="test op"):
    return Op(what, context, timeout, loop.time() + timeout)


def deliver(sink: Sink, payload: bytes) -> None:
    """What the frame reader does with a routed frame."""
    if sink.view is not None:
        sink.view[:] = payload
    sink.done()


def sig_of(arr):
    return wire.signature("send", arr.dtype, arr.shape)


def test_messages_pair_in_order_whichever_comes_first(loop):
    matcher, _, _ = make(loop)
    a, b, c = (np.full(4, i, np.float32) for i in range(3))
    # a arrives before any receive; b and c after their receives are posted
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(a).encoded, a.nbytes), a.tobytes())
    futs = [matcher.post(1, P2P, 0, 0, sig_of(a), None, op(loop)) for _ in range(3)]
    for arr in (b, c):
        deliver(matcher.arrive(1, P2P, 0, 0, sig_of(arr).encoded, arr.nbytes), arr.tobytes())
    assert [f.result()[0] for f in futs] == [0, 1, 2]


def test_a_receive_that_does_not_fit_leaves_the_message(loop):
    matcher, _, _ = make(loop)
    msg = np.arange(4, dtype=np.float32)
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes), msg.tobytes())
    with pytest.raises(MismatchError, match=r"\(5,\)"):
        matcher.post(1, P2P, 0, 0, wire.signature("send", np.dtype(np.float32), (5,)), None, op(loop))
    with pytest.raises(MismatchError, match="int32"):
        matcher.post(1, P2P, 0, 0, wire.signature("send", np.dtype(np.int32), (4,)), None, op(loop))
    got = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    assert np.array_equal(got.result(), msg)


def test_a_posted_receive_that_does_not_fit_fails_and_the_next_takes_the_message(loop):
    matcher, _, _ = make(loop)
    msg = np.arange(4, dtype=np.float32)
    wrong = matcher.post(1, P2P, 0, 0, wire.signature("send", np.dtype(np.float32), (5,)), None, op(loop))
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes), msg.tobytes())
    assert isinstance(wrong.exception(), MismatchError)
    right = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    assert np.array_equal(right.result(), msg)


def test_a_timed_out_receive_takes_nothing(loop):
    matcher, waits, _ = make(loop)
    msg = np.arange(3, dtype=np.int64)
    first = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop, timeout=0.01))
    loop.run_until_complete(asyncio.sleep(0.05))
    err = first.exception()
    assert isinstance(err, CommTimeoutError) and "0.01s" in str(err) and "AIOCOMM_TIMEOUT" in str(err)
    assert err.culprit is None  # a silent peer may be waiting for another
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes), msg.tobytes())
    later = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    assert np.array_equal(later.result(), msg)
    assert not waits.pending


def test_credit_is_handed_back_when_no_buffer_holds_the_bytes(loop):
    events = Events()
    matcher, _, _ = make(loop, events)
    msg = np.zeros(10, np.uint8)
    # into a posted receive: credited at once
    fut = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, 10), bytes(10))
    assert fut.done() and events.credited == [(1, 10)]
    # buffered: credited when its receive takes it
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, 10), bytes(10))
    assert events.credited == [(1, 10)]
    matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    assert events.credited == [(1, 10), (1, 10)]


def test_announced_message_is_cleared_once_a_receive_is_posted(loop):
    events = Events()
    matcher, _, _ = make(loop, events)
    msg = np.arange(8, dtype=np.float64)
    matcher.announce(2, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes, rid=7)
    assert events.cleared == []
    fut = matcher.post(2, P2P, 0, 0, sig_of(msg), None, op(loop))
    assert events.cleared == [(2, 0, 7)]
    deliver(matcher.payload(2, 7, msg.nbytes), msg.tobytes())
    assert np.array_equal(fut.result(), msg)
    # announced when a receive is already posted: cleared at once
    fut = matcher.post(2, P2P, 0, 0, sig_of(msg), None, op(loop))
    matcher.announce(2, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes, rid=8)
    assert events.cleared[-1] == (2, 0, 8)
    deliver(matcher.payload(2, 8, msg.nbytes), msg.tobytes())
    assert np.array_equal(fut.result(), msg)
    assert events.credited == []  # announced bytes never used the budget


def test_a_payload_written_into_the_receive_completes_it_or_goes_to_the_next(loop):
    """RDONE (the sender wrote into the memory the CTS offered): the receive
    completes with what is in its memory; one that timed out meanwhile gives
    the message to the next receive, which gets it intact."""
    events = Events()
    matcher, _, _ = make(loop, events)
    msg = np.arange(16, dtype=np.int32)
    fut = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    matcher.announce(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes, rid=3)
    out = matcher.boxes[1].cleared[3].out  # the memory the CTS offered
    out[:] = msg  # (what the sender's process_vm_writev does)
    assert matcher.written(1, 3) == msg.nbytes
    assert fut.result() is out and np.array_equal(fut.result(), msg)
    # the receive times out after its CTS went out; the write comes after
    fut = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop, timeout=0.0))
    matcher.announce(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes, rid=4)
    offered = matcher.boxes[1].cleared[4].out
    loop.run_until_complete(asyncio.sleep(0.02))
    assert isinstance(fut.exception(), CommTimeoutError)
    offered[:] = msg + 1
    matcher.written(1, 4)
    again = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    assert np.array_equal(again.result(), msg + 1)
    # an RDONE for a receive whose context was aborted meanwhile: nothing to complete
    matcher.post(1, P2P, 5, 0, sig_of(msg), None, op(loop, context=5))
    matcher.announce(1, P2P, 5, 0, sig_of(msg).encoded, msg.nbytes, rid=6)
    matcher.drop_context(5)
    assert matcher.written(1, 6) == 0


@pytest.mark.parametrize("how", ["written", "rdata", "rdata-streaming"])
@pytest.mark.parametrize("second", ["eager", "announced"])
def test_a_receive_that_failed_while_its_payload_comes_keeps_the_order(loop, how, second):
    """A's receive is cleared (its CTS went out) and times out before A's
    payload is in; B, sent after A, is already here.  The next receive must
    get A, not B: it waits until A's payload is in (written across, or its
    RDATA, even one that is still streaming when that receive is posted)."""
    events = Events()
    matcher, _, _ = make(loop, events)
    a, b = np.full(8, 1.0, np.float32), np.full(8, 2.0, np.float32)
    first = matcher.post(1, P2P, 0, 0, sig_of(a), None, op(loop, timeout=0.0))
    matcher.announce(1, P2P, 0, 0, sig_of(a).encoded, a.nbytes, rid=1)
    if second == "eager":
        deliver(matcher.arrive(1, P2P, 0, 0, sig_of(b).encoded, b.nbytes), b.tobytes())
    else:
        matcher.announce(1, P2P, 0, 0, sig_of(b).encoded, b.nbytes, rid=2)
    loop.run_until_complete(asyncio.sleep(0.02))
    assert isinstance(first.exception(), CommTimeoutError)
    sink = None
    if how == "rdata-streaming":  # A's RDATA header is in, its bytes not yet
        sink = matcher.payload(1, 1, a.nbytes)
    got = [matcher.post(1, P2P, 0, 0, sig_of(a), None, op(loop)) for _ in range(2)]
    assert not got[0].done() and not got[1].done()
    assert [c[2] for c in events.cleared] == [1]  # B is not cleared for a receive while A may come first
    if how == "written":
        matcher.boxes[1].cleared[1].out[:] = a
        matcher.written(1, 1)
    elif how == "rdata":
        deliver(matcher.payload(1, 1, a.nbytes), a.tobytes())
    else:
        deliver(sink, a.tobytes())
    if second == "announced":
        assert [c[2] for c in events.cleared] == [1, 2]
        deliver(matcher.payload(1, 2, b.nbytes), b.tobytes())
    assert np.array_equal(got[0].result(), a) and np.array_equal(got[1].result(), b)


def test_messages_given_back_by_several_failed_receives_keep_their_order(loop):
    """Two receives cleared for A then B both time out; the payloads land A
    then B (as sent), each given back: the next receives get A, then B."""
    matcher, _, _ = make(loop)
    a, b = np.full(8, 1.0, np.float32), np.full(8, 2.0, np.float32)
    first = [matcher.post(1, P2P, 0, 0, sig_of(a), None, op(loop, timeout=0.0)) for _ in range(2)]
    matcher.announce(1, P2P, 0, 0, sig_of(a).encoded, a.nbytes, rid=1)
    matcher.announce(1, P2P, 0, 0, sig_of(b).encoded, b.nbytes, rid=2)
    loop.run_until_complete(asyncio.sleep(0.02))
    assert all(isinstance(f.exception(), CommTimeoutError) for f in first)
    deliver(matcher.payload(1, 1, a.nbytes), a.tobytes())
    deliver(matcher.payload(1, 2, b.nbytes), b.tobytes())
    got = [matcher.post(1, P2P, 0, 0, sig_of(a), None, op(loop)).result()[0] for _ in range(2)]
    assert got == [1.0, 2.0]


@pytest.mark.parametrize("how", ["eager into the receive", "eager buffered", "announced"])
def test_a_payload_that_lands_after_its_context_was_aborted_is_dropped_and_credited(loop, how):
    """A receive that took a frame is failed by an abort of its context while
    the payload comes: when the payload is in, it is not kept for a context
    no receive will use again, and the sender's credit comes back (eager:
    all of it; announced: it never took any)."""
    events = Events()
    matcher, waits, _ = make(loop, events)
    msg = np.arange(4, dtype=np.float32)
    if how == "eager into the receive":
        matcher.post(1, P2P, 5, 0, sig_of(msg), None, op(loop, context=5))
        sink = matcher.arrive(1, P2P, 5, 0, sig_of(msg).encoded, msg.nbytes)
    elif how == "eager buffered":
        sink = matcher.arrive(1, P2P, 5, 0, sig_of(msg).encoded, msg.nbytes)
        matcher.post(1, P2P, 5, 0, sig_of(msg), None, op(loop, context=5))  # it waits for the rest
    else:
        matcher.post(1, P2P, 5, 0, sig_of(msg), None, op(loop, context=5))
        matcher.announce(1, P2P, 5, 0, sig_of(msg).encoded, msg.nbytes, rid=1)
        sink = matcher.payload(1, 1, msg.nbytes)
    sink.view[:8] = msg.tobytes()[:8]
    waits.fail_context(5, CommError("aborted"))  # what the mesh does when a context breaks
    matcher.drop_context(5)
    sink.view[8:] = msg.tobytes()[8:]
    sink.done()
    assert not matcher.boxes[1].arrived
    assert sum(n for _, n in events.credited) == (0 if how == "announced" else msg.nbytes)


def test_a_counted_payload_gives_its_credit_back_whichever_way_it_lands(loop):
    """RDATA sent after the sender's grace (RDATA_COUNTED) took the
    receiver's credit: given back at once when it lands in a posted receive,
    when consumed if it waits as an arrival, at once if it is dropped."""
    events = Events()
    matcher, _, _ = make(loop, events)
    msg = np.arange(8, dtype=np.float32)
    # no receive yet: it becomes an arrival; credit comes back when a receive takes it
    matcher.announce(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes, rid=1)
    deliver(matcher.payload(1, 1, msg.nbytes, counted=True), msg.tobytes())
    assert events.credited == []
    fut = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    assert np.array_equal(fut.result(), msg) and events.credited == [(1, msg.nbytes)]
    # the receive was posted and cleared (its CTS crossed the payload): straight in, credit back at once
    fut = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    matcher.announce(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes, rid=2)
    deliver(matcher.payload(1, 2, msg.nbytes, counted=True), (msg * 2).tobytes())
    assert np.array_equal(fut.result(), msg * 2) and events.credited[-1] == (1, msg.nbytes)
    # its context was aborted: dropped, credit back
    matcher.announce(1, P2P, 7, 0, sig_of(msg).encoded, msg.nbytes, rid=3)
    matcher.drop_context(7)
    deliver(matcher.payload(1, 3, msg.nbytes, counted=True), msg.tobytes())
    assert events.credited[-1] == (1, msg.nbytes) and len(events.credited) == 3


def test_losing_a_peer_fails_its_receives_even_halfway(loop):
    matcher, waits, lost = make(loop)
    msg = np.zeros(1000, np.uint8)
    posted = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    sink = matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, 1000)
    sink.view[:10] = bytes(10)  # half a payload, then the peer dies
    err = PeerLostError("rank 1 is gone", 1)
    lost[1] = err
    waits.fail_peer(1, err)
    matcher.drop_peer(1)
    assert posted.exception() is err
    with pytest.raises(PeerLostError):
        matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))


def test_complete_messages_of_a_lost_peer_stay_receivable(loop):
    matcher, waits, lost = make(loop)
    msg = np.arange(5, dtype=np.int16)
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes), msg.tobytes())
    lost[1] = PeerLostError("gone", 1)
    waits.fail_peer(1, lost[1])
    matcher.drop_peer(1)
    assert np.array_equal(matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop)).result(), msg)
    with pytest.raises(PeerLostError):
        matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))


@pytest.mark.parametrize("hole", ["announced", "half-sent"])
def test_a_lost_peer_delivers_nothing_past_a_message_that_never_came_whole(loop, hole):
    """Messages 1 and 3 arrived whole, message 2 was only announced (an RTS
    whose payload never came) or only half sent, when the peer died: message
    1 is delivered, then PeerLostError -- never message 3 in message 2's
    place (found by tests/workers/inbox_moments.py "kill": a 256 KiB message
    announced, an 8 KiB one after it through the ring, the sender killed)."""
    matcher, waits, lost = make(loop)
    msgs = [np.full(4, i, np.int32) for i in range(1, 4)]
    sig = sig_of(msgs[0])
    deliver(matcher.arrive(1, P2P, 0, 0, sig.encoded, 16), msgs[0].tobytes())
    if hole == "announced":
        matcher.announce(1, P2P, 0, 0, sig.encoded, 16, rid=7)
    else:
        matcher.arrive(1, P2P, 0, 0, sig.encoded, 16).view[:8] = bytes(8)
    deliver(matcher.arrive(1, P2P, 0, 0, sig.encoded, 16), msgs[2].tobytes())
    lost[1] = PeerLostError("rank 1 is gone", 1)
    waits.fail_peer(1, lost[1])
    matcher.drop_peer(1)
    assert np.array_equal(matcher.post(1, P2P, 0, 0, sig, None, op(loop)).result(), msgs[0])
    with pytest.raises(PeerLostError):
        matcher.post(1, P2P, 0, 0, sig, None, op(loop))


def test_a_lost_peer_delivers_nothing_past_a_message_whose_receive_timed_out_before_its_payload(loop):
    """A's receive is cleared (its CTS went out) and times out before A's
    payload is in; B, sent after A, arrived whole; then the peer dies.  A
    will never come, so the next receive raises PeerLostError rather than
    take B in A's place (found by review: the first fix of drop_peer looked
    only at the messages waiting for a receive)."""
    matcher, waits, lost = make(loop)
    a, b = np.full(8, 1.0, np.float32), np.full(8, 2.0, np.float32)
    first = matcher.post(1, P2P, 0, 0, sig_of(a), None, op(loop, timeout=0.0))
    matcher.announce(1, P2P, 0, 0, sig_of(a).encoded, a.nbytes, rid=1)
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(b).encoded, b.nbytes), b.tobytes())
    loop.run_until_complete(asyncio.sleep(0.02))
    assert isinstance(first.exception(), CommTimeoutError)
    lost[1] = PeerLostError("rank 1 is gone", 1)
    waits.fail_peer(1, lost[1])
    matcher.drop_peer(1)
    with pytest.raises(PeerLostError):
        matcher.post(1, P2P, 0, 0, sig_of(a), None, op(loop))


def test_aborting_a_context_fails_only_its_waits(loop):
    matcher, waits, _ = make(loop)
    msg = np.zeros(2, np.float32)
    mine = matcher.post(1, P2P, 5, 0, sig_of(msg), None, op(loop, context=5))
    other = matcher.post(1, P2P, 6, 0, sig_of(msg), None, op(loop, context=6))
    connecting = Wait(waits, 2, op(loop, context=5), "connecting to")
    err = CommError("aborted")
    waits.fail_context(5, err)
    matcher.drop_context(5)
    assert mine.exception() is err and connecting.future.exception() is err
    assert not other.done()


def test_out_of_memory_fails_the_receive_naming_the_size(loop):
    matcher, _, _ = make(loop, Events(fail_alloc_over=100))
    msg = np.zeros(1000, np.uint8)
    fut = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    sink = matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, 1000)
    assert sink.view is None  # the payload is dropped
    assert isinstance(fut.exception(), OutOfMemoryError) and "1000" in str(fut.exception())


def test_send_window_goes_eager_within_credit_and_announces_past_it():
    window = SendWindow(100)
    assert window.take_eager(50) and window.credit == 50
    assert not window.take_eager(51)  # over half the window: always announced
    assert window.take_eager(50) and window.credit == 0
    assert not window.take_eager(1)
    budget = ReceiveBudget(100, size=2)
    assert budget.consumed(1, 20) == 0 and budget.consumed(1, 5) == 25  # a quarter: hand it back


def test_abort_maps_round_trip_with_their_culprit():
    lost = PeerLostError("rank 2 lost rank 3", 3)
    exc, fields = abort_error(abort_fields(lost, me=2))
    assert isinstance(exc, PeerLostError) and exc.rank == 3 and exc.culprit == 3
    assert "reported by rank 2" in str(exc) and fields["origin"] == 2
    mismatch, _ = abort_error(abort_fields(MismatchError("shapes differ"), me=1))
    assert isinstance(mismatch, MismatchError) and mismatch.culprit == 1
    strange, _ = abort_error({"origin": 0, "type": "os.system", "reason": "x"})
    assert type(strange) is CommError
    with pytest.raises(ProtocolError):
        abort_error({"origin": 0})


def frames(data: bytes) -> list[tuple[wire.Header, bytes]]:
    out = []

    def route(header, meta):
        out.append((header, meta))
        return Sink(None)

    reader = wire.FrameReader(route)
    buf = reader.get_buffer(-1)
    buf[: len(data)] = data
    reader.buffer_updated(len(data))
    return out


def run_handshake(acceptor, dialer):
    (challenge,) = frames(acceptor.start())
    (hello,) = frames(dialer.receive(*challenge))
    (welcome,) = frames(acceptor.receive(*hello))
    assert dialer.receive(*welcome) == b""


def test_handshake_state_machines_agree_on_identity_and_window():
    acceptor = wire.AcceptorHandshake(b"tok", rank=2, size=4, window=12345, place=(-77, 4242))
    dialer = wire.DialerHandshake(b"tok", rank=1, size=4, to=2)
    run_handshake(acceptor, dialer)
    assert acceptor.done and dialer.done
    assert acceptor.peer == 1 and dialer.peer == 2 and dialer.window == 12345
    assert dialer.place == (-77, 4242)  # where the acceptor runs (for writes into its memory)


def test_handshake_with_another_token_fails_and_stays_failed():
    acceptor = wire.AcceptorHandshake(b"job-a", rank=0, size=2, window=1)
    dialer = wire.DialerHandshake(b"job-b", rank=1, size=2, to=0)
    (challenge,) = frames(acceptor.start())
    (hello,) = frames(dialer.receive(*challenge))
    with pytest.raises(AuthenticationError):
        acceptor.receive(*hello)
    with pytest.raises(AuthenticationError):  # sticky
        acceptor.receive(*hello)
    assert not acceptor.done


def test_handshake_refuses_data_before_it_is_done():
    acceptor = wire.AcceptorHandshake(b"t", rank=0, size=2, window=1)
    header = wire.Header(Kind.P2P, 0, 0, 0, 0, 0)
    with pytest.raises(ProtocolError, match="expected HELLO"):
        acceptor.receive(header, b"\x90")
