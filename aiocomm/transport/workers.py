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
import threading
from collections.abc import Callable

#: Seconds a worker waits for its next job before its thread ends (a later job starts another).
IDLE_SECONDS = 1.0


class Worker:
    """Runs the jobs handed to :meth:`submit` in a daemon thread named
    ``name``, in order.  :attr:`running` counts the jobs handed over whose
    ``job()`` has not yet returned or raised."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.running = 0
        self._jobs: collections.deque[tuple[Callable[[], None], Callable[[BaseException | None], None]]] = \
            collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None], then: Callable[[BaseException | None], None]) -> None:
        """Run ``job()``, then ``then(what it raised, or None)`` (once
        :attr:`running` no longer counts it), from the thread."""
        with self._ready:
            self._jobs.append((job, then))
            self.running += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            else:
                self._ready.notify()

    def _serve(self) -> None:
        while True:
            with self._ready:
                if not self._jobs:
                    self._ready.wait(IDLE_SECONDS)
                if not self._jobs:
                    self._thread = None  # (under the lock: a job handed over from now on starts a thread)
                    return
                job, then = self._jobs.popleft()
            error: BaseException | None = None
            try:
                job()
            except BaseException as exc:
                error = exc
            with self._ready:
                self.running -= 1
            then(error)
