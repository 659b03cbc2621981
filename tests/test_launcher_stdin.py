"""``aiocomm-launch --stdin all|0|none`` and ``--print-python``, with real ranks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, WORKERS, clean_env
from .test_ssh import HOSTS as SSH_HOSTS
from .test_ssh import ssh_config  # noqa: F401  (the fixture: a private sshd on 127.0.0.2-3)


def _launch(*args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=clean_env(), input=input,
                          capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.timeout(60)
def test_stdin_all_gives_every_rank_every_line():
    out = _ok(_launch("-n", "3", "--stdin", "all", str(WORKERS / "stdin_lines.py"), input="alpha\nbeta gamma\n"))
    for r in range(3):
        assert f"[rank {r}] GOT {r} alpha" in out and f"[rank {r}] GOT {r} beta gamma" in out, out
        assert f"[rank {r}] EOF {r} after 2 lines" in out, out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [None, "0"])
def test_stdin_0_gives_rank_zero_alone(mode):
    """The default: rank 0 reads the launcher's stdin; the others read end of file."""
    opts = ("--stdin", mode) if mode else ()
    out = _ok(_launch("-n", "3", *opts, str(WORKERS / "stdin_lines.py"), input="alpha\nbeta\n"))
    assert "[rank 0] EOF 0 after 2 lines" in out, out
    for r in (1, 2):
        assert f"[rank {r}] EOF {r} after 0 lines" in out, out


@pytest.mark.timeout(60)
def test_stdin_none_gives_no_rank_anything():
    out = _ok(_launch("-n", "2", "--stdin", "none", str(WORKERS / "stdin_lines.py"), input="alpha\n"))
    for r in range(2):
        assert f"[rank {r}] EOF {r} after 0 lines" in out, out


@pytest.mark.timeout(90)
def test_stdin_all_carries_on_past_a_rank_that_does_not_read():
    """More than a pipe holds (64 KiB), and rank 1 ends without reading a byte:
    the other ranks still get every line."""
    lines = 20000  # about 200 KB
    text = "".join(f"line {i:06d}\n" for i in range(lines))
    out = _ok(_launch("-n", "3", "--stdin", "all", str(WORKERS / "stdin_lines.py"), "1", input=text))
    assert "[rank 1] SKIPPED 1" in out, out
    for r in (0, 2):
        assert f"[rank {r}] EOF {r} after {lines} lines" in out, out[-3000:]


@pytest.mark.timeout(90)
def test_pdb_on_every_rank_under_stdin_all():
    """What mlx.launch sends stdin to every rank for: a breakpoint() on each rank
    takes the same commands, and each answers with its own state."""
    out = _ok(_launch("-n", "3", "--stdin", "all", str(WORKERS / "stdin_pdb.py"), input="p x + 1\nc\n"))
    for r in range(3):
        mine = [line for line in out.splitlines() if line.startswith(f"[rank {r}] ")]
        assert any(line.endswith(f"(Pdb) {10 * r + 1}") for line in mine), out
        assert any(line.endswith("SUM 30") for line in mine), out  # printed after the prompt for 'c'


def test_print_python_prints_the_interpreter_and_exits():
    proc = _launch("--print-python")
    assert proc.returncode == 0 and proc.stdout == sys.executable + "\n", proc
    proc = _launch("--python", "/opt/py/bin/python3", "--print-python")
    assert proc.returncode == 0 and proc.stdout == "/opt/py/bin/python3\n", proc


def test_stdin_modes_are_checked():
    proc = _launch("--stdin", "1", "true")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = _launch("--backend", "mpi", "--stdin", "all", "true")
    assert proc.returncode != 0 and "--mpirun-args" in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_stdin_all_reaches_local_and_ssh_ranks(ssh_config):  # noqa: F811  (the fixture)
    """Two local ranks (a pipe each) and two over ssh (frames to their agents)."""
    cmd = ["--hosts", f"127.0.0.1,{SSH_HOSTS[1]}", "-n", "2", "--ssh", f"ssh -F {ssh_config}", "--stdin", "all",
           str(WORKERS / "stdin_lines.py")]
    out = _ok(_launch(*cmd, input="alpha\nbeta\n", timeout=90))
    for r in range(4):
        assert f"[rank {r}] GOT {r} alpha" in out and f"[rank {r}] EOF {r} after 2 lines" in out, out
