"""Porting an mx.distributed script: every call, with its MLX original above it.

    aiocomm-launch -n 4 examples/port_from_mlx.py

The port is the import and the array type; names and arguments stay.
"""

# import mlx.core as mx
import numpy as np

import aiocomm

# mx.distributed.is_available()
assert aiocomm.is_available()

# world = mx.distributed.init()
world = aiocomm.init()
rank, size = world.rank(), world.size()

# x = mx.ones((4,)) * rank
x = np.ones(4, np.float32) * rank

# mx.distributed.all_sum(x)
s = aiocomm.all_sum(x)
assert np.all(s == sum(range(size)))

# mx.distributed.all_max(x) / all_min(x)
assert np.all(aiocomm.all_max(x) == size - 1) and np.all(aiocomm.all_min(x) == 0)

# mx.distributed.all_gather(x)            -> shape (4 * size,)
g = aiocomm.all_gather(x)
assert g.shape == (4 * size,)

# mx.distributed.sum_scatter(mx.ones((2 * size, 3)))
part = aiocomm.sum_scatter(np.ones((2 * size, 3), np.float32))
assert part.shape == (2, 3) and np.all(part == size)

# mx.distributed.send(x, dst) / recv(shape, dtype, src) / recv_like(x, src)
# (MLX's ring backend only reaches neighbours; aiocomm reaches any rank.)
if size >= 2:
    if rank == 0:
        aiocomm.send(x + 100, size - 1)
    elif rank == size - 1:
        got = aiocomm.recv_like(x, 0)          # or aiocomm.recv((4,), np.float32, 0)
        assert np.all(got == 100)

# sub = world.split(color, key)            (not available on MLX's ring backend)
sub = world.split(rank % 2)
evens_and_odds = aiocomm.all_sum(np.array([1]), group=sub)
assert evens_and_odds[0] == sub.size()

# mx.eval(...) has no counterpart: numpy results are already computed.
if rank == 0:
    print(f"ported: every mx.distributed call ran on {size} ranks")
