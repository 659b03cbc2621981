"""send/recv between any two ranks, in order, for every dtype; usage errors."""

import numpy as np

import aiocomm

from common import DTYPES, check, data

world = aiocomm.init(strict=True)
n, r = world.size(), world.rank()
assert n == 4, n

# Non-neighbours 0 <-> 2, receiver first on one side, sender first on the other.
if r == 0:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert aiocomm.send(x, 2) is not None
    x[:] = -1  # allowed once send returned: the receiver must see the old values
    check(aiocomm.recv((5,), np.int32, 2), np.arange(5, dtype=np.int32) * 2, "0 <- 2")
elif r == 2:
    check(aiocomm.recv((3, 4), "float64", 0), np.arange(12, dtype=np.float64).reshape(3, 4), "2 <- 0")
    aiocomm.send(np.arange(5, dtype=np.int32) * 2, 0)

# Both directions at once between 1 and 3 (both send first, then receive).
if r in (1, 3):
    peer = 4 - r
    mine = np.full((1000, 33), r, np.float32)
    aiocomm.send(mine, peer)
    check(aiocomm.recv_like(mine, peer), np.full((1000, 33), peer, np.float32), f"{r} <- {peer}")

# Many messages between one pair arrive in order.
if r == 3:
    for i in range(300):
        aiocomm.send(np.full(i % 17, i, np.int64), 0)
elif r == 0:
    for i in range(300):
        check(aiocomm.recv((i % 17,), np.int64, 3), np.full(i % 17, i, np.int64), f"message {i}")

# Every dtype and shape, 1 -> 2 (neighbours) and 2 -> 0 (not).
for dtype in DTYPES:
    for shape in [(), (0,), (7,), (10, 3)]:
        if r == 1:
            aiocomm.send(data(1, shape, dtype), 2)
        elif r == 2:
            check(aiocomm.recv(shape, dtype, 1), data(1, shape, dtype), f"{dtype}{shape} 1->2")
            aiocomm.send(data(2, shape, dtype), 0)
        elif r == 0:
            check(aiocomm.recv_like(data(2, shape, dtype), 2), data(2, shape, dtype), f"{dtype}{shape} 2->0")

# A mismatched pair is an error naming both shapes, and the message stays for
# a receive that fits (a failed recv loses nothing).
if r == 0:
    aiocomm.send(np.zeros(3, np.float32), 1)
    aiocomm.send(np.zeros(2, np.int16), 1)
    aiocomm.send(np.ones(4, np.float32), 1)
elif r == 1:
    try:
        aiocomm.recv((4,), np.float32, 0)
    except aiocomm.MismatchError as exc:
        assert "(4,)" in str(exc) and "(3,)" in str(exc) and "rank 0" in str(exc), exc
    else:
        raise AssertionError("shape mismatch not detected")
    check(aiocomm.recv((3,), np.float32, 0), np.zeros(3, np.float32), "kept after a shape mismatch")
    try:
        aiocomm.recv((2,), np.float32, 0)
    except aiocomm.MismatchError as exc:
        assert "int16" in str(exc) and "float32" in str(exc), exc
    else:
        raise AssertionError("dtype mismatch not detected")
    check(aiocomm.recv((2,), np.int16, 0), np.zeros(2, np.int16), "kept after a dtype mismatch")
    check(aiocomm.recv((4,), np.float32, 0), np.ones(4, np.float32), "after mismatches")

# Usage errors raise before any traffic.
for bad in (n, -1, r):
    for call in (lambda: aiocomm.send(np.zeros(1), bad), lambda: aiocomm.recv((1,), np.float32, bad)):
        try:
            call()
        except ValueError as exc:
            assert str(bad) in str(exc), exc
        else:
            raise AssertionError(f"rank {bad} accepted")
try:
    aiocomm.send(np.array(["text"]), (r + 1) % n)
except TypeError as exc:
    assert "<U4" in str(exc) or "str" in str(exc), exc
else:
    raise AssertionError("string dtype accepted")

aiocomm.all_sum(np.zeros(1))  # everyone done before anyone exits
print("OK p2p", flush=True)
