"""Send to the right, then receive from the left, with messages over the
receiver's budget: blocking sends must not wait for the receive (a ring of
them would deadlock).  Blocking face, AIOCOMM_BUFFER_BYTES=4M, 3 MiB messages;
three rounds, so a held copy's bytes must be released for the next."""

import numpy as np

import aiocomm

from rt_common import say

COUNT = (3 << 20) // 8

world = aiocomm.init()
r, n = world.rank(), world.size()
for step in range(3):
    aiocomm.send(np.full(COUNT, float(100 * step + r)), (r + 1) % n, timeout=4)
    y = aiocomm.recv((COUNT,), np.float64, (r - 1) % n, timeout=4)
    want = float(100 * step + (r - 1) % n)
    assert np.all(y == want), f"round {step}: got {y[:3]}, want {want}"
aiocomm.all_sum(np.ones(1), timeout=10)
say("OK ringshift")
