"""Survivors carry on (Group.agree, Group.failed, Group.shrink) with real
processes, a rank dying at each moment: before agree, at every message of
agree and shrink, between two shrinks, frozen, slow but alive; 8 ranks
losing 3 one after another (tests/workers/survivors.py)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest

from .conftest import WORKERS, spawn_world


def run_world(n, tmp_path, *args, env=None, timeout=60):
    procs = spawn_world(n, tmp_path, [str(WORKERS / "survivors.py"), *map(str, args)], env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
            pytest.fail(f"a rank hung: {out}\n{err[-3000:]}")
        outs.append((p.returncode, out, err))
    return outs


def survivors_agree(outs, dead):
    """Every rank not in ``dead`` exited 0 and printed the same lines; the dead were killed."""
    lines = None
    for rank, (code, out, err) in enumerate(outs):
        if rank in dead:
            assert code == -signal.SIGKILL, (rank, code, out, err[-2000:])
            continue
        assert code == 0, (rank, out, err[-3000:])
        mine = [line for line in out.splitlines() if line.split()[0] in ("AGREE", "SHRINK", "STEP")]
        assert mine, (rank, out)
        if lines is None:
            lines = mine
        assert mine == lines, (rank, mine, lines)
    return lines


@pytest.mark.timeout(60)
def test_a_rank_dead_before_agree_is_agreed_failed_and_left_out(tmp_path):
    lines = survivors_agree(run_world(4, tmp_path, "before", 2), dead={2})
    assert lines == ["AGREE True failed [2]", "SHRINK size 3 members [0, 1, 3] sum 7"]


@pytest.mark.timeout(60)
def test_a_slow_rank_is_waited_for_and_its_flag_counts(tmp_path):
    lines = survivors_agree(run_world(4, tmp_path, "slow", 2), dead=set())
    assert lines == ["AGREE False failed []", "SHRINK size 4 members [0, 1, 2, 3] sum 10"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("moment", [
    (0, 1),  # the first leader, before its first flag
    (0, 4),  # the first leader, after its flags, before its proposal went to everyone
    (2, 4),  # a follower, between its flags and its acknowledgement
    (1, 9),  # in shrink's first agreement
    (3, 14),  # in shrink's second agreement
])
def test_a_rank_killed_during_agree_or_shrink(tmp_path, moment):
    victim, n = moment
    lines = survivors_agree(run_world(4, tmp_path, "moment", victim, n), dead={victim})
    assert re.fullmatch(r"AGREE False failed \[(\d)?\]", lines[0]), lines
    survivors = [r for r in range(4) if r != victim]
    assert lines[1] == f"SHRINK size 3 members {survivors} sum {sum(r + 1 for r in survivors)}"


@pytest.mark.timeout(60)
def test_two_ranks_killed_during_one_agreement(tmp_path):
    lines = survivors_agree(run_world(4, tmp_path, "moment", 0, 5, 1, 4), dead={0, 1})
    assert lines[1] == "SHRINK size 2 members [2, 3] sum 7"


@pytest.mark.timeout(90)
def test_eight_ranks_lose_three_one_after_another(tmp_path):
    lines = survivors_agree(run_world(8, tmp_path, "chain", 3, 0, 6, timeout=80), dead={0, 3, 6})
    assert lines == ["STEP 0 size 7 members [0, 1, 2, 4, 5, 6, 7] sum 32",
                     "STEP 1 size 6 members [1, 2, 4, 5, 6, 7] sum 31",
                     "STEP 2 size 5 members [1, 2, 4, 5, 7] sum 24"]


@pytest.mark.timeout(60)
def test_a_frozen_rank_is_given_up_on_and_never_rejoins(tmp_path):
    procs = spawn_world(4, tmp_path, [str(WORKERS / "survivors.py"), "frozen", "1"],
                        env={"SURVIVORS_TIMEOUT": "2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        outs = {}
        for rank in (0, 2, 3):
            outs[rank] = procs[rank].communicate(timeout=40)
        # every survivor is done: wake the frozen rank, which must learn it is out
        os.kill(procs[1].pid, signal.SIGCONT)
        outs[1] = procs[1].communicate(timeout=20)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    for rank in (0, 2, 3):
        out, err = outs[rank]
        assert procs[rank].returncode == 0, (rank, out, err[-3000:])
        assert "AGREE True failed [1]" in out and "SHRINK size 3 members [0, 2, 3] sum 8" in out, (rank, out, err)
    out, err = outs[1]
    assert procs[1].returncode == 0, (out, err[-3000:])
    assert "EXCLUDED rank 1: rank" in out and "declared this rank failed" in out, (out, err[-3000:])
    assert "EXCLUDED AGAIN" in out, out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_no_survivor_ever_disagrees_over_randomized_kill_moments(tmp_path):
    _randomized(tmp_path, 50)


@pytest.mark.timeout(120)
def test_no_survivor_disagrees_over_a_few_randomized_kill_moments(tmp_path):
    _randomized(tmp_path, 4)


def _randomized(tmp_path, runs):
    rng = random.Random(int(os.environ.get("SURVIVORS_SEED", "2026")))
    for run in range(runs):
        n = rng.choice([3, 4, 5])
        victims = rng.sample(range(n), rng.choice([1, 1, 2]))
        args = []
        for v in victims:
            args += [v, rng.randint(1, 3 * n)]
        d = tmp_path / str(run)
        d.mkdir()
        outs = run_world(n, d, "moment", *args)
        dead = {r for r, (code, _, _) in enumerate(outs) if code == -signal.SIGKILL}
        assert dead <= set(victims), (run, n, args, outs)
        lines = survivors_agree(outs, dead)
        members = [r for r in range(n) if r not in dead]
        assert lines[1].startswith(f"SHRINK size {len(members)} members {members}"), (run, n, args, lines)
