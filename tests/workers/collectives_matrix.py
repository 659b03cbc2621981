"""Every collective x every dtype x every shape, checked against numpy."""

import sys
from functools import reduce

import numpy as np

import aiocomm

from common import DTYPES, SHAPES, check, data

ops = sys.argv[1].split(",") if len(sys.argv) > 1 else ["all_sum", "all_max", "all_min", "all_gather", "sum_scatter"]
world = aiocomm.init(strict=True)
n, r = world.size(), world.rank()
count = 0
for dtype in DTYPES:
    for shape in SHAPES:
        inputs = [data(k, shape, dtype) for k in range(n)]
        x = inputs[r]
        what = f"rank {r}/{n} {dtype}{shape}"
        for op in ops:
            if op in ("all_sum", "all_max", "all_min"):
                ufunc = {"all_sum": np.add, "all_max": np.maximum, "all_min": np.minimum}[op]
                want = reduce(lambda a, b: ufunc(a, b), inputs).astype(dtype)
                check(getattr(aiocomm, op)(x), want, f"{op} {what}")
            elif op == "all_gather":
                want = np.stack(inputs) if shape == () else np.concatenate(inputs)
                check(aiocomm.all_gather(x), want, f"{op} {what}")
            elif op == "sum_scatter":
                if shape == () or shape[0] % n:
                    try:
                        aiocomm.sum_scatter(x)
                    except ValueError as exc:
                        assert "sum_scatter" in str(exc), exc
                    else:
                        raise AssertionError(f"sum_scatter {what} should raise ValueError")
                    continue
                total = reduce(np.add, inputs).astype(dtype)
                m = shape[0] // n
                check(aiocomm.sum_scatter(x), total[r * m:(r + 1) * m], f"{op} {what}")
            count += 1
# the input is never modified
check(x, data(r, SHAPES[-1], DTYPES[-1]), "input left untouched")
print(f"OK {count} collectives", flush=True)
