"""Steps, and the thread that completes them for coroutines.

An operation is a generator of *steps*: it issues nonblocking MPI requests
and yields each one it must see complete (a request, or a request and the
status to fill), or a :class:`Call` -- a blocking MPI call to run in the
group's worker thread.  Its return value is the operation's result.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from ...errors import CommError
from . import library

T = TypeVar("T")
Steps = Generator[Any, None, T]


class GiveUp(Exception):
    """Raised by a driver's wait: the operation must be given up, with ``error``."""

    def __init__(self, error: CommError) -> None:
        super().__init__(error)
        self.error = error


class Job:
    """A blocking call handed to a :class:`Worker`: done once it has run
    (its error, if it raised, kept for :meth:`result`)."""

    __slots__ = ("fn", "error", "_ran", "_lock", "_callbacks")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.error: BaseException | None = None
        self._ran = threading.Lock()  # held until it has run
        self._ran.acquire()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Job], Any]] | None = []  # None once it has run

    def done(self) -> bool:
        return self._callbacks is None

    def wait(self, timeout: float) -> bool:
        """Whether it has run, waiting up to ``timeout`` seconds for it."""
        if self._ran.acquire(timeout=timeout):
            self._ran.release()
            return True
        return False

    def result(self) -> None:
        """Raise its error, if it raised one (once it has run)."""
        if self.error is not None:
            raise self.error

    def add_done_callback(self, fn: Callable[[Job], Any]) -> None:
        """Call ``fn(job)`` once it has run (at once if it has)."""
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return
        fn(self)

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:
            self.error = exc
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
        self._ran.release()
        for fn in callbacks or ():
            fn(self)


class Worker:
    """A thread that runs blocking MPI calls, one at a time in the order
    they were handed to it.  (Leaner than a one-thread executor: handing a
    call over and waiting for it are a lock released and one acquired, which
    shows at a megabyte, where the whole collective takes ~250 us.)  A
    daemon: the interpreter's exit does not join a call that waits inside
    MPI for a rank that never comes; the exit hooks decide, as for every
    operation given up on, whether MPI is finalized or the job aborted
    (see :func:`drained`)."""

    def __init__(self, name: str) -> None:
        self._jobs: collections.deque[Job] = collections.deque()
        self._ready = threading.Lock()  # released while jobs wait
        self._ready.acquire()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Job:
        job = Job(fn)
        self._jobs.append(job)
        try:
            self._ready.release()
        except RuntimeError:  # released already: the thread has yet to take the jobs before this one
            pass
        return job

    def _serve(self) -> None:
        while True:
            self._ready.acquire()
            while self._jobs:
                self._jobs.popleft().run()


class Call:
    """A step that is a blocking MPI call, run in a worker thread (so its
    wait can still be bounded by the operation's deadline)."""

    __slots__ = ("fn", "worker", "job")

    def __init__(self, fn: Callable[[], Any], worker: Worker) -> None:
        self.fn = fn
        self.worker = worker
        self.job: Job | None = None

    def start(self) -> Job:
        if self.job is None:
            self.job = self.worker.submit(self.fn)
        return self.job


class Until:
    """A step that is done once ``ready()`` is true (tested like a request)."""

    __slots__ = ("ready",)

    def __init__(self, ready: Callable[[], bool]) -> None:
        self.ready = ready


def split_step(step: Any) -> tuple[Any, Any]:
    return step if isinstance(step, tuple) else (step, None)


def done(step: Any) -> bool:
    """Whether a step has completed (testing a request progresses MPI)."""
    if isinstance(step, Call):
        return step.start().done()
    if isinstance(step, Until):
        return step.ready()
    request, status = split_step(step)
    return bool(request.Test(status))


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

    ``watch`` is called each round while anything is pending (it polls the
    notices and returns how many were heard); whenever that count grows, and
    when a request is first handed over, every awaited request whose
    ``doomed()`` gives an error fails with it (as :class:`GiveUp`).
    """

    def __init__(self, watch: Callable[[], int]) -> None:
        self._watch = watch
        self._new: list[tuple[Any, Any, Any, Any]] = []
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[[], Any], asyncio.Future[None]]] = []
        self._running = False  # running calls taken from _calls
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aiocomm-mpi-progress", daemon=True)
        self._thread.start()

    def wait(self, step: Any, doomed: Callable[[], BaseException | None]) -> asyncio.Future[None]:
        """A future of ``step``'s completion, failed early with ``doomed()``'s
        error once that gives one."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if isinstance(step, Call):
            step.start().add_done_callback(lambda _: self._wake.set())
        with self._lock:
            self._new.append((step, future, doomed, None))
        self._wake.set()
        return future

    def busy(self) -> bool:
        """Whether calls handed to the thread are still to run."""
        with self._lock:
            return bool(self._calls) or self._running

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
            self._new.append((step, None, None, steps))
        self._wake.set()

    def _run(self) -> None:
        # entries: (step, future, doomed, None) awaited by a coroutine, or
        # (step, None, None, steps) of an abandoned operation driven to its end
        pending: list[tuple[Any, Any, Any, Any]] = []
        idle_since = time.monotonic()
        heard = 0
        while not library.finalizing:
            if not pending:
                self._wake.wait()
            self._wake.clear()
            with self._lock:
                new, self._new = self._new, []
                calls, self._calls = self._calls, []
                self._running = bool(calls)
            if new:
                idle_since = time.monotonic()
                for entry in new:
                    error = entry[2]() if entry[2] is not None else None
                    if error is not None:
                        _settle(entry[1], GiveUp(error))
                    else:
                        pending.append(entry)
            for fn, finished in calls:
                try:
                    fn()
                except BaseException:
                    pass
                _settle(finished, None)
            self._running = False
            count = self._watch() if pending else heard
            news, heard = count != heard, count
            still = []
            for entry in pending:
                step, future, doomed, steps = entry
                if future is None:  # an abandoned operation
                    try:
                        if not done(step):
                            still.append(entry)
                            continue
                        still.append((steps.send(None), None, None, steps))
                    except BaseException:  # StopIteration (its end) or an error: nobody to tell
                        _forget(steps)
                    continue
                if future.done():  # given up: being finished as an abandoned operation
                    continue
                try:
                    complete = done(step)
                except Exception as exc:
                    _settle(future, library.translate(exc))
                    continue
                if complete:
                    _settle(future, None)
                    idle_since = time.monotonic()
                    continue
                error = doomed() if news else None
                if error is not None:
                    _settle(future, GiveUp(error))
                    continue
                still.append(entry)
            pending = still
            if pending:
                now = time.monotonic()
                idle = now - idle_since
                if idle > 0.0002 and now > _hurry_until:
                    self._wake.wait(min(0.001, idle / 20))


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
_watch: Callable[[], int] = lambda: 0  # noqa: E731
#: operations given up on whose requests MPI may still use (their buffers are kept alive here)
_abandoned: list[tuple[Steps[Any], Any, bool]] = []
_orphans: list[tuple[Steps[Any], Any]] = []
_kept: list[tuple[Any, ...]] = []
#: Until when the progress thread tests without pausing (see :func:`hurry`).
_hurry_until = 0.0
#: Seconds :func:`hurry` keeps the progress thread testing.
HURRY_SECONDS = 0.05


def poller() -> Poller:
    global _poller
    with library.lock:
        if _poller is None:
            _poller = Poller(_watch)
        return _poller


def watch_with(fn: Callable[[], int]) -> None:
    """What the progress thread polls while requests are pending (the notices)."""
    global _watch
    _watch = fn


def abandon(steps: Steps[Any], step: Any, then: Callable[[], None] | None = None, needed: bool = True) -> None:
    """Drive ``steps`` on from ``step`` to its end in the progress thread,
    its result thrown away; then call ``then()``.  ``needed``: other ranks
    wait for it (the exit aborts the job if it cannot finish), rather than
    a message nobody may ever receive."""
    if then is not None:
        steps = _finishing(steps, step, then)
        step = next(steps)
    with library.lock:
        _abandoned.append((steps, step, needed))
    poller().finish(steps, step)


def _finishing(steps: Steps[Any], step: Any, then: Callable[[], None]) -> Steps[None]:
    try:
        while True:
            yield step
            step = steps.send(None)
    except StopIteration:
        pass
    finally:
        then()


def hurry() -> None:
    """An operation moves a large message now: the progress thread keeps
    testing without its pauses for the next :data:`HURRY_SECONDS` (MPI moves
    a large message only while someone tests, piece by piece: a pause
    between tests is a pause in the transfer).  An operation that stops
    asking (a late peer) lets it pause again soon after."""
    global _hurry_until
    _hurry_until = time.monotonic() + HURRY_SECONDS


def keep(*buffers: Any) -> None:
    """Keep ``buffers`` for good: MPI may write into them, through a request
    nobody can see any more (a Ctrl-C came as it was made)."""
    _kept.append(buffers)


def orphan(steps: Steps[Any], step: Any) -> None:
    """Keep the buffers of an operation that can never complete (a rank it
    needs has left) from being freed under MPI, and let it be."""
    _orphans.append((steps, step))


def abandon_request(request: Any, *keep: Any) -> None:
    """Let ``request`` complete in the background, keeping ``keep`` (its
    buffers) alive until it has."""

    def steps(held: tuple[Any, ...]) -> Steps[None]:  # its frame holds the buffers until the request is done
        yield request

    gen = steps(keep)
    abandon(gen, next(gen), needed=False)


def _forget(steps: Steps[Any]) -> None:
    with library.lock:
        for i, (s, _, _) in enumerate(_abandoned):
            if s is steps:
                del _abandoned[i]
                break


def drained(MPI: Any) -> bool:
    """At exit: give the progress thread up to 2 s to finish what was given
    up on; False (abort rather than finalize) if something other ranks wait
    for is still pending.  (A message no rank received is let go.)"""
    deadline = time.monotonic() + 2.0
    while (_abandoned or (_poller is not None and _poller.busy())) and time.monotonic() < deadline:
        time.sleep(0.01)
    with library.lock:
        return not any(needed for _, _, needed in _abandoned)
