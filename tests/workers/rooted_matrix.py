"""broadcast, gather, all_to_all, all_gather_v and barrier: every dtype,
odd sizes, every root, both faces, checked against numpy; then mismatches
(another root, shape, dtype or operation on one rank), each on a fresh group,
which must raise MismatchError on every rank and hand out no data.

argv[1]: "blocking" or "async" (which face).  Prints ``OK rooted <count>``.
"""

import asyncio
import sys

import numpy as np

import aiocomm
from aiocomm import aio

from common import DTYPES, SHAPES, check, data

face = sys.argv[1] if len(sys.argv) > 1 else "blocking"
world = aiocomm.init(strict=True)
n, r = world.size(), world.rank()


def run(name: str, *args, **kwargs):
    if face == "blocking":
        return getattr(aiocomm, name)(*args, **kwargs)
    return asyncio.run(getattr(aio, name)(*args, **kwargs))


count = 0
for dtype in DTYPES:
    for shape in SHAPES:
        inputs = [data(k, shape, dtype) for k in range(n)]
        x = inputs[r]
        what = f"rank {r}/{n} {dtype}{shape} ({face})"
        for root in sorted({0, n - 1, n // 2}):
            mine = x if r == root else np.zeros(shape, dtype)  # only the root's values count
            check(run("broadcast", mine, root), inputs[root], f"broadcast from {root} {what}")
            got = run("gather", x, root)
            if r == root:
                check(got, np.stack(inputs) if shape == () else np.concatenate(inputs), f"gather to {root} {what}")
            else:
                assert got is None, f"gather to {root} {what}: a non-root got {type(got)}"
            count += 2
        if shape and shape[0] % n == 0:
            m = shape[0] // n
            want = np.concatenate([inputs[k][r * m : (r + 1) * m] for k in range(n)])
            check(run("all_to_all", x), want, f"all_to_all {what}")
            count += 1
        else:
            try:
                run("all_to_all", x)
            except ValueError as exc:
                assert "all_to_all" in str(exc), exc
            else:
                raise AssertionError(f"all_to_all {what} should raise ValueError")
        # uneven rows: rank k contributes k rows (rank 0 none) of shape[1:]
        rows = (r, *shape[1:])
        uneven = [data(k, (k, *shape[1:]), dtype) for k in range(n)]
        got, counts = run("all_gather_v", uneven[r])
        assert counts == list(range(n)), f"all_gather_v {what}: counts {counts}"
        check(got, np.concatenate(uneven), f"all_gather_v {what}")
        count += 1
    run("barrier")
    count += 1
check(x, data(r, SHAPES[-1], DTYPES[-1]), "input left untouched")

# barrier waits for the last rank: rank k arrives 0.1 s * k late; nobody
# leaves before the last one arrived (clocks of one host; TCP and shared
# memory alike)
if n > 1:
    import time

    time.sleep(0.1 * r)
    arrived = time.time()
    run("barrier")
    left = time.time()
    times = run("all_gather", np.array([arrived, left]))
    last_arrival = times[0::2].max()
    assert left >= last_arrival, f"rank {r} left the barrier {last_arrival - left:.3f} s before rank " \
                                 f"{int(times[0::2].argmax())} arrived"
    count += 1

# 0-d rows in all_gather_v count as one row each
got, counts = run("all_gather_v", np.float32(r))
check(got, np.arange(n, dtype=np.float32), "all_gather_v of 0-d arrays")
assert counts == [1] * n, counts

# Mismatches: one rank differs; every rank must raise MismatchError, nobody gets data.
if n > 1:
    odd = n - 1  # the rank that differs
    big = 300_000  # bytes per array: the pipelined (large) paths
    cases = {
        "broadcast root": lambda g, k: run("broadcast", np.ones(5), 1 if k == odd else 0, group=g),
        "broadcast shape": lambda g, k: run("broadcast", np.ones(6 if k == odd else 5), 0, group=g),
        "broadcast large dtype": lambda g, k: run(
            "broadcast", np.ones(big // 4, np.int32 if k == odd else np.float32), 0, group=g),
        "broadcast large shape": lambda g, k: run(
            "broadcast", np.ones(big // 8 + (1 if k == odd else 0)), 0, group=g),
        "gather root": lambda g, k: run("gather", np.ones(3), 1 if k == odd else 0, group=g),
        "gather shape": lambda g, k: run("gather", np.ones(4 if k == odd else 3), 0, group=g),
        "all_to_all dtype": lambda g, k: run("all_to_all", np.ones(2 * n, np.int64 if k == odd else np.float64),
                                             group=g),
        "all_gather_v row shape": lambda g, k: run("all_gather_v", np.ones((2, 4 if k == odd else 3)), group=g),
        "all_gather_v large dtype": lambda g, k: run(
            "all_gather_v", np.ones((big // 8, 1), np.int64 if k == odd else np.float64), group=g),
        "barrier vs all_sum": lambda g, k: run("all_sum", np.ones(1), group=g) if k == odd else run("barrier",
                                                                                                 group=g),
        "gather vs broadcast": lambda g, k: run("broadcast", np.ones(3), 0, group=g) if k == odd else run(
            "gather", np.ones(3), 0, group=g),
    }
    for name, call in cases.items():
        g = world.split(0)
        try:
            result = call(g, r)
        except aiocomm.MismatchError as exc:
            text = str(exc)
            assert "rank" in text, text
        except aiocomm.CommError as exc:
            raise AssertionError(f"rank {r}: {name}: {type(exc).__name__} instead of MismatchError: {exc}") from exc
        else:
            raise AssertionError(f"rank {r}: {name}: no error, got {type(result)}")
        count += 1
    check(aiocomm.all_sum(np.ones(2)), np.full(2, float(n)), "the world after the mismatches")

print(f"OK rooted {count}", flush=True)
