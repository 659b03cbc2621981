"""Peak memory of large all_sums on aiocomm's MPI backend.

    mpirun -n 2 python -m aiocomm.bench.mpi_memory --size 512M

Rank 0 prints its peak RSS (``ru_maxrss``) above what it had before the
input existed, beside input + output: the budget is input + output + 64 MiB.
"""

from __future__ import annotations

import argparse
import resource

import numpy as np

import aiocomm

from .run import parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512M", help="bytes of the float32 input (K, M, G suffixes)")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    world = aiocomm.init(strict=True, backend="mpi")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    x = np.ones(parse_size(args.size) // 4, np.float32)
    for _ in range(args.calls):
        y = aiocomm.all_sum(x)
        assert y[0] == world.size()
        del y
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if world.rank() == 0:
        print(f"{world.size()} ranks, all_sum of {x.nbytes >> 20} MiB: peak {peak - start:.0f} MiB above the start, "
              f"input + output {2 * x.nbytes >> 20} MiB", flush=True)


if __name__ == "__main__":
    main()
