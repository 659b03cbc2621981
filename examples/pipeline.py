"""A pipeline over ranks with send/recv: rank 0 produces micro-batches, every
middle rank applies its stage and passes them on, the last rank checks them.

    aiocomm-launch -n 4 examples/pipeline.py [micro-batches] [batch-rows]
"""

import sys

import numpy as np

import aiocomm

world = aiocomm.init()
rank, size = world.rank(), world.size()
batches = int(sys.argv[1]) if len(sys.argv) > 1 else 50
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 256
shape = (rows, 8)
assert size >= 2, "a pipeline needs at least 2 ranks"


def stage(k: int, x: np.ndarray) -> np.ndarray:
    """Stage k of the model: a fixed affine map, so the result can be checked."""
    return x * (k + 1) + k


for b in range(batches):
    if rank == 0:
        x = np.full(shape, float(b))
        aiocomm.send(stage(0, x), 1)
    else:
        x = aiocomm.recv(shape, np.float64, rank - 1)
        y = stage(rank, x)
        if rank < size - 1:
            aiocomm.send(y, rank + 1)
        else:
            want = np.full(shape, float(b))
            for k in range(size):
                want = stage(k, want)
            assert np.array_equal(y, want), f"micro-batch {b} is wrong"

if rank == size - 1:
    print(f"pipeline of {size} stages: {batches} micro-batches of {shape} arrived in order and correct")
