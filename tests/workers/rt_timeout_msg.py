"""Timeout messages say how long and how to change it; a later call on the
broken group says so and chains the first error.  Rank 1 never calls."""

import time

import numpy as np

import aiocomm

from rt_common import report, say

world = aiocomm.init()
r = world.rank()
aiocomm.all_sum(np.ones(1, np.float32), timeout=30)
if r == 1:
    time.sleep(8)
    say("DONE")
    raise SystemExit(0)
x = np.ones(4, np.float32)
first = None
t0 = time.monotonic()
try:
    aiocomm.all_sum(x, timeout=1.5)
    say("RESULT first all_sum returned")
except Exception as exc:
    first = exc
    report(exc, t0, tag="first")
t0 = time.monotonic()
try:
    aiocomm.all_sum(x, timeout=5)
    say("RESULT second all_sum returned")
except Exception as exc:
    c, seen, chained = exc.__cause__, set(), False
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        if c is first or (first is not None and type(c) is type(first) and str(c) == str(first)):
            chained = True
        c = c.__cause__
    report(exc, t0, tag="second", chained_to_first=chained)
say("DONE")
