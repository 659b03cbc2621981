"""Collectives with a root (broadcast, gather) and the personalised
exchanges (all_to_all, all_gather_v), written only against
:class:`aiocomm.collectives.Link`, as the ring's reductions are.

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
sends ``log2(size)`` copies from the root).  Large uneven all-gathers run
the ring all-gather over the agreed row counts.
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
    ring_all_gather,
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


def split_rows(shape: tuple[int, ...], size: int, what: str) -> int:
    """Rows per block when axis 0 of ``shape`` is cut into ``size`` blocks (``ValueError`` if it cannot be)."""
    if not shape:
        raise ValueError(f"{what} needs an array with at least one dimension, got a 0-d array")
    if shape[0] % size:
        raise ValueError(
            f"{what}: first dimension {shape[0]} of shape {shape} is not divisible by the group size {size}"
        )
    return shape[0] // size


async def all_to_all(link: Link, x: np.ndarray) -> np.ndarray:
    """``x`` cut along axis 0 into ``size`` blocks, block ``p`` sent to rank ``p``;
    the blocks received, concatenated in rank order."""
    n, r = link.size, link.rank
    split_rows(x.shape, n, "all_to_all")
    src = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(x.shape, x.dtype)
    flat = out.reshape(-1)
    m = src.size // n
    sends = [src[p * m : (p + 1) * m] for p in range(n)]
    recvs = [flat[p * m : (p + 1) * m] for p in range(n)]
    recvs[r][:] = sends[r]
    await exchange(link, sends, recvs)
    return out


async def all_gather_v(link: Link, x: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The arrays of all ranks concatenated along axis 0, whose lengths may
    differ; and each rank's length.  A 0-d ``x`` counts as one row."""
    n, r = link.size, link.rank
    rows = x.reshape(1, *x.shape) if x.ndim == 0 else x
    counts = np.empty((n, 1), np.int64)
    counts[r] = rows.shape[0]
    await exchange(link, [counts[r]] * n, list(counts))
    lengths = [int(c) for c in counts[:, 0]]
    row_items = int(np.prod(rows.shape[1:], dtype=np.int64))
    out = np.empty((sum(lengths), *rows.shape[1:]), x.dtype)
    flat = out.reshape(-1)
    starts = np.concatenate([[0], np.cumsum(lengths)]) * row_items
    blocks = [(int(starts[p]), int(starts[p + 1])) for p in range(n)]
    a, b = blocks[r]
    flat[a:b] = rows.reshape(-1)
    if out.nbytes <= SMALL_BYTES:
        mine = flat[a:b]
        await exchange(link, [mine] * n, [flat[s:e] for s, e in blocks], lane=1)
    else:
        await ring_all_gather(link, flat, blocks, 0, lane=1)
        await link.flush()
    return out, lengths
