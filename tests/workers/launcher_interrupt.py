"""A rank that cleans up after Ctrl-C (no communication): ``MODE DIR``.

``finally``: on KeyboardInterrupt its ``finally`` takes a second, then writes
``DIR/rank-N`` (as saving a checkpoint would).  ``stubborn``: on the first
KeyboardInterrupt it says so, then ignores SIGINT and SIGTERM and sleeps
(only SIGKILL ends it).  ``ignore``: ignores SIGINT; SIGTERM ends it, saying so.
"""

import os
import signal
import sys
import time

mode, folder = sys.argv[1], sys.argv[2]
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
        time.sleep(1.0)
        with open(os.path.join(folder, f"rank-{rank}"), "w") as fh:
            fh.write("saved")
