"""First contact with a dead, frozen or departed peer.

argv: mode victim
  kill-allsum / stop-allsum: the victim SIGKILLs / SIGSTOPs itself after a
      ring-neighbour sync; once the test says "go" the others all_sum (with
      4 ranks recursive doubling pairs ranks 1 and 3, which never talked).
  exit-send / kill-send: the victim exits cleanly / SIGKILLs itself after the
      sync; on "go" rank 0 sends to the victim until that raises.
  member-gather: the world splits by rank parity; the victim, a member of its
      half, calls nothing more and SIGKILLs itself 1 s later, after the
      others of its half have sent to it and wait for one another (some of
      them never talked to the victim); the other half all_sums on its own.
"""

import os
import signal
import sys
import time

import numpy as np

import aiocomm

from rt_common import report, ring_sync, say, wait_go

mode, victim = sys.argv[1], int(sys.argv[2])
world = aiocomm.init()
r = world.rank()
ring_sync(world)
say("SYNCED")

if mode == "member-gather":
    half = world.split(r % 2)
    if r == victim:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        y = aiocomm.all_gather(np.ones(4, np.float32), group=half, timeout=30)  # (a ring, on TCP too)
        say(f"RESULT {y.tolist()}")
    except Exception as exc:
        report(exc, t0)
    say("DONE")
    sys.exit(0)

if r == victim:
    if mode.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode.startswith("stop"):
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(600)  # never gets here until SIGCONT; the test kills it
    sys.exit(0)  # exit-send: a plain, clean exit

wait_go()
if mode.endswith("allsum"):
    t0 = time.monotonic()
    try:
        y = aiocomm.all_sum(np.ones(4, np.float32))
        say(f"RESULT {y.tolist()}")
    except Exception as exc:
        report(exc, t0)
elif r == 0:
    t0 = time.monotonic()
    x = np.ones(4, np.float32)
    n = 0
    try:
        while time.monotonic() - t0 < 400:
            aiocomm.send(x, victim)
            n += 1
            time.sleep(0.05)
        say(f"RESULT {n} sends succeeded")
    except Exception as exc:
        report(exc, t0, sends_before=n)
else:
    sys.stdin.read()  # an idle bystander until the test closes stdin
say("DONE")
