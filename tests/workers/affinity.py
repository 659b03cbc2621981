"""Print the CPUs this rank may run on and its scheduling policy (no communication)."""

import os

print("cpus", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
print("batch", os.sched_getscheduler(0) == os.SCHED_BATCH)
