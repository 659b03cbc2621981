"""Reductions as numpy computes them, in MPI's terms.

Reductions MPI lacks (float16, bfloat16, bool sums), those whose numpy
semantics differ from MPI's (floating max/min propagate NaN; complex max/min
compare lexicographically) and 8-bit sums (Open MPI 4.1's AVX operation
saturates them where numpy wraps) are user-defined MPI operations that run
numpy's ufunc on each pair of buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

_ELEMENT_TYPES: dict[int, str] = {1: "BYTE", 2: "UINT16_T", 4: "UINT32_T", 8: "UINT64_T", 16: "C_DOUBLE_COMPLEX"}
#: numpy's reduction for each operation
UFUNCS = {"sum": np.add, "max": np.maximum, "min": np.minimum}
_NATIVE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
_user_ops: dict[tuple[str, np.dtype], Any] = {}


def element_type(MPI: Any, dtype: np.dtype) -> Any:
    """An MPI datatype of ``dtype``'s size (the data travel as raw elements)."""
    return getattr(MPI, _ELEMENT_TYPES[dtype.itemsize])


def reduction(MPI: Any, dtype: np.dtype, op: str) -> tuple[Any, Any]:
    """The MPI datatype and operation that reduce ``dtype`` as numpy would."""
    native = (
        (dtype.kind in "iu" and (op != "sum" or dtype.itemsize > 1))  # Open MPI 4.1's AVX op saturates 8-bit sums
        or (dtype.kind == "c" and op == "sum")
        or (dtype.kind == "f" and op == "sum" and dtype.itemsize >= 4)
    )
    if native:
        return MPI._typedict[dtype.char], getattr(MPI, _NATIVE_OPS[op])
    key = (op, dtype)
    mpi_op = _user_ops.get(key)
    if mpi_op is None:
        ufunc = UFUNCS[op]

        def apply(
            inbuf: Any, inoutbuf: Any, datatype: Any, ufunc: Callable[..., Any] = ufunc, dtype: np.dtype = dtype
        ) -> None:
            a = np.frombuffer(inbuf, dtype)
            b = np.frombuffer(inoutbuf, dtype)
            ufunc(a, b, out=b)  # inout = in (op) inout; numpy's ufuncs are commutative here

        mpi_op = _user_ops[key] = MPI.Op.Create(apply, commute=True)
    return element_type(MPI, dtype), mpi_op
