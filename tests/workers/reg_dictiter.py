"""Concurrent async collectives on one group: a flush waits for a drain while
another collective opens a new peer for the group (the group's dict of
streams grows under the flush).  4 ranks; rank 1 stops reading for a second,
so rank 0's stream to it is paused when rank 0 starts an all_gather that
opens rank 3."""

import asyncio
import time

import numpy as np

import aiocomm.aio as aio

from rt_common import say

MIB = 16  # the big all_gather's MiB per rank: more than loopback sockets hold


async def main() -> None:
    world = await aio.init()
    r, n = world.rank(), world.size()
    assert n == 4
    mesh = aio._engine.mesh
    await aio.all_sum(np.ones(1), timeout=30)
    big = np.full(MIB << 17, float(r))
    b = asyncio.ensure_future(aio.all_gather(big, timeout=60))  # ring: rank r opens r + 1
    a = asyncio.ensure_future(aio.all_sum(np.ones(4), timeout=60))  # recursive doubling: opens r^1, r^2
    if r == 1:
        await asyncio.sleep(0.05)
        time.sleep(1.0)  # this rank's loop reads nothing: rank 0's writes to it back up
    if r == 0:
        right = mesh.connections.outgoing[1]
        for _ in range(1000):  # until a flush waits for that stream to drain
            if right._drains:
                break
            await asyncio.sleep(0.001)
        assert right._drains, "no flush waited for a drain: the test did not set up the race"
        assert 3 not in world.streams, sorted(world.streams)
    c = asyncio.ensure_future(aio.all_gather(np.full(2, float(r)), timeout=60))  # opens every peer
    res = await asyncio.gather(b, a, c, return_exceptions=True)
    errors = [f"{type(x).__name__}: {x}" for x in res if isinstance(x, BaseException)]
    assert not errors, errors
    gathered, summed, small = res
    assert np.array_equal(gathered, np.repeat(np.arange(n, dtype=np.float64), big.size)), "all_gather(big) wrong"
    assert np.array_equal(summed, np.full(4, float(n))), summed
    assert np.array_equal(small, np.repeat(np.arange(n, dtype=np.float64), 2)), small
    await aio.all_sum(np.ones(1), timeout=30)
    say("OK dictiter")


asyncio.run(main())
