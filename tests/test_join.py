"""Joining groups that other tools start: their variables and a coordinator."""

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, WORKERS, clean_env

CODE = ("import aiocomm, numpy as np; g = aiocomm.init(strict=True); "
        "print('SUM', g.rank(), g.size(), aiocomm.all_sum(np.array([g.rank() + 1])).tolist(), "
        "aiocomm.all_gather(np.array([g.rank()])).tolist())")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_pair() -> int:
    """A port p with p + 1 free too (the rendezvous takes MASTER_PORT + 1)."""
    for _ in range(100):
        p = _free_port()
        if p >= 65535:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
            return p
    raise RuntimeError("no two adjacent free ports")


def run_group(n, env_for_rank, code=CODE):
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=clean_env(**env_for_rank(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]
    return [(p.wait(timeout=50), *p.communicate()) for p in procs]


def check_group(results, n):
    total = n * (n + 1) // 2
    for r, (code, out, err) in enumerate(results):
        assert code == 0, err[-3000:]
        assert f"SUM {r} {n} [{total}] {list(range(n))}" in out, out


@pytest.mark.timeout(60)
def test_torchrun_variables():
    port = _free_port_pair()

    def env(r):
        return {"RANK": str(r), "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "AIOCOMM_CONNECT_TIMEOUT": "20"}

    check_group(run_group(3, env), 3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rank_var,size_var", [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
])
def test_mpi_and_slurm_variables_with_coordinator(rank_var, size_var):
    coordinator = f"127.0.0.1:{_free_port()}"

    def env(r):
        return {rank_var: str(r), size_var: "2", "AIOCOMM_COORDINATOR": coordinator, "AIOCOMM_TOKEN": "tok"}

    check_group(run_group(2, env), 2)


@pytest.mark.timeout(60)
def test_aiocomm_variables_take_precedence(tmp_path):
    """AIOCOMM_/MLX_ hostfile variables win over a tool's RANK/WORLD_SIZE."""
    import json
    ports = [_free_port() for _ in range(2)]
    hostfile = tmp_path / "h.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))

    def env(r):
        return {"AIOCOMM_RANK": str(r), "AIOCOMM_HOSTFILE": str(hostfile), "AIOCOMM_TOKEN": "x",
                "RANK": str(1 - r), "WORLD_SIZE": "5"}

    check_group(run_group(2, env), 2)


@pytest.mark.timeout(60)
def test_missing_coordinator_is_a_clear_error():
    # mpirun without mpi4py (with it, init() would use the MPI backend)
    no_mpi4py = "import sys; sys.modules['mpi4py'] = None; " + CODE
    results = run_group(1, lambda r: {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, code=no_mpi4py)
    code, _, err = results[0]
    assert code != 0 and "AIOCOMM_COORDINATOR" in err and "Open MPI" in err


@pytest.mark.timeout(60)
def test_wrong_token_is_rejected_by_the_coordinator():
    coordinator = f"127.0.0.1:{_free_port()}"

    def env(r):
        return {"PMI_RANK": str(r), "PMI_SIZE": "2", "AIOCOMM_COORDINATOR": coordinator,
                "AIOCOMM_TOKEN": f"tok{r}", "AIOCOMM_CONNECT_TIMEOUT": "5"}

    results = run_group(2, env)
    assert all(code != 0 for code, _, _ in results)
    assert "failed authentication" in results[1][2], results[1][2][-2000:]


# ---- the real tools, where they are installed


def _tool(name):
    found = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                   if (Path(sys.executable).parent / name).exists() else None)
    if found is None:
        pytest.skip(f"{name} is not installed here")
    return found


def _check_joined(out, n):
    total = n * (n + 1) // 2
    lines = re.findall(r"JOINED (\d+) (\d+) (\d+) (\[.*?\])", out)
    assert sorted(int(r) for r, *_ in lines) == list(range(n)), out
    for _, size, got, gathered in lines:
        assert int(size) == n and int(got) == total and gathered == str(list(range(n)))


@pytest.mark.timeout(120)
def test_real_torchrun():
    torchrun = _tool("torchrun")
    proc = subprocess.run([torchrun, "--nproc-per-node", "3", "--master-port", str(_free_port_pair()),
                           str(WORKERS / "join_report.py")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_joined(proc.stdout, 3)


@pytest.mark.timeout(120)
def test_real_mpirun():
    mpirun = _tool("mpirun")
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([mpirun, "--oversubscribe", "-n", "3",
                           "-x", f"AIOCOMM_COORDINATOR=127.0.0.1:{_free_port()}", "-x", "AIOCOMM_TOKEN=mpi-job",
                           sys.executable, str(WORKERS / "join_report.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_joined(proc.stdout, 3)


@pytest.mark.timeout(120)
def test_real_mlx_launch():
    launch = _tool("mlx.launch")
    for attempt in range(2):
        proc = subprocess.run([launch, "--backend", "ring", "-n", "2", "--starting-port", str(_free_port()),
                               sys.executable, str(WORKERS / "join_report.py")],
                              cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # mlx.launch (0.32.4) once exited 0 with none of its ranks' output relayed, in a
        # loaded full run (never in isolation): a second run tells that apart from a failure.
        if attempt == 0 and proc.stdout.count("JOINED") == 0:
            continue
        break
    _check_joined(proc.stdout, 2)
