"""Run the ranks of one job, watch them, and stop them all when one fails.

Each rank is a child process in its own session (so a signal reaches its
whole process tree).  Output lines are read from pipes and written whole,
tagged ``[rank N]``, so lines of different ranks never interleave mid-line.
The job's exit status is 0 only when every rank exited 0; otherwise it is the
first failing rank's status (128 + signal number for a signal), and a one-line
summary says which ranks failed and how.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Callable, Iterator, Sequence

#: Seconds between SIGTERM and SIGKILL when stopping ranks.
GRACE = 5.0


@dataclass
class RankProcess:
    """How to start one rank."""

    rank: int
    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None
    pass_fds: tuple[int, ...] = ()
    # "inherit": the launcher's stdin; "null"; "pipe": held open for an ssh
    # agent (launcher.remote); "forward": also carries the launcher's stdin to it
    stdin: str = "null"
    output: str | None = None  # a file for this rank's stdout and stderr instead of the terminal
    cpus: tuple[int, ...] | None = None  # CPUs to bind the rank to (None: where the scheduler likes)
    batch: bool = False  # start it under SCHED_BATCH (aiocomm.placement)


@dataclass
class JobResult:
    returncodes: dict[int, int | None] = field(default_factory=dict)
    first_failure: int | None = None  # rank
    timed_out: bool = False

    @property
    def exit_status(self) -> int:
        if self.timed_out:
            return 124
        if self.first_failure is None:
            return 0
        return status_of(self.returncodes[self.first_failure])

    def summary(self) -> str:
        failed = []
        for rank, code in sorted(self.returncodes.items()):
            if code is None:
                failed.append(f"rank {rank} did not finish")
            elif code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                failed.append(f"rank {rank} killed by {name}")
            elif code != 0:
                failed.append(f"rank {rank} exited with code {code}")
        head = "job timed out; " if self.timed_out else ""
        return head + ("; ".join(failed) if failed else "all ranks exited 0")


def status_of(code: int | None) -> int:
    if code is None:
        return 1
    if code < 0:
        return 128 - code
    return code


class _Output:
    """Writes whole lines, optionally prefixed, to one stream."""

    def __init__(self, stream: IO[bytes], prefix: bool) -> None:
        self.stream = stream
        self.prefix = prefix

    def line(self, rank: int, data: bytes) -> None:
        if self.prefix:
            data = b"[rank %d] " % rank + data
        if not data.endswith(b"\n"):
            data += b"\n"
        self.stream.write(data)
        self.stream.flush()


async def _pump(reader: asyncio.StreamReader, rank: int, out: _Output) -> None:
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                out.line(rank, exc.partial)
            return
        except asyncio.LimitOverrunError as exc:
            line = await reader.readexactly(exc.consumed)
        out.line(rank, line)


def _forward_stdin(loop: asyncio.AbstractEventLoop, proc: asyncio.subprocess.Process) -> None:
    """Copy the launcher's stdin to a remote agent in length-prefixed frames
    (see launcher.remote); a zero-length frame says the input ended."""
    writer = proc.stdin
    assert writer is not None

    def send(frame: bytes) -> None:
        if not writer.is_closing():
            writer.write(frame)

    def read() -> None:
        try:
            while chunk := sys.stdin.buffer.read1(65536):
                loop.call_soon_threadsafe(send, len(chunk).to_bytes(4, "big") + chunk)
        except (OSError, ValueError, RuntimeError):
            return
        try:
            loop.call_soon_threadsafe(send, b"\0\0\0\0")
        except RuntimeError:  # the job already ended
            pass

    threading.Thread(target=read, name="aiocomm-stdin", daemon=True).start()


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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


async def run_job(
    ranks: Sequence[RankProcess],
    *,
    prefix: bool = True,
    timeout: float | None = None,
    verbose: bool = False,
    on_started: Callable[[], None] | None = None,
) -> JobResult:
    """Start every rank, wait, and stop the rest as soon as one fails."""
    loop = asyncio.get_running_loop()
    stdout = _Output(sys.stdout.buffer, prefix)
    stderr = _Output(sys.stderr.buffer, prefix)
    procs: dict[int, asyncio.subprocess.Process] = {}
    pumps: list[asyncio.Task[None]] = []
    result = JobResult()
    files: list[IO[bytes]] = []
    stdin_modes = {
        "inherit": None,
        "pipe": asyncio.subprocess.PIPE,
        "forward": asyncio.subprocess.PIPE,
        "null": asyncio.subprocess.DEVNULL,
    }
    for spec in ranks:
        with _placed(spec.cpus, spec.batch):  # the child inherits the spawning thread's CPUs and policy
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=spec.env,
                cwd=spec.cwd,
                pass_fds=spec.pass_fds,
                stdin=stdin_modes[spec.stdin],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                limit=1 << 20,
            )
        procs[spec.rank] = proc
        result.returncodes[spec.rank] = None
        assert proc.stdout is not None and proc.stderr is not None
        out, err = stdout, stderr
        if spec.output is not None:
            fh = open(spec.output, "wb")
            files.append(fh)
            out = err = _Output(fh, False)
        pumps.append(loop.create_task(_pump(proc.stdout, spec.rank, out)))
        pumps.append(loop.create_task(_pump(proc.stderr, spec.rank, err)))
        if spec.stdin == "forward":
            _forward_stdin(loop, proc)
        if verbose:
            where = f" on CPUs {','.join(map(str, spec.cpus))}" if spec.cpus else ""
            print(f"aiocomm-launch: rank {spec.rank} pid {proc.pid}{where}: {' '.join(spec.argv)}", file=sys.stderr)

    if on_started is not None:
        on_started()
    stopping = False

    def stop_all(sig: int = signal.SIGTERM) -> None:
        nonlocal stopping
        if stopping and sig == signal.SIGTERM:
            return
        stopping = True
        for proc in procs.values():
            if proc.returncode is None:
                _signal_group(proc, sig)
        loop.call_later(GRACE, _kill_rest)

    def _kill_rest() -> None:
        for proc in procs.values():
            if proc.returncode is None:
                _signal_group(proc, signal.SIGKILL)

    def forward(sig: int) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                _signal_group(proc, sig)
        stop_all()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, forward, sig)

    waits = {loop.create_task(proc.wait()): rank for rank, proc in procs.items()}
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(waits)
    try:
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                result.timed_out = True
                stop_all()
                deadline = None
                continue
            for task in done:
                rank = waits[task]
                code = task.result()
                result.returncodes[rank] = code
                if code != 0 and result.first_failure is None and not result.timed_out:
                    result.first_failure = rank
                    stop_all()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for proc in procs.values():
            if proc.returncode is None:
                _signal_group(proc, signal.SIGKILL)
        # Reap whatever a rank left in its process group.
        for proc in procs.values():
            _signal_group(proc, signal.SIGKILL)
        await asyncio.gather(*pumps, return_exceptions=True)
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for fh in files:
            fh.close()
    return result
