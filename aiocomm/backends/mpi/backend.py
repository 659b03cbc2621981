"""The MPI backend's two drivers of the same steps, and the world it starts.

* The blocking face calls MPI straight from the caller's thread
  (:meth:`MpiBackend.call_blocking`): no hand-off to a loop thread, so an
  8-byte ``all_sum`` costs little more than MPI's own.
* The async face awaits each step through the :class:`~.progress.Poller`,
  so the event loop stays free during a long operation.

Both bound every wait by the operation's deadline, and both end a wait at
once when a notice (:mod:`.notices`) means it can never complete: a member
left without starting the collective, a sender left without sending the
message, or another member gave up on the group.  An operation given up on
is *abandoned* (see :meth:`MpiBackend._give_up`), never left half-done in
a way a later operation could trip over.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import numpy as np

from ... import failure_report
from ...errors import CommError, CommTimeoutError, PeerLostError
from .. import GroupState, SplitResult
from . import groups, library, notices, progress
from .collectives import (
    REDUCTION_NAMES,
    Carried,
    all_gather_steps,
    all_gather_v_steps,
    all_reduce_steps,
    all_to_all_steps,
    barrier_steps,
    broadcast_steps,
    carried_rest,
    carries,
    gather_steps,
    identity,
    split_steps,
    stand_in,
    sum_scatter_steps,
)
from .p2p import Inbox, recv_steps, send_steps
from .progress import Call, GiveUp, Steps, split_step

#: Seconds a blocking call keeps testing its request without sleeping.
SPIN_SECONDS = 0.05

_PUBLIC = {"all_reduce": "a collective"}  # engine operation names as the user called them
_P2P = frozenset(("send", "recv"))

_STEPS: dict[str, Callable[..., Steps[Any]]] = {
    "all_reduce": all_reduce_steps,
    "all_gather": all_gather_steps,
    "sum_scatter": sum_scatter_steps,
    "split": split_steps,
    "broadcast": broadcast_steps,
    "gather": gather_steps,
    "all_to_all": all_to_all_steps,
    "all_gather_v": all_gather_v_steps,
    "barrier": barrier_steps,
    "send": send_steps,
    "recv": recv_steps,
}

Doomed = Callable[[], "CommError | None"]


def _timed_out(group: GroupState, what: str, timeout: float) -> CommTimeoutError:
    return CommTimeoutError(
        f"rank {group.members[group.rank()]} timed out after {timeout:g}s in {what} on the MPI backend; "
        f"the whole operation may take at most timeout={timeout:g}s: pass a larger timeout= or set "
        "AIOCOMM_TIMEOUT (seconds)",
        tuple(m for i, m in enumerate(group.members) if i != group.rank()),
    )


def _stream(name: str, args: tuple[Any, ...]) -> Any:
    """The ordered stream of calls an operation belongs to."""
    if name == "send":
        return ("send", args[1])
    if name == "recv":
        return ("recv", args[2])
    return "collectives"


def _end_turn(mine: asyncio.Future[None], after: list[asyncio.Future[Any] | None]) -> None:
    """End ``mine`` once every future in ``after`` is done."""
    waits = [f for f in after if f is not None and not f.done()]
    if not waits:
        if not mine.done():
            mine.set_result(None)
        return

    def one_done(_: Any) -> None:
        if all(f.done() for f in waits) and not mine.done():
            mine.set_result(None)

    for f in waits:
        f.add_done_callback(one_done)


def inbox(state: groups.MpiGroup, src: int) -> Inbox:
    box = state.inboxes.get(src)
    if box is None:
        box = state.inboxes[src] = Inbox()
    return box


class MpiBackend:
    """Groups over MPI communicators."""

    name = "mpi"
    direct = True  # blocking calls run in the caller's thread

    def __init__(self, MPI: Any, rank: int, heard: notices.Notices) -> None:
        self.MPI = MPI
        self.rank = rank
        self.notices = heard

    # ---- starting, failing and giving up

    def _refuse(self, group: GroupState, what: str) -> None:
        """Raise if ``group`` was broken earlier."""
        cause = group.handle.broken
        if cause is not None:
            failure_report.raise_broken(self.rank, cause, _PUBLIC.get(what, what))

    def _begin(self, group: GroupState, name: str, args: tuple[Any, ...]) -> tuple[Doomed, list[int]]:
        """Admit an operation: its check for a reason it can never complete
        (which must not hold already), and (for a collective) its number
        among the group's collectives, known once it is issued."""
        self.notices.poll(every=0.001)  # cheap, but not free: a fast operation needs no fresh news
        state: groups.MpiGroup = group.handle
        if state.broken is not None:
            self._refuse(group, name)
        heard = self.notices
        index = [state.entered + 1]  # the earliest it can be, until it is issued
        doomed: Doomed
        if name == "send":
            dst = args[1]
            doomed = lambda: state.broken or heard.lost_receiver(state, dst)  # noqa: E731
        elif name == "recv":
            src = args[2]
            box = inbox(state, src)
            doomed = lambda: state.broken or (heard.lost_sender(state, src, box.pulled) if box.waiting else None)  # noqa: E731
        else:
            doomed = lambda: state.broken or heard.lost_collective(state, index[0])  # noqa: E731
        error = doomed()
        if error is not None:
            raise self._failed(group, name, error)
        return doomed, index

    def _issue(self, group: GroupState, name: str, index: list[int]) -> None:
        """Count a collective that is about to be issued (in call order), or
        refuse it if its group broke meanwhile (a stand-in takes its place)."""
        state: groups.MpiGroup = group.handle
        with state.lock:
            if state.broken is not None:
                self._refuse(group, name)
            index[0] = state.entered = entered = state.entered + 1
            if state.known < entered:
                state.known = entered
            state.current = name

    def _failed(self, group: GroupState, name: str, exc: BaseException, here: bool = False) -> BaseException:
        """Note a failure (``here``: this rank gave up on it) for the launcher;
        a collective's breaks its group (see :meth:`_broke`).  Returns ``exc``."""
        if isinstance(exc, CommError):
            if name not in ("send", "recv"):
                self._broke(group, name, exc, here)
            failure_report.record(self.rank, exc)
        return exc

    def _raise_failed(self, group: GroupState, name: str, exc: BaseException) -> NoReturn:
        """Raise ``exc`` (an MPI error as aiocomm's, chained), noted by :meth:`_failed`."""
        err = self._failed(group, name, library.translate(exc))
        if err is exc:
            raise exc
        raise err from exc

    def _broke(self, group: GroupState, name: str, exc: CommError, here: bool) -> None:
        """A collective failed here: its group is broken.  The other members
        hear of it when this rank gave up on it, or issued collectives they
        have not been told of (their stand-ins must cover them); this rank
        stands in for those the others issued."""
        state: groups.MpiGroup = group.handle
        with state.lock:
            if state.broken is None:
                state.broken = exc
            # (a rank that left is heard of by everyone from its own notice;
            # nothing it was needed for can end, so nobody need stand in)
            tell = (here or state.entered > state.told) and not isinstance(exc, PeerLostError)
            if tell:
                state.told = max(state.told, state.entered)
            issued = state.entered
        if tell:
            self.notices.broken(state, _PUBLIC.get(name, name), str(exc), issued)
        stand_in(self.MPI, state)

    def _give_up(self, group: GroupState, name: str, steps: Steps[Any], step: Any, exc: CommError) -> None:
        """An operation given up on.  A collective goes on in the background
        to its end (MPI cannot cancel one, and the other ranks' matching
        calls need it; it reads only its own buffers), its result thrown
        away; one that waits for a rank that has left can never end, and is
        only kept from being freed.  A receive cancels itself, keeping what
        it took; a send withdraws itself (see :mod:`.p2p`)."""
        if name in ("send", "recv"):
            try:
                steps.throw(exc)
            except BaseException:
                pass
            return
        state: groups.MpiGroup = group.handle
        if isinstance(exc, PeerLostError):
            progress.orphan(steps, step)
        else:
            progress.abandon(steps, step, then=lambda: setattr(state, "current", None))

    # ---- the blocking driver

    def call_blocking(self, name: str, group: GroupState, *args: Any) -> Any:
        """Run operation ``name`` in the calling thread."""
        timeout = args[-1]
        collective = name not in _P2P
        state: groups.MpiGroup = group.handle
        if state.queues:  # (the async face has been used on this group)
            pending = state.queues.get(_stream(name, args))
            if pending is not None and not pending.done():
                raise RuntimeError(
                    f"aiocomm.{name}: an operation started with aiocomm.aio on the same stream of this group (its "
                    "collectives, or its messages with that rank) has not finished; await it before calling the "
                    "blocking face there"
                )
        if name == "all_reduce" and carries(group, args[0]):
            return self._carried(group, state, *args)
        doomed, index = self._begin(group, name, args)
        if collective:
            self._issue(group, name, index)
        started = [False]
        try:
            steps = _STEPS[name](self.MPI, group, *args[:-1])
            return self._drive(name, group, steps, None, doomed, time.monotonic() + timeout, timeout, started)
        except BaseException as exc:
            if not started[0]:
                if collective:
                    self._not_issued(group, name, exc)
                self._raise_failed(group, name, exc)
            raise  # (_drive dealt with it)

    def _carried(self, group: GroupState, state: groups.MpiGroup, x: np.ndarray, op: str, timeout: float) -> Any:
        """An all-reduce small enough to ride in its agreement (see
        collectives.carries), the commonest small call: its steps made by
        hand while its one MPI request completes at once, the step driver
        (:meth:`_drive`) from that request on if it does not, or if the
        ranks disagree.  Checks, counts and notices as :meth:`_begin` and
        :meth:`_issue` make them."""
        heard = self.notices
        now = time.monotonic()
        if now - heard.polled >= 0.001:  # (what poll(every=0.001) checks, without a call)
            heard.poll()
        if heard.gone:  # (a member left: the general path's checks name it)
            doomed, index = self._begin(group, "all_reduce", (x, op, timeout))
        else:
            doomed, index = None, [0]
        self._issue(group, "all_reduce", index)
        request: Any = None
        steps: Steps[Any] | None = None
        step: Any = None
        started = [False]
        key = (op, x.dtype, x.shape)
        carried = state.carried.pop(key, None)  # (back in only once its call ended normally)
        try:  # (from here on a Ctrl-C must leave the counts and the group as the general path would)
            deadline = now + timeout
            if carried is None:
                carried = Carried(identity(REDUCTION_NAMES[op], x.dtype, x.shape), x, op, len(group.members))
            request = carried.start(state.comm, x)
            done = request.Test()
            spins = 1023  # (as many tests as _wait makes before its first look at the deadline and notices)
            while not done and spins:
                spins -= 1
                done = request.Test()
            reduced = carried.result() if done else None  # (None: not done at once, or the ranks disagree)
            if reduced is not None:
                state.current = None
            else:
                if doomed is None:
                    doomed = lambda: state.broken or heard.lost_collective(state, index[0])  # noqa: E731
                steps = carried_rest(self.MPI, state.comm, carried, group.rank(), request)
                step = next(steps)
                reduced = self._drive("all_reduce", group, steps, step, doomed, deadline, timeout, started)
            if len(state.carried) >= 64:  # (a program that reduces many shapes keeps the last few)
                state.carried.clear()
            state.carried[key] = carried
            return reduced
        except BaseException as exc:
            if started[0]:  # (_drive dealt with it)
                raise
            if state.current is None:  # (the reduction itself raised: nothing is left with MPI)
                pass
            elif request is not None:  # issued: the background ends it, and the group breaks
                cause = self._interrupted(group, "all_reduce", exc)
                if steps is None or inspect.getgeneratorstate(steps) != inspect.GEN_SUSPENDED:
                    assert carried is not None
                    steps = carried_rest(self.MPI, state.comm, carried, group.rank(), request)
                    step = next(steps)
                self._give_up(group, "all_reduce", steps, step, cause)
            else:
                self._not_issued(group, "all_reduce", exc)
                if not isinstance(exc, Exception) and carried is not None:
                    progress.keep(carried.record, carried.table)  # (it may have come as Iallgather returned)
            self._raise_failed(group, "all_reduce", exc)

    def _drive(self, name: str, group: GroupState, steps: Steps[Any], step: Any, doomed: Doomed, deadline: float,
               timeout: float, started: list[bool]) -> Any:
        """Drive ``steps`` (an operation admitted and counted already; from
        ``step``, taken already, or from its first) to their end in this
        thread.  ``started[0]`` is set on entry, before anything that can
        raise: from then on this method deals with what goes wrong (a Ctrl-C
        at the call itself, before it, is the caller's to deal with)."""
        collective = name not in _P2P  # (nothing before the try may call a function: see above)
        state: groups.MpiGroup = group.handle
        handed = False  # a collective given up on ends in the background
        try:
            started[0] = True
            if step is None:
                step = next(steps)
            while True:
                # (the common case first: a request without a status, done at its first test)
                if type(step) is Call or type(step) is tuple or not step.Test():
                    self._wait(step, deadline, doomed, group, name, timeout)
                step = steps.send(None)
        except StopIteration as stop:
            return stop.value
        except GiveUp as stop:
            # (broken first: what goes on in the background must see it, see collectives._Verdict)
            failure = self._failed(group, name, stop.error, isinstance(stop.error, CommTimeoutError))
            self._give_up(group, name, steps, step, stop.error)
            handed = True
            raise failure from None
        except BaseException as exc:  # (stopped while MPI may still use its buffers: the background has it)
            if step is not None and inspect.getgeneratorstate(steps) == inspect.GEN_SUSPENDED:
                cause = self._interrupted(group, name, exc)
                self._give_up(group, name, steps, step, cause)
                handed = True
            elif collective and not isinstance(exc, Exception):  # a Ctrl-C inside the steps: tell the others
                self._interrupted(group, name, exc)
            self._raise_failed(group, name, exc)
        finally:
            if collective and not handed:
                state.current = None

    def _not_issued(self, group: GroupState, name: str, exc: BaseException) -> None:
        """A collective counted (see :meth:`_issue`) but stopped by ``exc``
        before it issued anything: as a Ctrl-C inside its steps (see
        :meth:`_drive`), it breaks its group and tells the others."""
        group.handle.current = None
        if not isinstance(exc, Exception):
            self._interrupted(group, name, exc)

    def _interrupted(self, group: GroupState, name: str, exc: BaseException) -> CommError:
        """An operation stopped by ``exc`` while it waited for MPI (a Ctrl-C,
        an MPI error): it goes to the background like one given up on, and
        (a collective) breaks its group, first (see collectives._Verdict)."""
        what = _PUBLIC.get(name, f"a {name}")
        cause = CommError(f"rank {self.rank}: {what} was stopped by {type(exc).__name__} ({exc}) while "
                          "it waited, which breaks its group on every rank")
        self._failed(group, name, cause, True)
        return cause

    def _wait(self, step: Any, deadline: float, doomed: Doomed, group: GroupState, name: str, timeout: float) -> None:
        """Until ``step`` completes, testing it (MPI progresses inside Test);
        ``GiveUp`` at the deadline or when a notice dooms the operation."""
        heard = self.notices
        state: groups.MpiGroup = group.handle
        seen = -1  # a notice may have come before this step began: check once at the first pause

        def pause() -> None:  # GiveUp at the deadline, or once the notices doom the operation
            nonlocal seen
            if time.monotonic() >= deadline:
                raise GiveUp(_timed_out(group, name, timeout))
            heard.poll()
            if heard.heard != seen or state.broken is not None:  # (broken here: another thread's overlap)
                seen = heard.heard
                error = doomed()
                if error is not None:
                    raise GiveUp(error)

        if type(step) is Call:
            job = step.start()
            while not job.wait(max(0.0, min(0.01, deadline - time.monotonic()))):
                pause()
            job.result()
            return
        request, status = split_step(step)
        spins = 0
        busy_until = 0.0
        while not request.Test(status):
            spins += 1
            if spins & 1023 == 0:
                pause()
                now = time.monotonic()
                if not busy_until:
                    busy_until = now + SPIN_SECONDS
                elif now > busy_until:  # a long wait (a late peer): stop burning the CPU
                    time.sleep(0.0005)

    # ---- the async driver

    async def _run(self, name: str, group: GroupState, *args: Any) -> Any:
        timeout = args[-1]
        collective = name not in ("send", "recv")
        state: groups.MpiGroup = group.handle
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        doomed, index = self._begin(group, name, args)
        # One operation of an ordered stream at a time, in call order: MPI
        # needs every rank to issue a group's collectives in the same order,
        # and messages to or from one rank go in order.  An operation's turn
        # ends (``mine``) only once the one before it ended and, if it gave
        # up, once what it left to the progress thread has run.
        stream = _stream(name, args)
        turn, mine = state.queues.get(stream), loop.create_future()
        state.queues[stream] = mine
        step: Any = None
        steps: Steps[Any] | None = None
        waiter: asyncio.Future[Any] | None = None
        issued = handed = False
        after: list[asyncio.Future[Any] | None] = [turn]
        try:
            if turn is not None and not turn.done():
                await asyncio.wait_for(asyncio.shield(turn), max(0.0, deadline - loop.time()))
            if collective:
                self._issue(group, name, index)  # refused if the one before broke the group
                issued = True
            else:
                self._refuse(group, name)
            error = doomed()
            if error is not None:
                raise error
            steps = _STEPS[name](self.MPI, group, *args[:-1])
            p = progress.poller()
            step = next(steps)
            while True:
                waiter = p.wait(step, doomed)
                await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - loop.time()))
                if isinstance(step, Call):
                    step.start().result()  # its error, if the call failed
                step = steps.send(None)
        except StopIteration as stop:
            return stop.value
        except (asyncio.TimeoutError, GiveUp) as stop:
            exc = stop.error if isinstance(stop, GiveUp) else _timed_out(group, name, timeout)
            failure = self._failed(group, name, exc, isinstance(exc, CommTimeoutError))  # (first, as above)
            if steps is not None:
                handed = True
                await self._give_up_in_poller(group, name, steps, step, waiter, exc)
            raise failure from None
        except asyncio.CancelledError:  # the caller gave up (task.cancel, wait_for): as a timeout, unannounced
            exc = CommError(f"rank {self.rank}: a {name} on this group was cancelled")
            self._failed(group, name, exc, True)
            if steps is not None:
                handed = True
                after.append(self._give_up_in_poller(group, name, steps, step, waiter, exc))
            raise
        except BaseException as exc:
            if steps is not None and step is not None and inspect.getgeneratorstate(steps) == inspect.GEN_SUSPENDED:
                cause = self._interrupted(group, name, exc)
                handed = True
                after.append(self._give_up_in_poller(group, name, steps, step, waiter, cause))
            self._raise_failed(group, name, exc)
        finally:
            if issued and not handed:
                state.current = None
            _end_turn(mine, after)

    def _give_up_in_poller(self, group: GroupState, name: str, steps: Steps[Any], step: Any,
                           waiter: asyncio.Future[Any] | None, exc: CommError) -> asyncio.Future[None]:
        """Give an operation up (see :meth:`_give_up`) in the progress thread,
        which may be testing its request right now: MPI forbids using one
        request from two threads at once."""
        if waiter is not None:
            waiter.cancel()  # the progress thread stops testing it
        return progress.poller().call(lambda: self._give_up(group, name, steps, step, exc))

    # ---- the backend's operations (coroutines, for the async face)

    def all_reduce(self, group: GroupState, x: np.ndarray, op: str, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("all_reduce", group, x, op, timeout)

    def all_gather(self, group: GroupState, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("all_gather", group, x, timeout)

    def sum_scatter(self, group: GroupState, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("sum_scatter", group, x, timeout)

    def send(self, group: GroupState, x: np.ndarray, dst: int, timeout: float) -> Coroutine[Any, Any, None]:
        return self._run("send", group, x, dst, timeout)

    def recv(
        self, group: GroupState, shape: tuple[int, ...], dtype: np.dtype, src: int, timeout: float
    ) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("recv", group, shape, dtype, src, timeout)

    def split(
        self, group: GroupState, index: int, color: int, key: int, timeout: float
    ) -> Coroutine[Any, Any, SplitResult]:
        return self._run("split", group, index, color, key, timeout)

    def broadcast(self, group: GroupState, x: np.ndarray, root: int, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("broadcast", group, x, root, timeout)

    def gather(
        self, group: GroupState, x: np.ndarray, root: int, timeout: float
    ) -> Coroutine[Any, Any, np.ndarray | None]:
        return self._run("gather", group, x, root, timeout)

    def all_to_all(self, group: GroupState, x: np.ndarray, timeout: float) -> Coroutine[Any, Any, np.ndarray]:
        return self._run("all_to_all", group, x, timeout)

    def all_gather_v(
        self, group: GroupState, x: np.ndarray, timeout: float
    ) -> Coroutine[Any, Any, tuple[np.ndarray, list[int]]]:
        return self._run("all_gather_v", group, x, timeout)

    def barrier(self, group: GroupState, timeout: float) -> Coroutine[Any, Any, None]:
        return self._run("barrier", group, timeout)

    def in_caller(self, group: GroupState, name: str) -> None:
        return None  # (every blocking call runs in the caller's thread: call_blocking)

    def abort(self, group: GroupState, exc: CommError) -> None:
        """Break ``group`` here (a call in flight on it gives up at its next
        pause) and tell the other members."""
        if group.handle.broken is None:
            self._broke(group, "collectives", exc, here=True)
            failure_report.record(self.rank, exc)

    def _ulfm_comm(self, group: GroupState, what: str) -> Any:
        why = library.ulfm_missing()
        if why is not None:
            raise CommError(
                f"rank {self.rank}: {what} on the MPI backend needs the MPI library's fault-tolerance extension "
                f"(ULFM), and this one has none: {why}. Use the ring backend (aiocomm-launch without "
                "--backend mpi), or an MPI built with ULFM (Open MPI 5 configured --with-ft=ulfm)")
        return group.handle.comm

    async def agree(self, group: GroupState, index: int, flag: bool, failed: tuple[int, ...],
                    timeout: float) -> tuple[bool, tuple[int, ...]]:
        """ULFM's agreement (``MPIX_Comm_agree``), and the failed members it acknowledged."""
        comm = self._ulfm_comm(group, "agree")
        value = comm.Agree(1 if flag else 0)
        comm.Ack_failed()
        gone = comm.Get_failed()
        ranks = self.MPI.Group.Translate_ranks(gone, list(range(gone.Get_size())), comm.Get_group())
        return bool(value), tuple(sorted(set(failed) | {int(r) for r in ranks}))

    def shrink(self, group: GroupState, index: int, failed: tuple[int, ...], timeout: float) -> SplitResult:
        """ULFM's shrink (``MPIX_Comm_shrink``) of the group's communicator."""
        from ..ring import shrink_context

        comm = self._ulfm_comm(group, "shrink")
        new = comm.Shrink()
        new.Set_errhandler(self.MPI.ERRORS_RETURN)
        size = new.Get_size()
        parent_ranks = self.MPI.Group.Translate_ranks(new.Get_group(), list(range(size)), comm.Get_group())
        members = tuple(group.members[int(r)] for r in parent_ranks)
        context = shrink_context(group.context, index, failed)
        return SplitResult(members, new.Get_rank(), context, groups.MpiGroup(new, context, members))

    async def close(self) -> None:
        return None

    def fds(self) -> list[int]:
        return []


def start_world(context: int) -> tuple[MpiBackend, groups.MpiGroup]:
    """The MPI backend and the world group's state (its context id ``context``)."""
    MPI = library.load()
    if MPI is None:
        raise RuntimeError(f"backend 'mpi' is unavailable: {library.why_unavailable()}")
    with library.lock:
        comm = library.duplicate_world(MPI)
        channel = notices.start(MPI, library.duplicate_world(MPI))
    library.before_finalize(notices.leave)  # first: the others stop waiting for this rank at once
    library.before_finalize(progress.drained)
    progress.watch_with(lambda: (channel.poll(), channel.heard)[1])
    size = comm.Get_size()
    return MpiBackend(MPI, comm.Get_rank(), channel), groups.MpiGroup(comm, context, tuple(range(size)))
