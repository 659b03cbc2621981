"""The sender dies halfway through a 256 MiB message.

Rank 1 tells rank 0 it is ready and posts the receive; rank 0 waits for the
test's "go", then sends.  The test freezes rank 1 (so the transfer stalls
with only what fits in the socket buffers delivered), kills rank 0, and
thaws rank 1, whose receive must then fail naming rank 0.
"""

import time

import numpy as np

import aiocomm

from rt_common import report, say, wait_go

N = 256 << 20
world = aiocomm.init()
r = world.rank()
aiocomm.all_sum(np.ones(1, np.float32), timeout=30)
if r == 1:
    aiocomm.send(np.array([1], np.int64), 0, timeout=30)
    say("POSTING")
    t0 = time.monotonic()
    try:
        a = aiocomm.recv((N,), np.uint8, 0)
        say(f"RESULT received {a.nbytes} bytes")
    except Exception as exc:
        report(exc, t0)
else:
    aiocomm.recv((1,), np.int64, 1, timeout=30)
    say("GOT-READY")
    x = np.zeros(N, np.uint8)
    wait_go()
    say("SENDING")
    aiocomm.send(x, 1)
    say("SENT")
say("DONE")
