"""The local launcher: exit status, stopping the other ranks, output prefixes."""

import os
import re
import time

import pytest

from .conftest import launch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how,code,summary", [
    ("exit", 3, "rank 1 exited with code 3"),
    ("kill", 128 + 9, "rank 1 killed by SIGKILL"),
])
def test_failing_rank_stops_the_job(how, code, summary):
    start = time.monotonic()
    proc = launch(3, "fail_rank.py", how, timeout=50)
    assert time.monotonic() - start < 30, "the other ranks were not stopped"
    assert proc.returncode == code, proc.stderr
    assert summary in proc.stderr
    pids = [int(p) for p in re.findall(r"pid (\d+)", proc.stdout)]
    assert len(pids) == 3
    time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a rank outlived the launcher"


@pytest.mark.timeout(60)
def test_output_lines_are_whole_and_prefixed():
    proc = launch(4, "chatty.py")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 800
    for line in lines:
        m = re.fullmatch(r"\[rank (\d)\] line (\d+) from (\d) end", line)
        assert m and m.group(1) == m.group(3), line


@pytest.mark.timeout(60)
def test_no_prefix():
    proc = launch(2, "chatty.py", launcher_args=("--no-prefix",))
    assert proc.returncode == 0
    assert all(line.startswith("line ") for line in proc.stdout.splitlines())


@pytest.mark.timeout(60)
def test_job_timeout():
    start = time.monotonic()
    proc = launch(2, "fail_rank.py", "none", launcher_args=("--timeout", "2"), timeout=50)
    assert proc.returncode == 124 and "timed out" in proc.stderr
    assert time.monotonic() - start < 20
