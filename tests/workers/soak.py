"""Thousands of mixed collectives from several tasks at once, all checked.

Each task works on its own duplicate of the world (split with one colour), as
MPI programs give each thread its own communicator: collectives of one group
must be called in the same order everywhere, different groups run freely.
"""

import asyncio
import sys

import numpy as np
import uvloop

from aiocomm import aio

from common import check

OPS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
TASKS = 4


async def task(t: int, group) -> int:
    r, n = group.rank(), group.size()
    rng = np.random.default_rng(t)  # the same sequence of choices on every rank
    done = 0
    for i in range(OPS // TASKS):
        kind = rng.integers(5)
        count = int(rng.choice([0, 1, 5, 1000, 40_000]))
        base = np.arange(count, dtype=np.int64) % 97 + i
        if kind == 0:
            check(await aio.all_sum(base + r, group=group), base * n + sum(range(n)), f"task {t} op {i} sum")
        elif kind == 1:
            check(await aio.all_max(base + r, group=group), base + n - 1, f"task {t} op {i} max")
        elif kind == 2:
            got = await aio.all_gather(base[: count // 10] + r, group=group)
            check(got, np.concatenate([base[: count // 10] + k for k in range(n)]), f"task {t} op {i} gather")
        elif kind == 3:
            x = np.tile(base[: count // 10] + r, n)
            want = np.tile(base[: count // 10], n) * n + sum(range(n))
            m = len(x) // n
            check(await aio.sum_scatter(x, group=group), want[r * m:(r + 1) * m], f"task {t} op {i} scatter")
        else:
            right, left = (r + 1) % n, (r - 1) % n
            _, got = await asyncio.gather(aio.send(base + r, right, group=group),
                                          aio.recv(base.shape, np.int64, left, group=group))
            check(got, base + left, f"task {t} op {i} sendrecv")
        done += 1
    return done


async def main() -> None:
    await aio.init()
    groups = [await aio.split(0) for _ in range(TASKS)]
    counts = await asyncio.gather(*(task(t, g) for t, g in enumerate(groups)))
    print(f"OK soak {sum(counts)} operations", flush=True)


uvloop.run(main())
