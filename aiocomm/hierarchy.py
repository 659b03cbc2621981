"""Two-level collectives: inside each host through shared memory, between
hosts over one ring per local rank.

Written only against two interfaces: a host's shared-memory
:class:`~aiocomm.shm.Channel` (its barriers and slot halves) and
:class:`Cross`, which runs a coroutine of :mod:`aiocomm.collectives` over a
:class:`~aiocomm.collectives.Link` to the ranks of the other hosts.  The ring
backend (:mod:`aiocomm.backends.two_level`) decides when a group uses them
and hands them over.

Theory of operation
-------------------
A group's ranks are grouped by host (:class:`Layout`): hosts in the order of
their lowest group rank, and on each host its ranks in group order (their
*local* index).  With ``F`` the fewest ranks any host has, local ranks
``0 .. F-1`` of every host are *owners*: owner ``j`` of each host joins ring
``j``, the ring of the owners ``j`` of all hosts, with one TCP flow between
neighbouring hosts.  So a host with ``L`` ranks moves its traffic over
``F <= L`` flows, each carrying ``1/F`` of it (Horovod's hierarchical
all-reduce, Open MPI's HAN); ranks beyond ``F`` (uneven layouts) take part
only inside their host.

The array is cut into *chunks* (at most half a slot each, at least
:data:`MIN_CHUNK_BYTES`, about :data:`CHUNKS` of them), and every chunk into
``F`` *pieces*, piece ``j`` for owner ``j``.  For every chunk, three phases:

1. *collect* (shared memory): every local rank writes its part of the chunk
   into its input slot; a barrier; owner ``j`` reduces (or, for all_gather,
   gathers) piece ``j`` from every local rank's slot.
2. *cross* (TCP, on the event loop): owner ``j`` runs ring ``j`` on its
   piece: an all-reduce, a reduce-scatter or an all-gather among hosts.
3. *spread* (shared memory): owners write what their host needs of the
   result into their output slot; a barrier; every local rank copies out
   what it needs.

Phases of different chunks overlap: while the cross phase of chunk ``c``
runs on the loop, this thread collects chunks ``c+1 .. c+DEPTH`` and
spreads chunk ``c-1``.  Every local rank runs the same barriers in the same
order; a chunk takes the slot halves of its parity, so a rank writes the
next chunk while a slower peer still reads this one (see
:meth:`~aiocomm.shm.Channel.input_half`).  A call of one chunk writes its
data before the call's first barrier (in the input half of that barrier's
parity, as the channel's own small calls do), which then serves as the
collect barrier too: two barriers in all.

Results are the same bits on every rank: each piece is reduced once (inside
the host in local order, between hosts in ring order) and then copied.

Failures: a rank that gives up marks its host's channel broken (its local
peers see it at their next barrier or while they wait for their own cross
phase) and aborts the group over TCP (the other hosts' waits end).
Mismatched calls: the first barrier inside each host compares the call's
signature; every frame between hosts carries it too.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import collectives
from .collectives import Link, partition
from .errors import CommTimeoutError
from .shm import Channel, Health

#: A chunk is at least this big (unless the whole array is smaller) ...
MIN_CHUNK_BYTES = 256 << 10
#: ... and the array is cut into about this many chunks when it is big enough.
CHUNKS = 16
#: Chunks whose cross phase may be in flight while this thread collects the next.
DEPTH = 3
#: Seconds between two looks at the host's channel while waiting for a cross phase.
LOOK_SECONDS = 0.02


@dataclass(frozen=True)
class Layout:
    """Where a group's ranks are: which share a host, and this rank's place."""

    hosts: tuple[tuple[int, ...], ...]  # group ranks on each host, in group order
    host: int  # this rank's host (index into hosts)
    local: int  # this rank's index on its host

    @classmethod
    def of(cls, host_ids: Sequence[int], rank: int) -> Layout:
        """From every group rank's host id: hosts in the order of their lowest rank."""
        by_host: dict[int, list[int]] = {}
        for g, h in enumerate(host_ids):
            by_host.setdefault(int(h), []).append(g)
        hosts = tuple(tuple(ranks) for ranks in by_host.values())
        host = next(i for i, ranks in enumerate(hosts) if rank in ranks)
        return cls(hosts, host, hosts[host].index(rank))

    @property
    def flows(self) -> int:
        """Rings between hosts (``F``): the fewest ranks any host has."""
        return min(len(ranks) for ranks in self.hosts)

    def worth_it(self) -> bool:
        """Two levels pay when the group spans hosts and some host has several ranks."""
        return len(self.hosts) >= 2 and max(len(ranks) for ranks in self.hosts) >= 2

    @property
    def owner(self) -> bool:
        return self.local < self.flows

    def ring(self, j: int) -> tuple[int, ...]:
        """The group ranks of ring ``j``: owner ``j`` of each host, in host order."""
        return tuple(ranks[j] for ranks in self.hosts)

    @property
    def rows(self) -> tuple[int, ...]:
        """Every group rank, host by host (the order of blocks between hosts)."""
        return tuple(g for ranks in self.hosts for g in ranks)

    @property
    def starts(self) -> tuple[int, ...]:
        """The first row of each host in :attr:`rows`."""
        out, at = [], 0
        for ranks in self.hosts:
            out.append(at)
            at += len(ranks)
        return tuple(out)


class Cross(Protocol):
    """The TCP side of one call: this rank's ring between hosts (its size is
    the number of hosts, its rank this rank's host)."""

    def start(self, body: Body) -> concurrent.futures.Future[None]:
        """Run ``body(link)`` on the event loop as the next part of this call;
        a failure there aborts the group on every rank."""
        ...


Step = Callable[[int, int], None]  # (chunk, parity): one shared-memory phase of one chunk
Body = Callable[[Link], Awaitable[None]]  # one chunk's cross phase
BlockRing = Callable[[Link, np.ndarray, list[tuple[int, int]]], Awaitable[None]]  # a ring over a flat array's blocks


def _chunks(items: int, item_bytes: int, half: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges over ``items`` (each ``item_bytes``, what one
    item costs in a slot): at least one, even for nothing."""
    limit = max(1, half // item_bytes)
    want = max(-(-items // CHUNKS), MIN_CHUNK_BYTES // item_bytes, 1)
    step = min(limit, want)
    return [(a, min(a + step, items)) for a in range(0, items, step)] or [(0, 0)]


class TwoLevel:
    """A group's two-level collectives on this rank.  Every call runs in a
    thread that is not the event loop's (the blocking caller's, or the
    group's worker); ``half`` is the slot half every rank of the group uses."""

    def __init__(self, layout: Layout, channel: Channel, half: int) -> None:
        self.layout = layout
        self.channel = channel
        self.half = half
        self.alone = channel.size == 1
        self.local_size = len(layout.hosts[layout.host])
        self.flows = layout.flows
        self.rows = np.array(layout.rows, np.intp)
        starts = layout.starts
        self.host_rows = (starts[layout.host], starts[layout.host] + self.local_size)
        self.here = np.array(layout.hosts[layout.host], np.intp)  # group ranks on this host
        mine = set(layout.hosts[layout.host])
        self.away = np.array([g for g in layout.rows if g not in mine], np.intp)  # the others, host by host
        self.host_blocks = [(s, s + len(ranks)) for s, ranks in zip(starts, layout.hosts, strict=True)]

    # ---- the pipeline

    def _run(self, chunks: int, put: Step, take: Step, cross: Callable[[int], Body | None], spread: Step,
             cross_face: Cross, description: str, deadline: float, health: Health, timeout: float) -> None:
        """The pipeline: chunk ``c`` is collected (``put`` this rank's part
        in its input half, a barrier, ``take`` what this rank owns), crossed
        and spread, while up to DEPTH chunks after it are collected."""
        ch = self.channel
        # (on a failure, cross phases still in flight end with the group's
        # abort; they use only this call's own arrays)
        pending: dict[int, concurrent.futures.Future[None]] = {}
        for c in range(chunks):
            if chunks == 1:  # its data travel with the call's first barrier (in the half of its parity)
                parity = (ch.epoch + 1) & 1
                put(0, parity)
                ch.agree(description, deadline, health, timeout)
            else:
                if c == 0:
                    ch.agree(description, deadline, health, timeout)
                parity = c & 1
                put(c, parity)
                if not self.alone:
                    self._barrier(description, deadline, health, timeout)
            take(c, parity)
            body = cross(c)
            if body is not None:
                pending[c] = cross_face.start(body)
            if c >= DEPTH:
                self._finish(c - DEPTH, pending, spread, description, deadline, health, timeout)
        for c in range(max(0, chunks - DEPTH), chunks):
            self._finish(c, pending, spread, description, deadline, health, timeout)

    def _finish(self, c: int, pending: dict[int, concurrent.futures.Future[None]], spread: Step,
                description: str, deadline: float, health: Health, timeout: float) -> None:
        fut = pending.pop(c, None)
        if fut is not None:
            self.wait(fut, description, deadline, health, timeout)
        spread(c, c & 1)

    def wait(self, fut: concurrent.futures.Future[None], what: str, deadline: float, health: Health,
             timeout: float) -> None:
        """Wait for a cross phase, looking at the host's channel meanwhile (a
        local peer that died or gave up ends the wait)."""
        while True:
            try:
                fut.result(LOOK_SECONDS)
                return
            except TimeoutError:
                pass
            why = self.channel.trouble(health, what)
            if why is not None:
                raise why
            if time.monotonic() > deadline + 1.0:  # (the cross phase has its own deadline: this is a backstop)
                raise CommTimeoutError(
                    f"rank {self.channel.members[self.channel.rank]} timed out after {timeout:g}s in {what}, waiting "
                    "for the other hosts: pass a larger timeout= or set AIOCOMM_TIMEOUT (seconds)")

    def _barrier(self, description: str, deadline: float, health: Health, timeout: float) -> None:
        self.channel.barrier(deadline, health, description, timeout)

    # ---- all_sum / all_max / all_min

    def all_reduce(self, x: np.ndarray, op: str, cross_face: Cross, description: str, deadline: float,
                   health: Health, timeout: float) -> np.ndarray:
        # numpy's default error handling, as the shared-memory channel's (a
        # reduction must not raise on one rank only)
        with np.errstate(divide="warn", over="warn", under="ignore", invalid="warn"):
            return self._all_reduce(x, op, cross_face, description, deadline, health, timeout)

    def _all_reduce(self, x: np.ndarray, op: str, cross_face: Cross, description: str, deadline: float,
                    health: Health, timeout: float) -> np.ndarray:
        ch, j, flows, dtype = self.channel, self.layout.local, self.flows, x.dtype
        ufunc = collectives.REDUCERS[op]
        src = np.ascontiguousarray(x).reshape(-1)
        out = np.empty(x.shape, dtype)
        dst = out.reshape(-1)
        chunks = _chunks(src.size, dtype.itemsize, self.half)
        pieces = [[(s + a, s + b) for a, b in partition(e - s, flows)] for s, e in chunks]

        def put(c: int, parity: int) -> None:
            s, e = chunks[c]
            if self.alone:
                dst[s:e] = src[s:e]
            else:
                ch.input_half(ch.rank, parity, (e - s) * dtype.itemsize).view(dtype)[:] = src[s:e]

        def take(c: int, parity: int) -> None:
            s, e = chunks[c]
            if not self.alone and j < flows:
                a, b = pieces[c][j]
                ins = [ch.input_half(k, parity, (e - s) * dtype.itemsize).view(dtype)[a - s : b - s]
                       for k in range(ch.size)]
                ufunc(ins[0], ins[1], out=dst[a:b])
                for k in range(2, ch.size):
                    ufunc(dst[a:b], ins[k], out=dst[a:b])

        def cross(c: int) -> Body | None:
            if j >= flows:
                return None
            a, b = pieces[c][j]
            piece = dst[a:b]

            async def body(link: Link) -> None:
                if piece.nbytes <= collectives.SMALL_BYTES:
                    piece[:] = await collectives.all_reduce(link, piece, op)
                else:
                    await collectives.ring_all_reduce_in_place(link, piece, op)
            return body

        def spread(c: int, parity: int) -> None:
            if self.alone:
                return
            if j < flows:
                a, b = pieces[c][j]
                ch.output_half(ch.rank, parity, (b - a) * dtype.itemsize).view(dtype)[:] = dst[a:b]
            self._barrier(description, deadline, health, timeout)
            for k in range(flows):
                if k != j:
                    a, b = pieces[c][k]
                    dst[a:b] = ch.output_half(k, parity, (b - a) * dtype.itemsize).view(dtype)

        self._run(len(chunks), put, take, cross, spread, cross_face, description, deadline, health, timeout)
        return out

    # ---- sum_scatter

    def _pieces(self, chunks: list[tuple[int, int]]) -> Callable[[int, int], tuple[int, int]]:
        """``piece(c, k)``: the columns of chunk ``c`` that flow ``k`` carries between hosts."""
        flows = self.flows

        def piece(c: int, k: int) -> tuple[int, int]:
            s, e = chunks[c]
            a, b = partition(e - s, flows)[k]
            return s + a, s + b

        return piece

    def _block_ring(self, works: dict[int, np.ndarray], ring: BlockRing) -> Callable[[int], Body | None]:
        """``cross(c)``: chunk ``c``'s phase between hosts for a call that moves
        blocks (``ring(link, flat, blocks)`` on this owner's piece of every
        block, rows host by host), or None on a rank that owns no flow."""

        def cross(c: int) -> Body | None:
            if self.layout.local >= self.flows:
                return None
            work = works[c]
            flat = work.reshape(-1)
            width = work.shape[1]
            blocks = [(s * width, e * width) for s, e in self.host_blocks]

            async def body(link: Link) -> None:
                await ring(link, flat, blocks)
                await link.flush()
            return body

        return cross

    def reduce_scatter(self, x: np.ndarray, op: str, cross_face: Cross, description: str, deadline: float,
                       health: Health, timeout: float) -> np.ndarray:
        with np.errstate(divide="warn", over="warn", under="ignore", invalid="warn"):  # (see all_reduce)
            return self._reduce_scatter(x, op, cross_face, description, deadline, health, timeout)

    def _reduce_scatter(self, x: np.ndarray, op: str, cross_face: Cross, description: str, deadline: float,
                        health: Health, timeout: float) -> np.ndarray:
        ch, j, flows, dtype = self.channel, self.layout.local, self.flows, x.dtype
        n = len(self.layout.rows)
        ufunc = collectives.REDUCERS[op]
        out = np.empty(collectives.scattered_shape(x.shape, n), dtype)
        result = out.reshape(-1)
        m = result.size
        table = np.ascontiguousarray(x).reshape(n, m)  # a block per group rank
        chunks = _chunks(m, n * dtype.itemsize, self.half)  # columns of every block
        row0, row1 = self.host_rows
        works: dict[int, np.ndarray] = {}  # chunk -> this owner's piece of every block, rows host by host

        piece = self._pieces(chunks)

        def put(c: int, parity: int) -> None:
            s, e = chunks[c]
            if self.alone:
                works[c] = table[self.rows, s:e]
                return
            mine = ch.input_half(ch.rank, parity, n * (e - s) * dtype.itemsize).view(dtype).reshape(n, e - s)
            np.take(table[:, s:e], self.rows, axis=0, out=mine)

        def take(c: int, parity: int) -> None:
            s, e = chunks[c]
            if not self.alone and j < flows:
                a, b = piece(c, j)
                ins = [ch.input_half(k, parity, n * (e - s) * dtype.itemsize).view(dtype).reshape(n, e - s)
                       [:, a - s : b - s] for k in range(ch.size)]
                work = np.empty((n, b - a), dtype)
                ufunc(ins[0], ins[1], out=work)
                for k in range(2, ch.size):
                    ufunc(work, ins[k], out=work)
                works[c] = work

        cross = self._block_ring(
            works, lambda link, flat, blocks: collectives.ring_reduce_scatter(link, flat, blocks, ufunc, 0))

        def spread(c: int, parity: int) -> None:
            work = works.pop(c, None)
            if self.alone:
                assert work is not None
                s, e = chunks[c]
                result[s:e] = work[row0]
                return
            if work is not None:
                theirs = work[row0:row1]
                ch.output_half(ch.rank, parity, theirs.nbytes).view(dtype).reshape(theirs.shape)[:] = theirs
            self._barrier(description, deadline, health, timeout)
            for k in range(flows):
                a, b = piece(c, k)
                half = ch.output_half(k, parity, self.local_size * (b - a) * dtype.itemsize)
                result[a:b] = half.view(dtype).reshape(self.local_size, b - a)[j]

        self._run(len(chunks), put, take, cross, spread, cross_face, description, deadline, health, timeout)
        return out

    # ---- all_gather

    def all_gather(self, x: np.ndarray, cross_face: Cross, description: str, deadline: float, health: Health,
                   timeout: float) -> np.ndarray:
        ch, j, flows, dtype = self.channel, self.layout.local, self.flows, x.dtype
        n = len(self.layout.rows)
        src = np.ascontiguousarray(x).reshape(-1)
        m = src.size
        out = np.empty(collectives.gathered_shape(x.shape, n), dtype)
        table = out.reshape(n, m)
        chunks = _chunks(m, n * dtype.itemsize, self.half)
        row0, row1 = self.host_rows
        works: dict[int, np.ndarray] = {}

        piece = self._pieces(chunks)

        def put(c: int, parity: int) -> None:
            s, e = chunks[c]
            if self.alone:
                table[self.here[0], s:e] = src[s:e]
            else:
                ch.input_half(ch.rank, parity, (e - s) * dtype.itemsize).view(dtype)[:] = src[s:e]

        def take(c: int, parity: int) -> None:
            s, e = chunks[c]
            if not self.alone:
                for k in range(ch.size):
                    table[self.here[k], s:e] = ch.input_half(k, parity, (e - s) * dtype.itemsize).view(dtype)
            if j < flows:
                a, b = piece(c, j)
                work = np.empty((n, b - a), dtype)
                work[row0:row1] = table[self.here, a:b]
                works[c] = work

        cross = self._block_ring(works, lambda link, flat, blocks: collectives.ring_all_gather(link, flat, blocks, 0))

        def spread(c: int, parity: int) -> None:
            work = works.pop(c, None)
            away = self.away
            if self.alone:
                assert work is not None
                s, e = chunks[c]
                table[away, s:e] = np.concatenate([work[:row0], work[row1:]])
                return
            if work is not None:
                theirs = ch.output_half(ch.rank, parity, (n - self.local_size) * work.shape[1] * dtype.itemsize)
                theirs = theirs.view(dtype).reshape(n - self.local_size, work.shape[1])
                theirs[:row0] = work[:row0]
                theirs[row0:] = work[row1:]
            self._barrier(description, deadline, health, timeout)
            for k in range(flows):
                a, b = piece(c, k)
                half = ch.output_half(k, parity, (n - self.local_size) * (b - a) * dtype.itemsize)
                table[away, a:b] = half.view(dtype).reshape(n - self.local_size, b - a)

        self._run(len(chunks), put, take, cross, spread, cross_face, description, deadline, health, timeout)
        return out
