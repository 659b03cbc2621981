"""Take part in one all_sum, then print the sum and each environment variable named in argv."""

import os
import sys

import numpy as np

import aiocomm

aiocomm.init(strict=True)
total = aiocomm.all_sum(np.array([1]))
print(f"SUM {total[0]}", flush=True)
for name in sys.argv[1:]:
    print(f"ENV {name}={os.environ.get(name, '<unset>')!r}", flush=True)
