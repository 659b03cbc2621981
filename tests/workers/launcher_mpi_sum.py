"""Every rank sums its rank + 1 over MPI and prints the sum, the backend
and its own arguments (tests/test_mpi.py runs it under aiocomm-launch --backend mpi)."""

import sys

import numpy as np

import aiocomm

world = aiocomm.init(strict=True)
total = aiocomm.all_sum(np.array([world.rank() + 1]))
print("SUM", total.tolist(), world.engine.backend.name, "ARGS", sys.argv[1:], flush=True)
