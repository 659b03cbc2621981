"""Writes lines as fast as it can, for a long time (no communication)."""

import os
import sys

rank = os.environ["AIOCOMM_RANK"]
print(f"pid {os.getpid()}", flush=True)
for i in range(10_000_000):
    sys.stdout.write(f"rank {rank} line {i}\n")
