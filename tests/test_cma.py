"""Large point-to-point payloads between ranks of one host are written into
the receive's memory (aiocomm/transport/cma.py): the TCP path's promises at
the same moments, with real processes (tests/workers/cma_moments.py).  The
runtime suites' large sends go this way too, since their ranks share a host."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal

import numpy as np
import pytest

from aiocomm import wire
from aiocomm.transport import cma

from .conftest import WORKERS, assert_ok, killed, launch, thawed


def _across(stdout: str) -> dict[int, list[int]]:
    return {int(m.group(1)): [int(v) for v in m.group(2).split()]
            for m in re.finditer(r"\[rank (\d+)\] .*ACROSS ([\d ]+)", stdout)}


@pytest.mark.timeout(120)
def test_every_pair_in_order_on_both_faces():
    """Every ordered pair of 3 ranks, sizes around the threshold, five
    dtypes, three messages in a row, a receive of the wrong shape first, a
    split group; then the async face with everything in flight at once."""
    proc = launch(3, "cma_moments.py", "pairs", timeout=110)
    assert_ok(proc, 3, "OK")
    across = _across(proc.stdout)
    assert sum(v[-1] for v in across.values()) > 0, f"no payload was written across\n{proc.stdout}"


@pytest.mark.timeout(120)
def test_transport_tcp_writes_nothing_across():
    proc = launch(3, "cma_moments.py", "pairs", timeout=110, env={"AIOCOMM_TRANSPORT": "tcp"})
    assert_ok(proc, 3, "OK")
    assert all(v == [0, 0] for v in _across(proc.stdout).values()), proc.stdout


@pytest.mark.timeout(60)
def test_calls_from_one_thread_after_another():
    """The serialized rule: every call from a thread of its own, in turn."""
    proc = launch(2, "cma_moments.py", "threads", timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "[rank 0] GOT [10, 11, 12, 13]" in proc.stdout and "[rank 1] GOT [0, 1, 2, 3]" in proc.stdout, proc.stdout
    assert " ACROSS 0" not in proc.stdout, proc.stdout  # (each rank had messages written across)


@pytest.mark.timeout(120)
def test_a_late_receive_and_sends_head_to_head():
    """A receive posted after the sender's grace, and both ranks sending
    first (blocking, then async face): the socket's way, intact, no hang."""
    proc = launch(2, "cma_moments.py", "late", timeout=110)
    assert_ok(proc, 2, "OK")


@pytest.mark.timeout(120)
def test_a_posted_receive_is_written_across():
    """With the receive posted first, 64 MiB messages are written straight
    into it (and the kill_mid worker checks every one of them)."""
    proc = launch(2, "cma_moments.py", "kill_mid", "none", timeout=110)
    assert_ok(proc, 2, "DONE")
    m = re.search(r"\[rank 1\] DONE ACROSS (\d+) after (\d+)", proc.stdout)
    assert m is not None and "WRONG" not in proc.stdout, proc.stdout
    assert int(m.group(1)) >= (64 << 20), proc.stdout  # (one late receive may go the socket's way; not all)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("role", ["sender", "receiver"])
def test_a_rank_killed_while_payloads_are_written(tmp_path, role):
    """64 MiB messages written across in a loop; one side SIGKILLs itself at
    a random moment.  The survivor raises PeerLostError naming it within
    5 s, and no message it received before was torn."""
    victim = 0 if role == "sender" else 1
    out, err, died, code = killed(tmp_path, [str(WORKERS / "cma_moments.py"), "kill_mid", role], victim)
    detail = f"{out}\n{err[-3000:]}"
    assert code == -signal.SIGKILL, detail
    assert "WRONG" not in out and "DONE" in out, detail
    m = re.search(r"FAILED (\w+) at ([\d.]+): (.*)", out)
    assert m is not None and m.group(1) == "PeerLostError", detail
    assert f"rank {victim}" in m.group(3), detail
    assert float(m.group(2)) - died < 5.0, "the survivor noticed too late\n" + detail
    if role == "sender":
        assert int(re.search(r"ACROSS (\d+)", out).group(1)) > 0, detail  # it was written across


def _thawed(tmp_path, mode: str, budget: str) -> tuple[str, list[tuple[str, str]], list[int]]:
    """A cma_moments mode whose rank 0 SIGSTOPs itself while rank 1's receives time out (see conftest.thawed)."""
    return thawed(tmp_path, [str(WORKERS / "cma_moments.py"), mode], env={"AIOCOMM_BUFFER_BYTES": budget})


@pytest.mark.timeout(90)
def test_a_receive_that_times_out_before_the_write_loses_nothing(tmp_path):
    """Rank 1's receive offers its memory and times out while rank 0 is
    SIGSTOPped; once thawed, rank 0 writes into that memory (kept alive for
    it) and the message reaches rank 1's next receive intact."""
    seen, outs, codes = _thawed(tmp_path, "stopped", "8M")
    assert "TIMEDOUT" in seen, seen
    assert codes == [0, 0], outs
    m = re.search(r"OK ACROSS (\d+)", outs[1][0])
    assert m is not None and "SENT" in outs[0][0], outs
    assert int(m.group(1)) == 32 << 20, outs  # written into the offered memory, not sent over the socket


@pytest.mark.timeout(60)
def test_messages_given_back_by_two_failed_receives_keep_their_order(tmp_path):
    """Two receives take A and B (their memory offered) and both time out
    while the sender is frozen; thawed, it writes both: the next two
    receives get A, then B."""
    seen, outs, _ = _thawed(tmp_path, "two_stopped", "4M")
    assert "TIMEDOUT 2" in seen, seen
    assert f"GOT [1, 2] ACROSS {8 << 20}" in outs[1][0], outs


@pytest.mark.timeout(60)
def test_a_cancelled_send_is_withdrawn():
    """An async send cancelled while its announcement waits: its array,
    changed by the caller afterwards, is never sent (neither written across
    nor sent over the socket after the grace); the next message comes first."""
    proc = launch(2, "cma_moments.py", "cancel", timeout=50)
    detail = f"{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0 and "[rank 0] CANCELLED" in proc.stdout, detail
    assert "[rank 1] GOT [2]" in proc.stdout, detail  # ([7]: the changed array was sent)


@pytest.mark.timeout(60)
def test_memory_offered_before_a_shutdown_is_never_reused(tmp_path):
    """Rank 1's receive offers its memory and times out while rank 0 is
    frozen; rank 1 shuts aiocomm down and fills new arrays.  Rank 0, thawed,
    may still write into the offered memory: it must not be theirs."""
    seen, outs, _ = _thawed(tmp_path, "shutdown", "8M")
    assert "TIMEDOUT" in seen and "KEPT True" in seen, seen  # (kept for the life of the process)
    assert "CHANGED 0" in outs[1][0], outs


def test_an_offer_names_this_process_the_memory_and_its_mark():
    out = np.zeros(1 << 20, np.uint8)
    host, pid, address, nbytes, mark_at, mark = cma.OFFER.unpack(cma.offer(cma.host_id(), out))
    assert (host, pid, address, nbytes) == (cma.host_id(), os.getpid(), out.ctypes.data, out.nbytes)
    assert ctypes.string_at(mark_at, 16) == mark and len(set(mark)) > 1
    assert wire.Kind.RDONE not in wire.PAYLOAD_KINDS  # RDONE carries no bytes


def test_a_write_into_this_process_and_its_errors():
    """The write itself: into our own memory through our own pid; a wrong
    mark (another program has the pid now: reused, or exec-ed) gets no
    write (ESRCH); an address that is not mapped raises EFAULT, a pid that
    does not exist ESRCH."""
    assert cma.available() is None
    _, _, _, _, mark_at, mark = cma.OFFER.unpack(cma.offer(cma.host_id(), np.zeros(1, np.uint8)))
    src = np.arange(3 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    cma.write(os.getpid(), dst.ctypes.data, src, mark_at, mark)
    assert np.array_equal(dst, src)
    dst[:] = 0
    with pytest.raises(OSError) as info:
        cma.write(os.getpid(), dst.ctypes.data, src, mark_at, bytes(16))
    assert info.value.errno == errno.ESRCH and not dst.any()
    with pytest.raises(OSError) as info:
        cma.write(os.getpid(), dst.ctypes.data, src, 4096, mark)  # (no mark there: another program)
    assert info.value.errno == errno.ESRCH and not dst.any()
    with pytest.raises(OSError) as info:
        cma.write(os.getpid(), 4096, src[:16], mark_at, mark)
    assert info.value.errno == errno.EFAULT
    with pytest.raises(OSError) as info:
        cma.write((1 << 22) + 12345, dst.ctypes.data, src[:16], mark_at, mark)
    assert info.value.errno == errno.ESRCH


def test_a_forked_child_has_a_mark_of_its_own():
    """A child of fork has a copy of its parent's memory: its own offers
    carry a mark of its own (a sender checks the mark against the pid)."""
    parent = cma.OFFER.unpack(cma.offer(0, np.zeros(1, np.uint8)))[5]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, cma.OFFER.unpack(cma.offer(0, np.zeros(1, np.uint8)))[5])
        os._exit(0)
    os.close(w)
    child = os.read(r, 16)
    os.waitpid(pid, 0)
    assert len(child) == 16 and child != parent
