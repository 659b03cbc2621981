"""Helpers shared by the tests: start real jobs through the real launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"

LAUNCHER_ENV_VARS = (
    "AIOCOMM_RANK",
    "AIOCOMM_HOSTFILE",
    "AIOCOMM_TOKEN",
    "AIOCOMM_LISTEN_FDS",
    "AIOCOMM_ON_FAILURE",
    "MLX_RANK",
    "MLX_HOSTFILE",
    "AIOCOMM_COORDINATOR",
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV_VARS}
    env.update(extra)
    return env


def launch(n: int, script: str, *args: str, timeout: float = 90, env: dict[str, str] | None = None,
           launcher_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``tests/workers/<script>`` on ``n`` local ranks with the real launcher."""
    cmd = [sys.executable, "-m", "launcher", "-n", str(n), *launcher_args, str(WORKERS / script), *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=clean_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )


def assert_ok(proc: subprocess.CompletedProcess[str], n: int, marker: str = "OK") -> None:
    detail = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, detail
    for rank in range(n):
        assert f"[rank {rank}] {marker}" in proc.stdout, detail


@pytest.fixture
def fresh_world(monkeypatch: pytest.MonkeyPatch):
    """An in-process world of size 1: no launcher variables, no engine yet."""
    import aiocomm.aio

    for var in LAUNCHER_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    aiocomm.aio._reset_for_tests()
    yield
    aiocomm.aio._reset_for_tests()


def spawn_world(n: int, tmp_path: Path, argv: list[str], env: dict[str, str] | None = None,
                tokens: list[str] | None = None, **popen: object) -> list[subprocess.Popen[str]]:
    """Start ``n`` ranks of ``argv`` by hand (not through the launcher, which
    would stop the others as soon as one fails), with the launcher's own
    race-free listening sockets."""
    from launcher.cli import bind_listeners

    socks = bind_listeners("127.0.0.1", n)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{s.getsockname()[1]}"] for s in socks]))
    procs = []
    for r, s in enumerate(socks):
        rank_env = clean_env(AIOCOMM_RANK=str(r), AIOCOMM_HOSTFILE=str(hostfile),
                             AIOCOMM_TOKEN=tokens[r] if tokens else "t",
                             AIOCOMM_LISTEN_FDS=str(s.fileno()), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=rank_env, pass_fds=(s.fileno(),),
                                      text=True, **popen))  # type: ignore[call-overload]
    for s in socks:
        s.close()
    return procs


def thawed(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None,
           timeout: float = 60) -> tuple[str, list[tuple[str, str]], list[int]]:
    """Run 2 ranks of ``argv`` whose rank 0 SIGSTOPs itself (it prints
    ``STOPPED``) while rank 1 waits on it: once rank 1 prints ``WAITING``,
    thaw rank 0 and let both finish.  Returns what rank 1 printed up to
    ``WAITING``, each rank's (stdout, stderr), and their exit codes."""
    procs = spawn_world(2, tmp_path, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = procs[0].stdout.readline()
        assert "STOPPED" in line, line + procs[0].stderr.read()[-2000:]
        seen = ""
        while "WAITING" not in seen:
            line = procs[1].stdout.readline()
            assert line, seen + procs[1].stderr.read()[-3000:]
            seen += line
        procs[0].send_signal(signal.SIGCONT)
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
    return seen, outs, [p.returncode for p in procs]


def killed(tmp_path: Path, argv: list[str], victim: int, timeout: float = 60) -> tuple[str, str, float, int]:
    """Run 2 ranks of ``argv`` of which rank ``victim`` SIGKILLs itself:
    once it is gone, wait for the other.  Returns the survivor's stdout and
    stderr, the time the victim was seen gone, and the victim's exit code."""
    procs = spawn_world(2, tmp_path, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        procs[victim].wait(timeout=timeout)
        died = time.time()
        out, err = procs[1 - victim].communicate(timeout=30)
    finally:
        for p in procs:
            p.kill()
    return out, err, died, procs[victim].returncode


@pytest.fixture
def loop():
    """A fresh event loop, not running: socket-free tests drive it by hand."""
    import asyncio

    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
