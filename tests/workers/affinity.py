"""Print the CPUs this rank may run on (no communication)."""

import os

print("cpus", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
