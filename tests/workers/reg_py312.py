"""The blocking face forms the world and runs calls on its private loop.
Python 3.12's asyncio.wait_for needs a current task ("Timeout should be used
inside a task"); with --strict-wait-for this interpreter's wait_for is made
to check that too, so the rule holds on any Python."""

import asyncio
import sys

if "--strict-wait-for" in sys.argv:
    _wait_for = asyncio.wait_for

    async def wait_for(fut, timeout):
        if asyncio.current_task() is None:  # what Python 3.12's asyncio.timeout() raises
            if asyncio.iscoroutine(fut):
                fut.close()
            raise RuntimeError("Timeout should be used inside a task")
        return await _wait_for(fut, timeout)

    asyncio.wait_for = wait_for

import numpy as np

import aiocomm

from rt_common import say

world = aiocomm.init()
r, n = world.rank(), world.size()
assert np.array_equal(aiocomm.all_sum(np.ones(2)), np.full(2, float(n)))
assert aiocomm.all_gather(np.ones(1)).shape == (n,)
if r == 0:
    aiocomm.send(np.arange(3.0), n - 1)  # a peer that is not a neighbour on 3+ ranks
if r == n - 1:
    assert np.array_equal(aiocomm.recv((3,), np.float64, 0), np.arange(3.0))
aiocomm.all_sum(np.ones(1))
say(f"OK py312 {sys.version_info[:2]}")
