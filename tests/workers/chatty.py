"""Many lines from every rank at once, each written in pieces."""

import sys

import aiocomm

r = aiocomm.init().rank()
for i in range(200):
    sys.stdout.write(f"line {i} ")
    sys.stdout.write(f"from {r} end\n")
    sys.stdout.flush()
