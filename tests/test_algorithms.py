"""The collective algorithms over an in-memory link (fast; the TCP tests are the proof)."""

import asyncio
import collections
from functools import reduce

import numpy as np
import pytest

from aiocomm import collectives


class MemoryLink:
    """Ordered queues between ranks of one process."""

    def __init__(self, rank, size, queues):
        self.rank, self.size, self.queues = rank, size, queues
        self.sent_bytes = 0

    async def open(self, *peers):
        pass

    def push(self, dst, lane, data):
        self.sent_bytes += data.nbytes
        self.queues[(self.rank, dst, lane)].put_nowait(data.copy())

    async def post(self, src, lane, out):
        data = await self.queues[(src, self.rank, lane)].get()
        assert data.nbytes == out.nbytes
        out[...] = data.reshape(out.shape)
        return out

    async def flush(self):
        pass


async def run_all(size, fn):
    queues = collections.defaultdict(asyncio.Queue)
    links = [MemoryLink(r, size, queues) for r in range(size)]
    results = await asyncio.wait_for(asyncio.gather(*(fn(link) for link in links)), 10)
    return results, links


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("count", [0, 1, 3, 17, 1000])
@pytest.mark.parametrize("segment", [4, 64, 1 << 20])
def test_all_reduce_any_size(size, count, segment, monkeypatch):
    monkeypatch.setattr(collectives, "SEGMENT_BYTES", segment)
    inputs = [np.arange(count, dtype=np.int64) * (r + 1) for r in range(size)]

    async def body(link):
        flat = inputs[link.rank].copy()
        if size > 1:
            blocks = collectives.partition(count, size)
            await collectives.ring_reduce_scatter(link, flat, blocks, np.add, 1, segment_bytes=segment)
            await collectives.ring_all_gather(link, flat, blocks, 1, segment_bytes=segment)
        return flat

    results, links = asyncio.run(run_all(size, body))
    for got in results:
        assert np.array_equal(got, reduce(np.add, inputs))
    if size > 1 and count:
        # Bandwidth-optimal: each rank sends 2(n-1)/n of the array.
        for link in links:
            per_block = [b - a for a, b in collectives.partition(count, size)]
            assert link.sent_bytes <= 2 * (size - 1) * max(per_block) * 8


@pytest.mark.parametrize("size", [2, 3, 4])
def test_reduce_scatter_and_all_gather(size):
    inputs = [np.arange(size * 6, dtype=np.float64).reshape(size * 2, 3) + r for r in range(size)]

    async def body(link):
        return (await collectives.reduce_scatter(link, inputs[link.rank], "max"),
                await collectives.all_gather(link, inputs[link.rank]))

    results, _ = asyncio.run(run_all(size, body))
    total = reduce(np.maximum, inputs)
    for r, (scattered, gathered) in enumerate(results):
        assert np.array_equal(scattered, total[r * 2:(r + 1) * 2])
        assert np.array_equal(gathered, np.concatenate(inputs))


def test_partition_and_segments():
    assert collectives.partition(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert collectives.partition(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert collectives.segments((3, 3), 10) == [(3, 3)]
    assert collectives.segments((0, 25), 10) == [(0, 10), (10, 20), (20, 25)]


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])  # 4 and 8: recursive doubling for all_reduce
@pytest.mark.parametrize("op", ["sum", "max"])
def test_small_exchange_path(size, op, monkeypatch):
    monkeypatch.setattr(collectives, "SMALL_BYTES", 1 << 20)
    inputs = [np.arange(size * 4, dtype=np.float32) * (r - 1) for r in range(size)]

    async def body(link):
        return (await collectives.all_reduce(link, inputs[link.rank], op),
                await collectives.reduce_scatter(link, inputs[link.rank], op),
                await collectives.all_gather(link, inputs[link.rank]))

    results, _links = asyncio.run(run_all(size, body))
    ufunc = collectives.REDUCERS[op]
    total = reduce(ufunc, inputs)
    for r, (reduced, scattered, gathered) in enumerate(results):
        assert np.array_equal(reduced, total)
        assert np.array_equal(scattered, total[r * 4:(r + 1) * 4])
        assert np.array_equal(gathered, np.concatenate(inputs))


@pytest.mark.parametrize("size", [4, 8])
def test_doubling_is_bit_identical_on_every_rank(size):
    # Float sums depend on the order of combination: every rank must combine
    # the same partials in the same order, or results differ in the last bits.
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal(33).astype(np.float32) * 10 ** r for r in range(size)]

    async def body(link):
        return await collectives.all_reduce(link, inputs[link.rank], "sum")

    results, links = asyncio.run(run_all(size, body))
    for got in results[1:]:
        assert got.tobytes() == results[0].tobytes()
    np.testing.assert_allclose(results[0], reduce(np.add, [x.astype(np.float64) for x in inputs]), rtol=1e-5)
    # log2(size) frames per rank instead of size - 1.
    assert all(link.sent_bytes == (size.bit_length() - 1) * 33 * 4 for link in links)
