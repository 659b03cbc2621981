"""Form the world from whatever started this process; report one all_sum."""

import numpy as np

import aiocomm

world = aiocomm.init(strict=True)
total = aiocomm.all_sum(np.array([world.rank() + 1]))
gathered = aiocomm.all_gather(np.array([world.rank()]))
print(f"JOINED {world.rank()} {world.size()} {total[0]} {gathered.tolist()}", flush=True)
