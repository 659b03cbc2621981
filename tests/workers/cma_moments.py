"""Point-to-point payloads written into the receive's memory (same host) at
unusual moments (argv: mode [args]).  Every line a test reads starts with a
word in capitals; ``ACROSS <bytes>`` is how much peers wrote into this
rank's memory (0 over TCP).

pairs:       every ordered pair of ranks, sizes around the threshold, several
             dtypes, several messages in a row (order), a receive of the wrong
             shape first (MismatchError, the message stays), a split group;
             the blocking face, then the async face.
late:        the receiver posts 0.5 s late: the sender's grace ends and the
             message goes the socket's way (eager or held), still intact;
             then both ranks send first and receive after (head to head),
             on both faces: no deadlock.
kill_mid ROLE:  rank 0 sends 64 MiB messages to rank 1 in a loop, each filled
             with its number; the rank named by ROLE (sender / receiver)
             SIGKILLs itself from a timer while transfers are under way
             (ROLE none: 12 messages, nobody killed).
             The survivor prints ``FAILED <class> at <time>``; every message
             received before is checked (``WRONG`` if one is torn).
cancel:      rank 0's async send of 4 MiB is cancelled (asyncio.wait_for) while
             its announcement waits; rank 0 then changes the array and sends
             a second message.  Rank 1's first receive must get the second
             message: the cancelled one is withdrawn, never sent from memory
             changed since.
shutdown:    like stopped, but after the timeout rank 1 shuts aiocomm down
             and fills new arrays of its own; the thawed sender must not
             write into them (the offered array outlives the engine).
threads:     the blocking face from a new thread for each call, in turn (the
             serialized rule): 4 messages of 8 MiB each way, written across.
two_stopped: as stopped, with two 4 MiB messages A then B and two receives
             that both time out: once rank 0 is thawed and writes both, the
             next two receives get A, then B.
stopped:     rank 0 SIGSTOPs itself once the RTS of a 32 MiB message is out;
             rank 1's receive, posted after that, offers its memory and
             times out; once the test thaws rank 0, it writes the message
             into that memory and it reaches rank 1's next receive intact.
"""

import asyncio
import gc
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

import aiocomm
from aiocomm import aio
from aiocomm.transport import cma

from common import recv_checked

mode = sys.argv[1]
world = aiocomm.init()
r, n = world.rank(), world.size()
mesh = world.engine.mesh
MiB = 1 << 20


def say(*parts: object) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (" ".join(map(str, parts)) + "\n").encode())


def message(src: int, dst: int, i: int, nbytes: int, dtype: str) -> np.ndarray:
    count = max(1, nbytes // np.dtype(dtype).itemsize)
    base = np.arange(count, dtype=np.int64) * 7 + src * 1000 + dst * 100 + i
    if dtype == "bool":
        return (base % 3 == 0)
    return base.astype(dtype)


async def freeze_once_announced(mesh: Any, count: int) -> None:
    """Once ``count`` messages to rank 1 are announced (their RTS written),
    SIGSTOP this process: before its loop reads any CTS (the test thaws it)."""
    while len(mesh.connections.outgoing[1].outbox.announced) < count:
        await asyncio.sleep(0)
    say("STOPPED")
    os.kill(os.getpid(), signal.SIGSTOP)


SIZES = [cma.CMA_FROM - 4, cma.CMA_FROM, cma.CMA_FROM + 3 * MiB + 12, 9 * MiB]  # around the threshold
DTYPES = ["float32", "int8", "float64", "bool", "uint16"]


def plan() -> list[tuple[int, int, int, str, int]]:
    """(src, dst, i, dtype, nbytes) of every message: three for each ordered pair."""
    out = []
    for src in range(n):
        for dst in range(n):
            if src != dst:
                for i in range(3):
                    out.append((src, dst, i, DTYPES[(src + dst + i) % len(DTYPES)], SIZES[(src + i) % len(SIZES)]))
    return out


if mode == "pairs":
    bad = []
    # the blocking face: each rank sends all it sends to one peer, then receives what that peer sent it
    for step in range(1, n):
        dst, src = (r + step) % n, (r - step) % n
        mine = [p for p in plan() if p[0] == r and p[1] == dst]
        theirs = [p for p in plan() if p[0] == src and p[1] == r]
        # even ranks send first; odd ranks receive first (sends of announced messages may wait for the receive)
        def send_all(mine: list = mine) -> None:
            for _, d, i, dtype, nbytes in mine:
                aiocomm.send(message(r, d, i, nbytes, dtype), d)

        def recv_all(theirs: list = theirs) -> None:
            for s, _, i, dtype, nbytes in theirs:
                recv_checked(message(s, r, i, nbytes, dtype), s, f"message {i} from rank {s} ({dtype}, {nbytes} bytes)",
                             bad, probe=i == 0)

        if r % 2 == 0:
            send_all()
            recv_all()
        else:
            recv_all()
            send_all()
    # a split group: ranks of one parity, in reverse order
    sub = world.split(r % 2, key=n - r)
    members = sorted((k for k in range(n) if k % 2 == r % 2), reverse=True)
    assert members[sub.rank()] == r
    if sub.size() > 1:
        right, left = (sub.rank() + 1) % sub.size(), (sub.rank() - 1) % sub.size()
        x = message(r, 9, 0, 5 * MiB, "float32")
        want = message(members[left], 9, 0, 5 * MiB, "float32")
        if sub.rank() % 2 == 0:
            aiocomm.send(x, right, group=sub)
            got = aiocomm.recv_like(want, left, group=sub)
        else:
            got = aiocomm.recv_like(want, left, group=sub)
            aiocomm.send(x, right, group=sub)
        if not np.array_equal(got, want):
            bad.append(f"the split group's message from rank {members[left]} differs")
    aiocomm.barrier()
    across_blocking = mesh.bytes_written_across

    # the async face: every message of every pair in flight at once
    async def main() -> None:
        sends = [aio.send(message(r, d, i, nbytes, dtype), d) for s, d, i, dtype, nbytes in plan() if s == r]
        wants = [(s, message(s, r, i, nbytes, dtype)) for s, d, i, dtype, nbytes in plan() if d == r]
        recvs = [aio.recv_like(want, s, timeout=30) for s, want in wants]
        results = await asyncio.gather(*sends, *recvs)
        for (s, want), got in zip(wants, results[len(sends):], strict=True):
            if not np.array_equal(got, want):
                bad.append(f"async message from {s} differs")

    aiocomm.barrier()
    asyncio.run(main())
    say("BAD" if bad else "OK", "; ".join(bad), "ACROSS", across_blocking, mesh.bytes_written_across)
elif mode == "late":
    x = message(r, 1 - r, 0, 16 * MiB, "float32")
    want = message(1 - r, r, 0, 16 * MiB, "float32")
    ok = True
    if r == 0:
        aiocomm.send(x, 1)
    else:
        time.sleep(0.5)
        ok &= bool(np.array_equal(aiocomm.recv_like(x, 0), message(0, 1, 0, 16 * MiB, "float32")))
    # head to head, blocking face
    aiocomm.send(x, 1 - r)
    ok &= bool(np.array_equal(aiocomm.recv_like(want, 1 - r, timeout=30), want))

    async def head_to_head() -> bool:
        await aio.send(x, 1 - r, timeout=30)
        got = await aio.recv_like(want, 1 - r, timeout=30)
        return bool(np.array_equal(got, want))

    ok &= asyncio.run(head_to_head())
    say("OK" if ok else "BAD", "ACROSS", mesh.bytes_written_across)
elif mode == "kill_mid":
    role = sys.argv[2]  # sender, receiver, or none (12 messages, nobody killed)
    victim = {"sender": 0, "receiver": 1}.get(role)
    N = 64 * MiB
    aiocomm.barrier()
    if r == victim:
        delay = 0.3 + random.random() * 0.4
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    say("READY")
    x = np.empty(N // 8, np.int64)
    for i in range(100_000 if victim is not None else 12):
        try:
            if r == 0:
                x.fill(i)
                aiocomm.send(x, 1, timeout=60)
            else:
                y = aiocomm.recv((N // 8,), np.int64, 0, timeout=60)
                if not (y[0] == i and y[-1] == i and np.all(y == i)):
                    say(f"WRONG message {i}")
                    break
        except aiocomm.CommError as exc:
            say(f"FAILED {type(exc).__name__} at {time.time():.3f}: {exc}".replace("\n", " | "))
            break
    say("DONE", "ACROSS", mesh.bytes_written_across, "after", i)
elif mode == "stopped":
    # (run with AIOCOMM_BUFFER_BYTES=8M: the 32 MiB message can go no other
    # way than into the memory the receive offered, once its sender wakes)
    N = 32 * MiB
    x = np.arange(N // 8, dtype=np.int64)
    aiocomm.barrier()
    if r == 0:
        async def send() -> None:
            task = asyncio.create_task(aio.send(x, 1, timeout=60))
            await freeze_once_announced(mesh, 1)
            await task

        asyncio.run(send())
        say("SENT")
    else:
        time.sleep(0.3)
        try:
            aiocomm.recv((N // 8,), np.int64, 0, timeout=1.0)
            say("RESULT the receive returned while the sender was frozen")
        except aiocomm.CommTimeoutError:
            say("TIMEDOUT")
        say("WAITING")
        y = aiocomm.recv((N // 8,), np.int64, 0, timeout=60)
        say("OK" if np.array_equal(y, x) else "WRONG", "ACROSS", mesh.bytes_written_across)
    aiocomm.barrier(timeout=60)
    say("DONE")
elif mode == "cancel":
    N = 4 * MiB

    async def main() -> str:
        await aio.barrier()
        if r == 0:
            x = np.ones(N, np.uint8)
            try:
                await asyncio.wait_for(aio.send(x, 1), 0.0005)
                outcome = "SENT"
            except asyncio.TimeoutError:
                outcome = "CANCELLED"
            x[:] = 7
            await asyncio.sleep(0.5)
            await aio.send(np.full(N, 2, np.uint8), 1)
            await aio.barrier(timeout=30)
            return outcome
        await asyncio.sleep(0.3)
        got = [int(v) for v in np.unique(await aio.recv((N,), np.uint8, 0, timeout=10))]
        if got == [1]:  # the first send was not cancelled in time: the second follows
            got = [int(v) for v in np.unique(await aio.recv((N,), np.uint8, 0, timeout=10))]
        await aio.barrier(timeout=30)
        return f"GOT {got}"

    say(asyncio.run(main()))
elif mode == "shutdown":
    N = 32 * MiB

    async def main() -> None:
        world = await aio.init()
        mesh = world.engine.mesh
        await aio.barrier()
        if r == 0:
            x = np.full(N, 0xAB, np.uint8)
            task = asyncio.create_task(aio.send(x, 1, timeout=30))
            await freeze_once_announced(mesh, 1)
            try:
                await task
            except aiocomm.CommError as exc:
                say("SEND", type(exc).__name__)
            return
        await asyncio.sleep(0.3)
        try:
            await aio.recv((N,), np.uint8, 0, timeout=1.0)
        except aiocomm.CommTimeoutError:
            say("TIMEDOUT")
        offered = [a.ctypes.data for a in mesh.offered.values()]
        await aio.shutdown()
        del mesh, world
        for name in ("mesh", "world"):  # (this module's own references, from its start)
            globals().pop(name, None)
        gc.collect()
        from aiocomm.transport import mesh as mesh_module  # (where what a sender may still write into is kept)

        kept = [a.ctypes.data for a in getattr(mesh_module, "_KEPT", [])]
        say("KEPT", sorted(offered) == sorted(set(kept) & set(offered)) and bool(offered))
        mine = []  # this program's own data from now on; were the offered memory freed, one would get it
        while len(mine) < 8 and not any(a.ctypes.data <= at < a.ctypes.data + N for a in mine for at in offered):
            mine.append(np.zeros(N, np.uint8))
        say("WAITING")
        time.sleep(2.0)  # (the test thaws rank 0 meanwhile)
        say("CHANGED", sum(int(np.count_nonzero(a)) for a in mine))

    asyncio.run(main())
elif mode == "two_stopped":
    # (run with AIOCOMM_BUFFER_BYTES=4M: neither message fits the credit, so
    # both wait for their CTS and are written into the offered memory)
    N = 4 * MiB

    async def main() -> None:
        mesh = world.engine.mesh
        await aio.barrier()
        if r == 0:
            tasks = [asyncio.create_task(aio.send(np.full(N, k, np.uint8), 1, timeout=60)) for k in (1, 2)]
            await freeze_once_announced(mesh, 2)
            await asyncio.gather(*tasks)
            say("SENT")
        else:
            await asyncio.sleep(0.3)
            outcomes = await asyncio.gather(*(aio.recv((N,), np.uint8, 0, timeout=1.0) for _ in range(2)),
                                            return_exceptions=True)
            say("TIMEDOUT", sum(isinstance(o, aiocomm.CommTimeoutError) for o in outcomes))
            say("WAITING")
            got = [int((await aio.recv((N,), np.uint8, 0, timeout=60))[0]) for _ in range(2)]
            say("GOT", got, "ACROSS", mesh.bytes_written_across)
        await aio.barrier(timeout=60)

    asyncio.run(main())
elif mode == "threads":
    N = 8 * MiB
    got: list[int] = []
    aiocomm.barrier()

    def call(fn) -> None:  # each call from a thread of its own, one at a time
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    for i in range(4):
        x = np.full(N, 10 * r + i, np.uint8)
        if r == 0:
            call(lambda x=x: aiocomm.send(x, 1, timeout=30))
            call(lambda: got.append(int(aiocomm.recv((N,), np.uint8, 1, timeout=30)[-1])))
        else:
            call(lambda: got.append(int(aiocomm.recv((N,), np.uint8, 0, timeout=30)[-1])))
            call(lambda x=x: aiocomm.send(x, 0, timeout=30))
    say("GOT", got, "ACROSS", mesh.bytes_written_across)
