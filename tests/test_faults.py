"""Faults end in an exception on every surviving rank, never a hang."""

import re
import signal
import subprocess
import time

import pytest

from .conftest import WORKERS, spawn_world


def spawn_faults(n, tmp_path, *args, env=None):
    return spawn_world(n, tmp_path, [str(WORKERS / "faults.py"), *args], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)


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
@pytest.mark.parametrize("victim,transport", [(0, "auto"), (2, "auto"), (2, "tcp")])
def test_killed_rank_is_reported_on_every_survivor(tmp_path, victim, transport):
    procs = spawn_faults(4, tmp_path, "kill", str(victim), env={"AIOCOMM_TRANSPORT": transport})
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
@pytest.mark.parametrize("mode,transport", [("stop", "auto"), ("stop-call", "auto"), ("stop", "tcp")])
def test_stopped_rank_times_out_on_every_survivor(tmp_path, mode, transport):
    victim = 1
    env = {"AIOCOMM_TRANSPORT": transport}
    if mode == "stop":
        env["AIOCOMM_TIMEOUT"] = "2"
    procs = spawn_faults(3, tmp_path, mode, str(victim), env=env)
    try:
        outs = collect(procs, victim, 40)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
    for r, (code, out, err) in outs.items():
        assert code == 0 and "DONE" in out, (r, out, err[-3000:])
        assert "FAILED CommTimeoutError" in out, out
        assert re.search(r"waiting for .* from rank [0-9]", out), out
        # Its exit waits for the frozen rank once (a clean close's bound,
        # connections.CLOSE_SECONDS), not once for its notices and again for
        # its connections.
        failed = float(re.search(r"FAILED \w+ at ([\d.]+)", out).group(1))
        exited = float(re.search(r"EXITED at ([\d.]+)", out).group(1))
        assert exited - failed < 3.0, (r, exited - failed, out)
