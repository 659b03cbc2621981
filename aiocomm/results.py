"""Large arrays for results, made on memory that earlier results gave back.

A fresh array of many megabytes is mapped from the kernel and zeroed page by
page as it is first written: about 8 ms of a 64 MiB ``all_sum``'s 37 ms on
the 2-core machine (MPI backend), a cost MPI's own loop never pays (it
reuses one output); more when another process writes it (a same-host
message written into a receive, :mod:`aiocomm.transport.cma`).  Programs
call the same collectives and receive the same messages on the same sizes
step after step and drop each result soon, so the memory of an array made
here goes back to a pool when the last array on it is gone, and the next
array of that size is made on it.  Used for the MPI backend's results, and
on the ring backend for receives and shared-memory results.

The pool keeps at most :data:`POOL_BYTES` (the oldest go first), and only
blocks of :data:`POOL_FROM` bytes or more: below that glibc's malloc reuses
a freed array's memory by itself (its mmap threshold follows the sizes
freed, up to 32 MiB), faster than the pool.  Memory reaches it only from
arrays nobody holds: an operation given up on keeps its buffers until MPI
is done with them.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Any

import numpy as np

#: (measured, writing a new float32 array: 1 MiB 20 us plain against 26
#: pooled in two runs of three (38 in the third), 4 MiB 75-78 against 81,
#: 33 MiB 3.5 ms against 0.9 ms; an MPI all_sum of 1 MiB on 2 ranks took
#: 0-59 us less, 20 in the median of eight runs, with this and one message
#: per ring part, collectives._post)
POOL_FROM = 32 << 20
POOL_BYTES = 64 << 20

_lock = threading.Lock()  # (nothing under it makes a container object, so no garbage collection runs a __del__)
_free: collections.deque[np.ndarray] = collections.deque()  # blocks nobody holds, oldest first
_held = 0  # their bytes


class _Block:
    """The memory under arrays made by :func:`empty`, seen by numpy through
    ``__array_interface__``; every array on it keeps it alive, and it goes
    back to the pool when the last one goes."""

    __slots__ = ("memory", "__array_interface__")

    def __init__(self, memory: np.ndarray) -> None:
        self.memory = memory
        self.__array_interface__: dict[str, Any] = memory.__array_interface__

    def __del__(self) -> None:
        _give_back(self.memory)


def _give_back(memory: np.ndarray) -> None:
    global _held
    if memory.nbytes > POOL_BYTES:
        return
    with _lock:
        _free.append(memory)
        _held += memory.nbytes
        while _held > POOL_BYTES:
            _held -= _free.popleft().nbytes


def _take(nbytes: int) -> np.ndarray | None:
    global _held
    with _lock:
        for i in range(len(_free) - 1, -1, -1):  # the latest of that size first: still in the caches, maybe
            if _free[i].nbytes == nbytes:
                memory = _free[i]
                del _free[i]
                _held -= nbytes
                return memory
    return None


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, on pooled memory if it has
    :data:`POOL_FROM` bytes or more."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < POOL_FROM:
        return np.empty(shape, dtype)
    memory = _take(nbytes)
    if memory is None:
        memory = np.empty(nbytes, np.uint8)
    array: np.ndarray = np.asarray(_Block(memory)).view(dtype).reshape(shape)
    return array


def copy_of(x: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``x`` (see :func:`empty`)."""
    out = empty(x.shape, x.dtype)
    np.copyto(out, x)
    return out
