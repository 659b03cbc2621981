"""An asyncio program that keeps serving while it awaits collectives.

Each rank runs a tiny TCP "status" endpoint on loopback and a heartbeat timer
while it runs a series of all_sum and all_gather calls through aiocomm.aio.
Rank 0 queries its own endpoint five times as the rounds go by; each reply
reports the rounds done so far, so the replies show the work advancing while
the loop keeps serving.

    aiocomm-launch -n 4 examples/async_service.py [rounds]
"""

import asyncio
import sys

import numpy as np
import uvloop

from aiocomm import aio


async def main() -> None:
    world = await aio.init()
    rank, size = world.rank(), world.size()
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    state = {"done": 0, "beats": 0}  # rounds completed, heartbeats

    async def status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(f"rank {rank}: {state['done']}/{rounds} rounds done, {state['beats']} heartbeats\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(status, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def heartbeat() -> None:
        while True:
            state["beats"] += 1
            await asyncio.sleep(0.001)

    async def work() -> float:
        total = 0.0
        for i in range(rounds):
            x = np.full(10_000, rank + i, np.float64)
            total += float((await aio.all_sum(x))[0])
            await aio.all_gather(np.array([rank]))
            state["done"] = i + 1
        return total

    async def ask_status() -> list[str]:
        answers = []
        for k in range(5):
            while state["done"] < k * rounds // 5:  # spread the queries over the run
                await asyncio.sleep(0.001)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"status\n")
            answers.append((await reader.readline()).decode().strip())
            writer.close()
            await asyncio.sleep(0.002)
        return answers

    beat = asyncio.create_task(heartbeat())
    if rank == 0:
        total, answers = await asyncio.gather(work(), ask_status())
    else:
        total, answers = await work(), []
    beat.cancel()
    server.close()
    want = sum(sum(r + i for r in range(size)) for i in range(rounds))
    assert total == want, (total, want)
    if rank == 0:
        done = [int(a.split(": ")[1].split("/")[0]) for a in answers]
        assert done == sorted(done) and done[-1] > done[0], f"the replies show no progress: {answers}"
        print(f"{rounds} rounds of collectives on {size} ranks, total {total:.0f} (correct); "
              f"the loop stayed responsive: {len(answers)} status replies, {state['beats']} heartbeats")
        for a in answers:
            print("  status:", a)


uvloop.run(main())
