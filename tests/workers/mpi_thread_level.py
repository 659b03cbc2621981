"""Start MPI with the thread level argv[1] (as a program may, through
mpi4py.rc), then ask aiocomm for the MPI backend: it must refuse, naming it."""

import sys

import mpi4py

mpi4py.rc.thread_level = sys.argv[1]

import aiocomm  # noqa: E402

try:
    aiocomm.init(backend="mpi")
except RuntimeError as exc:
    print("REFUSED", exc, flush=True)
else:
    print("ACCEPTED", flush=True)
