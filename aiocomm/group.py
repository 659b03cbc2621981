"""Groups and the engine behind both faces.

The :class:`Engine` is this process's one world: its
:class:`~aiocomm.transport.Mesh` (absent for a group of size 1) and the
event loop that owns it.  A :class:`Group` is a list of world ranks plus a
*context* id that every frame of the group carries, so collectives on
different groups never mix.  The coroutines at the bottom (``all_reduce``,
``send``, ...) are the engine's operations; :mod:`aiocomm.aio` and the
blocking :mod:`aiocomm` check arguments, :func:`claim` the group's stream
for the call, and bring the call to the engine's loop.

Threads follow MPI's ``MPI_THREAD_SERIALIZED`` rule.  A group's collectives
are matched across ranks by the order they are started, so two threads
issuing collectives on one group *at the same time* would pair up
arbitrarily.  Any thread may call on any ordered stream of a group (its
collectives; its sends to one rank; its receives from one rank), one call at
a time: the program orders the calls.  A call that starts while a call of
another thread is still in flight on the same stream is overlap: it raises
``RuntimeError`` naming both threads, and the group is broken on every rank
(:meth:`Backend.abort`), so no rank ever receives another thread's data.
Calls of one thread may overlap each other (the async face: several calls
in flight on one loop are ordered by issue).  A claim ends with its call; a
claim left by a thread that has ended is ignored.

fork: a child forked after the world formed must not use, or keep alive,
its parent's connections.  At fork the child lets go of every socket of the
world (the descriptors are pointed at ``/dev/null``, so nothing is closed
under the parent's feet and no number is reused) and every later call raises
``RuntimeError`` saying so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import numpy as np

from . import args, collectives, exchanges, failure_report, portal, trace
from .backends import SplitResult
from .backends.ring import RingBackend, split_context
from .config import WorldSpec
from .errors import CommError
from .transport import Mesh, PeerStream

log = logging.getLogger("aiocomm")

WORLD_CONTEXT = 0
T = TypeVar("T")


class Backend(Protocol):
    """What moves a group's data (see :mod:`aiocomm.backends`)."""

    name: str
    direct: bool  # blocking calls run in the caller's thread (call_blocking), not on a loop

    def all_reduce(self, group: Group, x: np.ndarray, op: str, timeout: float) -> Coroutine[Any, Any, np.ndarray]: ...

    def all_gather(self, group: Group, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]: ...

    def sum_scatter(self, group: Group, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]: ...

    def send(self, group: Group, x: np.ndarray, dst: int, timeout: float) -> Coroutine[Any, Any, None]: ...

    def recv(
        self, group: Group, shape: tuple[int, ...], dtype: np.dtype, src: int, timeout: float
    ) -> Coroutine[Any, Any, np.ndarray]: ...

    def split(
        self, group: Group, index: int, color: int, key: int, timeout: float
    ) -> Coroutine[Any, Any, SplitResult]: ...

    def broadcast(self, group: Group, x: np.ndarray, root: int, timeout: float) -> Coroutine[Any, Any, np.ndarray]: ...

    def gather(
        self, group: Group, x: np.ndarray, root: int, timeout: float
    ) -> Coroutine[Any, Any, np.ndarray | None]: ...

    def all_to_all(self, group: Group, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]: ...

    def all_gather_v(
        self, group: Group, x: np.ndarray, timeout: float
    ) -> Coroutine[Any, Any, tuple[np.ndarray, list[int]]]: ...

    def barrier(self, group: Group, timeout: float) -> Coroutine[Any, Any, None]: ...

    def in_caller(self, group: Group, name: str) -> Callable[..., Any] | None:
        """How to run engine operation ``name`` on ``group`` in the blocking
        caller's own thread, or None (then it runs on the backend's loop)."""
        ...

    def abort(self, group: Group, exc: CommError) -> None:
        """Break ``group`` here and on its other members with ``exc`` (called
        on the loop that owns the connections, if the backend has one)."""
        ...

    def agree(self, group: Group, index: int, flag: bool, failed: tuple[int, ...],
              timeout: float) -> Coroutine[Any, Any, tuple[bool, tuple[int, ...]]]:
        """Agreement number ``index`` of ``group`` among its living members:
        the AND of their flags, and the members (group ranks) agreed gone
        (``failed``: those agreed before)."""
        ...

    def shrink(self, group: Group, index: int, failed: tuple[int, ...], timeout: float) -> SplitResult:
        """The group of ``group``'s members but the agreed ``failed`` ones."""
        ...

    async def close(self) -> None: ...

    def fds(self) -> list[int]: ...

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class Engine:
    """The world of this process: its backend, and the loop that owns the
    backend's connections (``None`` when nothing is bound to a loop: a world
    of size 1, or the MPI backend)."""

    def __init__(self, rank: int, size: int, backend: Backend | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, spec: WorldSpec | None = None,
                 handle: Any = None) -> None:
        self.spec = spec  # None when the world did not come from a launcher's environment
        self.loop = loop
        self.backend = backend
        self.launched = spec is not None or backend is not None
        self.forked_from: int | None = None  # the parent's pid, in a forked child
        self.pid = os.getpid()
        self.world = Group(self, tuple(range(size)), rank, WORLD_CONTEXT, handle)
        if backend is not None:
            _engines.add(self)

    @property
    def mesh(self) -> Mesh | None:
        """The ring backend's mesh (the benchmark counts its bytes)."""
        return getattr(self.backend, "mesh", None)

    @classmethod
    def alone(cls, spec: WorldSpec | None = None) -> Engine:
        """A world of size 1: nothing to connect."""
        return cls(0, 1, spec=spec)

    @classmethod
    async def start(cls, spec: WorldSpec | None, connect_timeout: float) -> Engine:
        """Form the world over the ring backend (TCP) from ``spec``."""
        if spec is None or spec.size == 1:
            return cls.alone(spec)
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
        return cls(spec.rank, spec.size, RingBackend(mesh), loop, spec)

    @classmethod
    def start_mpi(cls) -> Engine:
        """Form the world over the MPI backend from MPI's world communicator."""
        from .backends import mpi

        backend, world = mpi.start_world(WORLD_CONTEXT)
        return cls(world.comm.Get_rank(), world.comm.Get_size(), backend, None, None, world)

    async def close(self) -> None:
        if self.backend is not None and self.forked_from is None:
            await self.backend.close()

    def forked_error(self) -> RuntimeError:
        rank = self.world.rank()
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
        if self.backend is None:
            return
        try:
            fds = self.backend.fds()
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

    def __init__(self, engine: Engine, members: tuple[int, ...], rank: int, context: int, handle: Any = None) -> None:
        self._engine = engine
        self.handle = handle  # the backend's own state of this group (an MPI communicator)
        self.members = members  # world ranks, indexed by group rank
        self._rank = rank
        self.context = context
        self.seq = 0  # collectives started on this group (the ring's tags)
        self.trace_seq = 0  # collectives called on this group (numbers them in the record: aiocomm.trace)
        backend = engine.backend.name if engine.backend is not None else "none"
        self.trace_label = trace.GroupLabel(context, members, rank, backend)  # what the record keeps of it
        self.trace_p2p: dict[Any, int] = {}  # calls per ("send", dst) / ("recv", src) stream, for the record
        self._splits = 0
        self._agreements = 0  # agree calls on this group (shrink's included): numbers them on the wire
        self._failed: tuple[int, ...] = ()  # group ranks the survivors agreed are gone
        self.streams: dict[int, PeerStream] = {}  # group rank -> outgoing connection, once opened (the ring's)
        self._busy: dict[Any, Claim] = {}  # stream of calls -> the calls in flight there
        self._busy_lock = threading.Lock()  # (only to take over the claim of a thread that ended)

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
        return self._child(call_blocking(self, "collectives", "split", split, self.next_split(), color, key, t))

    def next_split(self) -> int:
        """Number this group's next split (the same on every member: splits
        are collective, in the same order everywhere)."""
        index = self._splits
        self._splits += 1
        return index

    def agree(self, flag: bool, timeout: float | None = None) -> bool:
        """A fault-tolerant logical AND of ``flag`` over the living members
        (blocking; collective over the members that are still alive).

        Completes even if members died before or during it (or stay silent
        for ``timeout`` seconds: they are then taken for dead, and cut off
        for good), and returns the same value on every survivor: a
        consensus, not a reduction that a death could split.  Afterwards
        :meth:`failed` lists the members the survivors agreed are gone.  It
        works on a group that a failure broke.  In async code use
        ``await aiocomm.aio.agree(flag, group=g)``.

        Raises:
            CommError: the other members declared this rank failed (it was
                silent too long), or the backend cannot agree (the MPI
                backend without ULFM).
        """
        t = args.check_timeout(timeout)
        return call_agreement(self, "agree", agree(self, bool(flag), t))

    def failed(self) -> list[int]:
        """The ranks of this group (sorted) that the survivors agreed are gone,
        as of this rank's last :meth:`agree` or :meth:`shrink` on it."""
        return list(self._failed)

    def shrink(self, timeout: float | None = None) -> Group:
        """A new group of exactly the living members, agreed by all of them
        (blocking; collective over the survivors).

        Ranks are renumbered in this group's order; the new group has a
        context of its own, so no message of this group ever reaches it.
        Works on a broken group or a healthy one, on the world or a split
        group, and again after a later failure (also one during ``shrink``).
        In async code use ``await aiocomm.aio.shrink(group=g)``.

        Raises:
            CommError: as :meth:`agree`.
        """
        t = args.check_timeout(timeout)
        return call_agreement(self, "shrink", shrink(self, t))

    def _child(self, result: SplitResult) -> Group:
        members, rank, context, handle = result
        return Group(self._engine, members, rank, context, handle)

    def __repr__(self) -> str:
        return f"<aiocomm.Group rank={self._rank} size={self.size()} context={self.context:#x}>"

    @property
    def engine(self) -> Engine:
        return self._engine


class Claim:
    """The calls of one thread in flight on one stream of a group (see the
    module's notes on threads); ``with`` (or :meth:`release`) ends one of them.

    No lock on the common path: ``dict.setdefault`` is atomic, and only the
    owning thread changes ``calls`` or removes its claim.  A claim is
    removed before its call returns, so a call the program ordered after it
    (by a lock, ``join``, a future) never sees it.  (It keeps the thread
    itself, not its ident: an ident is reused once its thread has ended.)
    """

    __slots__ = ("busy", "stream", "thread", "calls")

    def __init__(self, busy: dict[Any, Claim], stream: Any, thread: threading.Thread) -> None:
        self.busy = busy
        self.stream = stream
        self.thread = thread
        self.calls = 1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self.calls -= 1
        if not self.calls and self.busy.get(self.stream) is self:
            del self.busy[self.stream]


def claim(group: Group, stream: Any) -> Claim:
    """Hold ``stream`` of ``group`` for one call of the calling thread; raise
    ``RuntimeError`` (and break the group everywhere) if a call of another
    live thread is in flight there."""
    if group._engine.forked_from is not None:
        raise group._engine.forked_error()
    me = threading.current_thread()
    busy = group._busy
    held = busy.get(stream)
    if held is None:
        mine = Claim(busy, stream, me)
        held = busy.setdefault(stream, mine)
        if held is mine:
            return mine
    if held.thread is me:
        held.calls += 1
        return held
    if not held.thread.is_alive():  # its thread ended without ending its call
        with group._busy_lock:
            if busy.get(stream) is held:
                mine = busy[stream] = Claim(busy, stream, me)
                return mine
        return claim(group, stream)
    raise _overlap(group, stream, me, held.thread)


def _overlap(group: Group, stream: Any, me: threading.Thread, other: threading.Thread) -> RuntimeError:
    """Break ``group`` on every rank for calls of two threads that overlapped;
    the error for the thread that came second."""
    what = stream if isinstance(stream, str) else f"{stream[0]}s with rank {stream[1]}"
    world_rank = group.members[group.rank()]
    text = (
        f"aiocomm: rank {world_rank}: thread {me.name!r} started a call on the {what} of {group!r} while a call "
        f"of thread {other.name!r} was still in flight there. Threads may share a group only one call at a time "
        "(MPI's serialized rule): overlapping calls would pair up arbitrarily across ranks, so the group is now "
        "broken on every rank. Hold a lock around the calls, or give each thread its own group before they "
        "start: groups = [world.split(0) for _ in range(n_threads)]"
    )
    cause = CommError(text)
    cause.culprit = world_rank
    _abort(group, cause)
    return RuntimeError(text)


def _abort(group: Group, exc: CommError) -> None:
    """Break ``group`` on every rank with ``exc`` (on the loop that owns the
    connections, waiting for it: later calls of this thread find it broken)."""
    engine = group._engine
    backend = engine.backend
    if backend is None or group.size() == 1:
        return
    loop = engine.loop
    if loop is None or asyncio._get_running_loop() is loop:
        backend.abort(group, exc)
        return

    async def abort() -> None:
        backend.abort(group, exc)

    try:
        portal.run(loop, abort(), "abort")
    except RuntimeError:  # the loop has stopped: nothing more can go wrong on it
        pass


def call_blocking(
    group: Group, stream: Any, what: str, op: Callable[..., Coroutine[Any, Any, T]], *args: Any
) -> T:
    """Run engine operation ``op(group, *args)`` for a blocking caller, with
    ``stream`` of ``group`` claimed for it: in the calling thread for a
    backend that can (MPI), else on the loop that owns the group's
    connections (a world of size 1 has none: its operations finish without
    waiting)."""
    # (what ``with claim(...), trace.call(...)`` does, spelled out: a call of
    # a few microseconds feels every Python call it makes, many times over
    # where ranks share cores)
    held = claim(group, stream)
    try:
        entry = trace.call(group, stream, what, args)
        try:
            engine = group._engine
            backend = engine.backend
            result: Any = _NOT_HERE
            if backend is not None and len(group.members) > 1:
                if backend.direct:
                    result = backend.call_blocking(op.__name__, group, *args)  # type: ignore[attr-defined]
                else:
                    here = backend.in_caller(group, op.__name__)
                    if here is not None and asyncio._get_running_loop() is not engine.loop:
                        result = here(*args)  # (shared memory: no hand-off to the loop)
            if result is _NOT_HERE:
                coro = op(group, *args)
                loop = engine.loop
                if loop is None:  # a world of size 1 (the loop-less MPI backend went the direct way)
                    result = portal.run_now(coro)
                else:
                    result = portal.run(loop, coro, what)
        except BaseException as exc:
            entry.__exit__(type(exc), exc, exc.__traceback__)
            raise
        entry.__exit__(None, None, None)
        return result  # type: ignore[no-any-return]
    finally:
        held.release()


_NOT_HERE = object()  # (no operation returns it)


def call_agreement(group: Group, what: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run an agreement's coroutine for a blocking caller (on the loop that
    owns the connections; in this thread for a backend bound to none)."""
    try:
        with claim(group, "agreement"), trace.call(group, "agreement", what, ()):
            loop = group._engine.loop
            if loop is None or group.size() == 1:
                return portal.run_now(coro)
            return portal.run(loop, coro, what)
    finally:
        coro.close()  # (not started: claim refused it)


# ------------------------------------------------------------------ engine operations
# Arguments arrive checked by a face; these run on the loop that owns the
# group's connections (or any loop, for a backend bound to none).


def _backend(group: Group) -> Backend:
    backend = group._engine.backend
    assert backend is not None
    return backend


def all_reduce(group: Group, x: np.ndarray, op: str, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
    """The reduction's coroutine (returned, not awaited here: one frame less per wake-up)."""
    if len(group.members) == 1:
        return _value(x.copy())
    return _backend(group).all_reduce(group, x, op, timeout)


async def _value(value: T) -> T:
    return value


async def all_gather(group: Group, x: np.ndarray, timeout: float) -> np.ndarray:
    if group.size() == 1:
        gathered: np.ndarray = x.reshape(collectives.gathered_shape(x.shape, 1)).copy()
        return gathered
    return await _backend(group).all_gather(group, x, timeout)


async def sum_scatter(group: Group, x: np.ndarray, timeout: float) -> np.ndarray:
    collectives.scattered_shape(x.shape, group.size())  # ValueError before any traffic
    if group.size() == 1:
        scattered: np.ndarray = x.copy()
        return scattered
    return await _backend(group).sum_scatter(group, x, timeout)


async def send(group: Group, x: np.ndarray, dst: int, timeout: float) -> None:
    await _backend(group).send(group, x, dst, timeout)


async def recv(group: Group, shape: tuple[int, ...], dtype: np.dtype, src: int, timeout: float) -> np.ndarray:
    return await _backend(group).recv(group, shape, dtype, src, timeout)


async def broadcast(group: Group, x: np.ndarray, root: int, timeout: float) -> np.ndarray:
    if group.size() == 1:
        alone: np.ndarray = x.copy()
        return alone
    return await _backend(group).broadcast(group, x, root, timeout)


async def gather(group: Group, x: np.ndarray, root: int, timeout: float) -> np.ndarray | None:
    if group.size() == 1:
        gathered: np.ndarray = x.reshape(collectives.gathered_shape(x.shape, 1)).copy()
        return gathered
    return await _backend(group).gather(group, x, root, timeout)


async def all_to_all(group: Group, x: np.ndarray, timeout: float) -> np.ndarray:
    exchanges.split_rows(x.shape, group.size(), "all_to_all")  # ValueError before any traffic
    if group.size() == 1:
        alone: np.ndarray = x.copy()
        return alone
    return await _backend(group).all_to_all(group, x, timeout)


async def all_gather_v(group: Group, x: np.ndarray, timeout: float) -> tuple[np.ndarray, list[int]]:
    if group.size() == 1:
        rows = x.reshape(1) if x.ndim == 0 else x
        return rows.copy(), [rows.shape[0]]
    return await _backend(group).all_gather_v(group, x, timeout)


async def barrier(group: Group, timeout: float) -> None:
    if group.size() > 1:
        await _backend(group).barrier(group, timeout)


async def split(group: Group, index: int, color: int, key: int, timeout: float) -> SplitResult:
    """Split number ``index`` of ``group`` (see :meth:`Group.next_split`)."""
    if group.size() == 1:
        return SplitResult(group.members, 0, split_context(group.context, index, color))
    return await _backend(group).split(group, index, color, key, timeout)


async def agree(group: Group, flag: bool, timeout: float) -> bool:
    index = group._agreements
    group._agreements += 1
    if group.size() == 1:
        return flag
    value, failed = await _backend(group).agree(group, index, flag, group._failed, timeout)
    group._failed = failed
    return value


async def shrink(group: Group, timeout: float) -> Group:
    """Agree until two agreements in a row name the same members gone (one
    that dies during the first is in the second), then build the group."""
    if group.size() == 1:
        return Group(group._engine, group.members, 0, split_context(group.context, group._agreements, 0))
    failed: tuple[int, ...] | None = None
    while failed != group._failed:
        failed = group._failed
        await agree(group, True, timeout)
    shrunk = group._child(_backend(group).shrink(group, group._agreements, group._failed, timeout))
    failure_report.recovered(group.members[group.rank()])  # (the launcher blames it afresh from here on)
    return shrunk


__all__ = [
    "Engine", "Group", "Claim", "claim", "call_blocking", "all_reduce", "all_gather", "sum_scatter", "send", "recv",
    "split", "broadcast", "gather", "all_to_all", "all_gather_v", "barrier", "agree", "shrink", "call_agreement",
]
