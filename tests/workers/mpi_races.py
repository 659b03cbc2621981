"""Races found by an adversarial review of the MPI backend, one scenario per
run (argv[1]); each failed before its fix.

cancel_send    an async large send cancelled (wait_for) while it waits for
               the receiver, then another send at once: the second arrives
               (its head once overtook the first's withdrawal)
withdrawn      a large send withdrawn before the receiver looked, then a
               small one of another shape: received (the withdrawn one's
               head once blocked every other shape)
queues         queued async sends and receives whose middle one times out
               waiting its turn: the others keep their order (the third
               once started early: lost, duplicated or torn messages)
cancel_storm   async receives cancelled at random while 600 messages arrive:
               each exactly once, in order
midflight      async receives of 1 MiB messages timing out while the data
               lands: every message intact (a retry once read a blank status)
turn_timeout   an async collective times out waiting for its turn: the group
               is broken on both ranks, every rank handles that, and the job
               ends cleanly (a counted collective that was never issued once
               left the other rank's pending, and the exit aborted)
exit_mid       rank 1 leaves while rank 0's 32 KiB async send to it waits
               (past Open MPI's eager size): PeerLostError, clean exit
exit_pending   rank 1 leaves asyncio.run with a receive pending: clean exit
               (its cancellation once ran after MPI_Finalize)
"""

import asyncio
import random
import sys
import time

import numpy as np

import aiocomm
from aiocomm import aio

from common import check

scenario = sys.argv[1]
BIG = (1 << 18,)  # float64: 2 MiB


async def cancel_send(r):
    if r == 0:
        x = np.full(BIG, 1.0)
        try:
            await asyncio.wait_for(aio.send(x, 1, timeout=30), 0.3)
        except asyncio.TimeoutError:
            pass
        else:
            raise AssertionError("a send nobody received completed")
        x[:] = -1.0
        await aio.send(np.full(BIG, 2.0), 1, timeout=30)
    else:
        await asyncio.sleep(1.0)
        check(aiocomm.recv(BIG, np.float64, 0, timeout=10), np.full(BIG, 2.0), "the send after a cancelled one")


def withdrawn(r):
    if r == 0:
        try:
            aiocomm.send(np.full(BIG, 1.0), 1, timeout=0.5)
        except aiocomm.CommTimeoutError:
            pass
        else:
            raise AssertionError("a send nobody received completed")
        aiocomm.send(np.arange(4.0), 1, timeout=10)
    else:
        time.sleep(1.5)
        check(aiocomm.recv((4,), np.float64, 0, timeout=5), np.arange(4.0), "a message after a withdrawn one")


async def queues(r):
    if r == 0:
        a = asyncio.create_task(aio.send(np.full(BIG, 1.0), 1, timeout=30))
        b = asyncio.create_task(aio.send(np.full(4, 9.0), 1, timeout=0.2))
        c = asyncio.create_task(aio.send(np.full(4, 3.0), 1, timeout=30))
        got = await asyncio.gather(a, b, c, return_exceptions=True)
        assert isinstance(got[1], aiocomm.CommTimeoutError), got
        assert not isinstance(got[0], BaseException) and not isinstance(got[2], BaseException), got
    else:
        await asyncio.sleep(1.0)
        check(aiocomm.recv(BIG, np.float64, 0, timeout=10), np.full(BIG, 1.0), "A")
        check(aiocomm.recv((4,), np.float64, 0, timeout=10), np.full(4, 3.0), "C")
    await aio.all_sum(np.zeros(1), timeout=30)
    for n in (4, 100_000):
        for rep in range(3):
            if r == 0:
                await asyncio.sleep(0.5)
                aiocomm.send(np.full(n, 1.0 + 10 * rep), 1, timeout=10)
                aiocomm.send(np.full(n, 2.0 + 10 * rep), 1, timeout=10)
            else:
                got = await asyncio.gather(aio.recv((n,), np.float64, 0, timeout=30),
                                           aio.recv((n,), np.float64, 0, timeout=0.2),
                                           aio.recv((n,), np.float64, 0, timeout=30), return_exceptions=True)
                assert isinstance(got[1], aiocomm.CommTimeoutError), got[1]
                check(got[0], np.full(n, 1.0 + 10 * rep), f"first of {n}, rep {rep}")
                check(got[2], np.full(n, 2.0 + 10 * rep), f"second of {n}, rep {rep}")
            await aio.all_sum(np.zeros(1), timeout=30)


async def cancel_storm(r):
    count = 600
    if r == 0:
        rnd = random.Random(2)
        for i in range(count):
            await aio.send(np.full(4, float(i)), 1, timeout=60)
            if rnd.random() < 0.3:
                await asyncio.sleep(rnd.choice([0.0002, 0.001, 0.003]))
    else:
        got, rnd = [], random.Random(1)
        while len(got) < count:
            try:
                x = await asyncio.wait_for(aio.recv((4,), np.float64, 0, timeout=60),
                                           rnd.choice([0.0001, 0.0005, 0.002, 1]))
            except asyncio.TimeoutError:
                continue
            assert np.all(x == x[0]), x
            got.append(int(x[0]))
        assert got == list(range(count)), [(i, v) for i, v in enumerate(got) if v != i][:5]


async def midflight(r):
    n, count = 131072, 60
    if r == 0:
        for i in range(count):
            await aio.send(np.full(n, float(i)), 1, timeout=60)
    else:
        timeouts = 0
        for i in range(count):
            wait = 0.0001 * (1 + (i * 7 + timeouts) % 30)
            while True:
                try:
                    got = await aio.recv((n,), np.float64, 0, timeout=wait)
                    break
                except aiocomm.CommTimeoutError:
                    timeouts += 1
            check(got, np.full(n, float(i)), f"message {i}")


async def turn_timeout(r):
    if r == 1:
        c1 = asyncio.create_task(aio.all_sum(np.ones(4), timeout=30))
        c2 = asyncio.create_task(aio.all_sum(np.ones(4), timeout=0.2))
        got = await asyncio.gather(c1, c2, return_exceptions=True)
        assert all(isinstance(e, aiocomm.CommError) for e in got), got
    else:
        await asyncio.sleep(1.0)
        for _ in range(2):
            try:
                aiocomm.all_sum(np.ones(4), timeout=8)
            except aiocomm.CommError as exc:
                assert "rank 1 gave up" in str(exc), exc
            else:
                raise AssertionError("a group rank 1 broke was usable")


async def exit_mid(r):
    if r == 0:
        start = time.monotonic()
        try:
            await aio.send(np.ones(4096), 1, timeout=20)
        except aiocomm.PeerLostError as exc:
            assert exc.culprit == 1 and time.monotonic() - start < 5, exc
        else:
            raise AssertionError("a send to a rank that left completed")
    else:
        await asyncio.sleep(0.5)
        raise SystemExit(0)


async def exit_pending(r):
    if r == 1:
        asyncio.get_running_loop().create_task(aio.recv((4,), np.float64, 0, timeout=60))
        await asyncio.sleep(0.2)
    await aio.all_sum(np.zeros(1), timeout=30)


world = aiocomm.init(strict=True)
rank = world.rank()
if scenario == "withdrawn":
    withdrawn(rank)
else:
    asyncio.run(globals()[scenario](rank))
print("OK mpi_races", flush=True)
