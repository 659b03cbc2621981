"""Survivors carry on: agree and shrink with ranks that die at chosen moments.

    survivors.py before V          rank V dies before anything; the rest agree and shrink
    survivors.py moment V N [V2 N2] rank V dies just before its N-th agreement message
                                   (V2 at its N2-th), during agree(...) then shrink()
    survivors.py frozen V          rank V stops (SIGSTOP) before agree; the rest give up on it
    survivors.py slow V            rank V comes 1.5 s late: nobody may leave it out
    survivors.py chain V1 V2 V3    ranks die one after another, a shrink after each
    survivors.py async V           the async face (aio.agree, aio.shrink) on a split group; V dies
    survivors.py mpi               under mpirun: agree and shrink say what the MPI library lacks
    survivors.py stall V N HOW     rank V stands still for 3 s at its N-th agreement message (HOW:
                                   stop = SIGSTOP, woken from outside; sleep = its loop blocked);
                                   the rest give up on it, and it must never carry on alone
    survivors.py blame V           (under aiocomm-launch --on-failure continue) V dies, the rest
                                   shrink; rank 0 then fails on its own (exit 3) after the others end

Each survivor prints what it agreed on; the test checks every survivor printed the same.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

import aiocomm
from aiocomm.backends import agreement

mode, rest = sys.argv[1], [int(a) for a in sys.argv[2:]]
world = aiocomm.init(backend="mpi" if mode == "mpi" else "any")
rank, size = world.rank(), world.size()
T = float(os.environ.get("SURVIVORS_TIMEOUT", "20"))


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def die_at_message(n: int) -> None:
    """Die just before this rank's ``n``-th agreement message leaves."""
    send = agreement.Agreement._send
    count = [0]

    def counting(self, k, msg):  # type: ignore[no-untyped-def]
        count[0] += 1
        if count[0] == n:
            die()
        return send(self, k, msg)

    agreement.Agreement._send = counting  # type: ignore[method-assign]


def report(group: aiocomm.Group, what: str) -> aiocomm.Group:
    """Use the group; a member that died during the shrink that made it (after
    the last agreement counted it) fails the call on every rank: shrink again."""
    while True:
        try:
            total = aiocomm.all_sum(np.array([group.members[group.rank()] + 1]), group=group, timeout=T)
        except aiocomm.CommError:
            group = group.shrink(timeout=T)
            continue
        print(f"{what} size {group.size()} members {list(group.members)} sum {int(total[0])}", flush=True)
        return group


def expect_failure() -> None:
    try:
        aiocomm.all_sum(np.ones(3), timeout=T)
    except aiocomm.CommError as exc:
        print(f"FAILED {type(exc).__name__}", flush=True)
    else:
        print("FAILED nothing", flush=True)


if mode == "before":
    if rank == rest[0]:
        die()
    expect_failure()
    value = world.agree(True, timeout=T)
    print(f"AGREE {value} failed {world.failed()}", flush=True)
    report(world.shrink(timeout=T), "SHRINK")
elif mode == "moment":
    for victim, n in zip(rest[0::2], rest[1::2], strict=True):
        if rank == victim:
            die_at_message(n)
    value = world.agree(rank != 1, timeout=T)
    print(f"AGREE {value} failed {world.failed()}", flush=True)
    report(world.shrink(timeout=T), "SHRINK")
elif mode == "frozen":
    aiocomm.all_sum(np.ones(1))
    if rank == rest[0]:
        os.kill(os.getpid(), signal.SIGSTOP)  # (the test wakes it once the others are done)
        try:
            world.agree(True, timeout=T)
        except aiocomm.CommError as exc:
            print(f"EXCLUDED {exc}", flush=True)
        else:
            print("NOT EXCLUDED", flush=True)
        try:
            world.shrink(timeout=T)
        except aiocomm.CommError:
            print("EXCLUDED AGAIN", flush=True)
        sys.exit(0)
    value = world.agree(True, timeout=T)
    print(f"AGREE {value} failed {world.failed()}", flush=True)
    report(world.shrink(timeout=T), "SHRINK")
    print("SURVIVOR DONE", flush=True)
    time.sleep(3)  # (the woken rank finds the connections it had closed)
elif mode == "slow":
    if rank == rest[0]:
        time.sleep(1.5)
    value = world.agree(rank != rest[0], timeout=T)
    print(f"AGREE {value} failed {world.failed()}", flush=True)
    report(world.shrink(timeout=T), "SHRINK")
elif mode == "chain":
    group = world
    for step, victim in enumerate(rest):
        if group.members[group.rank()] == victim:
            die()
        try:
            aiocomm.all_sum(np.ones(2), group=group, timeout=T)
        except aiocomm.CommError:
            pass
        group = report(group.shrink(timeout=T), f"STEP {step}")
elif mode == "async":
    import asyncio

    from aiocomm import aio

    async def main() -> None:
        evens = await aio.split(rank % 2, group=world)  # a split group: ranks 0, 2, 4 / 1, 3, 5
        if rank == rest[0]:
            die()
        try:
            await aio.all_sum(np.ones(2), group=evens, timeout=T)
        except aiocomm.CommError:
            pass
        value = await aio.agree(True, group=evens, timeout=T)
        print(f"AGREE {value} failed {evens.failed()}", flush=True)
        smaller = await aio.shrink(group=evens, timeout=T)
        total = await aio.all_sum(np.array([rank + 1]), group=smaller, timeout=T)
        print(f"SHRINK size {smaller.size()} members {list(smaller.members)} sum {int(total[0])}", flush=True)

    asyncio.run(main())
elif mode == "stall":
    victim, n = rest[0], rest[1]
    how = os.environ["SURVIVORS_STALL"]
    aiocomm.all_sum(np.ones(1))
    if rank == victim:
        import subprocess

        send = agreement.Agreement._send
        count = [0]

        def stalling(self, k, msg):  # type: ignore[no-untyped-def]
            count[0] += 1
            if count[0] == n:
                if how == "sleep":
                    time.sleep(3)  # (the loop blocked: user code, a long collection, swapping)
                else:
                    subprocess.Popen(["sh", "-c", f"sleep 3; kill -CONT {os.getpid()}"])
                    os.kill(os.getpid(), signal.SIGSTOP)
            return send(self, k, msg)

        agreement.Agreement._send = stalling  # type: ignore[method-assign]
        try:
            world.agree(True, timeout=T)
            print(f"VICTIM AGREED failed {world.failed()}", flush=True)
            g = world.shrink(timeout=T)
            print(f"VICTIM SHRANK to {list(g.members)}", flush=True)
        except aiocomm.CommError as exc:
            print(f"VICTIM OUT {exc}", flush=True)
    else:
        value = world.agree(True, timeout=T)
        print(f"AGREE {value} failed {world.failed()}", flush=True)
        report(world.shrink(timeout=T), "SHRINK")
        time.sleep(4)  # (until the victim woke and found out)
elif mode == "blame":
    if rank == rest[0]:
        die()
    expect_failure()  # (a PeerLostError naming the dead rank: caught, and recorded for the launcher)
    report(world.shrink(timeout=T), "SHRINK")
    if rank == 0:
        time.sleep(1.0)  # the others have ended: this failure is the job's
        sys.exit(3)
elif mode == "mpi":
    for call in (lambda: world.agree(True), world.shrink):
        try:
            call()
        except aiocomm.CommError as exc:
            print(f"REFUSED {exc}", flush=True)
        else:
            print("NOT REFUSED", flush=True)
else:
    raise SystemExit(f"unknown mode {mode}")
