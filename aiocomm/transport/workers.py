"""A thread that outlives its jobs: it runs them one at a time, in order,
and ends after it has had none for a while.

The async face finishes a message in parts from a thread, so that the loop
never waits for room in a ring (see ``Mesh.send_parts_soon``).  Starting a
thread for each message cost about 150 us here, more than copying half a
MiB; handing a job to a thread that waits for one costs one wake-up.  Each
peer gets its own :class:`Worker` (a job waits for that peer's room only,
never behind another peer's).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("aiocomm")

#: Seconds a worker waits for its next job before its thread ends (a later job starts another).
IDLE_SECONDS = 1.0


class Job:
    """``run()``, then ``then(what it raised, or None)``, in a worker's thread."""

    __slots__ = ("run", "then", "taken")

    def __init__(self, run: Callable[[], None], then: Callable[[BaseException | None], None]) -> None:
        self.run = run
        self.then = then
        self.taken = False  # by the thread (under its worker's lock): it will run


class Worker:
    """Runs the jobs handed to :meth:`submit` in a daemon thread named
    ``name``, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: collections.deque[Job] = collections.deque()
        self._busy = False  # the thread runs a job's ``run()``
        self._ready = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> int:
        """The jobs handed over whose ``run()`` has not yet returned or raised."""
        with self._ready:
            return len(self._jobs) + self._busy

    def submit(self, job: Job) -> None:
        """Hand ``job`` over (if this raises, it was not: see :meth:`withdraw`)."""
        with self._ready:
            if self._thread is None:
                thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                thread.start()  # (first: a thread that could not start leaves nothing behind)
                self._thread = thread
            self._jobs.append(job)
            self._ready.notify()

    def withdraw(self, job: Job) -> bool:
        """Make sure ``job`` never runs, if its thread has not taken it yet
        (or it was never handed over); whether it will not run."""
        with self._ready:
            if job.taken:
                return False
            if job in self._jobs:
                self._jobs.remove(job)
            return True

    def _serve(self) -> None:
        while True:
            with self._ready:
                if not self._jobs:
                    self._ready.wait(IDLE_SECONDS)
                if not self._jobs:
                    if self._thread is threading.current_thread():  # (else another serves: see submit)
                        self._thread = None  # (under the lock: a job handed over from now on starts a thread)
                    return
                job = self._jobs.popleft()
                job.taken = True
                self._busy = True
            error: BaseException | None = None
            try:
                job.run()
            except BaseException as exc:
                error = exc
            with self._ready:
                self._busy = False
            try:
                job.then(error)
            except BaseException as exc:  # (a thread that died here would leave its worker jammed)
                log.debug("%s: a job's callback raised %r", self.name, exc)
            del job, error  # (an idle thread must not keep the last job's buffers alive)
