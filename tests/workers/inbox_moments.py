"""Small point-to-point messages through the receiver's inbox (shared
memory, same host) at unusual moments (argv: mode [args]).  Every line a
test reads starts with a word in capitals; ``INBOX <n>`` is how many
messages came to this rank through its inbox.

pairs:    every ordered pair of 3 ranks, the blocking face: a run of messages
          of every size class in one order (a scalar, an empty array, small
          ones through the inbox, one just over the inbox's limit and a mid
          one through it in parts, a large one written across), several dtypes; a
          receive of the wrong shape first (MismatchError, the message
          stays); messages of a split group and of the world interleaved and
          received in another order; then blocking sends received on the
          async face, and async sends on the blocking face; then async
          sends of every size (in parts too), all in flight at once,
          received in order on either face.
budget:   rank 0 sends 600 messages of 16 KiB (far more than its ring and
          than AIOCOMM_BUFFER_BYTES) before rank 1 receives any; rank 1 then
          receives them all, in order, intact.
kill ROLE:  rank 0 sends messages to rank 1 in a loop (each filled with its
          number; 8 KiB, the inbox's largest record and 1 MiB in parts, in
          turn; three on the blocking face, three on the async one, both
          sides); the rank named by ROLE SIGKILLs itself at a random moment.
          The survivor prints ``FAILED <class> at <seconds>``; every message
          received before is checked (``WRONG`` if torn or out of order).
stopped:  rank 0 SIGSTOPs itself before it sends (``STOPPED``); rank 1's
          blocking receive times out (``TIMEDOUT``, then ``WAITING``); the
          test thaws rank 0, which sends two messages; rank 1's next two
          receives get them, in order.
stopped_parts [FACE]: rank 0 SIGSTOPs itself after the first part of a 1
          MiB message (``STOPPED``); rank 1's receive of it (blocking, or
          async: the loop takes the part into the posted receive) times out
          (``TIMEDOUT``, ``WAITING``); thawed, rank 0 finishes it and sends
          another; rank 1's next receives get both, whole and in order.
interrupted WHO: KeyboardInterrupt (as a SIGINT would raise it) in the
          middle of a message of 5 parts: ``sender`` (right after its first
          part); ``advance-N``/``payload-N``: in rank 1's thread, at its N-th
          call of ``Ring.advance``/``Ring.payload`` while it takes the parts.
          The sender's connection must close (rank 1: ``RAISED
          PeerLostError``); rank 1's next receive gets the whole message,
          then the one after it (``OK``).
overtaking_parts: rank 0 sends a message in 3 parts, then 8 KiB through
          the inbox, then 300 KiB from the async face (TCP), while rank 1's
          thread that took the first part sleeps: the loop takes the message
          over, and rank 1's receives get the three in order (``OK``).
killed_parts: rank 0 SIGKILLs itself after the first part of a 1 MiB
          message; rank 1's receive of it raises ``FAILED <class>``.
threads:  the blocking face from a new thread for each call, in turn (the
          serialized rule): messages both ways.
midpayload: rank 0 sends F (2 MiB less a little, TCP, eager: its parts
          through the inbox turned off) then R (8
          bytes: the inbox); rank 1 reads its socket slowly, so that its
          first receive of F times out halfway through F's payload.  Its next
          receive of F must get F (given back first in line, as over TCP),
          then R.
frozen_receiver SIZE [FACE]: rank 1 SIGSTOPs itself; rank 0 sends 4 KiB
          messages (SIZE ``parts``: 1 MiB, in parts) with timeout=2 until
          one fails: it must fail with CommTimeoutError (``SENDFAILED``),
          not hang, once the ring, the credit and the socket are full.
          FACE: ``blocking`` (the default) or ``async`` sends; ``cancel``:
          an async send of 1 MiB given up on after 1 s by asyncio.wait_for
          (``CANCELLED``), which must close the connection (the next send
          fails: ``THEN``); thawed, rank 1 must receive nothing
          (``RECVFAILED``).
noinbox:  no file may grow past 64 KiB, so no inbox can be made: the ranks
          exchange small messages over TCP.
excluded FACE: rank 1 freezes itself; rank 0's agreement declares it failed
          (its connections close for good); thawed, rank 1 sends a small
          message.  Rank 0's receive from it (blocking or async FACE) must
          raise PeerLostError, as over TCP, not return that message.
"""

import asyncio
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import ml_dtypes
import numpy as np

import aiocomm
from aiocomm import aio
from aiocomm.transport import inbox

from common import recv_checked

mode = sys.argv[1]
if mode == "midpayload":  # every rank reads its sockets slowly, 16 KiB at a time, while a payload comes
    from aiocomm.transport import stream as stream_module
    from aiocomm.wire import frames

    get_buffer = frames.FrameReader.get_buffer

    def slow_get_buffer(self: Any, sizehint: int = -1) -> memoryview:
        view = get_buffer(self, sizehint)
        return view[: 16 << 10] if self._sink is not None else view

    buffer_updated = stream_module.PeerStream.buffer_updated

    def slow_buffer_updated(self: Any, nbytes: int) -> None:
        if self.reader._sink is not None:
            time.sleep(0.001)
        buffer_updated(self, nbytes)

    # (before any connection: uvloop looks these up once per connection)
    frames.FrameReader.get_buffer = slow_get_buffer  # type: ignore[method-assign]
    stream_module.PeerStream.buffer_updated = slow_buffer_updated  # type: ignore[method-assign]
if mode == "noinbox":  # no file may grow past 64 KiB: the inbox cannot be made
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
world = aiocomm.init()
r, n = world.rank(), world.size()
mesh = world.engine.mesh
KiB, MiB = 1 << 10, 1 << 20


def say(*parts: object) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (" ".join(map(str, parts)) + "\n").encode())


DTYPES = ["float32", "int64", "uint8", "float16", "complex64", "bool", "bfloat16"]
#: (shape, or a byte count) of each message of a pair's run, in order
RUN = [(), (0,), 8, 4 * KiB, inbox.SMALL, inbox.SMALL + 8, 300 * KiB, 3 * MiB, 16, 1 * KiB, 2]


def message(src: int, dst: int, i: int, size: object, dtype: str) -> np.ndarray:
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    if isinstance(size, tuple):
        count = int(np.prod(size, dtype=np.int64))
        shape = size
    else:
        count = max(1, int(size) // dt.itemsize)
        shape = (count,)
    base = (np.arange(count, dtype=np.int64) * 7 + src * 50 + dst * 10 + i) % 120
    if dtype == "bool":
        return (base % 3 == 0).reshape(shape)
    return base.astype(dt).reshape(shape)


def run_of(src: int, dst: int) -> list[tuple[int, object, str]]:
    return [(i, size, DTYPES[(src + dst + i) % len(DTYPES)]) for i, size in enumerate(RUN)]


def ring_in_use() -> None:
    """Put rank 0's ring in rank 1's inbox in use (a receiving thread spins
    only for a ring in use), then meet."""
    if r == 0:
        aiocomm.send(np.zeros(1), 1)
    else:
        aiocomm.recv((1,), np.float64, 0, timeout=30)
    aiocomm.barrier()


def spin_long() -> None:
    """This rank's blocking receives spin until their message's first part comes."""
    from aiocomm.backends import ring as ring_backend

    ring_backend.SPIN_SECONDS = 5.0


if mode == "pairs":
    bad: list[str] = []
    for step in range(1, n):
        dst, src = (r + step) % n, (r - step) % n

        def send_all(dst: int = dst) -> None:
            for i, size, dtype in run_of(r, dst):
                aiocomm.send(message(r, dst, i, size, dtype), dst)

        def recv_all(src: int = src) -> None:
            for i, size, dtype in run_of(src, r):
                recv_checked(message(src, r, i, size, dtype), src, f"message {i} from rank {src} ({dtype}, {size})",
                             bad, probe=i == 2)

        if r % 2 == 0:  # (even ranks send first: large messages may wait for their receive)
            send_all()
            recv_all()
        else:
            recv_all()
            send_all()
    aiocomm.barrier()
    # a split group's messages and the world's, interleaved, received in another order
    sub = world.split(0, key=r)
    right, left = (r + 1) % n, (r - 1) % n
    for k in range(3):
        aiocomm.send(np.full(3, 100 + k, np.int32), right)
        aiocomm.send(np.full(3, 200 + k, np.int32), right, group=sub)
    got_sub = [int(aiocomm.recv((3,), np.int32, left, group=sub)[0]) for _ in range(3)]
    got_world = [int(aiocomm.recv((3,), np.int32, left)[0]) for _ in range(3)]
    if got_sub != [200, 201, 202] or got_world != [100, 101, 102]:
        bad.append(f"interleaved groups: {got_sub} {got_world}")
    aiocomm.barrier()

    # blocking sends, received on the async face (the loop takes them out of the inbox)
    if r == 0:
        for k in range(20):
            aiocomm.send(np.full(5, k, np.int16), 1)
    elif r == 1:
        async def take() -> list[int]:
            return [int((await aio.recv((5,), np.int16, 0, timeout=30))[0]) for _ in range(20)]

        got = asyncio.run(take())
        if got != list(range(20)):
            bad.append(f"async receives got {got}")
    aiocomm.barrier()
    # async sends (all in flight at once), received on the blocking face
    if r == 1:
        async def give() -> None:
            await asyncio.gather(*(aio.send(np.full(4, k, np.uint8), 0) for k in range(20)))

        asyncio.run(give())
    elif r == 0:
        got = [int(aiocomm.recv((4,), np.uint8, 1, timeout=30)[0]) for _ in range(20)]
        if got != list(range(20)):
            bad.append(f"blocking receives of async sends got {got}")
    aiocomm.barrier()
    # async sends of every size class, parts among them (from worker threads), all in flight at once:
    # received in order on the blocking face (rank 0, from rank 1) and on the async face (rank 1, from rank 0)
    mixed = [300 * KiB, 8, 1 * MiB, 16, 1536 * KiB + 4, 4 * KiB, 2 * MiB - 8, inbox.SMALL + 8]
    parts_before, threads_before = mesh.sent_in_parts, mesh.parts_handed
    if r in (0, 1):
        async def give_mixed() -> None:
            await asyncio.gather(*(aio.send(message(r, 1 - r, i, size, "uint8"), 1 - r, timeout=30)
                                   for i, size in enumerate(mixed)))

        async def take_mixed() -> list[np.ndarray]:
            return [await aio.recv((int(size),), np.uint8, 0, timeout=30) for size in mixed]

        if r == 1:
            asyncio.run(give_mixed())
            got_mixed = asyncio.run(take_mixed())
        else:
            got_mixed = [aiocomm.recv((int(size),), np.uint8, 1, timeout=30) for size in mixed]
            asyncio.run(give_mixed())
        for i, size in enumerate(mixed):
            if not np.array_equal(got_mixed[i], message(1 - r, r, i, size, "uint8")):
                bad.append(f"async mixed message {i} ({size} bytes) from rank {1 - r}")
        if mesh.inbox is not None:
            if mesh.sent_in_parts == parts_before:
                bad.append("no async send went in parts")
            elif mesh.parts_handed == threads_before:
                bad.append("no async send in parts was finished by a worker thread")
    aiocomm.barrier()
    say("BAD" if bad else "OK", "; ".join(bad), "INBOX", mesh.through_inbox)
elif mode == "budget":
    COUNT, SIZE = 600, 16 * KiB
    if r == 0:
        for i in range(COUNT):
            aiocomm.send(np.full(SIZE // 4, i, np.int32), 1, timeout=60)
        say("SENT", COUNT)
    else:
        time.sleep(1.0)
        wrong = [i for i in range(COUNT) if not np.all(aiocomm.recv((SIZE // 4,), np.int32, 0, timeout=60) == i)]
        say("OK" if not wrong else f"WRONG {wrong[:5]}", "INBOX", mesh.through_inbox)
    aiocomm.barrier()
elif mode == "kill":
    role = sys.argv[2]
    victim = {"sender": 0, "receiver": 1}[role]
    aiocomm.barrier()
    if r == victim:
        delay = 0.2 + random.random() * 0.4
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    say("READY")
    # (8 KiB and the inbox's largest, in turn: the kill may land halfway through copying a large record)
    shapes = [(1 << 10,), (inbox.SMALL // 8,), ((1 << 20) // 8 + 5,)]
    xs = [np.empty(shape, np.int64) for shape in shapes]
    i = 0
    while True:
        try:
            on_async = (i // 3) % 2 == 1  # (three messages from the blocking face, three from the async one)
            if r == 0:
                x = xs[i % 3]
                x.fill(i)
                if on_async:
                    asyncio.run(aio.send(x, 1, timeout=60))
                else:
                    aiocomm.send(x, 1, timeout=60)
            else:
                if on_async:
                    y = asyncio.run(aio.recv(shapes[i % 3], np.int64, 0, timeout=60))
                else:
                    y = aiocomm.recv(shapes[i % 3], np.int64, 0, timeout=60)
                if not (y[0] == i and np.all(y == i)):
                    say(f"WRONG message {i}: {y[0]}")
        except aiocomm.CommError as exc:
            say("FAILED", type(exc).__name__, "at", f"{time.time():.3f}", "after", i, "INBOX",
                mesh.through_inbox, "|", str(exc)[:200])
            break
        i += 1
    os._exit(0)
elif mode == "stopped":
    if r == 0:
        aiocomm.send(np.array([0], np.int64), 1)  # (the connection is up, and the inbox in use)
        say("STOPPED")
        os.kill(os.getpid(), signal.SIGSTOP)
        aiocomm.send(np.array([1], np.int64), 1)
        aiocomm.send(np.array([2], np.int64), 1)
        say("SENT")
    else:
        first = int(aiocomm.recv((1,), np.int64, 0, timeout=30)[0])
        t0 = time.monotonic()
        try:
            aiocomm.recv((1,), np.int64, 0, timeout=0.5)
            say("BAD a receive from a frozen rank returned")
        except aiocomm.CommTimeoutError:
            say("TIMEDOUT", f"{time.monotonic() - t0:.2f}")
        say("WAITING")
        got = [first] + [int(aiocomm.recv((1,), np.int64, 0, timeout=30)[0]) for _ in range(2)]
        say("OK" if got == [0, 1, 2] else "BAD", "GOT", got, "INBOX", mesh.through_inbox)
elif mode in ("stopped_parts", "killed_parts"):
    PN = (1 << 20) // 8
    if r == 0:
        aiocomm.send(np.array([0], np.int64), 1)  # (the connection is up, and the inbox in use)
        put_more = inbox.Outlet.put_more

        def stop_once(self: Any, *args: Any) -> bool:
            inbox.Outlet.put_more = put_more  # type: ignore[method-assign]
            if mode == "killed_parts":
                os.kill(os.getpid(), signal.SIGKILL)
            say("STOPPED")
            os.kill(os.getpid(), signal.SIGSTOP)
            return put_more(self, *args)  # type: ignore[no-any-return]

        inbox.Outlet.put_more = stop_once  # type: ignore[method-assign]
        aiocomm.send(np.full(PN, 5, np.int64), 1)
        aiocomm.send(np.array([1], np.int64), 1)
        say("SENT")
    else:
        first = int(aiocomm.recv((1,), np.int64, 0, timeout=30)[0])
        if mode == "killed_parts":
            try:
                aiocomm.recv((PN,), np.int64, 0, timeout=30)
                say("BAD a receive from a rank killed halfway returned")
            except aiocomm.CommError as exc:
                say("FAILED", type(exc).__name__, "at", f"{time.time():.3f}", "after", first, "INBOX",
                    mesh.through_inbox, "|", str(exc)[:200])
            os._exit(0)
        t0 = time.monotonic()
        try:
            if sys.argv[2:] == ["async"]:
                asyncio.run(aio.recv((PN,), np.int64, 0, timeout=0.5))
            else:
                aiocomm.recv((PN,), np.int64, 0, timeout=0.5)
            say("BAD a receive from a frozen rank returned")
        except aiocomm.CommTimeoutError:
            say("TIMEDOUT", f"{time.monotonic() - t0:.2f}")
        say("WAITING")
        big = aiocomm.recv((PN,), np.int64, 0, timeout=30)
        last = int(aiocomm.recv((1,), np.int64, 0, timeout=30)[0])
        whole = bool(np.all(big == 5))
        say("OK" if whole and (first, last) == (0, 1) else "BAD", "GOT", [first, whole, last], "INBOX",
            mesh.through_inbox)
elif mode == "interrupted":
    who = sys.argv[2]
    IN = ((1 << 20) + 40) // 8  # (5 parts: 4 of 256 KiB and 40 bytes)
    big = np.arange(IN, dtype=np.int64) * 3 + 1
    ring_in_use()
    if r == 0:
        if who == "sender":
            ring_if_waiting = inbox.Outlet.ring_if_waiting

            def interrupted(self: Any) -> None:
                inbox.Outlet.ring_if_waiting = ring_if_waiting  # type: ignore[method-assign]
                raise KeyboardInterrupt

            inbox.Outlet.ring_if_waiting = interrupted  # type: ignore[method-assign]
            try:
                aiocomm.send(big, 1)
                say("BAD the send was not interrupted")
            except KeyboardInterrupt:
                say("INTERRUPTED")
            time.sleep(4.0)  # (alive: rank 1 must hear of the closed connection, not of this rank's end)
            os._exit(0)
        time.sleep(0.2)  # (rank 1 spins for the message meanwhile)
        aiocomm.send(big, 1)
        aiocomm.send(np.array([7], np.int64), 1)
    else:
        spin_long()
        if who == "sender":
            t0 = time.monotonic()
            try:
                got = aiocomm.recv((IN,), np.int64, 0, timeout=30)
                say("BAD a receive got", "the message" if np.array_equal(got, big) else "a torn message")
            except aiocomm.CommError as exc:
                say("RAISED", type(exc).__name__, f"after {time.monotonic() - t0:.1f}s", str(exc)[:200])
            os._exit(0)
        name, count = who.split("-")
        original = getattr(inbox.Ring, name)
        calls = [0]

        def counted(self: Any, *args: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                calls[0] += 1
                if calls[0] == int(count):
                    setattr(inbox.Ring, name, original)
                    raise KeyboardInterrupt
            return original(self, *args)

        setattr(inbox.Ring, name, counted)
        try:
            aiocomm.recv((IN,), np.int64, 0, timeout=30)
            say("BAD the receive was not interrupted", calls)
        except KeyboardInterrupt:
            pass
        setattr(inbox.Ring, name, original)
        try:
            got = aiocomm.recv((IN,), np.int64, 0, timeout=30)
            after = int(aiocomm.recv((1,), np.int64, 0, timeout=30)[0])
            say("OK" if np.array_equal(got, big) and after == 7 else "BAD", "AFTER", after, "INBOX",
                mesh.through_inbox)
        except aiocomm.CommError as exc:
            say("BAD", type(exc).__name__, str(exc)[:300])
    aiocomm.barrier()
elif mode == "overtaking_parts":
    ON = (2 * inbox.SMALL + 8) // 8
    ring_in_use()
    if r == 0:
        time.sleep(0.2)  # (rank 1 spins for the message meanwhile)
        aiocomm.send(np.full(ON, 3, np.int64), 1)
        aiocomm.send(np.full(1 << 10, 4, np.int64), 1)
        asyncio.run(aio.send(np.full(300 * KiB // 8, 5, np.int64), 1))  # (the async face: over TCP)
    else:
        from aiocomm.transport import mesh as mesh_module

        spin_long()
        take_parts = mesh_module.Mesh._take_parts

        def sleepy(self: Any, *args: Any) -> bool:
            time.sleep(0.5)  # (the other two come meanwhile)
            return take_parts(self, *args)  # type: ignore[no-any-return]

        mesh_module.Mesh._take_parts = sleepy  # type: ignore[method-assign]
        try:
            got = [int(aiocomm.recv(shape, np.int64, 0, timeout=30)[0])
                   for shape in ((ON,), (1 << 10,), (300 * KiB // 8,))]
            say("OK" if got == [3, 4, 5] else "BAD", "GOT", got, "INBOX", mesh.through_inbox)
        except aiocomm.CommError as exc:
            say("BAD", type(exc).__name__, str(exc)[:300])
    aiocomm.barrier()
elif mode == "threads":
    got: list[int] = []
    for k in range(6):
        def call(k: int = k) -> None:
            if (k + r) % 2 == 0:
                aiocomm.send(np.array([10 * r + k]), 1 - r)
            else:
                got.append(int(aiocomm.recv((1,), np.int64, 1 - r, timeout=30)[0]))

        t = threading.Thread(target=call)
        t.start()
        t.join()
    say("GOT", got, "INBOX", mesh.through_inbox)
elif mode == "midpayload":
    FN = (2 << 20) // 8 - 64
    aiocomm.barrier()
    if r == 0:
        mesh.in_parts = lambda nbytes: False  # type: ignore[method-assign]  # (F must cross TCP: the case here)
        asyncio.run(aio.send(np.full(FN, 7, np.int64), 1))
        aiocomm.send(np.array([1000], np.int64), 1)
    else:
        try:
            aiocomm.recv((FN,), np.int64, 0, timeout=0.05)
            say("EARLY the first receive did not time out")
            os._exit(0)
        except aiocomm.CommTimeoutError:
            pass
        try:
            f = aiocomm.recv((FN,), np.int64, 0, timeout=30)
            small = aiocomm.recv((1,), np.int64, 0, timeout=30)
            say("OK" if np.all(f == 7) and small[0] == 1000 else "BAD contents", "INBOX", mesh.through_inbox)
        except aiocomm.MismatchError as exc:
            say("BAD overtaken:", str(exc)[:200])
    aiocomm.barrier()
elif mode == "excluded":
    face = sys.argv[2]
    pids = aiocomm.all_gather(np.array([os.getpid()]))
    aiocomm.send(np.array([1]), 1 - r)
    aiocomm.recv((1,), np.int64, 1 - r)
    aiocomm.barrier()
    if r == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
        try:
            aiocomm.send(np.array([42], np.int64), 0, timeout=3)
        except aiocomm.CommError:
            pass
        time.sleep(1.5)
        os._exit(0)
    time.sleep(0.3)
    try:
        world.agree(True, timeout=1.0)
    except aiocomm.CommError:
        pass
    deadline = time.monotonic() + 10
    while 1 not in mesh.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(int(pids[1]), signal.SIGCONT)
    time.sleep(0.5)
    try:
        if face == "async":
            got = asyncio.run(aio.recv((1,), np.int64, 1, timeout=3))
        else:
            got = aiocomm.recv((1,), np.int64, 1, timeout=3)
        say("BAD a lost rank's message was delivered:", got.tolist())
    except aiocomm.CommError as exc:
        say("RAISED", type(exc).__name__, "LOST", sorted(mesh.lost))
    os._exit(0)
elif mode == "frozen_receiver":
    size, face = sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "blocking"
    aiocomm.send(np.zeros(1), 1 - r)  # (the rings are in use both ways)
    aiocomm.recv((1,), np.float64, 1 - r, timeout=30)
    aiocomm.barrier()
    x = np.zeros((1 << 18) if size == "parts" else (1 << 10), np.float32)
    if r == 1:
        say("STOPPED")
        os.kill(os.getpid(), signal.SIGSTOP)
        if face == "cancel":  # thawed once rank 0 gave up on its send: no message may come, torn or whole
            try:
                aiocomm.recv_like(x, 0, timeout=10)
                say("BAD a message came from a send cancelled halfway")
            except aiocomm.CommError as exc:
                say("RECVFAILED", type(exc).__name__)
        else:
            time.sleep(5)
        os._exit(0)
    time.sleep(0.3)
    t0 = time.monotonic()
    sent = 0
    try:
        while time.monotonic() - t0 < 60:
            if face == "blocking":
                aiocomm.send(x, 1, timeout=2)
            elif face == "async":
                asyncio.run(aio.send(x, 1, timeout=2))
            else:  # cancel: the async send is given up on by its caller (not its own timeout) halfway
                try:
                    asyncio.run(asyncio.wait_for(aio.send(x, 1, timeout=30), 1.0))
                except asyncio.TimeoutError:
                    if mesh.parts_running():
                        say("BAD the cancelled send returned while its thread still read the array")
                    x[:] = 7  # (the send returned: the array is the caller's again)
                    say("CANCELLED after", sent, f"in {time.monotonic() - t0:.1f}s")
                    break
            sent += 1
        else:
            say("BAD sent for a minute to a frozen rank")
    except aiocomm.CommError as exc:
        say("SENDFAILED", type(exc).__name__, "after", sent, f"in {time.monotonic() - t0:.1f}s")
    if face == "cancel":
        try:
            aiocomm.send(np.zeros(1), 1, timeout=1)
            say("BAD the connection of a send cancelled halfway is still open")
        except aiocomm.CommError as exc:
            say("THEN", type(exc).__name__)
    os._exit(0)
elif mode == "noinbox":
    aiocomm.send(np.arange(3) + r, 1 - r)
    got = aiocomm.recv((3,), np.int64, 1 - r, timeout=30)
    say("OK" if np.array_equal(got, np.arange(3) + 1 - r) else "BAD", "INBOX", mesh.through_inbox)
else:
    raise SystemExit(f"unknown mode {mode}")
