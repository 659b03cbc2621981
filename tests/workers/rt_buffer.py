"""Unposted receives are buffered only up to AIOCOMM_BUFFER_BYTES.

Rank 0 sends COUNT messages of SIZE bytes (message i filled with i+1); rank 1
sleeps, then receives and checks them all, and reports its peak RSS growth.
"""

import time

import numpy as np

import aiocomm

from rt_common import maxrss_kib, report, say

COUNT, SIZE = 12, 32 << 20


def intact(a: np.ndarray, value: int) -> bool:
    """Every byte equals ``value`` (checked in 1 MiB pieces: no 32 MiB temporary)."""
    step = 1 << 20
    return all(bool((a[j:j + step] == value).all()) for j in range(0, a.size, step))


world = aiocomm.init()
r = world.rank()
aiocomm.all_sum(np.ones(1, np.float32), timeout=30)
if r == 0:
    t0 = time.monotonic()
    try:
        for i in range(COUNT):
            aiocomm.send(np.full(SIZE, i + 1, np.uint8), 1)
            say(f"SENT {i} at {time.monotonic() - t0:.2f}s")
        say(f"ALL-SENT in {time.monotonic() - t0:.2f}s")
    except Exception as exc:
        report(exc, t0)
else:
    base = maxrss_kib()
    say(f"BASELINE-MAXRSS-KIB {base}")
    time.sleep(3)
    say(f"AFTER-SLEEP-MAXRSS-KIB {maxrss_kib()}")
    t0 = time.monotonic()
    good = 0
    try:
        for i in range(COUNT):
            a = aiocomm.recv((SIZE,), np.uint8, 0, timeout=60)
            if a.shape == (SIZE,) and intact(a, i + 1):
                good += 1
            else:
                say(f"WRONG message {i}: first {a[:4].tolist()} last {a[-4:].tolist()}")
            del a
        say(f"RECEIVED {good}/{COUNT} correct in {time.monotonic() - t0:.2f}s")
    except Exception as exc:
        report(exc, t0, good=good)
    say(f"PEAK-GROWTH-KIB {maxrss_kib() - base}")
say("DONE")
