"""Run the ranks of one job, watch them, and stop them all when one fails
(or, with ``--on-failure continue``, let the others carry on).

Theory of operation
-------------------
Every rank runs under an agent (:mod:`.agent`) on its host: a child of the
launcher for a local rank, the remote command of an ssh client for another
host.  The launcher talks to each agent over a control channel (a pipe, or
the ssh client's stdin) and the agent reports back in marked lines on the
stderr it shares with the rank.  Because an agent stops its rank when that
channel closes, a launcher that dies, even by SIGKILL, takes its ranks with
it; and because it clears what the rank left behind when the rank exits,
no grandchild holds the job's output open after the ranks are gone.

The launcher spawns with :class:`subprocess.Popen` (``close_fds`` is
honoured: a rank inherits its own listening sockets and nothing else), waits
for each agent in a thread, and reads the output pipes on the event loop
(:mod:`.output`).

A job ends at the first of: every rank exited 0; a rank failed; ``timeout``
passed; the launcher got SIGINT/SIGTERM/SIGHUP; its output was closed.
A signal to the launcher is passed to every rank, which then has
``INTERRUPT_GRACE`` seconds (``--interrupt-grace``) to end on its own (a
``finally`` that saves a checkpoint runs) before it is stopped; a second signal kills the ranks at once.
After a failure the launcher waits up to ``COLLECT`` seconds (less once
every rank has exited) for the other ranks to end on their own, so the rank
that caused the failure is seen failing, not stopped; then it stops the rest
(SIGTERM, SIGKILL ``GRACE`` seconds later) and :mod:`.blame` decides the
cause from the exits and the runtime's failure records.

With ``on_failure="continue"`` a rank that fails while the job runs on
(:class:`.blame.CarryOn`: another rank still runs, none has exited 0 yet) is
*lost*: the launcher says so on its stderr at once (which rank, on which
host, how it ended), stops nobody and goes on waiting; the job's status
counts only the others (:func:`.blame.decide`).  Any other failure ends the
job as above.  A signal to the launcher, a timeout or a closed output still
stop every rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from . import agent
from .blame import CarryOn, RankOutcome, Verdict, decide, ended_clause, loss_report, summary
from .output import Console, RankText, Writer

#: Seconds the agents give ranks between SIGTERM and SIGKILL.
GRACE = agent.GRACE
#: Seconds the ranks get to end on their own after the launcher passed them a
#: signal it got (Ctrl-C), before they are stopped (SIGTERM, SIGKILL GRACE later).
INTERRUPT_GRACE = 10.0
#: Seconds after GRACE before the launcher kills an agent that has not ended.
BACKSTOP = 5.0
#: Seconds, after the first failure, that the other ranks get to end on their own.
COLLECT = 2.0
#: Once every agent has ended, seconds a pipe may stay silent (held by some
#: leftover process) before the launcher stops reading it.
DRAIN_IDLE = 0.5
#: Seconds, on a failure or a timeout, that the ranks still running get to
#: write their record (aiocomm.trace, on SIGUSR1) before they are stopped.
TRACE_WAIT = 1.5


@dataclass
class RankProcess:
    """How to start one rank."""

    rank: int
    argv: list[str]
    env: dict[str, str]  # the job's variables for this rank, added to its host's environment
    cwd: str | None = None
    pass_fds: tuple[int, ...] = ()  # listening sockets the rank inherits (local ranks)
    stdin: str = "null"  # "inherit": the launcher's stdin; "copy": a copy of it (as other ranks get); "null"
    output: str | None = None  # a file for this rank's stdout and stderr instead of the launcher's
    cpus: tuple[int, ...] | None = None  # CPUs to bind a local rank to (None: where the scheduler likes)
    batch: bool = False  # start it under SCHED_BATCH (placement.py)
    ssh: list[str] | None = None  # ssh command reaching the rank's host, host name last (None: local)
    python: str = sys.executable  # interpreter that runs the agent
    hostfile_json: str | None = None  # the hostfile, for the agent to write in its private directory
    host: str | None = None  # the host's name as the user gave it (for messages)


@dataclass
class JobResult:
    outcomes: dict[int, RankOutcome] = field(default_factory=dict)
    ending: str | None = None  # what ended the job other than a rank's failure
    ending_status: int = 0
    timed_out: bool = False
    records_asked_at: float | None = None  # wall time the ranks were asked for their records (SIGUSR1)
    #: the records as they were once the ranks had written them, before the job was stopped (stopping
    #: makes ranks fail and write again, of a teardown the verdict is not about); None if none were asked
    records: dict[int, Any] | None = None

    @property
    def verdict(self) -> Verdict:
        return decide(self.outcomes)

    @property
    def exit_status(self) -> int:
        if self.ending is not None:
            return self.ending_status
        return self.verdict.status

    @property
    def lost(self) -> list[int]:
        """The ranks the job carried on without (``--on-failure continue``)."""
        return sorted(rank for rank, o in self.outcomes.items() if o.lost)

    @property
    def returncodes(self) -> dict[int, int | None]:
        return {rank: o.code for rank, o in self.outcomes.items()}

    def summary(self) -> str:
        return summary(self.outcomes, self.verdict, self.ending)


def agent_source() -> bytes:
    return resources.files(__package__).joinpath("agent.py").read_bytes()


def agent_argv(python: str, fd: int, source: bytes) -> list[str]:
    return [python, "-I", "-S", "-c", agent.BOOTSTRAP, str(fd), str(len(source))]


class _Pump:
    """Reads one output pipe of a rank on the event loop into its RankText."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, text: RankText) -> None:
        self.loop = loop
        self.fd = fd
        self.text = text
        self.done: asyncio.Future[None] = loop.create_future()
        self.last_read = time.monotonic()
        self.paused = False
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.last_read = time.monotonic()
        self.text.feed(data)
        console = self.text.console
        if console.full:
            self.paused = True
            self.loop.remove_reader(self.fd)
            console.when_room(self._resume)

    def _resume(self) -> None:
        if self.done.done():
            return
        self.paused = False
        self.last_read = time.monotonic()
        self.loop.add_reader(self.fd, self._readable)

    @property
    def idle(self) -> float:
        return 0.0 if self.paused else time.monotonic() - self.last_read

    def close(self) -> None:
        if self.done.done():
            return
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.text.finish()
        self.done.set_result(None)


class _RankRun:
    """One rank's agent while the job runs."""

    def __init__(self, spec: RankProcess, marker: bytes) -> None:
        self.spec = spec
        self.marker = marker
        self.outcome = RankOutcome(spec.rank)
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Writer | None = None  # the control channel: frames to the agent
        self.stdin_pipe: int | None = None  # write end of a local rank's stdin ("copy")
        self.pumps: list[_Pump] = []
        self.rank_pid: int | None = None
        self.agent_code: int | None = None
        self.reported_exit: dict[str, Any] | None = None
        self.stop_sent = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.agent_code is None

    @property
    def failed_on_its_own(self) -> bool:
        """Ended non-zero before the launcher asked it to stop."""
        return self.agent_code is not None and self.agent_code != 0 and not self.stop_sent

    def on_report(self, raw: bytes) -> None:
        try:
            report = json.loads(raw)
        except ValueError:
            return
        if not isinstance(report, dict):
            return
        if "started" in report:
            self.rank_pid = report["started"]
        elif isinstance(report.get("failure"), dict):
            if report["failure"].get("recovered"):  # (it carried on in a shrunken group: a fresh start)
                self.outcome.records.clear()
            else:
                self.outcome.records.append(report["failure"])
        elif "exit" in report:
            self.reported_exit = report

    def send(self, data: bytes) -> None:
        if self.channel is not None and self.running:
            self.channel.write(data)

    def settle(self) -> None:
        """Fill in the outcome from the agent's report, or from its own end."""
        if self.reported_exit is not None:
            self.outcome.code = self.reported_exit.get("exit")
            self.outcome.stopped = bool(self.reported_exit.get("stopped"))
        else:  # the agent itself died (or ssh could not reach the host)
            self.outcome.code = self.agent_code
            self.outcome.stopped = self.stop_sent


@contextlib.contextmanager
def _placed(cpus: tuple[int, ...] | None, batch: bool) -> Iterator[None]:
    """Run the body with this thread bound to ``cpus`` (unless None) and, if
    ``batch``, under SCHED_BATCH: a child started meanwhile inherits both.
    A no-op where the OS has neither."""
    bind = bool(cpus) and hasattr(os, "sched_setaffinity")
    batch = batch and hasattr(os, "SCHED_BATCH")
    before_cpus = os.sched_getaffinity(0) if bind else None
    before_policy = (os.sched_getscheduler(0), os.sched_getparam(0)) if batch else None
    if bind:
        os.sched_setaffinity(0, cpus)  # type: ignore[arg-type]
    if batch:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        yield
    finally:
        if before_cpus is not None:
            os.sched_setaffinity(0, before_cpus)
        if before_policy is not None:
            os.sched_setscheduler(0, *before_policy)


def _start(run: _RankRun, source: bytes, stdout: Console, stderr: Console,
           files: list[Console], loop: asyncio.AbstractEventLoop) -> None:
    spec = run.spec
    header = {
        "argv": spec.argv,
        "env": spec.env,
        "cwd": spec.cwd,
        "stdin": _agent_stdin(spec),
        "pass_fds": list(spec.pass_fds),
        "hostfile_json": spec.hostfile_json,
        "marker": run.marker.decode(),
    }
    opening = source + agent.frame(b"H", json.dumps(header).encode())
    if spec.ssh is None:
        control_r, control_w = os.pipe()
        stdin: Any = None if spec.stdin == "inherit" else subprocess.DEVNULL
        copy_r: int | None = None
        if spec.stdin == "copy":  # the agent's stdin, which the rank inherits
            copy_r, run.stdin_pipe = os.pipe()
            stdin = copy_r
        try:
            with _placed(spec.cpus, spec.batch):  # the agent and its rank inherit the CPUs and policy
                run.proc = subprocess.Popen(
                    agent_argv(spec.python, control_r, source),
                    stdin=stdin,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    pass_fds=(control_r, *spec.pass_fds), start_new_session=True,
                )
        except BaseException:
            os.close(control_w)
            if run.stdin_pipe is not None:
                os.close(run.stdin_pipe)
                run.stdin_pipe = None
            raise
        finally:
            os.close(control_r)
            if copy_r is not None:
                os.close(copy_r)
        run.channel = _control_channel(control_w)
    else:
        remote = "exec " + " ".join(shlex.quote(a) for a in agent_argv(spec.python, 0, source))
        run.proc = subprocess.Popen(
            [*spec.ssh[:-1], "-o", "BatchMode=yes", spec.ssh[-1], remote],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        assert run.proc.stdin is not None
        run.channel = _control_channel(os.dup(run.proc.stdin.fileno()))
        run.proc.stdin.close()
    run.channel.write(opening)
    out, err = stdout, stderr
    if spec.output is not None:
        fd = os.open(spec.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        out = err = Console(fd, loop, prefix=False, raw=True, name=f"rank-{spec.rank}.log")
        files.append(out)
    assert run.proc.stdout is not None and run.proc.stderr is not None
    for pipe, console, marker in ((run.proc.stdout, out, None), (run.proc.stderr, err, run.marker)):
        fd = os.dup(pipe.fileno())
        pipe.close()
        run.pumps.append(_Pump(loop, fd, RankText(spec.rank, console, marker, run.on_report)))


def _control_channel(fd: int) -> Writer:
    """Frames to one agent on ``fd``, written by a thread (the loop never
    blocks on a full pipe); closing it, once what is queued is written, tells
    the agent to stop its rank if it still runs.  A write that fails (the
    agent is gone) drops the rest."""
    return Writer(fd, name="control", owns_fd=True)


def _agent_stdin(spec: RankProcess) -> str:
    """The agent's ``stdin`` mode: a remote rank's input comes in frames; a
    local rank's copy comes on the agent's own stdin (a pipe), which it passes on."""
    if spec.stdin in ("inherit", "copy"):
        return "frames" if spec.ssh is not None else "inherit"
    return "null"


def _forward_stdin(pipes: list[int], channels: list[Writer]) -> None:
    """Copy the launcher's stdin to every rank that reads it (a thread): into
    the pipe of each local rank, in frames to each remote agent; at its end,
    end theirs.  A rank that does not read holds the others back once its
    pipe is full, as ``tee`` does; a rank that has ended is dropped."""

    def read() -> None:
        try:
            while chunk := os.read(0, 1 << 16):
                for fd in list(pipes):
                    try:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                    except OSError:  # the rank (and its agent) ended
                        pipes.remove(fd)
                        os.close(fd)
                for channel in channels:
                    channel.write(agent.frame(b"I", chunk), wait=True)
        except OSError:
            pass
        for fd in pipes:
            os.close(fd)
        for channel in channels:
            channel.write(agent.frame(b"E"))

    threading.Thread(target=read, name="aiocomm-stdin", daemon=True).start()


async def run_job(
    ranks: Sequence[RankProcess],
    *,
    prefix: bool = True,
    timeout: float | None = None,
    verbose: bool = False,
    on_started: Callable[[], None] | None = None,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    trace_dir: str | None = None,
    on_failure: str = "stop",
    interrupt_grace: float = INTERRUPT_GRACE,
) -> JobResult:
    """Start every rank, wait, and stop the rest as soon as one fails
    (``on_failure="stop"``); with ``"continue"``, a rank that fails while
    others run is reported and the others carry on (see the module's notes).

    With ``trace_dir`` (the ranks' ``AIOCOMM_TRACE_DIR``), on a failure or a
    timeout the ranks still running are asked for their record (SIGUSR1)
    and get up to ``TRACE_WAIT`` seconds to write it before they are stopped.

    Returns the result once every rank has ended and its output is written;
    the caller prints ``result.summary()`` when ``result.exit_status`` is not 0.
    """
    loop = asyncio.get_running_loop()
    result = JobResult()
    events: asyncio.Queue[tuple[_RankRun, int]] = asyncio.Queue()
    runs: list[_RankRun] = []
    files: list[Console] = []
    state = {"stopping": False, "signalled": False}
    timers: list[asyncio.TimerHandle] = []
    reports: list[asyncio.Task[None]] = []  # lines on ranks lost (--on-failure continue), being written
    carry_on = CarryOn(spec.rank for spec in ranks)

    def note_ending(ending: str, status: int) -> None:
        if result.ending is None and not any(r.failed_on_its_own and not r.outcome.lost for r in runs):
            result.ending, result.ending_status = ending, status

    def end(ending: str, status: int) -> None:
        note_ending(ending, status)
        stop_all()

    def output_broken(console: Writer, exc: OSError) -> None:
        if not state["stopping"]:
            end(f"the launcher's {console.name} was closed ({exc.strerror or exc})", 128 + signal.SIGPIPE)

    stdout, stderr = _consoles(loop, stdout_fd, stderr_fd, prefix, output_broken)

    def stop_all(records: bool = False) -> None:
        if state["stopping"]:
            return
        state["stopping"] = True
        if records and trace_dir is not None:
            result.records_asked_at = time.time()

            def keep_then_terminate() -> None:
                from aiocomm.trace.verdict import read_dir

                result.records = read_dir(trace_dir)
                terminate()

            if _ask_for_records(runs, trace_dir, loop, keep_then_terminate):
                return
        terminate()

    def terminate() -> None:
        for run in runs:
            if run.running:
                run.stop_sent = True
                run.send(agent.frame(b"T"))
        timers.append(loop.call_later(GRACE + BACKSTOP, kill_agents))

    def kill_now() -> None:
        """SIGKILL every rank's process group now (through its agent, which
        then clears up and reports as usual; a local one directly too)."""
        state["stopping"] = True
        for run in runs:
            if run.running:
                run.stop_sent = True
                run.send(agent.frame(b"S", str(int(signal.SIGKILL)).encode()))
                if run.spec.ssh is None and run.rank_pid is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(run.rank_pid, signal.SIGKILL)
        timers.append(loop.call_later(BACKSTOP, kill_agents))

    def kill_agents() -> None:
        for run in runs:
            if run.running:
                if run.spec.ssh is None and run.rank_pid is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(run.rank_pid, signal.SIGKILL)
                assert run.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    run.proc.kill()

    def forward(sig: int) -> None:
        if state["signalled"]:  # a second Ctrl-C: no more waiting
            kill_now()
            return
        state["signalled"] = True
        for run in runs:
            if run.running:
                run.stop_sent = True
                run.send(agent.frame(b"S", str(int(sig)).encode()))
        note_ending(f"the launcher got {signal.Signals(sig).name}", 128 + sig)
        timers.append(loop.call_later(interrupt_grace, stop_all))  # a no-op if the job is stopping already

    def wait_for(run: _RankRun) -> None:
        assert run.proc is not None
        code = run.proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(events.put_nowait, (run, code))

    source = agent_source()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, forward, sig)
    try:
        for spec in ranks:
            run = _RankRun(spec, b"\x1eaiocomm-agent-" + secrets.token_hex(8).encode())
            try:
                _start(run, source, stdout, stderr, files, loop)
            except OSError as exc:
                stderr.note(f"aiocomm-launch: cannot start rank {spec.rank}: {exc}")
                result.outcomes[spec.rank] = RankOutcome(spec.rank, code=127)
                end(f"rank {spec.rank} could not be started", 127)
                break
            runs.append(run)
            result.outcomes[spec.rank] = run.outcome
            threading.Thread(target=wait_for, args=(run,), name=f"aiocomm-wait-{spec.rank}", daemon=True).start()
            if verbose:
                where = f" on CPUs {','.join(map(str, spec.cpus))}" if spec.cpus else ""
                host = f" on {spec.ssh[-1]}" if spec.ssh else ""
                stderr.note(f"aiocomm-launch: rank {spec.rank}{host}{where}: {' '.join(spec.argv)}")
        pipes = [run.stdin_pipe for run in runs if run.stdin_pipe is not None]
        channels = [run.channel for run in runs
                    if run.spec.ssh is not None and run.spec.stdin in ("inherit", "copy") and run.channel is not None]
        if pipes or channels:
            _forward_stdin(pipes, channels)
        if on_started is not None:
            on_started()

        deadline = None if timeout is None else time.monotonic() + timeout
        collect_until: float | None = None
        running = sum(1 for r in runs if r.running)
        while running:
            wake = min((t for t in (deadline, collect_until) if t is not None), default=None)
            try:
                if wake is None:
                    run, code = await events.get()
                else:
                    run, code = await asyncio.wait_for(events.get(), max(0.0, wake - time.monotonic()))
            except asyncio.TimeoutError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    deadline = None
                    result.timed_out = True
                    note_ending(f"the job timed out after {timeout:g} s", 124)
                    stop_all(records=True)
                if collect_until is not None and now >= collect_until:
                    collect_until = None
                    stop_all(records=True)
                continue
            run.agent_code = code
            run.outcome.ended_at = time.monotonic()
            running -= 1
            if run.channel is not None:
                run.channel.close()
            if on_failure == "continue" and not state["stopping"] \
                    and carry_on.ended(run.spec.rank, code, run.stop_sent):
                run.outcome.lost = True
                reports.append(asyncio.create_task(_report_loss(run, stderr)))
            elif run.failed_on_its_own and not state["stopping"] and collect_until is None:
                collect_until = time.monotonic() + COLLECT
    finally:
        for timer in timers:
            timer.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for run in runs:  # only if run_job itself failed: the agents stop their ranks
            if run.channel is not None:
                run.channel.close()
    await _drain([p for r in runs for p in r.pumps])
    if reports:
        await asyncio.wait(reports)
    for run in runs:
        run.settle()
    for console in files:
        await asyncio.to_thread(console.close)
    await asyncio.to_thread(stdout.close)
    if stderr is not stdout:
        await asyncio.to_thread(stderr.close)
    return result


async def _report_loss(run: _RankRun, stderr: Console) -> None:
    """Say on the launcher's stderr that ``run``'s rank was lost and the job
    carries on, once its agent's report of how it ended is in (or
    ``DRAIN_IDLE`` seconds later: then the agent's own status tells)."""
    pending = [p.done for p in run.pumps if not p.done.done()]
    if pending and run.reported_exit is None:
        await asyncio.wait(pending, timeout=DRAIN_IDLE)
    spec = run.spec
    host = spec.host or (spec.ssh[-1] if spec.ssh else "this host")
    if run.reported_exit is not None:
        how = ended_clause(run.reported_exit.get("exit"))
    else:  # its agent, or the ssh connection to it, ended first
        agent = "ssh client" if spec.ssh is not None else "agent"
        how = f"was lost: its {agent} {ended_clause(run.agent_code)} before the rank's end was reported"
    stderr.note(loss_report(spec.rank, host, how))


def _ask_for_records(runs: list[_RankRun], trace_dir: str, loop: asyncio.AbstractEventLoop,
                     then: Callable[[], None]) -> bool:
    """SIGUSR1 to the ranks still running (aiocomm writes its record then),
    and ``then()`` once each wrote one, or ``TRACE_WAIT`` seconds later.
    False if no rank runs.  A rank that does not handle SIGUSR1 ends by it:
    it is being stopped anyway (and counts as stopped)."""
    asked = [run for run in runs if run.running and run.spec.ssh is None]
    if not asked:
        return False
    since = time.time()
    for run in asked:
        run.stop_sent = True
        run.send(agent.frame(b"S", str(int(signal.SIGUSR1)).encode()))
    give_up = time.monotonic() + TRACE_WAIT

    def written(run: _RankRun) -> bool:
        try:
            return os.stat(os.path.join(trace_dir, f"rank-{run.spec.rank}.jsonl")).st_mtime >= since - 1
        except OSError:
            return False

    def check() -> None:
        if time.monotonic() >= give_up or all(written(r) or not r.running for r in asked):
            then()
        else:
            loop.call_later(0.05, check)

    loop.call_later(0.05, check)
    return True


async def _drain(pumps: list[_Pump]) -> None:
    """Read each pipe to its end, unless it stays silent for DRAIN_IDLE: then
    something other than the (ended) ranks holds it open, and it is closed."""
    while True:
        pending = [p for p in pumps if not p.done.done()]
        if not pending:
            return
        await asyncio.wait([p.done for p in pending], timeout=DRAIN_IDLE / 4)
        for pump in pending:
            if not pump.done.done() and pump.idle >= DRAIN_IDLE:
                pump.close()


def _consoles(loop: asyncio.AbstractEventLoop, stdout_fd: int, stderr_fd: int, prefix: bool,
              on_broken: Callable[[Writer, OSError], None]) -> tuple[Console, Console]:
    """The launcher's stdout and stderr; one console when both are the same file
    (a terminal, or ``2>&1``), so their lines never cut into each other."""
    out_stat, err_stat = os.fstat(stdout_fd), os.fstat(stderr_fd)
    tty = os.isatty(stdout_fd)
    stdout = Console(stdout_fd, loop, prefix=prefix, tty=tty, on_broken=on_broken, name="stdout")
    if (out_stat.st_dev, out_stat.st_ino) == (err_stat.st_dev, err_stat.st_ino):
        return stdout, stdout
    stderr = Console(stderr_fd, loop, prefix=prefix, tty=os.isatty(stderr_fd), on_broken=on_broken, name="stderr")
    return stdout, stderr
