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
fail first, often a victim); when no rank started at all (mpirun refused the
job), it says so, quoting mpirun's reason.

A job on this host alone may have more ranks than the host has cores, as on
the ring: Open MPI refuses that unless told, so the launcher passes
``--oversubscribe`` then, unless the user's mpirun arguments speak of slots or
oversubscription themselves.

A signal to the launcher reaches the ranks first, through their relays,
and mpirun only after ``--interrupt-grace`` or a second signal (see
:class:`_Grace`), as on the ring; before every relay has noted its start,
and for a job on other hosts, mpirun gets it at once.

``--on-failure continue`` asks Open MPI's mpirun to keep the other ranks
running when one fails (``--enable-recovery``).  mpirun then exits 0 however
the ranks ended, so the launcher reads how each ended from its relay's notes:
a thread follows them in the order they were written, says at once which
rank was lost (:class:`.blame.CarryOn`, as on the ring), stops the job on a
failure it does not carry on after (as mpirun would have), and the job gets
the status the ring backend would give it.  The notes are on this host
only, so the launcher refuses the choice for a job on other hosts, and for
an mpirun that is not Open MPI's.
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
import threading
import time
from collections.abc import Sequence
from typing import IO

from .agent import die_with_parent
from .blame import CarryOn, RankOutcome, decide, ended_clause, loss_report, summary
from .hosts import Host, is_local
from .job import COLLECT, INTERRUPT_GRACE
from .placement import usable_cpus

# Runs one rank (argv[2:]); tags its output lines with its MPI rank when
# argv[1] is "tag"; notes that it started and how it ended in
# AIOCOMM_FAILURE_FILE, if set (a SIGTERM or SIGHUP from mpirun is passed on,
# and the rank noted as stopped; with AIOCOMM_TRACE_DIR, a SIGTERM after the
# rank got SIGUSR1 and wrote its record, or 1.5 s; SIGUSR1 is passed on); exits as the rank did.  A relay whose rank
# failed waits (up to HOLD seconds) before it exits while another rank that
# ended its program is still in MPI_Finalize: mpirun ends the whole job as
# soon as it sees a failed rank, and that rank's finalize completes only once
# the others are gone, so without the wait mpirun would end it before its
# relay saw its status (raise SystemExit(3): the job's status is its 3).
# A relay whose rank ended after the launcher passed it a signal (see
# _Grace; the launcher made the file AIOCOMM_FAILURE_FILE.interrupted first)
# waits, until a second signal, for the other ranks to end: mpirun would
# stop them as soon as it saw the first one's status.
RELAY = r"""
import json, os, signal, subprocess, sys, threading, time
rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK") if v in os.environ), "?")
tag = b"[rank " + rank.encode() + b"] " if sys.argv[1] == "tag" else b""
path = os.environ.get("AIOCOMM_FAILURE_FILE")
HOLD = 2.0
def note(**fields):
    if path and rank.isdigit():
        try:
            with open(path, "a") as f:
                f.write(json.dumps(dict(rank=int(rank), **fields)) + "\n")
        except OSError:
            pass
def where():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() + " " + os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
stopped = []
trace = os.environ.get("AIOCOMM_TRACE_DIR")
def ask_record():
    since = time.time()
    until = time.monotonic() + 1.5
    try:
        proc.send_signal(signal.SIGUSR1)
    except OSError:
        return
    while time.monotonic() < until and proc.poll() is None:
        try:
            if os.stat(os.path.join(trace, "rank-" + rank + ".jsonl")).st_mtime >= since - 0.05:
                return
        except OSError:
            pass
        time.sleep(0.02)
def stop(sig, frame):
    stopped.append(sig)
    if trace and len(stopped) == 1 and sig == signal.SIGTERM:
        ask_record()
    try:
        proc.send_signal(sig)
    except OSError:
        pass
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, stop)
signal.signal(signal.SIGUSR1, lambda sig, frame: proc.send_signal(sig))
note(started=True, pid=os.getpid(), where=where())  # (after the handlers: the launcher may signal it from now on)
def pump(src, dst):
    for line in iter(src.readline, b""):
        dst.write(tag + (line if line.endswith(b"\n") else line + b"\n"))
        dst.flush()
pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout.buffer)),
         threading.Thread(target=pump, args=(proc.stderr, sys.stderr.buffer))]
for t in pumps: t.start()
code = proc.wait()
note(exit=code, stopped=bool(stopped), at=time.monotonic())
def running(key):
    try:
        with open(path) as f:
            notes = [json.loads(line) for line in f]
        return {n["rank"] for n in notes if n.get(key)} - {n["rank"] for n in notes if "exit" in n}
    except (OSError, ValueError, TypeError, KeyError):
        return set()
hold = time.monotonic() + HOLD
while path and code != 0 and not stopped and time.monotonic() < hold and running("left"):
    time.sleep(0.01)
while path and code != 0 and len(stopped) == 1 and os.path.exists(path + ".interrupted") and running("started"):
    time.sleep(0.02)
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
    if getattr(args, "on_failure", "stop") == "continue":
        cmd += ["--enable-recovery"]  # Open MPI: a rank that fails does not end the others
    if not all(is_local(host) for host in hosts):
        cmd += ["--host", ",".join(f"{host.ssh.split('@')[-1]}:{args.n}" for host in hosts)]
    user = shlex.split(args.mpirun_args)
    if all(is_local(host) for host in hosts) and total > host_slots("--use-hwthread-cpus" in user) \
            and not says_slots(user, env) and is_open_mpi(mpirun):
        cmd += ["--oversubscribe"]  # more ranks than cores here: fine, as on the ring
    for key in env:
        cmd += ["-x", key]  # exported from mpirun's own environment: the value never on a command line
    if args.cwd:
        cmd += ["-wdir", args.cwd]
    cmd += user
    if args.prefix or "AIOCOMM_FAILURE_FILE" in env:
        cmd += [args.python, "-I", "-S", "-c", RELAY, "tag" if args.prefix else "plain"]
    return cmd + list(rank_argv)


def host_slots(hwthreads: bool = False) -> int:
    """This host's slots as Open MPI counts them by default: the cores among
    the CPUs this process may use (their hardware threads with ``hwthreads``)."""
    cpus = usable_cpus()
    if hwthreads:
        return len(cpus)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:  # no topology to read: count the CPU as a core
            cores.add(("cpu", str(cpu)))
    return max(len(cores), 1)


# mpirun options (and MCA settings) that decide the slots or oversubscription themselves.
SLOT_OPTIONS = ("-H", "-host", "--host", "-hostfile", "--hostfile", "-machinefile", "--machinefile",
                "-default-hostfile", "--default-hostfile")


def says_slots(user_args: Sequence[str], env: dict[str, str]) -> bool:
    """Whether the user's mpirun arguments (or MCA environment) say how many
    slots there are or whether to oversubscribe: then the launcher does not."""
    if any("oversubscribe" in word.lower() or word.partition("=")[0] in SLOT_OPTIONS for word in user_args):
        return True
    return any("oversubscribe" in key.lower() for key in (*os.environ, *env) if key.startswith("OMPI_MCA_"))


def is_open_mpi(mpirun: str) -> bool:
    """Whether ``mpirun`` is Open MPI's (MPICH's oversubscribes without being asked)."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def check_on_failure(args: argparse.Namespace, hosts: Sequence[Host]) -> None:
    """Refuse ``--on-failure continue`` where the launcher cannot keep its promise."""
    if getattr(args, "on_failure", "stop") != "continue":
        return
    if not all(is_local(host) for host in hosts):
        raise SystemExit("aiocomm-launch: --backend mpi --on-failure continue needs every rank on this host: mpirun "
                         "--enable-recovery keeps the other ranks running but exits 0 however they end, and the "
                         "launcher learns how each rank ended only from notes written on this host (the ring "
                         "backend, the default, carries on across hosts)")
    mpirun = shutil.which(args.mpirun)
    if mpirun is not None and not is_open_mpi(mpirun):
        raise SystemExit(f"aiocomm-launch: --backend mpi --on-failure continue needs Open MPI's mpirun, which keeps "
                         f"the other ranks running with --enable-recovery; {mpirun} is not Open MPI's")


def run(args: argparse.Namespace, rank_argv: Sequence[str], hosts: Sequence[Host], extra: dict[str, str]) -> int:
    check_on_failure(args, hosts)
    if not all(is_local(host) for host in hosts):  # the ranks' notes would be on other hosts
        return _run(args, rank_argv, hosts, extra, None)
    janitor = None
    try:
        with tempfile.TemporaryDirectory(prefix="aiocomm-mpi-") as tmp:
            reports = os.path.join(tmp, "failures.jsonl")
            trace = extra.get("AIOCOMM_TRACE_DIR") or os.environ.get("AIOCOMM_TRACE_DIR") or os.path.join(tmp, "trace")
            janitor = _Janitor(tmp)
            return _run(args, rank_argv, hosts, dict(extra, AIOCOMM_FAILURE_FILE=reports, AIOCOMM_TRACE_DIR=trace),
                        reports, janitor)
    finally:
        if janitor is not None:
            janitor.done()


def _run(args: argparse.Namespace, rank_argv: Sequence[str], hosts: Sequence[Host], extra: dict[str, str],
         reports: str | None, janitor: _Janitor | None = None) -> int:
    cmd = mpirun_argv(args, rank_argv, hosts, extra)
    env = dict(os.environ, **extra)
    if args.verbose:
        print(f"aiocomm-launch: {shlex.join(cmd)}", file=sys.stderr)
    # For a job on this host, mpirun's stderr (its own reports, the ranks'
    # stderr) passes through the launcher, which keeps its start: mpirun's
    # reason when it refuses the job before any rank starts.
    # (no thread of the launcher's runs yet, so preexec_fn is safe; mpirun
    # stops its ranks on SIGTERM, so a launcher killed outright leaves none)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM),
                            stderr=subprocess.PIPE if reports is not None else None)
    if janitor is not None:
        janitor.watch(proc.pid)
    head = bytearray()
    copier = None
    if proc.stderr is not None:
        copier = threading.Thread(target=_copy, args=(proc.stderr, head), daemon=True)
        copier.start()
    received: list[int] = []
    carry_on = getattr(args, "on_failure", "stop") == "continue" and reports is not None
    size = args.n * max(len(hosts), 1)
    watcher = None
    if carry_on:
        assert reports is not None
        watcher = _LossWatcher(reports, size, hosts[0].ssh if hosts else "this host", proc.pid)

    grace = _Grace(getattr(args, "interrupt_grace", INTERRUPT_GRACE))

    def forward(sig: int, _frame: object) -> None:
        """SIGINT, SIGTERM or SIGHUP to the launcher.  The first goes to the
        ranks, through their relays, if their notes name them (a job on this
        host), and mpirun gets it only once the grace has passed (see
        :class:`_Grace`); otherwise, and at a second one, mpirun's whole
        group gets it at once, and mpirun stops the ranks (it runs in a
        session of its own, so nothing outlives the launcher)."""
        received.append(sig)
        relays = _relay_pids(reports, size) if reports is not None and len(received) == 1 else None
        if relays is not None and grace.seconds > 0:
            assert reports is not None
            with contextlib.suppress(OSError), open(reports + ".interrupted", "w"):
                pass
            grace.start(sig)
            for pid in relays:
                with contextlib.suppress(ProcessLookupError):
                    if os.getsid(pid) == proc.pid:  # (still a relay in mpirun's session, not a pid used again)
                        os.kill(pid, sig)
            return
        grace.until = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = _wait(proc, args.timeout, reports, size, grace)
        if received:
            return 128 + received[0]
        if code is None:  # it hung once its ranks had ended: their notes give the status (reports is set)
            assert reports is not None
            code = 1 if not carry_on and decide(read_outcomes(reports, size)).cause is not None else 0
    except subprocess.TimeoutExpired:
        asked = None
        if "AIOCOMM_TRACE_DIR" in extra:  # mpirun passes SIGUSR1 to the ranks: they write their record
            asked = time.time()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.5)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _join(copier)
        if watcher is not None:
            watcher.stop()
        lost = bool(watcher and watcher.carry_on.lost)
        _print_verdict(extra, since=asked if lost else None, carried_on=lost)
        print(f"aiocomm-launch: job timed out after {args.timeout:g}s", file=sys.stderr)
        return 124
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        _join(copier)
        if watcher is not None:
            watcher.stop()
    if carry_on:  # mpirun --enable-recovery exits 0 however the ranks ended: their notes tell
        assert reports is not None and watcher is not None
        outcomes = read_outcomes(reports, size)
        if any(outcome.started for outcome in outcomes.values()):
            for rank in watcher.carry_on.lost:
                outcomes[rank].lost = True
            verdict = decide(outcomes)
            if verdict.cause is not None:
                _print_verdict(extra, carried_on=bool(watcher.carry_on.lost))
            if verdict.cause is not None or verdict.lost:
                print(f"aiocomm-launch: {summary(outcomes, verdict)}", file=sys.stderr)
            if verdict.cause is not None or code == 0:
                return verdict.status
    if code == 0:
        return 0
    status = code if code > 0 else 128 - code
    _print_verdict(extra)
    if reports is not None:
        outcomes = read_outcomes(reports, size)
        if not any(outcome.started for outcome in outcomes.values()):
            print(f"aiocomm-launch: mpirun failed before any rank started (status {status}): "
                  f"{mpirun_reason(bytes(head))}", file=sys.stderr)
            return status
        verdict = decide(outcomes)
        if verdict.cause is not None:
            print(f"aiocomm-launch: {summary(outcomes, verdict)}", file=sys.stderr)
            return verdict.status
    print(f"aiocomm-launch: mpirun exited with status {status} (a rank failed; mpirun's report is above)",
          file=sys.stderr)
    return status


class _Grace:
    """The ranks' time to end on their own after a signal to the launcher
    (``--interrupt-grace``), as on the ring: mpirun would stop them at once
    (its SIGTERM ends a Python program without its ``finally``), so the
    first signal goes to the relays, which pass it on to their ranks, and
    mpirun gets it :attr:`seconds` later if the job is still running.  (The
    first rank to end exits non-zero, and mpirun would stop the others at
    that: its relay waits for them, see ``RELAY``.)"""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.until: float | None = None  # when mpirun gets the signal
        self.signal = 0

    def start(self, sig: int) -> None:
        self.until, self.signal = time.monotonic() + self.seconds, sig

    def due(self, proc: subprocess.Popen[bytes]) -> float:
        """Signal mpirun if the grace has passed; the seconds until it does."""
        if self.until is None:
            return float("inf")
        left = self.until - time.monotonic()
        if left <= 0:
            self.until = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self.signal)
            return float("inf")
        return left


def _wait(proc: subprocess.Popen[bytes], timeout: float | None, reports: str | None, size: int,
          grace: _Grace | None = None) -> int | None:
    """mpirun's status (``TimeoutExpired`` after ``timeout`` seconds); None if
    it had not exited :data:`HUNG_AFTER` seconds after every rank's relay
    ended, and the launcher killed it (a job on this host: the relays' notes
    name their pids).  Open MPI 4.1.4's mpirun now and then deadlocks in its
    own finalize (``PMIx_server_finalize``) once its ranks are gone, SIGTERM
    ignored; without this the launcher would wait for it for good."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ended_at: float | None = None
    last: tuple[int, bool] = (-1, False)
    pids: list[int] | None = None  # every relay's, once all noted their start
    while True:
        wait = 0.25 if grace is None else min(0.25, grace.due(proc))
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout or 0)
            wait = min(wait, left)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=wait)
        if reports is None:
            continue
        if pids is None:
            pids = _relay_pids(reports, size)
        if pids is None or not _ended(pids):
            ended_at = None
            continue
        activity = _activity(proc.pid)
        if ended_at is None or activity != last or activity[1]:  # (still writing the ranks' output: not hung)
            ended_at, last = time.monotonic(), activity
        elif time.monotonic() - ended_at >= HUNG_AFTER:
            print(f"aiocomm-launch: mpirun did not exit {HUNG_AFTER:g} s after every rank had ended (Open MPI's "
                  "mpirun can hang in its own finalize); the launcher killed it, and the ranks' own ends give "
                  "the job's status", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


#: Seconds mpirun gets to exit after every rank's relay has ended, while it
#: writes nothing and waits to write nothing.
HUNG_AFTER = 5.0


# Removes the launcher's folder of notes (argv[1]) once the launcher has
# ended (its stdin's EOF) and mpirun (the pid and start time on its first
# line) is gone too, or after 60 s: a launcher killed outright cannot.
JANITOR = r"""
import os, shutil, sys, time
folder, first = sys.argv[1], sys.stdin.readline().split()
sys.stdin.read()
def alive(pid, start):
    try:
        with open("/proc/" + pid + "/stat") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and fields[19] == start
until = time.monotonic() + 60
while len(first) == 2 and alive(*first) and time.monotonic() < until:
    time.sleep(0.1)
shutil.rmtree(folder, ignore_errors=True)
if len(first) == 2 and not alive(*first):  # Open MPI's session folder of that mpirun, if it left it
    import glob, tempfile
    for left in glob.glob(os.path.join(tempfile.gettempdir(), "ompi.*", "pid." + first[0])):
        shutil.rmtree(left, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(left))  # (only if no other mpirun's is in it)
        except OSError:
            pass
"""


class _Janitor:
    """A small process that removes the folder of the ranks' notes (see
    ``JANITOR``) if the launcher is killed outright (SIGKILL): it cannot
    then remove it itself, and mpirun and its ranks outlive it by a moment
    (they end on its death, see ``die_with_parent``).  Once mpirun has
    ended it also removes Open MPI's session folder of that mpirun
    (``$TMPDIR/ompi.HOST.UID/pid.PID``), which an mpirun stopped by SIGTERM
    left once in a full run of the test suite (session 20)."""

    def __init__(self, folder: str) -> None:
        self._proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", JANITOR, folder], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def watch(self, pid: int) -> None:
        """Wait for process ``pid`` (mpirun) to end, too, before removing the folder."""
        assert self._proc.stdin is not None
        with contextlib.suppress(OSError):
            self._proc.stdin.write(f"{pid} {_started(pid)}\n".encode())
            self._proc.stdin.flush()

    def done(self) -> None:
        """The launcher removed the folder itself: let the janitor go."""
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)


def _started(pid: int) -> str:
    """When process ``pid`` started (field 22 of its ``/proc/PID/stat``): tells it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2 :].split()[19]
    except (OSError, IndexError):
        return "?"


def _where() -> str:
    """This host's boot and pid namespace, as a relay notes its own (their pids are comparable if equal)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() + " " + os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _activity(pid: int) -> tuple[int, bool]:
    """Bytes process ``pid`` has written so far, and whether one of its
    threads waits to write (a reader of the job's output that is slow or
    paused): a mpirun that still passes the ranks' output on is not hung."""
    written, writing = -1, False
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/io") as f:
            written = next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            wchan = ""  # (a thread that ended meanwhile)
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/wchan") as f:
                wchan = f.read()
            if "write" in wchan or wchan == "wait_woken":
                writing = True
    return written, writing


def _relay_pids(path: str, size: int) -> list[int] | None:
    """The pids of the ``size`` ranks' relays, from their start notes; None
    until each has noted its start, or if one noted it on another host or in
    another pid namespace (a rank placed elsewhere through ``--mpirun-args``,
    notes on a shared directory: its pid means nothing here)."""
    here = _where()
    pids: dict[int, int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    note = json.loads(line)
                    if note.get("started") and "pid" in note:
                        if not here or note.get("where") != here:
                            return None
                        pids[int(note["rank"])] = int(note["pid"])
    except OSError:
        return None
    return list(pids.values()) if len(pids) >= size else None


def _ended(pids: list[int]) -> bool:
    """Whether each of these processes has ended (gone, or a zombie its
    parent, mpirun, does not reap)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone
        if stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X"):
            return False
    return True


def _print_verdict(extra: dict[str, str], since: float | None = None, carried_on: bool = False) -> None:
    """The verdict of the ranks' records (aiocomm.trace), before the launcher's own last line."""
    from .cli import print_trace_verdict

    sys.stderr.flush()
    print_trace_verdict(extra.get("AIOCOMM_TRACE_DIR"), since, carried_on)


class _LossWatcher:
    """Follows the relays' notes while the job runs (``--on-failure continue``):
    says on the launcher's stderr, at once, which rank was lost
    (:class:`.blame.CarryOn`); on a failure the job does not carry on after,
    stops the job as mpirun would without ``--enable-recovery``: SIGTERM to
    mpirun's group (``mpirun``: its pid) once the others had ``COLLECT``
    seconds to end on their own."""

    INTERVAL = 0.1

    def __init__(self, path: str, size: int, host: str, mpirun: int) -> None:
        self.path = path
        self.host = host
        self.mpirun = mpirun
        self.carry_on = CarryOn(range(size))
        self._stop_timer: threading.Timer | None = None
        self._offset = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aiocomm-losses", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following (mpirun has ended: its pid must not be signalled any more)."""
        if not self._done.is_set():
            self._done.set()
            self._thread.join(5)
            if self._stop_timer is not None:
                self._stop_timer.cancel()
            self._look()  # the notes written last

    def _stop_job(self) -> None:
        if not self._done.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mpirun, signal.SIGTERM)

    def _run(self) -> None:
        while not self._done.wait(self.INTERVAL):
            self._look()

    def _look(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only
        self._offset += end
        for raw in data[:end].splitlines():
            try:
                note = json.loads(raw)
                rank = int(note["rank"])
                if note.get("left"):
                    self.carry_on.left(rank)
                    continue
                code = int(note["exit"])
            except (ValueError, KeyError, TypeError):
                continue
            stopped = bool(note.get("stopped"))
            if self.carry_on.ended(rank, code, stopped):
                text = loss_report(rank, self.host, ended_clause(code)) + "\n"
                with contextlib.suppress(OSError):
                    os.write(sys.stderr.fileno(), text.encode(errors="replace"))  # one write: not cut by mpirun's
            elif code != 0 and not stopped and self.carry_on.running and self._stop_timer is None \
                    and not self._done.is_set():
                self._stop_timer = threading.Timer(COLLECT, self._stop_job)
                self._stop_timer.daemon = True
                self._stop_timer.start()


HEAD_BYTES = 64 * 1024  # of mpirun's stderr, kept for its reason


def _copy(pipe: IO[bytes], head: bytearray) -> None:
    """mpirun's stderr to the launcher's, as it comes; its first bytes into ``head``."""
    out = sys.stderr.fileno()
    while chunk := os.read(pipe.fileno(), 65536):
        if len(head) < HEAD_BYTES:
            head += chunk[:HEAD_BYTES - len(head)]
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(out, view):]
        except OSError:  # the launcher's stderr is gone: keep draining, so mpirun never blocks on it
            pass
    pipe.close()


def _join(copier: threading.Thread | None) -> None:
    if copier is not None:
        copier.join(timeout=5)  # (a process mpirun left behind may hold the pipe open)


def mpirun_reason(text: bytes) -> str:
    """The first paragraph of mpirun's first report (Open MPI frames each
    between lines of dashes), or its first line, as one line."""
    lines = [line.strip() for line in text.decode(errors="replace").splitlines()]
    if any(line.startswith("-----") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("-----")) + 1
        lines = lines[start:]
    paragraph: list[str] = []
    for line in lines:
        if line.startswith("-----") or (not line and paragraph):
            break
        if line:
            paragraph.append(line)
    reason = " ".join(paragraph) or "(mpirun gave no reason)"
    return reason if len(reason) <= 300 else reason[:297] + "..."


def read_outcomes(path: str, size: int) -> dict[int, RankOutcome]:
    """How each rank ended, from the relays' notes and the runtime's failure
    records in ``path``; a rank with no note was ended by mpirun (stopped), a
    rank whose relay noted no start never started."""
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
        if note.get("started"):
            outcome.started = True
        elif "exit" in note:
            outcome.code = int(note["exit"])
            outcome.stopped = bool(note.get("stopped"))
            outcome.ended_at = float(note.get("at", outcome.ended_at))
        elif note.get("left"):
            outcome.left = True
        elif note.get("recovered"):  # (it carried on in a shrunken group: a fresh start)
            outcome.records.clear()
        else:
            outcome.records.append(note)
    for outcome in outcomes.values():
        if outcome.left and (outcome.code is None or outcome.stopped):  # ended by mpirun while it finalized
            outcome.code, outcome.stopped = 0, False
    return outcomes
