"""Regressions of the transport fixes from an adversarial review (commit
564d35b): each test failed before it.  Socket-free where matching alone shows
the bug (the style of test_matching.py), real processes where it needs them."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import numpy as np
import pytest

from aiocomm import wire
from aiocomm.errors import CommTimeoutError
from aiocomm.transport.matching import Matcher
from aiocomm.transport.waits import WaitSet
from aiocomm.wire import Kind

from .conftest import ROOT, WORKERS, assert_ok, clean_env, launch
from .test_matching import Events, deliver, op, sig_of


@pytest.fixture(autouse=True)
def _tcp_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """These regressions are the TCP transport's: ranks of one host would otherwise use shared memory."""
    monkeypatch.setenv("AIOCOMM_TRANSPORT", "tcp")

P2P = int(Kind.P2P)
COLL = int(Kind.COLL)


# ---- without sockets


def make(loop, events=None, size=3):
    waits = WaitSet(loop, rank=0, poll_s=0.0)
    matcher = Matcher(0, size, waits, events or Events(), {})
    return matcher, waits


def expire(loop) -> None:
    """Let the deadline timer fail the waits posted with timeout=0.01."""
    loop.run_until_complete(asyncio.sleep(0.05))


def test_timed_out_receives_leave_their_queue(loop):
    """pollrecv.py: a polling loop of receives that time out must not grow the queue."""
    matcher, waits = make(loop)
    msg = np.arange(4, dtype=np.float64)
    dead = [matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop, timeout=0.01)) for _ in range(50)]
    expire(loop)
    assert all(isinstance(f.exception(), CommTimeoutError) for f in dead)
    assert not waits.pending
    assert sum(len(q) for q in matcher.boxes[1].posted.values()) == 0
    live = matcher.post(1, P2P, 0, 0, sig_of(msg), None, op(loop))
    deliver(matcher.arrive(1, P2P, 0, 0, sig_of(msg).encoded, msg.nbytes), msg.tobytes())
    assert np.array_equal(live.result(), msg)


def test_an_arrival_of_an_aborted_context_still_hands_its_credit_back(loop):
    """credit_leak.py: a frame still arriving when its context is aborted."""
    events = Events()
    matcher, _ = make(loop, events, size=2)
    sig = wire.signature("all_sum", np.dtype("float64"), (1000,))
    sink = matcher.arrive(1, COLL, 5, 0, sig.encoded, 8000)  # header in, payload coming
    matcher.drop_context(5)  # context 5 aborted meanwhile
    assert events.credited == []
    deliver(sink, bytes(8000))
    assert sum(n for src, n in events.credited if src == 1) == 8000


@pytest.mark.parametrize("claim", ["announced", "eager into the receive", "eager, buffered first"])
def test_a_receive_that_fails_after_claiming_a_message_gives_it_back(loop, claim):
    """lost_rdata.py: the message a timed-out receive claimed (its payload
    still coming) goes to the next receive, and the next message after it."""
    events = Events()
    matcher, waits = make(loop, events)
    first_msg, second_msg = np.full(6, 7.0), np.full(6, 8.0)
    sig, n = sig_of(first_msg), first_msg.nbytes
    if claim == "announced":
        first = matcher.post(1, P2P, 0, 0, sig, None, op(loop, timeout=0.01))
        matcher.announce(1, P2P, 0, 0, sig.encoded, n, rid=3)
        assert events.cleared == [(1, 0, 3)]  # the receive claimed it
        expire(loop)
        sink = matcher.payload(1, 3, n)  # then its payload comes
    elif claim == "eager into the receive":
        first = matcher.post(1, P2P, 0, 0, sig, None, op(loop, timeout=0.01))
        sink = matcher.arrive(1, P2P, 0, 0, sig.encoded, n)
        assert sink.view is not None  # straight into the receive's memory
        expire(loop)
    else:
        sink = matcher.arrive(1, P2P, 0, 0, sig.encoded, n)  # buffered, its payload coming
        first = matcher.post(1, P2P, 0, 0, sig, None, op(loop, timeout=0.01))  # waits for the rest
        expire(loop)
    assert isinstance(first.exception(), CommTimeoutError)
    deliver(sink, first_msg.tobytes())
    deliver(matcher.arrive(1, P2P, 0, 0, sig.encoded, n), second_msg.tobytes())
    later = matcher.post(1, P2P, 0, 0, sig, None, op(loop))
    after = matcher.post(1, P2P, 0, 0, sig, None, op(loop))
    assert later.done() and np.array_equal(later.result(), first_msg)
    assert after.done() and np.array_equal(after.result(), second_msg)
    assert not waits.pending and not matcher.boxes[1].arrived
    eager = n if claim == "announced" else 2 * n  # announced bytes never use the budget
    assert sum(nbytes for _, nbytes in events.credited) == eager


def test_a_revoked_announcement_is_not_waited_for(loop):
    """ghost.py, socket-free: a send that gave up on its announced message
    revokes it; a receive is never cleared for it, and one cleared already
    waits for the next message."""
    events = Events()
    matcher, waits = make(loop, events)
    a, b, c = (np.full(8, v) for v in (1.0, 2.0, 3.0))
    sig, n = sig_of(a), a.nbytes
    # revoked before any receive: the receive takes the next message
    matcher.announce(2, P2P, 0, 0, sig.encoded, n, rid=1)
    matcher.revoke(2, 1)
    fut = matcher.post(2, P2P, 0, 0, sig, None, op(loop))
    assert events.cleared == [] and not fut.done()
    matcher.announce(2, P2P, 0, 0, sig.encoded, n, rid=2)
    assert events.cleared == [(2, 0, 2)]
    deliver(matcher.payload(2, 2, n), b.tobytes())
    assert np.array_equal(fut.result(), b)
    # revoked after it was cleared for a receive: that receive waits again
    fut = matcher.post(2, P2P, 0, 0, sig, None, op(loop))
    matcher.announce(2, P2P, 0, 0, sig.encoded, n, rid=3)
    assert events.cleared[-1] == (2, 0, 3)
    matcher.revoke(2, 3)
    assert not fut.done()
    matcher.announce(2, P2P, 0, 0, sig.encoded, n, rid=4)
    assert events.cleared[-1] == (2, 0, 4)
    deliver(matcher.payload(2, 4, n), c.tobytes())
    assert np.array_equal(fut.result(), c)
    assert not waits.pending


# ---- real processes


def assert_said(proc: subprocess.CompletedProcess[str], line: str) -> None:
    assert line in proc.stdout, (
        f"{line!r} not printed\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )


@pytest.mark.timeout(60)
def test_a_failed_announced_send_leaves_no_ghost_at_the_receiver():
    """ghost.py: the receiver's next recv gets the next message at once."""
    proc = launch(2, "reg_ghost.py", env={"AIOCOMM_BUFFER_BYTES": "1M"}, timeout=50)
    assert_ok(proc, 2)
    assert_said(proc, "[rank 0] first send timed out")


@pytest.mark.timeout(60)
def test_a_receive_that_times_out_after_its_clear_to_send_loses_nothing(tmp_path):
    """lost_rdata.py over real sockets: the sender's busy loop reads the CTS
    only after the receive gave up."""
    proc = launch(2, "reg_lost_rdata.py", str(tmp_path / "flag"), env={"AIOCOMM_BUFFER_BYTES": "1M"}, timeout=50)
    assert_ok(proc, 2)
    assert_said(proc, "[rank 1] first recv timed out")


@pytest.mark.timeout(60)
def test_blocking_ring_shift_of_messages_over_the_budget():
    """ringshift.py: send right, then recv left, 3 MiB over a 4M budget, 4 ranks."""
    assert_ok(launch(4, "reg_ringshift.py", env={"AIOCOMM_BUFFER_BYTES": "4M"}, timeout=50), 4)


@pytest.mark.timeout(60)
def test_concurrent_collectives_open_peers_while_a_flush_waits():
    """dictiter.py: no 'dictionary changed size during iteration'."""
    assert_ok(launch(4, "reg_dictiter.py", timeout=50), 4)


@pytest.mark.timeout(60)
def test_a_protocol_error_on_an_accepted_connection_is_seen_by_both_ranks(tmp_path):
    """proto_after_hs.py: the rank that broke the protocol learns it is lost too."""
    proc = launch(2, "reg_proto.py", str(tmp_path / "done"), timeout=50)
    assert_ok(proc, 2)
    assert_said(proc, "[rank 0] all_sum raised PeerLostError")


@pytest.mark.timeout(60)
def test_shutdown_fails_operations_still_waiting():
    """shutdown_hang.py: a pending recv ends when aio.shutdown() runs."""
    proc = launch(2, "reg_shutdown.py", timeout=50)
    assert_ok(proc, 2)
    assert_said(proc, "[rank 0] recv after shutdown ended")


@pytest.mark.timeout(60)
def test_blocking_face_under_a_wait_for_that_needs_a_task():
    """py312.py, on any Python: wait_for made to want a current task, as
    Python 3.12's does; the blocking face forms the world and runs calls."""
    assert_ok(launch(3, "reg_py312.py", "--strict-wait-for", timeout=50), 3)


def _python312() -> str | None:
    """A Python 3.12 that has the project's dependencies: $AIOCOMM_TEST_PYTHON312
    (.ci/run makes one, a venv, where the machine has a Python 3.12), else a
    python3.12 on the PATH that has them."""
    named = os.environ.get("AIOCOMM_TEST_PYTHON312")
    if named:
        # Named on purpose (as .ci/run does): it must work, never a skip.
        probe = subprocess.run([named, "-c", "import sys, numpy, uvloop, msgpack; print(sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, f"AIOCOMM_TEST_PYTHON312={named} cannot run the deps:\n{probe.stderr}"
        assert probe.stdout.strip() == "(3, 12)", f"AIOCOMM_TEST_PYTHON312={named} is Python {probe.stdout.strip()}"
        return named
    candidate = shutil.which("python3.12")
    if candidate:
        probe = subprocess.run([candidate, "-c", "import numpy, uvloop, msgpack"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.timeout(120)
def test_blocking_face_on_python_3_12():
    """py312.py itself, where a Python 3.12 with numpy, uvloop and msgpack is
    installed (.ci/run makes one when the machine has a Python 3.12)."""
    python = _python312()
    if python is None:
        pytest.skip("no python3.12 with numpy, uvloop and msgpack (set AIOCOMM_TEST_PYTHON312; .ci/run does "
                    "where the machine has a Python 3.12)")
    proc = subprocess.run(
        [python, "-m", "launcher", "-n", "3", str(WORKERS / "reg_py312.py")],
        cwd=ROOT,
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_ok(proc, 3)
    assert_said(proc, "OK py312 (3, 12)")


@pytest.mark.timeout(60)
def test_a_send_that_times_out_mid_write_never_delivers_a_torn_message():
    """torn_send.py: 32 MiB to a frozen rank, timeout=1; the sender then
    changes its array.  Before: the thawed receiver got 7 of 8 Mi values
    changed.  Now the connection closes and its receive fails instead."""
    proc = launch(2, "reg_torn_send.py", timeout=50)
    assert_ok(proc, 2)
    assert_said(proc, "[rank 0] send timed out")
    assert_said(proc, "[rank 1] recv failed: PeerLostError")
