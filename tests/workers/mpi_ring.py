"""Large reductions over MPI go around the ranks with aiocomm's own sends
and receives (aiocomm/backends/mpi/collectives.py: ``_ring``, ``_halving``
for a power of two ranks, and ``verdict``).

First at real sizes (odd ones too), on both faces, out of place from the
caller's array: the input is left as it was, NaN propagates, the results are
bit-identical on every rank.  Then reductions given up on while MPI reads
their input: no rank returns a result.  Then every reduction of the matrix
(tests/workers/collectives_matrix.py) with the threshold shrunk, so every
dtype and shape that the agreement does not carry takes the ring."""

import _thread
import asyncio
import hashlib
import runpy
import sys
import threading
import time
from pathlib import Path

import numpy as np

import aiocomm
from aiocomm import results
from aiocomm.backends.mpi import collectives, notices

from common import check

world = aiocomm.init(strict=True, backend="mpi")
n, r = world.size(), world.rank()
ring, halving = collectives._ring, collectives._halving
around = halving if n & (n - 1) == 0 else ring  # (a power of two halves)
rings = []


def counted(*args):
    rings.append(args[2].size)
    return around(*args)


collectives._ring = collectives._halving = counted
for size in (3 << 18, (1 << 20) + 3):
    x = np.arange(size, dtype=np.float32) % 97 + r
    want = (np.arange(size, dtype=np.float32) % 97) * n + sum(range(n))
    rings.clear()
    got = aiocomm.all_sum(x)
    check(got, want, f"all_sum of {size} float32")
    assert rings == [size], rings  # the ring, once
    check(x, np.arange(size, dtype=np.float32) % 97 + r, "the input is left as it was")
    y = np.full(size, float(r))
    y[size // 3] = np.nan if r == n - 1 else 0.0
    top = aiocomm.all_max(y)
    assert np.isnan(top[size // 3]) and np.all(np.delete(top, size // 3) == n - 1), "all_max propagates NaN"
    low = asyncio.run(aiocomm.aio.all_min(-y))
    assert np.isnan(low[size // 3]) and np.all(np.delete(low, size // 3) == 1 - n), "all_min (async face)"
    digest = np.frombuffer(hashlib.blake2b(got.tobytes() + top.tobytes() + low.tobytes()).digest(), np.uint8)
    rows = aiocomm.all_gather(digest).reshape(n, -1)
    assert all(np.array_equal(row, rows[0]) for row in rows), "results differ between ranks"
collectives._ring, collectives._halving = ring, halving

# Parts split into several messages (collectives.MESSAGE_BYTES, a C int's
# worth of bytes at most in one MPI message), shrunk here.
collectives.MESSAGE_BYTES = 4096
x = np.arange(100_003, dtype=np.float64) + r
check(aiocomm.all_sum(x), np.arange(100_003, dtype=np.float64) * n + sum(range(n)), "all_sum in many messages")
collectives.MESSAGE_BYTES = 1 << 30

# Overflow is inf on every rank, as MPI's own sums give it, even where the
# program asks numpy to raise.
with np.errstate(all="raise"):
    huge = np.full(1 << 18, np.finfo(np.float32).max, np.float32)
    assert np.all(np.isinf(aiocomm.all_sum(huge))), "an overflowing sum is inf"
print(f"OK ring sizes rank {r}", flush=True)

# Tiny arrays on the ring and by halving (the agreement made to carry
# nothing), fewer elements than ranks among them.
carry, ring_from = collectives.GATHER_UP_TO, collectives.RING_FROM
collectives.GATHER_UP_TO, collectives.RING_FROM = 1, 1
for count in range(1, 2 * n + 2):
    x = (np.arange(count) + 1) * 10.0 ** r
    check(aiocomm.all_sum(x), (np.arange(count) + 1) * sum(10.0 ** k for k in range(n)), f"all_sum of {count}")
collectives.GATHER_UP_TO, collectives.RING_FROM = carry, ring_from
print(f"OK ring tiny rank {r}", flush=True)

moments = "--no-moments" not in sys.argv

# Reductions given up on while MPI reads the input: rank 0 times out while
# the last rank is late to start the ring (the agreement is done), then
# changes its input at once.  The reduction goes on in the background from
# that input, and no rank returns its result: on the blocking face, then the
# async one (a cancelled task gives up the same way).  The late rank is deaf
# to the notice that rank 0 gave up, so its ring completes from what rank 0
# left running, and only the verdict at its end stops it.
poll = notices.Notices.poll
for face in ("blocking", "async") if moments else ():
    group = world.split(0)
    big = np.full(1 << 18, float(r + 1), np.float32)
    if r == n - 1:
        def late(*args):
            time.sleep(1.5)
            notices.Notices.poll = lambda self, every=0.0: False
            return (yield from around(*args))

        collectives._ring = collectives._halving = late
    try:
        if face == "blocking":
            got = aiocomm.all_sum(big, group=group, timeout=0.5 if r == 0 else 10)
        else:
            got = asyncio.run(asyncio.wait_for(aiocomm.aio.all_sum(big, group=group), 0.5 if r == 0 else 10))
    except (aiocomm.CommError, asyncio.TimeoutError) as exc:
        if r == 0:
            big[:] = -1.0
            assert isinstance(exc, aiocomm.CommTimeoutError if face == "blocking" else asyncio.TimeoutError), exc
        else:
            assert "rank 0" in str(exc), exc
            if r == n - 1:
                assert "so no rank keeps its result" in str(exc), exc  # the verdict's
    else:
        raise AssertionError(f"rank {r} got {got[:3]} from an all_sum ({face}) rank 0 gave up on")
    notices.Notices.poll = poll
    collectives._ring, collectives._halving = ring, halving
    print(f"OK ring given up ({face}) rank {r}", flush=True)

if moments:
    # A Ctrl-C while rank 0 waits inside the reduction (the last rank is late):
    # the reduction goes on in the background with its buffers kept, so the
    # memory of its result is not handed to a later array under MPI's writes,
    # and the others raise (the group is broken).
    group = world.split(0)
    big = np.full(1 << 18, float(r + 1), np.float32)
    if r == n - 1:
        collectives._ring = collectives._halving = late
    try:
        if r == 0:
            threading.Timer(0.5, _thread.interrupt_main).start()
        aiocomm.all_sum(big, group=group, timeout=10)
    except KeyboardInterrupt:
        assert r == 0
        later = [results.empty(big.shape, big.dtype) for _ in range(4)]
        for array in later:
            array[:] = 0.0
        time.sleep(2.5)
        assert all(not array.any() for array in later), "MPI wrote into memory given to later arrays"
    except aiocomm.CommError as exc:
        assert r != 0 and "rank 0" in str(exc), exc
    else:
        raise AssertionError(f"rank {r}: an all_sum rank 0 was interrupted in returned")
    notices.Notices.poll = poll
    collectives._ring, collectives._halving = ring, halving

    # The same with a reduction small enough to ride in its agreement (the
    # backend's fast path for small calls): the others raise.
    group = world.split(0)
    try:
        if r == 0:
            threading.Timer(0.5, _thread.interrupt_main).start()
        elif r == n - 1:
            time.sleep(1.5)
        aiocomm.all_sum(np.ones(2), group=group, timeout=10)
    except KeyboardInterrupt:
        assert r == 0
        time.sleep(1.5)
    except aiocomm.CommError as exc:
        assert r != 0 and "rank 0" in str(exc), exc
    else:
        raise AssertionError(f"rank {r}: a small all_sum rank 0 was interrupted in returned")
    print(f"OK ring interrupted rank {r}", flush=True)

# The matrix with every reduction the agreement does not carry on the ring.
collectives.RING_FROM = 1
script = str(Path(__file__).with_name("collectives_matrix.py"))
sys.argv = [script, "all_sum,all_max,all_min"]
runpy.run_path(script, run_name="__main__")
