"""The transport's modules import one way: down the layers below, never up,
not even under ``TYPE_CHECKING`` or inside a function.  A module that needs
something of the one above it asks through a ``typing.Protocol`` it defines
itself (``stream.StreamOwner``, ``connections.ConnectionsOwner``); so a
stream runs under any owner, here a socket-free one."""

from __future__ import annotations

import ast
import asyncio
import math

import pytest

from aiocomm.errors import CommError, PeerLostError
from aiocomm.transport.stream import PeerStream
from aiocomm.transport.waits import WaitSet
from aiocomm.wire import DialerHandshake, Sink

from .conftest import ROOT

TRANSPORT = ROOT / "aiocomm" / "transport"

#: Each transport module's layer: a module may import only modules of a lower layer.
LAYERS = {
    "waits": 0,  # every wait, its deadline, who can end it
    "contexts": 0,  # groups on the wire, and aborting them
    "cma": 0,  # writing into another process's memory on this host
    "inbox": 0,  # small messages from peers on this host, through shared memory
    "workers": 0,  # threads that outlive their jobs (an async send's parts)
    "flow": 1,  # credit and announced messages (waits)
    "matching": 1,  # pairing frames with receives (waits)
    "stream": 2,  # one connection (flow, waits)
    "connections": 3,  # every connection of a rank (stream, waits)
    "mesh": 4,  # composes the parts
    "__init__": 5,  # the package's face
}
#: What the transport may import of the rest of aiocomm: the layers beneath it.
BENEATH = ("aiocomm.errors", "aiocomm.config", "aiocomm.wire", "aiocomm.results")


def imported_modules(path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in the file at
    ``path`` (a module of ``aiocomm.transport``), wherever it is written."""
    package = ["aiocomm", "transport"]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                found.append((node.lineno, module))
            else:  # ``from .. import wire``: the names are modules
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return sorted(found)


def test_every_transport_module_has_a_layer():
    modules = {p.stem for p in TRANSPORT.glob("*.py")}
    assert modules == set(LAYERS), "give each module of aiocomm/transport a layer in LAYERS"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_transport_imports_point_down(name):
    path = TRANSPORT / f"{name}.py"
    wrong = []
    for line, module in imported_modules(path):
        if module.startswith("aiocomm.transport."):
            target = module.split(".")[2]
            if LAYERS.get(target, len(LAYERS)) >= LAYERS[name]:
                wrong.append(f"{path.name}:{line} imports {module} (layer {LAYERS.get(target)} >= {LAYERS[name]})")
        elif module.split(".")[0] == "aiocomm" and ".".join(module.split(".")[:2]) not in BENEATH:
            wrong.append(f"{path.name}:{line} imports {module}, above the transport")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports_hidden_from_run_time(tmp_path):
    """The parser finds imports under TYPE_CHECKING and inside functions, relative or not."""
    source = tmp_path / "x.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from .. import wire\n"
        "if TYPE_CHECKING:\n"
        "    from .mesh import Mesh\n"
        "def f():\n"
        "    import aiocomm.group\n"
        "    from . import connections\n"
    )
    assert imported_modules(source) == [
        (1, "typing"),
        (2, "aiocomm.wire"),
        (4, "aiocomm.transport.mesh"),
        (6, "aiocomm.group"),
        (7, "aiocomm.transport.connections"),
    ]


# ---- a stream under an owner of its own


class Owner:
    """A :class:`~aiocomm.transport.stream.StreamOwner` that records the stream's end."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rank = 0
        self.waits = WaitSet(loop, rank=0, poll_s=0.0)
        self.lost: list[PeerStream] = []

    def accepted(self, stream):
        pass

    def handshake_done(self, stream):
        pass

    def refused(self, claimed, where):
        pass

    def stream_lost(self, stream, exc):
        self.lost.append(stream)

    def route(self, src, header, meta):
        return Sink(None)

    def hold(self, nbytes):
        return False

    def release(self, nbytes):
        pass


def paused_stream(loop) -> tuple[Owner, PeerStream]:
    """A stream to rank 1 whose written bytes wait for the kernel."""
    owner = Owner(loop)
    stream = PeerStream(owner, DialerHandshake(b"token", 0, 2, 1), ("127.0.0.1", 1))
    stream.peer = 1
    stream.pause_writing()
    return owner, stream


def test_a_drain_outside_any_operation_is_a_wait_without_deadline(loop):
    owner, stream = paused_stream(loop)
    done = stream.drained_future()
    [wait] = owner.waits.pending
    assert wait.future is done and wait.peer == 1 and wait.op.deadline == math.inf
    owner.waits.fail_context(0, CommError("aborted"))  # no group's abort ends it
    assert not done.done()
    stream.resume_writing()
    assert done.result() is None and not owner.waits.pending


def test_a_drain_at_shutdown_ends_with_its_connection_or_its_callers_timeout(loop):
    """At shutdown the mesh fails and closes its waits before the connections
    drain: a drain made then still ends when its connection does, and a
    caller's timeout bounds one that never would."""
    owner, stream = paused_stream(loop)
    owner.waits.fail_all(CommError("shut down"))
    owner.waits.close()
    with pytest.raises(asyncio.TimeoutError):
        loop.run_until_complete(asyncio.wait_for(stream.drained_future(), 0.01))
    done = stream.drained_future()
    stream.connection_lost(None)
    assert isinstance(done.exception(), PeerLostError)
    assert not owner.waits.pending and owner.lost == [stream]
    assert stream.drained_future() is None  # closed: nothing left to wait for


def test_a_member_told_of_a_lost_peer_fails_its_collective_waits_on_it_and_nothing_else(loop):
    """A rank that loses a peer names the groups of its waiting collectives
    that the peer is in (it tells their members).  A member so told fails its
    collective waits on that peer in that group, even with no connection to
    it, and any made later; a wait on another member, a receive of the same
    group, and a collective of another group go on."""
    from aiocomm.transport.waits import Op, Wait

    waits = WaitSet(loop, rank=0, poll_s=0.0)
    collective = Op("all_sum", 7, 30.0, loop.time() + 30.0, (0, 2, 4))
    other_group = Op("all_sum", 9, 30.0, loop.time() + 30.0, (0, 2))
    on_two = Wait(waits, 2, collective, "waiting for data from")
    on_four = Wait(waits, 4, collective, "waiting for data from")
    p2p = Wait(waits, 2, Op("recv", 7, 30.0, loop.time() + 30.0), "waiting for data from")
    elsewhere = Wait(waits, 2, other_group, "waiting for data from")
    assert waits.collectives_with(2) == {7: (0, 2, 4), 9: (0, 2)} and waits.collectives_with(3) == {}
    lost = PeerLostError("rank 0 waited in a collective on rank 2, which rank 4 lost: closed by the peer", 2)
    waits.heard_lost(7, 2, lost)
    assert on_two.future.exception() is lost
    assert waits.pending == {on_four, p2p, elsewhere}
    later = Wait(waits, 2, collective, "waiting for data from")
    loop.run_until_complete(asyncio.sleep(0))
    assert later.future.exception() is lost and later not in waits.pending
    waits.fail_all(CommError("shut down"))


def test_a_worker_runs_jobs_in_order_and_outlives_none_of_its_failures(monkeypatch):
    """transport.workers: jobs run in order on one thread, which ends when
    idle and starts again for the next job; a thread that could not start,
    a job that raised and a callback that raised leave the worker usable;
    a job withdrawn before its thread took it never runs."""
    import threading
    import time

    from aiocomm.transport import workers

    monkeypatch.setattr(workers, "IDLE_SECONDS", 0.05)
    worker = workers.Worker("test-worker")
    ran: list[object] = []
    ended = threading.Semaphore(0)

    def then(error: BaseException | None) -> None:
        ran.append(("then", type(error).__name__ if error else None))
        ended.release()

    def boom() -> None:
        raise ValueError("job")

    def bad_then(error: BaseException | None) -> None:
        ended.release()
        raise RuntimeError("callback")

    start = threading.Thread.start

    def cannot_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    with pytest.raises(RuntimeError, match="can't start"):
        worker.submit(workers.Job(lambda: ran.append("never"), then))
    monkeypatch.setattr(threading.Thread, "start", start)
    assert worker.running == 0

    for job in (workers.Job(lambda: ran.append(1), then), workers.Job(boom, then),
                workers.Job(lambda: ran.append(2), bad_then), workers.Job(lambda: ran.append(3), then)):
        worker.submit(job)
    for _ in range(4):
        assert ended.acquire(timeout=10)
    assert ran == [1, ("then", None), ("then", "ValueError"), 2, 3, ("then", None)], ran
    deadline = time.monotonic() + 10
    while any(t.name == "test-worker" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "test-worker" for t in threading.enumerate()), "the idle thread did not end"
    worker.submit(workers.Job(lambda: ran.append(4), then))  # (a new thread)
    assert ended.acquire(timeout=10) and ran[-2:] == [4, ("then", None)], ran
    assert worker.running == 0

    hold = threading.Event()
    first = workers.Job(lambda: hold.wait(10), then)
    second = workers.Job(lambda: ran.append("withdrawn"), then)
    worker.submit(first)
    worker.submit(second)
    deadline = time.monotonic() + 10
    while not first.taken and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not worker.withdraw(first), "a job its thread took cannot be withdrawn"
    assert worker.withdraw(second) and worker.running == 1
    hold.set()
    assert ended.acquire(timeout=10)
    time.sleep(0.1)
    assert "withdrawn" not in ran and worker.running == 0, ran
