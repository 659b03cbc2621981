"""Flow control must not hold up collectives (async face).

Rank 0 sends 3 x 64 MiB to rank 1 from a task while it awaits 5 all_sums;
rank 1 does the 5 all_sums first and only then receives the 3 messages.
"""

import asyncio
import time

import numpy as np
import uvloop

from aiocomm import aio

from rt_common import report, say

SIZE = 64 << 20


async def main() -> None:
    world = await aio.init()
    r = world.rank()
    await aio.all_sum(np.ones(1, np.float32), timeout=30)
    t0 = time.monotonic()
    try:
        if r == 0:
            async def sender() -> None:
                for i in range(3):
                    await aio.send(np.full(SIZE, i + 1, np.uint8), 1, timeout=60)
                    say(f"SENT {i} at {time.monotonic() - t0:.2f}s")

            task = asyncio.create_task(sender())
            await asyncio.sleep(0.2)  # the first message is on its way
        for k in range(5):
            y = await aio.all_sum(np.array([k, r], np.int64), timeout=30)
            ok = y.tolist() == [2 * k, 1]
            say(f"ALLSUM {k} {'ok' if ok else 'WRONG ' + str(y.tolist())} at {time.monotonic() - t0:.2f}s")
        if r == 0:
            await asyncio.wait_for(task, 60)
        else:
            for i in range(3):
                a = await aio.recv((SIZE,), np.uint8, 0, timeout=60)
                ok = a[0] == i + 1 and a[-1] == i + 1 and bool((a == i + 1).all())
                say(f"RECV {i} {'ok' if ok else 'WRONG'} at {time.monotonic() - t0:.2f}s")
        say("ALL-OK")
    except Exception as exc:
        report(exc, t0)
    say("DONE")


uvloop.run(main())
