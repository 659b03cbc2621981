"""The ring backend: aiocomm's TCP mesh and its own collectives.

Each collective call gets a :class:`MeshLink`: the group's members and
context, a per-group sequence number in its tags, and one
:class:`~aiocomm.transport.Op` whose deadline bounds every wait of the call.
A failure in a collective aborts the group on every rank (the mesh sends the
reason to the other members).

Shared memory (:mod:`aiocomm.shm`): at a group's first collective its
members decide together, over TCP, whether every one of them runs on this
host; if so the group's reductions, gathers and broadcasts (all_sum/max/min,
all_gather, sum_scatter, broadcast) move through shared memory from then on -- in the
calling thread for the blocking face (:meth:`RingBackend.in_caller`), in
the group's own thread for the async face -- and every other collective
first agrees there on what was called, so ranks that call different
operations still get ``MismatchError``, whichever way each one moves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import numpy as np

from .. import collectives, config, exchanges, failure_report, portal, rooted, shm
from ..errors import CommError
from ..transport import Mesh, Op, Wait
from ..wire import Kind, Signature, signature
from . import GroupState, SplitResult
from .agreement import Agreement

_COLL = Kind.COLL
#: Seconds a failed collective waits for its unsent frames to leave before
#: it closes their connections instead (see RingBackend._settle_writes).
SETTLE_SECONDS = 1.0
#: Seconds a blocking ``recv`` spins for a small message from a peer on this
#: host (in this rank's inbox) before it waits on the loop instead.
SPIN_SECONDS = 0.0005
_BYTE = np.dtype(np.uint8)
T = TypeVar("T")
_OP_NAMES = {"sum": "all_sum", "max": "all_max", "min": "all_min"}


class MeshLink:
    """A :class:`collectives.Link` for one collective call on the real mesh."""

    __slots__ = ("mesh", "members", "rank", "size", "context", "tag_base", "sig", "op", "streams", "announced")

    def __init__(self, group: GroupState, mesh: Mesh, sig: Signature, timeout: float) -> None:
        self.mesh = mesh
        self.members = group.members
        self.rank = group.rank()
        self.size = len(group.members)
        self.context = group.context
        seq = group.seq  # collectives started on the group so far
        group.seq = seq + 1
        self.tag_base = seq << 8
        self.sig = sig
        # (described only if it fails; its members tell one another of a lost peer: waits.WaitSet.heard_lost)
        self.op = Op(sig, group.context, timeout, mesh.loop.time() + timeout, group.members)
        # The group's connections, kept across calls: opening costs a lookup
        # per peer per call otherwise.
        self.streams = group.streams
        self.announced: list[Wait] = []  # messages over the receiver's budget, sent once it posts

    async def open(self, *peers: int) -> None:
        streams = self.streams
        for peer in peers:
            stream = streams.get(peer)
            if stream is None or stream.closed:
                streams[peer] = await self.mesh.open(self.members[peer], self.op)

    def push(self, dst: int, lane: int, data: np.ndarray) -> None:
        wait = self.mesh.send(self.streams[dst], _COLL, self.context, self.tag_base | lane, self.sig, data, self.op)
        if wait is not None:
            self.announced.append(wait)

    def post(self, src: int, lane: int, out: np.ndarray) -> Awaitable[np.ndarray]:
        return self.mesh.post(self.members[src], _COLL, self.context, self.tag_base | lane, self.sig, out, self.op)

    async def flush(self) -> None:
        if self.announced:
            await self.mesh.flush(list(self.streams.values()), self.op, self.announced)
            return
        for stream in self.streams.values():
            if stream.paused:
                await self.mesh.flush(list(self.streams.values()), self.op)
                return


class RingGroup:
    """The ring's state of one group (``group.handle``): whether its
    collectives move through shared memory (decided at its first collective)."""

    __slots__ = ("decided", "line", "lock", "channel", "health", "direct", "agree", "_worker")

    def __init__(self) -> None:
        self.decided = False
        #: done once the last collective issued has its place (a TCP sequence
        #: number, or a turn in the worker): each call waits for the one before
        self.line: asyncio.Future[None] | None = None
        self.lock = threading.Lock()  # one shared-memory step at a time (a cancelled call's goes on)
        self.channel: shm.Channel | None = None
        self.health: shm.Health = _healthy
        #: engine operation name -> the call in the caller's thread (the blocking face)
        self.direct: dict[str, Callable[..., Any]] = {}
        #: how a collective that moves its data over TCP first agrees on what
        #: was called: ``agree(sig, description, deadline, health, timeout)``
        #: (None: it does not; else set with ``channel``)
        self.agree: Callable[..., None] | None = None
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    def worker(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that runs this group's shared-memory steps for the async
        face (one: they run in the order they were issued)."""
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aiocomm-shm")
        return self._worker


def _settle_soon(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None], error: BaseException | None) -> None:
    """From another thread: end ``done`` with ``error`` (or None) on ``loop``."""
    def settle() -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # (the loop is closed: nobody waits)
        pass


def _healthy() -> CommError | None:
    return None


def _release(channel: shm.Channel) -> None:
    """A group that uses shared memory was dropped: unmap its segments (its
    worker thread, if any, ends with its executor)."""
    channel.close()


async def _neighbours_gather(link: MeshLink, row: np.ndarray) -> np.ndarray:
    """Every rank's ``row`` (a table, by rank), passed round the ring: only
    the connections the world formed at start-up (a group's set-up must not
    open others)."""
    n = link.size
    table = np.zeros((n, row.size), row.dtype)
    table[link.rank] = row
    blocks = [(k * row.size, (k + 1) * row.size) for k in range(n)]
    await collectives.ring_all_gather(link, table.reshape(-1), blocks, 0)
    await link.flush()
    return table


def split_context(parent: int, index: int, color: int) -> int:
    """A context id for a split's subgroup: the same on every member, distinct
    from every other group's with overwhelming probability."""
    digest = hashlib.blake2b(f"{parent}:{index}:{color}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1  # never the world's 0


def shrink_context(parent: int, index: int, failed: tuple[int, ...]) -> int:
    """The context of a shrunken group: the same on every survivor, never
    one an old group's message carries."""
    digest = hashlib.blake2b(f"{parent}:shrink:{index}:{failed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1


class RingBackend:
    """Groups over this process's :class:`~aiocomm.transport.Mesh`."""

    name = "ring"
    direct = False  # blocking calls go through the loop that owns the mesh

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.rank = mesh.rank
        # A send over the receiver's budget may return before its receive is
        # posted (this rank holds a copy) only where an orderly close at exit
        # is sure to send what is held: the private loop of the blocking face.
        self.hold_sends = False
        why = shm.supported()
        if why is None and config.transport() == "tcp":
            why = "AIOCOMM_TRANSPORT=tcp"
        self.shm_unavailable = why  # None: groups whose members share this host use shared memory
        self.shm_slot_bytes = config.shm_slot_bytes()
        self.two_level = config.two_level()  # (groups over several hosts: aiocomm.backends.two_level)
        self.lingering: set[asyncio.Task[Any]] = set()  # agreements' readers, taking their last messages
        self.excluded: str | None = None  # why the others declared this rank failed, once they did

    def _raise_broken(self, context: int, what: str) -> None:
        cause = self.mesh.broken.get(context)
        if cause is not None:
            failure_report.raise_broken(self.rank, cause, what)

    # ---- shared memory

    def _state(self, group: GroupState) -> RingGroup:
        state = group.handle
        if state is None:
            state = group.handle = RingGroup()
        return state  # type: ignore[no-any-return]

    async def _take_turn(self, group: GroupState, state: RingGroup, timeout: float) -> asyncio.Future[None]:
        """Wait until every collective issued before this one on the group has
        its place, deciding (the first call) whether the group uses shared
        memory.  Returns this call's own ``placed`` future, to be resolved
        once it has taken its place: calls issued while the group decides, or
        while the one before them waits, keep the order they were issued in."""
        before, placed = state.line, self.mesh.loop.create_future()
        state.line = placed
        try:
            if before is not None and not before.done():
                await before
            if not state.decided:
                try:
                    await self._decide(group, state, timeout)
                except BaseException as exc:  # the group cannot go on: nobody may wait for this rank's choice
                    state.decided = True
                    self._abort_once(group.context, exc if isinstance(exc, CommError) else CommError(
                        f"rank {self.rank}: setting the group up failed ({type(exc).__name__}: {exc})"))
                    raise
                state.decided = True
        except BaseException:
            placed.set_result(None)
            raise
        return placed

    async def _decide(self, group: GroupState, state: RingGroup, timeout: float) -> None:
        """At the group's first collective, on every rank: use shared memory if
        every member can map every other's segment (one host, and nobody was
        told AIOCOMM_TRANSPORT=tcp).  Two TCP collectives: who is where, then
        whether everyone mapped everyone."""
        n, me = group.size(), group.rank()
        segment = None
        if self.shm_unavailable is None:  # (more than MAX_RANKS: only two levels, with fewer on each host)
            try:
                segment = shm.Segment.create(self.shm_slot_bytes)
            except OSError:
                segment = None
        mine = np.array([shm.host_id(), os.getpid(), segment.fd if segment is not None else -1,
                         self.shm_slot_bytes, self.two_level], np.int64)
        table = await self._tcp_collective(group, signature("shared-memory set-up", mine.dtype, mine.shape),
                                           timeout, _neighbours_gather, mine)
        if not np.all(table[:, 0] == table[0, 0]):  # more than one host: two levels, or the flat ring
            from . import two_level  # (here: it builds on this module)

            await two_level.set_up(self, group, state, table, segment, timeout)
            return
        usable = segment is not None and n <= shm.MAX_RANKS and bool(np.all(table[:, 2] >= 0))
        rows = {k: k for k in range(n) if k != me}
        peers = await self.map_segments(group, usable, rows, table, segment, "shared-memory agreement", timeout)
        if peers is None:
            return
        assert segment is not None
        channel = shm.Channel(me, group.members, segment, peers, {k: int(table[k, 1]) for k in peers})
        weakref.finalize(group, _release, channel)  # (nothing in its arguments may refer to the group)
        state.health = self.health(group.context, [w for w in group.members if w != self.rank])
        state.direct = {
            "all_reduce": lambda x, op, t: self._shm_call(
                group, state, channel.all_reduce, x, op, signature(_OP_NAMES[op], x.dtype, x.shape).describe(), t),
            "all_gather": lambda x, t: self._shm_call(
                group, state, channel.all_gather, x, signature("all_gather", x.dtype, x.shape).describe(), t),
            "sum_scatter": lambda x, t: self._shm_sum_scatter(group, state, x, t),
            "broadcast": lambda x, root, t: self._shm_call(
                group, state, channel.broadcast, x, root,
                signature(f"broadcast from rank {root}", x.dtype, x.shape).describe(), t),
        }
        state.agree = lambda _sig, *rest: channel.agree(*rest)
        state.channel = channel

    async def map_segments(self, group: GroupState, usable: bool, rows: dict[int, int], table: np.ndarray,
                           segment: shm.Segment | None, what: str, timeout: float) -> dict[int, shm.Segment] | None:
        """If ``usable``, map the segments of ``rows`` (channel rank -> its row
        of the set-up ``table``: pid, fd); then agree over TCP, as ``what``,
        whether every member could.  Returns the mapped segments, or None
        with everything (``segment`` too) let go if any member could not."""
        peers: dict[int, shm.Segment] = {}
        if usable:
            try:
                for k, row in rows.items():
                    peers[k] = shm.Segment.open(int(table[row, 1]), int(table[row, 2]), self.shm_slot_bytes)
            except OSError:
                usable = False
        flag = np.array([1 if usable else 0], np.int64)
        flags = await self._tcp_collective(group, signature(what, flag.dtype, flag.shape), timeout,
                                           _neighbours_gather, flag)
        if flags.all():
            return peers
        for seg in peers.values():
            seg.close()
        if segment is not None:
            segment.close()
        return None

    def health(self, context: int, others: list[int]) -> shm.Health:
        """What the transport knows that ends a shared-memory wait: an ABORT of
        the group ``context``, or a lost rank of ``others`` (world ranks; read
        from any thread)."""
        mesh = self.mesh

        def health() -> CommError | None:
            cause = mesh.broken.get(context)
            if cause is not None:
                return cause
            lost = mesh.lost
            if lost:
                for w in others:
                    if w in lost:
                        return lost[w]
            return None

        return health

    def _shm_sum_scatter(self, group: GroupState, state: RingGroup, x: np.ndarray, timeout: float) -> np.ndarray:
        collectives.scattered_shape(x.shape, group.size())  # ValueError before any step
        assert state.channel is not None
        describe = signature("sum_scatter", x.dtype, x.shape).describe()
        return self._shm_call(group, state, state.channel.reduce_scatter, x, "sum", describe, timeout)  # type: ignore[no-any-return]

    def _shm_call(self, group: GroupState, state: RingGroup, step: Callable[..., Any], *args: Any) -> Any:
        """Run a shared-memory step (in a thread that is not the loop's):
        ``step(*args[:-1], deadline, health, timeout)``; a failure breaks the
        group on every rank (the peers see it in shared memory, and the
        transport tells them too)."""
        channel = state.channel
        assert channel is not None
        timeout = args[-1]
        cause = self.mesh.broken.get(group.context) or channel.broken
        if cause is not None:
            failure_report.raise_broken(self.rank, cause, args[-2])  # (args[-2]: the call's description)
        try:
            with state.lock:
                return step(*args[:-1], time.monotonic() + timeout, state.health, timeout)
        except BaseException as exc:
            # Anything else (KeyboardInterrupt, an exception from a signal
            # handler) may have stopped this rank between two barriers: the
            # others must not go on with it, as if nothing had happened.
            err = exc if isinstance(exc, CommError) else CommError(
                f"rank {self.rank}: {args[-2]} was interrupted here ({type(exc).__name__}), which breaks the "
                "group on every rank")
            channel.give_up(err)
            failure_report.record(self.rank, err)
            try:
                self.mesh.loop.call_soon_threadsafe(self._abort_once, group.context, err)
            except RuntimeError:  # the loop is closed: nothing to tell over TCP
                pass
            raise

    def _abort_once(self, context: int, exc: CommError) -> None:
        if context not in self.mesh.broken:
            self.mesh.abort(context, exc)

    def in_caller(self, group: GroupState, name: str) -> Callable[..., Any] | None:
        """The blocking face's way to run engine operation ``name`` in the
        caller's thread (a group decided for shared memory; a message that
        may go through a peer's inbox), or None."""
        if self.mesh.inbox is not None:
            if name == "send":
                return functools.partial(self._send_here, group)
            if name == "recv":
                return functools.partial(self._recv_here, group)
        state = group.handle
        if state is None:
            return None
        return state.direct.get(name)  # type: ignore[no-any-return]

    async def _shm_or_tcp(self, group: GroupState, name: str, direct_args: tuple[Any, ...], sig: Signature,
                          timeout: float, body: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A collective that shared memory can move (engine operation ``name``,
        with ``direct_args``): through it if the group decided so, else
        ``body(link, *args)`` over TCP."""
        state = self._state(group)
        placed = await self._take_turn(group, state, timeout)
        direct = state.direct.get(name)
        if direct is None:
            return await self._after_agreeing(group, state, placed, sig, timeout, body, *args)
        try:
            work = state.worker().submit(lambda: direct(*direct_args))
            placed.set_result(None)
            return await asyncio.wrap_future(work)
        finally:
            if not placed.done():
                placed.set_result(None)

    async def _collective(
        self, group: GroupState, sig: Signature, timeout: float, body: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """A collective that moves its data over TCP; on a group that uses
        shared memory, after agreeing there on what was called."""
        state = self._state(group)
        placed = await self._take_turn(group, state, timeout)
        return await self._after_agreeing(group, state, placed, sig, timeout, body, *args)

    async def _after_agreeing(self, group: GroupState, state: RingGroup, placed: asyncio.Future[None],
                              sig: Signature, timeout: float, body: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``body(link, *args)`` over TCP for a call that has its turn
        (``placed``: resolved once it has its place); first, on a group that
        uses shared memory, ``state.agree``."""
        try:
            channel = state.channel
            if channel is not None:
                describe = sig.describe()
                agree = state.agree
                assert agree is not None  # (set with the channel)
                work = state.worker().submit(lambda: self._shm_call(group, state, agree, sig, describe, timeout))
                placed.set_result(None)  # (its TCP number is taken when its agreement ends, in the worker's order)
                await asyncio.wrap_future(work)
            link = MeshLink(group, self.mesh, sig, timeout)
            if not placed.done():
                placed.set_result(None)
            return await self._run_link(group, link, body, *args)
        finally:
            if not placed.done():
                placed.set_result(None)

    async def _tcp_collective(
        self, group: GroupState, sig: Signature, timeout: float, body: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """Run ``body(link, *args)`` as one collective call of ``group``
        (``sig``: what every rank must agree on) over TCP, now."""
        return await self._run_link(group, MeshLink(group, self.mesh, sig, timeout), body, *args)

    async def _run_link(self, group: GroupState, link: MeshLink, body: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``body(link, *args)``; a failure here aborts the group on every rank."""
        mesh = self.mesh
        if group.context in mesh.broken:
            self._raise_broken(group.context, link.sig.op)
        try:
            return await body(link, *args)
        except BaseException as exc:
            streams = list(link.streams.values())
            if not isinstance(exc, CommError):
                for stream in streams:
                    stream.give_up_writes(link.op.what)
                raise
            # Prefer the root cause another rank reported over a symptom seen here
            # (a peer that left after it gave up).
            cause = mesh.broken.get(group.context)
            if cause is None or cause is exc:
                mesh.abort(group.context, exc)  # (its ABORT frames queue behind what is unsent)
            await self._settle_writes(streams, link.op.what)
            if cause is not None and cause is not exc:
                failure_report.record(self.rank, cause)
                raise cause from exc
            failure_report.record(self.rank, exc)
            raise

    async def _settle_writes(self, streams: list[Any], what: str) -> None:
        """A failed operation may have left part of its frames (maybe the
        caller's own array) in the transports' buffers.  Let them go out for
        up to :data:`SETTLE_SECONDS` (a peer that is alive reads them, and the
        group's ABORT after them: it learns the cause, not that a connection
        closed), then close any connection still holding some: the caller may
        change its array once this call returns, and no peer may ever receive
        a torn message."""
        loop = self.mesh.loop
        deadline = loop.time() + SETTLE_SECONDS
        pending = [s for s in streams if s.unsent()]
        while pending and loop.time() < deadline:
            await asyncio.sleep(0.001)
            pending = [s for s in pending if s.unsent()]
        for stream in pending:
            stream.give_up_writes(what)

    def all_reduce(self, group: GroupState, x: np.ndarray, op: str, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        sig = signature(_OP_NAMES[op], x.dtype, x.shape)
        return self._shm_or_tcp(group, "all_reduce", (x, op, timeout), sig, timeout, collectives.all_reduce, x, op)

    def all_gather(self, group: GroupState, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        sig = signature("all_gather", x.dtype, x.shape)
        return self._shm_or_tcp(group, "all_gather", (x, timeout), sig, timeout, collectives.all_gather, x)

    def sum_scatter(self, group: GroupState, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        sig = signature("sum_scatter", x.dtype, x.shape)
        return self._shm_or_tcp(group, "sum_scatter", (x, timeout), sig, timeout, collectives.reduce_scatter, x,
                                "sum")

    def broadcast(self, group: GroupState, x: np.ndarray, root: int, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        sig = signature(f"broadcast from rank {root}", x.dtype, x.shape)
        return self._shm_or_tcp(group, "broadcast", (x, root, timeout), sig, timeout, rooted.broadcast, x, root)

    def gather(
        self, group: GroupState, x: np.ndarray, root: int, timeout: float
    ) -> Coroutine[Any, Any, np.ndarray | None]:
        sig = signature(f"gather to rank {root}", x.dtype, x.shape)
        return self._collective(group, sig, timeout, rooted.gather, x, root)

    def all_to_all(self, group: GroupState, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._collective(group, signature("all_to_all", x.dtype, x.shape), timeout, exchanges.all_to_all, x)

    def all_gather_v(
        self, group: GroupState, x: np.ndarray, timeout: float
    ) -> Coroutine[Any, Any, tuple[np.ndarray, list[int]]]:
        sig = signature("all_gather_v of rows", x.dtype, x.shape[1:])  # (the number of rows may differ)
        return self._collective(group, sig, timeout, exchanges.all_gather_v, x)

    def barrier(self, group: GroupState, timeout: float) -> Coroutine[Any, Any, None]:
        return self._collective(group, signature("barrier", _BYTE, ()), timeout, collectives.barrier)

    async def send(self, group: GroupState, x: np.ndarray, dst: int, timeout: float) -> None:
        mesh = self.mesh
        world_dst = group.members[dst]
        sig = signature("send", x.dtype, x.shape)
        if mesh.send_small(world_dst, group.context, sig, x):  # (a small one to a peer on this host: its inbox)
            return
        if mesh.in_parts(x.nbytes):  # (to a peer on this host, in parts: the rest from a thread)
            done = mesh.loop.create_future()
            try:
                stop = mesh.send_parts_soon(world_dst, group.context, sig, x, time.monotonic() + timeout, timeout,
                                            functools.partial(_settle_soon, mesh.loop, done))
            except BaseException:  # (a worker may still end ``done``: nobody awaits it)
                done.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise
            if stop is not None:
                await self._parts_sent(done, stop)
                return
        op = Op(lambda: f"send of {sig.describe()} to rank {world_dst}", group.context, timeout,
                mesh.loop.time() + timeout)
        if group.context in mesh.broken:
            self._raise_broken(group.context, "send")
        stream = None
        wait = None
        try:
            stream = await mesh.open(world_dst, op)
            wait = mesh.send(stream, Kind.P2P, group.context, 0, sig, x, op, detach=self.hold_sends)
            await mesh.flush((stream,), op, [wait] if wait is not None else None)
        except BaseException as exc:
            if wait is not None:  # an announced message keeps the caller's array: withdraw it
                wait.fail(exc)  # (cancelled, say: its payload must never go later, from memory changed since)
            if stream is not None:
                stream.give_up_writes(op.what)
            if isinstance(exc, CommError):
                failure_report.record(self.rank, exc)
            raise

    async def _parts_sent(self, done: asyncio.Future[None], stop: threading.Event) -> None:
        """Wait for the thread that sends a message's parts (see
        :meth:`Mesh.send_parts_soon`).  Cancelled, it stops that thread,
        which closes the connection unless the message was whole, and
        returns only once the thread ended: until then it reads the
        caller's array."""
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            stop.set()
            while not done.done():
                try:
                    await asyncio.wait((done,))
                except asyncio.CancelledError:
                    pass
            done.exception()  # (retrieved: the cancellation is what the caller gets)
            raise
        except CommError as exc:
            failure_report.record(self.rank, exc)
            raise

    def _send_here(self, group: GroupState, x: np.ndarray, dst: int, timeout: float) -> None:
        """A blocking ``send``: through the peer's inbox from this thread if
        it can go that way now (see :meth:`Mesh.send_small`: also a message
        in parts, up to ``cma.CMA_FROM``), else on the loop."""
        mesh = self.mesh
        if not mesh.send_small(group.members[dst], group.context, signature("send", x.dtype, x.shape), x,
                               time.monotonic() + timeout, timeout):
            portal.run(mesh.loop, self.send(group, x, dst, timeout), "send")

    def _recv_here(self, group: GroupState, shape: tuple[int, ...], dtype: np.dtype, src: int,
                   timeout: float) -> np.ndarray:
        """A blocking ``recv``: taken out of this rank's inbox in this thread
        if it comes that way within :data:`SPIN_SECONDS` (see
        :meth:`Mesh.take_small`), else on the loop."""
        mesh = self.mesh
        try:
            got = mesh.take_small(group.members[src], group.context, signature("send", dtype, shape), shape, dtype,
                                  time.monotonic() + min(SPIN_SECONDS, timeout))
        except CommError as exc:
            failure_report.record(self.rank, exc)
            raise
        if got is not None:
            return got
        # (the whole timeout again: an error names the timeout the caller gave; the spin was at most 0.5 ms)
        return portal.run(mesh.loop, self.recv(group, shape, dtype, src, timeout), "recv")

    async def recv(
        self, group: GroupState, shape: tuple[int, ...], dtype: np.dtype, src: int, timeout: float
    ) -> np.ndarray:
        mesh = self.mesh
        world_src = group.members[src]
        sig = signature("send", dtype, shape)
        op = Op(lambda: f"recv of {sig.describe()} from rank {world_src}", group.context, timeout,
                mesh.loop.time() + timeout)
        if group.context in mesh.broken:
            self._raise_broken(group.context, "recv")
        try:
            return await mesh.post(world_src, Kind.P2P, group.context, 0, sig, None, op)
        except CommError as exc:
            failure_report.record(self.rank, exc)
            raise

    async def split(self, group: GroupState, index: int, color: int, key: int, timeout: float) -> SplitResult:
        mine = np.array([color, key], np.int64)
        table = (await self.all_gather(group, mine, timeout)).reshape(group.size(), 2)
        members, rank = split_order(group, table, color)
        context = split_context(group.context, index, color)
        self.mesh.register_context(context, members)
        return SplitResult(members, rank, context)

    def abort(self, group: GroupState, exc: CommError) -> None:
        if group.context not in self.mesh.broken:
            self.mesh.abort(group.context, exc)
            failure_report.record(self.rank, exc)

    async def agree(self, group: GroupState, index: int, flag: bool, failed: tuple[int, ...],
                    timeout: float) -> tuple[bool, tuple[int, ...]]:
        """Agreement ``index`` of ``group`` among its living members (see
        :mod:`.agreement`): the AND of their flags, and who is gone."""
        if self.excluded is not None:
            raise CommError(self.excluded)
        agreement = Agreement(self.mesh, group.members, group.rank(), group.context, index, flag, failed, timeout,
                              self.lingering, self._excluded)
        try:
            return await agreement.run()
        except CommError as exc:
            if agreement.excluded_by is not None:  # for good: every later agreement says so too
                self._excluded(str(exc))
            raise

    def _excluded(self, why: str) -> None:
        """This rank was declared failed, for good (the first reason is kept)."""
        if self.excluded is None:
            self.excluded = why

    def shrink(self, group: GroupState, index: int, failed: tuple[int, ...], timeout: float) -> SplitResult:
        """The group of ``group``'s members but ``failed`` (agreed on by every
        survivor), with a context of its own."""
        members = tuple(w for k, w in enumerate(group.members) if k not in failed)
        context = shrink_context(group.context, index, failed)
        self.mesh.register_context(context, members)
        return SplitResult(members, members.index(self.rank), context)

    async def close(self) -> None:
        for task in list(self.lingering):
            task.cancel()
        await self.mesh.close()

    def fds(self) -> list[int]:
        return self.mesh.fds()


def split_order(group: GroupState, table: np.ndarray, color: int) -> tuple[tuple[int, ...], int]:
    """The world ranks of this rank's new group, ordered by key (ties and
    negative keys by parent rank), and this rank's place in it, from every
    parent rank's ``(color, key)``."""
    chosen = sorted(
        (int(k) if k >= 0 else parent_rank, parent_rank)
        for parent_rank, (c, k) in enumerate(table.tolist())
        if c == color
    )
    order = [parent_rank for _, parent_rank in chosen]
    return tuple(group.members[p] for p in order), order.index(group.rank())
