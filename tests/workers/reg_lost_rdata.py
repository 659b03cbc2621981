"""A receive that times out after it claimed an announced message (CTS sent,
payload not in yet) must not lose it: the next recv gets that message and the
one after gets the next.  Async face, 2 ranks, AIOCOMM_BUFFER_BYTES=1M;
argv[1] names two files: argv[1] + ".busy", which rank 0 creates when its loop
stops reading, and argv[1], which rank 1 creates once its first recv failed."""

import asyncio
import os
import sys
import time

import numpy as np

import aiocomm
import aiocomm.aio as aio

from rt_common import say

N = 1 << 18  # 2 MiB of float64: over the 1M budget, so announced (RTS/CTS/RDATA)
FLAG = sys.argv[1]


async def main() -> None:
    world = await aio.init()
    r = world.rank()
    assert world.size() == 2
    if r == 0:
        first = asyncio.ensure_future(aio.send(np.full(N, 7.0), 1, timeout=30))
        await asyncio.sleep(0.05)  # its RTS is written
        # This rank's loop is busy (as with GIL-bound work): rank 1's CTS waits
        # unread until rank 1's receive has given up.
        open(FLAG + ".busy", "w").close()
        end = time.monotonic() + 15
        while not os.path.exists(FLAG) and time.monotonic() < end:
            time.sleep(0.01)
        await first
        await aio.send(np.full(N, 8.0), 1, timeout=30)
        await aio.all_sum(np.ones(1), timeout=30)
        say("OK lost_rdata")
    else:
        box = aio._engine.mesh.matcher.boxes[0]
        for _ in range(1000):  # until rank 0 is busy and its announcement is in: the receive claims it at once
            if box.arrived and os.path.exists(FLAG + ".busy"):
                break
            await asyncio.sleep(0.005)
        try:
            await aio.recv((N,), np.float64, 0, timeout=0.3)
            say("RESULT first recv returned")
        except aiocomm.CommTimeoutError:
            say("first recv timed out")
        open(FLAG, "w").close()
        y = await aio.recv((N,), np.float64, 0, timeout=10)
        assert np.all(y == 7.0), f"second recv got {y[:3]}, not the message the failed recv claimed (7.0)"
        z = await aio.recv((N,), np.float64, 0, timeout=10)
        assert np.all(z == 8.0), f"third recv got {z[:3]}, not 8.0"
        await aio.all_sum(np.ones(1), timeout=30)
        say("OK lost_rdata")


asyncio.run(main())
