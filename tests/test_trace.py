"""The record of recent operations (aiocomm.trace) and its verdict, in real jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiocomm.trace.verdict import GroupInfo, Op, RankRecord, verdict

from .conftest import ROOT, WORKERS, clean_env, launch, spawn_world
from .test_mpi import MPI_ENV, MPI_SKIP

PY = sys.executable


def trace_lines(stderr: str) -> list[str]:
    prefix = "aiocomm-launch: trace: "
    return [line[len(prefix):] for line in stderr.splitlines() if line.startswith(prefix)]


def check_skip_verdict(lines: list[str], detail: str) -> None:
    text = "\n".join(lines)
    assert "rank 2 is behind: ranks 0, 1 are waiting in all_sum seq 5" in text, detail
    assert "of the world group, which rank 2 has not started" in text, detail
    disagree = next((line for line in lines if line.startswith("ranks disagree on the sequence of the world group: ")),
                    None)
    assert disagree is not None, detail
    # ranks 0 and 1 started 6 (listed together, or apart when their last call ended differently: one
    # timed out, the other failed once it heard), rank 2 started 5
    assert "ranks 0, 1 started 6 collectives" in disagree or (
        "rank 0 started 6 collectives" in disagree and "rank 1 started 6 collectives" in disagree), detail
    assert "rank 2 started 5 collectives, last all_sum seq 4 (completed)" in disagree, detail
    assert not any(line.startswith(("rank 0 is behind", "rank 1 is behind")) for line in lines), detail


@pytest.mark.timeout(90)
@pytest.mark.parametrize("face", ["blocking", "aio"])
def test_launcher_names_the_rank_that_skipped_an_all_sum(tmp_path: Path, face: str) -> None:
    """Rank 2 of 3 skips the 5th all_sum: ranks 0 and 1 time out in their 6th
    (the launcher alone would blame one of them); the verdict names rank 2, the
    collective and group they wait in, and the sequence disagreement -- from
    the launcher and from the files, and the files make a Chrome trace."""
    trace = tmp_path / "trace"
    proc = launch(3, "trace_skip.py", "2", face, timeout=80,
                  env={"AIOCOMM_TIMEOUT": "2", "AIOCOMM_TRACE_DIR": str(trace)})
    detail = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode != 0, detail
    lines = trace_lines(proc.stderr)
    check_skip_verdict(lines, detail)
    # rank 2 was asked (SIGUSR1) for its record before it was stopped
    assert "rank 2 is in no aiocomm call: its last was all_sum seq 4" in "\n".join(lines), detail
    assert sorted(os.listdir(trace)) == ["rank-0.jsonl", "rank-1.jsonl", "rank-2.jsonl"]

    chrome = tmp_path / "trace.json"
    cli = subprocess.run([PY, "-m", "aiocomm.trace", str(trace), "--chrome", str(chrome)], cwd=ROOT,
                         env=clean_env(), capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines()[:len(lines)] == lines  # the same verdict from the files
    doc = json.loads(chrome.read_text())
    events = doc["traceEvents"]
    ops = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in ops} == {0, 1, 2} and {e["tid"] for e in ops} == {0}
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "rank 0", 1: "rank 1", 2: "rank 2"}
    per_rank = {r: sorted((e for e in ops if e["pid"] == r), key=lambda e: e["ts"]) for r in range(3)}
    assert [len(per_rank[r]) for r in range(3)] == [6, 6, 5]
    assert all(e["name"] == "all_sum" and e["dur"] >= 0 and isinstance(e["ts"], float) for e in ops)
    assert per_rank[0][-1]["args"]["state"] == "timed out" and per_rank[0][-1]["dur"] >= 1.8e6


@pytest.mark.timeout(90)
def test_the_launchers_own_timeout_gives_the_verdict(tmp_path: Path) -> None:
    """No rank times out (no AIOCOMM_TIMEOUT): the job hangs until the
    launcher's --timeout, which asks every rank for its record before it
    stops them, keeps the records as they were then, and names rank 2 as
    the one behind (status 124)."""
    proc = launch(3, "trace_skip.py", "2", "blocking", timeout=80, launcher_args=("--timeout", "4"))
    detail = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 124, detail
    lines = trace_lines(proc.stderr)
    check_skip_verdict(lines, detail)
    text = "\n".join(lines)
    assert "rank 2 is in no aiocomm call: its last was all_sum seq 4" in text and "(SIGUSR1)" in text, detail
    # the records as the ranks wrote them when asked, not as stopping them left them (ranks 0 and 1
    # failing once the others were stopped wrote again: a CI run's verdict said 'failed' of rank 0)
    assert "ranks 0, 1 started 6 collectives, last all_sum seq 5 (started)" in text, detail
    assert "the job timed out after 4 s" in proc.stderr.splitlines()[-1], detail


@MPI_SKIP
@pytest.mark.timeout(120)
def test_mpi_backend_records_and_the_launcher_names_the_rank_that_skipped(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    proc = launch(3, "trace_skip.py", "2", "blocking", "mpi", timeout=110, launcher_args=("--backend", "mpi"),
                  env={**MPI_ENV, "AIOCOMM_TIMEOUT": "2", "AIOCOMM_TRACE_DIR": str(trace)})
    detail = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode != 0, detail
    lines = trace_lines(proc.stderr)
    assert "rank 2 is behind: ranks 0, 1 are waiting in all_sum seq 5 [float32[4]] of the world group" \
        in "\n".join(lines), detail
    head = json.loads((trace / "rank-0.jsonl").read_text().splitlines()[1])
    assert head["backend"] == "mpi", head


@pytest.mark.timeout(60)
def test_sigusr1_writes_the_record_while_the_rank_runs(tmp_path: Path) -> None:
    trace, go = tmp_path / "trace", tmp_path / "go"
    procs = spawn_world(2, tmp_path, [str(WORKERS / "trace_signal.py"), str(go)],
                        env={"AIOCOMM_TRACE_DIR": str(trace)}, stdout=subprocess.PIPE)
    try:
        pids = []
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.startswith("READY"), line
            pids.append(int(line.split()[1]))
        os.kill(pids[1], signal.SIGUSR1)
        path = trace / "rank-1.jsonl"
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        go.touch()
        outs = [p.communicate(timeout=30)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0] and all("OK" in out for out in outs), outs
    assert not (trace / "rank-0.jsonl").exists()  # only the rank signalled wrote
    head, groups = rows[0], [r for r in rows if "members" in r]
    ops = [r for r in rows if "op" in r]
    assert head["trace"] == 1 and head["rank"] == 1 and head["size"] == 2 and head["reason"] == "SIGUSR1"
    assert {g["group"] for g in groups} == {0, ops[4]["group"]} and all(g["backend"] == "ring" for g in groups)
    summary = [(r["op"], r["seq"], r["dtype"], r["shape"], r["peer"], r["state"]) for r in ops]
    assert summary == [
        ("all_sum", 0, "int32", [5], None, "completed"),
        ("all_sum", 1, "int32", [5], None, "completed"),
        ("all_sum", 2, "int32", [5], None, "completed"),
        ("split", 3, None, None, None, "completed"),
        ("all_gather", 0, "float64", [2, 3], None, "completed"),
        ("recv", 0, "uint8", [7], 0, "completed"),
    ]
    assert all(r["start"] <= r["end"] <= head["written"] for r in ops)


@pytest.mark.timeout(30)
def test_buffer_keeps_the_last_n_and_zero_records_nothing(tmp_path: Path) -> None:
    code = ("import aiocomm, aiocomm.trace, numpy as np, os, signal, sys, time\n"
            "for i in range(12): aiocomm.all_max(np.arange(i + 1))\n"
            "if sys.argv[1] == '0':\n"
            "    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL and aiocomm.trace.write('x') is None\n"
            "else:\n"
            "    os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)\n")
    for size, expect in (("5", [7, 8, 9, 10, 11]), ("0", None)):
        trace = tmp_path / f"trace{size}"
        subprocess.run([PY, "-c", code, size], cwd=ROOT, check=True, timeout=25,
                       env=clean_env(AIOCOMM_TRACE_DIR=str(trace), AIOCOMM_TRACE_BUFFER=size))
        if expect is None:  # nothing recorded, nothing written, SIGUSR1 left to the program
            assert not trace.exists()
            continue
        rows = [json.loads(line) for line in (trace / "rank-0.jsonl").read_text().splitlines()]
        assert rows[0]["full"] is True and rows[0]["buffer"] == 5
        assert [(r["seq"], r["shape"]) for r in rows if "op" in r] == [(s, [s + 1]) for s in expect]


@pytest.mark.timeout(30)
def test_the_record_is_written_when_a_thread_dies_and_at_exit_after_a_failure(tmp_path: Path) -> None:
    """A rank one of whose threads ends with an exception writes its record;
    so does a rank that leaves (any status) after a call failed with an error
    that is not a CommError (an interrupt), and one whose calls all
    completed and that leaves with sys.exit(3); one that raises
    SystemExit(3) itself is not seen, and one that exits 0 writes none."""
    code = ("import aiocomm, aiocomm.trace, numpy as np, sys, threading\n"
            "aiocomm.all_sum(np.ones(3))\n"
            "if sys.argv[1] == 'thread':\n"
            "    t = threading.Thread(target=lambda: 1 / 0, name='worker'); t.start(); t.join()\n"
            "    import os, json; print(json.loads(open(os.path.join(os.environ['AIOCOMM_TRACE_DIR'],"
            " 'rank-0.jsonl')).readline())['reason'])\n"
            "elif sys.argv[1] == 'failed':\n"
            "    try:  # a Ctrl-C in the middle of a call (the entry the face makes for it)\n"
            "        with aiocomm.trace.call(aiocomm.init(), 'collectives', 'all_sum', (np.ones(1),)):\n"
            "            raise KeyboardInterrupt\n"
            "    except KeyboardInterrupt:\n"
            "        pass\n"
            "    aiocomm.all_sum(np.ones(2))\n"
            "if sys.argv[1] == 'zero':\n"
            "    sys.exit(0)\n"
            "if sys.argv[1] == 'raise':\n"
            "    raise SystemExit(3)\n"
            "sys.exit(3)\n")
    reasons = {}
    for mode in ("thread", "failed", "clean", "raise", "zero"):
        trace = tmp_path / mode
        proc = subprocess.run([PY, "-c", code, mode], cwd=ROOT, timeout=25, capture_output=True, text=True,
                              env=clean_env(AIOCOMM_TRACE_DIR=str(trace)))
        assert proc.returncode == (0 if mode == "zero" else 3), proc.stderr
        path = trace / "rank-0.jsonl"
        reasons[mode] = json.loads(path.read_text().splitlines()[0])["reason"] if path.exists() else None
        if mode == "thread":
            assert proc.stdout.strip() == "uncaught ZeroDivisionError in thread 'worker'", proc.stdout
    # (the thread's record, read while the rank ran, is written again at its sys.exit(3))
    assert reasons == {"thread": "sys.exit(3)",
                       "failed": "exit after a failed call", "clean": "sys.exit(3)", "raise": None,
                       "zero": None}, reasons


# ------------------------------------------------------------------ the verdict alone (synthetic records)


def record(rank: int, ops: list[tuple[int, int, str, int | None, str]], members: tuple[int, ...] = (0, 1, 2),
           written: float = 100.0) -> RankRecord:
    rec = RankRecord(rank, len(members), "SIGUSR1", written, f"rank-{rank}.jsonl", {0: GroupInfo(members, "ring")})
    for i, (group, seq, op, peer, state) in enumerate(ops):
        rec.ops.append(Op(group, seq, op, "float32", (4,), peer, state, float(i), None if state != "completed"
                          else float(i) + 0.5, None))
    return rec


def test_verdict_follows_a_receive_to_the_rank_that_never_sent() -> None:
    records = {
        0: record(0, [(0, 0, "recv", 1, "started")]),  # waits for rank 1's message
        1: record(1, [(0, 0, "recv", 2, "timed out")]),  # which waits for rank 2's
        2: record(2, [(0, 0, "barrier", None, "completed")]),
    }
    lines = verdict(records)
    assert "rank 2 is behind: rank 1 is waiting for it in recv seq 0 from rank 2 [float32[4]] of the world group" \
        in lines, lines
    assert not any(line.startswith("rank 1 is behind") for line in lines), lines


def test_verdict_names_different_operations_at_one_sequence_number() -> None:
    records = {
        0: record(0, [(0, 0, "all_sum", None, "completed"), (0, 1, "all_sum", None, "failed")], members=(0, 1)),
        1: record(1, [(0, 0, "all_sum", None, "completed"), (0, 1, "barrier", None, "failed")], members=(0, 1)),
    }
    lines = verdict(records)
    assert any(line.startswith("ranks called different operations at seq 1 of the world group: rank 0 all_sum")
               and "rank 1 barrier" in line for line in lines), lines


def test_verdict_without_a_record_names_the_silent_rank() -> None:
    lines = verdict({0: record(0, [(0, 0, "all_sum", None, "timed out")], members=(0, 1))})
    assert lines[0] == "records of rank 0; none from rank 1"
    assert lines[1].startswith("rank 1 is behind: rank 0 is waiting in all_sum seq 0"), lines


def test_verdict_names_two_ranks_that_wait_for_each_other_in_two_groups() -> None:
    """Rank 0 calls group A's all_sum first, rank 1 group B's: each waits in
    a collective the other has not started.  The verdict says they wait for
    each other, and never 'up to seq -1'."""
    a, b = 0xA, 0xB
    records = {}
    for rank, first in ((0, a), (1, b)):
        rec = record(rank, [(0, 0, "all_sum", None, "completed"), (first, 0, "all_sum", None, "started")],
                     members=(0, 1))
        rec.groups[a] = GroupInfo((0, 1), "ring")
        rec.groups[b] = GroupInfo((0, 1), "ring")
        records[rank] = rec
    lines = verdict(records)
    assert "ranks 0, 1 wait for each other: each is in a call another has not started" in "\n".join(lines), lines
    assert any("which rank 1 has not started (it has started none there)" in line for line in lines), lines
    assert not any("seq -1" in line for line in lines), lines
