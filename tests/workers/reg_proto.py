"""A ProtocolError on an accepted connection after its handshake: the rank
that saw it and the rank that broke the protocol must both learn the other
is lost (a collective between them fails on both, not just on one).
argv[1] is a file each rank creates when it is done: neither exits (which
would tell the other) before both are."""

import asyncio
import os
import sys
import time

import numpy as np

import aiocomm
import aiocomm.aio as aio
from aiocomm import wire

from rt_common import say

DONE = sys.argv[1]


async def main() -> None:
    world = await aio.init()
    r = world.rank()
    assert world.size() == 2
    mesh = aio._engine.mesh
    await aio.all_sum(np.ones(4), timeout=10)
    if r == 0:  # one frame that is not allowed on the connection rank 0 dialled to rank 1
        mesh.connections.outgoing[1].send_frame(wire.encode_frame_head(wire.Kind.CTS, 0, 0, b"", 0))
    for _ in range(300):  # until this rank knows its peer is lost (3 s at most)
        if 1 - r in mesh.lost:
            break
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    try:
        await aio.all_sum(np.ones(4), timeout=5)
        say("RESULT all_sum returned")
    except aiocomm.PeerLostError as exc:
        say(f"all_sum raised PeerLostError after {time.monotonic() - t0:.1f}s: {exc}")
        say("OK proto")
    except aiocomm.CommError as exc:
        say(f"all_sum raised {type(exc).__name__} after {time.monotonic() - t0:.1f}s: {exc}")
    open(f"{DONE}.{r}", "w").close()
    for _ in range(1500):
        if os.path.exists(f"{DONE}.{1 - r}"):
            break
        await asyncio.sleep(0.01)


asyncio.run(main())
