"""A rank dies (SIGKILL) or freezes (SIGSTOP) mid-collective; survivors report."""

import atexit
import os
import signal
import sys
import time

import numpy as np

# Registered before aiocomm's own exit handler, so it runs after it: when aiocomm's close has ended.
atexit.register(lambda: print(f"EXITED at {time.time():.3f}", flush=True))

import aiocomm  # noqa: E402

mode, victim = sys.argv[1], int(sys.argv[2])
world = aiocomm.init()
r = world.rank()
x = np.ones(1 << 18, np.float32)
for i in range(10_000):
    if r == victim and i == 20:
        os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
    try:
        # "stop" takes its timeout from AIOCOMM_TIMEOUT, "stop-call" per call.
        aiocomm.all_sum(x, timeout=2 if mode == "stop-call" else None)
    except aiocomm.CommError as exc:
        t = time.time()
        print(f"FAILED {type(exc).__name__} at {t:.3f}: {exc}", flush=True)
        # Later calls fail at once with the same cause.
        start = time.monotonic()
        try:
            aiocomm.all_sum(x)
        except aiocomm.CommError as again:
            assert type(again) is type(exc), (again, exc)
            assert time.monotonic() - start < 0.5
        print("DONE", flush=True)
        sys.exit(0)
