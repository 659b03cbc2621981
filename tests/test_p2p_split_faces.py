"""send/recv, split and both faces, over real processes."""

import asyncio
import sys

import pytest

from .conftest import ROOT, WORKERS, assert_ok, clean_env, launch


@pytest.mark.timeout(120)
def test_send_recv_any_pair_in_order():
    assert_ok(launch(4, "p2p.py"), 4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [4, 5])
def test_split_with_concurrent_collectives(n):
    assert_ok(launch(n, "split.py"), n)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_blocking_face_script_thread_loop(n):
    assert_ok(launch(n, "faces.py"), n)


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_async_face_program():
    """An asyncio test driving a job whose ranks are asyncio programs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "launcher", "-n", "3", str(WORKERS / "faces_async.py"),
        cwd=ROOT, env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 0, err.decode()[-5000:]
    for rank in range(3):
        assert f"[rank {rank}] OK async" in out.decode()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind,needles", [
    ("shape", ["(7,)", "(6,)"]),
    ("dtype", ["float64", "float32"]),
    ("op", ["all_max", "all_sum"]),
    ("skip", ["all_gather", "all_sum"]),
])
def test_mismatch_raises_on_every_rank(kind, needles):
    proc = launch(3, "mismatch.py", kind)
    assert_ok(proc, 3, "OK broken")
    lines = [line for line in proc.stdout.splitlines() if "MISMATCH" in line]
    assert len(lines) == 3, proc.stdout
    assert any(all(n in line for n in needles) for line in lines), lines
