"""Deterministic per-rank inputs, so every rank can compute the expected result."""

from __future__ import annotations

import numpy as np

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]
try:  # bfloat16 is ml_dtypes' (in the test extra); without it the other dtypes are still tested
    import ml_dtypes  # noqa: F401
except ImportError:
    pass
else:
    DTYPES.insert(DTYPES.index("float16") + 1, "bfloat16")
SHAPES = [(), (0,), (1,), (7,), (10, 3), (1000, 33)]


def data(rank: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Small integer-valued data (exact in every dtype when summed over <= 8
    ranks: bfloat16 holds every integer up to 256 exactly, so a sum computed on
    the raw 16-bit patterns instead of the values would show)."""
    count = int(np.prod(shape)) if shape else 1
    base = (np.arange(count) * 7 + rank * 3) % 13
    dt = np.dtype(dtype)
    if dt == np.bool_:
        arr = base % 2 == rank % 2
    elif dt.kind == "c":
        arr = (base + 1j * ((base + rank) % 5)).astype(dt)
    else:
        arr = base.astype(dt)
    return arr.reshape(shape)


def check(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert isinstance(got, np.ndarray), f"{what}: result is {type(got)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.array_equal(got, want), f"{what}: values differ\n got {got.ravel()[:20]}\nwant {want.ravel()[:20]}"


def recv_checked(want: np.ndarray, src: int, what: str, bad: list[str], probe: bool = False) -> None:
    """Receive the message ``want`` from ``src`` (blocking face) and note in
    ``bad`` if it differs.  With ``probe``, first a receive of the wrong
    shape, which must raise MismatchError and leave the message in place."""
    import aiocomm

    if probe:
        try:
            aiocomm.recv((want.size + 1,), want.dtype, src, timeout=30)
            bad.append(f"a receive of the wrong shape from {src} took a message")
        except aiocomm.MismatchError:
            pass
    got = aiocomm.recv_like(want, src, timeout=30)
    if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
        bad.append(f"{what} differs")
