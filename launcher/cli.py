"""Command line of ``aiocomm-launch``.

argparse (standard library) parses the options: it is well kept, has no
dependency and gives ``--help`` for free.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from .hosts import HostfileError, format_address, is_local, parse_hosts, read_hostfile
from .job import INTERRUPT_GRACE, RankProcess, run_job
from .placement import POLICIES, SCHEDULING, batch_scheduled, cpu_sets

#: ``--stdin`` choices: every rank gets a copy, only rank 0, no rank.
STDIN_MODES = ("all", "0", "none")
#: ``--on-failure`` choices (the ranks see the choice as ``AIOCOMM_ON_FAILURE``).
ON_FAILURE = ("stop", "continue")


def rank_stdin(mode: str | None, rank: int) -> str:
    """A rank's :attr:`RankProcess.stdin` under ``--stdin mode``."""
    if mode == "all":
        return "copy"
    if mode in (None, "0") and rank == 0:
        return "inherit"
    return "null"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiocomm-launch",
        description="Start an aiocomm job: ranks of a command on local or ssh hosts "
        "(a *.py file, or a bare 'python', runs with --python).",
    )
    parser.add_argument("-n", "--repeat-hosts", "--nproc", dest="n", type=int, default=1,
                        help="ranks per host (default 1; with the default host, N local ranks)")
    parser.add_argument("--hosts", default="127.0.0.1", help="comma-separated hosts (default 127.0.0.1)")
    parser.add_argument("--hostfile", default=None, help="JSON hostfile in the formats mlx.launch reads")
    parser.add_argument("--backend", default="ring", choices=["ring", "mpi"],
                        help="'ring' (default: aiocomm's TCP ring, ranks started by this launcher) or 'mpi' "
                        "(ranks started by mpirun, the world formed over MPI)")
    parser.add_argument("--mpirun", default="mpirun", help="mpirun command for --backend mpi")
    parser.add_argument("--mpirun-args", default="",
                        help="extra mpirun arguments for --backend mpi, e.g. \"--bind-to core\" (one string)")
    parser.add_argument("-p", "--starting-port", type=int, default=None,
                        help="first listening port (default: free ports for local ranks, a random base for ssh ones)")
    parser.add_argument("--connections-per-ip", type=int, default=1, help="listening addresses per rank")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for *.py commands (same path on ssh hosts)")
    parser.add_argument("--cwd", default=None,
                        help="working directory of the ranks (ssh ranks: the launcher's by default)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment (repeatable)")
    parser.add_argument("--ssh", default="ssh", help="ssh command and options, e.g. \"ssh -F cluster.conf\"")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop the whole job after this many seconds (exit 124)")
    parser.add_argument("--interrupt-grace", type=float, default=INTERRUPT_GRACE, metavar="S",
                        help="after Ctrl-C (SIGINT, SIGTERM, SIGHUP) passed to the ranks, give them S seconds to "
                             f"end on their own before they are stopped (default {INTERRUPT_GRACE:g})")
    parser.add_argument("--prefix", action=argparse.BooleanOptionalAction, default=True,
                        help="tag output lines with [rank N]")
    parser.add_argument("--output-dir", default=None, help="write each rank's output to DIR/rank-N.log instead")
    parser.add_argument("--bind-to", default="auto", choices=POLICIES,
                        help="bind local ranks to CPUs: 'auto' (default) when more than one rank runs here, "
                        "'core' always, 'none' never")
    parser.add_argument("--sched", default="auto", choices=SCHEDULING,
                        help="start local ranks under SCHED_BATCH: 'auto' (default) when they outnumber the CPUs, "
                        "'batch' always, 'normal' never")
    parser.add_argument("--stdin", default=None, choices=STDIN_MODES,
                        help="which ranks read the launcher's stdin: '0' (default) rank 0 only, 'all' every rank "
                        "a copy of every byte (so pdb works on any rank), 'none' no rank")
    parser.add_argument("--on-failure", default="stop", choices=ON_FAILURE,
                        help="when a rank fails (killed by a signal, or exits non-zero): 'stop' (default) stops "
                        "every rank, and the job's status is that of the rank that caused the failure; 'continue' "
                        "reports the rank at once and the others carry on, while another rank runs and none has "
                        "exited 0 yet: the status is then 0 if every rank that was not lost exits 0, else as with "
                        "'stop'. Ctrl-C, SIGTERM and --timeout still stop every rank. The ranks see "
                        "AIOCOMM_ON_FAILURE. With --backend mpi: Open MPI's mpirun --enable-recovery, every rank "
                        "on this host")
    parser.add_argument("--print-python", action="store_true",
                        help="print the path of the Python interpreter that runs *.py commands (--python) and exit")
    parser.add_argument("--verbose", action="store_true", help="say what is started")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="script.py [args...] or any command")
    return parser


def join_mpirun_args(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with ``--mpirun-args VALUE`` written ``--mpirun-args=VALUE``.

    argparse takes a separate value that starts with '-' for an option of its
    own (``--mpirun-args "--oversubscribe"``: "expected one argument"), so the
    value is joined to the option before parsing -- only among the launcher's
    options: the command and its arguments (from the first positional word, or
    after ``--``) are left as they are.
    """
    out = list(argv)
    i = 0
    while i < len(out):
        word = out[i]
        if word == "--" or not word.startswith("-") or word == "-":
            break  # the command starts here
        name = word.partition("=")[0]
        options = parser._option_string_actions
        matches = [name] if name in options else [s for s in options if len(name) > 2 and s.startswith(name)]
        action = options[matches[0]] if len(matches) == 1 else None  # (argparse takes unique abbreviations)
        attached = "=" in word or (not word.startswith("--") and len(word) > 2)  # "--hosts=a,b", "-n4"
        if action is not None and not attached:
            if action.dest == "mpirun_args" and i + 1 < len(out):
                out[i:i + 2] = [f"--mpirun-args={out[i + 1]}"]
            elif action.nargs is None:
                i += 1  # its value
        i += 1
    return out


def command_argv(command: Sequence[str], python: str) -> list[str]:
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("aiocomm-launch: no command given")
    if command[0].endswith(".py"):
        return [python, *command]
    if command[0] in ("python", "python3"):
        # The interpreter the launcher runs under (a virtualenv's), not PATH's.
        return [python, *command[1:]]
    return command


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"aiocomm-launch: --env {item!r} is not KEY=VALUE")
        env[key] = value
    return env


def bind_listeners(host: str, n: int, ports: Sequence[int] | None = None) -> list[socket.socket]:
    """Listening sockets on ``host`` (free ports, or the ``ports`` given) that
    the ranks inherit (through ``pass_fds``: each rank gets its own and no
    other), so no other program takes a port between choosing and using it.

    A port given is bound with ``SO_REUSEADDR`` (POSIX), as the ranks' own
    listeners and the rendezvous server are: the connections of a job that
    just ended on it linger in TIME-WAIT for a minute, and they must not stop
    the next job.  A port another socket listens on still fails (Linux
    refuses it even then), naming the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    for i in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        port = 0 if ports is None else ports[i]
        try:
            if port and os.name == "posix":  # on Windows the option would let two listeners share the port
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(1024)
        except OSError as exc:
            s.close()
            for other in socks:
                other.close()
            raise SystemExit(f"aiocomm-launch: cannot listen on {format_address(host, port)}: {exc}") from None
        socks.append(s)
    return socks


def check_command(argv: Sequence[str], cwd: str | None, env: dict[str, str]) -> None:
    """Report a script or program that does not exist once, up front, instead
    of letting every rank fail on it (only for ranks on this machine)."""
    cwd = cwd or os.getcwd()
    if len(argv) >= 2 and argv[1].endswith(".py") and not argv[1].startswith("-"):
        script = os.path.join(cwd, argv[1])
        if not os.path.isfile(script):
            print(f"aiocomm-launch: {argv[1]}: no such file (looked in {cwd})", file=sys.stderr)
            raise SystemExit(2)  # as python says it
    program = argv[0]
    if os.sep in program:
        found = os.path.isfile(os.path.join(cwd, program)) and os.access(os.path.join(cwd, program), os.X_OK)
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath)) is not None
    if not found:
        print(f"aiocomm-launch: {program}: command not found", file=sys.stderr)
        raise SystemExit(127)


def plan_job(args: argparse.Namespace) -> tuple[list[RankProcess], list[socket.socket]]:
    """Ranks to start and the sockets to hand them.

    The launcher writes no file: every rank's agent, local or remote, writes
    the hostfile into its own private directory and removes it when the rank
    has ended, so even a launcher killed by SIGKILL leaves nothing behind
    (the agents outlive it long enough to stop their ranks and clear up)."""
    try:
        plan = read_hostfile(args.hostfile) if args.hostfile else parse_hosts(args.hosts)
    except HostfileError as exc:
        raise SystemExit(f"aiocomm-launch: {exc}") from None
    slots = [host for host in plan.hosts for _ in range(args.n)]
    per = args.connections_per_ip
    if per < 1:
        raise SystemExit("aiocomm-launch: --connections-per-ip must be at least 1")
    argv = command_argv(args.command, args.python)
    extra = parse_env(plan.envs) | parse_env(args.env)
    if any(is_local(host) for host in slots):
        check_command(argv, args.cwd, dict(os.environ, **extra))
    base = args.starting_port if args.starting_port is not None else None
    remote_base = base if base is not None else random.randrange(20000, 60000 - len(slots) * per)
    listeners: list[socket.socket] = []
    addresses: list[list[str]] = []
    fds: list[tuple[int, ...]] = []
    for r, host in enumerate(slots):
        ports = None if base is None else [base + r * per + k for k in range(per)]
        if is_local(host):
            socks = bind_listeners(host.listen_ip, per, ports)
            listeners.extend(socks)
            addresses.append([format_address(host.listen_ip, s.getsockname()[1]) for s in socks])
            fds.append(tuple(s.fileno() for s in socks))
        else:
            addresses.append([format_address(host.listen_ip, remote_base + r * per + k) for k in range(per)])
            fds.append(())
    hostfile_text = json.dumps(addresses)
    # The token reaches every rank in its agent's header (a pipe, or ssh's
    # stdin), never on a command line, where any local user could read it.
    token = secrets.token_hex(16)
    local = [r for r, host in enumerate(slots) if is_local(host)]
    bound = dict(zip(local, cpu_sets(len(local), args.bind_to), strict=True))
    batch = batch_scheduled(len(local), args.sched)
    ssh = shlex.split(args.ssh)
    ranks = []
    for r, host in enumerate(slots):
        job_env = dict(extra, AIOCOMM_RANK=str(r), AIOCOMM_TOKEN=token, PYTHONUNBUFFERED="1",
                       AIOCOMM_ON_FAILURE=args.on_failure)
        output = os.path.join(args.output_dir, f"rank-{r}.log") if args.output_dir else None
        stdin = rank_stdin(args.stdin, r)
        if is_local(host):
            job_env.update(AIOCOMM_LISTEN_FDS=",".join(map(str, fds[r])))
            if getattr(args, "trace_dir", None) and "AIOCOMM_TRACE_DIR" not in extra:
                job_env["AIOCOMM_TRACE_DIR"] = args.trace_dir
            ranks.append(RankProcess(r, argv, job_env, args.cwd, fds[r], stdin=stdin, output=output,
                                     cpus=bound[r], batch=batch, hostfile_json=hostfile_text, host=host.ssh))
        else:
            ranks.append(RankProcess(r, argv, job_env, args.cwd or os.getcwd(), (), stdin=stdin, output=output,
                                     ssh=[*ssh, host.ssh], python=args.python, hostfile_json=hostfile_text,
                                     host=host.ssh))
    return ranks, listeners


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_mpirun_args(sys.argv[1:] if argv is None else argv, parser))
    if args.print_python:
        print(args.python)
        return 0
    if args.n < 1:
        raise SystemExit("aiocomm-launch: -n must be at least 1")
    if not args.interrupt_grace >= 0:
        raise SystemExit(f"aiocomm-launch: --interrupt-grace {args.interrupt_grace:g}: give 0 or more seconds")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.backend == "mpi":
        from . import mpi

        if args.stdin not in (None, "0"):
            raise SystemExit("aiocomm-launch: --stdin is for the ring backend; with --backend mpi pass "
                             "mpirun's own option, e.g. --mpirun-args \"--stdin all\" (Open MPI)")
        if args.output_dir:
            raise SystemExit("aiocomm-launch: --output-dir is for the ring backend; with --backend mpi pass "
                             "mpirun's own option, e.g. --mpirun-args \"--output-filename DIR\"")
        try:
            plan = read_hostfile(args.hostfile) if args.hostfile else parse_hosts(args.hosts)
        except HostfileError as exc:
            raise SystemExit(f"aiocomm-launch: {exc}") from None
        env = parse_env(plan.envs) | parse_env(args.env) | {"AIOCOMM_ON_FAILURE": args.on_failure}
        rank_argv = command_argv(args.command, args.python)
        if any(is_local(host) for host in plan.hosts):
            check_command(rank_argv, args.cwd, dict(os.environ, **env))
        return mpi.run(args, rank_argv, plan.hosts, env)
    args.trace_dir, own_trace_dir = trace_directory(parse_env(args.env))
    ranks, listeners = plan_job(args)

    def close_listeners() -> None:  # the ranks hold their own copies now
        for sock in listeners:
            sock.close()

    async def go() -> int:
        try:
            result = await run_job(
                ranks, prefix=args.prefix, timeout=args.timeout, verbose=args.verbose, on_started=close_listeners,
                trace_dir=args.trace_dir, on_failure=args.on_failure, interrupt_grace=args.interrupt_grace,
            )
        finally:
            close_listeners()
        if result.exit_status != 0:
            # (the summary stays the last line)
            print_trace_verdict(args.trace_dir, since=result.records_asked_at if result.lost else None,
                                carried_on=bool(result.lost), kept=result.records)
        if result.exit_status != 0 or result.lost:
            with contextlib.suppress(OSError):
                os.write(2, f"aiocomm-launch: {result.summary()}\n".encode(errors="replace"))
        return result.exit_status

    try:
        return asyncio.run(go())
    finally:
        if own_trace_dir:
            shutil.rmtree(args.trace_dir, ignore_errors=True)


def trace_directory(extra: dict[str, str]) -> tuple[str, bool]:
    """Where the ranks write their record (``AIOCOMM_TRACE_DIR``): the user's
    (``--env`` or the launcher's environment; kept), else a directory of the
    launcher's, removed after the job; and whether it is the launcher's.

    The launcher's is only named here, under an unguessable name: a rank
    creates it (mode 0700) when it writes a record, so a job that needs
    none, or a launcher killed by SIGKILL while every rank runs, leaves no
    file behind."""
    mine = extra.get("AIOCOMM_TRACE_DIR") or os.environ.get("AIOCOMM_TRACE_DIR")
    if mine:
        return mine, False
    return os.path.join(tempfile.gettempdir(), f"aiocomm-trace-{secrets.token_hex(8)}"), True


def print_trace_verdict(trace_dir: str | None, since: float | None = None, carried_on: bool = False,
                        kept: dict[int, Any] | None = None) -> None:
    """The verdict of the ranks' records (aiocomm.trace), on the launcher's stderr, if any rank wrote one.

    ``kept``: the records as read once the ranks had written them, before
    the launcher stopped the job; they stand for their ranks (a rank that
    failed because it was being stopped wrote again, of the teardown).

    After the job carried on without a rank (``carried_on``), a record a rank
    wrote on its own may tell of that loss, which the job survived, and the
    verdict would name the lost rank: then only records written since the
    launcher asked for them (``since``, wall time: a timeout) are read, and
    none if it did not ask.
    """
    if not trace_dir or (carried_on and since is None):
        return
    from aiocomm.trace.verdict import read_dir, verdict

    records = read_dir(trace_dir)
    if kept:
        records.update(kept)
    if since is not None:
        records = {rank: record for rank, record in records.items() if record.written >= since}
    if records:
        text = "".join(f"aiocomm-launch: trace: {line}\n" for line in verdict(records))
        with contextlib.suppress(OSError):
            os.write(2, text.encode(errors="replace"))
