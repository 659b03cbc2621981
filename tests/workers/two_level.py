"""A group over simulated hosts (argv: mode [args]); every rank first prints
``MODE two-level|flat|shm`` (how its world moves reductions).

matrix:            every collective, dtype and shape (collectives_matrix.py)
                   on the world and on a split of it.
kill PHASE VICTIM: all_sum of 8 MiB in a loop; in call 3 the victim SIGKILLs
                   itself inside PHASE (``intra``: at a shared-memory barrier
                   of the host; ``inter``: while its ring between hosts has
                   frames in flight).  Survivors print ``FAILED <class> at
                   <time>: ...`` and ``DONE``.
mismatch HOW:      the ranks of the last host call all_sum with another shape
                   (``shape``), or broadcast where the others call all_sum
                   (``kind``); every rank prints ``MISMATCH <class>``.
async:             the async face: 25 collectives in flight at once, the
                   two-level ones among others that stay on the flat ring.
memory:            all_sum, all_gather and sum_scatter of 64 MiB; prints how
                   much the peak RSS of each grew beyond its output (MiB).
"""

import asyncio
import os
import runpy
import signal
import sys
import threading
import time

import numpy as np

import aiocomm
from aiocomm.backends import two_level
from aiocomm.shm import Channel


def mode_of(group: aiocomm.Group) -> str:
    state = group.handle
    if state is None or state.channel is None:
        return "flat"
    return "two-level" if state.channel.size < group.size() else "shm"


mode = sys.argv[1]
world = aiocomm.init(strict=True)
n, r = world.size(), world.rank()
aiocomm.all_sum(np.ones(2))
print(f"MODE {mode_of(world)}", flush=True)

if mode == "matrix":
    sys.argv = [sys.argv[0]]
    runpy.run_path(os.path.join(os.path.dirname(__file__), "collectives_matrix.py"))
    # a split: every rank of the world but the first, on as many hosts
    sub = world.split(0 if r else 1)
    if r:
        x = np.arange(1001, dtype=np.float32) + r
        y = aiocomm.all_sum(x, group=sub)
        want = sum(np.arange(1001, dtype=np.float32) + k for k in range(1, n))
        assert np.array_equal(y, want), (y[:4], want[:4])
        g = aiocomm.all_gather(x[:5], group=sub)
        assert np.array_equal(g, np.concatenate([np.arange(5, dtype=np.float32) + k for k in range(1, n)]))
        print(f"SPLIT {mode_of(sub)} {sub.size()}", flush=True)
elif mode == "kill":
    phase, victim = sys.argv[2], int(sys.argv[3])
    armed = threading.Event()
    if r == victim:
        def die() -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        if phase == "intra":
            barrier = Channel.barrier

            def barrier_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                if armed.is_set() and self.epoch > self.epoch_armed + 4:
                    die()
                return barrier(self, *args, **kwargs)

            Channel.barrier = barrier_then_die  # type: ignore[method-assign]
        else:
            start = two_level.CrossCall.start

            def start_then_die(self, body):  # type: ignore[no-untyped-def]
                if not armed.is_set():
                    return start(self, body)

                async def dying(link):  # type: ignore[no-untyped-def]
                    sending = asyncio.ensure_future(body(link))
                    await asyncio.sleep(0.002)  # (part of its frames on their way)
                    die()
                    await sending

                return start(self, dying)

            two_level.CrossCall.start = start_then_die  # type: ignore[method-assign]
    x = np.full(2 << 20, r + 1, np.float32)
    want = n * (n + 1) / 2
    for i in range(1000):
        if i == 3 and r == victim:
            state = world.handle
            if state.channel is not None:
                state.channel.epoch_armed = state.channel.epoch
            armed.set()
        try:
            y = aiocomm.all_sum(x, timeout=60)
        except aiocomm.CommError as exc:
            print(f"FAILED {type(exc).__name__} at {time.time():.3f}: {exc}", flush=True)
            break
        assert y[0] == want and y[-1] == want and np.all(y[::4099] == want), f"WRONG result in call {i}"
    print("DONE", flush=True)
elif mode == "mismatch":
    odd = n - 1 in world.handle.channel.members  # the host of the last rank calls something else
    try:
        if sys.argv[2] == "shape":
            aiocomm.all_sum(np.ones(1001 if odd else 1000, np.float32), timeout=30)
        elif odd:  # "kind": a collective that stays on the flat ring, beside a two-level one
            aiocomm.broadcast(np.ones(1000, np.float32), 0, timeout=30)
        else:
            aiocomm.all_sum(np.ones(1000, np.float32), timeout=30)
    except aiocomm.CommError as exc:
        print(f"MISMATCH {type(exc).__name__}: {exc}", flush=True)
    else:
        print("MISMATCH none", flush=True)
elif mode == "async":
    from aiocomm import aio

    async def main() -> None:
        sizes = [1, 1000, 70_000, 300_000] * 5
        xs = [np.arange(m, dtype=np.float64) * (r + 1) for m in sizes]
        calls = [aio.all_sum(x) for x in xs]
        calls += [aio.broadcast(np.full(10, r, np.int32), 1), aio.gather(np.full(3, r), 0), aio.barrier(),
                  aio.all_gather(xs[2]), aio.sum_scatter(np.ones(4 * n))]
        got = await asyncio.gather(*calls)
        total = n * (n + 1) / 2
        for x, y in zip(xs, got, strict=False):
            assert np.array_equal(y, x / (r + 1) * total), (x.size, y[:3])
        bcast, gathered, _, allg, scattered = got[len(xs):]
        assert np.array_equal(bcast, np.full(10, 1, np.int32))
        assert (gathered is None) == (r != 0) and (r or np.array_equal(gathered, np.repeat(np.arange(n), 3)))
        assert np.array_equal(allg, np.concatenate([xs[2] / (r + 1) * (k + 1) for k in range(n)]))
        assert np.array_equal(scattered, np.full(4, n, np.float64))

    asyncio.run(main())
    print("ASYNC ok", flush=True)
elif mode == "memory":
    def rss() -> int:
        with open("/proc/self/status") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["VmHWM"].split()[0]) << 10

    items = (64 << 20) // 4
    for op in ("all_sum", "all_gather", "sum_scatter"):
        x = np.full(items if op != "all_gather" else items // n, r + 1, np.float32)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the peak RSS starts again from here
        before = rss()
        y = getattr(aiocomm, op)(x)
        print(f"MEMORY {op} {(rss() - before - y.nbytes) >> 20}", flush=True)
        del y
