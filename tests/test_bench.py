"""The benchmark tools run and check their results (tiny sizes: a smoke test, not a timing)."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT, clean_env


def _json_rows(out):
    rows = []
    for line in out.splitlines():
        line = line.split("] ", 1)[1] if line.startswith("[rank ") else line
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


@pytest.mark.timeout(120)
@pytest.mark.parametrize("op", ["all_sum", "all_gather", "sum_scatter", "sendrecv"])
@pytest.mark.parametrize("face", ["blocking", "async"])
def test_bench_runs_and_checks(op, face):
    proc = subprocess.run([sys.executable, "-m", "launcher", "-n", "2", sys.executable, "-m", "aiocomm.bench",
                           "--op", op, "--sizes", "8,40K", "--iters", "3", "--small-iters", "3", "--face", face, "--json"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _json_rows(proc.stdout)
    assert len(rows) == 2 and all(r["correct"] for r in rows)
    if op == "all_sum":
        assert rows[1]["wire_per_buffer"] == pytest.approx(1.0, rel=0.01)  # 2(n-1)/n on 2 ranks


@pytest.mark.timeout(120)
def test_duplex_reference_runs():
    proc = subprocess.run([sys.executable, "-m", "aiocomm.bench.peers", "duplex", "--sizes", "64K", "--iters", "2", "--small-iters", "2"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _json_rows(proc.stdout)[0]["peer"] == "duplex-reference"
