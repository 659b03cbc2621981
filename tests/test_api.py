"""init, is_available, usage errors and the size-1 world, in this process."""

import json
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest

import aiocomm
from aiocomm import aio

from .conftest import ROOT, clean_env


def test_is_available():
    assert aiocomm.is_available() is True
    assert aiocomm.is_available("ring") is True
    for name in ("nccl", "jaccl", "gloo", "nonsense"):
        assert aiocomm.is_available(name) is False
    try:
        from mpi4py import MPI  # noqa: F401
    except ImportError:
        assert aiocomm.is_available("mpi") is False
    else:
        assert aiocomm.is_available("mpi") is True


def test_is_available_mpi_does_not_start_mpi():
    code = ("import aiocomm, sys; aiocomm.is_available('mpi'); "
            "MPI = sys.modules.get('mpi4py.MPI'); print(MPI is None or not MPI.Is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=clean_env())
    assert out.stdout.strip() == "True", out.stderr


def test_init_singleton_size_one(fresh_world):
    world = aiocomm.init()
    assert (world.rank(), world.size()) == (0, 1)
    assert aiocomm.init() is world
    assert aiocomm.init(backend="ring") is world


def test_init_strict_names_the_variables(fresh_world):
    with pytest.raises(RuntimeError, match=r"AIOCOMM_RANK.*AIOCOMM_HOSTFILE.*MLX_RANK"):
        aiocomm.init(strict=True)


def test_unknown_backend(fresh_world):
    with pytest.raises(ValueError, match="gloo"):
        aiocomm.init(backend="gloo")


def test_unavailable_backend(fresh_world):
    with pytest.raises(RuntimeError, match="'jaccl' is unavailable"):
        aiocomm.init(strict=True, backend="jaccl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = aiocomm.init(backend="nccl")
    assert group.size() == 1
    assert any("nccl" in str(w.message) for w in caught)
    # the warning points at the caller's line, not at aiocomm's insides
    assert all(w.filename == __file__ for w in caught if "nccl" in str(w.message)), [w.filename for w in caught]


@pytest.mark.parametrize("dtype", ["bool", "int8", "uint64", "float16", "complex128"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 2)])
def test_size_one_collectives_copy(fresh_world, dtype, shape):
    x = np.ones(shape, dtype)
    for fn in (aiocomm.all_sum, aiocomm.all_max, aiocomm.all_min):
        y = fn(x)
        assert y.shape == x.shape and y.dtype == x.dtype and np.array_equal(y, x)
        assert not np.shares_memory(x, y)
    g = aiocomm.all_gather(x)
    assert g.shape == ((1,) if shape == () else shape) and g.dtype == x.dtype
    if shape:
        assert np.array_equal(aiocomm.sum_scatter(x), x)
    else:
        with pytest.raises(ValueError, match="0-d"):
            aiocomm.sum_scatter(x)


def test_python_lists_are_accepted(fresh_world):
    assert aiocomm.all_sum([1.5, 2.5]).tolist() == [1.5, 2.5]


def test_send_recv_need_two_ranks(fresh_world):
    with pytest.raises(ValueError, match="size 1"):
        aiocomm.send(np.zeros(2), 0)
    with pytest.raises(ValueError, match="size 1"):
        aiocomm.recv((2,), np.float32, 0)


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([1, None], dtype=object),
                                 np.array(["2020-01-01"], dtype="datetime64[D]"), np.zeros(2, np.longdouble)])
def test_unsupported_dtype_is_type_error(fresh_world, bad):
    with pytest.raises(TypeError, match=str(bad.dtype).split("[")[0]):
        aiocomm.all_sum(bad)


def test_recv_unsupported_dtype(fresh_world):
    with pytest.raises(TypeError, match=r"float128|longdouble"):
        aiocomm.recv((1,), np.longdouble, 1)


def test_bad_timeout(fresh_world):
    with pytest.raises(ValueError, match="timeout"):
        aiocomm.all_sum(np.zeros(1), timeout=-1)


def test_docstrings_reach_help():
    for name in ("init", "is_available", "all_sum", "all_max", "all_min", "all_gather",
                 "sum_scatter", "send", "recv", "recv_like"):
        doc = getattr(aiocomm, name).__doc__
        assert doc and len(doc) > 40, name
    assert "Raises" in aiocomm.all_sum.__doc__


@pytest.mark.asyncio
async def test_async_face_size_one(fresh_world):
    world = await aio.init()
    assert await aio.init() is world
    x = np.arange(6, dtype=np.int32).reshape(3, 2)
    assert np.array_equal(await aio.all_sum(x), x)
    assert (await aio.all_gather(x)).shape == (3, 2)
    sub = await aio.split(5)
    assert sub.size() == 1


# ---- forming the world from the environment (a subprocess each: the world is a singleton)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_init(env: dict[str, str], code: str = "import aiocomm; aiocomm.init()") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(**env),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_unreachable_peer_names_rank_and_address(tmp_path):
    mine, dead = _free_port(), _free_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{mine}"], [f"127.0.0.1:{dead}"]]))
    proc = _run_init({"AIOCOMM_RANK": "0", "AIOCOMM_HOSTFILE": str(hostfile), "AIOCOMM_CONNECT_TIMEOUT": "1"})
    assert proc.returncode != 0
    assert "rank 1" in proc.stderr and f"127.0.0.1:{dead}" in proc.stderr, proc.stderr[-2000:]
    assert "CommTimeoutError" in proc.stderr


@pytest.mark.timeout(60)
def test_bad_hostfile_raises_even_when_not_strict(tmp_path):
    missing = tmp_path / "nope.json"
    proc = _run_init({"AIOCOMM_RANK": "0", "AIOCOMM_HOSTFILE": str(missing)})
    assert proc.returncode != 0 and "CommError" in proc.stderr and str(missing) in proc.stderr
    garbage = tmp_path / "garbage.json"
    garbage.write_text("[[\"127.0.0.1\"]]")
    proc = _run_init({"AIOCOMM_RANK": "0", "AIOCOMM_HOSTFILE": str(garbage)})
    assert proc.returncode != 0 and "ip:port" in proc.stderr
    good = tmp_path / "good.json"
    good.write_text(json.dumps([["127.0.0.1:1234"], ["127.0.0.1:1235"]]))
    proc = _run_init({"AIOCOMM_RANK": "3", "AIOCOMM_HOSTFILE": str(good)})
    assert proc.returncode != 0 and "AIOCOMM_RANK=3" in proc.stderr


@pytest.mark.timeout(60)
def test_mlx_variables_form_the_world(tmp_path):
    """MLX_RANK/MLX_HOSTFILE (as mlx.launch --backend ring writes them) are honoured."""
    ports = [_free_port() for _ in range(2)]
    hostfile = tmp_path / "mlx.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    code = ("import aiocomm, numpy as np; g = aiocomm.init(strict=True); "
            "print('SUM', g.rank(), g.size(), aiocomm.all_sum(np.array([g.rank() + 1])).tolist())")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                              env=clean_env(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=50) for p in procs]
    for r, (out, err) in enumerate(outs):
        assert procs[r].returncode == 0, err
        assert f"SUM {r} 2 [3]" in out
        assert err.count("AIOCOMM_TOKEN is not set") == 1, err


def test_poll_policy():
    from aiocomm.config import DEFAULT_POLL_US, WorldSpec, poll_seconds

    def spec(hosts, rank=0):
        return WorldSpec(rank, tuple(((h, 5000 + i),) for i, h in enumerate(hosts)), b"", "test")

    two_local = spec(["127.0.0.1", "127.0.0.1"])
    assert poll_seconds(two_local, {}, cpus=2) == DEFAULT_POLL_US / 1e6
    # More ranks here than CPUs: polling would take the CPU a peer needs.
    assert poll_seconds(spec(["127.0.0.1"] * 4), {}, cpus=2) == 0.0
    # Only ranks on this rank's host count.
    assert poll_seconds(spec(["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"], rank=2), {}, cpus=2) > 0
    assert poll_seconds(spec(["127.0.0.1"] * 4), {"AIOCOMM_POLL_US": "50"}, cpus=2) == 50e-6
    assert poll_seconds(two_local, {"AIOCOMM_POLL_US": "0"}, cpus=2) == 0.0
    with pytest.raises(ValueError, match="AIOCOMM_POLL_US='soon'"):
        poll_seconds(two_local, {"AIOCOMM_POLL_US": "soon"})
    with pytest.raises(ValueError, match="must not be negative"):
        poll_seconds(two_local, {"AIOCOMM_POLL_US": "-1"})


def test_strict_mpi_outside_an_mpi_launcher_raises(fresh_world):
    pytest.importorskip("mpi4py")
    with pytest.raises(RuntimeError, match="not started by an MPI launcher"):
        aiocomm.init(strict=True, backend="mpi")
