"""The bridge from blocking code to the engine: a private event loop thread.

The blocking face submits each call as a coroutine to the loop that owns the
connections and waits for its result.  A call from the thread that runs that
loop would wait on itself forever, so it is refused with ``RuntimeError``.

Hand-offs go through eventfds, not locks.  A thread that releases a lock
holds the GIL while doing it, so on a shared core the woken thread runs, finds
the GIL taken and sleeps again: each hand-off cost about four context switches
(measured with ``perf``: the time went to futex waits on the GIL).
``os.eventfd_write`` lets the GIL go before the system call, so the woken
thread can run at once; a round trip between two threads on one core went
from 13 to 6 microseconds.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Waiter:
    """A calling thread's eventfd, closed when nothing refers to it any more
    (its thread has ended and no call of it is still in flight)."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)

    def __del__(self) -> None:
        os.close(self.fd)


class Call:
    """One blocking call in flight: its coroutine, then its outcome.

    :meth:`step` drives the coroutine on the loop thread the way an
    ``asyncio.Task`` does, minus the Task: the first step runs as soon as the
    loop takes the call (as Python 3.12's eager tasks do) instead of one loop
    iteration later, and the waiting thread is woken from the last step
    instead of from a done-callback another iteration later.  Inside,
    ``asyncio.current_task()`` is ``None``: the engine's operations do not
    use it (nor ``wait_for``, which on Python 3.12 needs a task: forming the
    world, which does, runs as a task: ``run(..., task=True)``).
    """

    __slots__ = ("coro", "waiter", "done", "result", "error")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiter: Waiter) -> None:
        self.coro = coro
        self.waiter = waiter  # kept open by this call until it is done
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def step(self, _awaited: Any = None) -> None:
        try:
            awaited = self.coro.send(None)
        except StopIteration as stop:
            self.result = stop.value
        except BaseException as exc:  # handed to the waiting thread, which raises it
            self.error = exc
        else:
            if awaited is None:  # a bare yield (asyncio.sleep(0)): go on next iteration
                asyncio.get_running_loop().call_soon(self.step)
            elif getattr(awaited, "_asyncio_future_blocking", False):  # an asyncio future
                awaited._asyncio_future_blocking = False
                awaited.add_done_callback(self.step)
            else:
                self.coro.close()
                self.error = RuntimeError(f"aiocomm's loop thread cannot wait on {awaited!r}")
                self.done = True
                os.eventfd_write(self.waiter.fd, 1)
            return
        self.done = True
        os.eventfd_write(self.waiter.fd, 1)


class LoopThread:
    """An event loop running forever in a daemon thread, taking calls from other threads."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self._calls: collections.deque[Call] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._waiters = threading.local()  # each calling thread's Waiter
        self.ident = 0  # the loop thread's, once it runs
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name="aiocomm-loop", daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        self.ident = threading.get_ident()
        asyncio.set_event_loop(self.loop)
        self.loop.add_reader(self._wake, self._take_calls)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def _take_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        calls = self._calls
        while calls:
            calls.popleft().step()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this loop; block the calling thread until it is done."""
        waiter = getattr(self._waiters, "waiter", None)
        if waiter is None:
            waiter = self._waiters.waiter = Waiter()
        call = Call(coro, waiter)
        self._calls.append(call)
        os.eventfd_write(self._wake, 1)
        # A wake-up left by an earlier call that this thread stopped waiting
        # for (an interrupt), or by this call before the thread came to wait,
        # may be read first: wait until this call is done.
        while not call.done:
            os.eventfd_read(waiter.fd)
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


_portal: LoopThread | None = None
_portal_lock = threading.Lock()


def portal() -> LoopThread:
    """The process's private loop thread, started on first use."""
    global _portal
    with _portal_lock:
        if _portal is None:
            _portal = LoopThread()
        return _portal


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that finishes without waiting (a world of size 1)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("aiocomm: an operation of a world of size 1 tried to wait")


def owns(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` is the private loop thread's."""
    return _portal is not None and loop is _portal.loop


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], what: str, task: bool = False) -> T:
    """Run ``coro`` on ``loop`` from a thread that is not running it; block for the result.

    ``task``: run it as an ``asyncio.Task`` (needed by code that uses
    ``asyncio.wait_for`` or ``asyncio.timeout``, which want a current task
    from Python 3.12 on); otherwise it is stepped without one (faster).
    """
    thread = _portal
    if (not task and thread is not None and loop is thread.loop and threading.get_ident() != thread.ident
            and loop.is_running()):
        return thread.call(coro)  # the common case: another thread calls the running private loop
    if asyncio._get_running_loop() is loop:
        coro.close()
        raise RuntimeError(
            f"aiocomm.{what}() would deadlock: it was called on the event loop that owns aiocomm's "
            f"connections. In async code use 'await aiocomm.aio.{what}(...)'."
        )
    if loop.is_closed() or not loop.is_running():
        coro.close()
        raise RuntimeError(
            f"aiocomm.{what}(): the event loop that owns aiocomm's connections is not running "
            "(it was formed with aiocomm.aio on a loop that has stopped)"
        )
    # A loop the program runs itself (the world was formed with aiocomm.aio).
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


#: Coroutine functions to run on the private loop before the process exits
#: (the engine registers its clean close here, so peers see an orderly close).
_at_exit: list[Callable[[], Coroutine[Any, Any, Any]]] = []


def close_at_exit(close: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run ``close()`` on the private loop when the process exits."""
    _at_exit.append(close)


@atexit.register
def _close_at_exit() -> None:
    thread = _portal
    if thread is None:
        return
    for close in _at_exit:
        try:
            asyncio.run_coroutine_threadsafe(close(), thread.loop).result(timeout=5)
        except Exception:
            pass
    thread.stop()


def _after_fork_in_child() -> None:
    """A forked child has no loop thread: it starts its own if it needs one,
    and never runs the parent's exit handlers."""
    global _portal, _portal_lock
    _portal = None
    _portal_lock = threading.Lock()
    _at_exit.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
