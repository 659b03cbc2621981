"""The shared-memory path at unusual moments (argv: mode [args]).

kill_mid VICTIM:  all_sum of 32 MiB in a loop; the victim SIGKILLs itself
                  from a timer thread while a call is in progress (halfway
                  through a transfer).  Survivors print ``FAILED <class> at
                  <time>: ...``; every result returned before is checked.
idle_cpu:         rank 1 sleeps 3 s before its all_sum; rank 0 waits in
                  shared memory meanwhile and prints the CPU time it used.
huge:             one all_sum of 1 GiB, checked in slices.
maps:             prints whether this rank maps aiocomm's segments, then
                  waits to be killed (the test checks nothing outlives it).
async:            the async face on a shared-memory group: 20 calls in
                  flight at once, each checked.
"""

import asyncio
import gc
import os
import random
import signal
import sys
import threading
import time

import numpy as np

import aiocomm
from aiocomm import aio

mode = sys.argv[1]
world = aiocomm.init()
r, n = world.rank(), world.size()


def uses_shm() -> bool:
    with open("/proc/self/maps") as fh:
        return "aiocomm-shm" in fh.read()


if mode == "kill_mid":
    victim = int(sys.argv[2])
    x = np.full(8 << 20, r + 1, np.float32)
    want = n * (n + 1) / 2
    aiocomm.all_sum(x[:4])
    print(f"SHM {uses_shm()}", flush=True)
    if r == victim:
        delay = 0.3 + random.random() * 0.3
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    for i in range(100_000):
        try:
            y = aiocomm.all_sum(x, timeout=60)
        except aiocomm.CommError as exc:
            print(f"FAILED {type(exc).__name__} at {time.time():.3f}: {exc}", flush=True)
            break
        if not (y[0] == want and y[-1] == want and np.all(y[:: 4099] == want)):
            print(f"WRONG result in call {i}", flush=True)
            break
    print("DONE", flush=True)
elif mode == "idle_cpu":
    aiocomm.all_sum(np.ones(2))
    if r == 1:
        time.sleep(3)
    cpu0, wall0 = time.process_time(), time.monotonic()
    y = aiocomm.all_sum(np.ones(2))
    assert y[0] == n, y
    print(f"SHM {uses_shm()} WAITED {time.monotonic() - wall0:.2f} CPU {time.process_time() - cpu0:.3f}", flush=True)
elif mode == "huge":
    x = np.full(1 << 28, r + 1, np.float32)  # 1 GiB
    y = aiocomm.all_sum(x)
    want = n * (n + 1) / 2
    ok = all(bool(np.all(y[i : i + (1 << 22)] == want)) for i in range(0, y.size, 1 << 22))
    print(f"SHM {uses_shm()} HUGE {'ok' if ok else 'WRONG'} {y.nbytes}", flush=True)
elif mode == "maps":
    aiocomm.all_sum(np.ones(2))
    print(f"SHM {uses_shm()} pid {os.getpid()}", flush=True)
    time.sleep(60)
elif mode == "async":
    aiocomm.all_sum(np.ones(2))  # the world decides on shared memory

    async def main() -> None:
        outs = await asyncio.gather(*(aio.all_sum(np.full(1000 + i, r + i, np.int64)) for i in range(20)),
                                    aio.all_gather(np.array([r])), aio.sum_scatter(np.ones((2 * n, 3))))
        for i in range(20):
            assert np.all(outs[i] == sum(k + i for k in range(n))) and outs[i].size == 1000 + i, (i, outs[i][:3])
        assert outs[20].tolist() == list(range(n)), outs[20]
        assert outs[21].shape == (2, 3) and np.all(outs[21] == n), outs[21]

    asyncio.run(main())
    print(f"SHM {uses_shm()} OK async", flush=True)
elif mode == "pileup":
    # From the very first collective, calls pile up while the group decides
    # whether it uses shared memory; rank 0 uses the async face, the others
    # argv[2] ("async" or "blocking").  Each result is checked.
    def check(i: int, y: np.ndarray) -> str | None:
        return None if y[0] == n * i else f"{i}->{y[0]:g}"

    async def piled() -> list[str | None]:
        tasks = []
        for i in range(40):
            tasks.append(asyncio.create_task(aio.all_sum(np.full(4, float(i)))))
            await asyncio.sleep(0)
        return [check(i, y) for i, y in enumerate(await asyncio.gather(*tasks))]

    if r == 0 or sys.argv[2] == "async":
        wrong = [w for w in asyncio.run(piled()) if w]
    else:
        wrong = [w for w in (check(i, aiocomm.all_sum(np.full(4, float(i)))) for i in range(40)) if w]
    print(f"PILEUP wrong {len(wrong)} {wrong[:3]}", flush=True)
elif mode == "interrupt":
    # Rank 0 is interrupted (KeyboardInterrupt) between the barriers of a
    # large call, catches it and goes on: no rank may return a wrong result.
    aiocomm.all_sum(np.ones(4))
    big = np.full(2048, 100.0 * (r + 1))  # 16 KiB: one round of a 16 KiB slot
    if r == 0:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    else:
        time.sleep(1.0)
    outcomes = []
    try:
        y = aiocomm.all_sum(big, timeout=10)
        outcomes.append("ok" if np.all(y == 100.0 * n * (n + 1) / 2) else "WRONG")
    except (KeyboardInterrupt, aiocomm.CommError) as exc:
        outcomes.append(type(exc).__name__)
    try:
        z = aiocomm.all_sum(np.full(4, r + 1.0), timeout=10)
        outcomes.append("ok" if np.all(z == n * (n + 1) / 2) else "WRONG")
    except aiocomm.CommError as exc:
        outcomes.append(type(exc).__name__)
    print(f"INTERRUPT {outcomes}", flush=True)
elif mode == "seterr":
    # A rank that asked numpy to raise on overflow reduces the same as the
    # others (and as the TCP path): a reduction never raises on one rank only.
    aiocomm.all_sum(np.ones(2, np.float32))
    if r == n - 1:
        np.seterr(over="raise")
    x = np.ones(3072, np.float32)  # 12 KiB, one round of a 16 KiB slot
    if r < n - 1:
        x[2500] = 3e38  # overflows in the last rank's share
    y = aiocomm.all_sum(x, timeout=10)
    bad = int(np.count_nonzero((y != n) & ~np.isinf(y)))
    print(f"SETERR wrong {bad} inf {int(np.count_nonzero(np.isinf(y)))}", flush=True)
elif mode == "drop":
    # Groups dropped by the program give their shared memory back.
    x = np.ones(1 << 20, np.float32)
    for _ in range(12):
        g = world.split(0)
        aiocomm.all_sum(x, group=g)
        del g
        gc.collect()
    with open("/proc/self/maps") as fh:
        maps = sum(1 for line in fh if "aiocomm-shm" in line)
    print(f"DROP maps {maps}", flush=True)
else:
    raise SystemExit(f"unknown mode {mode}")
