"""The personalised exchanges (all_to_all, all_gather_v), written only
against :class:`aiocomm.collectives.Link`, as the ring's reductions are.

Each is, or begins with, one :func:`~aiocomm.collectives.exchange` between
every pair of ranks, whose signature names what every rank must agree on
(see :mod:`aiocomm.rooted`).  Large uneven all-gathers then run the ring
all-gather over the agreed row counts.
"""

from __future__ import annotations

import numpy as np

from .collectives import SMALL_BYTES, Link, exchange, ring_all_gather


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
