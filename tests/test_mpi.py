"""The MPI backend in real mpirun jobs (skipped without mpirun and mpi4py)."""

import os
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, WORKERS, clean_env
from .test_launcher import _alive, _check_second_ctrl_c, _gone
from .test_launcher import _start_interrupt_job as start_interrupt_job

MPIRUN = shutil.which("mpirun")
try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

MPI_SKIP = pytest.mark.skipif(
    MPIRUN is None or not HAVE_MPI4PY,
    reason="needs Open MPI's mpirun and mpi4py (.ci/run installs both)",
)
pytestmark = MPI_SKIP

# Open MPI refuses root unless told, and more ranks than CPUs unless told.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}


def mpirun(n, script, *args, timeout=120, env=None):
    cmd = [MPIRUN, "-n", str(n), sys.executable, str(WORKERS / script), *args]
    return subprocess.run(cmd, cwd=WORKERS, env=clean_env(**MPI_ENV, **(env or {})), capture_output=True,
                          text=True, timeout=timeout)


def ok(proc, n, marker):
    detail = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, detail
    assert proc.stdout.count(marker) == n, detail


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 3])
def test_every_collective_every_dtype_over_mpi(n):
    ok(mpirun(n, "collectives_matrix.py", timeout=170), n, "OK ")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 4])
def test_p2p_split_faces_mismatch_timeout_over_mpi(n):
    ok(mpirun(n, "mpi_program.py", timeout=170), n, "OK mpi")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", ["collectives_matrix.py", "mpi_program.py"])
def test_groups_that_agree_by_reducing_a_hash_over_mpi(script):
    """Groups of more than collectives.GATHER_UP_TO ranks agree with an
    all-reduce of the call's hash and carry no input in it: forced here on
    3 ranks, every collective, dtype and shape, mismatches and timeouts."""
    ok(mpirun(3, "mpi_wide.py", script, timeout=170), 3, "OK ")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_large_reductions_go_around_the_ring_over_mpi(n):
    """Reductions from collectives.RING_FROM bytes on go around the ranks
    (a ring on 3, recursive halving on 2 and 4), out of place from the
    caller's array: odd sizes, both faces, NaN, bit-identical on every rank,
    parts in several messages, overflow to inf even where numpy is told to
    raise, fewer elements than ranks; one given up on (a timeout) while MPI
    reads the input, which no rank returns a result of; a Ctrl-C inside one
    (its buffers stay MPI's, the others raise); then the matrix's reductions
    with the threshold shrunk (tests/workers/mpi_ring.py).  The moments
    (given up on, interrupted; 10 s of waiting for late ranks) run on 3 and
    4 ranks, which cover the ring and halving in more than one round."""
    moments = n > 2
    proc = mpirun(n, "mpi_ring.py", *([] if moments else ["--no-moments"]), timeout=100)
    ok(proc, n, "OK ring sizes")
    assert proc.stdout.count("OK ring given up") == 2 * n * moments, proc.stdout + proc.stderr  # (blocking, async)
    assert proc.stdout.count("OK ring tiny") == n, proc.stdout + proc.stderr
    assert proc.stdout.count("OK ring interrupted") == n * moments, proc.stdout + proc.stderr
    assert proc.stdout.count(" collectives") == n, proc.stdout + proc.stderr  # (the matrix's "OK <count> collectives")


def test_large_results_are_made_on_memory_that_earlier_ones_gave_back():
    """An array of results.POOL_FROM bytes or more is made on the memory of
    one nobody holds any more (a view still holds it); the pool keeps at
    most POOL_BYTES; smaller arrays are numpy's own."""
    import numpy as np

    from aiocomm import results

    f4 = np.dtype(np.float32)
    n = results.POOL_FROM // 4
    a = results.copy_of(np.arange(n, dtype=f4))
    assert a.dtype == f4 and a.shape == (n,) and a.flags.c_contiguous and a[-1] == n - 1
    address = a.ctypes.data
    view = a[10:20]
    del a
    b = results.empty((n,), f4)
    assert b.ctypes.data != address  # the view holds it
    del view
    c = results.empty((2, n // 2), np.dtype(np.int32))
    assert c.ctypes.data == address and c.shape == (2, n // 2)
    del b, c
    many = [results.empty((results.POOL_BYTES // 4,), f4) for _ in range(3)]
    del many
    assert sum(block.nbytes for block in results._free) == results._held <= results.POOL_BYTES
    small = results.empty((3,), f4)
    assert small.base is None


@pytest.mark.timeout(120)
def test_launcher_backend_mpi_prefixes_and_status():
    code = ("import aiocomm, numpy as np, sys; w = aiocomm.init(strict=True); "
            "print('SUM', aiocomm.all_sum(np.array([w.rank() + 1])).tolist(), w.engine.backend.name); "
            "sys.exit(5 if w.rank() == 1 and len(sys.argv) > 1 else 0)")
    script = WORKERS / "mpi_tiny.py"
    script.write_text(code + "\n")
    try:
        base = [sys.executable, "-m", "launcher", "--backend", "mpi", "-n", "3", str(script)]
        proc = subprocess.run(base, cwd=ROOT, env=clean_env(**MPI_ENV), capture_output=True, text=True, timeout=100)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for r in range(3):
            assert f"[rank {r}] SUM [6] mpi" in proc.stdout, proc.stdout + proc.stderr
        failed = subprocess.run([*base, "fail"], cwd=ROOT, env=clean_env(**MPI_ENV), capture_output=True, text=True,
                                timeout=100)
        assert failed.returncode == 5, failed.stdout + failed.stderr
    finally:
        os.unlink(script)


def launch_mpi(*args, env=None, timeout=100):
    """``aiocomm-launch --backend mpi ARGS`` (only root's permission from MPI_ENV, plus ``env``)."""
    cmd = [sys.executable, "-m", "launcher", "--backend", "mpi", *args]
    base = {k: v for k, v in MPI_ENV.items() if "oversubscribe" not in k}
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(**base, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(120)
def test_launcher_backend_mpi_runs_more_ranks_than_cores():
    """A local job with more ranks than this host has cores runs (as on the
    ring): without OMPI_MCA_rmaps_base_oversubscribe, mpirun alone refuses it."""
    n = (os.cpu_count() or 1) + 2
    proc = launch_mpi("-n", str(n), str(WORKERS / "launcher_mpi_sum.py"))
    detail = proc.stdout + proc.stderr
    assert proc.returncode == 0, detail
    for r in range(n):
        assert f"[rank {r}] SUM [{n * (n + 1) // 2}] mpi" in proc.stdout, detail


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mpirun_args,reason", [
    ("--no-such-option", 'mpirun: Error: unknown option "--no-such-option"'),
    ("--nooversubscribe", "There are not enough slots available in the system to satisfy the"),
])
def test_launcher_backend_mpi_says_when_mpirun_started_no_rank(mpirun_args, reason):
    """mpirun refuses the job (a bad argument; more ranks than cores when the
    user's own arguments forbid oversubscribing): the launcher says that no
    rank started, quoting mpirun's reason, and exits with mpirun's status."""
    n = (os.cpu_count() or 1) + 2
    proc = launch_mpi("-n", str(n), f"--mpirun-args={mpirun_args}", str(WORKERS / "launcher_mpi_sum.py"),
                      timeout=50)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert last.startswith("aiocomm-launch: mpirun failed before any rank started (status 1): "), last
    assert reason in last, last
    assert "a rank failed" not in proc.stderr and "SUM" not in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("form", ["separate", "joined"])
def test_launcher_backend_mpi_mpirun_args_forms(form):
    """``--mpirun-args "--bind-to core"`` (the README's form, a value that
    starts with '-') and ``--mpirun-args=...`` both reach mpirun, one word or
    several; the same words after the command are the script's own."""
    for value in ("--report-bindings", "--bind-to core"):
        option = ["--mpirun-args", value] if form == "separate" else [f"--mpirun-args={value}"]
        proc = launch_mpi("-n", "2", "--verbose", *option, str(WORKERS / "launcher_mpi_sum.py"), "--mpirun-args",
                          "--x", env={"OMPI_MCA_rmaps_base_oversubscribe": "1"})
        detail = proc.stdout + proc.stderr
        assert proc.returncode == 0, detail
        command = next(line for line in proc.stderr.splitlines() if line.startswith("aiocomm-launch: "))
        assert f" {value} " in command, detail
        for r in range(2):
            assert f"[rank {r}] SUM [3] mpi ARGS ['--mpirun-args', '--x']" in proc.stdout, detail


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario,n", [("withdraw", 2), ("stall", 2), ("exit", 3), ("threads", 2)])
def test_mpi_at_unusual_moments(scenario, n):
    """Timed-out sends never tear a message (before or during its transfer),
    a rank that leaves ends the others' waits at once without losing what it
    sent, and 16 groups' large collectives run at once from 16 threads in
    opposite orders (tests/workers/mpi_faults.py says how each is staged)."""
    proc = mpirun(n, "mpi_faults.py", scenario, timeout=100, env={"AIOCOMM_TIMEOUT": "30"})
    ok(proc, 2 if scenario == "exit" else n, "OK mpi_faults")
    if scenario == "exit":
        assert proc.stdout.count("heard in 0.") == 3, proc.stdout  # within a second, not the 30 s timeout


@pytest.mark.timeout(120)
def test_launcher_backend_mpi_blames_the_rank_that_left(tmp_path):
    """Rank 1 leaves (raise SystemExit(3): no hook sees its status) while the
    others wait for it in a collective: they fail at once, naming it, and
    the launcher blames rank 1 -- not whichever victim mpirun saw first --
    and exits with rank 1's status (its MPI_Finalize ends once the others
    are gone; their relays wait for that before mpirun sees them fail)."""
    code = ("import aiocomm, numpy as np\nw = aiocomm.init(strict=True)\nif w.rank() == 1:\n    raise SystemExit(3)\n"
            "aiocomm.all_sum(np.ones(2))\n")
    script = tmp_path / "mpi_leaver.py"  # (not in the repository: a clean clone stays clean)
    script.write_text(code)
    cmd = [sys.executable, "-m", "launcher", "--backend", "mpi", "-n", "3", str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(**MPI_ENV, AIOCOMM_TIMEOUT="60"), capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert ("rank 1 ended its program (exited with code 3) while other ranks still needed it (the cause); "
            "ranks 0, 2 failed because of rank 1") in proc.stderr, proc.stderr
    assert proc.stderr.count("rank 1 has exited without starting this collective") == 2, proc.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", ["cancel_send", "withdrawn", "queues", "cancel_storm", "midflight",
                                      "turn_timeout", "exit_mid", "exit_pending"])
def test_mpi_races(scenario):
    """Races an adversarial review found (tests/workers/mpi_races.py stages each); each failed before its fix."""
    proc = mpirun(2, "mpi_races.py", scenario, timeout=100)
    ok(proc, 1 if scenario == "exit_mid" else 2, "OK mpi_races")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plan,linger,status,last", [
    (("2=kill@0.3",), "1.5", 0,
     "aiocomm-launch: the job carried on without rank 2 (killed by SIGKILL); ranks 0, 1, 3 exited 0"),
    # rank 1 fails after the others ended their programs (their MPI_Finalize waits for it): counted against the job
    (("2=kill@0.3", "1=3@3"), "1.5", 3,
     "aiocomm-launch: rank 1 exited with code 3 (the cause); the job carried on without rank 2 (killed by SIGKILL)"),
    # rank 3 ended its program first: the job was finishing, so rank 2's death stops it (ranks 0, 1 would sleep 30 s)
    (("3=0@0.1", "2=kill@1.0"), "30", 128 + 9,
     "aiocomm-launch: rank 2 killed by SIGKILL (the cause); ranks 0, 1 stopped by the launcher"),
], ids=["survivors-exit-0", "a-survivor-fails-last", "after-an-exit-0"])
def test_launcher_backend_mpi_carries_on_after_a_rank_dies(plan, linger, status, last):
    """--on-failure continue under mpirun (Open MPI's --enable-recovery): the
    others run on, the launcher says at once which rank was lost, and the
    job gets the status the ring backend would give it (mpirun's own is 0);
    a failure the job does not carry on after stops it, as mpirun would."""
    proc = launch_mpi("-n", "4", "--on-failure", "continue", str(WORKERS / "launcher_survivors.py"), *plan,
                      env={"AIOCOMM_TEST_LINGER": linger})
    detail = proc.stdout + proc.stderr
    assert proc.returncode == status, detail
    lost = "aiocomm-launch: rank 2 (host 127.0.0.1) was killed by SIGKILL; the other ranks carry on"
    assert (lost in proc.stderr) == (linger != "30"), detail
    for rank in (0, 1, 3) if linger != "30" else (3,):
        assert f"[rank {rank}] carried on continue" in proc.stdout, detail
    assert proc.stderr.strip().splitlines()[-1] == last, detail


def _start_interrupt_job(mode, folder, *launcher_args, tmp=None):
    """``aiocomm-launch --backend mpi`` on 2 ranks of launcher_interrupt.py
    (joined to an MPI world); the launcher and the ranks' pids, once both are ready."""
    base = {k: v for k, v in MPI_ENV.items() if "oversubscribe" not in k}
    return start_interrupt_job(mode, folder, 2, "--backend", "mpi", *launcher_args, init=True,
                               env=dict(base, **({"TMPDIR": str(tmp)} if tmp else {})))


@pytest.mark.timeout(60)
def test_launcher_backend_mpi_ctrl_c_lets_every_rank_run_its_finally(tmp_path):
    """As on the ring (test_launcher.py): the first Ctrl-C reaches the ranks,
    and each runs its ``finally`` (rank 0 in 1 s, rank 1 in 2 s) before
    mpirun may stop anyone; mpirun alone would end them all with SIGTERM at
    once, and the first rank to end would make it stop the other."""
    import signal

    proc, pids = _start_interrupt_job("finally", tmp_path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert out.count("interrupted") == 2, (out, err[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("rank-")) == ["rank-0", "rank-1"], \
        (out, err[-2000:])
    assert all(p.read_text() == "saved" for p in tmp_path.iterdir() if p.name.startswith("rank-"))
    assert _gone(pids, 5)


@pytest.mark.timeout(60)
def test_launcher_backend_mpi_stops_ranks_after_the_interrupt_grace(tmp_path):
    """Ranks that ignore Ctrl-C are stopped (SIGTERM, from mpirun) once
    --interrupt-grace has passed, not before."""
    import signal
    import time

    grace = 2.0
    proc, pids = _start_interrupt_job("ignore", tmp_path, "--interrupt-grace", str(grace))
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(grace - 0.7)
    assert all(_alive(p) for p in pids), "a rank was stopped before the grace had passed"
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - start
    assert grace <= took < grace + 6, took
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    # (each rank once or twice: mpirun signals its relay's group, and the relay passes it on)
    assert "[rank 0] got SIGTERM" in out and "[rank 1] got SIGTERM" in out, (out, err[-2000:])
    assert _gone(pids, 5)


@pytest.mark.timeout(60)
def test_launcher_backend_mpi_second_ctrl_c_stops_everything_at_once(tmp_path):
    proc, pids = _start_interrupt_job("stubborn", tmp_path)
    _check_second_ctrl_c(proc, pids, stops_within=4, gone_within=3)


@pytest.mark.timeout(60)
def test_launcher_backend_mpi_ranks_die_with_a_killed_launcher(tmp_path):
    """As on the ring: a launcher killed outright (SIGKILL) takes mpirun
    and the ranks with it (mpirun, in a session of its own, used to run on)."""
    import signal
    import time

    (tmp_path / "tmp").mkdir()
    (tmp_path / "saved").mkdir()
    proc, pids = _start_interrupt_job("finally", tmp_path / "saved", tmp=tmp_path / "tmp")
    mpirun_pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
    assert mpirun_pids, "no mpirun under the launcher"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert _gone(pids + mpirun_pids, 15), "mpirun or a rank outlived a launcher killed by SIGKILL"
    folder = tmp_path / "tmp"
    deadline = time.monotonic() + 10
    while list(folder.iterdir()) and time.monotonic() < deadline:  # the janitor clears up
        time.sleep(0.05)
    assert not list(folder.iterdir()), "the launcher's folder of notes was left behind"


@pytest.mark.timeout(30)
def test_launcher_backend_mpi_janitor_removes_open_mpis_session_folder_of_its_mpirun_only(tmp_path):
    """Once its mpirun has ended, the janitor removes the notes and Open MPI's
    session folder of that mpirun (an mpirun stopped by SIGTERM left it once
    in a full run of the suite), and keeps another mpirun's."""
    from launcher.mpi import JANITOR, _started

    notes, top = tmp_path / "notes", tmp_path / "tmp" / "ompi.host.0"
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))

    def ended() -> tuple[int, str]:
        """A process that has ended (it stands for mpirun): its pid and start time."""
        gone = subprocess.Popen(["true"])
        start = _started(gone.pid)
        gone.wait()
        return gone.pid, start

    def clean(pid: int, start: str) -> None:
        subprocess.run([sys.executable, "-I", "-S", "-c", JANITOR, str(notes)], input=f"{pid} {start}\n",
                       text=True, env=env, timeout=20, check=True)

    pid, start = ended()
    (notes / "trace").mkdir(parents=True)
    (top / f"pid.{pid}" / "0").mkdir(parents=True)
    (top / f"pid.{pid}" / "contact.txt").write_text("x")
    (top / "pid.1").mkdir()  # another mpirun's
    clean(pid, start)
    assert not notes.exists() and not (top / f"pid.{pid}").exists()
    assert (top / "pid.1").is_dir()
    (top / "pid.1").rmdir()
    pid, start = ended()
    (top / f"pid.{pid}").mkdir()
    clean(pid, start)
    assert not top.exists(), "the empty ompi.HOST.UID folder is left"
