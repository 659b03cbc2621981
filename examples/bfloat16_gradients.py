"""Data-parallel training with bfloat16 gradients: each rank casts its
gradient to bfloat16 (half the bytes of float32 on the wire), all_sum adds
them as bfloat16 values, and every rank applies the average to float32
weights, which stay identical on every rank while the loss falls.  numpy has
no bfloat16 of its own: it is ``ml_dtypes.bfloat16`` (pip install ml_dtypes),
the type JAX uses, and MLX's ``mx.bfloat16`` ports to it.

    aiocomm-launch -n 4 examples/bfloat16_gradients.py [steps] [rows-per-rank]
"""

import sys

import ml_dtypes
import numpy as np

import aiocomm

world = aiocomm.init()
rank, size = world.rank(), world.size()
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
features = 16

true_w = np.random.default_rng(0).normal(size=features).astype(np.float32)
rng = np.random.default_rng(1 + rank)
X = rng.normal(size=(rows, features)).astype(np.float32)
y = X @ true_w + np.float32(0.01) * rng.normal(size=rows).astype(np.float32)

w = np.zeros(features, np.float32)  # float32 master weights
lr = np.float32(0.1)
losses = []
for _ in range(steps):
    residual = X @ w - y
    grad = (X.T @ residual / rows).astype(ml_dtypes.bfloat16)
    total = aiocomm.all_sum(grad)  # bfloat16 in, bfloat16 out
    assert total.dtype == ml_dtypes.bfloat16
    w -= lr * total.astype(np.float32) / size
    losses.append(float(aiocomm.all_sum(np.array([residual @ residual / rows], np.float32))[0]) / size)

spread = aiocomm.all_max(w) - aiocomm.all_min(w)
assert np.all(spread == 0), f"rank {rank}: weights diverged by {spread.max()}"
assert losses[-1] < losses[0] / 100, f"loss did not fall: {losses[0]} -> {losses[-1]}"
if rank == 0:
    print(f"trained on {size} ranks with bfloat16 gradients: loss {losses[0]:.4f} -> {losses[-1]:.6f}, "
          f"|w - w_true| = {np.linalg.norm(w - true_w):.4f}, weights identical on every rank")
