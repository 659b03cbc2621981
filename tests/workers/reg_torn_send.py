"""A send that times out while part of the array still waits in the
transport's buffer (the receiver is frozen): the caller then changes the
array.  The receiver, thawed, must never get a mix of old and new bytes: the
connection to it is closed instead, and its receive fails naming rank 0."""

import os
import signal
import subprocess
import time

import numpy as np

import aiocomm

world = aiocomm.init()
r = world.rank()
N = 8 << 20  # float32: 32 MiB, well within the receiver's budget (sent eagerly), far beyond socket buffers
aiocomm.all_sum(np.zeros(1))
if r == 1:
    subprocess.Popen(["sh", "-c", f"sleep 3; kill -CONT {os.getpid()}"])
    os.kill(os.getpid(), signal.SIGSTOP)
    try:
        got = aiocomm.recv((N,), np.float32, 0, timeout=20)
    except aiocomm.PeerLostError as exc:
        assert exc.culprit == 0, exc
        print("recv failed: PeerLostError", flush=True)
    else:
        assert (got == 1).all(), f"torn message: {np.count_nonzero(got != 1)} of {N} values changed after the send"
        print("recv got the whole message", flush=True)
else:
    time.sleep(0.5)
    x = np.ones(N, np.float32)
    try:
        aiocomm.send(x, 1, timeout=1.0)
    except aiocomm.CommTimeoutError:
        print("send timed out", flush=True)
    else:
        print("send completed", flush=True)
    x[:] = -1.0  # the caller's array again
    time.sleep(6)
print("OK", flush=True)
