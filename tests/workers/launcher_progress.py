"""A tqdm-like progress bar on stderr (carriage returns), between plain lines."""

import os
import sys
import time

rank = os.environ["AIOCOMM_RANK"]
print(f"before {rank}", flush=True)
for i in range(21):
    sys.stderr.write(f"\rprogress {i * 5:3d}%|{'#' * i}{' ' * (20 - i)}|")
    sys.stderr.flush()
    time.sleep(0.01)
sys.stderr.write("\n")
sys.stderr.flush()
print(f"after {rank}", flush=True)
