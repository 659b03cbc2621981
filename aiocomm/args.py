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
    """``x`` as a C-contiguous, native-order array of a supported dtype.

    Besides numpy arrays and what ``numpy.asarray`` accepts: ``bytes`` and
    ``bytearray`` are uint8 arrays of their bytes (as MLX takes them), a
    ``memoryview`` is an array of its format (uint8 for bytes), and objects
    with ``__dlpack__`` (torch CPU tensors, say) are viewed through DLPack.
    None of these copies unless the memory is not contiguous or not in
    native byte order.  ``TypeError`` names an unsupported dtype and the fix.
    """
    if type(x) is np.ndarray and x.dtype in wire.NATIVE_DTYPES and x.flags.c_contiguous:
        return x  # the common case, without numpy's argument parsing
    arr = view_array(x)
    dtype = wire.wire_dtype(arr.dtype)
    return np.asarray(arr, dtype=dtype, order="C")


def view_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array, without copying where numpy can view it: bytes
    and bytearray as uint8, ``__dlpack__`` through :func:`numpy.from_dlpack`,
    the rest (``__array__``, the buffer protocol, lists) through
    :func:`numpy.asarray`."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (bytes, bytearray)):
        return np.frombuffer(x, np.uint8)
    if hasattr(x, "__dlpack__") and not isinstance(x, memoryview):
        try:
            return np.from_dlpack(x)
        except (TypeError, ValueError, RuntimeError, BufferError):
            pass  # a device numpy cannot see, or a dtype DLPack cannot carry: numpy.asarray may still manage
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        hint = _conversion_hint(x)
        if not hint:
            raise
        raise TypeError(
            f"aiocomm cannot use a {type(x).__module__}.{type(x).__qualname__} as a numpy array: {exc}{hint}"
        ) from exc


def _conversion_hint(x: Any) -> str:
    """A way out for objects numpy cannot take, where one is known."""
    if type(x).__module__.split(".")[0] == "torch":
        dtype = str(getattr(x, "dtype", ""))
        if dtype == "torch.bfloat16":
            return ("; numpy has no bfloat16 of its own: pass t.detach().cpu().view(torch.int16).numpy()"
                    ".view(ml_dtypes.bfloat16) (pip install ml_dtypes)")
        return "; pass t.detach().cpu() (numpy sees tensors on the CPU that need no gradient)"
    return ""


def shape_and_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and (supported) dtype of an array like ``x``, for
    ``recv_like``: bytes-like objects are uint8 arrays of their length."""
    arr = view_array(x)
    return arr.shape, wire.wire_dtype(arr.dtype)


def check_timeout(timeout: float | None) -> float:
    if timeout is None:
        default = config._op_timeout  # (read once by op_timeout; a call per call shows in a small one)
        return default if default is not None else config.op_timeout()
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


def check_root(group: Sized, root: Any) -> int:
    try:
        root = operator.index(root)
    except TypeError:
        raise TypeError(f"root must be an integer rank, got {root!r}") from None
    if not 0 <= root < group.size():
        raise ValueError(f"root={root} is out of range for a group of size {group.size()}")
    return int(root)


def check_bucket(bucket_bytes: Any) -> int:
    try:
        value = operator.index(bucket_bytes)
    except TypeError:
        raise TypeError(f"bucket_bytes must be an integer number of bytes, got {bucket_bytes!r}") from None
    if value <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {value}")
    return int(value)


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
