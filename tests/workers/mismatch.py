"""Ranks that disagree: every rank raises MismatchError naming both sides."""

import sys

import numpy as np

import aiocomm

kind = sys.argv[1]
world = aiocomm.init()
n, r = world.size(), world.rank()
x = np.zeros(6, np.float32)
try:
    if kind == "shape":
        aiocomm.all_sum(np.zeros(7 if r == 1 else 6, np.float32), timeout=30)
    elif kind == "dtype":
        aiocomm.all_gather(x.astype(np.float64) if r == 2 else x, timeout=30)
    elif kind == "op":
        (aiocomm.all_max if r == 0 else aiocomm.all_sum)(x, timeout=30)
    elif kind == "skip":
        if r != 0:  # rank 0 skips this all_sum and goes on to the next call
            aiocomm.all_sum(x, timeout=30)
        aiocomm.all_gather(x, timeout=30)
except aiocomm.MismatchError as exc:
    print(f"MISMATCH {exc}", flush=True)
else:
    raise AssertionError("mismatch not detected")
# The group is broken now: later calls fail at once with the same cause.
try:
    aiocomm.all_sum(x, timeout=30)
except aiocomm.MismatchError:
    print("OK broken", flush=True)
