"""Running out of memory while receiving is an exception naming the size.

Rank 1 caps its address space at its current size + 200 MiB and posts a
1 GiB receive that rank 0 sends (zeros: cheap to send).  Rank 1 stays
alive afterwards, so rank 0 can only learn of the failure by being told.
With a third rank, rank 2 waits meanwhile for a message from rank 0 that
never comes: it too can only learn of the failure from the group's abort.
"""

import resource
import time

import numpy as np

import aiocomm

from rt_common import report, say, status_kib, wait_go

N = 1 << 30
world = aiocomm.init()
r = world.rank()
aiocomm.all_sum(np.ones(1, np.float32), timeout=30)
if r == 1:
    cap = (status_kib("VmSize") << 10) + (200 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    say(f"CAPPED address space at {cap >> 20} MiB")
    t0 = time.monotonic()
    try:
        a = aiocomm.recv((N,), np.uint8, 0)
        say(f"RESULT received {a.nbytes} bytes")
    except BaseException as exc:
        report(exc, t0)
    wait_go()  # stay alive (and connected) until the test has seen rank 0's outcome
elif r == 2:
    t0 = time.monotonic()
    try:
        aiocomm.recv((1,), np.float32, 0, timeout=40)
        say("RESULT rank 2's recv returned")
    except BaseException as exc:
        report(exc, t0)
else:
    x = np.zeros(N, np.uint8)
    t0 = time.monotonic()
    try:
        aiocomm.send(x, 1)
        say("RESULT send returned")
    except BaseException as exc:
        report(exc, t0)
say("DONE")
