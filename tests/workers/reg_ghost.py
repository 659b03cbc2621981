"""A large (announced) send that times out must not leave its announcement at
the receiver: the receiver's next recv gets the next message, not a wait for
a payload that never comes.  Blocking face, 2 ranks, AIOCOMM_BUFFER_BYTES=1M."""

import numpy as np

import aiocomm

from rt_common import say

N = 1 << 18  # 2 MiB of float64: over the 1M budget (and what this rank may hold), so announced (RTS)

world = aiocomm.init()
r = world.rank()
assert world.size() == 2
if r == 0:
    try:
        aiocomm.send(np.full(N, 1.0), 1, timeout=0.5)  # rank 1 posts no receive in time
        say("RESULT first send returned")
    except aiocomm.CommTimeoutError as exc:
        say("first send timed out:", type(exc).__name__)
    # On the same connection as what the failed send left behind: once rank 1
    # has this all_sum, it has seen everything rank 0 sent before it.
    aiocomm.all_sum(np.ones(1), timeout=10)
    aiocomm.send(np.full(N, 2.0), 1, timeout=10)
    aiocomm.all_sum(np.ones(1), timeout=10)
    say("OK ghost")
else:
    aiocomm.all_sum(np.ones(1), timeout=10)  # returns only after rank 0's first send gave up
    try:
        y = aiocomm.recv((N,), np.float64, 0, timeout=3)
    except aiocomm.CommError as exc:
        raise SystemExit(f"recv after the failed send: {type(exc).__name__}: {exc}") from exc
    assert np.all(y == 2.0), f"recv got {y[:3]}, not the second message (2.0)"
    aiocomm.all_sum(np.ones(1), timeout=10)
    say("OK ghost")
