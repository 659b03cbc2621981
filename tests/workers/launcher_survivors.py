"""Ranks that end as told, after forming the world (one all_sum), with no
communication after: ``launcher_survivors.py [RANK=HOW@SECONDS ...] [MARKER]``.

HOW is ``kill`` (SIGKILL itself) or an exit code; SECONDS count from the
all_sum.  A rank not named exits 0 after ``AIOCOMM_TEST_LINGER`` seconds
(default 2).  With ``AIOCOMM_TEST_RECORD=S``, every rank still running
writes its record (aiocomm.trace) S seconds after the all_sum, as the
runtime does on a failure.  Each rank prints its pid, and ``carried on``
with the launcher's ``AIOCOMM_ON_FAILURE`` when it ends on its own.
"""

import os
import signal
import sys
import time

import numpy as np

import aiocomm
from aiocomm import trace

world = aiocomm.init(strict=True)
rank = world.rank()
plan = {int(r): how.split("@") for r, eq, how in (arg.partition("=") for arg in sys.argv[1:]) if eq}
how, seconds = plan.get(rank, ["0", os.environ.get("AIOCOMM_TEST_LINGER", "2")])
aiocomm.all_sum(np.ones(1))
start = time.monotonic()
print(f"pid {os.getpid()}", flush=True)
record = os.environ.get("AIOCOMM_TEST_RECORD")
if record and float(record) < float(seconds):
    time.sleep(float(record))
    trace.write("test: a failure the job carries on after")
time.sleep(max(0.0, start + float(seconds) - time.monotonic()))
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
print(f"carried on {os.environ.get('AIOCOMM_ON_FAILURE')}", flush=True)
sys.exit(int(how))
