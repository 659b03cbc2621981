"""Print the job token this rank got, then wait so the test can look at every process."""

import os
import time

print(f"TOKEN {os.environ['AIOCOMM_TOKEN']}", flush=True)
time.sleep(3)
