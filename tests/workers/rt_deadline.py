"""timeout= is a deadline for the whole operation, not per piece of data.

Both ranks loop 64 MiB all_sums; rank 0 with timeout=2, rank 1 with a long
one.  The test keeps freezing rank 1 for 1.5 s at a time, thawing it for a
moment in between, so data trickles in under the per-piece timeout.
"""

import time

import numpy as np

import aiocomm

from rt_common import report, say

world = aiocomm.init()
r = world.rank()
x = np.ones(16 << 20, np.float32)  # 64 MiB
aiocomm.all_sum(x, timeout=60)
say("LOOPING")
for k in range(200):
    t0 = time.monotonic()
    try:
        y = aiocomm.all_sum(x, timeout=2 if r == 0 else 60)
    except Exception as exc:
        report(exc, t0, op=k)
        break
    say(f"OP {k} {time.monotonic() - t0:.3f} {'ok' if y[0] == 2 and y[-1] == 2 else 'WRONG'}")
say("DONE")
