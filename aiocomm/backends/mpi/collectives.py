"""The collectives and split, as steps over a group's communicator.

MPI checks nothing of what ranks pass: mismatched counts are undefined
behaviour and mismatched dtypes silently wrong.  So every collective first
agrees on a signature (:func:`agree`): each rank contributes a
:data:`RECORD`-byte record -- a 63-bit hash of the operation, dtype and
shape -- to one ``Iallgather``, and every rank sees whether all hashes are
equal; if not, the ranks gather each other's descriptions and raise
:class:`MismatchError` naming them.  A record has room for a small input
(:data:`INLINE` bytes): a reduction of one that small is complete once the
records are in (each rank reduces the gathered inputs with numpy, in rank
order, so every rank gets the same bits), one round where it took two.
Groups of more than :data:`GATHER_UP_TO` ranks agree with a 16-byte
``Iallreduce`` instead (MAX of ``[h, -h]``; a table of records would grow
with the group) and carry no input.

Every other collective copies its input into the buffer it returns and runs
*in place* there (MPI's ``IN_PLACE``; MPI's own algorithms begin with that
copy anyway).  So a collective that timed out, and goes on in the background
for the other ranks' sake, never reads the caller's array again: the caller
may change it at once, and the other ranks still get what it held.

Reductions of :data:`RING_FROM` bytes or more are the exception: they go
around the ranks with nonblocking sends and receives (:func:`_halving` on a
power of two ranks, else :func:`_ring`) on a copy of the group's
communicator, straight from the caller's array into the result -- no copy,
no scratch memory, and no hand-off to another thread (Open MPI's blocking
``Allreduce`` cannot be interrupted, so it could only run in a worker
thread, and its nonblocking one is a binomial tree at 2 ranks or in place,
about half as fast).  One that was given up on may still read the caller's
array afterwards, so its last half carries a :class:`_Verdict`: every rank
says whether it gave up, and if one did, no rank returns the result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ... import collectives, results, wire
from ...errors import CommError, MismatchError
from ...exchanges import split_rows
from .. import GroupState, SplitResult
from . import progress
from .groups import MpiGroup
from .progress import Call, Steps, Until, abandon
from .reductions import UFUNCS, element_type, reduction

#: Buffers from this size on are gathered, scattered and broadcast by MPI's
#: blocking collectives, run in the group's worker thread: Open MPI's
#: nonblocking ones progress only inside Test calls and were up to ten times
#: slower for mid-sized buffers here.  (Reductions: see :data:`RING_FROM`.)
BLOCKING_FROM = 256 << 10
#: Reductions from this size on go around the ranks (:func:`_halving`, :func:`_ring`),
#: out of place from the caller's array, with a verdict on the way (:class:`_Verdict`).
RING_FROM = 256 << 10
#: The tag of the first half's messages on a group's ring communicator
#: (:attr:`~.groups.MpiGroup.ring`, which carries nothing else).
RING_TAG = 1
#: The tags from this one on are the last half's: each carries the verdict
#: its sender knew (see :class:`_Verdict`).
VERDICT_TAG = 2


def flat_bytes(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1).view(np.uint8)


#: Bytes of each rank's record in an agreement: its call's hash, then room
#: for an input of up to :data:`INLINE` bytes.
RECORD = 64
INLINE = RECORD - 8
#: The largest group that agrees by gathering records (larger ones reduce
#: a 16-byte hash pair instead, whose cost grows only with log(size)).
GATHER_UP_TO = 16


Identity = tuple[str, int, bytes, bytes]
_IDENTITIES: dict[tuple[str, np.dtype | None, tuple[int, ...]], Identity] = {}


def identity(op: str, dtype: np.dtype | None = None, shape: tuple[int, ...] = ()) -> Identity:
    """What every rank must agree on for a call of ``op`` (on an array of
    ``dtype`` and ``shape``, if it takes one): its description, a 63-bit
    hash of it, the hash's bytes and the record that carries no input.
    Cached: programs repeat the same few calls."""
    key = (op, dtype, shape)
    found = _IDENTITIES.get(key)
    if found is None:
        what = op if dtype is None else wire.signature(op, dtype, shape).describe()
        h = int.from_bytes(hashlib.blake2b(what.encode(), digest_size=8).digest(), "little", signed=True) >> 1
        hashed = h.to_bytes(8, "little", signed=True)
        if len(_IDENTITIES) >= 4096:
            _IDENTITIES.clear()
        found = _IDENTITIES[key] = (what, h, hashed, hashed.ljust(RECORD, b"\0"))
    return found


def carries(group: GroupState, x: np.ndarray) -> bool:
    """Whether the agreement's records carry ``x`` (the same on every rank
    that makes the same call)."""
    return x.nbytes <= INLINE and len(group.members) <= GATHER_UP_TO


def agree(MPI: Any, comm: Any, call: Identity, rank: int) -> Steps[None]:
    """Every rank of ``comm`` made the same ``call`` (its :func:`identity`),
    or MismatchError naming them.  (A reduction whose input the records
    carry agrees in :func:`carried_rest`.)"""
    what, h, hashed, empty = call
    size = comm.Get_size()
    if size > GATHER_UP_TO:
        mine = np.array([h, -h], np.int64)
        out = np.empty(2, np.int64)
        yield comm.Iallreduce(mine, out, op=MPI.MAX)
        top, bottom = out.tolist()
        if top == -bottom:  # max == min: every rank's hash is the same
            return
    else:
        table = bytearray(size * RECORD)
        yield comm.Iallgather(empty, table)
        if agreed(table, hashed):
            return
    yield from _disagreed(MPI, comm, what, rank)


def agreed(table: bytearray, hashed: bytes) -> bool:
    """Whether every record of an agreement's ``table`` begins with ``hashed``."""
    for at in range(0, len(table), RECORD):
        if table[at : at + 8] != hashed:
            return False
    return True


def _disagreed(MPI: Any, comm: Any, what: str, rank: int) -> Steps[None]:
    """The ranks' calls differ: gather what each called, raise MismatchError naming them."""
    size = comm.Get_size()
    text = what.encode()[:255]
    row = np.zeros(256, np.uint8)
    row[0] = len(text)
    row[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    descriptions = np.empty((size, 256), np.uint8)
    yield comm.Iallgather([row, MPI.BYTE], [descriptions, MPI.BYTE])
    calls = [bytes(r[1 : 1 + r[0]]).decode(errors="replace") for r in descriptions]
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


REDUCTION_NAMES = {"sum": "all_sum", "max": "all_max", "min": "all_min"}  # (their public names)


class Carried:
    """A reduction whose input its agreement's records carry (see
    :func:`carries`), for one operation, dtype and shape on one group: its
    record, its table of every rank's record, and views of the inputs in
    that table, made once.  The blocking face keeps one per call shape in
    :attr:`~.groups.MpiGroup.carried` and uses it again while its calls end
    normally (an 8-byte ``all_sum`` then allocates nothing but its result);
    one whose request may still be in MPI's hands is never used again."""

    __slots__ = ("call", "record", "table", "_stacked", "_pair", "_dtype", "_hashes", "_expected", "_ufunc",
                 "_scalar")

    def __init__(self, call: Identity, x: np.ndarray, op: str, size: int) -> None:
        self.call = call
        self.record = bytearray(call[3])  # the hash, then room for the input
        self.table = bytearray(size * RECORD)
        shape, strides = (x.shape, x.strides) if x.ndim else ((1,), (x.itemsize,))
        # (every rank's input as one array, rank first: one accumulate reduces them all;
        # two ranks' with one binary call, which costs half what one accumulate does)
        self._stacked = np.ndarray((size, *shape), x.dtype, self.table, 8, (RECORD, *strides))
        self._pair = (self._stacked[0], self._stacked[1]) if size == 2 else None
        self._dtype = x.dtype
        self._hashes = memoryview(self.table).cast("q")[:: RECORD // 8]  # each record's first word
        self._expected = memoryview(call[2]).cast("q").tolist() * size
        self._ufunc = UFUNCS[op]
        self._scalar = not x.ndim

    def start(self, comm: Any, x: np.ndarray) -> Any:
        """Issue the agreement, carrying ``x``: its request."""
        self.record[8 : 8 + x.nbytes] = x.tobytes()
        return comm.Iallgather(self.record, self.table)

    def result(self) -> np.ndarray | None:
        """The reduction of the carried inputs in rank order (a new array) if
        every rank made this call (once the request is done), else ``None``."""
        if self._hashes.tolist() != self._expected:
            return None
        pair = self._pair
        if pair is not None:
            reduced: np.ndarray = self._ufunc(pair[0], pair[1])
        else:
            # (an accumulate applies the ufunc row after row, in rank order,
            # as MPI's reduction of these inputs would: ufunc.reduce may not,
            # and one call costs what a single binary call does;
            # dtype: add would widen the small integers)
            reduced = self._ufunc.accumulate(self._stacked, 0, self._dtype)[-1]
        return reduced.reshape(()) if self._scalar else reduced


def carried_rest(MPI: Any, comm: Any, carried: Carried, rank: int, request: Any) -> Steps[np.ndarray]:
    """The steps of a carried reduction (see :func:`all_reduce_steps`) from
    its agreement's ``request`` on, issued already (the backend's fast path
    for small calls goes on here when the request is not done at once, or
    the ranks disagree)."""
    yield request
    reduced = carried.result()
    if reduced is None:
        yield from _disagreed(MPI, comm, carried.call[0], rank)
        raise AssertionError("_disagreed raises")
    return reduced


def all_reduce_steps(MPI: Any, group: GroupState, x: np.ndarray, op: str) -> Steps[np.ndarray]:
    state = group.handle
    comm = state.comm
    call = identity(REDUCTION_NAMES[op], x.dtype, x.shape)
    if carries(group, x):
        carried = Carried(call, x, op, group.size())
        return (yield from carried_rest(MPI, comm, carried, group.rank(), carried.start(comm, x)))
    yield from agree(MPI, comm, call, group.rank())
    if x.nbytes < RING_FROM:
        out = results.copy_of(x)
        datatype, mpi_op = reduction(MPI, x.dtype, op)
        yield comm.Iallreduce(MPI.IN_PLACE, [out, x.size, datatype], op=mpi_op)
        return out
    if state.ring is None:  # (every rank gets here at the same call: the first that goes around)
        ring, made = state.comm.Idup()
        yield made
        state.ring = ring
    out = results.empty(x.shape, x.dtype)
    size = group.size()
    # (halving needs a part to give away at every round: at least size / 2 elements)
    around = _halving if size & (size - 1) == 0 and x.size >= size else _ring
    live: list[Any] = []
    try:
        first = yield from around(MPI, state, x.reshape(-1), out.reshape(-1), UFUNCS[op], live)
    except BaseException:  # (raised here, a Ctrl-C say: what MPI still moves keeps its buffers)
        for request in live:
            progress.abandon_request(request, x, out)
        raise
    if first < size:
        raise CommError(f"rank {group.members[group.rank()]}: rank {state.members[first]} gave up on this "
                        f"{REDUCTION_NAMES[op]} on this group (or its group broke meanwhile), so no rank keeps "
                        "its result")
    return out


class _Verdict:
    """Which ranks gave up on a reduction that reads the caller's array
    (:func:`_ring`, :func:`_halving`): MPI may read that array after the
    caller got control back, so no rank may return the result if one did.
    Each rank says so once it reads its array no more (its group is broken
    by then: ``MpiBackend`` breaks it before it hands a call it gave up on to
    the background), and the word travels with the last half of the
    reduction: every message of that half is tagged with the lowest group
    rank its sender knew gave up when it sent it (none: :data:`VERDICT_TAG`
    itself; rank ``r``: ``VERDICT_TAG + 1 + r``), and that half reaches every
    rank from every rank.  Its receives take any tag (the ring's
    communicator carries nothing but the reduction's messages, and MPI keeps
    the order of a sender's messages), so the word costs no message of its
    own.  A rank that gave up runs all this in the background, like the rest
    of the call."""

    __slots__ = ("lowest", "size", "top", "status")

    def __init__(self, MPI: Any, state: MpiGroup) -> None:
        comm = state.ring
        self.size: int = comm.Get_size()
        self.lowest: int = comm.Get_rank() if state.broken is not None else self.size
        # (the largest rank a tag can name: MPI promises tags up to 32767 only)
        self.top: int = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB) - VERDICT_TAG - 1
        self.status = MPI.Status()

    def tag(self) -> int:
        """The tag of a message sent now."""
        lowest = self.lowest
        return VERDICT_TAG if lowest >= self.size else VERDICT_TAG + 1 + min(lowest, self.top)

    def receive(self, requests: list[Any]) -> Steps[None]:
        """Wait for ``requests`` (a part's receives, posted with any tag) and
        take in the word their tags carry."""
        status = self.status
        for request in requests:
            yield request, status
            heard = status.Get_tag() - VERDICT_TAG - 1
            if 0 <= heard < self.lowest:
                self.lowest = heard


def _ring(MPI: Any, state: MpiGroup, x: np.ndarray, out: np.ndarray, ufunc: Any, live: list[Any]) -> Steps[int]:
    """All-reduce the flat array ``x`` into ``out`` around the ring of ranks:
    each rank's share (one of ``size`` segments) is reduced on its way
    around (``size - 1`` rounds), then the reduced shares go around once
    more.  Each segment is reduced in one order, on one path, so every rank
    gets the same bits.  It reads ``x`` itself (see :class:`_Verdict`) and
    needs no memory beyond ``out``: a segment is received into its place in
    ``out`` and reduced there with numpy (which lets the GIL go).  Gives
    the :class:`_Verdict`: the lowest group rank that gave up, or ``size``."""
    comm = state.ring
    size, me = comm.Get_size(), comm.Get_rank()
    after, before = (me + 1) % size, (me - 1) % size
    bounds = [x.size * k // size for k in range(size + 1)]
    x_bytes, out_bytes = x.view(np.uint8), out.view(np.uint8)
    item = x.itemsize

    def segment(flat: np.ndarray, k: int) -> np.ndarray:
        return flat[bounds[k] * item : bounds[k + 1] * item]

    for r in range(size - 1):  # reduce-scatter: segment me - r goes on, me - r - 1 arrives
        send, recv = (me - r) % size, (me - r - 1) % size
        sending = _post(comm.Isend, MPI, live, segment(x_bytes if r == 0 else out_bytes, send), after)
        yield from _all(_post(comm.Irecv, MPI, live, segment(out_bytes, recv), before))
        mine = out[bounds[recv] : bounds[recv + 1]]
        with np.errstate(all="ignore"):  # (as MPI's own reductions: inf or nan, no warning)
            ufunc(mine, x[bounds[recv] : bounds[recv + 1]], out=mine)
        yield from _all(sending)
    verdict = _Verdict(MPI, state)  # (``x`` is read no more)
    for r in range(size - 1):  # all-gather: the reduced segments go around, each tagged with the verdict so far
        send, recv = (me + 1 - r) % size, (me - r) % size
        sending = _post(comm.Isend, MPI, live, segment(out_bytes, send), after, verdict.tag())
        yield from verdict.receive(_post(comm.Irecv, MPI, live, segment(out_bytes, recv), before, MPI.ANY_TAG))
        yield from _all(sending)
    return verdict.lowest


#: The most bytes one message of :func:`_ring` or :func:`_halving` carries
#: (MPI 3 counts are C ints): a larger part goes as several.
MESSAGE_BYTES = 1 << 30


def _post(post: Callable[..., Any], MPI: Any, live: list[Any], part: np.ndarray, peer: int,
          tag: int = RING_TAG) -> list[Any]:
    """Send or receive (``post``: the communicator's ``Isend`` or ``Irecv``)
    the bytes ``part`` to or from ``peer``, in messages of at most
    :data:`MESSAGE_BYTES` (both sides split alike) tagged ``tag``; the
    requests, also added to ``live``."""
    progress.hurry()
    if len(part) <= MESSAGE_BYTES:  # (one message: no slicing, a few microseconds a round on 1 MiB)
        requests = [post([part, MPI.BYTE], peer, tag)]
    else:
        requests = [post([part[at : at + MESSAGE_BYTES], MPI.BYTE], peer, tag)
                    for at in range(0, len(part), MESSAGE_BYTES)]
    live += requests
    return requests


def _all(requests: list[Any]) -> Steps[None]:
    yield from requests


def _halving(MPI: Any, state: MpiGroup, x: np.ndarray, out: np.ndarray, ufunc: Any,
             live: list[Any]) -> Steps[int]:
    """:func:`_ring`'s work for a group of a power of two ranks in
    ``2 log2(size)`` rounds instead of ``2 (size - 1)`` (recursive halving,
    then doubling): each round a rank swaps half of what it holds with the
    rank whose number differs in one bit and reduces the half it keeps, then
    the reduced parts are swapped back the other way.  The same bytes move;
    fewer rounds matter where ranks share cores.  Each element is reduced on
    one rank, so every rank gets the same bits.  A part that arrives for a
    half this rank already reduced waits in the part of ``out`` it gave away
    the round before (so no memory beyond ``out``; it is large enough once
    there are at least ``size / 2`` elements)."""
    comm = state.ring
    size, me = comm.Get_size(), comm.Get_rank()
    item = x.itemsize
    x_bytes, out_bytes = x.view(np.uint8), out.view(np.uint8)
    lo, hi = 0, x.size
    levels: list[tuple[int, int]] = []
    spare = 0  # where the part given away last round began (free since)
    mask = size >> 1
    while mask:
        partner, mid = me ^ mask, (lo + hi) // 2
        (keep_lo, keep_hi), (give_lo, give_hi) = ((mid, hi), (lo, mid)) if me & mask else ((lo, mid), (mid, hi))
        first = not levels
        source = x_bytes if first else out_bytes
        sending = _post(comm.Isend, MPI, live, source[give_lo * item : give_hi * item], partner)
        at = keep_lo if first else spare
        yield from _all(_post(comm.Irecv, MPI, live, out_bytes[at * item : (at + keep_hi - keep_lo) * item], partner))
        mine = out[keep_lo:keep_hi]
        with np.errstate(all="ignore"):  # (as in _ring)
            ufunc(mine, (x if first else out)[at : at + keep_hi - keep_lo], out=mine)
        yield from _all(sending)
        levels.append((lo, hi))
        lo, hi, spare = keep_lo, keep_hi, give_lo
        mask >>= 1
    verdict = _Verdict(MPI, state)  # (``x`` is read no more)
    mask = 1
    while mask < size:  # back up: swap the reduced parts, tagged with the verdict so far
        partner = me ^ mask
        up_lo, up_hi = levels.pop()
        other_lo, other_hi = (up_lo, lo) if lo > up_lo else (hi, up_hi)
        sending = _post(comm.Isend, MPI, live, out_bytes[lo * item : hi * item], partner, verdict.tag())
        yield from verdict.receive(
            _post(comm.Irecv, MPI, live, out_bytes[other_lo * item : other_hi * item], partner, MPI.ANY_TAG))
        yield from _all(sending)
        lo, hi = up_lo, up_hi
        mask <<= 1
    return verdict.lowest


def all_gather_steps(MPI: Any, group: GroupState, x: np.ndarray) -> Steps[np.ndarray]:
    state = group.handle
    yield from agree(MPI, state.comm, identity("all_gather", x.dtype, x.shape), group.rank())
    out = results.empty(collectives.gathered_shape(x.shape, group.size()), x.dtype)
    flat_bytes(out)[group.rank() * x.nbytes : (group.rank() + 1) * x.nbytes] = flat_bytes(x)
    comm = state.comm
    yield _in_place(state, out.nbytes, comm.Allgather, comm.Iallgather, MPI,
                    [out, x.size, element_type(MPI, x.dtype)])
    return out


def sum_scatter_steps(MPI: Any, group: GroupState, x: np.ndarray) -> Steps[np.ndarray]:
    state = group.handle
    yield from agree(MPI, state.comm, identity("sum_scatter", x.dtype, x.shape), group.rank())
    shape = collectives.scattered_shape(x.shape, group.size())
    work = results.copy_of(x).reshape(-1)
    count = work.size // group.size()
    datatype, mpi_op = reduction(MPI, x.dtype, "sum")
    comm = state.comm
    yield _in_place(state, x.nbytes, comm.Reduce_scatter_block, comm.Ireduce_scatter_block, MPI,
                    [work, count, datatype], op=mpi_op)
    out = results.copy_of(work[:count]).reshape(shape)
    return out


def broadcast_steps(MPI: Any, group: GroupState, x: np.ndarray, root: int) -> Steps[np.ndarray]:
    state = group.handle
    yield from agree(MPI, state.comm, identity(f"broadcast from rank {root}", x.dtype, x.shape), group.rank())
    out = results.copy_of(x) if group.rank() == root else results.empty(x.shape, x.dtype)
    comm = state.comm
    buf = [out, out.size, element_type(MPI, x.dtype)]
    if out.nbytes >= BLOCKING_FROM:
        yield Call(lambda: comm.Bcast(buf, root), state.worker())
    else:
        yield comm.Ibcast(buf, root)
    return out


def gather_steps(MPI: Any, group: GroupState, x: np.ndarray, root: int) -> Steps[np.ndarray | None]:
    state = group.handle
    yield from agree(MPI, state.comm, identity(f"gather to rank {root}", x.dtype, x.shape), group.rank())
    comm, kind = state.comm, element_type(MPI, x.dtype)
    # (blocking and nonblocking collectives never match: decide on what every rank knows)
    blocking = x.nbytes * group.size() >= BLOCKING_FROM
    if group.rank() != root:
        mine = results.copy_of(x)  # (never the caller's: see the module's notes)
        send = [mine, mine.size, kind]
        if blocking:
            yield Call(lambda: comm.Gather(send, None, root), state.worker())
        else:
            yield comm.Igather(send, None, root)
        return None
    out = results.empty(collectives.gathered_shape(x.shape, group.size()), x.dtype)
    flat_bytes(out)[root * x.nbytes : (root + 1) * x.nbytes] = flat_bytes(x)
    recv = [out, x.size, kind]
    if blocking:
        yield Call(lambda: comm.Gather(MPI.IN_PLACE, recv, root), state.worker())
    else:
        yield comm.Igather(MPI.IN_PLACE, recv, root)
    return out


def all_to_all_steps(MPI: Any, group: GroupState, x: np.ndarray) -> Steps[np.ndarray]:
    state = group.handle
    split_rows(x.shape, group.size(), "all_to_all")
    yield from agree(MPI, state.comm, identity("all_to_all", x.dtype, x.shape), group.rank())
    work = results.copy_of(x)
    out = results.empty(x.shape, x.dtype)
    comm, count, kind = state.comm, x.size // group.size(), element_type(MPI, x.dtype)
    send, recv = [work, count, kind], [out, count, kind]
    if x.nbytes >= BLOCKING_FROM:
        yield Call(lambda: comm.Alltoall(send, recv), state.worker())
    else:
        yield comm.Ialltoall(send, recv)
    return out


def all_gather_v_steps(MPI: Any, group: GroupState, x: np.ndarray) -> Steps[tuple[np.ndarray, list[int]]]:
    state = group.handle
    rows = x.reshape(1, *x.shape) if x.ndim == 0 else x
    yield from agree(MPI, state.comm, identity("all_gather_v of rows", x.dtype, x.shape[1:]), group.rank())
    comm = state.comm
    counts = np.empty(group.size(), np.int64)
    yield comm.Iallgather(np.array([rows.shape[0]], np.int64), counts)
    lengths = [int(c) for c in counts]
    row_items = int(np.prod(rows.shape[1:], dtype=np.int64))
    out = results.empty((sum(lengths), *rows.shape[1:]), x.dtype)
    items = [c * row_items for c in lengths]
    starts = [sum(items[:p]) for p in range(group.size())]
    me = group.rank()
    out.reshape(-1)[starts[me] : starts[me] + items[me]] = rows.reshape(-1)
    yield _in_place(state, out.nbytes, comm.Allgatherv, comm.Iallgatherv, MPI,
                    [out, (items, starts), element_type(MPI, x.dtype)])
    return out, lengths


def barrier_steps(MPI: Any, group: GroupState) -> Steps[None]:
    """Every rank has entered once the agreement is done."""
    yield from agree(MPI, group.handle.comm, identity("barrier"), group.rank())


def _stand_ins(MPI: Any, state: MpiGroup) -> Steps[None]:
    """Issue a stand-in for every collective some member issued on the
    broken group ``state`` that this rank has not: its agreement step with
    the signature "stand-in", once no collective of this rank is still
    being issued (MPI matches a group's collective calls by their order).

    MPI cannot cancel a collective: members that issued one wait inside MPI
    until every member has issued it too.  A stand-in is enough: its
    signature differs from any real call's, so the agreement ends (with a
    mismatch) on every member and no rank goes on to the collective itself;
    members that are all standing in agree, and stop there too."""
    rank = state.comm.Get_rank()
    while True:
        with state.lock:
            if state.entered >= state.known:
                state.draining = False
                return
            ready = state.current is None
            if ready:
                state.entered += 1
                state.current = "a stand-in"
        if not ready:
            yield Until(lambda: state.current is None)
            continue
        try:
            yield from agree(MPI, state.comm, identity("stand-in"), rank)
        except MismatchError:
            pass
        finally:
            state.current = None


def stand_in(MPI: Any, state: MpiGroup) -> None:
    """Make sure this rank stands in, in the background, for the
    collectives of broken group ``state`` that others issued and it did not
    (see :func:`_stand_ins`)."""
    with state.lock:
        if state.draining or state.entered >= state.known:
            return
        state.draining = True
    steps = _stand_ins(MPI, state)
    try:
        abandon(steps, next(steps))
    except StopIteration:
        pass


def split_steps(MPI: Any, group: GroupState, index: int, color: int, key: int) -> Steps[SplitResult]:
    from ..ring import split_context, split_order

    comm = group.handle.comm
    yield from agree(MPI, comm, identity("split"), group.rank())
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
