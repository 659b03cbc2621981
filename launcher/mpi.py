"""``aiocomm-launch --backend mpi``: start the job under ``mpirun``, as
``mlx.launch --backend mpi`` does.

mpirun starts the ranks (they form their world with the MPI backend), routes
stdin to rank 0 and stops the job when a rank fails; its exit status is the
failing rank's.  The launcher keeps its own promises on top: each output
line tagged ``[rank N]`` (a small relay around each rank, started by mpirun,
tags whole lines), ``--timeout`` (status 124), and the job's status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

from .hosts import Host, is_local

# Runs each rank and tags its output lines with its MPI rank; exits as the rank did.
TAG_LINES = r"""
import os, subprocess, sys, threading
rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK") if v in os.environ), "?")
tag = b"[rank " + rank.encode() + b"] "
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
def pump(src, dst):
    for line in iter(src.readline, b""):
        dst.write(tag + (line if line.endswith(b"\n") else line + b"\n"))
        dst.flush()
pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout.buffer)),
         threading.Thread(target=pump, args=(proc.stderr, sys.stderr.buffer))]
for t in pumps: t.start()
code = proc.wait()
for t in pumps: t.join()
sys.exit(code if code >= 0 else 128 - code)
"""


def mpirun_argv(args: argparse.Namespace, rank_argv: Sequence[str], hosts: Sequence[Host],
                env: dict[str, str]) -> list[str]:
    """The mpirun command line for ``args`` (``-n`` ranks per host, ``env`` exported to every rank)."""
    mpirun = shutil.which(args.mpirun)
    if mpirun is None:
        raise SystemExit(f"aiocomm-launch: --backend mpi needs {args.mpirun!r} (Open MPI or MPICH) on PATH")
    total = args.n * max(len(hosts), 1)
    cmd = [mpirun, "-n", str(total)]
    if not all(is_local(host) for host in hosts):
        cmd += ["--host", ",".join(f"{host.ssh.split('@')[-1]}:{args.n}" for host in hosts)]
    for key in env:
        cmd += ["-x", key]  # exported from mpirun's own environment: the value never on a command line
    if args.cwd:
        cmd += ["-wdir", args.cwd]
    cmd += shlex.split(args.mpirun_args)
    if args.prefix:
        cmd += [args.python, "-I", "-S", "-c", TAG_LINES]
    return cmd + list(rank_argv)


def run(args: argparse.Namespace, rank_argv: Sequence[str], hosts: Sequence[Host], extra: dict[str, str]) -> int:
    cmd = mpirun_argv(args, rank_argv, hosts, extra)
    env = dict(os.environ, **extra)
    if args.verbose:
        print(f"aiocomm-launch: {shlex.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    received: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        """SIGINT, SIGTERM or SIGHUP to the launcher: to mpirun's whole group
        (mpirun runs in a session of its own, so nothing outlives the launcher)."""
        received.append(sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait(timeout=args.timeout)
        if received:
            return 128 + received[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"aiocomm-launch: job timed out after {args.timeout:g}s", file=sys.stderr)
        return 124
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if code != 0:
        status = code if code > 0 else 128 - code
        print(f"aiocomm-launch: mpirun exited with status {status} (a rank failed; mpirun's report is above)",
              file=sys.stderr)
        return status
    return 0
