"""Data-parallel training of a linear model: each rank computes the gradient on
its own shard and all_sum averages the gradients, so every rank's weights stay
identical while the loss falls.

    aiocomm-launch -n 4 examples/data_parallel.py [steps] [rows-per-rank]
"""

import sys

import numpy as np

import aiocomm

world = aiocomm.init()
rank, size = world.rank(), world.size()
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
features = 16

# The same true model everywhere; a different shard of data on each rank.
true_w = np.random.default_rng(0).normal(size=features)
rng = np.random.default_rng(1 + rank)
X = rng.normal(size=(rows, features))
y = X @ true_w + 0.01 * rng.normal(size=rows)

w = np.zeros(features)
lr = 0.1
first_loss = None
for _ in range(steps):
    residual = X @ w - y
    grad = X.T @ residual / rows
    loss_and_grad = aiocomm.all_sum(np.concatenate([[residual @ residual / rows], grad])) / size
    loss, grad = loss_and_grad[0], loss_and_grad[1:]
    first_loss = loss if first_loss is None else first_loss
    w -= lr * grad

# Every rank must hold exactly the same weights.
spread = aiocomm.all_max(w) - aiocomm.all_min(w)
assert np.all(spread == 0), f"rank {rank}: weights diverged by {spread.max()}"
assert loss < first_loss / 100, f"loss did not fall: {first_loss} -> {loss}"
if rank == 0:
    print(f"trained on {size} ranks: loss {first_loss:.4f} -> {loss:.6f}, "
          f"|w - w_true| = {np.linalg.norm(w - true_w):.4f}, weights identical on every rank")
