"""Small point-to-point messages between ranks of one host go through the
receiver's inbox (aiocomm/transport/inbox.py: shared memory, no socket, and
on the blocking face no hand-off to the loop): the TCP path's promises at
the same moments, with real processes (tests/workers/inbox_moments.py).
The runtime, fault and thread suites' small messages go this way too,
since their ranks share a host."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import numpy as np
import pytest

from aiocomm.transport import inbox

from .conftest import WORKERS, assert_ok, killed, launch, spawn_world, thawed


def _inbox_counts(stdout: str) -> dict[int, int]:
    return {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"\[rank (\d+)\] .*INBOX (\d+)", stdout)}


@pytest.mark.timeout(120)
def test_every_pair_in_order_across_every_way_a_message_goes():
    """Every ordered pair of 3 ranks: scalars, empty arrays, inbox-sized,
    just-too-large, mid and large messages (inbox, TCP, written across)
    interleaved, seven dtypes, in order; a mismatched receive leaves its
    message; a split group's messages and the world's in another order;
    blocking sends taken by async receives."""
    proc = launch(3, "inbox_moments.py", "pairs", timeout=110)
    assert_ok(proc, 3, "OK")
    counts = _inbox_counts(proc.stdout)
    assert len(counts) == 3 and all(c > 0 for c in counts.values()), proc.stdout


@pytest.mark.timeout(120)
def test_transport_tcp_uses_no_inbox():
    proc = launch(3, "inbox_moments.py", "pairs", timeout=110, env={"AIOCOMM_TRANSPORT": "tcp"})
    assert_ok(proc, 3, "OK")
    assert set(_inbox_counts(proc.stdout).values()) == {0}, proc.stdout


@pytest.mark.timeout(90)
def test_the_budget_bounds_what_waits_for_a_receive():
    """600 messages of 16 KiB sent before any receive, with a budget of
    2 MiB: the ring fills, the rest take TCP's credit and held copies, and
    all arrive in order, intact."""
    proc = launch(2, "inbox_moments.py", "budget", timeout=80, env={"AIOCOMM_BUFFER_BYTES": "2M"})
    detail = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0 and "[rank 0] SENT 600" in proc.stdout, detail
    m = re.search(r"\[rank 1\] OK INBOX (\d+)", proc.stdout)
    assert m is not None and 0 < int(m.group(1)) < 600, detail  # (some through the inbox; not all: it filled)


@pytest.mark.timeout(60)
def test_calls_from_one_thread_after_another():
    proc = launch(2, "inbox_moments.py", "threads", timeout=50)
    detail = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, detail
    assert "[rank 0] GOT [11, 13, 15]" in proc.stdout and "[rank 1] GOT [0, 2, 4]" in proc.stdout, detail
    assert all(c > 0 for c in _inbox_counts(proc.stdout).values()), detail


@pytest.mark.timeout(90)
@pytest.mark.parametrize("role", ["sender", "receiver"])
def test_a_rank_killed_while_small_messages_flow(tmp_path, role):
    """Small messages in a loop; one side SIGKILLs itself at a random
    moment.  The survivor raises PeerLostError naming it within 5 s, and
    every message it received before was whole and in order."""
    victim = 0 if role == "sender" else 1
    out, err, died, code = killed(tmp_path, [str(WORKERS / "inbox_moments.py"), "kill", role], victim)
    detail = f"{out}\n{err[-3000:]}"
    assert code == -signal.SIGKILL, detail
    assert "WRONG" not in out, detail
    m = re.search(r"FAILED (\w+) at ([\d.]+) after (\d+) INBOX (\d+) \| (.*)", out)
    assert m is not None and m.group(1) == "PeerLostError", detail
    assert f"rank {victim}" in m.group(5), detail
    assert float(m.group(2)) - died < 5.0, "the survivor noticed too late\n" + detail
    if role == "sender":
        assert int(m.group(4)) > 0, detail  # (they came through the inbox)


@pytest.mark.timeout(60)
def test_a_receive_from_a_frozen_rank_times_out_and_loses_nothing(tmp_path):
    """Rank 0 is SIGSTOPped between messages: rank 1's receive times out
    (no hang in the spin); thawed, rank 0's next messages reach rank 1's
    next receives, in order."""
    seen, outs, _ = thawed(tmp_path, [str(WORKERS / "inbox_moments.py"), "stopped"], timeout=40)
    m = re.search(r"TIMEDOUT ([\d.]+)", seen)
    assert m is not None and float(m.group(1)) < 3.0, seen
    assert "OK GOT [0, 1, 2]" in outs[1][0], outs
    assert "SENT" in outs[0][0], outs


def _frozen_receiver(tmp_path, size: str, face: str, sender_timeout: float, thaw: bool = False):
    """Run ``inbox_moments.py frozen_receiver SIZE FACE``: rank 0's (stdout,
    stderr) once it ends, and with ``thaw``, rank 1's after it is thawed then
    (else None: it is killed frozen)."""
    procs = spawn_world(2, tmp_path, [str(WORKERS / "inbox_moments.py"), "frozen_receiver", size, face],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        sender = procs[0].communicate(timeout=sender_timeout)
        receiver = None
        if thaw:
            procs[1].send_signal(signal.SIGCONT)
            receiver = procs[1].communicate(timeout=30)
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
    return sender, receiver


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size,face", [("4K", "blocking"), ("parts", "blocking"), ("parts", "async")])
def test_sends_to_a_frozen_rank_time_out(tmp_path, size, face):
    """Rank 1 is SIGSTOPped; rank 0 keeps sending 4 KiB messages (or 1 MiB,
    in parts, from either face: the async face's parts go from a worker
    thread) with timeout=2: once the ring, the credit and the socket are
    full (or a part finds no room), a send raises CommTimeoutError instead
    of hanging."""
    (out, err), _ = _frozen_receiver(tmp_path, size, face, sender_timeout=80)
    m = re.search(r"SENDFAILED (\w+) after (\d+) in ([\d.]+)s", out)
    assert m is not None and m.group(1) == "CommTimeoutError", out + err[-3000:]
    if size == "4K":
        assert int(m.group(2)) > 0, out  # (some went before the buffers filled)
    else:  # (the first part fits; the second waits for room until the send's deadline)
        assert int(m.group(2)) == 0 and 2.0 <= float(m.group(3)) < 4.0, out


@pytest.mark.timeout(60)
def test_an_async_send_cancelled_halfway_through_its_parts_closes_its_connection(tmp_path):
    """Rank 1 is frozen; rank 0's async send of 1 MiB (in parts, from a worker
    thread) is cancelled by asyncio.wait_for after 1 s, with parts still to
    go: the cancellation returns once the thread stopped (rank 0 then writes
    into its array), the connection closes (the next send cannot go by it),
    and thawed, rank 1 receives nothing: PeerLostError, never a message."""
    (out, err), thawed_rank = _frozen_receiver(tmp_path, "parts", "cancel", sender_timeout=40, thaw=True)
    assert thawed_rank is not None
    out1, err1 = thawed_rank
    m = re.search(r"CANCELLED after (\d+) in ([\d.]+)s", out)
    assert m is not None and int(m.group(1)) == 0 and 1.0 <= float(m.group(2)) < 2.5, out + err[-3000:]
    assert "BAD" not in out, out + err[-3000:]
    # (a new connection to the frozen rank cannot be made: its next send times out connecting)
    assert re.search(r"THEN (PeerLostError|CommTimeoutError)", out), out + err[-3000:]
    assert "RECVFAILED PeerLostError" in out1 and "BAD" not in out1, out1 + err1[-3000:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("face", ["blocking", "async"])
def test_a_receive_from_a_rank_frozen_halfway_through_a_message_in_parts(tmp_path, face):
    """Rank 0 is SIGSTOPped after the first part of a 1 MiB message: rank
    1's receive times out (a blocking one, whose thread hands the message to
    the loop; an async one, which the loop fills); thawed, rank 0 finishes
    it, and rank 1's next receive gets it whole, then the message sent after
    it."""
    seen, outs, _ = thawed(tmp_path, [str(WORKERS / "inbox_moments.py"), "stopped_parts", face], timeout=40)
    m = re.search(r"TIMEDOUT ([\d.]+)", seen)
    assert m is not None and float(m.group(1)) < 3.0, seen
    assert "OK GOT [0, True, 1]" in outs[1][0], outs
    assert "SENT" in outs[0][0], outs


@pytest.mark.timeout(60)
def test_messages_sent_after_one_in_parts_do_not_overtake_it():
    """The receiving thread takes a message's first part, then is held up;
    the rest of it, a message through the inbox and one over TCP come
    meanwhile.  The next receives get the three in the order sent."""
    proc = launch(2, "inbox_moments.py", "overtaking_parts", timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "[rank 1] OK GOT [3, 4, 5]" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("who", ["payload-1", "advance-2", "advance-5"])
def test_a_receiving_thread_interrupted_halfway_through_a_message_in_parts(who):
    """KeyboardInterrupt in the receiving thread at each kind of moment of
    taking a message of 5 parts (before its first part is copied; after a
    middle one is copied, before the ring's head passes it; the same for
    the last part): the next receive gets the whole message, then the one
    sent after it.  (Before the loop could take over at any point, the
    last two delivered a wrong message or stuck the ring.)"""
    proc = launch(2, "inbox_moments.py", "interrupted", who, timeout=50)
    detail = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0 and "[rank 1] OK AFTER 7" in proc.stdout, detail


@pytest.mark.timeout(60)
def test_a_sender_interrupted_halfway_through_a_message_in_parts_closes_its_connection():
    """KeyboardInterrupt in the sending thread right after the first part
    of a message of 5 parts: its connection closes, and the receive raises
    PeerLostError instead of getting half a message."""
    proc = launch(2, "inbox_moments.py", "interrupted", "sender", timeout=50,
                  launcher_args=("--on-failure", "continue"))
    detail = proc.stdout + proc.stderr[-3000:]
    assert "[rank 0] INTERRUPTED" in proc.stdout, detail
    m = re.search(r"\[rank 1\] RAISED PeerLostError after ([\d.]+)s", proc.stdout)
    assert m is not None and float(m.group(1)) < 2.5, detail  # (rank 0 lives on for 4 s)


@pytest.mark.timeout(60)
def test_a_rank_killed_halfway_through_a_message_in_parts(tmp_path):
    """Rank 0 SIGKILLs itself after the first part of a 1 MiB message:
    rank 1's receive raises PeerLostError naming it within 5 s; no half
    message is delivered."""
    out, err, died, code = killed(tmp_path, [str(WORKERS / "inbox_moments.py"), "killed_parts"], 0)
    detail = f"{out}\n{err[-3000:]}"
    assert code == -signal.SIGKILL, detail
    m = re.search(r"FAILED (\w+) at ([\d.]+) after 0 INBOX (\d+) \| (.*)", out)
    assert m is not None and m.group(1) == "PeerLostError" and "rank 0" in m.group(4), detail
    assert float(m.group(2)) - died < 5.0, "the survivor noticed too late\n" + detail


@pytest.mark.timeout(60)
def test_a_small_message_waits_for_a_tcp_message_given_back_halfway():
    """A receive times out halfway through a TCP message's payload; the
    small message sent after it through the inbox must not overtake it:
    the next receive gets the TCP message, then the small one."""
    proc = launch(2, "inbox_moments.py", "midpayload", timeout=50)
    detail = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0 and "[rank 1] OK" in proc.stdout, detail
    assert "EARLY" not in proc.stdout, detail  # (the moment was reached)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("face", ["blocking", "async"])
def test_a_rank_declared_lost_delivers_nothing_more(tmp_path, face):
    """Rank 1, frozen, is declared failed by rank 0's agreement; thawed, it
    sends a small message.  Rank 0's receive from it raises PeerLostError,
    as over TCP: its inbox ring is sealed when it is lost."""
    procs = spawn_world(2, tmp_path, [str(WORKERS / "inbox_moments.py"), "excluded", face],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        outs = [p.communicate(timeout=50) for p in procs]
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
    detail = f"{outs[0][0]}\n{outs[0][1][-3000:]}"
    assert "RAISED PeerLostError LOST [1]" in outs[0][0], detail


# ---- the ring itself, in one process (its own inbox, through its own pid)


def _pair(rank: int = 1) -> tuple[inbox.Inbox, inbox.Outlet]:
    box = inbox.Inbox(3)
    return box, inbox.Outlet(os.getpid(), box.fd, box.bell, rank)


def test_records_wrap_around_the_ring_whole_and_in_order():
    """Whole messages and messages in parts (a first part with the message's
    size, then parts that carry only bytes), many times around the ring."""
    box, outlet = _pair()
    ring = box.ring(1)
    rng = np.random.default_rng(5)
    sent = taken = 0
    expected: dict[int, tuple[bytes, bytes]] = {}
    more: list[tuple[int, memoryview]] = []  # the parts of the message being written, still to write
    got = bytearray()  # the parts of the message in parts being read, so far
    total = 0
    for _ in range(6000):  # (many times around: every offset meets the ring's end)
        if rng.random() < 0.55:
            if more:
                if outlet.put_more(more[0][0], sent * 3, more[0][1]):
                    more.pop(0)
                    sent += not more
                continue
            parts = int(rng.integers(1, 4))
            payload = rng.integers(0, 256, int(rng.integers(0 if parts == 1 else parts, 9000)), dtype=np.uint8)
            meta = bytes([sent % 251]) * int(rng.integers(1, 40))
            ends = [k * len(payload) // parts for k in range(parts + 1)]
            cut = [(ends[k], memoryview(payload)[ends[k] : ends[k + 1]]) for k in range(parts)]
            if outlet.put(sent, sent * 3, meta, cut[0][1], len(payload) if parts > 1 else -1):
                expected[sent] = (meta, payload.tobytes())
                more = cut[1:]
                sent += not more
        else:
            record = ring.peek()
            if record is None:
                assert taken == sent
                continue
            mark, context, meta, at, nbytes, after, size = record
            assert context == taken * 3
            if size == -1:  # (a later part, which says where it goes)
                assert got and mark == len(got), "a later part without its first, or out of its place"
                got += ring.payload(at, nbytes)
            else:
                assert not got and mark == taken
                total, got = size, bytearray(ring.payload(at, nbytes))
                first_meta = meta
            if len(got) < total:
                ring.advance(after, False)
                continue
            assert (first_meta, bytes(got)) == expected.pop(taken)
            got = bytearray()
            ring.advance(after)
            taken += 1
    assert sent > 1000 and ring.taken == taken
    box.close()
    outlet.close()


def test_a_stalled_sender_is_heard_once():
    box, outlet = _pair(2)
    assert box.stalled() == []
    outlet.ring_if_waiting()
    box.ring(2).waiting(True)
    outlet.ring_if_waiting()
    assert not box.quiet()  # (a plain ring)
    outlet.stall()
    assert box.quiet()
    assert box.stalled() == [2]
    assert box.stalled() == []  # (the word is cleared by the look)
    box.close()
    outlet.close()


def test_a_full_ring_refuses_and_takes_again_once_read():
    box, outlet = _pair(2)
    ring = box.ring(2)
    chunk = memoryview(np.zeros(inbox.SMALL, np.uint8))
    count = 0
    while outlet.put(count, 0, b"m", chunk):
        count += 1
    assert count == inbox.RING_BYTES // inbox.record_bytes(1, inbox.SMALL)
    record = ring.peek()
    assert record is not None and record[0] == 0
    ring.advance(record[5])
    assert outlet.put(count, 0, b"m", chunk)  # (room again)
    assert not outlet.put_more(0, 0, chunk)  # (a part takes room as a record does)
    box.close()
    outlet.close()


def test_the_bell_rings_only_for_a_waiting_loop():
    box, outlet = _pair()
    ring = box.ring(1)
    outlet.put(0, 0, b"", memoryview(b""))
    outlet.ring_if_waiting()
    with pytest.raises(BlockingIOError):
        os.eventfd_read(box.bell)
    ring.waiting(True)
    outlet.ring_if_waiting()
    assert os.eventfd_read(box.bell) == 1
    box.close()
    outlet.close()


def test_an_inbox_that_cannot_be_made_raises_oserror_and_leaves_no_descriptor(monkeypatch):
    """(The mesh then sends small messages over TCP: it takes OSError for that.)"""
    made = []
    memfd_create = os.memfd_create

    def counted(*args, **kwargs):
        made.append(memfd_create(*args, **kwargs))
        return made[-1]

    def refuse(fd, size):
        raise OSError(27, "File too large")

    monkeypatch.setattr(os, "memfd_create", counted)
    monkeypatch.setattr(os, "ftruncate", refuse)
    with pytest.raises(OSError, match="too large"):
        inbox.Inbox(4)
    with pytest.raises(OSError):
        os.fstat(made[0])  # (closed)


@pytest.mark.timeout(60)
def test_ranks_whose_inbox_cannot_be_made_use_tcp():
    proc = launch(2, "inbox_moments.py", "noinbox", timeout=50)
    assert_ok(proc, 2, "OK")
    assert set(_inbox_counts(proc.stdout).values()) == {0}, proc.stdout


def test_an_outlet_opens_only_an_inbox_and_a_bell():
    box = inbox.Inbox(2)
    with pytest.raises(OSError, match="not an aiocomm inbox"):
        inbox.Outlet(os.getpid(), box.bell, box.bell, 1)  # (the bell where the inbox should be)
    with pytest.raises(OSError, match="no region for rank 5"):
        inbox.Outlet(os.getpid(), box.fd, box.bell, 5)
    with pytest.raises(OSError, match="not an eventfd"):
        inbox.Outlet(os.getpid(), box.fd, box.fd, 1)
    box.close()
