"""aio.shutdown() ends the operations still waiting (with CommError), rather
than leaving them pending forever.  2 ranks."""

import asyncio
import time

import numpy as np

import aiocomm
import aiocomm.aio as aio

from rt_common import say


async def main() -> None:
    world = await aio.init()
    r = world.rank()
    assert world.size() == 2
    await aio.all_sum(np.ones(1), timeout=10)
    if r == 0:
        pending = asyncio.ensure_future(aio.recv((4,), np.float64, 1, timeout=60))  # rank 1 sends nothing
        await asyncio.sleep(0.2)
        await aio.shutdown()
        t0 = time.monotonic()
        done, _ = await asyncio.wait([pending], timeout=3)
        if not done:
            say(f"recv STILL PENDING {time.monotonic() - t0:.1f}s after shutdown")
            pending.cancel()
            return
        exc = pending.exception()
        assert isinstance(exc, aiocomm.CommError), repr(exc)
        say("recv after shutdown ended:", repr(exc))
        say("OK shutdown")
    else:
        # Stay up until rank 0 has closed its side (this receive fails then), so
        # that this rank's exit cannot be what ends rank 0's waiting receive.
        try:
            await aio.recv((4,), np.float64, 0, timeout=15)
            say("RESULT recv returned")
        except aiocomm.CommError as exc:
            say("rank 0 closed:", type(exc).__name__)
        say("OK shutdown")


asyncio.run(main())
