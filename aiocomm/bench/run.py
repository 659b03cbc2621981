"""Benchmark aiocomm's collectives with the conventions of nccl-tests.

    aiocomm-launch -n 2 python -m aiocomm.bench --op all_sum --sizes 8,1K,1M,64M

Per message size it prints the time per operation (median over iterations
after warm-up, min and max; an iteration's time combines the ranks' own
times as ``--average`` says: their mean by default, as nccl-tests'
``-a 1``, or the slowest rank's with ``--average max``),
algorithm bandwidth ``algbw = bytes / time``, bus bandwidth (``busbw``:
``algbw * 2(n-1)/n`` for all_sum, ``algbw * (n-1)/n`` for all_gather and
sum_scatter, where bytes is the whole gathered/input buffer; ``algbw`` for
sendrecv and broadcast, from rank 0), the payload bytes each rank put on the wire per operation relative
to the buffer, the peak RSS of the worst rank, and whether the result was
checked correct.  ``--json`` prints one JSON object per size instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import aio, portal
from ..wire import wire_dtype

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
SMALL = 1 << 20  # sizes below this are latency cases: more iterations


def _wire_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def iterations(args: argparse.Namespace, nbytes: int) -> tuple[int, int]:
    """Timed and warm-up iterations for one size (more for latency sizes)."""
    if nbytes < SMALL:
        return max(args.iters, args.small_iters), max(args.warmup, 20)
    return args.iters, args.warmup


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    unit = text[-1] if text and text[-1] in UNITS else ""
    return int(float(text[: len(text) - len(unit)]) * UNITS[unit])


def parse_sizes(text: str) -> list[int]:
    """Byte counts from a comma list such as ``8,1K,64M`` (empty items skipped)."""
    return [parse_size(s) for s in text.split(",") if s.strip()]


def check_sizes(sizes: list[int], dtype: np.dtype) -> str | None:
    """Why ``sizes`` cannot be measured in ``dtype`` (a size that is not a
    whole number of items would be silently rounded), or None."""
    item = dtype.itemsize
    for size in sizes:
        if size <= 0:
            return f"--sizes: {size} bytes: a size must be at least one {dtype} item ({item} bytes)"
        if size % item:
            lower, upper = size // item * item, -(-size // item) * item
            near = f"{lower} or {upper}" if lower else str(upper)
            return (f"--sizes: {size} bytes is not a whole number of {dtype} items ({item} bytes each); "
                    f"use {near}, or another --dtype")
    return None


def human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "" or n == int(n) else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


#: How one iteration's time is made from every rank's own time for it (nccl-tests' ``-a``).
AVERAGES = {"avg": "mean of the ranks", "max": "slowest rank", "min": "fastest rank", "rank0": "rank 0"}


def combine(per_rank: np.ndarray, how: str) -> np.ndarray:
    """Per-iteration times from a (ranks, iterations) table of each rank's own times."""
    times: np.ndarray
    if how == "avg":
        times = per_rank.mean(axis=0)
    elif how == "max":
        times = per_rank.max(axis=0)
    elif how == "min":
        times = per_rank.min(axis=0)
    elif how == "rank0":
        times = per_rank[0]
    else:
        raise ValueError(f"--average must be one of {', '.join(AVERAGES)}, got {how!r}")
    return times


def bus_factor(op: str, n: int) -> float:
    if op == "all_sum":
        return 2 * (n - 1) / n
    if op in ("all_gather", "sum_scatter"):
        return (n - 1) / n
    return 1.0


class Case:
    """One op at one size: inputs, the call, and the check of its result."""

    def __init__(self, op: str, nbytes: int, dtype: np.dtype, rank: int, size: int) -> None:
        self.op, self.rank, self.size = op, rank, size
        item = dtype.itemsize
        if op == "all_sum":
            count = max(1, nbytes // item)
        elif op in ("all_gather", "sum_scatter"):
            count = max(1, nbytes // item // size)  # per rank block
        else:
            count = max(1, nbytes // item)
        self.count = count
        if op == "sum_scatter":
            self.x = np.full(count * size, rank + 1, dtype)
        else:
            self.x = np.full(count, rank + 1, dtype)
        self.nbytes = {"all_gather": count * size * item, "sum_scatter": count * size * item}.get(op, count * item)

    async def run(self, blocking: bool) -> Any:
        import aiocomm

        face: Any = aiocomm if blocking else aio
        if self.op == "broadcast":
            return await _maybe(face.broadcast(self.x, 0))
        if self.op == "sendrecv":
            right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
            if blocking:  # the blocking face cannot overlap; pair ranks up instead
                if self.rank % 2 == 0:
                    aiocomm.send(self.x, right)
                    return aiocomm.recv_like(self.x, left)
                got = aiocomm.recv_like(self.x, left)
                aiocomm.send(self.x, right)
                return got
            _, got = await asyncio.gather(aio.send(self.x, right), aio.recv_like(self.x, left))
            return got
        return await _maybe(getattr(face, self.op)(self.x))

    def check(self, result: np.ndarray) -> bool:
        """Compare in 1 MiB slices, so the check adds no big temporary to the RSS."""
        n = self.size
        flat = result.reshape(-1)
        want: Callable[[int], Any]
        if self.op in ("all_sum", "sum_scatter"):
            if result.size != self.count:
                return False
            want = lambda start: n * (n + 1) // 2  # noqa: E731
        elif self.op == "broadcast":
            if result.size != self.count:
                return False
            want = lambda start: 1  # noqa: E731  (rank 0's value)
        elif self.op == "all_gather":
            if result.size != self.count * n:
                return False
            want = lambda start: np.arange(start, min(start + step, flat.size)) // self.count + 1  # noqa: E731
        else:
            want = lambda start: (self.rank - 1) % n + 1  # noqa: E731
        step = max(1, (1 << 20) // max(1, result.itemsize))
        return all(bool(np.all(flat[i : i + step] == want(i))) for i in range(0, flat.size, step))


def _transport(world: Any) -> str:
    """How this group's collectives moved: 'shm', 'tcp' or the backend's name."""
    backend = world.engine.backend
    if backend is None or backend.name != "ring":
        return backend.name if backend is not None else "none"
    state = world.handle
    return "shm" if state is not None and state.channel is not None else "tcp"


async def _maybe(value: Any) -> Any:
    if asyncio.iscoroutine(value):
        return await value
    return value


async def bench(args: argparse.Namespace) -> None:
    import aiocomm

    blocking = args.face == "blocking"
    world = aiocomm.init() if blocking else await aio.init()
    rank, n = world.rank(), world.size()
    mesh = world.engine.mesh
    dtype = wire_dtype(args.dtype)
    if rank == 0 and not args.json:
        print(f"# aiocomm.bench op={args.op} ranks={n} dtype={dtype} face={args.face} iters={args.iters} "
              f"(under 1 MiB: {iterations(args, 0)[0]}) warmup={args.warmup} average={args.average}")
        print(f"# {'bytes':>10} {'median_us':>11} {'min_us':>10} {'max_us':>10} {'algbw_GB/s':>10} "
              f"{'busbw_GB/s':>10} {'wire/buf':>8} {'rss_MiB':>8} correct")
    case = result = None
    for nbytes in args.sizes:
        case = result = None  # free the previous size's arrays before the next ones exist
        case = Case(args.op, nbytes, dtype, rank, n)
        if case.nbytes != nbytes and rank == 0 and not args.json:
            print(f"# {nbytes} bytes is not {n} equal blocks of {dtype}: measuring {case.nbytes} bytes", flush=True)
        ok = True
        iters, warmup = iterations(args, nbytes)
        for _ in range(warmup):
            ok &= case.check(await case.run(blocking))  # the output is freed at once
        sent0 = mesh.bytes_sent if mesh is not None else 0
        across0 = mesh.bytes_written_across if mesh is not None else 0
        inbox0 = mesh.through_inbox if mesh is not None else 0
        times = np.empty(iters)
        for i in range(iters):
            result = None  # free the last output first: RSS should show one op's memory
            t0 = time.perf_counter()
            result = await case.run(blocking)
            times[i] = time.perf_counter() - t0
        assert result is not None  # iters >= 1 (main() checks --iters)
        if args.transport == "shm" and args.op != "sendrecv" and _transport(world) != "shm":
            raise SystemExit(f"rank {rank}: --transport shm, but this group's collectives moved over "
                             f"{_transport(world)} (ranks on several hosts, or shared memory unavailable)")
        ok &= case.check(result)
        # bytes on the wire are counted by the ring's mesh only (NaN: not measured, e.g. on MPI)
        wire = ((mesh.bytes_sent - sent0) / iters / case.nbytes) if mesh is not None else float("nan")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary = np.array([rss, wire, 0.0 if ok else 1.0])
        rss, wire, bad = await _maybe((aiocomm.all_max if blocking else aio.all_max)(summary))
        per_rank = await _maybe((aiocomm.all_gather if blocking else aio.all_gather)(times.reshape(1, -1)))
        times = combine(per_rank, args.average)
        med = float(np.median(times))
        algbw = case.nbytes / med / 1e9
        row = {
            "op": args.op,
            "ranks": n,
            "bytes": case.nbytes,
            "requested_bytes": nbytes,
            "dtype": dtype.name,
            "face": args.face,
            # (messages: 'shm' when peers wrote payloads straight into this rank's memory, transport/cma.py,
            # or they came through its inbox, transport/inbox.py)
            "transport": (("shm" if mesh is not None and (mesh.bytes_written_across > across0
                                                          or mesh.through_inbox > inbox0) else "tcp")
                          if args.op == "sendrecv" and _transport(world) in ("shm", "tcp") else _transport(world)),
            "average": args.average,
            "median_us": med * 1e6,
            "min_us": float(times.min()) * 1e6,
            "max_us": float(times.max()) * 1e6,
            "algbw_GBps": algbw,
            "busbw_GBps": algbw * bus_factor(args.op, n),
            "wire_per_buffer": float(wire) if wire == wire else None,
            "peak_rss_MiB": float(rss),
            "correct": bool(bad == 0),
        }
        if rank == 0:
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"  {case.nbytes:>10} {row['median_us']:>11.1f} {row['min_us']:>10.1f} {row['max_us']:>10.1f} "
                    f"{row['algbw_GBps']:>10.3f} {row['busbw_GBps']:>10.3f} {_wire_text(row['wire_per_buffer']):>8} "
                    f"{row['peak_rss_MiB']:>8.0f} {'yes' if row['correct'] else 'NO'}",
                    flush=True,
                )
        if bad:
            raise SystemExit(f"rank {rank}: wrong result for {args.op} of {case.nbytes} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiocomm.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["all_sum", "all_gather", "sum_scatter", "sendrecv", "broadcast"],
                        default="all_sum")
    parser.add_argument("--sizes", default="8,1K,64K,1M,16M,64M", help="comma list of byte sizes (K, M, G suffixes)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per size")
    parser.add_argument("--small-iters", type=int, default=500,
                        help="timed iterations for sizes under 1 MiB "
                             "(latency: one slow wake-up must not be the median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--face", choices=["async", "blocking"], default="blocking")
    parser.add_argument("--average", choices=list(AVERAGES), default="avg",
                        help="an iteration's time from the ranks' own times: "
                             + ", ".join(f"{k} = {v}" for k, v in AVERAGES.items()) + " (default avg, as nccl-tests)")
    parser.add_argument("--transport", choices=["auto", "tcp", "shm"], default=None,
                        help="between ranks of one host: shared memory ('auto' and 'shm') or TCP "
                             "(sets AIOCOMM_TRANSPORT for this run; default: as AIOCOMM_TRANSPORT says)")
    parser.add_argument("--json", action="store_true", help="one JSON object per size")
    args = parser.parse_args(argv)
    if args.transport is not None:
        os.environ["AIOCOMM_TRANSPORT"] = "tcp" if args.transport == "tcp" else "auto"
    if args.iters < 1:
        parser.error(f"--iters {args.iters}: at least one timed iteration is needed")
    try:
        args.dtype = wire_dtype(args.dtype)
    except TypeError as exc:
        parser.error(f"--dtype {args.dtype}: {exc}")
    try:
        args.sizes = parse_sizes(args.sizes)
    except (ValueError, IndexError):
        parser.error(f"--sizes {args.sizes!r}: expected a comma list of byte counts such as 8,1K,64M")
    bad = check_sizes(args.sizes, args.dtype)
    if bad:
        parser.error(bad)
    if args.face == "blocking":
        # Plain-script conditions: no event loop runs in this thread.  With the
        # blocking face the coroutine never suspends, so step it by hand.
        coro = bench(args)
        try:
            coro.send(None)
        except StopIteration:
            pass
        else:  # pragma: no cover
            raise RuntimeError("the blocking benchmark suspended")
    else:
        loop = portal.new_event_loop()
        try:
            loop.run_until_complete(bench(args))
        finally:
            loop.close()

