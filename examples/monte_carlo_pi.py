"""Estimate pi with all_sum: the smallest aiocomm program.

    aiocomm-launch -n 4 examples/monte_carlo_pi.py [samples-per-rank]
"""

import sys

import numpy as np

import aiocomm

world = aiocomm.init()
samples = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
rng = np.random.default_rng(seed=world.rank())
points = rng.random((samples, 2))
inside = np.count_nonzero((points**2).sum(axis=1) <= 1.0)

totals = aiocomm.all_sum(np.array([inside, samples], dtype=np.int64))
pi = 4 * totals[0] / totals[1]
if world.rank() == 0:
    print(f"pi ~= {pi:.5f} from {totals[1]} samples on {world.size()} ranks (error {abs(pi - np.pi):.1e})")
