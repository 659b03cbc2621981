"""Print where this rank listens, then take part in an all_sum."""

import os
import sys

import numpy as np

import aiocomm
from aiocomm import config

world = aiocomm.init(strict=True)
addresses = config.read_hostfile(os.environ["AIOCOMM_HOSTFILE"])
marker = sys.argv[1] if len(sys.argv) > 1 else ""
total = aiocomm.all_sum(np.array([1]))
print(f"RANK {world.rank()} OF {world.size()} AT {addresses[world.rank()][0][0]} SUM {total[0]} {marker}", flush=True)
if len(sys.argv) > 2 and int(sys.argv[2]) == world.rank():
    sys.exit(3)
if len(sys.argv) > 3:
    import time
    time.sleep(float(sys.argv[3]))
