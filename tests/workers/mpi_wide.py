"""Another MPI worker (argv[1], its arguments after it) as groups of more
than ``collectives.GATHER_UP_TO`` ranks run: the agreement is a 16-byte
all-reduce of the call's hash and carries no input, so every collective
takes its own MPI call after it."""

import runpy
import sys
from pathlib import Path

from aiocomm.backends.mpi import collectives

collectives.GATHER_UP_TO = 1
script = str(Path(__file__).with_name(sys.argv[1]))
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
