"""Data-parallel training that carries on when ranks die (torchft's pattern).

SGD on a synthetic linear regression, 30 steps, each on a fixed global batch
split over the living ranks.  Rank 2 SIGKILLs itself at step 10 (with
``--second``, rank 1 also at step 20).  Each step the survivors *agree*
whether it counts (``should_commit``: every rank's all_sum succeeded); a
step that does not count is redone on a *shrunken* group.  The gradient is
the sum over the batch divided by the batch's size, so a smaller group
computes the same step; the final weights match a one-process numpy run of
the same schedule.

    aiocomm-launch -n 4 --on-failure continue examples/elastic_training.py [--second]
"""

import os
import signal
import sys
import time

import numpy as np

import aiocomm

STEPS, BATCH, FEATURES, LR = 30, 64, 8, 0.05
KILLS = {10: 2, 20: 1} if "--second" in sys.argv else {10: 2}  # step -> world rank that dies there


def problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(STEPS * BATCH, FEATURES))
    y = x @ rng.normal(size=FEATURES) + 0.1 * rng.normal(size=STEPS * BATCH)
    return x, y


def gradient_sum(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The gradient of the squared error, summed over the rows given."""
    return np.asarray(2.0 * x.T @ (x @ w - y))


def reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    w = np.zeros(FEATURES)
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        w -= LR * gradient_sum(w, x[rows], y[rows]) / BATCH
    return w


def main() -> None:
    world = aiocomm.init()
    me = world.rank()
    x, y = problem()
    group, w, step, redone = world, np.zeros(FEATURES), 0, 0
    while step < STEPS:
        if KILLS.get(step) == me:
            print(f"rank {me}: dying at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        rows = np.array_split(np.arange(step * BATCH, (step + 1) * BATCH), group.size())[group.rank()]
        try:
            total = aiocomm.all_sum(gradient_sum(w, x[rows], y[rows]), group=group, timeout=30)
            ok = True
        except aiocomm.CommError as exc:
            ok, total = False, None
            print(f"rank {me}: step {step} failed ({type(exc).__name__})", flush=True)
        if group.agree(ok, timeout=30) and total is not None:  # should_commit
            w -= LR * total / BATCH
            step += 1
        else:
            started = time.perf_counter()
            group = group.shrink(timeout=30)
            redone += 1
            print(f"rank {me}: step {step} is redone by ranks {list(group.members)} "
                  f"(shrunk in {1e3 * (time.perf_counter() - started):.0f} ms)", flush=True)
    gap = float(np.max(np.abs(w - reference(x, y))))
    assert gap < 1e-6, f"rank {me}: weights differ from the one-process run by {gap}"
    print(f"rank {me}: {STEPS} steps on {group.size()} survivors ({redone} redone); "
          f"weights match the one-process run (max difference {gap:.1e})", flush=True)


if __name__ == "__main__":
    main()
