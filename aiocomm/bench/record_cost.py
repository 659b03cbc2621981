"""What the record of recent operations (aiocomm.trace) costs per call.

    python -m aiocomm.bench.record_cost [--calls 20000] [--runs 5]

Times a blocking ``all_sum`` of one float on a world of size 1 (the call's
own path, no peer) in fresh processes, with the record on (the default
buffer) and off (``AIOCOMM_TRACE_BUFFER=0``), the two kinds of run taking
turns, and prints each run's median per call and the difference of the
medians.  The issue's limit is 1 us per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_CHILD = """
import sys, time
import numpy as np
import aiocomm
calls = int(sys.argv[1])
x = np.ones(1, np.float32)
for _ in range(2000):
    aiocomm.all_sum(x)
times = []
for _ in range(calls // 100):
    t = time.perf_counter()
    for _ in range(100):
        aiocomm.all_sum(x)
    times.append((time.perf_counter() - t) / 100)
times.sort()
print(times[len(times) // 2] * 1e6)
"""


def run(calls: int, buffer: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIOCOMM_", "MLX_", "OMPI_", "PMI"))}
    if buffer is not None:
        env["AIOCOMM_TRACE_BUFFER"] = buffer
    out = subprocess.run([sys.executable, "-c", _CHILD, str(calls)], env=env, check=True, capture_output=True,
                         text=True, timeout=300)
    return float(out.stdout.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiocomm.bench.record_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    on: list[float] = []
    off: list[float] = []
    for _ in range(args.runs):
        on.append(run(args.calls, None))
        off.append(run(args.calls, "0"))
    print("record on  (us per call): " + ", ".join(f"{v:.2f}" for v in on))
    print("record off (us per call): " + ", ".join(f"{v:.2f}" for v in off))
    diff = statistics.median(on) - statistics.median(off)
    print(f"cost of the record: {diff:.2f} us per call (median on {statistics.median(on):.2f} - "
          f"median off {statistics.median(off):.2f}; limit 1 us)")


if __name__ == "__main__":
    main()
