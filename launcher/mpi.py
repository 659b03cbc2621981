"""``aiocomm-launch --backend mpi``: start the job under ``mpirun``, as
``mlx.launch --backend mpi`` does.

mpirun starts the ranks (they form their world with the MPI backend), routes
stdin to rank 0 and stops the job when a rank fails.  The launcher keeps its
own promises on top, through a small relay around each rank (started by
mpirun): each output line tagged ``[rank N]`` (whole lines), ``--timeout``
(status 124), and -- for a job on this host -- the blame: each relay notes
how its rank ended in the job's ``AIOCOMM_FAILURE_FILE``, beside the
runtime's failure records, and :mod:`.blame` names the rank that caused the
failure and gives the job its status (mpirun reports whichever rank it saw
fail first, often a victim).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from .blame import RankOutcome, decide, summary
from .hosts import Host, is_local

# Runs one rank (argv[2:]); tags its output lines with its MPI rank when
# argv[1] is "tag"; notes how it ended in AIOCOMM_FAILURE_FILE, if set (a
# SIGTERM or SIGHUP from mpirun is passed on, and the rank noted as stopped);
# exits as the rank did.
RELAY = r"""
import json, os, signal, subprocess, sys, threading, time
rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK") if v in os.environ), "?")
tag = b"[rank " + rank.encode() + b"] " if sys.argv[1] == "tag" else b""
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
stopped = []
def stop(sig, frame):
    stopped.append(sig)
    try:
        proc.send_signal(sig)
    except OSError:
        pass
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, stop)
def pump(src, dst):
    for line in iter(src.readline, b""):
        dst.write(tag + (line if line.endswith(b"\n") else line + b"\n"))
        dst.flush()
pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout.buffer)),
         threading.Thread(target=pump, args=(proc.stderr, sys.stderr.buffer))]
for t in pumps: t.start()
code = proc.wait()
path = os.environ.get("AIOCOMM_FAILURE_FILE")
if path and rank.isdigit():
    line = json.dumps({"rank": int(rank), "exit": code, "stopped": bool(stopped), "at": time.monotonic()})
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass
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
    if args.prefix or "AIOCOMM_FAILURE_FILE" in env:
        cmd += [args.python, "-I", "-S", "-c", RELAY, "tag" if args.prefix else "plain"]
    return cmd + list(rank_argv)


def run(args: argparse.Namespace, rank_argv: Sequence[str], hosts: Sequence[Host], extra: dict[str, str]) -> int:
    if not all(is_local(host) for host in hosts):  # the ranks' notes would be on other hosts
        return _run(args, rank_argv, hosts, extra, None)
    with tempfile.TemporaryDirectory(prefix="aiocomm-mpi-") as tmp:
        reports = os.path.join(tmp, "failures.jsonl")
        return _run(args, rank_argv, hosts, dict(extra, AIOCOMM_FAILURE_FILE=reports), reports)


def _run(args: argparse.Namespace, rank_argv: Sequence[str], hosts: Sequence[Host], extra: dict[str, str],
         reports: str | None) -> int:
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
    if code == 0:
        return 0
    if reports is not None:
        outcomes = read_outcomes(reports, args.n * max(len(hosts), 1))
        verdict = decide(outcomes)
        if verdict.cause is not None:
            print(f"aiocomm-launch: {summary(outcomes, verdict)}", file=sys.stderr)
            return verdict.status
    status = code if code > 0 else 128 - code
    print(f"aiocomm-launch: mpirun exited with status {status} (a rank failed; mpirun's report is above)",
          file=sys.stderr)
    return status


def read_outcomes(path: str, size: int) -> dict[int, RankOutcome]:
    """How each rank ended, from the relays' notes and the runtime's failure
    records in ``path``; a rank with no note was ended by mpirun (stopped)."""
    outcomes = {rank: RankOutcome(rank, stopped=True) for rank in range(size)}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            note = json.loads(line)
            outcome = outcomes[int(note["rank"])]
        except (ValueError, KeyError, TypeError):
            continue
        if "exit" in note:
            outcome.code = int(note["exit"])
            outcome.stopped = bool(note.get("stopped"))
            outcome.ended_at = float(note.get("at", outcome.ended_at))
        elif note.get("left"):
            outcome.left = True
        else:
            outcome.records.append(note)
    for outcome in outcomes.values():
        if outcome.left and (outcome.code is None or outcome.stopped):  # ended by mpirun while it finalized
            outcome.code, outcome.stopped = 0, False
    return outcomes
