"""The MPI backend at unusual moments, one scenario per run (argv[1]):

withdraw  a large send that times out before the receiver asked for it is
          withdrawn: the receiver gets the next message, never the buffer
          the sender changed after the timeout
stall     the receiver freezes (SIGSTOP) after asking for a large message;
          the sender times out mid-transfer, changes its buffer and sends
          another: the receiver, thawed, throws the torn one away
exit      a rank leaves (``raise SystemExit(3)``) while the others wait for
          it in a collective and a receive: they hear at once, and still
          receive what it sent before leaving
threads   16 groups, one thread each, large collectives (run by MPI's blocking
          calls in each group's worker thread) started in opposite orders on
          the two ranks, all in flight at once
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import aiocomm

from common import check

world = aiocomm.init(strict=True)
n, r = world.size(), world.rank()
scenario = sys.argv[1]
BIG = (1 << 20,)  # float64: 8 MiB, above the eager size



def send_timing_out(x, timeout):
    """Send ``x`` to rank 1, which does not take it in time: the seconds until CommTimeoutError."""
    start = time.monotonic()
    try:
        aiocomm.send(x, 1, timeout=timeout)
    except aiocomm.CommTimeoutError:
        return time.monotonic() - start
    raise AssertionError("a send rank 1 did not take did not time out")


if scenario == "withdraw":
    if r == 0:
        x = np.full(BIG, 1.0)
        assert send_timing_out(x, 0.5) < 2.0
        x[:] = -1.0  # the caller owns x again
        aiocomm.send(np.full(BIG, 2.0), 1)
    elif r == 1:
        time.sleep(1.5)
        check(aiocomm.recv(BIG, np.float64, 0), np.full(BIG, 2.0), "the message after a withdrawn one")

elif scenario == "stall":
    big = (8 << 20,)  # 64 MiB
    if r == 0:
        x = np.full(big, 1.0)
        took = send_timing_out(x, 0.7)
        assert 0.6 < took < 2.0, took
        x[:] = -1.0  # MPI may still be reading x: the receiver must throw those bytes away
        aiocomm.send(np.full(big, 3.0), 1)
    elif r == 1:
        from aiocomm.backends.mpi import p2p

        subprocess.Popen(["sh", "-c", f"sleep 2; kill -CONT {os.getpid()}"])
        accepted = p2p.Accepted.__init__

        def freeze_once(self, *args):
            accepted(self, *args)
            p2p.Accepted.__init__ = accepted
            os.kill(os.getpid(), signal.SIGSTOP)  # the CTS has gone: the data is on its way

        p2p.Accepted.__init__ = freeze_once
        check(aiocomm.recv(big, np.float64, 0), np.full(big, 3.0), "the message after a torn one")

elif scenario == "exit":
    if r == 2:
        for i in range(3):
            aiocomm.send(np.full(4, i), 0)
        raise SystemExit(0)  # a clean exit, while the others still wait for this rank
    if r == 0:
        time.sleep(0.5)
        for i in range(3):
            check(aiocomm.recv((4,), np.full(4, 0).dtype, 2), np.full(4, i), f"message {i} sent before leaving")
        start = time.monotonic()
        try:
            aiocomm.recv((4,), np.full(4, 0).dtype, 2)
        except aiocomm.PeerLostError as exc:
            assert exc.culprit == 2 and "rank 2 has exited" in str(exc), exc
            print(f"recv heard in {time.monotonic() - start:.3f}s", flush=True)
        else:
            raise AssertionError("a receive from a rank that left did not fail")
        # Rank 1 fails its all_sum because of rank 2 and leaves meanwhile: the
        # cause is still rank 2, the first to leave (a loaded CI run named rank 1).
        time.sleep(1.0)
    else:
        time.sleep(0.3)  # rank 2's exit is heard before this all_sum begins (as under load)
    start = time.monotonic()
    try:
        aiocomm.all_sum(np.ones(3))
    except aiocomm.PeerLostError as exc:
        assert exc.culprit == 2 and "rank 2 has exited without starting" in str(exc), exc
        assert time.monotonic() - start < 5.0
        print(f"all_sum heard in {time.monotonic() - start:.3f}s", flush=True)
    else:
        raise AssertionError("a collective without a rank that left did not fail")
    print("OK mpi_faults", flush=True)
    sys.exit(0)  # the group the two shared waits for the rank that left: nothing more to do here

elif scenario == "threads":
    groups = [world.split(0) for _ in range(16)]
    failures = []

    def work(i):
        try:
            x = np.full(64 << 10, float(i), np.float32)  # 256 KiB: aiocomm's halving, in this thread
            check(aiocomm.all_sum(x, group=groups[i], timeout=20), np.full(64 << 10, i * n, np.float32), f"g{i}")
            # MPI's blocking all-gather, in the group's worker thread
            check(aiocomm.all_gather(x, group=groups[i], timeout=20), np.full(n << 16, float(i), np.float32),
                  f"g{i} all_gather")
        except BaseException as exc:
            failures.append((i, exc))

    order = range(16) if r == 0 else range(15, -1, -1)
    threads = []
    for i in order:
        threads.append(threading.Thread(target=work, args=(i,)))
        threads[-1].start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert not failures, failures

aiocomm.all_sum(np.zeros(1))
print("OK mpi_faults", flush=True)
