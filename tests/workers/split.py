"""Group.split on the TCP ring, with collectives on subgroups and the world at once."""

import asyncio

import numpy as np
import uvloop

from aiocomm import aio

from common import check


async def main() -> None:
    world = await aio.init(strict=True)
    n, r = world.size(), world.rank()
    color = r % 2
    sub = await aio.split(color, key=n - r)  # keys reverse the order
    same = [k for k in range(n) if k % 2 == color]
    order = sorted(same, key=lambda k: n - k)
    assert sub.size() == len(same), (sub.size(), same)
    assert sub.rank() == order.index(r), (sub.rank(), order, r)

    # Collectives on both subgroups and on the world, all in flight at once.
    x = np.full((5, 2), r + 1, np.int64)
    s_sum, w_sum, s_gather, w_max = await asyncio.gather(
        aio.all_sum(x, group=sub),
        aio.all_sum(x * 10),
        aio.all_gather(np.array([r]), group=sub),
        aio.all_max(np.array([r, -r])),
    )
    check(s_sum, np.full((5, 2), sum(k + 1 for k in same), np.int64), "subgroup all_sum")
    check(w_sum, np.full((5, 2), 10 * sum(k + 1 for k in range(n)), np.int64), "world all_sum")
    check(s_gather, np.array(order), "subgroup all_gather in key order")
    check(w_max, np.array([n - 1, 0]), "world all_max")

    # Ties in key fall back to parent rank; negative keys mean parent rank.
    tie = await aio.split(0, key=0)
    assert tie.size() == n and tie.rank() == r
    neg = world.split  # the blocking form must refuse to run on the owning loop
    try:
        neg(0)
    except RuntimeError as exc:
        assert "deadlock" in str(exc), exc
    else:
        raise AssertionError("blocking split on the owning loop did not raise")

    # A split of a split, and send/recv inside a subgroup (group ranks, not world ranks).
    subsub = await aio.split(sub.rank() // 2, group=sub)
    got = await aio.all_gather(np.array(r), group=subsub)
    assert r in got.tolist() and len(got) == subsub.size()
    if sub.size() >= 2:
        if sub.rank() == 0:
            await aio.send(np.array([r]), 1, group=sub)
        elif sub.rank() == 1:
            check(await aio.recv((1,), np.int64, 0, group=sub), np.array([order[0]]), "send in subgroup")

    # A size-1 subgroup: collectives copy, send/recv refuse.
    alone = await aio.split(r)
    assert alone.size() == 1 and alone.rank() == 0
    check(await aio.all_sum(x, group=alone), x, "size-1 group")
    await aio.all_sum(np.zeros(1))
    print("OK split", flush=True)


uvloop.run(main())
