"""Survivors carry on (Group.agree, Group.failed, Group.shrink) with real
processes, a rank dying at each moment: before agree, at every message of
agree and shrink, between two shrinks, frozen, slow but alive; 8 ranks
losing 3 one after another (tests/workers/survivors.py)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .conftest import WORKERS, clean_env, spawn_world


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


@pytest.mark.timeout(60)
def test_the_async_face_on_a_split_group(tmp_path):
    outs = run_world(6, tmp_path, "async", 2)
    evens = [outs[r] for r in (0, 4)]
    for code, out, err in evens:
        assert code == 0, (out, err[-3000:])
        assert "AGREE True failed [1]" in out and "SHRINK size 2 members [0, 4] sum 6" in out, (out, err[-3000:])
    for r in (1, 3, 5):  # the odd group lost nobody: it ran its own agreement and shrink
        code, out, err = outs[r]
        assert code == 0 and "AGREE True failed []" in out and "SHRINK size 3 members [1, 3, 5] sum 12" in out, (
            out, err[-3000:])


@pytest.mark.timeout(60)
def test_the_launcher_blames_a_survivor_for_its_own_later_failure():
    """A survivor caught the loss (its PeerLostError names the dead rank, and
    goes to the launcher's failure records), shrank, and later failed on its
    own: the launcher names it, with its own status, not the dead rank."""
    proc = subprocess.run([sys.executable, "-m", "launcher", "-n", "4", "--on-failure", "continue",
                           str(WORKERS / "survivors.py"), "blame", "2"],
                          cwd=WORKERS.parent.parent, env=clean_env(), capture_output=True, text=True, timeout=50)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "rank 0 exited with code 3 (the cause)" in last, proc.stderr[-3000:]
    assert proc.stdout.count("SHRINK size 3 members [0, 1, 3] sum 7") == 3, proc.stdout


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun and mpi4py")
@pytest.mark.timeout(90)
def test_the_mpi_backend_says_what_its_library_lacks():
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    OMPI_MCA_rmaps_base_oversubscribe="1")
    proc = subprocess.run([shutil.which("mpirun"), "-n", "2", sys.executable, str(WORKERS / "survivors.py"), "mpi"],
                          env=env, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "NOT REFUSED" in proc.stdout:  # an MPI library with ULFM: its own agree and shrink ran
        pytest.skip("this MPI library has ULFM")
    assert proc.stdout.count("REFUSED rank") == 4, proc.stdout
    assert "needs the MPI library's fault-tolerance extension (ULFM)" in proc.stdout, proc.stdout
    assert "MPIX_Comm_agree" in proc.stdout and "Use the ring backend" in proc.stdout, proc.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim,n,how", [(0, 1, "stop"), (0, 4, "sleep"), (2, 3, "sleep"), (2, 6, "stop")])
def test_a_rank_that_stands_still_mid_agreement_never_carries_on_alone(tmp_path, victim, n, how):
    """Frozen (SIGSTOP) or with its loop blocked, at a chosen message of an
    agreement, for longer than the timeout: the others give up on it and
    carry on; when it moves again it must learn it is out -- not take its own
    stall for everyone else's silence, nor their closed connections for
    their deaths, and decide alone (an adversarial review found both)."""
    outs = run_world(4, tmp_path, "stall", victim, n, env={"SURVIVORS_TIMEOUT": "1", "SURVIVORS_STALL": how})
    code, out, err = outs[victim]
    assert code == 0 and "VICTIM OUT" in out and "VICTIM SHRANK" not in out, (out, err[-3000:])
    lines = None
    for rank, (code, out, err) in enumerate(outs):
        if rank == victim:
            continue
        assert code == 0, (rank, out, err[-3000:])
        mine = [line for line in out.splitlines() if line.startswith(("AGREE", "SHRINK"))]
        lines = lines or mine
        assert mine == lines, (rank, mine, lines)
    survivors = [r for r in range(4) if r != victim]
    assert lines[-1] == f"SHRINK size 3 members {survivors} sum {sum(r + 1 for r in survivors)}", lines


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


def test_the_mpi_backend_drives_ulfm_where_the_library_has_it(monkeypatch):
    """No MPI library here has ULFM: a stand-in communicator with ULFM's calls
    checks what the backend does with them (MPIX_Comm_agree's value, the
    failed ranks it acknowledged, MPIX_Comm_shrink's survivors in order)."""
    from aiocomm.backends.mpi import backend, library

    class Grp:
        def __init__(self, ranks):
            self.ranks = ranks

        def Get_size(self):
            return len(self.ranks)

    class FakeMPI:
        ERRORS_RETURN = "errors-return"

        class Group:
            @staticmethod
            def Translate_ranks(group, ranks, _parent):
                return [group.ranks[r] for r in ranks]

    class Shrunk:
        def Set_errhandler(self, handler):
            self.handler = handler

        def Get_size(self):
            return 3

        def Get_group(self):
            return Grp([0, 2, 3])  # parent ranks of the survivors

        def Get_rank(self):
            return 1

    class Comm:
        def Agree(self, flag):
            return flag & 0

        def Ack_failed(self):
            return 1

        def Get_failed(self):
            return Grp([1])

        def Get_group(self):
            return Grp([0, 1, 2, 3])

        def Shrink(self):
            return Shrunk()

    class Handle:
        comm = Comm()

    class G:
        members = (10, 11, 12, 13)
        context = 7
        handle = Handle()

    monkeypatch.setattr(library, "ulfm_missing", lambda: None)
    be = object.__new__(backend.MpiBackend)
    be.MPI, be.rank = FakeMPI, 12
    coro = be.agree(G(), 0, True, (), 5.0)
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    assert done.value.value == (False, (1,))
    result = be.shrink(G(), 2, (1,), 5.0)
    assert result.members == (10, 12, 13) and result.rank == 1
    assert result.handle.comm.handler == "errors-return" and result.handle.members == (10, 12, 13)
