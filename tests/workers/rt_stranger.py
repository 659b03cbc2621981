"""Thousands of idle stranger connections cost rank 0 little memory and
do not stop the world from working."""

import os
import time

import numpy as np

import aiocomm

from rt_common import raise_nofile, report, say, status_kib, wait_go

raise_nofile()
world = aiocomm.init()
r = world.rank()
aiocomm.all_sum(np.ones(1, np.float32), timeout=30)
if r == 0:
    say(f"RSS-BEFORE-KIB {status_kib('VmRSS')} FDS {len(os.listdir('/proc/self/fd'))}")
say("READY")
wait_go()
if r == 0:
    time.sleep(1.5)  # let the loop take in the connections
    say(f"RSS-AFTER-KIB {status_kib('VmRSS')} FDS {len(os.listdir('/proc/self/fd'))}")
t0 = time.monotonic()
try:
    y = aiocomm.all_sum(np.full(4, r + 1, np.float32), timeout=20)
    say(f"ALLSUM {'ok' if y.tolist() == [3.0] * 4 else 'WRONG ' + str(y.tolist())} in {time.monotonic() - t0:.2f}s")
except Exception as exc:
    report(exc, t0)
if r == 0:
    say(f"RSS-END-KIB {status_kib('VmRSS')}")
say("DONE")
