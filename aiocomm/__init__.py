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

from typing import Any, Callable, Coroutine, TypeVar

import numpy as np

from . import aio, portal
from . import group as engine_ops
from .errors import (
    AuthenticationError,
    CommError,
    CommTimeoutError,
    MismatchError,
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
    "aio",
    "CommError",
    "PeerLostError",
    "CommTimeoutError",
    "ProtocolError",
    "MismatchError",
    "AuthenticationError",
]

T = TypeVar("T")


def _blocking_call(what: str, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
    engine = aio._engine
    loop = engine.loop if engine is not None and engine.loop is not None else None
    if loop is None:
        starting = aio._starting
        loop = starting.get_loop() if starting is not None else portal.portal().loop
    return portal.run(loop, fn(*args, **kwargs), what)


def is_available(backend: str = "any") -> bool:
    return aio.is_available(backend)


def init(strict: bool = False, backend: str = "any") -> Group:
    return _blocking_call("init", aio.init, strict, backend)


def _blocking_collective(
    what: str, x: Any, group: Group | None, timeout: float | None, start: Callable[..., Coroutine[Any, Any, T]]
) -> T:
    """A collective on a formed group goes straight to the engine, its
    arguments checked here in the calling thread (the async face's coroutine
    would add a frame to every step); otherwise through the async face, which
    forms the world first."""
    g = aio._formed(group)
    if g is None or g.engine.loop is None:
        return _blocking_call(what, getattr(aio, what), x, group=group, timeout=timeout)  # type: ignore[no-any-return]
    return portal.run(g.engine.loop, start(g, aio.as_array(x), aio.check_timeout(timeout)), what)


def all_sum(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    return _blocking_collective("all_sum", x, group, timeout, _sum)


def all_max(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    return _blocking_collective("all_max", x, group, timeout, _max)


def all_min(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    return _blocking_collective("all_min", x, group, timeout, _min)


def all_gather(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    return _blocking_collective("all_gather", x, group, timeout, engine_ops.all_gather)


def sum_scatter(x: Any, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    return _blocking_collective("sum_scatter", x, group, timeout, engine_ops.sum_scatter)


def _sum(g: Group, x: np.ndarray, t: float) -> Any:
    return engine_ops.all_reduce(g, x, "sum", t)


def _max(g: Group, x: np.ndarray, t: float) -> Any:
    return engine_ops.all_reduce(g, x, "max", t)


def _min(g: Group, x: np.ndarray, t: float) -> Any:
    return engine_ops.all_reduce(g, x, "min", t)


def send(x: Any, dst: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    return _blocking_call("send", aio.send, x, dst, group=group, timeout=timeout)


def recv(
    shape: Any, dtype: Any, src: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None
) -> np.ndarray:
    return _blocking_call("recv", aio.recv, shape, dtype, src, group=group, timeout=timeout)


def recv_like(x: Any, src: int, *, group: Group | None = None, stream: Any = None, timeout: float | None = None) -> np.ndarray:
    return _blocking_call("recv_like", aio.recv_like, x, src, group=group, timeout=timeout)


# The blocking functions take the same arguments and give the same results
# as their coroutines; they share the documentation.
for _name in ("is_available", "init", "all_sum", "all_max", "all_min", "all_gather", "sum_scatter", "send", "recv", "recv_like"):
    globals()[_name].__doc__ = getattr(aio, _name).__doc__
del _name
