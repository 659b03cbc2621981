"""Groups and the engine behind both faces.

The :class:`Engine` is this process's one world: its
:class:`~aiocomm.transport.Mesh` (absent for a group of size 1) and the
event loop that owns it.  A :class:`Group` is a list of world ranks plus a
*context* id that every frame of the group carries, so collectives on
different groups never mix.  The coroutines at the bottom (``all_reduce``,
``send``, ...) are the engine's operations; :mod:`aiocomm.aio` and the
blocking :mod:`aiocomm` check arguments, :func:`claim` the group for the
calling thread, and bring the call to the engine's loop.

Threads: a group's collectives are matched across ranks by the order they
are started, so two threads issuing collectives on one group would pair up
arbitrarily.  Each ordered stream of a group (its collectives; its sends to
one rank; its receives from one rank) therefore belongs to one thread at a
time: another thread may take it over once that thread has ended, and is
refused with ``RuntimeError`` while it lives (give each thread its own group
with :meth:`Group.split`).

fork: a child forked after the world formed must not use, or keep alive,
its parent's connections.  At fork the child lets go of every socket of the
world (the descriptors are pointed at ``/dev/null``, so nothing is closed
under the parent's feet and no number is reused) and every later call raises
``RuntimeError`` saying so.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import warnings
import weakref
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import numpy as np

from . import args, collectives, failure_report, portal
from .config import WorldSpec
from .errors import CommError, broken_earlier
from .transport import Mesh, Op, PeerStream, Wait
from .wire import Kind, Signature, signature

log = logging.getLogger("aiocomm")

WORLD_CONTEXT = 0
_COLL = Kind.COLL
T = TypeVar("T")

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class Engine:
    """The world of this process: its mesh and the loop that owns it."""

    def __init__(self, spec: WorldSpec | None, loop: asyncio.AbstractEventLoop | None, mesh: Mesh | None) -> None:
        self.spec = spec
        self.loop = loop  # None for a world of size 1: nothing is bound to a loop
        self.mesh = mesh
        self.forked_from: int | None = None  # the parent's pid, in a forked child
        self.pid = os.getpid()
        rank = spec.rank if spec else 0
        size = spec.size if spec else 1
        self.world = Group(self, tuple(range(size)), rank, WORLD_CONTEXT)  # the mesh knows it already
        if mesh is not None:
            _engines.add(self)

    @classmethod
    async def start(cls, spec: WorldSpec | None, connect_timeout: float) -> Engine:
        if spec is None or spec.size == 1:
            return cls(spec, None, None)
        if not spec.token:
            warnings.warn(
                "AIOCOMM_TOKEN is not set: peers are not authenticated, so any local process "
                "that knows the hostfile could join this job (aiocomm-launch sets a token)",
                RuntimeWarning,
                stacklevel=2,
            )
        loop = asyncio.get_running_loop()
        mesh = Mesh(spec, loop)
        try:
            await mesh.start(connect_timeout)
        except BaseException:
            await mesh.close()
            raise
        return cls(spec, loop, mesh)

    async def close(self) -> None:
        if self.mesh is not None and self.forked_from is None:
            await self.mesh.close()

    def forked_error(self) -> RuntimeError:
        rank = self.spec.rank if self.spec else 0
        return RuntimeError(
            f"aiocomm: this process (pid {os.getpid()}) was forked from rank {rank} (pid {self.forked_from}) "
            "after its world formed; a forked child cannot use its parent's connections. Call aiocomm "
            "only in the parent, or start workers with multiprocessing's 'spawn' or 'forkserver' method "
            "and form their own world there."
        )

    def let_go_after_fork(self) -> None:
        """In a forked child: drop every socket of the parent's world without touching it."""
        self.forked_from = self.pid
        self.pid = os.getpid()
        if self.mesh is None:
            return
        try:
            fds = self.mesh.fds()
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        except Exception:  # never break the child's fork over this
            return
        try:
            for fd in fds:
                try:
                    os.dup2(null, fd, inheritable=False)
                except OSError:
                    pass
        finally:
            os.close(null)


def _after_fork_in_child() -> None:
    for engine in list(_engines):
        engine.let_go_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Group:
    """A set of ranks that run collectives together (``mx.distributed.Group``).

    Get the world with :func:`aiocomm.init`; make subgroups with :meth:`split`.
    """

    def __init__(self, engine: Engine, members: tuple[int, ...], rank: int, context: int) -> None:
        self._engine = engine
        self.members = members  # world ranks, indexed by group rank
        self._rank = rank
        self.context = context
        self._seq = 0  # collectives started on this group
        self._splits = 0
        self._streams: dict[int, PeerStream] = {}  # group rank -> outgoing connection, once opened
        self._owners: dict[Any, tuple[int, threading.Thread]] = {}  # stream of calls -> owning thread

    def rank(self) -> int:
        """This process's rank in the group (0-based)."""
        return self._rank

    def size(self) -> int:
        """The number of ranks in the group."""
        return len(self.members)

    def split(self, color: int, key: int = -1, *, timeout: float | None = None) -> Group:
        """Split the group into subgroups by ``color`` (blocking; collective over this group).

        Ranks passing the same ``color`` form one new group, ordered by ``key``
        (ties and negative keys by rank in this group).  Returns this rank's
        new group.  In async code use ``await aiocomm.aio.split(color, key, group=g)``.

        Raises:
            TypeError: ``color`` or ``key`` is not an integer.
            CommError: as any collective.
        """
        color, key = args.check_color_key(color, key)
        t = args.check_timeout(timeout)
        claim(self, "collectives")
        loop = self._engine.loop or portal.portal().loop
        return portal.run(loop, split(self, color, key, t), "split")

    def __repr__(self) -> str:
        return f"<aiocomm.Group rank={self._rank} size={self.size()} context={self.context:#x}>"

    @property
    def engine(self) -> Engine:
        return self._engine


def claim(group: Group, stream: Any) -> None:
    """Let the calling thread issue calls of ``stream`` on ``group`` (see the
    module's notes on threads), or raise ``RuntimeError``."""
    engine = group._engine
    if engine.forked_from is not None:
        raise engine.forked_error()
    ident = threading.get_ident()
    owner = group._owners.get(stream)
    if owner is not None and owner[0] == ident:
        return
    if owner is not None and owner[1].is_alive() and owner[1] is not threading.current_thread():
        what = stream if isinstance(stream, str) else f"{stream[0]}s with rank {stream[1]}"
        raise RuntimeError(
            f"aiocomm: use group.split() to give thread {threading.current_thread().name!r} a group of its own: "
            f"the {what} of {group!r} belong to thread {owner[1].name!r}, which is still running, and threads "
            "sharing a group would pair up arbitrarily across ranks. Make one group per thread before they "
            "start: groups = [world.split(0) for _ in range(n_threads)]"
        )
    group._owners[stream] = (ident, threading.current_thread())


class MeshLink:
    """A :class:`collectives.Link` for one collective call on the real mesh."""

    __slots__ = ("mesh", "members", "rank", "size", "context", "tag_base", "sig", "op", "streams", "announced")

    def __init__(self, group: Group, mesh: Mesh, sig: Signature, timeout: float) -> None:
        self.mesh = mesh
        self.members = group.members
        self.rank = group._rank
        self.size = len(group.members)
        self.context = group.context
        seq = group._seq  # collectives started on the group so far
        group._seq = seq + 1
        self.tag_base = seq << 8
        self.sig = sig
        self.op = Op(sig.describe(), group.context, timeout, mesh.loop.time() + timeout)
        # The group's connections, kept across calls: opening costs a lookup
        # per peer per call otherwise.
        self.streams = group._streams
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
            await self.mesh.flush(self.streams.values(), self.op, self.announced)
            return
        for stream in self.streams.values():
            if stream.paused:
                await self.mesh.flush(self.streams.values(), self.op)
                return


# ------------------------------------------------------------------ engine operations
# Arguments arrive checked by a face; these run on the engine's loop.


def _raise_broken(mesh: Mesh, context: int, what: str) -> None:
    cause = mesh.broken.get(context)
    if cause is not None:
        failure_report.record(mesh.rank, cause)
        raise broken_earlier(cause, f"rank {mesh.rank}: {what}") from cause


async def _collective(
    group: Group, op: str, x: np.ndarray, timeout: float, body: Callable[..., Awaitable[T]], *args: Any
) -> T:
    """Run ``body(link, *args)`` as one collective call of ``group``; a
    failure here aborts the group on every rank."""
    mesh = group._engine.mesh
    assert mesh is not None
    link = MeshLink(group, mesh, signature(op, x.dtype, x.shape), timeout)
    if group.context in mesh.broken:
        _raise_broken(mesh, group.context, op)
    try:
        return await body(link, *args)
    except CommError as exc:
        # Prefer the root cause another rank reported over a symptom seen here
        # (a peer that left after it gave up).
        cause = mesh.broken.get(group.context)
        if cause is not None and cause is not exc:
            failure_report.record(mesh.rank, cause)
            raise cause from exc
        mesh.abort(group.context, exc)
        failure_report.record(mesh.rank, exc)
        raise


_OP_NAMES = {"sum": "all_sum", "max": "all_max", "min": "all_min"}


def all_reduce(group: Group, x: np.ndarray, op: str, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
    """The reduction's coroutine (returned, not awaited here: one frame less per wake-up)."""
    if len(group.members) == 1:
        return _value(x.copy())
    return _collective(group, _OP_NAMES[op], x, timeout, collectives.all_reduce, x, op)


async def _value(value: T) -> T:
    return value


async def all_gather(group: Group, x: np.ndarray, timeout: float) -> np.ndarray:
    if group.size() == 1:
        return x.reshape(collectives.gathered_shape(x.shape, 1)).copy()
    return await _collective(group, "all_gather", x, timeout, collectives.all_gather, x)


async def sum_scatter(group: Group, x: np.ndarray, timeout: float) -> np.ndarray:
    collectives.scattered_shape(x.shape, group.size())  # ValueError before any traffic
    if group.size() == 1:
        return x.copy()
    return await _collective(group, "sum_scatter", x, timeout, collectives.reduce_scatter, x, "sum")


async def send(group: Group, x: np.ndarray, dst: int, timeout: float) -> None:
    mesh = group.engine.mesh
    assert mesh is not None
    world_dst = group.members[dst]
    sig = signature("send", x.dtype, x.shape)
    op = Op(f"send of {sig.describe()} to rank {world_dst}", group.context, timeout, mesh.loop.time() + timeout)
    if group.context in mesh.broken:
        _raise_broken(mesh, group.context, "send")
    try:
        stream = await mesh.open(world_dst, op)
        wait = mesh.send(stream, Kind.P2P, group.context, 0, sig, x, op)
        await mesh.flush((stream,), op, [wait] if wait is not None else None)
    except CommError as exc:
        failure_report.record(mesh.rank, exc)
        raise


async def recv(group: Group, shape: tuple[int, ...], dtype: np.dtype, src: int, timeout: float) -> np.ndarray:
    mesh = group.engine.mesh
    assert mesh is not None
    world_src = group.members[src]
    sig = signature("send", dtype, shape)
    op = Op(f"recv of {sig.describe()} from rank {world_src}", group.context, timeout, mesh.loop.time() + timeout)
    if group.context in mesh.broken:
        _raise_broken(mesh, group.context, "recv")
    try:
        return await mesh.post(world_src, Kind.P2P, group.context, 0, sig, None, op)
    except CommError as exc:
        failure_report.record(mesh.rank, exc)
        raise


def split_context(parent: int, index: int, color: int) -> int:
    """A context id for a split's subgroup: the same on every member, distinct
    from every other group's with overwhelming probability."""
    digest = hashlib.blake2b(f"{parent}:{index}:{color}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1  # never the world's 0


async def split(group: Group, color: int, key: int, timeout: float) -> Group:
    index = group._splits
    group._splits += 1
    mine = np.array([color, key], np.int64)
    if group.size() == 1:
        table = mine.reshape(1, 2)
    else:
        table = (await all_gather(group, mine, timeout)).reshape(group.size(), 2)
    chosen = [
        (int(k) if k >= 0 else parent_rank, parent_rank)
        for parent_rank, (c, k) in enumerate(table.tolist())
        if c == color
    ]
    chosen.sort()
    order = [parent_rank for _, parent_rank in chosen]
    members = tuple(group.members[p] for p in order)
    context = split_context(group.context, index, color)
    engine = group.engine
    if engine.mesh is not None:
        engine.mesh.register_context(context, members)
    return Group(engine, members, order.index(group.rank()), context)


__all__ = ["Engine", "Group", "claim", "all_reduce", "all_gather", "sum_scatter", "send", "recv", "split"]
