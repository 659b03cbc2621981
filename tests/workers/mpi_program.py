"""The MPI backend beyond the matrix: p2p between every pair, a recv that
does not fit, split, the async face (several in flight, the loop responsive
during a large all_sum), mismatches and timeouts."""

import asyncio
import sys
import time

import numpy as np

import aiocomm
from aiocomm import aio

from common import check

world = aiocomm.init(strict=True)
n, r = world.size(), world.rank()
assert world.engine.backend.name == "mpi", world.engine.backend
assert aiocomm.init() is world and aiocomm.is_available("mpi")

# p2p: every ordered pair, several messages each, in order
for src in range(n):
    for dst in range(n):
        if src == dst:
            continue
        if r == src:
            for i in range(5):
                aiocomm.send(np.full((3, 2), src * 100 + dst * 10 + i, np.int32), dst)
        elif r == dst:
            for i in range(5):
                check(aiocomm.recv((3, 2), np.int32, src), np.full((3, 2), src * 100 + dst * 10 + i, np.int32),
                      f"p2p {src}->{dst} #{i}")
aiocomm.all_sum(np.zeros(1))

# a recv that does not fit raises and keeps the message for one that does
if r == 0:
    aiocomm.send(np.arange(4, dtype=np.float32), 1)
    aiocomm.send(np.arange(10, 14, dtype=np.float32), 1)
elif r == 1:
    for wrong in (((5,), np.float32), ((4,), np.int32)):
        try:
            aiocomm.recv(*wrong, 0)
        except aiocomm.MismatchError as exc:
            assert "rank 0" in str(exc), exc
        else:
            raise AssertionError(f"recv{wrong} of a (4,) float32 message did not raise")
    check(aiocomm.recv((4,), np.float32, 0), np.arange(4, dtype=np.float32), "kept after mismatches")
    check(aiocomm.recv_like(np.zeros(4, np.float32), 0), np.arange(10, 14, dtype=np.float32), "next message")

# small reductions ride in their agreement, and the blocking face makes each
# call shape's buffers once: again and again, on new values, every earlier
# result must stay what it was (none is a view of the reused buffers)
kept = []
for round_ in range(3):
    for dtype, shape in (("float32", (2,)), ("int8", (2, 3)), ("float64", ()), ("float64", (7,)),
                         ("uint16", (0,)), ("complex64", (3,))):
        for op, fn, ufunc in (("sum", aiocomm.all_sum, np.add), ("max", aiocomm.all_max, np.maximum),
                              ("min", aiocomm.all_min, np.minimum)):
            if op != "sum" and np.dtype(dtype).kind == "c":
                continue
            inputs = [((np.arange(int(np.prod(shape))) + q * 5 + round_ * 3) % 11).astype(dtype).reshape(shape)
                      for q in range(n)]
            want = inputs[0]
            for q in range(1, n):
                want = ufunc(want, inputs[q])
            got = fn(inputs[r])
            check(got, want, f"small {op} of {dtype}{shape}, round {round_}")
            kept.append((got, got.copy(), f"{op} of {dtype}{shape}, round {round_}"))
for got, was, what in kept:
    check(got, was, f"{what}, after the later rounds")

# split: reversed order inside each color, collectives on subgroup and world
sub = world.split(r % 2, key=n - r)
members = [q for q in range(n) if q % 2 == r % 2]
assert sub.size() == len(members) and sub.rank() == sorted(members, reverse=True).index(r), (sub.rank(), sub.size())
check(aiocomm.all_sum(np.array([r]), group=sub), np.array([sum(members)]), "sum on a split")
check(aiocomm.all_gather(np.array([r]), group=sub), np.array(sorted(members, reverse=True)), "gather on a split")
check(aiocomm.all_sum(np.array([1.5])), np.array([1.5 * n]), "world after split")


async def async_face() -> None:
    # several collectives in flight at once, on two groups
    coros = [aio.all_sum(np.full(5, i + r, np.float64)) for i in range(6)]
    coros += [aio.all_gather(np.array([r, i]), group=sub) for i in range(3)]
    got = await asyncio.gather(*coros)
    for i in range(6):
        check(got[i], np.full(5, n * i + sum(range(n)), np.float64), f"async sum {i}")
    # the loop stays responsive during a large all_sum
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.get_running_loop().create_task(ticker())
    big = np.ones(8 << 20, np.float32)  # 32 MiB
    start = time.monotonic()
    out = await aio.all_sum(big)
    took = time.monotonic() - start
    task.cancel()
    assert out[0] == n and out[-1] == n
    assert ticks >= min(5, int(took / 0.002)), f"the loop ticked {ticks} times in {took:.3f}s"
    # p2p on the async face
    if r == 0:
        await aio.send(np.arange(3), 1)
    elif r == 1:
        check(await aio.recv((3,), np.arange(3).dtype, 0), np.arange(3), "async p2p")


asyncio.run(async_face())

# 8-bit sums wrap as numpy's do (Open MPI's AVX sum saturates them), also on the large-buffer path
big = np.full(300_000, 100, np.int8)
check(aiocomm.all_sum(big), np.full(300_000, 100 * n, np.int64).astype(np.int8), "int8 sum wraps")


async def concurrent_receives() -> None:
    # receives from one source take its messages in order, one at a time: one
    # that does not fit raises and leaves the message; nothing is lost or torn
    if r == 0:
        await aio.send(np.arange(4, dtype=np.float32), 1)
        await aio.send(np.arange(10, 15, dtype=np.float32), 1)
    elif r == 1:
        await asyncio.sleep(0.3)
        got = await asyncio.gather(aio.recv((5,), np.float32, 0), aio.recv((4,), np.float32, 0),
                                   return_exceptions=True)
        assert isinstance(got[0], aiocomm.MismatchError), got
        check(got[1], np.arange(4, dtype=np.float32), "first message, to the receive that fits")
        check(await aio.recv((5,), np.float32, 0), np.arange(10, 15, dtype=np.float32), "second message")
        # receives that time out while messages trickle in lose none of them
        stray = [aio.recv((2,), np.int64, 0, timeout=0.001) for _ in range(20)]
        outcomes = await asyncio.gather(*stray, return_exceptions=True)
        assert all(isinstance(e, aiocomm.CommTimeoutError) for e in outcomes), outcomes
    await aio.all_sum(np.zeros(1))
    if r == 0:
        for i in range(40):
            await aio.send(np.full(2, i, np.int64), 1)
            await asyncio.sleep(0.0005)
    elif r == 1:
        seen: list[int] = []
        while len(seen) < 40:
            try:
                seen.append(int((await aio.recv((2,), np.int64, 0, timeout=0.001))[0]))
            except aiocomm.CommTimeoutError:
                pass
        assert seen == list(range(40)), seen
    await aio.all_sum(np.zeros(1))


asyncio.run(concurrent_receives())

# ranks that disagree get MismatchError naming the calls, never wrong numbers
mine = world.split(0)
try:
    aiocomm.all_sum(np.zeros(3 + r), group=mine)
except aiocomm.MismatchError as exc:
    assert "shape=(3,)" in str(exc) and f"shape=({3 + n - 1},)" in str(exc), exc
else:
    assert n == 1, "mismatched shapes did not raise"
try:
    aiocomm.all_sum(np.zeros(3), group=mine)
except aiocomm.MismatchError as exc:
    assert "broken earlier" in str(exc) and exc.__cause__ is not None, exc
else:
    raise AssertionError("a broken group was usable")

# a timeout bounds the wait, says how long, and breaks only that group -- on
# every rank at once: the ranks waiting with it hear at once that rank 0 gave
# up, and the late rank, refused, stands in for it (so the job still ends cleanly)
late = world.split(0)
if r == n - 1:
    time.sleep(2.0)
    try:
        aiocomm.all_sum(np.ones(2), group=late)
    except aiocomm.CommError as exc:
        assert "rank 0 gave up" in str(exc) and "timeout=1s" in str(exc), exc
    else:
        raise AssertionError("a group broken by rank 0's timeout was usable")
else:
    start = time.monotonic()
    try:
        aiocomm.all_sum(np.ones(2), group=late, timeout=1.0 if r == 0 else 60.0)
    except aiocomm.CommTimeoutError as exc:
        waited = time.monotonic() - start
        assert r == 0 and 0.9 < waited < 3.0 and "timeout=1s" in str(exc), (r, waited, exc)
    except aiocomm.CommError as exc:
        waited = time.monotonic() - start
        assert r != 0 and waited < 3.0 and "rank 0 gave up" in str(exc), (r, waited, exc)
    else:
        raise AssertionError("no timeout")
check(aiocomm.all_sum(np.array([1])), np.array([n]), "world after a timeout on another group")
print("OK mpi", flush=True)
sys.stdout.flush()
