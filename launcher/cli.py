"""Command line of ``aiocomm-launch``.

argparse (standard library) parses the options: it is well kept, has no
dependency and gives ``--help`` for free.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import sys
import tempfile
from typing import Sequence

from .job import RankProcess, run_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiocomm-launch",
        description="Start an aiocomm job: N local ranks of a command (a *.py file runs with this Python).",
    )
    parser.add_argument("-n", "--repeat-hosts", "--nproc", dest="n", type=int, default=1, help="number of local ranks")
    parser.add_argument("--host", default="127.0.0.1", help="address the local ranks listen on (default 127.0.0.1)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for *.py commands")
    parser.add_argument("--cwd", default=None, help="working directory of the ranks")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="stop the whole job after this many seconds (exit 124)")
    parser.add_argument("--prefix", action=argparse.BooleanOptionalAction, default=True, help="tag output lines with [rank N]")
    parser.add_argument("--verbose", action="store_true", help="say what is started")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="script.py [args...] or any command")
    return parser


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


def bind_listeners(host: str, n: int) -> list[socket.socket]:
    """One listening socket per rank on a free port; the ranks inherit them,
    so no other program can take a port between choosing and using it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((host, 0))
        s.listen(1024)
        s.set_inheritable(True)
        socks.append(s)
    return socks


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise SystemExit("aiocomm-launch: -n must be at least 1")
    argv_cmd = command_argv(args.command, args.python)
    extra = parse_env(args.env)
    listeners = bind_listeners(args.host, args.n)
    fmt = "[{}]:{}" if ":" in args.host else "{}:{}"
    hosts = [[fmt.format(args.host, s.getsockname()[1])] for s in listeners]
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="aiocomm-") as tmp:
        hostfile = os.path.join(tmp, "hostfile.json")
        with open(hostfile, "w") as fh:
            json.dump(hosts, fh)
        ranks = []
        for rank, sock in enumerate(listeners):
            env = dict(os.environ)
            env.update(extra)
            env.update(
                AIOCOMM_RANK=str(rank),
                AIOCOMM_HOSTFILE=hostfile,
                AIOCOMM_TOKEN=token,
                AIOCOMM_LISTEN_FDS=str(sock.fileno()),
                PYTHONUNBUFFERED="1",
            )
            ranks.append(RankProcess(rank, argv_cmd, env, args.cwd, (sock.fileno(),), stdin=rank == 0))

        def close_listeners() -> None:  # the ranks hold their own copies now
            for sock in listeners:
                sock.close()

        async def go() -> int:
            try:
                result = await run_job(
                    ranks, prefix=args.prefix, timeout=args.timeout, verbose=args.verbose, on_started=close_listeners
                )
            finally:
                close_listeners()
            if result.exit_status != 0:
                print(f"aiocomm-launch: {result.summary()}", file=sys.stderr, flush=True)
            return result.exit_status

        try:
            import uvloop

            return uvloop.run(go()) if hasattr(uvloop, "run") else asyncio.run(go())
        except ImportError:
            return asyncio.run(go())
