"""Lines far longer than a pipe's atomic write: 'rank R line I <n x's> end'."""

import os
import sys

rank = os.environ["AIOCOMM_RANK"]
for i, size in enumerate([5000, 70_000, 300_000, 4097, 1_000_000, 12_345]):
    sys.stdout.write(f"rank {rank} line {i} " + "x" * size + " end\n")
sys.stdout.flush()
