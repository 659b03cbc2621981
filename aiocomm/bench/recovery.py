"""How long survivors take to carry on: from a rank's SIGKILL, in the middle
of a stream of all_sums, to the first all_sum of the shrunken group.

    python -m aiocomm.bench.recovery [--ranks 4,8] [--runs 5]

starts each job with ``aiocomm-launch -n N --on-failure continue`` and prints,
per group size, the time of each run and the median (the slowest survivor's
time in each run).  The last rank kills itself at an instant every rank
agreed on beforehand (one host: one monotonic clock).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np


def rank_main(size_bytes: int) -> None:
    import aiocomm

    world = aiocomm.init()
    rank, n = world.rank(), world.size()
    x = np.ones(max(1, size_bytes // 4), np.float32)
    for _ in range(20):  # warm: connections, shared memory
        aiocomm.all_sum(x)
    kill_at = float(aiocomm.broadcast(np.array([time.monotonic() + 0.3]), 0)[0])
    group = world
    if rank == n - 1:
        while time.monotonic() < kill_at:
            aiocomm.all_sum(x)
        os.kill(os.getpid(), signal.SIGKILL)
    calls = 0
    while True:
        try:
            aiocomm.all_sum(x, group=group, timeout=30)
            calls += 1
        except aiocomm.CommError:
            break
    group = world.shrink(timeout=30)
    aiocomm.all_sum(x, group=group, timeout=30)
    took = time.monotonic() - kill_at
    slowest = float(aiocomm.all_max(np.array([took]), group=group)[0])
    if group.rank() == 0:
        print(json.dumps({"ranks": n, "survivors": group.size(), "seconds": slowest, "calls": calls}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiocomm.bench.recovery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="4,8", help="group sizes, comma-separated (default 4,8)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bytes", type=int, default=4096, help="size of each all_sum (default 4096)")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_main:
        rank_main(args.bytes)
        return
    print(f"time from a SIGKILL to a working shrunken group (all_sum of {args.bytes} B in a loop; "
          f"aiocomm-launch --on-failure continue)")
    for n in [int(r) for r in args.ranks.split(",")]:
        times = []
        for _ in range(args.runs):
            cmd = [sys.executable, "-m", "launcher", "-n", str(n), "--on-failure", "continue", sys.executable,
                   "-m", "aiocomm.bench.recovery", "--rank-main", "--bytes", str(args.bytes)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            rows = [json.loads(line.split("] ", 1)[-1]) for line in proc.stdout.splitlines()
                    if line.split("] ", 1)[-1].startswith("{")]
            if proc.returncode != 0 or not rows:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            times.append(rows[0]["seconds"])
        shown = ", ".join(f"{1e3 * t:.1f}" for t in times)
        print(f"{n} ranks: {shown} ms (median {1e3 * statistics.median(times):.1f} ms)", flush=True)


if __name__ == "__main__":
    main()
