"""Threads under MPI's serialized rule, on both backends, with real processes:
any thread may call on a group, one call at a time; calls of two threads
that overlap on one group raise on every rank and never pair up wrongly
(tests/workers/threads_serialized.py stages each pattern)."""

from __future__ import annotations

import pytest

from .conftest import assert_ok, launch
from .test_mpi import MPI_SKIP, mpirun, ok

MODES = ["after_main", "executor", "pool1", "handlers", "dead", "overlap"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_threads_take_turns_on_the_ring(mode):
    proc = launch(2, "threads_serialized.py", mode, timeout=110)
    assert_ok(proc, 2, f"OK threads {mode} backend=ring")
    if mode == "overlap":
        assert "wrong=0" in proc.stdout and "tries=200" in proc.stdout, proc.stdout


@pytest.mark.timeout(120)
def test_overlap_on_three_ranks_breaks_the_group_everywhere():
    assert_ok(launch(3, "threads_serialized.py", "overlap", "40", timeout=110), 3, "OK threads overlap backend=ring")


@MPI_SKIP
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_threads_take_turns_on_mpi(mode):
    ok(mpirun(2, "threads_serialized.py", mode, timeout=110), 2, f"OK threads {mode} backend=mpi")


@MPI_SKIP
@pytest.mark.timeout(60)
@pytest.mark.parametrize("level", ["single", "serialized"])
def test_mpi_backend_refuses_a_thread_level_it_cannot_serve(level):
    """A program that started MPI with less than MPI_THREAD_MULTIPLE gets a
    clear error at init naming the level, and the job still ends cleanly."""
    proc = mpirun(1, "mpi_thread_level.py", level, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"REFUSED aiocomm's MPI backend needs MPI_THREAD_MULTIPLE, but MPI was initialised with " \
           f"MPI_THREAD_{level.upper()}" in proc.stdout, proc.stdout + proc.stderr


def test_a_claim_of_a_thread_that_died_is_ignored_and_a_live_one_refuses(fresh_world):
    """In-process, on a world of size 1: a claim its thread never released
    (the thread died mid-call) does not block the next thread; a claim of a
    live thread makes the next thread's call raise, naming both threads."""
    import threading

    import numpy as np

    import aiocomm
    from aiocomm.group import claim

    world = aiocomm.init()
    t = threading.Thread(target=lambda: claim(world, "collectives"), name="died-mid-call")
    t.start()
    t.join()
    assert aiocomm.all_sum(np.ones(2)).tolist() == [1.0, 1.0]

    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with claim(world, "collectives"):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold, name="busy-caller")
    t.start()
    holding.wait(10)
    try:
        with pytest.raises(RuntimeError, match=r"busy-caller.*still in flight") as caught:
            aiocomm.all_sum(np.ones(2))
        assert threading.current_thread().name in str(caught.value)
        assert "split" in str(caught.value) and "lock" in str(caught.value)
    finally:
        release.set()
        t.join()
    assert aiocomm.all_sum(np.ones(2)).tolist() == [1.0, 1.0]  # released with its call


@pytest.mark.parametrize("call", ["broadcast_obj", "all_gather_obj"])
def test_a_call_of_several_steps_holds_its_group_between_them(fresh_world, monkeypatch, call):
    """In-process, on a world of size 1: the object calls (and
    average_gradients, driven the same way, though on one rank it makes no
    call) are made of several collectives; another thread's call between two
    of them is an overlap (it would pair with one of them on other ranks),
    so it raises, naming both threads."""
    import threading

    import numpy as np

    import aiocomm

    aiocomm.init()
    inner = {"broadcast_obj": "broadcast", "all_gather_obj": "all_gather_v"}[call]
    real = getattr(aiocomm, inner)
    between, go_on = threading.Event(), threading.Event()

    def step(*a, **kw):  # each step of the call: the first one waits for the other thread's try
        between.set()
        go_on.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(aiocomm, inner, step)
    results: list[object] = []
    arg = {"broadcast_obj": {"x": 1}, "all_gather_obj": 5}[call]
    kwargs = {"root": 0} if call == "broadcast_obj" else {}
    t = threading.Thread(target=lambda: results.append(getattr(aiocomm, call)(arg, **kwargs)), name="several-steps")
    t.start()
    try:
        assert between.wait(10)
        with pytest.raises(RuntimeError, match=r"several-steps.*still in flight"):
            real(np.ones(3)) if inner != "broadcast" else real(np.ones(3), 0)
    finally:
        go_on.set()
        t.join(10)
    assert not t.is_alive()


def test_an_async_call_of_several_steps_holds_its_group_between_them(fresh_world, monkeypatch):
    """The same on the async face: a blocking call from another thread while
    an awaited broadcast_obj is between two of its steps raises."""
    import asyncio
    import threading

    import numpy as np

    import aiocomm
    from aiocomm import aio

    aiocomm.init()
    real = aio.broadcast
    between, go_on = threading.Event(), threading.Event()

    async def step(*a, **kw):
        between.set()
        await asyncio.to_thread(go_on.wait, 10)
        return await real(*a, **kw)

    monkeypatch.setattr(aio, "broadcast", step)
    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(asyncio.run(aio.broadcast_obj({"x": 1}, 0))),
                         name="async-steps")
    t.start()
    try:
        assert between.wait(10)
        with pytest.raises(RuntimeError, match=r"async-steps.*still in flight"):
            aiocomm.all_sum(np.ones(3))
    finally:
        go_on.set()
        t.join(10)
    assert not t.is_alive()


def test_a_claim_left_by_an_ended_thread_is_taken_over_even_by_a_thread_with_its_ident():
    """A thread that ended with a call in flight leaves its claim behind; the
    next thread takes it over.  Thread idents are reused as soon as a thread
    has ended, so the claim must know its thread, not its ident: a new
    thread with the old ident would otherwise count itself a second call of
    the dead one, leave the claim behind when it returned, and make a later
    caller's call an overlap with a thread that holds nothing."""
    import threading

    from aiocomm import group as engine

    world = engine.Engine(0, 2).world  # (claims need no connections)
    idents = []

    def leave_a_claim() -> None:
        idents.append(threading.get_ident())
        engine.claim(world, "collectives")  # never released: the thread ends with its call in flight

    reused = False
    for _ in range(50):  # (until a new thread gets the ended one's ident, as it does at once here)
        first = threading.Thread(target=leave_a_claim)
        first.start()
        first.join()
        done, release = threading.Event(), threading.Event()

        def call_and_stay(done: threading.Event = done, release: threading.Event = release) -> None:
            idents.append(threading.get_ident())
            engine.claim(world, "collectives").release()
            done.set()
            release.wait(10)  # alive, holding nothing

        second = threading.Thread(target=call_and_stay)
        second.start()
        assert done.wait(10)
        try:
            engine.claim(world, "collectives").release()  # must not be an overlap with the second thread
        finally:
            release.set()
            second.join()
        reused = reused or idents[-1] == idents[-2]
    assert reused, "no thread ident was reused: the case this test is for never came up"
