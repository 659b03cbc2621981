"""Take part in one all_sum, print the sum, this rank's pid and each
environment variable named in argv; with ``--sleep S`` first, then sleep S seconds."""

import os
import sys
import time

import numpy as np

import aiocomm

names = sys.argv[1:]
pause = 0.0
if names[:1] == ["--sleep"]:
    pause, names = float(names[1]), names[2:]
aiocomm.init(strict=True)
total = aiocomm.all_sum(np.array([1]))
print(f"SUM {total[0]} pid {os.getpid()}", flush=True)
for name in names:
    print(f"ENV {name}={os.environ.get(name, '<unset>')!r}", flush=True)
time.sleep(pause)
