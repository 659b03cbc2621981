"""A fork child of a rank must be refused (RuntimeError or CommError naming
fork), must be able to exit, and must not disturb its parent's world."""

import asyncio
import os
import signal
import sys
import time

import numpy as np

import aiocomm

from rt_common import say

world = aiocomm.init()
r = world.rank()


def step(i: int) -> None:
    y = aiocomm.all_sum(np.full(4, i + r, np.int64), timeout=30)
    want = 2 * i + 1
    # and a small message each way (between ranks of one host: through the inbox, see transport/inbox.py)
    if r == 0:
        aiocomm.send(np.full(3, 10 * i, np.int32), 1, timeout=30)
        got = aiocomm.recv((3,), np.int32, 1, timeout=30)
    else:
        got = aiocomm.recv((3,), np.int32, 0, timeout=30)
        aiocomm.send(np.full(3, 10 * i, np.int32), 0, timeout=30)
    if not np.array_equal(y, np.full(4, want)) or not np.array_equal(got, np.full(3, 10 * i)):
        say(f"WRONG step {i}: {y.tolist()} != {want} or {got.tolist()}")
    else:
        say(f"STEP {i} ok")


step(0)

if r == 1:
    for i in range(1, 8):
        step(i)
    say("DONE")
    sys.exit(0)

t_fork = time.monotonic()
pid = os.fork()
if pid == 0:  # the child
    calls = (
        ("all_sum", lambda: aiocomm.all_sum(np.ones(4, np.int64), timeout=5)),
        ("init", lambda: aiocomm.init()),
        ("agree", lambda: world.agree(True, timeout=5)),
        ("shrink", lambda: world.shrink(timeout=5)),
        ("split", lambda: world.split(0, timeout=5)),
        ("barrier", lambda: aiocomm.barrier(timeout=5)),
        ("send_obj", lambda: aiocomm.send_obj({"a": 1}, 1, timeout=5)),
        ("send", lambda: aiocomm.send(np.full(3, -1, np.int32), 1, timeout=5)),
        ("recv", lambda: aiocomm.recv((3,), np.int32, 1, timeout=5)),
        ("broadcast_obj", lambda: aiocomm.broadcast_obj([1, 2], 0, timeout=5)),
        ("average_gradients", lambda: aiocomm.average_gradients({"w": np.ones(3)})),
        ("aio.all_sum", lambda: asyncio.run(aiocomm.aio.all_sum(np.ones(4, np.int64), timeout=5))),
    )
    for what, call in calls:
        t0 = time.monotonic()
        try:
            call()
            say(f"CHILD {what} RESULT returned normally after {time.monotonic() - t0:.3f}s")
        except BaseException as exc:
            ok_type = isinstance(exc, (RuntimeError, aiocomm.CommError))
            msg = str(exc).replace("\n", " | ")
            say(f"CHILD {what} RAISED {type(exc).__name__} ok_type={ok_type} "
                f"fork={'fork' in msg.lower()} after {time.monotonic() - t0:.3f}s: {msg}")
    say("CHILD EXITING")
    sys.exit(0)

# the parent: keep using the world while the child tries, then reap the child
for i in range(1, 6):
    step(i)
deadline = time.monotonic() + 10
status = None
while time.monotonic() < deadline:
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = st
        break
    time.sleep(0.02)
if status is None:
    say(f"CHILD-HUNG still alive {time.monotonic() - t_fork:.1f}s after fork; killing it")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
else:
    code = os.waitstatus_to_exitcode(status)
    say(f"CHILD-REAPED code={code} after {time.monotonic() - t_fork:.3f}s")
for i in range(6, 8):
    step(i)
say("DONE")
