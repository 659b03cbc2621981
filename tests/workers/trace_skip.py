"""Rank SKIP_RANK (argv[1]) skips the 5th all_sum of the world and goes on to
the 6th, then stays out of aiocomm (sleeps): the others wait in their 6th
all_sum until AIOCOMM_TIMEOUT.  argv[2] "aio" uses the async face."""

import asyncio
import sys
import time

import numpy as np

import aiocomm
import aiocomm.aio

skip_rank = int(sys.argv[1])
face = sys.argv[2] if len(sys.argv) > 2 else "blocking"
world = aiocomm.init(strict=True, backend=sys.argv[3] if len(sys.argv) > 3 else "any")
x = np.ones(4, np.float32)
calls = [i for i in range(6) if not (world.rank() == skip_rank and i == 4)]
if face == "aio":
    async def run() -> None:
        for _ in calls:
            await aiocomm.aio.all_sum(x)
    asyncio.run(run()) if world.engine.loop is None else aiocomm._blocking_call("run", run)
else:
    for _ in calls:
        aiocomm.all_sum(x)
print("LOOP DONE", flush=True)
if world.rank() == skip_rank:
    time.sleep(60)  # somewhere else, out of aiocomm
