"""Collectives with a root (broadcast, gather), written only against
:class:`aiocomm.collectives.Link`, as the ring's reductions are (the
personalised exchanges, all_to_all and all_gather_v, are in
:mod:`aiocomm.exchanges`).

Theory of operation
-------------------
Each call begins with, or is, one :func:`~aiocomm.collectives.exchange`
between every pair of ranks on lane 0, and the call's signature names what
every rank must agree on (the root is part of the operation's name).  So a
rank that passes another root, shape or dtype, or calls another operation,
makes every rank raise ``MismatchError``: nobody waits for a message that the
disagreeing rank's pattern never sends, and nobody returns before it has
heard every other rank.  That first exchange costs one hop; for a small
message it carries the data itself.

Large broadcasts then move the data down a chain that starts at the root
(root -> root+1 -> ...), in segments, each forwarded as soon as it lands:
every link carries the message once, as in a pipelined ring, so the
broadcast runs at the speed of one link (bandwidth-optimal; a binomial tree
sends ``log2(size)`` copies from the root).
"""

from __future__ import annotations

import numpy as np

from .collectives import (
    SEGMENT_BYTES,
    SMALL_BYTES,
    Link,
    _seg_items,
    exchange,
    gathered_shape,
    segments,
)

_NOTHING = np.empty(0, np.uint8)


def _empties(n: int) -> list[np.ndarray]:
    return [np.empty(0, np.uint8) for _ in range(n)]


async def broadcast(link: Link, x: np.ndarray, root: int, *, segment_bytes: int = SEGMENT_BYTES) -> np.ndarray:
    """``root``'s ``x`` on every rank (a new array; others' ``x`` gives shape and dtype)."""
    n, r = link.size, link.rank
    out = np.array(x, order="C", copy=True) if r == root else np.empty(x.shape, x.dtype)
    flat = out.reshape(-1)
    if out.nbytes <= SMALL_BYTES:
        sends = [flat if r == root else _NOTHING] * n
        recvs = _empties(n)
        if r != root:
            recvs[root] = flat
        await exchange(link, sends, recvs)
        return out
    await exchange(link, [_NOTHING] * n, _empties(n))
    place = (r - root) % n  # this rank's place down the chain
    right, left = (r + 1) % n, (r - 1) % n
    parts = segments((0, flat.size), _seg_items(flat.dtype, segment_bytes))
    if place < n - 1:
        await link.open(right)
    if place == 0:
        for a, b in parts:
            link.push(right, 1, flat[a:b])
    else:
        posted = [link.post(left, 1, flat[a:b]) for a, b in parts]  # final memory: post them all now
        for (a, b), fut in zip(parts, posted, strict=True):
            await fut
            if place < n - 1:
                link.push(right, 1, flat[a:b])
    await link.flush()
    return out


async def gather(link: Link, x: np.ndarray, root: int) -> np.ndarray | None:
    """On ``root``, the arrays of all ranks concatenated along axis 0, in rank order; ``None`` elsewhere."""
    n, r = link.size, link.rank
    mine = np.ascontiguousarray(x).reshape(-1)
    if r == root:
        out = np.empty(gathered_shape(x.shape, n), x.dtype)
        flat = out.reshape(-1)
        m = mine.size
        blocks = [flat[p * m : (p + 1) * m] for p in range(n)]
        blocks[r][:] = mine
        await exchange(link, [_NOTHING] * n, blocks)
        return out
    sends = [_NOTHING] * n
    sends[root] = mine
    await exchange(link, sends, _empties(n))
    return None
