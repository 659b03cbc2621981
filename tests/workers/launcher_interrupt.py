"""A rank that cleans up after Ctrl-C (no communication): ``MODE DIR``.

``finally``: on KeyboardInterrupt its ``finally`` takes a second, then writes
``DIR/rank-N`` (as saving a checkpoint would).  ``stubborn``: on the first
KeyboardInterrupt it says so, then ignores SIGINT and SIGTERM and sleeps
(only SIGKILL ends it).  ``ignore``: ignores SIGINT; SIGTERM ends it, saying so.

``--init`` (third argument): it joins the world first (``aiocomm.init()``,
so under ``--backend mpi`` it is an MPI process, finalized at exit), and in
``finally`` mode rank N takes 1 + N seconds: the ranks end one by one.
"""

import os
import signal
import sys
import time

mode, folder = sys.argv[1], sys.argv[2]
joins = "--init" in sys.argv[3:]
if joins:
    import aiocomm

    rank = str(aiocomm.init().rank())
else:
    rank = os.environ["AIOCOMM_RANK"]
if mode == "ignore":
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(_sig: int, _frame: object) -> None:
        print("got SIGTERM", flush=True)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
try:
    print(f"ready pid {os.getpid()}", flush=True)  # inside the try: a Ctrl-C right after it is still caught
    time.sleep(60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    if mode == "stubborn":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    raise
finally:
    if mode == "finally":
        time.sleep(1.0 + int(rank) * joins)
        with open(os.path.join(folder, f"rank-{rank}"), "w") as fh:
            fh.write("saved")
