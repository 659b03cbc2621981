"""The blocking face from a plain script, a thread and a running event loop."""

import asyncio
import gc
import os
import threading
import time

import numpy as np

import aiocomm
from aiocomm import aio

from common import check

world = aiocomm.init()
n, r = world.size(), world.rank()
assert aiocomm.init() is world  # same world, no new connections
want = np.full(4, sum(range(n)), np.float32)

check(aiocomm.all_sum(np.full(4, r, np.float32)), want, "plain script")

results = []
# Threads follow MPI's serialized rule: a thread may call on the world after
# the main thread's call returned (the program orders the calls).
t = threading.Thread(target=lambda: results.append(aiocomm.all_sum(np.full(4, r, np.float32))))
t.start()
t.join(60)
check(results[0], want, "from a thread, after the main thread")
mine = world.split(0)
t = threading.Thread(target=lambda: results.append(aiocomm.all_sum(np.full(4, r, np.float32), group=mine)))
t.start()
t.join(60)
check(results[1], want, "from a thread, on its own group")

# Many short-lived calling threads: each gets its own wake-up eventfd, which
# must close when the thread is gone (no descriptor leak).
groups = [world.split(0) for _ in range(30)]
fds_before = len(os.listdir("/proc/self/fd"))
for i in range(30):
    t = threading.Thread(target=lambda i=i: results.append(aiocomm.all_sum(np.full(4, r, np.float32), group=groups[i])))
    t.start()
    t.join(60)
    check(results[-1], want, f"from short-lived thread {i}")
# The loop thread may still be finishing the last call's step (it holds
# that call's waiter until the step returns) when the thread's join returns:
# give it a moment; a real leak keeps one descriptor per thread forever.
for _ in range(200):
    gc.collect()
    fds_after = len(os.listdir("/proc/self/fd"))
    if fds_after <= fds_before:
        break
    time.sleep(0.01)
assert fds_after <= fds_before, f"rank {r}: {fds_after - fds_before} descriptors leaked by calling threads"


async def inside_loop() -> None:
    # A program whose own thread runs a loop (Jupyter): the blocking face still works.
    check(aiocomm.all_sum(np.full(4, r, np.float32)), want, "inside a running loop")
    # ... and so does the async face, forwarded to the loop that owns the connections.
    many = await asyncio.gather(*(aio.all_sum(np.full(3, r * i, np.int32)) for i in range(20)))
    for i, got in enumerate(many):
        check(got, np.full(3, i * sum(range(n)), np.int32), f"concurrent collective {i}")


asyncio.run(inside_loop())
print("OK faces", flush=True)
