"""Rank ``argv[1]`` exits with status 7 right after init(); the others enter all_sum
and fail because of it (often before it has finished exiting)."""

import sys

import numpy as np

import aiocomm

world = aiocomm.init()
if world.rank() == int(sys.argv[1]):
    raise SystemExit(7)
aiocomm.all_sum(np.ones(4))
