"""aiocomm's MPI backend beside raw mpi4py, in the same job.

    mpirun -n 2 python -m aiocomm.bench.mpi_compare --sizes 8,1M,64M

For each size it alternates blocks of ``aiocomm.all_sum`` (world formed with
``backend="mpi"``) and raw ``comm.Allreduce`` (mpi4py, preallocated output,
``COMM_WORLD``) on the same buffers, so both see the same machine state, and
prints the median time per operation of each (mean of the ranks per
iteration, as nccl-tests' ``-a 1``) and their ratio (``raw / aiocomm``:
1.0 means no overhead).  aiocomm's figure includes what the backend adds:
the signature agreement before each collective (a reduction of up to 56
bytes is done within it), the result's array, the step driver and, from
256 KiB on, aiocomm's own ring (recursive halving on a power of two
ranks) of nonblocking sends and receives in place of MPI's reduction, with
the verdict in the tags of its last half's messages.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import aiocomm

from .run import parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,1M,64M", help="bytes per buffer, comma-separated (K, M, G suffixes)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per block for sizes >= 1 MiB")
    parser.add_argument("--small-iters", type=int, default=2000, help="timed iterations per block below 1 MiB")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per size")
    args = parser.parse_args()

    world = aiocomm.init(strict=True, backend="mpi")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n, r = world.size(), world.rank()
    if r == 0:
        library = MPI.Get_library_version().splitlines()[0]
        print(f"# aiocomm MPI backend vs raw mpi4py Allreduce, {n} ranks, float32, {library}")
        print(f"# {'bytes':>10} {'aiocomm_us':>11} {'raw_us':>9} {'raw/aiocomm':>11}")
    for size in (parse_size(s) for s in args.sizes.split(",")):
        x = np.ones(max(size // 4, 1), np.float32)
        out = np.empty_like(x)
        iters = args.small_iters if size < (1 << 20) else args.iters
        ours: list[float] = []
        raw: list[float] = []
        for _ in range(3):  # warm-up
            aiocomm.all_sum(x)
            comm.Allreduce(x, out)
        for _ in range(args.blocks):
            for record, run in ((ours, lambda: aiocomm.all_sum(x)), (raw, lambda: comm.Allreduce(x, out))):
                for _ in range(iters):
                    comm.Barrier()
                    t = time.perf_counter()
                    run()
                    record.append(time.perf_counter() - t)
        mean_ours = comm.allreduce(np.median(ours)) / n
        mean_raw = comm.allreduce(np.median(raw)) / n
        if r == 0:
            print(f"  {size:>10} {mean_ours * 1e6:>11.1f} {mean_raw * 1e6:>9.1f} {mean_raw / mean_ours:>11.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
