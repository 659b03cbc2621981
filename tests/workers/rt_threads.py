"""Blocking calls from several threads (argv: shared | split | takeover).

shared:   4 threads on the world group; thread 0 makes the first call (so the
          same thread owns the group on both ranks), and stays alive until the
          others are done.  Threads 1-3 must be refused, never paired wrongly.
split:    the main thread makes one split group per thread; thread t uses
          only groups[t].
takeover: thread A uses the group and ends; thread B then uses it; then the
          main thread.
Each rank prints SUMMARY <json>.
"""

import json
import sys
import threading
import traceback

import numpy as np

import aiocomm

from rt_common import say

mode = sys.argv[1]
ITERS = 50
world = aiocomm.init()
r = world.rank()
stats = {t: {"ok": 0, "wrong": [], "refused": 0, "refusal_msgs": [], "commerror": [], "other": []} for t in range(4)}


def one_call(t: int, i: int, group) -> None:
    v = t * 1000 + i
    s = stats[t]
    try:
        y = aiocomm.all_sum(np.array([v], np.int64), group=group, timeout=10)
    except aiocomm.CommError as exc:
        s["commerror"].append(f"{type(exc).__name__}: {exc}"[:300])
        return
    except RuntimeError as exc:
        msg = str(exc)
        if "thread" in msg.lower():
            s["refused"] += 1
            if len(s["refusal_msgs"]) < 2:
                s["refusal_msgs"].append(msg[:300])
        else:
            s["other"].append(f"RuntimeError: {msg}"[:300])
        return
    except BaseException as exc:
        s["other"].append(f"{type(exc).__name__}: {exc}"[:300] + traceback.format_exc()[-500:])
        return
    if y.shape == (1,) and int(y[0]) == 2 * v:
        s["ok"] += 1
    else:
        s["wrong"].append((v, y.tolist()))


if mode == "shared":
    first_done = threading.Event()
    others_done = threading.Event()

    def owner() -> None:
        one_call(0, 0, None)
        first_done.set()
        for i in range(1, ITERS):
            one_call(0, i, None)
        others_done.wait(60)  # stay alive: the others use the group while it is owned

    def other(t: int) -> None:
        first_done.wait(60)
        for i in range(ITERS):
            one_call(t, i, None)

    threads = [threading.Thread(target=owner, daemon=True)]
    threads += [threading.Thread(target=other, args=(t,), daemon=True) for t in (1, 2, 3)]
    for th in threads:
        th.start()
    for th in threads[1:]:
        th.join(40)
    others_done.set()
    threads[0].join(40)
    alive = [th.name for th in threads if th.is_alive()]
elif mode == "split":
    groups = [world.split(0) for _ in range(4)]

    def worker(t: int) -> None:
        for i in range(ITERS):
            one_call(t, i, groups[t])

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(40)
    alive = [th.name for th in threads if th.is_alive()]
elif mode == "takeover":
    a = threading.Thread(target=lambda: [one_call(0, i, None) for i in range(5)], daemon=True)
    a.start()
    a.join(40)
    b = threading.Thread(target=lambda: [one_call(1, i, None) for i in range(5)], daemon=True)
    b.start()
    b.join(40)
    for i in range(5):  # the main thread, once A and B have ended
        one_call(2, i, None)
    alive = [th.name for th in (a, b) if th.is_alive()]
else:
    raise SystemExit(f"unknown mode {mode}")

say("SUMMARY " + json.dumps({"rank": r, "alive": alive, "stats": stats}))
say("DONE")
