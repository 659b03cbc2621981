"""Groups and the engine behind both faces.

The :class:`Engine` is this process's one world: its :class:`~aiocomm.transport.Mesh`
(absent for a group of size 1) and the event loop that owns it.  A
:class:`Group` is a list of world ranks plus a *context* id that every frame
of the group carries, so collectives on different groups never mix.  The
coroutines at the bottom (``all_reduce``, ``send``, ...) are the engine's
operations; :mod:`aiocomm.aio` and the blocking :mod:`aiocomm` only validate
arguments and bring the call to the engine's loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import warnings
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import numpy as np

from . import collectives, failure_report
from .config import WorldSpec
from .errors import CommError
from .transport import Mesh, PeerStream
from .wire import Kind, Signature, signature

log = logging.getLogger("aiocomm")

WORLD_CONTEXT = 0
_COLL = Kind.COLL
T = TypeVar("T")


class Engine:
    """The world of this process: its mesh and the loop that owns it."""

    def __init__(self, spec: WorldSpec | None, loop: asyncio.AbstractEventLoop | None, mesh: Mesh | None) -> None:
        self.spec = spec
        self.loop = loop  # None for a world of size 1: nothing is bound to a loop
        self.mesh = mesh
        rank = spec.rank if spec else 0
        size = spec.size if spec else 1
        self.world = Group(self, tuple(range(size)), rank, WORLD_CONTEXT)  # the mesh knows it already

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
        if self.mesh is not None:
            await self.mesh.close()


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

    def rank(self) -> int:
        """This process's rank in the group (0-based)."""
        return self._rank

    def size(self) -> int:
        """The number of ranks in the group."""
        return len(self.members)

    def split(self, color: int, key: int = -1) -> Group:
        """Split the group into subgroups by ``color`` (blocking; collective over this group).

        Ranks passing the same ``color`` form one new group, ordered by ``key``
        (ties and negative keys by rank in this group).  Returns this rank's
        new group.  In async code use ``await aiocomm.aio.split(color, key, group=g)``.
        """
        from . import _blocking_call
        from . import aio

        return _blocking_call("split", aio.split, color, key, group=self)

    def __repr__(self) -> str:
        return f"<aiocomm.Group rank={self._rank} size={self.size()} context={self.context:#x}>"

    @property
    def engine(self) -> Engine:
        return self._engine


class MeshLink:
    """A :class:`collectives.Link` for one collective call on the real mesh."""

    __slots__ = ("mesh", "members", "rank", "size", "context", "tag_base", "sig", "deadline", "streams")

    def __init__(self, group: Group, mesh: Mesh, sig: Signature, deadline: float) -> None:
        self.mesh = mesh
        self.members = group.members
        self.rank = group._rank
        self.size = len(group.members)
        self.context = group.context
        seq = group._seq  # collectives started on the group so far
        group._seq = seq + 1
        self.tag_base = seq << 8
        self.sig = sig
        self.deadline = deadline
        # The group's connections, kept across calls: opening costs a lookup
        # per peer per call otherwise.
        self.streams = group._streams

    async def open(self, *peers: int) -> None:
        streams = self.streams
        for peer in peers:
            stream = streams.get(peer)
            if stream is None or stream.closed:
                streams[peer] = await self.mesh.connect(self.members[peer])

    def push(self, dst: int, lane: int, data: np.ndarray) -> None:
        self.mesh.send(self.streams[dst], _COLL, self.context, self.tag_base | lane, self.sig, data)

    def post(self, src: int, lane: int, out: np.ndarray) -> Awaitable[np.ndarray]:
        return self.mesh.post(
            self.members[src], _COLL, self.context, self.tag_base | lane, self.sig, out, self.deadline
        )

    async def flush(self) -> None:
        for stream in self.streams.values():
            if stream.paused:
                await self.mesh.flush(self.streams.values(), self.deadline, self.sig)
                return


# ------------------------------------------------------------------ engine operations
# Arguments arrive validated by the async face (aio.py); these run on the engine's loop.


async def _collective(
    group: Group, op: str, x: np.ndarray, timeout: float, body: Callable[..., Awaitable[T]], *args: Any
) -> T:
    """Run ``body(link, *args)`` as one collective call of ``group``; a
    failure here aborts the group on every rank."""
    mesh = group._engine.mesh
    assert mesh is not None
    link = MeshLink(group, mesh, signature(op, x.dtype, x.shape), mesh.loop.time() + timeout)
    try:
        if group.context in mesh.broken:
            raise mesh.broken[group.context]
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
    deadline = mesh.loop.time() + timeout
    sig = signature("send", x.dtype, x.shape)
    world_dst = group.members[dst]
    try:
        stream = await asyncio.wait_for(mesh.connect(world_dst), timeout)
    except asyncio.TimeoutError:
        raise CommError(f"rank {mesh.rank} could not connect to rank {world_dst} within {timeout}s") from None
    mesh.send(stream, Kind.P2P, group.context, 0, sig, x)
    await mesh.flush((stream,), deadline, sig)


async def recv(group: Group, shape: tuple[int, ...], dtype: np.dtype, src: int, timeout: float) -> np.ndarray:
    mesh = group.engine.mesh
    assert mesh is not None
    sig = signature("send", dtype, shape)
    fut = mesh.post(group.members[src], Kind.P2P, group.context, 0, sig, None, mesh.loop.time() + timeout)
    return await fut


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


__all__ = ["Engine", "Group", "all_reduce", "all_gather", "sum_scatter", "send", "recv", "split"]
