"""The collectives and split, as steps over a group's communicator.

MPI checks nothing of what ranks pass: mismatched counts are undefined
behaviour and mismatched dtypes silently wrong.  So every collective first
agrees on a signature: one 16-byte ``Iallreduce`` (MAX of ``[h, -h]``, ``h`` a
hash of the operation, dtype and shape) tells every rank whether all hashes
are equal; if not, the ranks gather each other's descriptions and raise
:class:`MismatchError` naming them.

Every collective copies its input into the buffer it returns and runs *in
place* there (MPI's ``IN_PLACE``; MPI's own algorithms begin with that copy
anyway).  So a collective that timed out, and goes on in the background
for the other ranks' sake, never reads the caller's array again: the caller
may change it at once, and the other ranks still get what it held.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import collectives, wire
from ...errors import MismatchError
from .. import SplitResult
from .groups import MpiGroup
from .progress import Call, Steps
from .reductions import element_type, reduction

if TYPE_CHECKING:
    from ...group import Group

#: Buffers from this size on are reduced by MPI's blocking collectives, run
#: in the group's worker thread: Open MPI's nonblocking ones progress only
#: inside Test calls and were up to ten times slower for mid-sized buffers here.
BLOCKING_FROM = 256 << 10


def flat_bytes(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1).view(np.uint8)


@functools.lru_cache(maxsize=1024)
def _identity(call: wire.Signature | str) -> tuple[str, int]:
    """A call's description and a 63-bit hash of it (cached: signatures repeat)."""
    what = call if isinstance(call, str) else call.describe()
    return what, int.from_bytes(hashlib.blake2b(what.encode(), digest_size=8).digest(), "little", signed=True) >> 1


def agree(MPI: Any, comm: Any, call: wire.Signature | str, rank: int) -> Steps[None]:
    """Every rank of ``comm`` made the same ``call``, or MismatchError naming them."""
    what, h = _identity(call)
    mine = np.array([h, -h], np.int64)
    out = np.empty(2, np.int64)
    yield comm.Iallreduce(mine, out, op=MPI.MAX)
    if out[0] == -out[1]:  # max == min: every rank's hash is the same
        return
    text = what.encode()[:255]
    row = np.zeros(256, np.uint8)
    row[0] = len(text)
    row[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    table = np.empty((comm.Get_size(), 256), np.uint8)
    yield comm.Iallgather([row, MPI.BYTE], [table, MPI.BYTE])
    calls = [bytes(r[1 : 1 + r[0]]).decode(errors="replace") for r in table]
    others = "; ".join(f"rank {i}: {c}" for i, c in enumerate(calls) if c != what)
    raise MismatchError(f"rank {rank} called {what}, but not every rank did the same ({others})")


def _in_place(state: MpiGroup, nbytes: int, blocking: Callable[..., Any], nonblocking: Callable[..., Any],
              MPI: Any, buf: list[Any], **kwargs: Any) -> Any:
    """The step of a collective on ``buf`` in place, moving ``nbytes``: MPI's
    blocking call in the group's worker thread from :data:`BLOCKING_FROM`
    on, else its nonblocking request."""
    if nbytes >= BLOCKING_FROM:
        return Call(lambda: blocking(MPI.IN_PLACE, buf, **kwargs), state.worker())
    return nonblocking(MPI.IN_PLACE, buf, **kwargs)


def all_reduce_steps(MPI: Any, group: Group, x: np.ndarray, op: str) -> Steps[np.ndarray]:
    state = group.handle
    yield from agree(MPI, state.comm, wire.signature(f"all_{op}", x.dtype, x.shape), group.rank())
    out = np.array(x, order="C", copy=True)
    datatype, mpi_op = reduction(MPI, x.dtype, op)
    comm = state.comm
    yield _in_place(state, x.nbytes, comm.Allreduce, comm.Iallreduce, MPI, [out, x.size, datatype], op=mpi_op)
    return out


def all_gather_steps(MPI: Any, group: Group, x: np.ndarray) -> Steps[np.ndarray]:
    state = group.handle
    yield from agree(MPI, state.comm, wire.signature("all_gather", x.dtype, x.shape), group.rank())
    out = np.empty(collectives.gathered_shape(x.shape, group.size()), x.dtype)
    flat_bytes(out)[group.rank() * x.nbytes : (group.rank() + 1) * x.nbytes] = flat_bytes(x)
    comm = state.comm
    yield _in_place(state, out.nbytes, comm.Allgather, comm.Iallgather, MPI,
                    [out, x.size, element_type(MPI, x.dtype)])
    return out


def sum_scatter_steps(MPI: Any, group: Group, x: np.ndarray) -> Steps[np.ndarray]:
    state = group.handle
    yield from agree(MPI, state.comm, wire.signature("sum_scatter", x.dtype, x.shape), group.rank())
    shape = collectives.scattered_shape(x.shape, group.size())
    work = np.array(x, order="C", copy=True).reshape(-1)
    count = work.size // group.size()
    datatype, mpi_op = reduction(MPI, x.dtype, "sum")
    comm = state.comm
    yield _in_place(state, x.nbytes, comm.Reduce_scatter_block, comm.Ireduce_scatter_block, MPI,
                    [work, count, datatype], op=mpi_op)
    out: np.ndarray = work[:count].copy().reshape(shape)
    return out


def describe(name: str, args: tuple[Any, ...]) -> list[Any]:
    """Collective ``name`` called with ``args``, as another rank can redo it (:func:`stand_in_steps`)."""
    if name == "split":
        return [name, "", "", []]
    x = args[0]
    sig = wire.signature(name, x.dtype, x.shape)
    return [name, args[1] if name == "all_reduce" else "", sig.dtype, list(x.shape)]


class _Seat:
    """A group as the steps see it, from its state alone."""

    def __init__(self, state: MpiGroup) -> None:
        self.handle = state
        self.members = state.members
        self.context = state.context
        self._rank: int = state.comm.Get_rank()

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return len(self.members)


def stand_in_steps(MPI: Any, state: MpiGroup, call: list[Any]) -> Steps[None]:
    """Take part, with zeros, in the collective ``call`` (see :func:`describe`)
    that another member gave up on and this rank had not started: the members
    that did start it wait inside MPI for this rank, and only a matching call
    ends their wait (MPI cannot cancel a collective).  The result is thrown
    away; the group is broken anyway."""
    name, op, dtype_name, shape = call
    seat: Any = _Seat(state)
    if name == "split":
        comm = state.comm
        yield from agree(MPI, comm, "split", seat.rank())
        table = np.empty((seat.size(), 2), np.int64)
        yield comm.Iallgather(np.array([-1, 0], np.int64), table)
        comm.Split(MPI.UNDEFINED, 0)
        return
    x = np.zeros(tuple(shape), wire.dtype_from_name(dtype_name))
    if name == "all_reduce":
        yield from all_reduce_steps(MPI, seat, x, op)
    elif name == "all_gather":
        yield from all_gather_steps(MPI, seat, x)
    else:
        yield from sum_scatter_steps(MPI, seat, x)


def split_steps(MPI: Any, group: Group, index: int, color: int, key: int) -> Steps[SplitResult]:
    from ..ring import split_context, split_order

    comm = group.handle.comm
    yield from agree(MPI, comm, "split", group.rank())
    mine = np.array([color, key], np.int64)
    table = np.empty((group.size(), 2), np.int64)
    yield comm.Iallgather(mine, table)
    members, rank = split_order(group, table, color)
    colors = sorted({int(c) for c in table[:, 0]})
    # Every rank has reached this split (all gave their color): MPI's blocking
    # split waits only for the others to get here too.
    sub = comm.Split(colors.index(color), rank)
    sub.Set_errhandler(MPI.ERRORS_RETURN)
    context = split_context(group.context, index, color)
    return SplitResult(members, rank, context, MpiGroup(sub, context, members))
