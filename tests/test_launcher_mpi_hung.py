"""``aiocomm-launch --backend mpi`` when mpirun itself never exits.

Open MPI 4.1.4's mpirun now and then deadlocks in its own finalize
(``PMIx_server_finalize``) after every rank has ended, and then ignores
SIGTERM: seen in this suite, once in about forty runs of
``test_launcher_backend_mpi_carries_on_after_a_rank_dies[after-an-exit-0]``
on a loaded machine, where the launcher waited for it for good.  Here a
stand-in mpirun (``workers/stuck_mpirun.py``) does that every time, so the
launcher's promise -- it ends once the ranks have ended, with the status the
ranks' notes give -- is tested without waiting for the race.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, WORKERS, clean_env

STUCK = WORKERS / "stuck_mpirun.py"
HUNG = "aiocomm-launch: mpirun did not exit"


#: What the launcher gives a stand-in that hangs (launcher.mpi.HUNG_AFTER,
#: 5 s) shortened in these runs: the wait itself is not what they test.
SHORT_HANG = 1.5


def _launch(mpirun: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = (f"import launcher.mpi, launcher.cli; launcher.mpi.HUNG_AFTER = {SHORT_HANG}; "
             "raise SystemExit(launcher.cli.main())")
    cmd = [sys.executable, "-c", start, "--backend", "mpi", "--mpirun", str(mpirun), "-n", "3", *args]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - started


@pytest.fixture
def stuck(tmp_path):
    """The stand-in as a program (the launcher runs ``--mpirun`` so): the script with a shebang of this Python."""
    script = tmp_path / "mpirun"
    script.write_text(f"#!{sys.executable}\n" + STUCK.read_text())
    script.chmod(0o755)
    yield script
    for proc in Path("/proc").iterdir():  # a stand-in the launcher left behind (it must not)
        try:
            if str(script).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.mark.timeout(90)
def test_every_rank_exited_0_and_mpirun_hangs(stuck):
    proc, took = _launch(stuck, sys.executable, str(WORKERS / "exit_as_told.py"))
    detail = proc.stdout + proc.stderr
    assert proc.returncode == 0, detail
    for rank in range(3):
        assert f"[rank {rank}] ended 0" in proc.stdout, detail
    assert HUNG in proc.stderr, detail
    assert took < 30, detail


@pytest.mark.timeout(90)
@pytest.mark.parametrize("on_failure,status,last", [
    ("stop", 3, "aiocomm-launch: rank 1 exited with code 3"),
    ("continue", 0, "aiocomm-launch: the job carried on without rank 1 (exited with code 3); ranks 0, 2 exited 0"),
])
def test_a_rank_failed_and_mpirun_hangs(stuck, on_failure, status, last):
    """Rank 1 fails a second before the others exit 0: the status and the
    launcher's last word are what they are when mpirun exits (with
    ``continue`` the job carried on without rank 1)."""
    proc, took = _launch(stuck, "--on-failure", on_failure, sys.executable, str(WORKERS / "exit_as_told.py"), "1=3")
    detail = proc.stdout + proc.stderr
    assert proc.returncode == status, detail
    assert HUNG in proc.stderr, detail
    assert proc.stderr.strip().splitlines()[-1].startswith(last), detail
    assert took < 30, detail


def test_relays_are_judged_ended_only_from_notes_written_here(tmp_path):
    """A relay that noted another boot or pid namespace (a rank placed on
    another host through --mpirun-args, notes on a shared directory) is
    never taken for ended because its pid is not in this host's /proc."""
    from launcher import mpi

    def relays_ended(path: str, size: int) -> bool:  # (what the launcher's wait asks)
        pids = mpi._relay_pids(path, size)
        return pids is not None and mpi._ended(pids)

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    notes = tmp_path / "failures.jsonl"
    here = mpi._where()
    notes.write_text("".join(f'{{"rank": {r}, "started": true, "pid": {pid}, "where": "{here}"}}\n' for r in (0, 1)))
    assert relays_ended(str(notes), 2)
    assert not relays_ended(str(notes), 3)  # (rank 2 never noted its start)
    with open(notes, "a") as f:
        f.write(f'{{"rank": 2, "started": true, "pid": {pid}, "where": "another host"}}\n')
    assert not relays_ended(str(notes), 3)
    notes.write_text(f'{{"rank": 0, "started": true, "pid": {os.getpid()}, "where": "{here}"}}\n')
    assert not relays_ended(str(notes), 1)  # (this process runs)
