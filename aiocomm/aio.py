"""The async face: ``await aiocomm.aio.all_sum(x)`` inside a running event loop.

This is the engine's own interface.  The world is formed on the loop where
:func:`init` first runs (or, through the blocking face, on aiocomm's private
loop thread); a coroutine awaited on another loop is forwarded to the owning
loop, so any loop may await these functions.

Every function validates its arguments here, on the caller's side, so usage
errors raise before any traffic: ``TypeError`` for an unsupported dtype,
``ValueError`` for a bad rank, shape or backend.  ``timeout`` (seconds;
default ``AIOCOMM_TIMEOUT`` or 300) bounds how long any one operation waits
for its peers; past it, :class:`~aiocomm.CommTimeoutError` names the ranks
waited on.
"""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import numpy as np

from . import args, config, objects, portal, rendezvous, trace, trees, wire
from . import group as engine_ops
from .backends import mpi as mpi_backend
from .backends.ring import RingBackend
from .group import Engine, Group, claim

__all__ = [
    "init",
    "is_available",
    "all_sum",
    "all_max",
    "all_min",
    "all_gather",
    "sum_scatter",
    "send",
    "recv",
    "recv_like",
    "split",
    "shutdown",
    "broadcast",
    "barrier",
    "all_to_all",
    "gather",
    "all_gather_v",
    "send_obj",
    "recv_obj",
    "broadcast_obj",
    "all_gather_obj",
    "average_gradients",
    "agree",
    "shrink",
]

T = TypeVar("T")

BACKENDS = ("any", "ring", "mpi", "nccl", "jaccl")
_IMPLEMENTED = (
    "aiocomm implements 'ring' (its own TCP transport, always available) and 'mpi' (the job's MPI library "
    "through mpi4py: pip install 'aiocomm[mpi]'); backend='any' picks one of them"
)
_UNAVAILABLE_WHY = {
    "nccl": f"'nccl' (GPU transport) is not implemented: {_IMPLEMENTED}",
    "jaccl": f"'jaccl' (RDMA over Thunderbolt) is not implemented: {_IMPLEMENTED}",
}

_engine: Engine | None = None
_starting: asyncio.Future[Engine] | None = None


# ------------------------------------------------------------------ argument checks
# (shared with the blocking face and Group.split: aiocomm.args)

as_array = args.as_array
check_timeout = args.check_timeout
check_peer = args.check_peer
check_shape = args.check_shape


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def check_group(group: Any) -> Group:
    if not isinstance(group, Group):
        raise TypeError(f"group must be an aiocomm.Group or None, got {type(group).__name__}")
    return group


# ------------------------------------------------------------------ plumbing


def _formed(group: Group | None) -> Group | None:
    """``group`` checked, or the world if it is formed; ``None`` means ``await init()``."""
    if group is not None:
        return check_group(group)
    return _engine.world if _engine is not None else None


def _on_engine(group: Group, coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
    """Run an engine coroutine on the loop that owns the group's connections."""
    loop = group.engine.loop
    if loop is None or loop is asyncio.get_running_loop():
        return coro  # awaited by the caller: no extra coroutine frame per call
    return _on_other_loop(loop, coro)


async def _on_other_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    if loop.is_closed() or not loop.is_running():
        coro.close()
        raise RuntimeError(
            "aiocomm's world was formed on an event loop that is no longer running; "
            "form it again in a new process, or keep that loop running"
        )
    ended = threading.Event()

    async def run() -> T:
        try:
            return await coro
        finally:
            ended.set()

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        # The engine's task is cancelled on its own loop, later: until it has
        # ended it may still read the caller's arrays (a send in parts stops
        # its thread first), so this caller returns only then.
        future.cancel()
        while not ended.is_set() and loop.is_running():
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                pass
        raise


# ------------------------------------------------------------------ the API


def is_available(backend: str = "any") -> bool:
    """Whether ``backend`` can be used in this install.

    ``"any"`` and ``"ring"`` (aiocomm's TCP ring) are always available;
    ``"mpi"`` when mpi4py is installed and loads an MPI library (checking
    does not start MPI); ``"nccl"`` and ``"jaccl"`` are not implemented; any
    other name gives ``False``.
    """
    if backend in ("any", "ring"):
        return True
    if backend == "mpi":
        return mpi_backend.present()
    return False


def _why_unavailable(backend: str) -> str:
    if backend == "mpi":
        return mpi_backend.why_unavailable()
    return _UNAVAILABLE_WHY[backend]


def unavailable_world(backend: str, strict: bool, stacklevel: int) -> Group | None:
    """For an unavailable ``backend``: raise (``strict``) or warn, pointing at
    the caller's line, and give a group of size 1; None if it is available."""
    check_backend(backend)
    if is_available(backend):
        return None
    why = _why_unavailable(backend)
    if strict:
        raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
    if _engine is not None:
        return _engine.world
    warnings.warn(f"backend {backend!r} is unavailable: {why}; returning a group of size 1",
                  RuntimeWarning, stacklevel=stacklevel + 1)
    return Engine.alone().world


def _wants_mpi(backend: str, spec: config.WorldSpec | None) -> bool:
    """``mpi`` if asked for; with ``any``, when an MPI launcher started this
    process, mpi4py loads, and neither aiocomm's hostfile nor an explicit
    ``AIOCOMM_COORDINATOR`` (a TCP join) says otherwise."""
    if backend == "mpi":
        return True
    return (
        backend == "any"
        and spec is None
        and mpi_backend.started_by_mpi_launcher()
        and not os.environ.get("AIOCOMM_COORDINATOR")
        and mpi_backend.present()
    )


def _mpi_unavailable(backend: str) -> str:
    """Why the MPI backend was not chosen for a process an MPI launcher
    started (mpi4py missing, say), or "" if that is not the reason."""
    if backend == "any" and mpi_backend.started_by_mpi_launcher() and not mpi_backend.present():
        return mpi_backend.why_unavailable()
    return ""


async def init(strict: bool = False, backend: str = "any") -> Group:
    """Form (once) and return the world group.

    Args:
        strict: if true, raise instead of returning a group of size 1 when
            this process was not launched as part of a group, or when
            ``backend`` is unavailable.
        backend: ``"any"``, ``"ring"``, ``"mpi"``, ``"nccl"`` or ``"jaccl"``.

    Returns:
        The world :class:`Group`; later calls return the same one.

    Raises:
        ValueError: unknown ``backend``.
        RuntimeError: ``strict`` and no launcher environment (the message names
            the variables looked for), or ``strict`` and an unavailable backend.
        CommError: the environment names a group that cannot be formed (bad
            hostfile, a peer not reachable in time); the message names the rank
            and address.  This is raised whatever ``strict`` says.
    """
    global _engine, _starting
    alone = unavailable_world(backend, strict, stacklevel=2)
    if alone is not None:
        return alone
    if _engine is not None:
        if _engine.forked_from is not None:
            raise _engine.forked_error()
        if strict and not _engine.launched:
            raise RuntimeError(
                "init(strict=True): an earlier non-strict init() found no launcher environment and gave "
                f"this process a group of size 1 (none of {config.looked_for()}, {rendezvous.looked_for()} "
                "are set; start it with aiocomm-launch)"
            )
        return _engine.world
    if _starting is not None:
        if _starting.get_loop() is not asyncio.get_running_loop():
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(_await_future(_starting), _starting.get_loop())
            )
        return (await asyncio.shield(_starting)).world
    spec = config.spec_from_env() if backend != "mpi" else None
    if _wants_mpi(backend, spec):
        if strict and not mpi_backend.started_by_mpi_launcher():
            raise RuntimeError(
                "init(strict=True, backend='mpi'): this process was not started by an MPI launcher (none of "
                f"{', '.join(mpi_backend.MPI_LAUNCHER_VARS)} are set); start it with mpirun or "
                "aiocomm-launch --backend mpi"
            )
        _engine = Engine.start_mpi()
        return _engine.world
    join = rendezvous.join_spec_from_env(mpi_unavailable=_mpi_unavailable(backend)) if spec is None else None
    if spec is None and join is None:
        if strict:
            raise RuntimeError(
                "this process was not started as part of a group: none of "
                f"{config.looked_for()}, {rendezvous.looked_for()} are set (start it with aiocomm-launch)"
            )
        _engine = Engine.alone()
        return _engine.world
    starting = _starting = asyncio.get_running_loop().create_future()
    try:
        if spec is None:
            assert join is not None
            spec = await rendezvous.rendezvous(join, config.connect_timeout())
        engine = await Engine.start(spec, config.connect_timeout())
    except BaseException as exc:
        _starting = None
        starting.set_exception(exc)
        starting.exception()
        raise
    _engine = engine
    _starting = None
    if engine.loop is not None and portal.owns(engine.loop):
        portal.close_at_exit(engine.close)  # peers then see an orderly close, not a reset
        if isinstance(engine.backend, RingBackend):
            engine.backend.hold_sends = True  # that close sends what large sends left held
    starting.set_result(engine)
    return engine.world


async def _await_future(fut: asyncio.Future[Engine]) -> Group:
    return (await asyncio.shield(fut)).world


async def shutdown() -> None:
    """Close this process's connections (a clean exit; optional)."""
    global _engine
    engine, _engine = _engine, None
    if engine is not None and engine.loop is not None:
        await _on_engine(engine.world, engine.close())


async def all_sum(
    x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "all_sum", (arr,)):
        return await _on_engine(g, engine_ops.all_reduce(g, arr, "sum", t))


_REDUCE_DOC = """Element-wise {what} of ``x`` over the group{how}.

    Args:
        x: anything ``numpy.asarray`` accepts, of a supported dtype.
        group: the group to reduce over; ``None`` means the world (``init()``).
        stream: accepted for compatibility with MLX and ignored.
        timeout: seconds to wait for peers (default ``AIOCOMM_TIMEOUT`` or 300).

    Returns:
        A new array with the shape and dtype of ``x``, the same on every rank.{note}

    Raises:
        TypeError: unsupported dtype.
        MismatchError: ranks passed different shapes or dtypes, or called
            different operations.
        PeerLostError, CommTimeoutError: a peer died or stopped responding.
    """
_EXTREMUM = ", as ``numpy.{0}``\n    (NaN propagates; complex numbers compare lexicographically)"
all_sum.__doc__ = _REDUCE_DOC.format(
    what="sum", how="", note="\n        Integers wrap on overflow; ``bool`` sums are logical OR."
)


async def all_max(
    x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "all_max", (arr,)):
        return await _on_engine(g, engine_ops.all_reduce(g, arr, "max", t))


async def all_min(
    x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "all_min", (arr,)):
        return await _on_engine(g, engine_ops.all_reduce(g, arr, "min", t))


all_max.__doc__ = _REDUCE_DOC.format(what="maximum", how=_EXTREMUM.format("maximum"), note="")
all_min.__doc__ = _REDUCE_DOC.format(what="minimum", how=_EXTREMUM.format("minimum"), note="")


async def all_gather(
    x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    """The arrays of all ranks concatenated along axis 0, in rank order.

    Every rank must pass the same shape and dtype.  A 0-d ``x`` gives shape
    ``(size,)``; shape ``(n, ...)`` gives ``(n * size, ...)``.  Other
    arguments and errors as :func:`all_sum`.
    """
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "all_gather", (arr,)):
        return await _on_engine(g, engine_ops.all_gather(g, arr, t))


async def sum_scatter(
    x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    """This rank's block of ``all_sum(x)`` split evenly along axis 0.

    Returns an array of shape ``(x.shape[0] // size, *x.shape[1:])``.

    Raises:
        ValueError: ``x`` is 0-d or ``x.shape[0]`` is not divisible by the
            group size.
        Others as :func:`all_sum`.
    """
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "sum_scatter", (arr,)):
        return await _on_engine(g, engine_ops.sum_scatter(g, arr, t))


async def send(
    x: Any, dst: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    """Send ``x`` to rank ``dst`` of the group (any rank, not only neighbours).

    Returns ``x`` (as an array) once its bytes have left this process, so the
    caller may change it.  Messages to one rank arrive in the order sent.

    Raises:
        ValueError: ``dst`` out of range, equal to this rank, or a group of size 1.
        TypeError: unsupported dtype.
        PeerLostError, CommTimeoutError: ``dst`` is gone or stopped reading.
    """
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    dst = check_peer(g, dst, "dst")
    with claim(g, ("send", dst)), trace.call(g, ("send", dst), "send", (arr, dst)):
        await _on_engine(g, engine_ops.send(g, arr, dst, t))
    return arr


async def recv(
    shape: Any, dtype: Any, src: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    """Receive a new array of ``shape`` and ``dtype`` from rank ``src``.

    Raises:
        MismatchError: ``src`` sent a different shape or dtype (both are named).
        ValueError: ``src`` out of range, equal to this rank, or a group of size 1.
        TypeError: unsupported dtype.
        PeerLostError, CommTimeoutError: ``src`` is gone or sent nothing in time.
    """
    dims, dt, t = check_shape(shape), wire.wire_dtype(dtype), check_timeout(timeout)
    g = _formed(group) or await init()
    src = check_peer(g, src, "src")
    with claim(g, ("recv", src)), trace.call(g, ("recv", src), "recv", (dims, dt, src)):
        return await _on_engine(g, engine_ops.recv(g, dims, dt, src, t))


async def recv_like(
    x: Any, src: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    """``recv(x.shape, x.dtype, src)``: receive an array shaped like ``x``."""
    shape, dtype = args.shape_and_dtype(x)  # bytes-like: a uint8 array of their length
    return await recv(shape, dtype, src, group=group, timeout=timeout)


async def broadcast(x: Any, root: int, *, group: Group | None = None, timeout: float | None = None) -> np.ndarray:
    """``root``'s array on every rank of the group (MPI's ``Bcast``).

    Every rank passes an array of the same shape and dtype; only the root's
    values are used (the others' give the shape and dtype of the result).

    Returns:
        A new array with the root's values.

    Raises:
        ValueError, TypeError: ``root`` out of range or not an integer.
        MismatchError: ranks passed different roots, shapes or dtypes, or
            called different operations (raised on every rank).
        PeerLostError, CommTimeoutError: as :func:`all_sum`.
    """
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    root = args.check_root(g, root)
    with claim(g, "collectives"), trace.call(g, "collectives", "broadcast", (arr, root)):
        return await _on_engine(g, engine_ops.broadcast(g, arr, root, t))


async def gather(x: Any, root: int, *, group: Group | None = None, timeout: float | None = None) -> np.ndarray | None:
    """On ``root``, the arrays of all ranks concatenated along axis 0 in rank
    order (as :func:`all_gather`); ``None`` on the other ranks.

    Every rank passes the same shape and dtype.  Errors as :func:`broadcast`.
    """
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    root = args.check_root(g, root)
    with claim(g, "collectives"), trace.call(g, "collectives", "gather", (arr, root)):
        return await _on_engine(g, engine_ops.gather(g, arr, root, t))


async def all_to_all(x: Any, *, group: Group | None = None, timeout: float | None = None) -> np.ndarray:
    """Exchange axis-0 blocks: ``x`` is cut into ``size`` equal blocks along
    axis 0, block ``i`` goes to rank ``i``, and the result holds the blocks
    received, in rank order (same shape as ``x``).

    Raises:
        ValueError: ``x`` is 0-d or ``x.shape[0]`` is not divisible by the group size.
        Others as :func:`broadcast`.
    """
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "all_to_all", (arr,)):
        return await _on_engine(g, engine_ops.all_to_all(g, arr, t))


async def all_gather_v(
    x: Any, *, group: Group | None = None, timeout: float | None = None
) -> tuple[np.ndarray, list[int]]:
    """All ranks' arrays concatenated along axis 0, whose lengths may differ.

    Every rank passes the same dtype and the same shape after axis 0 (a 0-d
    array counts as one row).

    Returns:
        ``(array, counts)``: ``counts[i]`` is rank ``i``'s number of rows.

    Raises:
        MismatchError: dtypes or row shapes differ, or ranks called different
            operations (raised on every rank).
        PeerLostError, CommTimeoutError: as :func:`all_sum`.
    """
    arr, t, g = as_array(x), check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "all_gather_v", (arr,)):
        return await _on_engine(g, engine_ops.all_gather_v(g, arr, t))


async def barrier(*, group: Group | None = None, timeout: float | None = None) -> None:
    """Return once every rank of the group has entered the barrier.

    Raises:
        MismatchError: another rank called another collective instead.
        PeerLostError, CommTimeoutError: as :func:`all_sum`.
    """
    t, g = check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "barrier", ()):
        await _on_engine(g, engine_ops.barrier(g, t))


async def _drive(steps: objects.Steps, group: Group, stream: Any = "collectives") -> Any:
    """Run a generator of steps (see :mod:`aiocomm.objects`) with this face's
    calls, holding ``stream`` of ``group`` between them (another thread's
    call there meanwhile is an overlap, as for the blocking face)."""
    result = None
    with claim(group, stream):
        while True:
            try:
                name, a, kw = steps.send(result)
            except StopIteration as stop:
                return stop.value
            result = await globals()[name](*a, **kw)


async def send_obj(obj: Any, dst: int, *, group: Group | None = None, timeout: float | None = None) -> None:
    """Send any picklable object to rank ``dst`` (pickle protocol 5: numpy
    buffers travel out of band, without a copy; any size).

    Raises:
        ValueError: ``dst`` out of range or this rank.
        pickle.PicklingError: the object cannot be pickled.
        PeerLostError, CommTimeoutError: as :func:`send`.
    """
    g = _formed(group) or await init()
    check_peer(g, dst, "dst")
    await _drive(objects.send_obj_steps(obj, dst, {"group": g, "timeout": timeout}), g, ("send", dst))


async def recv_obj(src: int, *, group: Group | None = None, timeout: float | None = None) -> Any:
    """Receive an object sent with :func:`send_obj` by rank ``src``.

    Unpickling runs code chosen by the sender: only members of the
    authenticated group can send (see the README).
    """
    g = _formed(group) or await init()
    check_peer(g, src, "src")
    return await _drive(objects.recv_obj_steps(src, {"group": g, "timeout": timeout}), g, ("recv", src))


async def broadcast_obj(obj: Any, root: int, *, group: Group | None = None, timeout: float | None = None) -> Any:
    """``root``'s object on every rank (the others' ``obj`` is ignored); as :func:`send_obj` for the rest."""
    g = _formed(group) or await init()
    root = args.check_root(g, root)
    return await _drive(objects.broadcast_obj_steps(obj, root, g.rank(), {"group": g, "timeout": timeout}), g)


async def all_gather_obj(obj: Any, *, group: Group | None = None, timeout: float | None = None) -> list[Any]:
    """Every rank's object, in rank order; as :func:`send_obj` for the rest."""
    g = _formed(group) or await init()
    gathered: list[Any] = await _drive(objects.all_gather_obj_steps(obj, {"group": g, "timeout": timeout}), g)
    return gathered


async def average_gradients(tree: Any, *, group: Group | None = None, bucket_bytes: int = 32 << 20,
                            dtype: Any = None, timeout: float | None = None) -> Any:
    """Average every array of ``tree`` (nested dicts, lists and tuples) over
    the group, as ``mlx.nn.average_gradients`` does: one ``all_sum`` per
    bucket of at most ``bucket_bytes`` of concatenated arrays, one set of
    buckets per dtype (mixed dtypes never fall back to one call per array).

    Args:
        dtype: communicate in this dtype (``float16`` or ``ml_dtypes.bfloat16``
            halve the bytes); results are cast back to each array's dtype.

    Returns:
        A tree of the same structure with new arrays (``None`` leaves kept).
        Integer arrays are averaged with floor division.

    Raises:
        TypeError: a bool leaf, or an unsupported dtype.
        Others as :func:`all_sum` (on every rank: one all_sum per bucket).
    """
    g = _formed(group) or await init()
    steps = trees.average_gradients_steps(tree, g.size(), args.check_bucket(bucket_bytes), dtype,
                                          {"group": g, "timeout": timeout})
    return await _drive(steps, g)


async def split(color: int, key: int = -1, *, group: Group | None = None, timeout: float | None = None) -> Group:
    """Async form of :meth:`Group.split` (collective over ``group``, default the world)."""
    color, key = args.check_color_key(color, key)
    t, g = check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "collectives"), trace.call(g, "collectives", "split", ()):
        return g._child(await _on_engine(g, engine_ops.split(g, g.next_split(), color, key, t)))


async def agree(flag: bool, *, group: Group | None = None, timeout: float | None = None) -> bool:
    """Async form of :meth:`Group.agree` (over the living members of ``group``, default the world)."""
    t, g = check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "agreement"), trace.call(g, "agreement", "agree", ()):
        return await _on_engine(g, engine_ops.agree(g, bool(flag), t))


async def shrink(*, group: Group | None = None, timeout: float | None = None) -> Group:
    """Async form of :meth:`Group.shrink` (the living members of ``group``, default the world)."""
    t, g = check_timeout(timeout), (_formed(group) or await init())
    with claim(g, "agreement"), trace.call(g, "agreement", "shrink", ()):
        return await _on_engine(g, engine_ops.shrink(g, t))


def _reset_for_tests() -> None:
    global _engine, _starting
    _engine = None
    _starting = None

