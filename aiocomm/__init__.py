"""aiocomm: the ``mlx.core.distributed`` API for numpy arrays, on asyncio + uvloop.

This module is the blocking face: ``aiocomm.all_sum(x)`` returns a
``numpy.ndarray``.  It is a thin bridge over the async face,
:mod:`aiocomm.aio`, whose coroutines run on the event loop that owns the
connections (aiocomm's private loop thread unless the world was formed with
``await aiocomm.aio.init()``).  It works from plain scripts, from threads and
from inside a thread that runs its own event loop; a call made on the loop
that owns the connections raises ``RuntimeError`` instead of deadlocking.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import numpy as np

from . import aio, args, objects, portal, trees, wire
from . import group as engine_ops
from .errors import (
    AuthenticationError,
    CommError,
    CommTimeoutError,
    MismatchError,
    OutOfMemoryError,
    PeerLostError,
    ProtocolError,
)
from .group import Group

__version__ = "0.1.0"

__all__ = [
    "init",
    "is_available",
    "Group",
    "all_sum",
    "all_max",
    "all_min",
    "all_gather",
    "sum_scatter",
    "send",
    "recv",
    "recv_like",
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
    "aio",
    "CommError",
    "PeerLostError",
    "CommTimeoutError",
    "ProtocolError",
    "MismatchError",
    "OutOfMemoryError",
    "AuthenticationError",
]

T = TypeVar("T")


def _blocking_call(what: str, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
    engine = aio._engine
    if engine is not None and engine.forked_from is not None:
        raise engine.forked_error()
    loop = engine.loop if engine is not None and engine.loop is not None else None
    if loop is None:
        starting = aio._starting
        loop = starting.get_loop() if starting is not None else portal.portal().loop
    return portal.run(loop, fn(*args, **kwargs), what, task=True)


def is_available(backend: str = "any") -> bool:
    return aio.is_available(backend)


def init(strict: bool = False, backend: str = "any") -> Group:
    alone = aio.unavailable_world(backend, strict, stacklevel=2)  # warns here, pointing at the caller's line
    if alone is not None:
        return alone
    return _blocking_call("init", aio.init, strict, backend)


def _group(group: Group | None) -> Group:
    """``group`` (checked) or the world, formed now if need be."""
    return aio._formed(group) or init()


# Each function checks its arguments here, in the calling thread, and hands
# the engine's coroutine straight to the loop (the async face's coroutine
# would add a frame to every step).


def all_sum(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    return engine_ops.call_blocking(_group(group), "collectives", "all_sum", engine_ops.all_reduce, arr, "sum", t)


def all_max(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    return engine_ops.call_blocking(_group(group), "collectives", "all_max", engine_ops.all_reduce, arr, "max", t)


def all_min(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    return engine_ops.call_blocking(_group(group), "collectives", "all_min", engine_ops.all_reduce, arr, "min", t)


def all_gather(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    return engine_ops.call_blocking(_group(group), "collectives", "all_gather", engine_ops.all_gather, arr, t)


def sum_scatter(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    return engine_ops.call_blocking(_group(group), "collectives", "sum_scatter", engine_ops.sum_scatter, arr, t)


def send(
    x: Any, dst: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    g = aio._formed(group) or init()
    dst = args.check_peer(g, dst, "dst")
    engine_ops.call_blocking(g, ("send", dst), "send", engine_ops.send, arr, dst, t)
    return arr


def recv(
    shape: Any, dtype: Any, src: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    dims, dt, t = args.check_shape(shape), wire.wire_dtype(dtype), args.check_timeout(timeout)
    g = aio._formed(group) or init()
    src = args.check_peer(g, src, "src")
    return engine_ops.call_blocking(g, ("recv", src), "recv", engine_ops.recv, dims, dt, src, t)


def recv_like(
    x: Any, src: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    shape, dtype = args.shape_and_dtype(x)  # bytes-like: a uint8 array of their length
    return recv(shape, dtype, src, group=group, timeout=timeout)


def broadcast(x: Any, root: int, *, group: Group | None = None, timeout: float | None = None) -> np.ndarray:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    g = _group(group)
    root = args.check_root(g, root)
    return engine_ops.call_blocking(g, "collectives", "broadcast", engine_ops.broadcast, arr, root, t)


def gather(x: Any, root: int, *, group: Group | None = None, timeout: float | None = None) -> np.ndarray | None:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    g = _group(group)
    root = args.check_root(g, root)
    return engine_ops.call_blocking(g, "collectives", "gather", engine_ops.gather, arr, root, t)


def all_to_all(x: Any, *, group: Group | None = None, timeout: float | None = None) -> np.ndarray:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    return engine_ops.call_blocking(_group(group), "collectives", "all_to_all", engine_ops.all_to_all, arr, t)


def all_gather_v(x: Any, *, group: Group | None = None, timeout: float | None = None) -> tuple[np.ndarray, list[int]]:
    arr, t = args.as_array(x), args.check_timeout(timeout)
    return engine_ops.call_blocking(_group(group), "collectives", "all_gather_v", engine_ops.all_gather_v, arr, t)


def barrier(*, group: Group | None = None, timeout: float | None = None) -> None:
    t = args.check_timeout(timeout)
    engine_ops.call_blocking(_group(group), "collectives", "barrier", engine_ops.barrier, t)


def _drive(steps: objects.Steps, group: Group, stream: Any = "collectives") -> Any:
    """Run a generator of steps (see :mod:`aiocomm.objects`) with this face's
    calls, holding ``stream`` of ``group`` for the whole call: another
    thread's call between two of its steps is an overlap (MPI's serialized
    rule), not a call that pairs with one of them on other ranks."""
    result = None
    with engine_ops.claim(group, stream):
        while True:
            try:
                name, a, kw = steps.send(result)
            except StopIteration as stop:
                return stop.value
            result = globals()[name](*a, **kw)


def send_obj(obj: Any, dst: int, *, group: Group | None = None, timeout: float | None = None) -> None:
    g = _group(group)
    args.check_peer(g, dst, "dst")
    _drive(objects.send_obj_steps(obj, dst, {"group": g, "timeout": timeout}), g, ("send", dst))


def recv_obj(src: int, *, group: Group | None = None, timeout: float | None = None) -> Any:
    g = _group(group)
    args.check_peer(g, src, "src")
    return _drive(objects.recv_obj_steps(src, {"group": g, "timeout": timeout}), g, ("recv", src))


def broadcast_obj(obj: Any, root: int, *, group: Group | None = None, timeout: float | None = None) -> Any:
    g = _group(group)
    root = args.check_root(g, root)
    return _drive(objects.broadcast_obj_steps(obj, root, g.rank(), {"group": g, "timeout": timeout}), g)


def all_gather_obj(obj: Any, *, group: Group | None = None, timeout: float | None = None) -> list[Any]:
    g = _group(group)
    return _drive(objects.all_gather_obj_steps(obj, {"group": g, "timeout": timeout}), g)  # type: ignore[no-any-return]


def average_gradients(tree: Any, *, group: Group | None = None, bucket_bytes: int = 32 << 20, dtype: Any = None,
                      timeout: float | None = None) -> Any:
    g = _group(group)
    steps = trees.average_gradients_steps(tree, g.size(), args.check_bucket(bucket_bytes), dtype,
                                          {"group": g, "timeout": timeout})
    return _drive(steps, g)


# The blocking functions take the same arguments and give the same results
# as their coroutines; they share the documentation.
for _name in (
    "is_available", "init", "all_sum", "all_max", "all_min", "all_gather", "sum_scatter", "send", "recv", "recv_like",
    "broadcast", "gather", "all_to_all", "all_gather_v", "barrier", "send_obj", "recv_obj", "broadcast_obj",
    "all_gather_obj", "average_gradients",
):
    globals()[_name].__doc__ = getattr(aio, _name).__doc__
del _name


def __dir__() -> list[str]:
    """``dir(aiocomm)`` lists the API (``__all__``), not the names this module
    uses internally (``np``, ``Any``, its helper modules)."""
    return sorted([*__all__, "__version__", "__doc__", "__file__", "__name__", "__path__", "__spec__"])
