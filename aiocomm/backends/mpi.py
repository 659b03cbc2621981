"""The MPI backend: the job's MPI library through mpi4py.

Theory of operation
-------------------
The world is ``MPI.COMM_WORLD`` duplicated (so aiocomm's traffic never
matches the program's own MPI calls), with errors *returned* instead of
aborting; a split is ``MPI_Comm_split`` of the parent's communicator.

Every operation is written once, as a generator of *steps*: it issues
nonblocking MPI requests (``Iallreduce``, ``Isend``, ...) and yields each
one it must see complete.  Two drivers run the same steps:

* the blocking face calls MPI straight from the caller's thread
  (:meth:`MpiBackend.call_blocking`): no hand-off to a loop thread, so an
  8-byte ``all_sum`` costs little more than MPI's own;
* the async face awaits each request through the :class:`Poller`, a thread
  that tests the pending requests (where MPI computes), so the event loop
  stays free during a long operation.

Both drivers bound every wait by the operation's deadline.  An MPI
collective cannot be cancelled: one that timed out is abandoned (its buffers
are kept alive) and its group is broken.  A receive that timed out is
cancelled, so nothing it would have taken is lost.

MPI checks nothing of what ranks pass: mismatched counts are undefined
behaviour and mismatched dtypes silently wrong.  So every collective first
agrees on a signature: one 16-byte ``Iallreduce`` (MAX of ``[h, -h]``, ``h`` a
hash of the operation, dtype and shape) tells every rank whether all hashes
are equal; if not, the ranks gather each other's descriptions and raise
:class:`MismatchError` naming them.  Point-to-point messages carry a header
message (the signature) before the data, on the same communicator and
source; a receive whose signature does not fit keeps the header for the next
receive, and the data stays queued in MPI.

Reductions MPI lacks (float16, bfloat16, bool sums) and those whose numpy
semantics differ from MPI's (floating max/min propagate NaN; complex max/min
compare lexicographically) are user-defined MPI operations that run numpy's
ufunc on each pair of buffers.

Collectives of one group are issued in call order on every rank (MPI
requires it): a group runs one collective at a time, in the order they were
called.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import numpy as np

from .. import collectives, failure_report, wire
from ..errors import CommError, CommTimeoutError, MismatchError, ProtocolError
from . import SplitResult

if TYPE_CHECKING:
    from ..group import Group

T = TypeVar("T")
# A step generator yields a request (or a request and a status to fill) and
# gets nothing back; its return value is the operation's result.
Steps = Generator[Any, None, T]

#: Environment variables an MPI launcher sets (Open MPI, MPICH/Hydra, PMIx).
MPI_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")

HEAD_TAG, DATA_TAG = 1, 2
#: Seconds a blocking call keeps testing its request without sleeping.
SPIN_SECONDS = 0.05
_lock = threading.Lock()
MAX_HEAD = 4096

_MPI: Any = None
_present: bool | None = None
_why_unavailable = ""


def present() -> bool:
    """Whether mpi4py is installed and an MPI library can be found, checked
    without importing ``mpi4py.MPI`` (importing it would start MPI, or, told
    not to, leave the program's own mpi4py uninitialised)."""
    global _present
    if _present is None:
        import ctypes.util
        import importlib.util

        global _why_unavailable
        if importlib.util.find_spec("mpi4py") is None:
            _why_unavailable = "mpi4py is not installed; pip install 'aiocomm[mpi]'"
            _present = False
        elif "mpi4py.MPI" not in sys.modules and ctypes.util.find_library("mpi") is None:
            _why_unavailable = "mpi4py is installed but no MPI library (libmpi) was found"
            _present = False
        else:
            _present = True
    return _present


def load() -> Any:
    """The ``mpi4py.MPI`` module (which starts MPI, as mpi4py does on import,
    with MPI_THREAD_MULTIPLE), or None."""
    global _MPI, _why_unavailable
    if _MPI is not None:
        return _MPI
    if not present():
        return None
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.finalize = False  # aiocomm finalizes (see _finalize): never in a forked child or a failed rank
    try:
        from mpi4py import MPI
    except Exception as exc:  # the MPI library itself could not be loaded
        _why_unavailable = f"mpi4py could not load an MPI library: {exc}"
        return None
    _MPI = MPI
    return MPI


def why_unavailable() -> str:
    present()
    return _why_unavailable


def started_by_mpi_launcher(environ: Any = None) -> bool:
    env = os.environ if environ is None else environ
    return any(var in env for var in MPI_LAUNCHER_VARS)


class MpiGroup:
    """A group's state on the MPI backend (``Group.handle``)."""

    __slots__ = ("comm", "broken", "busy", "queues", "kept")

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.broken: CommError | None = None  # why a collective failed: the group is unusable
        self.busy = 0  # async collectives in progress
        # per ordered stream (the collectives; the receives from one source):
        # done when the last operation called on it is done
        self.queues: dict[Any, asyncio.Future[None]] = {}
        # source -> messages a receive took from MPI but did not keep (it did
        # not fit, or gave up): their headers, and data if it had arrived
        self.kept: dict[int, collections.deque[tuple[bytes, np.ndarray | None]]] = {}


def world(MPI: Any) -> Any:
    """COMM_WORLD duplicated, MPI initialised first if need be; MPI is
    finalized at exit by :func:`_finalize`."""
    global _owner_pid
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    if _owner_pid is None:
        _owner_pid = os.getpid()
        import atexit

        atexit.register(_finalize, MPI)
        _watch_failures()
    comm = MPI.COMM_WORLD.Dup()
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    return comm


_owner_pid: int | None = None  # the process that started MPI (a forked child must not finalize it)
_failing = False  # an uncaught exception is ending this process


def _watch_failures() -> None:
    """Note an uncaught exception (in any thread), so the exit does not
    finalize: MPI_Finalize would wait for ranks that wait for this one, while
    a rank that exits without it makes mpirun end the job at once, naming it."""
    previous = sys.excepthook
    real_exit = sys.exit

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        global _failing
        if not issubclass(kind, SystemExit):
            _failing = True
        previous(kind, exc, tb)

    def exit(status: str | int | None = None) -> NoReturn:  # sys.exit(5): a failing rank too
        global _failing
        if status not in (None, 0):
            _failing = True
        real_exit(status)

    sys.excepthook = hook
    sys.exit = exit


# ------------------------------------------------------------------ reductions

_ELEMENT_TYPES: dict[int, str] = {1: "BYTE", 2: "UINT16_T", 4: "UINT32_T", 8: "UINT64_T", 16: "C_DOUBLE_COMPLEX"}
_UFUNCS = {"sum": np.add, "max": np.maximum, "min": np.minimum}
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
        ufunc = _UFUNCS[op]

        def apply(
            inbuf: Any, inoutbuf: Any, datatype: Any, ufunc: Callable[..., Any] = ufunc, dtype: np.dtype = dtype
        ) -> None:
            a = np.frombuffer(inbuf, dtype)
            b = np.frombuffer(inoutbuf, dtype)
            ufunc(a, b, out=b)  # inout = in (op) inout; numpy's ufuncs are commutative here

        mpi_op = _user_ops[key] = MPI.Op.Create(apply, commute=True)
    return element_type(MPI, dtype), mpi_op


def _bytes(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1).view(np.uint8)


# ------------------------------------------------------------------ steps

#: Buffers from this size on are reduced by MPI's blocking collectives, run
#: in a worker thread: Open MPI's nonblocking ones progress only inside
#: Test calls and were up to ten times slower for mid-sized buffers here.
BLOCKING_FROM = 256 << 10


class Call:
    """A step that is a blocking MPI call, run in a worker thread (so its
    wait can still be bounded by the operation's deadline)."""

    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: Any = None  # a concurrent.futures.Future once started

    def start(self) -> Any:
        if self.future is None:
            self.future = _executor().submit(self.fn)
        return self.future


_pool: Any = None


def _executor() -> Any:
    global _pool
    if _pool is None:
        import concurrent.futures

        with _lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="aiocomm-mpi")
    return _pool


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
    text = what.encode()[: 255]
    row = np.zeros(256, np.uint8)
    row[0] = len(text)
    row[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    table = np.empty((comm.Get_size(), 256), np.uint8)
    yield comm.Iallgather([row, MPI.BYTE], [table, MPI.BYTE])
    calls = [bytes(r[1 : 1 + r[0]]).decode(errors="replace") for r in table]
    others = "; ".join(f"rank {i}: {c}" for i, c in enumerate(calls) if c != what)
    raise MismatchError(f"rank {rank} called {what}, but not every rank did the same ({others})")


def _collective_step(nbytes: int, blocking: Callable[..., Any], nonblocking: Callable[..., Any],
                     *args: Any, **kwargs: Any) -> Any:
    """The step of a collective moving ``nbytes``: MPI's blocking call in a
    worker thread from :data:`BLOCKING_FROM` on, else its nonblocking request."""
    if nbytes >= BLOCKING_FROM:
        return Call(lambda: blocking(*args, **kwargs))
    return nonblocking(*args, **kwargs)


def all_reduce_steps(MPI: Any, group: Group, x: np.ndarray, op: str) -> Steps[np.ndarray]:
    comm = group.handle.comm
    yield from agree(MPI, comm, wire.signature(f"all_{op}", x.dtype, x.shape), group.rank())
    out = np.empty(x.shape, x.dtype)
    datatype, mpi_op = reduction(MPI, x.dtype, op)
    send, recv = [x, x.size, datatype], [out, x.size, datatype]
    yield _collective_step(x.nbytes, comm.Allreduce, comm.Iallreduce, send, recv, op=mpi_op)
    return out


def all_gather_steps(MPI: Any, group: Group, x: np.ndarray) -> Steps[np.ndarray]:
    comm = group.handle.comm
    yield from agree(MPI, comm, wire.signature("all_gather", x.dtype, x.shape), group.rank())
    out = np.empty(collectives.gathered_shape(x.shape, group.size()), x.dtype)
    datatype = element_type(MPI, x.dtype)
    send, recv = [x, x.size, datatype], [out, x.size, datatype]
    yield _collective_step(out.nbytes, comm.Allgather, comm.Iallgather, send, recv)
    return out


def sum_scatter_steps(MPI: Any, group: Group, x: np.ndarray) -> Steps[np.ndarray]:
    comm = group.handle.comm
    yield from agree(MPI, comm, wire.signature("sum_scatter", x.dtype, x.shape), group.rank())
    out = np.empty(collectives.scattered_shape(x.shape, group.size()), x.dtype)
    datatype, mpi_op = reduction(MPI, x.dtype, "sum")
    send, recv = [x, out.size, datatype], [out, out.size, datatype]
    yield _collective_step(x.nbytes, comm.Reduce_scatter_block, comm.Ireduce_scatter_block, send, recv, op=mpi_op)
    return out


def split_steps(MPI: Any, group: Group, index: int, color: int, key: int) -> Steps[SplitResult]:
    from .ring import split_context, split_order

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
    return SplitResult(members, rank, context, MpiGroup(sub))


def send_steps(MPI: Any, group: Group, x: np.ndarray, dst: int) -> Steps[None]:
    comm = group.handle.comm
    head = np.frombuffer(wire.signature("send", x.dtype, x.shape).encoded, np.uint8)
    first = comm.Isend([head, MPI.BYTE], dst, tag=HEAD_TAG)
    second = comm.Isend([_bytes(x), MPI.BYTE], dst, tag=DATA_TAG)
    yield first
    yield second


def _cancel(request: Any, status: Any) -> None:
    """Cancel a receive and wait until it is settled; one that completed
    already (a test found it done, filling ``status``) is left as it is."""
    if request:  # still active (mpi4py makes a completed request false)
        request.Cancel()
        request.Wait(status)


def recv_steps(MPI: Any, group: Group, shape: tuple[int, ...], dtype: np.dtype, src: int) -> Steps[np.ndarray]:
    """Header, then data, from ``src``.  Nothing taken from MPI is lost: a
    header that does not fit, or a message whose receive gave up, is kept
    first in line for the next receive from ``src`` (receives from one source
    run one at a time, so they take messages in order)."""
    comm = group.handle.comm
    sig = wire.signature("send", dtype, shape)
    kept = group.handle.kept.setdefault(src, collections.deque())
    me, peer = group.members[group.rank()], group.members[src]
    if kept:
        head, data = kept[0]
        wire.check_signature(sig, head, me=me, peer=peer)  # MismatchError: it stays first in line
        kept.popleft()
        if data is not None:
            arrived: np.ndarray = data.reshape(shape)
            return arrived
    else:
        buf = np.empty(MAX_HEAD, np.uint8)
        status = MPI.Status()
        request = comm.Irecv([buf, MPI.BYTE], src, tag=HEAD_TAG)
        try:
            yield request, status
        except BaseException:
            _cancel(request, status)
            if not status.Is_cancelled():  # it came after all: keep it for the next receive
                kept.append((bytes(buf[: status.Get_count(MPI.BYTE)]), None))
            raise
        head = bytes(buf[: status.Get_count(MPI.BYTE)])
        try:
            wire.check_signature(sig, head, me=me, peer=peer)
        except MismatchError:
            kept.appendleft((head, None))  # the message waits for a receive that fits
            raise
    out = np.empty(shape, dtype)
    status = MPI.Status()
    request = comm.Irecv([_bytes(out), MPI.BYTE], src, tag=DATA_TAG)
    try:
        yield request, status
    except BaseException:
        _cancel(request, status)
        # Cancelled: the data stays queued in MPI; arrived meanwhile: keep it.
        kept.appendleft((head, None if status.Is_cancelled() else out))
        raise
    if status.Get_count(MPI.BYTE) != out.nbytes:
        raise ProtocolError(f"rank {peer} sent {status.Get_count(MPI.BYTE)} bytes for {sig.describe()}")
    return out


_PUBLIC = {"all_reduce": "a collective"}  # engine operation names as the user called them

_STEPS: dict[str, Callable[..., Steps[Any]]] = {
    "all_reduce": all_reduce_steps,
    "all_gather": all_gather_steps,
    "sum_scatter": sum_scatter_steps,
    "split": split_steps,
    "send": send_steps,
    "recv": recv_steps,
}


# ------------------------------------------------------------------ drivers


class Poller:
    """Completes the MPI requests that coroutines await, in a thread of its own.

    MPI makes progress inside the calls that test requests, and for a large
    reduction one such call can compute for milliseconds.  So the tests run
    in this thread (mpi4py lets the GIL go inside MPI calls), never on an
    event loop: the loops stay free.  Each completion is handed to its loop
    with ``call_soon_threadsafe``.  While requests are pending the thread
    tests them in a tight loop for a while, then backs off to sleeps of up
    to a millisecond, so an idle wait does not spin the CPU; with nothing
    pending it sleeps on an event.
    """

    def __init__(self) -> None:
        self._new: list[tuple[Any, Any, asyncio.Future[None] | None]] = []
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[[], Any], asyncio.Future[None]]] = []
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aiocomm-mpi-progress", daemon=True)
        self._thread.start()

    def wait(self, request: Any, status: Any = None) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._new.append((request, status, future))
        self._wake.set()
        return future

    def call(self, fn: Callable[[], Any]) -> asyncio.Future[None]:
        """Run ``fn`` in the progress thread, between its tests; the future ends when it has run."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._calls.append((fn, future))
        self._wake.set()
        return future

    def finish(self, steps: Steps[Any], step: Any) -> None:
        """Drive an operation that its caller gave up on to its end, so the
        other ranks' matching calls complete (MPI cannot cancel a collective)."""
        with self._lock:
            self._new.append((step, steps, None))
        self._wake.set()

    def _run(self) -> None:
        # entries: (request, status, future) awaited by a coroutine, or
        # (step, steps, None) of an abandoned operation driven to its end
        pending: list[tuple[Any, Any, Any]] = []
        idle_since = time.monotonic()
        while True:
            if not pending:
                self._wake.wait()
            self._wake.clear()
            with self._lock:
                if self._new:
                    pending.extend(self._new)
                    self._new.clear()
                    idle_since = time.monotonic()
                calls, self._calls = self._calls, []
            for fn, done in calls:
                try:
                    fn()
                except BaseException:
                    pass
                _settle(done, None)
            still = []
            for entry in pending:
                if entry[2] is None:  # an abandoned operation
                    step, steps, _ = entry
                    try:
                        if isinstance(step, Call):
                            if not step.start().done():
                                still.append(entry)
                                continue
                        else:
                            request, status = _split_step(step)
                            if not request.Test(status):
                                still.append(entry)
                                continue
                        still.append((steps.send(None), steps, None))
                    except BaseException:  # StopIteration (its end) or an error: nobody to tell
                        _forget(steps)
                    continue
                request, status, future = entry
                if future.done():  # given up: being finished as an abandoned operation
                    continue
                try:
                    done = request.Test(status)
                except Exception as exc:
                    _settle(future, translate(exc))
                    continue
                if done:
                    _settle(future, None)
                    idle_since = time.monotonic()
                else:
                    still.append(entry)
            pending = still
            if pending:
                idle = time.monotonic() - idle_since
                if idle > 0.0002:
                    self._wake.wait(min(0.001, idle / 20))


def _forget(steps: Steps[Any]) -> None:
    with _lock:
        for i, (s, _) in enumerate(_abandoned):
            if s is steps:
                del _abandoned[i]
                break


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:  # that loop is closed: nobody waits any more
        pass


_poller: Poller | None = None
_abandoned: list[Any] = []  # timed-out operations whose buffers MPI may still use


def poller() -> Poller:
    global _poller
    with _lock:
        if _poller is None:
            _poller = Poller()
        return _poller


def _finalize(MPI: Any) -> None:
    """At exit: finalize MPI, unless an operation this rank gave up on is
    still incomplete after a grace (MPI_Finalize would wait for it forever):
    then abort the job, so no rank hangs."""
    if MPI.Is_finalized() or os.getpid() != _owner_pid or _failing:
        return  # a forked child, or a failing rank: mpirun ends the job, naming this one
    deadline = time.monotonic() + 2.0
    while _abandoned and time.monotonic() < deadline:  # the progress thread may be finishing them
        time.sleep(0.01)
    if _abandoned:
        MPI.COMM_WORLD.Abort(1)
    MPI.Finalize()


def translate(exc: BaseException) -> BaseException:
    """An mpi4py exception as aiocomm's error (once, here)."""
    if _MPI is None or not isinstance(exc, _MPI.Exception):
        return exc
    try:
        text = exc.Get_error_string()
    except Exception:
        text = str(exc)
    err = CommError(f"MPI error: {text}")
    err.__cause__ = exc
    return err


def _split_step(step: Any) -> tuple[Any, Any]:
    return step if isinstance(step, tuple) else (step, None)


def _timed_out(group: Group, what: str, timeout: float) -> CommTimeoutError:
    return CommTimeoutError(
        f"rank {group.members[group.rank()]} timed out after {timeout:g}s in {what} on the MPI backend; "
        f"the whole operation may take at most timeout={timeout:g}s: pass a larger timeout= or set "
        "AIOCOMM_TIMEOUT (seconds)",
        tuple(m for i, m in enumerate(group.members) if i != group.rank()),
    )


class MpiBackend:
    """Groups over MPI communicators."""

    name = "mpi"
    direct = True  # blocking calls run in the caller's thread

    def __init__(self, MPI: Any, rank: int) -> None:
        self.MPI = MPI
        self.rank = rank

    # ---- running steps

    def _start(self, group: Group, what: str) -> None:
        cause = group.handle.broken
        if cause is not None:
            failure_report.raise_broken(self.rank, cause, _PUBLIC.get(what, what))

    def _failed(self, group: Group, collective: bool, exc: BaseException) -> BaseException:
        """Note a failure (a collective's breaks its group; the launcher hears of it); returns ``exc``."""
        if collective and isinstance(exc, CommError) and group.handle.broken is None:
            group.handle.broken = exc
        if isinstance(exc, CommError):
            failure_report.record(self.rank, exc)
        return exc

    def call_blocking(self, name: str, group: Group, *args: Any) -> Any:
        """Run operation ``name`` in the calling thread."""
        timeout = args[-1]
        what = name
        collective = name not in ("send", "recv")
        self._start(group, what)
        if collective and group.handle.busy:
            raise RuntimeError(
                f"aiocomm.{name}: a collective started with aiocomm.aio on this group has not finished; "
                "await it before calling the blocking face on the same group"
            )
        steps = _STEPS[name](self.MPI, group, *args[:-1])
        deadline = time.monotonic() + timeout
        step: Any = None
        try:
            step = next(steps)
            while True:
                if isinstance(step, Call):
                    try:
                        step.start().result(max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        raise _timed_out(group, what, timeout) from None
                    step = steps.send(None)
                    continue
                request, status = _split_step(step)
                spins = 0
                busy_until = 0.0
                while not request.Test(status):  # MPI progresses inside Test: keep calling it
                    spins += 1
                    if spins & 1023 == 0:
                        now = time.monotonic()
                        if now >= deadline:
                            raise _timed_out(group, what, timeout)
                        if not busy_until:
                            busy_until = now + SPIN_SECONDS
                        elif now > busy_until:  # a long wait (a late peer): stop burning the CPU
                            time.sleep(0.0005)
                step = steps.send(None)
        except StopIteration as stop:
            return stop.value
        except CommTimeoutError as exc:
            self._give_up(steps, step, exc, collective)
            self._failed(group, collective, exc)
            raise
        except BaseException as exc:
            err = self._failed(group, collective, translate(exc))
            if err is exc:
                raise
            raise err from exc

    def _give_up(self, steps: Steps[Any], step: Any, exc: BaseException, collective: bool) -> None:
        """A timed-out operation.  A collective goes on in the background to
        its end (MPI cannot cancel one, and the other ranks' matching calls
        need it), its result thrown away; a receive cancels itself, so the
        message stays for the next receive."""
        if collective and step is not None:
            with _lock:
                _abandoned.append((steps, step))
            poller().finish(steps, step)
            return
        try:
            steps.throw(exc)
        except BaseException:
            pass

    async def _run(self, name: str, group: Group, *args: Any) -> Any:
        timeout = args[-1]
        collective = name not in ("send", "recv")
        state = group.handle
        self._start(group, name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # One operation of an ordered stream at a time, in call order: MPI
        # needs every rank to issue a group's collectives in the same order,
        # and receives from one source take its messages in order.
        stream = "collectives" if collective else ("recv", args[2]) if name == "recv" else None
        turn = mine = None
        if stream is not None:
            turn, mine = state.queues.get(stream), loop.create_future()
            state.queues[stream] = mine
        step: Any = None
        steps: Steps[Any] | None = None
        waiter: asyncio.Future[Any] | None = None
        busy = False
        try:
            if turn is not None and not turn.done():
                await asyncio.wait_for(asyncio.shield(turn), max(0.0, deadline - loop.time()))
                self._start(group, name)  # the one before may have broken the group
            if collective:
                state.busy += 1
                busy = True
            steps = _STEPS[name](self.MPI, group, *args[:-1])
            p = poller()
            step = next(steps)
            while True:
                waiter = asyncio.wrap_future(step.start()) if isinstance(step, Call) else p.wait(*_split_step(step))
                await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - loop.time()))
                step = steps.send(None)
        except StopIteration as stop:
            return stop.value
        except asyncio.TimeoutError:
            exc = _timed_out(group, name, timeout)
            if steps is not None:
                await self._give_up_in_poller(steps, step, waiter, exc, collective)
            self._failed(group, collective, exc)
            raise exc from None
        except asyncio.CancelledError:  # the caller gave up (task.cancel, wait_for): as a timeout, unannounced
            if steps is not None:
                self._give_up_in_poller(steps, step, waiter, CommError("cancelled by the caller"), collective)
            self._failed(group, collective, CommError(f"rank {self.rank}: a {name} on this group was cancelled"))
            raise
        except BaseException as exc:
            err = self._failed(group, collective, translate(exc))
            if err is exc:
                raise
            raise err from exc
        finally:
            if busy:
                state.busy -= 1
            if mine is not None and not mine.done():
                mine.set_result(None)

    def _give_up_in_poller(self, steps: Steps[Any], step: Any, waiter: asyncio.Future[Any] | None,
                           exc: BaseException, collective: bool) -> asyncio.Future[None]:
        """Give an operation up (see :meth:`_give_up`) in the progress thread,
        which may be testing its request right now: MPI forbids using one
        request from two threads at once."""
        if waiter is not None and not isinstance(step, Call):
            waiter.cancel()  # the progress thread stops testing it
        return poller().call(lambda: self._give_up(steps, step, exc, collective))

    # ---- the backend's operations (coroutines, for the async face)

    def all_reduce(self, group: Group, x: np.ndarray, op: str, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("all_reduce", group, x, op, timeout)

    def all_gather(self, group: Group, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("all_gather", group, x, timeout)

    def sum_scatter(self, group: Group, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("sum_scatter", group, x, timeout)

    def send(self, group: Group, x: np.ndarray, dst: int, timeout: float) -> Coroutine[Any, Any, None]:
        return self._run("send", group, x, dst, timeout)

    def recv(
        self, group: Group, shape: tuple[int, ...], dtype: np.dtype, src: int, timeout: float
    ) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("recv", group, shape, dtype, src, timeout)

    def split(self, group: Group, index: int, color: int, key: int, timeout: float) -> Coroutine[Any, Any, SplitResult]:
        return self._run("split", group, index, color, key, timeout)

    async def close(self) -> None:
        return None

    def fds(self) -> list[int]:
        return []


def start_world() -> tuple[MpiBackend, MpiGroup]:
    """The MPI backend and the world group's state."""
    MPI = load()
    if MPI is None:
        raise RuntimeError(f"backend 'mpi' is unavailable: {_why_unavailable}")
    with _lock:
        comm = world(MPI)
    return MpiBackend(MPI, comm.Get_rank()), MpiGroup(comm)
