"""An asyncio program: the world lives on its loop; blocking calls there refuse."""

import asyncio

import numpy as np
import uvloop

import aiocomm
from aiocomm import aio

from common import check


async def main() -> None:
    world = await aio.init()
    assert await aio.init() is world
    n, r = world.size(), world.rank()
    # Several collectives from different tasks at once, their messages never mixing.
    coros = []
    for i in range(10):
        coros.append(aio.all_sum(np.full((100, 7), i + r, np.float64)))
        coros.append(aio.all_gather(np.full(3, i * 100 + r, np.int16)))
    results = await asyncio.gather(*coros)
    for i in range(10):
        check(results[2 * i], np.full((100, 7), n * i + sum(range(n)), np.float64), f"task sum {i}")
        check(results[2 * i + 1], np.repeat(np.arange(n, dtype=np.int16) + i * 100, 3), f"task gather {i}")
    # A blocking call on the loop that owns the connections would deadlock: it raises.
    try:
        aiocomm.all_sum(np.zeros(2))
    except RuntimeError as exc:
        assert "deadlock" in str(exc) and "aiocomm.aio.all_sum" in str(exc), exc
    else:
        raise AssertionError("blocking call on the owning loop did not raise")
    # From another thread, the blocking face is forwarded to this loop; that
    # thread gets a group of its own (the world's collectives belong to this one).
    theirs = await aio.split(0)
    got = await asyncio.get_running_loop().run_in_executor(
        None, lambda: aiocomm.all_max(np.array([r, 5]), group=theirs))
    check(got, np.array([n - 1, 5]), "blocking face from a worker thread")
    print("OK async", flush=True)


uvloop.run(main())
