"""Echo every line of stdin with this rank's number, then the count at EOF.

argv[1] (optional) names a rank that reads nothing and ends at once.
"""

import sys

import aiocomm

world = aiocomm.init()
rank = world.rank()
if len(sys.argv) > 1 and int(sys.argv[1]) == rank:
    print(f"SKIPPED {rank}", flush=True)
    raise SystemExit(0)
count = 0
for line in sys.stdin:
    count += 1
    if count <= 5:
        print(f"GOT {rank} {line.rstrip()}", flush=True)
print(f"EOF {rank} after {count} lines", flush=True)
