"""Exits as told, without MPI: ``exit_as_told.py [RANK=CODE ...]`` (the
rank from ``OMPI_COMM_WORLD_RANK``; a rank not named exits 0, a second
after the named ones, so that they fail first)."""

import os
import sys
import time

rank = os.environ["OMPI_COMM_WORLD_RANK"]
codes = dict(arg.split("=") for arg in sys.argv[1:])
if rank not in codes:
    time.sleep(1)
print(f"ended {codes.get(rank, '0')}", flush=True)
sys.exit(int(codes.get(rank, "0")))
