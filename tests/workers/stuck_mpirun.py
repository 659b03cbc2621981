"""A stand-in for Open MPI's ``mpirun`` that never exits once its ranks have
ended, as a real one does now and then when it deadlocks in its own
``PMIx_server_finalize`` (seen with Open MPI 4.1.4: every rank's relay had
exited, mpirun's main thread waited in ``orte_finalize`` for good and
ignored SIGTERM).  It answers ``--version`` as Open MPI's, starts the
``-n`` ranks' command (what follows the relay's ``python -I -S -c``) with
``OMPI_COMM_WORLD_RANK`` set, waits for them, then waits forever, SIGTERM
ignored."""

import os
import signal
import subprocess
import sys
import time

argv = sys.argv[1:]
if "--version" in argv:
    print("mpirun (Open MPI) 4.1.4")
    sys.exit(0)
size = int(argv[argv.index("-n") + 1])
at = next(i for i in range(2, len(argv)) if argv[i] == "-c" and argv[i - 2:i] == ["-I", "-S"])
command = argv[at - 3:]
signal.signal(signal.SIGTERM, signal.SIG_IGN)
ranks = [subprocess.Popen(command, env=dict(os.environ, OMPI_COMM_WORLD_RANK=str(r))) for r in range(size)]
for rank in ranks:
    rank.wait()
while True:
    time.sleep(60)
