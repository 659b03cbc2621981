"""Two ranks make a few calls (collectives on the world and on a split,
send/recv), say READY with their pid, and wait for argv[1] to exist (the
test sends SIGUSR1 meanwhile); then one more all_sum, and OK."""

import os
import sys
import time

import numpy as np

import aiocomm

world = aiocomm.init(strict=True)
rank = world.rank()
for _ in range(3):
    aiocomm.all_sum(np.arange(5, dtype=np.int32))
sub = world.split(0)
aiocomm.all_gather(np.zeros((2, 3), np.float64), group=sub)
if rank == 0:
    aiocomm.send(np.ones(7, np.uint8), 1)
else:
    aiocomm.recv((7,), np.uint8, 0)
print(f"READY {os.getpid()}", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.05)
aiocomm.all_sum(np.ones(1))
print("OK", flush=True)
