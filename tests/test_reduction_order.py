"""A small reduction carried in the MPI backend's agreement (socket-free):
its one ``accumulate`` reduces the ranks' inputs in rank order, in their own
dtype, exactly as one binary call after another would: the same bits for
rounding, the sign of zero, NaN and integer wrap-around."""

import importlib.util

import numpy as np
import pytest

from aiocomm import wire
from aiocomm.backends.mpi.collectives import INLINE, RECORD, Carried, identity
from aiocomm.backends.mpi.reductions import UFUNCS

OPS = {"sum": "all_sum", "max": "all_max", "min": "all_min"}


def inputs(rng, dtype, shape, size):
    """``size`` inputs of ``dtype`` that tell reduction orders apart: values
    of very different magnitudes, negative zeros and NaNs among floats, values
    that wrap among integers."""
    n = int(np.prod(shape))
    if dtype.kind == "b":
        flat = rng.integers(0, 2, (size, n)).astype(dtype)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, (size, n), dtype=dtype, endpoint=True)
    else:
        real = rng.standard_normal((size, n)) * 10.0 ** rng.integers(-6, 7, (size, n))
        real[rng.random((size, n)) < 0.15] = -0.0
        real[rng.random((size, n)) < 0.05] = np.nan
        with np.errstate(all="ignore"):  # (float16 overflows to inf: a value like any other here)
            flat = (real + 1j * real[::-1]).astype(dtype) if dtype.kind == "c" else real.astype(dtype)
    return [row.reshape(shape) for row in flat]


def one_after_another(ufunc, xs):
    out = ufunc(xs[0], xs[1])
    for x in xs[2:]:
        out = ufunc(out, x)
    return np.asarray(out)


@pytest.mark.parametrize("size", [2, 3, 4, 7, 8, 9, 16])
@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_a_carried_reduction_is_in_rank_order_in_its_own_dtype(size, op):
    rng = np.random.default_rng(size)
    ufunc = UFUNCS[op]
    dtypes = [wire.dtype_from_name(name) for name in wire.DTYPE_NAMES if name != "bfloat16"]
    if importlib.util.find_spec("ml_dtypes"):
        dtypes.append(wire.dtype_from_name("bfloat16"))
    for dtype in dtypes:
        for shape in [(), (1,), (3,), (2, 2), (INLINE // dtype.itemsize,)]:
            if int(np.prod(shape)) * dtype.itemsize > INLINE:
                continue
            xs = inputs(rng, dtype, shape, size)
            carried = Carried(identity(OPS[op], dtype, shape), xs[0], op, size)
            table = np.frombuffer(carried.table, np.uint8)
            for rank, x in enumerate(xs):  # what the ranks' records bring
                table[rank * RECORD : (rank + 1) * RECORD] = np.frombuffer(carried.record, np.uint8)
                table[rank * RECORD + 8 : rank * RECORD + 8 + x.nbytes] = np.frombuffer(x.tobytes(), np.uint8)
            with np.errstate(all="ignore"):
                got = carried.result()
                want = one_after_another(ufunc, xs)
            assert got is not None
            assert (got.dtype, got.shape) == (dtype, shape), (dtype, shape)
            assert got.tobytes() == want.tobytes(), (dtype, shape, got, want)


def test_a_carried_reduction_whose_records_differ_gives_nothing():
    x = np.ones(3, np.float32)
    carried = Carried(identity("all_sum", x.dtype, x.shape), x, "sum", 4)
    other = Carried(identity("all_sum", x.dtype, (2,)), x[:2], "sum", 4)
    for rank in range(4):
        record = other.record if rank == 2 else carried.record
        carried.table[rank * RECORD : (rank + 1) * RECORD] = record
    assert carried.result() is None
