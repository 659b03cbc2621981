"""Blocking calls from threads under MPI's serialized rule (argv: mode).

Runs under aiocomm-launch (the ring) and under mpirun (the MPI backend).
Every result is checked against numpy; each rank prints ``OK threads
<mode> ...`` when all its checks held.

after_main: the main thread calls init() and one all_sum, then a worker
            thread calls all_gather, then send/recv, while the main thread
            waits in join(); then the main thread calls again.
executor:   an asyncio program hands 50 blocking all_sums to the loop's
            default executor (successive calls land on different threads).
pool1:      a ThreadPoolExecutor(max_workers=1) overlaps communication with
            the main thread's compute, after the main thread's first call.
handlers:   8 handler threads answer 120 requests one at a time, a lock held
            around each call; the n-th call of every rank pairs with the
            n-th call of the others, whichever thread makes it.
overlap:    200 tries, each on a fresh split group: 4 threads per rank call
            all_sum at once, so calls overlap on purpose.  One rank starts
            its threads only once every other rank has seen an overlap (it
            is told by a message on the world): until then the others'
            first calls cannot complete, so their later threads overlap
            them for sure, however loaded the machine (without it, a loaded
            machine ran the threads one after another on every rank: calls
            the program did not order, which pair arbitrarily).  Every rank
            must raise in every try, the overlapping caller with
            RuntimeError naming both threads; no call may return a wrong
            sum.
dead:       a thread's call times out and the thread ends; another thread
            then uses the group (no claim is left behind).
"""

import asyncio
import concurrent.futures
import random
import sys
import threading
import time

import numpy as np

import aiocomm

mode = sys.argv[1]
world = aiocomm.init()
r, n = world.rank(), world.size()
assert n >= 2, n
backend = world.engine.backend.name


def expect_sum(values_by_rank: list[np.ndarray], got: np.ndarray, what: str) -> None:
    want = np.sum(values_by_rank, axis=0)
    assert got.dtype == want.dtype and np.array_equal(got, want), f"rank {r}: {what}: got {got}, want {want}"


def contribution(call: int, rank: int) -> np.ndarray:
    return np.arange(5, dtype=np.int64) * (rank + 1) + call * 1000


first = aiocomm.all_sum(np.array([r + 1.0]))
assert first[0] == n * (n + 1) / 2, first
note = ""

if mode == "after_main":
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            g = aiocomm.all_gather(np.array([r, r * 10], np.int32))
            want = np.array([[k, k * 10] for k in range(n)], np.int32).reshape(-1)
            assert np.array_equal(g, want), g
            aiocomm.send(np.full(3, r, np.float32), (r + 1) % n)
            got = aiocomm.recv((3,), np.float32, (r - 1) % n)
            assert np.all(got == (r - 1) % n), got
            box["ok"] = True
        except BaseException as exc:  # reported by the main thread
            box["error"] = exc

    t = threading.Thread(target=worker, name="worker")
    t.start()
    t.join(60)
    assert not t.is_alive(), "the worker hung"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    again = aiocomm.all_max(np.array([r]))
    assert again[0] == n - 1, again
elif mode == "executor":
    async def main() -> int:
        loop = asyncio.get_running_loop()
        threads = set()

        def call(i: int) -> np.ndarray:
            threads.add(threading.current_thread().name)
            return aiocomm.all_sum(contribution(i, r))

        for i in range(50):
            # a short task beside each call keeps the pool's threads taking turns
            got, _ = await asyncio.gather(loop.run_in_executor(None, call, i),
                                          loop.run_in_executor(None, time.sleep, 0.002))
            expect_sum([contribution(i, k) for k in range(n)], got, f"call {i}")
        return len(threads)

    used = asyncio.run(main())
    assert used >= 2, f"rank {r}: the default executor ran all 50 calls on one thread; the test proves nothing"
    note = f"threads={used}"
elif mode == "pool1":
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(aiocomm.all_sum, contribution(0, r))
        for i in range(1, 20):
            busy = np.linalg.norm(np.random.default_rng(i).random((64, 64)))  # compute beside the call
            assert busy > 0
            got = pending.result(60)
            expect_sum([contribution(i - 1, k) for k in range(n)], got, f"call {i - 1}")
            pending = pool.submit(aiocomm.all_sum, contribution(i, r))
        expect_sum([contribution(19, k) for k in range(n)], pending.result(60), "call 19")
    scattered = aiocomm.sum_scatter(np.ones((2 * n, 3)))  # the main thread again
    assert scattered.shape == (2, 3) and np.all(scattered == n), scattered
elif mode == "handlers":
    lock = threading.Lock()
    counter = [0]
    wrong: list[str] = []
    served = {t: 0 for t in range(8)}

    def handler(t: int) -> None:
        while True:
            with lock:  # one request at a time, as an RPC server's handlers do
                i = counter[0]
                if i >= 120:
                    return
                counter[0] = i + 1
                got = aiocomm.all_sum(contribution(i, r), timeout=30)
            served[t] += 1
            want = np.sum([contribution(i, k) for k in range(n)], axis=0)
            if not np.array_equal(got, want):
                wrong.append(f"request {i} on thread {t}: {got} != {want}")
            time.sleep(random.random() * 0.001)

    threads = [threading.Thread(target=handler, args=(t,), name=f"handler-{t}") for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "a handler hung"
    assert not wrong, wrong[:3]
    assert counter[0] == 120, counter
    note = f"threads_used={sum(1 for v in served.values() if v)}"
elif mode == "overlap":
    tries = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    wrong = []
    runtime_errors = commerrors = oks = 0
    named_both = 0
    for attempt in range(tries):
        g = world.split(0)
        late = attempt % n  # this rank starts its threads later, so the early ranks' calls overlap for sure
        start = threading.Barrier(4)
        outcome: list[str] = []

        def racer(t: int, g: aiocomm.Group, start: threading.Barrier, outcome: list[str], attempt: int) -> None:
            global named_both
            mine = np.array([(t + 1) * 10 ** r], np.int64)  # which thread on which rank: a mispairing shows
            start.wait(10)
            try:
                got = aiocomm.all_sum(mine, group=g, timeout=20)
            except RuntimeError as exc:
                text = str(exc)
                if f"racer-{t}" in text and text.count("'racer-") == 2 and "split" in text and "lock" in text:
                    named_both += 1
                outcome.append("runtime")
            except aiocomm.CommError:
                outcome.append("comm")
            else:
                want = sum((t + 1) * 10 ** k for k in range(n))
                outcome.append("ok" if int(got[0]) == want else "wrong")
                if int(got[0]) != want:
                    wrong.append(f"try {attempt} thread {t}: {int(got[0])} != {want}")

        if r == late:  # once every other rank has seen its threads overlap
            for k in range(n):
                if k != r:
                    aiocomm.recv((1,), np.int64, k, timeout=30)
        threads = [threading.Thread(target=racer, args=(t, g, start, outcome, attempt), name=f"racer-{t}")
                   for t in range(4)]
        for th in threads:
            th.start()
        if r != late:
            deadline = time.monotonic() + 30
            while "runtime" not in outcome and time.monotonic() < deadline:
                time.sleep(0.001)
            assert "runtime" in outcome, f"try {attempt}: rank {r}: no thread overlapped in 30 s: {outcome}"
            aiocomm.send(np.array([attempt], np.int64), late)
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), f"try {attempt}: a thread hung"
        assert "wrong" not in outcome, wrong
        assert any(o in ("runtime", "comm") for o in outcome), f"try {attempt}: rank {r} raised nothing: {outcome}"
        runtime_errors += outcome.count("runtime")
        commerrors += outcome.count("comm")
        oks += outcome.count("ok")
    assert not wrong, wrong[:3]
    assert runtime_errors and named_both == runtime_errors, (runtime_errors, named_both)
    check = aiocomm.all_sum(np.array([1]))  # the world itself is intact
    assert check[0] == n, check
    note = f"tries={tries} runtime={runtime_errors} comm={commerrors} ok={oks} wrong=0"
elif mode == "dead":
    g = world.split(0)
    if r == 0:
        errors: list[BaseException] = []

        def lonely() -> None:
            try:
                aiocomm.all_sum(np.ones(2), group=g, timeout=0.5)  # rank 1 never joins this one
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=lonely, name="lonely")
        t.start()
        t.join(30)
        assert errors and isinstance(errors[0], aiocomm.CommTimeoutError), errors
    # A fresh group: the first one broke (rank 0 gave up on it).  The thread
    # that used the world last has ended; another thread takes it over.
    h = world.split(1)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("y", aiocomm.all_sum(np.arange(3) + r, group=h)))
    t.start()
    t.join(30)
    expect_sum([np.arange(3) + k for k in range(n)], box["y"], "after a dead thread")
    # (rank 1 never used g: on rank 1, g's calls were never made)
else:
    raise SystemExit(f"unknown mode {mode}")

print(f"OK threads {mode} backend={backend} {note}", flush=True)
