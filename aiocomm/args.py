"""Argument checks shared by both faces and the groups: usage errors raise
here, in the caller's thread, before any traffic."""

from __future__ import annotations

import operator
from typing import Any, Protocol

import numpy as np

from . import config, wire


class Sized(Protocol):
    def rank(self) -> int: ...

    def size(self) -> int: ...


def as_array(x: Any) -> np.ndarray:
    """``x`` as a C-contiguous, native-order array of a supported dtype."""
    if type(x) is np.ndarray and x.dtype in wire.NATIVE_DTYPES and x.flags.c_contiguous:
        return x  # the common case, without numpy's argument parsing
    arr = np.asarray(x)
    dtype = wire.wire_dtype(arr.dtype)
    return np.asarray(arr, dtype=dtype, order="C")


def check_timeout(timeout: float | None) -> float:
    if timeout is None:
        return config.op_timeout()
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def check_peer(group: Sized, peer: Any, name: str) -> int:
    try:
        peer = operator.index(peer)
    except TypeError:
        raise TypeError(f"{name} must be an integer rank, got {peer!r}") from None
    if group.size() == 1:
        raise ValueError(f"{name}={peer}: send/recv need a group of at least 2 ranks (this group has size 1)")
    if not 0 <= peer < group.size():
        raise ValueError(f"{name}={peer} is out of range for a group of size {group.size()}")
    if peer == group.rank():
        raise ValueError(f"{name}={peer} is this process's own rank; send/recv need another rank")
    return int(peer)


def check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of integers, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape {dims} has a negative dimension")
    return dims


def check_color_key(color: Any, key: Any) -> tuple[int, int]:
    try:
        return operator.index(color), operator.index(key)
    except TypeError:
        raise TypeError(f"split color and key must be integers, got {color!r}, {key!r}") from None
