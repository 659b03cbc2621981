"""The README's claims about MLX's ring backend, checked against the MLX
installed here (CI installs mlx[cpu]; skipped without it).  The claims were
checked on MLX 0.32.4; another version is reported, not failed, so that the
README can be rechecked by hand."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, WORKERS, clean_env

mx = pytest.importorskip("mlx.core")
CHECKED_ON = "0.32.4"  # the version the README names
pytestmark = pytest.mark.skipif(
    mx.__version__ != CHECKED_ON,
    reason=f"the README's MLX claims were checked on {CHECKED_ON}; this is {mx.__version__}",
)


def _spawn(n, mode, tmp_path):
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    return [subprocess.Popen([sys.executable, str(WORKERS / "mlx_ring_claims.py"), mode], cwd=ROOT, text=True,
                             env=clean_env(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(n)]


def _outputs(procs, timeout=60):
    return [p.communicate(timeout=timeout)[0] for p in procs]


@pytest.mark.timeout(90)
def test_ring_refuses_sum_scatter_split_and_distant_sends(tmp_path):
    out = _outputs(_spawn(4, "ops", tmp_path))
    assert all("sum_scatter: RuntimeError: [ring] sum_scatter not supported" in o for o in out), out
    assert all("split: RuntimeError: [ring] Group split not supported" in o for o in out), out
    assert "Send only supported to direct neighbors" in out[0], out
    assert "Recv only supported from direct neighbors" in out[2], out


@pytest.mark.timeout(90)
def test_ring_sums_mismatched_shapes_silently(tmp_path):
    out = _outputs(_spawn(2, "mismatch", tmp_path))
    assert "mismatch: returned shape (4,)" in out[0] and "mismatch: returned shape (6,)" in out[1], out


@pytest.mark.timeout(90)
def test_ring_raises_when_a_peer_exits(tmp_path):
    out = _outputs(_spawn(2, "exit", tmp_path))
    assert "all_sum: RuntimeError: [ring] connection to a peer was lost" in out[0], out
    assert float(out[0].split("after ")[1].split(" s")[0]) < 2.0, out


@pytest.mark.timeout(90)
def test_ring_waits_forever_on_a_frozen_peer(tmp_path):
    procs = _spawn(2, "frozen", tmp_path)
    try:
        time.sleep(4)  # rank 1 froze 0.5 s after the first all_sum
        assert procs[0].poll() is None, _outputs(procs)  # rank 0 is still waiting: no timeout
    finally:
        procs[1].send_signal(signal.SIGCONT)
        for p in procs:
            p.kill()
        _outputs(procs)
