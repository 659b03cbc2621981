"""Rank 0 starts a detached process (its own session) that keeps the rank's
stdout and stderr open for 60 s, then every rank exits 0."""

import os
import subprocess
import sys

marker = sys.argv[1]
if os.environ["AIOCOMM_RANK"] == "0":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker], start_new_session=True)
    print(f"detached {child.pid}", flush=True)
print("done", flush=True)
