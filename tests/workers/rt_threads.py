"""Blocking calls from several threads (argv: split | takeover).  Overlap
on one group is tested by threads_serialized.py.

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


if mode == "split":
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
