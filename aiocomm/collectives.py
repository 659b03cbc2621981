"""Collective algorithms, written only against an async send/recv interface.

Nothing here knows about sockets, groups or contexts: an algorithm gets a
:class:`Link` (one per collective call, already bound to its group, context
and sequence number) and group-local ranks.  Tests drive the same code over
an in-memory link.

Theory of operation
-------------------
The flattened array is cut into ``size`` nearly equal *blocks*, and each
block into *segments* of at most ``segment_bytes`` (an empty block still has
one empty segment, so every step moves at least one frame and its signature
is checked).  The ring algorithms then move segments, not blocks: a segment
received and reduced at step ``s`` is pushed to the right neighbour at once
as part of step ``s + 1``, so the link carries one segment while the next is
being reduced (gloo's pipelining).  Receives are posted ahead of time
(``window`` segments) so payloads land straight in their destination; the
reduction runs in place with a numpy ufunc (which releases the GIL).

Reduce-scatter: rank ``r`` first sends block ``r + shift - 1``; at step ``s``
it receives block ``r + shift - 2 - s`` from the left, folds its own values
in, and forwards it.  After ``size - 1`` steps block ``r + shift`` holds the
full reduction.  All-gather: rank ``r`` starts owning block ``r + shift``
and at step ``s`` receives block ``r + shift - 1 - s``, forwarding all but the
last.  All-reduce is reduce-scatter then all-gather with ``shift = 1``.

Small arrays (up to ``SMALL_BYTES``) are latency-bound instead: all-reduce
uses recursive doubling on power-of-two groups (``log2(size)`` swaps) and a
one-step exchange otherwise; all-gather and reduce-scatter use the exchange.

Safety of in-place buffers: a pushed segment may still sit in the event
loop's write buffer when the algorithm moves on.  It is never overwritten
before it has left: any data that lands on a pushed segment's memory
causally depends on the pushed bytes having been read by a peer.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Awaitable
from typing import Protocol

import numpy as np

from .config import size_env

#: Largest segment moved as one frame (``AIOCOMM_SEGMENT_BYTES`` overrides it,
#: which tests use to drive the multi-segment paths with small arrays).
SEGMENT_BYTES = size_env("AIOCOMM_SEGMENT_BYTES", 1 << 20, minimum=1)
#: Receives posted ahead of the one being reduced.
WINDOW = 8
#: Arrays up to this many bytes take the small-message algorithms instead of the ring
#: (``AIOCOMM_SMALL_BYTES`` overrides it).
SMALL_BYTES = size_env("AIOCOMM_SMALL_BYTES", 32 * 1024)

REDUCERS: dict[str, np.ufunc] = {"sum": np.add, "max": np.maximum, "min": np.minimum}


class Link(Protocol):
    """What a collective needs: ordered messages to and from group-local ranks.

    ``lane`` separates independent streams between the same pair inside one
    collective.  Messages on one (peer, lane) arrive in the order pushed.
    """

    rank: int
    size: int

    async def open(self, *peers: int) -> None:
        """Make sure ``push`` to these ranks can proceed."""

    def push(self, dst: int, lane: int, data: np.ndarray) -> None:
        """Queue ``data`` (contiguous) for ``dst``; returns at once."""

    def post(self, src: int, lane: int, out: np.ndarray) -> Awaitable[np.ndarray]:
        """Receive the next message from ``src`` on ``lane`` into ``out``."""

    async def flush(self) -> None:
        """Wait until everything pushed has left this process."""


def partition(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(count)``, sizes differing by at most one."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def segments(block: tuple[int, int], seg_items: int) -> list[tuple[int, int]]:
    """Cut a block into ranges of at most ``seg_items``; an empty block gives one empty range."""
    start, stop = block
    if start == stop:
        return [(start, stop)]
    return [(a, min(a + seg_items, stop)) for a in range(start, stop, seg_items)]


def _seg_items(dtype: np.dtype, segment_bytes: int) -> int:
    return max(1, segment_bytes // dtype.itemsize)


async def ring_reduce_scatter(
    link: Link,
    flat: np.ndarray,
    blocks: list[tuple[int, int]],
    ufunc: np.ufunc,
    shift: int,
    *,
    segment_bytes: int = SEGMENT_BYTES,
    window: int = WINDOW,
) -> None:
    """Reduce ``flat`` in place so block ``(rank + shift) % size`` holds the group's reduction."""
    n, r = link.size, link.rank
    right, left = (r + 1) % n, (r - 1) % n
    seg = _seg_items(flat.dtype, segment_bytes)
    await link.open(right)
    plan = [
        (step, a, b)
        for step in range(n - 1)
        for a, b in segments(blocks[(r + shift - 2 - step) % n], seg)
    ]
    depth = min(window, len(plan))
    # Everything for the right neighbour goes out in one FIFO, in the order it
    # posts its receives: the first block's segments, then each reduced
    # segment as it is forwarded.  The FIFO is paced: ``depth`` frames ahead
    # of the segments received here, matching the ``depth`` receives the
    # neighbour keeps posted, so its frames land in posted memory instead of
    # piling up as unexpected arrivals (up to a whole block of memory).
    outbox = collections.deque(segments(blocks[(r + shift - 1) % n], seg))
    sent = 0

    def send_allowed(credit: int) -> None:
        nonlocal sent
        while outbox and sent < credit:
            oa, ob = outbox.popleft()
            link.push(right, 0, flat[oa:ob])
            sent += 1

    send_allowed(max(depth, 1))
    scratch = [np.empty(min(seg, flat.size), flat.dtype) for _ in range(depth)]
    posted: collections.deque[Awaitable[np.ndarray]] = collections.deque()
    for i in range(depth):
        _, a, b = plan[i]
        posted.append(link.post(left, 0, scratch[i][: b - a]))
    for i, (step, a, b) in enumerate(plan):
        incoming = await posted.popleft()
        target = flat[a:b]
        ufunc(target, incoming, out=target)
        if i + depth < len(plan):
            _, na, nb = plan[i + depth]
            posted.append(link.post(left, 0, scratch[i % depth][: nb - na]))
        if step < n - 2:
            outbox.append((a, b))
        send_allowed(max(depth, 1) + i + 1)
    send_allowed(sent + len(outbox))  # what is left (blocks of unequal segment counts)


def _all_gather_plan(
    n: int, r: int, blocks: list[tuple[int, int]], shift: int, seg: int
) -> list[tuple[int, int, int]]:
    return [
        (step, a, b)
        for step in range(n - 1)
        for a, b in segments(blocks[(r + shift - 1 - step) % n], seg)
    ]


def post_all_gather(
    link: Link,
    flat: np.ndarray,
    blocks: list[tuple[int, int]],
    shift: int,
    *,
    lane: int = 0,
    segment_bytes: int = SEGMENT_BYTES,
) -> list[Awaitable[np.ndarray]]:
    """Post every receive of :func:`ring_all_gather` now, straight into
    ``flat``.  An all-reduce does this before its reduce-scatter (on another
    lane), so the all-gather's frames never arrive unexpected: each of them
    carries a final value that causally follows this rank's contribution to
    that region, so it cannot land before this rank is done with it."""
    n, r = link.size, link.rank
    plan = _all_gather_plan(n, r, blocks, shift, _seg_items(flat.dtype, segment_bytes))
    return [link.post((r - 1) % n, lane, flat[a:b]) for _, a, b in plan]


async def ring_all_gather(
    link: Link,
    flat: np.ndarray,
    blocks: list[tuple[int, int]],
    shift: int,
    *,
    lane: int = 0,
    posted: list[Awaitable[np.ndarray]] | None = None,
    segment_bytes: int = SEGMENT_BYTES,
) -> None:
    """Fill every block of ``flat``; rank ``r`` starts owning block ``(r + shift) % size``."""
    n, r = link.size, link.rank
    right = (r + 1) % n
    seg = _seg_items(flat.dtype, segment_bytes)
    await link.open(right)
    if posted is None:
        # Every destination is final memory, so post all receives up front.
        posted = post_all_gather(link, flat, blocks, shift, lane=lane, segment_bytes=segment_bytes)
    for a, b in segments(blocks[(r + shift) % n], seg):
        link.push(right, lane, flat[a:b])
    plan = _all_gather_plan(n, r, blocks, shift, seg)
    for (step, a, b), fut in zip(plan, posted, strict=True):
        await fut
        if step < n - 2:
            link.push(right, lane, flat[a:b])


async def exchange_reduce(link: Link, blocks: list[np.ndarray], ufunc: np.ufunc) -> np.ndarray:
    """One step for small arrays: send ``blocks[p]`` to every rank ``p`` and
    reduce the blocks received for this rank, in rank order.

    Latency is one hop instead of the ring's ``2(size - 1)``; every rank
    combines the same values in the same order, so where several ranks compute
    the same block (all-reduce) they get bit-identical results.
    """
    n, r = link.size, link.rank
    peers = [p for p in range(n) if p != r]
    await link.open(*peers)
    for p in peers:
        link.push(p, 0, blocks[p])
    mine = blocks[r]
    parts = np.empty((n, mine.size), mine.dtype)
    parts[r] = mine.reshape(-1)
    posted = [link.post(p, 0, parts[p]) for p in peers]
    for fut in posted:
        await fut
    out: np.ndarray = ufunc(parts[0], parts[1])
    for k in range(2, n):
        ufunc(out, parts[k], out=out)
    await link.flush()
    return out


async def doubling_reduce(link: Link, x: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """Recursive doubling for a power-of-two group: ``log2(size)`` steps; at
    step ``k`` rank ``r`` swaps its partial result with rank ``r ^ 2**k``.

    Each rank sends ``log2(size)`` frames instead of the exchange's
    ``size - 1`` (for 2 ranks: one swap, with less bookkeeping than the
    exchange).  Both partners combine the lower rank's partial first, so
    every rank ends with bit-identical values.
    """
    r = link.rank
    peers = _doubling_partners(link.size, r)
    await link.open(*peers)
    flat = x.ndim == 1
    acc = x if flat else x.reshape(-1)
    got = np.empty((len(peers), acc.size), acc.dtype)
    for step, peer in enumerate(peers):
        link.push(peer, step, acc)
        theirs = await link.post(peer, step, got[step])
        acc = ufunc(acc, theirs) if r < peer else ufunc(theirs, acc)
    await link.flush()
    return acc if flat else acc.reshape(x.shape)


@functools.lru_cache(maxsize=256)
def _doubling_partners(n: int, r: int) -> tuple[int, ...]:
    """Rank ``r``'s partner at each step of recursive doubling over ``n`` (a power of two) ranks."""
    return tuple(r ^ (1 << step) for step in range(n.bit_length() - 1))


def all_reduce(link: Link, x: np.ndarray, op: str) -> Awaitable[np.ndarray]:
    """Element-wise reduction of ``x`` over the group; ``x`` is left untouched.

    Picks the algorithm and returns its coroutine (no extra frame to resume
    on every wake-up of a small operation).
    """
    n = link.size
    if n > 1 and x.nbytes <= SMALL_BYTES:
        if n & (n - 1) == 0:  # a power of two: recursive doubling (for 2 ranks, one swap)
            return doubling_reduce(link, x, REDUCERS[op])
        return _exchange_all_reduce(link, x, op)
    return _ring_all_reduce(link, x, op)


async def _exchange_all_reduce(link: Link, x: np.ndarray, op: str) -> np.ndarray:
    flat = x.reshape(-1)
    return (await exchange_reduce(link, [flat] * link.size, REDUCERS[op])).reshape(x.shape)


async def _ring_all_reduce(link: Link, x: np.ndarray, op: str) -> np.ndarray:
    out = np.array(x, order="C", copy=True)
    if link.size == 1:
        return out
    await ring_all_reduce_in_place(link, out.reshape(-1), op)
    return out


async def ring_all_reduce_in_place(link: Link, flat: np.ndarray, op: str) -> None:
    """The ring all-reduce of a contiguous 1-d array, in place."""
    blocks = partition(flat.size, link.size)
    gathered = post_all_gather(link, flat, blocks, 1, lane=1)
    await ring_reduce_scatter(link, flat, blocks, REDUCERS[op], 1)
    await ring_all_gather(link, flat, blocks, 1, lane=1, posted=gathered)
    await link.flush()


def gathered_shape(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    if not shape:
        return (size,)
    return (shape[0] * size, *shape[1:])


async def all_gather(link: Link, x: np.ndarray) -> np.ndarray:
    """Arrays of all ranks concatenated along axis 0, in rank order."""
    n = link.size
    out = np.empty(gathered_shape(x.shape, n), x.dtype)
    flat = out.reshape(-1)
    m = x.size
    flat[link.rank * m : (link.rank + 1) * m] = x.reshape(-1)
    if n == 1:
        return out
    if out.nbytes <= SMALL_BYTES:
        # One step: send our block to everyone, receive theirs in place.
        peers = [p for p in range(n) if p != link.rank]
        await link.open(*peers)
        mine = flat[link.rank * m : (link.rank + 1) * m]
        for p in peers:
            link.push(p, 0, mine)
        for fut in [link.post(p, 0, flat[p * m : (p + 1) * m]) for p in peers]:
            await fut
    else:
        await ring_all_gather(link, flat, [(i * m, (i + 1) * m) for i in range(n)], 0)
    await link.flush()
    return out


def scattered_shape(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    if not shape:
        raise ValueError("sum_scatter needs an array with at least one dimension, got a 0-d array")
    if shape[0] % size:
        raise ValueError(
            f"sum_scatter: first dimension {shape[0]} of shape {shape} is not divisible by the group size {size}"
        )
    return (shape[0] // size, *shape[1:])


async def reduce_scatter(link: Link, x: np.ndarray, op: str) -> np.ndarray:
    """This rank's block (along axis 0) of the reduction of ``x`` over the group."""
    n, r = link.size, link.rank
    shape = scattered_shape(x.shape, n)
    if n == 1:
        return np.array(x, order="C", copy=True)
    if x.nbytes <= SMALL_BYTES:
        flat = x.reshape(-1)
        m = flat.size // n
        out = await exchange_reduce(link, [flat[p * m : (p + 1) * m] for p in range(n)], REDUCERS[op])
        return out.reshape(shape)
    work = np.array(x, order="C", copy=True).reshape(-1)
    m = work.size // n
    blocks = [(i * m, (i + 1) * m) for i in range(n)]
    await ring_reduce_scatter(link, work, blocks, REDUCERS[op], 0)
    await link.flush()
    mine: np.ndarray = work[r * m : (r + 1) * m].reshape(shape).copy()
    return mine


_NOTHING = np.empty(0, np.uint8)


async def exchange(link: Link, sends: list[np.ndarray], recvs: list[np.ndarray], lane: int = 0) -> None:
    """One step between every pair: ``sends[p]`` goes to rank ``p`` and
    ``recvs[p]`` is filled from it (this rank's own entries are ignored).

    Every rank hears from every other, so each compares its call's
    signature with every other rank's: ranks that disagree (another
    operation, root, shape or dtype) make every rank raise
    :class:`~aiocomm.MismatchError`, whatever the data pattern of the call.
    """
    n, r = link.size, link.rank
    peers = [p for p in range(n) if p != r]
    await link.open(*peers)
    for p in peers:
        link.push(p, lane, sends[p])
    for fut in [link.post(p, lane, recvs[p]) for p in peers]:
        await fut
    await link.flush()


async def barrier(link: Link) -> None:
    """Returns once every rank of the group has entered (one exchange of empty frames)."""
    nothing = [_NOTHING] * link.size
    await exchange(link, nothing, [np.empty(0, np.uint8) for _ in range(link.size)])
