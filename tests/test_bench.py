"""The benchmark tools run and check their results (tiny sizes: a smoke test, not a timing)."""

import json
import subprocess
import sys

import numpy as np
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
@pytest.mark.parametrize("op,face,transport", [
    *[(op, "blocking", "shm") for op in ("all_sum", "all_gather", "sum_scatter", "broadcast")],
    ("sendrecv", "blocking", "tcp"),  # (messages always move over TCP)
    *[(op, "async", "tcp") for op in ("all_sum", "all_gather", "sum_scatter", "sendrecv", "broadcast")],
    ("all_sum", "blocking", "tcp"), ("all_sum", "async", "shm"),
])
def test_bench_runs_and_checks(op, face, transport):
    proc = subprocess.run([sys.executable, "-m", "launcher", "-n", "2", sys.executable, "-m", "aiocomm.bench",
                           "--op", op, "--sizes", "8,40K", "--iters", "3", "--small-iters", "3", "--face", face,
                           "--transport", transport, "--json"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _json_rows(proc.stdout)
    assert len(rows) == 2 and all(r["correct"] for r in rows)
    assert all(r["transport"] == transport for r in rows), rows
    if op == "all_sum":
        # 2(n-1)/n of the buffer on the wire on 2 ranks over TCP; none through shared memory
        assert rows[1]["wire_per_buffer"] == pytest.approx(1.0 if transport == "tcp" else 0.0, abs=0.01)


def test_average_combines_the_ranks_times_per_iteration():
    from aiocomm.bench.run import combine

    per_rank = np.array([[1.0, 5.0, 2.0], [3.0, 1.0, 4.0]])  # 2 ranks, 3 iterations
    assert combine(per_rank, "avg").tolist() == [2.0, 3.0, 3.0]
    assert combine(per_rank, "max").tolist() == [3.0, 5.0, 4.0]
    assert combine(per_rank, "min").tolist() == [1.0, 1.0, 2.0]
    assert combine(per_rank, "rank0").tolist() == [1.0, 5.0, 2.0]
    with pytest.raises(ValueError, match="--average"):
        combine(per_rank, "median")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("average", ["avg", "max"])
def test_bench_average_option(average):
    proc = subprocess.run([sys.executable, "-m", "launcher", "-n", "2", sys.executable, "-m", "aiocomm.bench",
                           "--sizes", "8", "--small-iters", "5", "--average", average, "--json"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = _json_rows(proc.stdout)
    assert row["average"] == average and row["correct"] and row["min_us"] <= row["median_us"] <= row["max_us"]


@pytest.mark.timeout(120)
def test_duplex_reference_runs():
    proc = subprocess.run([sys.executable, "-m", "aiocomm.bench.peers", "duplex", "--sizes", "64K", "--iters", "2",
                           "--small-iters", "2"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _json_rows(proc.stdout)[0]["peer"] == "duplex-reference"
