"""The same measurement for the systems people would pick instead of aiocomm.

    torchrun --nproc-per-node 2 -m aiocomm.bench.peers gloo --sizes 64M
    mpirun -n 2 python -m aiocomm.bench.peers mpi --sizes 64M
    mlx.launch --backend ring -n 2 python -m aiocomm.bench.peers mlx --sizes 64M
    python -m aiocomm.bench.peers duplex --sizes 64M     (the physical reference, 2 processes)

Each prints one JSON object per size from rank 0, with the fields of
``python -m aiocomm.bench --json``: each iteration is timed on every rank,
the ranks' times are combined as ``--average`` says (their mean by
default), and the median over iterations is reported.
None of these systems is a dependency of aiocomm; a missing one fails here
with its ImportError, and the comparison script skips it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .run import AVERAGES, bus_factor, combine, iterations, parse_sizes


def _report(peer: str, op: str, ranks: int, nbytes: int, times: np.ndarray, correct: bool) -> None:
    med = float(np.median(times))
    algbw = nbytes / med / 1e9
    print(json.dumps({
        "peer": peer, "op": op, "ranks": ranks, "bytes": nbytes, "median_us": med * 1e6,
        "min_us": float(times.min()) * 1e6, "max_us": float(times.max()) * 1e6,
        "algbw_GBps": algbw, "busbw_GBps": algbw * bus_factor(op, ranks), "correct": correct,
    }), flush=True)


def _measure(run: Callable[[], Any], iters: int, warmup: int) -> tuple[np.ndarray, Any]:
    result = None
    for _ in range(warmup):
        result = run()
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        result = run()
        times[i] = time.perf_counter() - t0
    return times, result


def gloo(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    for nbytes in args.sizes:
        count = max(1, nbytes // 4)
        if args.op == "all_sum":
            x = torch.full((count,), float(rank + 1))

            def run() -> Any:
                y = x.clone()
                dist.all_reduce(y)
                return y

            times, y = _measure(run, *iterations(args, nbytes))
            ok = bool(torch.all(y == n * (n + 1) / 2))
        else:
            part = max(1, count // n)
            x = torch.full((part,), float(rank + 1))

            def run() -> Any:
                out = [torch.empty(part) for _ in range(n)]
                dist.all_gather(out, x)
                return out

            times, y = _measure(run, *iterations(args, nbytes))
            ok = all(bool(torch.all(t == k + 1)) for k, t in enumerate(y))
            nbytes = part * n * 4
        t = torch.tensor(times)
        per_rank = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(per_rank, t)
        if rank == 0:
            times = combine(torch.stack(per_rank).numpy(), args.average)
            _report("gloo", args.op, n, nbytes if args.op == "all_gather" else count * 4, times, ok)
    dist.destroy_process_group()


def mpi(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    for nbytes in args.sizes:
        count = max(1, nbytes // 4)
        if args.op == "all_sum":
            x = np.full(count, rank + 1, np.float32)
            y = np.empty_like(x)
            times, _ = _measure(lambda: comm.Allreduce(x, y, op=MPI.SUM), *iterations(args, nbytes))
            ok = bool(np.all(y == n * (n + 1) / 2))
            size = count * 4
        elif args.op == "broadcast":
            x = np.full(count, rank + 1, np.float32)
            y = np.empty_like(x)

            def bcast() -> None:
                y[:] = x  # as aiocomm's: the root's array is left as it was
                comm.Bcast(y, root=0)

            times, _ = _measure(bcast, *iterations(args, nbytes))
            ok = bool(np.all(y == 1))
            size = count * 4
        elif args.op == "sendrecv":  # as aiocomm.bench's blocking face: ranks paired up around the ring
            x = np.full(count, rank + 1, np.float32)
            y = np.empty_like(x)  # (an MPI program receives into memory it keeps; aiocomm's recv returns new memory)
            right, left = (rank + 1) % n, (rank - 1) % n

            def sendrecv() -> None:
                if rank % 2 == 0:
                    comm.Send(x, right)
                    comm.Recv(y, left)
                else:
                    comm.Recv(y, left)
                    comm.Send(x, right)

            times, _ = _measure(sendrecv, *iterations(args, nbytes))
            ok = bool(np.all(y == left + 1))
            size = count * 4
        else:
            part = max(1, count // n)
            x = np.full(part, rank + 1, np.float32)
            y = np.empty(part * n, np.float32)
            times, _ = _measure(lambda: comm.Allgather(x, y), *iterations(args, nbytes))
            ok = bool(np.array_equal(y, np.repeat(np.arange(1, n + 1), part).astype(np.float32)))
            size = part * n * 4
        per_rank = np.empty((n, times.size))
        comm.Allgather(times, per_rank)
        if rank == 0:
            _report("openmpi", args.op, n, size, combine(per_rank, args.average), ok)


def mlx(args: argparse.Namespace) -> None:
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    rank, n = group.rank(), group.size()
    for nbytes in args.sizes:
        count = max(1, nbytes // 4)
        if args.op == "all_sum":
            x = mx.full((count,), float(rank + 1))
            mx.eval(x)

            def run() -> Any:
                y = mx.distributed.all_sum(x)
                mx.eval(y)
                return y

            times, y = _measure(run, *iterations(args, nbytes))
            ok = bool(mx.all(y == n * (n + 1) / 2).item())
            size = count * 4
        else:
            part = max(1, count // n)
            x = mx.full((part,), float(rank + 1))
            mx.eval(x)

            def run() -> Any:
                y = mx.distributed.all_gather(x)
                mx.eval(y)
                return y

            times, y = _measure(run, *iterations(args, nbytes))
            ok = bool(np.array_equal(np.array(y), np.repeat(np.arange(1, n + 1), part).astype(np.float32)))
            size = part * n * 4
        per_rank = mx.distributed.all_gather(mx.array(times.reshape(1, -1)))
        # MLX is lazy: a rank that does not evaluate the gather never takes part
        # in it, and rank 0 then reads whatever the buffer held (times of -1e36 s).
        mx.eval(per_rank)
        if rank == 0:
            _report("mlx-ring", args.op, n, size, combine(np.array(per_rank), args.average), ok)


def _duplex_side(port: int, nbytes: int, iters: int, warmup: int, server: bool, cpus: tuple[int, ...] | None,
                 out: Any) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    if server:
        listener = socket.create_server(("127.0.0.1", port))
        conn, _ = listener.accept()
        listener.close()
    else:
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.01)
    send_buf = np.ones(nbytes, np.uint8)
    recv_buf = np.empty(nbytes, np.uint8)
    view = recv_buf.data

    def exchange() -> None:
        sender = threading.Thread(target=conn.sendall, args=(send_buf.data,))
        sender.start()
        got = 0
        while got < nbytes:
            got += conn.recv_into(view[got:], nbytes - got)
        sender.join()

    times, _ = _measure(exchange, iters, warmup)
    conn.close()
    out.put(times.tolist())


def duplex(args: argparse.Namespace) -> None:
    """Two processes each send and receive ``bytes`` at once over loopback with
    plain blocking sockets: what a 2-rank all_sum of that size must move."""
    ctx = multiprocessing.get_context("spawn")
    # The CPUs aiocomm-launch gives 2 ranks: its placement rule, from the
    # launcher's package as installed (mypy sees it as launcher/).
    from aiocomm_launch.placement import cpu_sets  # type: ignore[import-not-found,unused-ignore]

    placed = cpu_sets(2, "auto")
    for nbytes in args.sizes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=_duplex_side, args=(port, nbytes, *iterations(args, nbytes), side, cpus, q))
                 for side, cpus in zip((True, False), placed, strict=True)]
        for p in procs:
            p.start()
        results = [np.array(q.get(timeout=300)) for _ in procs]
        for p in procs:
            p.join()
        # 2-rank all_sum convention: busbw = bytes / time.
        _report("duplex-reference", "all_sum", 2, nbytes, combine(np.stack(results), args.average), True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiocomm.bench.peers")
    parser.add_argument("peer", choices=["gloo", "mpi", "mlx", "duplex"])
    parser.add_argument("--op", choices=["all_sum", "all_gather", "broadcast", "sendrecv"], default="all_sum")
    parser.add_argument("--sizes", default="64M")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--small-iters", type=int, default=500, help="timed iterations for sizes under 1 MiB")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--average", choices=list(AVERAGES), default="avg")
    args = parser.parse_args(argv)
    args.sizes = parse_sizes(args.sizes)
    {"gloo": gloo, "mpi": mpi, "mlx": mlx, "duplex": duplex}[args.peer](args)


if __name__ == "__main__":
    main()
