"""A recv that raises MismatchError loses nothing (argv: early|late shape|dtype).

early: the message is already here when the wrong recv is posted.
late:  the wrong recv is posted before the message comes.
"""

import sys
import time

import numpy as np

import aiocomm

from rt_common import report, say

order, kind = sys.argv[1], sys.argv[2]
world = aiocomm.init()
r = world.rank()
aiocomm.all_sum(np.ones(1, np.float32), timeout=30)
if r == 0:
    if order == "late":
        time.sleep(0.5)
    aiocomm.send(np.arange(4, dtype=np.float32), 1, timeout=20)
    aiocomm.send(np.arange(10, 14, dtype=np.float32), 1, timeout=20)
    say("SENT")
else:
    if order == "early":
        time.sleep(0.5)
    wrong = ((5,), np.float32) if kind == "shape" else ((4,), np.int32)
    try:
        got = aiocomm.recv(*wrong, 0, timeout=10)
        say(f"RESULT wrong recv returned {got.tolist()}")
    except Exception as exc:
        report(exc, tag="wrong", mismatch=isinstance(exc, aiocomm.MismatchError))
    for want in (np.arange(4, dtype=np.float32), np.arange(10, 14, dtype=np.float32)):
        try:
            got = aiocomm.recv((4,), np.float32, 0, timeout=5)
            say(f"GOT {got.tolist()} WANT {want.tolist()} {'MATCH' if np.array_equal(got, want) else 'DIFFER'}")
        except Exception as exc:
            report(exc, tag="right")
# the world still works for both
try:
    y = aiocomm.all_sum(np.ones(1, np.float32), timeout=10)
    say(f"FINAL all_sum {y.tolist()}")
except Exception as exc:
    report(exc, tag="final")
say("DONE")
