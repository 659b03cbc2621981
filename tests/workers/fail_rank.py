"""Rank 1 fails (exit code or signal); the others would run for a long time."""

import os
import signal
import sys
import time

import aiocomm

how = sys.argv[1]
world = aiocomm.init()
print(f"pid {os.getpid()}", flush=True)
if world.rank() == 1 and how != "none":
    time.sleep(0.3)
    if how == "exit":
        sys.exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)
