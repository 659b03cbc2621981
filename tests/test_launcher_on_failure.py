"""``aiocomm-launch --on-failure stop|continue``: a job that carries on after a rank dies.

The workers form the world and then never communicate again (what happens
to a collective that a death interrupts is the runtime's business, not the
launcher's), so each job here is about the launcher alone: who it reports,
whom it stops, and the job's status.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

import pytest

from .conftest import ROOT, WORKERS, clean_env
from .test_launcher import _processes_with_env as _job_processes

SURVIVORS = str(WORKERS / "launcher_survivors.py")
LOSS = "aiocomm-launch: rank {rank} (host 127.0.0.1) {how}; the other ranks carry on (--on-failure continue)"


def _launch(n: int, *plan: str, on_failure: str | None = "continue", launcher_args: tuple[str, ...] = (),
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The job with its stderr and stdout in one pipe (``2>&1``), so the order of lines shows."""
    choice = () if on_failure is None else ("--on-failure", on_failure)
    cmd = [sys.executable, "-m", "launcher", "-n", str(n), *choice, *launcher_args, SURVIVORS, *plan]
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(**(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.timeout(90)
def test_continue_reports_the_dead_rank_and_the_others_finish():
    proc = _launch(4, "2=kill@0.3", env={"AIOCOMM_TEST_LINGER": "2"})
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    loss = LOSS.format(rank=2, how="was killed by SIGKILL")
    assert out.count(loss) == 1, out
    for rank in (0, 1, 3):  # the survivors ran to their end, after the report
        assert f"[rank {rank}] carried on continue" in out, out
        assert out.index(loss) < out.index(f"[rank {rank}] carried on"), out
    assert "[rank 2] carried on" not in out
    assert _last_line(proc) == ("aiocomm-launch: the job carried on without rank 2 (killed by SIGKILL); "
                                "ranks 0, 1, 3 exited 0")
    assert "(the cause)" not in out and "aiocomm-launch: trace:" not in out


@pytest.mark.timeout(90)
def test_stop_is_still_the_default():
    # rank 3 exits 0 early (no failure); rank 2's death stops ranks 0 and 1, which would sleep 30 s.
    start = time.monotonic()
    proc = _launch(4, "2=kill@0.5", "3=0@0.1", on_failure=None, env={"AIOCOMM_TEST_LINGER": "30"})
    assert proc.returncode == 128 + signal.SIGKILL, proc.stdout[-3000:]
    assert time.monotonic() - start < 25
    assert "carry on" not in proc.stdout
    assert "[rank 3] carried on stop" in proc.stdout  # AIOCOMM_ON_FAILURE
    assert _last_line(proc) == ("aiocomm-launch: rank 2 killed by SIGKILL (the cause); "
                                "ranks 0, 1 stopped by the launcher")


@pytest.mark.timeout(90)
def test_a_job_whose_every_rank_dies_fails():
    proc = _launch(4, "0=kill@0.2", "1=kill@0.6", "2=kill@1.0", "3=kill@1.4")
    assert proc.returncode == 128 + signal.SIGKILL, proc.stdout[-3000:]
    for rank in (0, 1, 2):
        assert LOSS.format(rank=rank, how="was killed by SIGKILL") in proc.stdout
    assert "rank 3 (host" not in proc.stdout  # nobody carried on after the last one
    assert _last_line(proc) == ("aiocomm-launch: rank 3 killed by SIGKILL (the cause); the job carried on without "
                                "ranks 0, 1, 2 (killed by SIGKILL)")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("plan,status,losses,last", [
    # A survivor that fails once the others have finished: counted against the job, as with stop.
    (("2=kill@0.3", "1=3@3"), 3, {2: "was killed by SIGKILL"},
     "aiocomm-launch: rank 1 exited with code 3 (the cause); the job carried on without rank 2 (killed by SIGKILL)"),
    # A second death while the others still run: carried on after too.
    (("2=kill@0.3", "1=4@1.0"), 0, {2: "was killed by SIGKILL", 1: "exited with code 4"},
     "aiocomm-launch: the job carried on without rank 1 (exited with code 4) and rank 2 (killed by SIGKILL); "
     "ranks 0, 3 exited 0"),
    # Once a rank has ended its program (exit 0), the job is finishing: a death then ends it.
    (("3=0@0.1", "2=kill@1.0"), 128 + signal.SIGKILL, {},
     "aiocomm-launch: rank 2 killed by SIGKILL (the cause)"),
], ids=["fails-after-the-others", "second-loss", "after-an-exit-0"])
def test_which_failures_the_job_carries_on_after(plan, status, losses, last):
    proc = _launch(4, *plan, env={"AIOCOMM_TEST_LINGER": "2"})
    assert proc.returncode == status, proc.stdout[-3000:]
    for rank, how in losses.items():
        assert LOSS.format(rank=rank, how=how) in proc.stdout, proc.stdout
    assert proc.stdout.count("carry on (--on-failure continue)") == len(losses), proc.stdout
    assert _last_line(proc).startswith(last), proc.stdout[-3000:]


@pytest.mark.timeout(90)
def test_no_trace_verdict_on_a_death_the_job_survived(tmp_path):
    # Every survivor writes its record after rank 2's death, as the runtime
    # does when a call fails because of it; rank 1 then fails on its own,
    # after the others finished.  The records tell of the death the job
    # survived: the launcher does not draw a verdict from them.
    proc = _launch(4, "2=kill@0.3", "1=3@3", env={"AIOCOMM_TEST_RECORD": "0.8", "AIOCOMM_TEST_LINGER": "1.5",
                                                   "AIOCOMM_TRACE_DIR": str(tmp_path)})
    assert proc.returncode == 3, proc.stdout[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0.jsonl", "rank-1.jsonl", "rank-3.jsonl"]
    assert "aiocomm-launch: trace:" not in proc.stdout, proc.stdout
    assert _last_line(proc).startswith("aiocomm-launch: rank 1 exited with code 3 (the cause)")


@pytest.mark.timeout(90)
def test_a_timeout_after_a_survived_death_reads_the_records_it_asked_for():
    proc = _launch(3, "2=kill@0.3", launcher_args=("--timeout", "4"),
                   env={"AIOCOMM_TEST_RECORD": "0.6", "AIOCOMM_TEST_LINGER": "60"})
    assert proc.returncode == 124, proc.stdout[-3000:]
    assert "aiocomm-launch: trace: records of ranks 0, 1; none from rank 2" in proc.stdout, proc.stdout
    assert _last_line(proc) == ("aiocomm-launch: the job timed out after 4 s; the job carried on without rank 2 "
                                "(killed by SIGKILL); ranks 0, 1 stopped by the launcher")


@pytest.mark.timeout(90)
def test_sigterm_to_the_launcher_still_ends_every_rank():
    job = f"AIOCOMM_TEST_JOB={uuid.uuid4().hex}"
    cmd = [sys.executable, "-m", "launcher", "-n", "4", "--on-failure", "continue", SURVIVORS, "2=kill@0.3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(AIOCOMM_TEST_LINGER="60", **dict([job.split("=")])),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    while (line := proc.stdout.readline()) and "carry on" not in line:
        seen.append(line)
    assert line == LOSS.format(rank=2, how="was killed by SIGKILL") + "\n", "".join(seen)
    assert len(_job_processes(job)) >= 6  # three agents and their ranks carry on
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    rest = proc.stdout.read()
    assert proc.wait(30) == 128 + signal.SIGTERM, rest
    assert time.monotonic() - start < 20
    assert rest.strip().splitlines()[-1] == ("aiocomm-launch: the launcher got SIGTERM; the job carried on without "
                                             "rank 2 (killed by SIGKILL); ranks 0, 1, 3 stopped by the launcher")
    deadline = time.monotonic() + 10
    while _job_processes(job) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _job_processes(job), "a process of the job outlived its launcher"


def test_mpi_backend_refuses_to_carry_on_across_hosts():
    proc = subprocess.run([sys.executable, "-m", "launcher", "--backend", "mpi", "--hosts", "127.0.0.2,127.0.0.3",
                           "--on-failure", "continue", SURVIVORS], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("aiocomm-launch: --backend mpi --on-failure continue needs every rank on this host:")
    assert "--enable-recovery" in proc.stderr


# --- the pure rule ------------------------------------------------------------------------------


def test_carry_on_rule_in_the_order_ranks_end():
    from launcher.blame import CarryOn

    rule = CarryOn(range(4))
    assert rule.ended(2, -9, False)  # a death while the others run
    assert rule.ended(1, 3, False)  # another one
    assert not rule.ended(0, 0, False)  # the job is finishing now
    assert not rule.ended(3, 5, False)
    assert rule.lost == [2, 1]
    rule = CarryOn(range(2))
    assert not rule.ended(0, -15, True)  # stopped by the launcher: never lost
    assert not rule.ended(1, 1, False)  # the last one: nobody carried on
    rule = CarryOn(range(4))
    rule.left(1)  # (under MPI) rank 1 leaves its program, and fails: lost, its own leaving aside
    assert rule.ended(1, 3, False)
    rule.left(0)  # rank 0 leaves its program; its status comes later (MPI_Finalize)
    assert not rule.ended(2, -9, False)  # the job is finishing
    assert rule.lost == [1]


def test_blame_of_a_job_that_carried_on():
    from launcher.blame import RankOutcome, decide, summary

    def outcomes(*specs):
        out = {}
        for rank, (code, culprit, ended, lost) in enumerate(specs):
            records = [] if culprit is None else [{"error": "PeerLostError", "culprit": culprit, "message": "lost"}]
            out[rank] = RankOutcome(rank, code, False, records, ended, lost=lost)
        return out

    # rank 2 lost; the others exited 0: no cause, status 0.
    job = outcomes((0, 2, 3.0, False), (0, None, 3.0, False), (-9, None, 1.0, True))
    verdict = decide(job)
    assert (verdict.cause, verdict.status, verdict.lost) == (None, 0, [2])
    assert summary(job, verdict) == "the job carried on without rank 2 (killed by SIGKILL); ranks 0, 1 exited 0"
    # rank 1 failed because of lost rank 2 after all (it names it): rank 2 is the cause again.
    job = outcomes((1, 2, 2.0, True), (1, 2, 3.0, False), (-9, None, 1.0, True))
    verdict = decide(job)
    assert (verdict.cause, verdict.status, verdict.victims, verdict.lost) == (2, 137, {0: 2, 1: 2}, [])
    assert summary(job, verdict) == "rank 2 killed by SIGKILL (the cause); ranks 0, 1 failed because of rank 2"
    # a failure of its own after the loss: that one is the cause, not the (earlier) lost rank.
    job = outcomes((0, None, 3.0, False), (3, None, 3.5, False), (-9, None, 1.0, True))
    verdict = decide(job)
    assert (verdict.cause, verdict.status, verdict.lost) == (1, 3, [2])
