"""Faults end in an exception on every surviving rank, never a hang."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, WORKERS, clean_env


def spawn_world(n, tmp_path, script, *args, env=None):
    """Start n ranks by hand (not through the launcher, which would stop the
    survivors as soon as one rank fails)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        s.set_inheritable(True)
        socks.append(s)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{s.getsockname()[1]}"] for s in socks]))
    procs = []
    for r, s in enumerate(socks):
        rank_env = clean_env(AIOCOMM_RANK=str(r), AIOCOMM_HOSTFILE=str(hostfile), AIOCOMM_TOKEN="t",
                             AIOCOMM_LISTEN_FDS=str(s.fileno()), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, str(WORKERS / script), *args], cwd=ROOT, env=rank_env,
                                      pass_fds=(s.fileno(),), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for s in socks:
        s.close()
    return procs


def collect(procs, victim, timeout):
    outs = {}
    deadline = time.monotonic() + timeout
    for r, p in enumerate(procs):
        if r == victim:
            continue
        out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        outs[r] = (p.returncode, out, err)
    return outs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", [0, 2])
def test_killed_rank_is_reported_on_every_survivor(tmp_path, victim):
    procs = spawn_world(4, tmp_path, "faults.py", "kill", str(victim))
    try:
        procs[victim].wait(timeout=40)
        died = time.time()
        outs = collect(procs, victim, 30)
    finally:
        for p in procs:
            p.kill()
    for r, (code, out, err) in outs.items():
        assert code == 0 and "DONE" in out, (r, out, err[-3000:])
        m = re.search(r"FAILED (\w+) at ([\d.]+): (.*)", out)
        assert m.group(1) == "PeerLostError", out
        assert f"rank {victim}" in m.group(3), out
        assert float(m.group(2)) - died < 5.0, "survivor noticed too late"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["stop", "stop-call"])
def test_stopped_rank_times_out_on_every_survivor(tmp_path, mode):
    victim = 1
    procs = spawn_world(3, tmp_path, "faults.py", mode, str(victim),
                        env={"AIOCOMM_TIMEOUT": "3"} if mode == "stop" else None)
    try:
        outs = collect(procs, victim, 40)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
    for r, (code, out, err) in outs.items():
        assert code == 0 and "DONE" in out, (r, out, err[-3000:])
        assert "FAILED CommTimeoutError" in out, out
        assert re.search(r"waiting for .* from rank [0-9]", out), out
