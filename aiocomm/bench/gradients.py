"""average_gradients against one all_sum per array, as a training step would
call them (the benchmark that issue asked for: 200 arrays of 1-100 kB).

    aiocomm-launch -n 2 python -m aiocomm.bench.gradients [--arrays 200] [--iters 20]

Prints, on rank 0, the median time of one step each way (the mean of the
ranks' own times) and the ratio, after checking both give the same averages.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import aiocomm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiocomm.bench.gradients", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arrays", type=int, default=200)
    parser.add_argument("--min-kb", type=float, default=1)
    parser.add_argument("--max-kb", type=float, default=100)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    world = aiocomm.init()
    rank, n = world.rank(), world.size()
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)  # the same sizes on every rank
    sizes = rng.integers(int(args.min_kb * 1024), int(args.max_kb * 1024) + 1, args.arrays) // dtype.itemsize
    grads = {f"p{i}": np.full(int(s), rank + 1, dtype) for i, s in enumerate(sizes)}
    total = sum(g.nbytes for g in grads.values())

    def per_array() -> dict[str, np.ndarray]:
        return {k: aiocomm.all_sum(v) / n for k, v in grads.items()}

    def helper() -> dict[str, np.ndarray]:
        return aiocomm.average_gradients(grads)  # type: ignore[no-any-return]

    want = (n + 1) / 2
    timings = {}
    for name, step in (("per-array all_sum", per_array), ("average_gradients", helper)):
        for _ in range(3):
            out = step()
        assert all(np.all(v == want) for v in out.values()), name
        times = np.empty(args.iters)
        for i in range(args.iters):
            t0 = time.perf_counter()
            step()
            times[i] = time.perf_counter() - t0
        timings[name] = float(np.median(aiocomm.all_gather(times.reshape(1, -1)).mean(axis=0)))
    if rank == 0:
        print(f"# {args.arrays} {dtype} arrays of {args.min_kb:g}-{args.max_kb:g} kB ({total / 2**20:.1f} MiB), "
              f"{n} ranks, median of {args.iters} steps (mean of the ranks)")
        for name, t in timings.items():
            print(f"  {name:<18} {t * 1e3:9.2f} ms  {total / t / 1e9:6.3f} GB/s")
        print(f"  average_gradients is {timings['per-array all_sum'] / timings['average_gradients']:.1f}x "
              "faster than one all_sum per array")


if __name__ == "__main__":
    main()
