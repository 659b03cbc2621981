"""What MLX programs pass: bfloat16, bytes-like objects, other libraries'
tensors; messages that say how to fix an unsupported input; ``dir(aiocomm)``.

In-process checks use the size-1 world; the multi-process checks run
``tests/workers/inputs.py`` over loopback TCP (the dtype matrix in
``test_collectives.py`` covers bfloat16 with exactly representable values).
"""

import subprocess
import sys

import numpy as np
import pytest

import aiocomm
from aiocomm import args, wire

from .conftest import ROOT, assert_ok, clean_env, launch


class DLPackOnly:
    """An array that numpy can reach only through ``__dlpack__`` (as some
    libraries' tensors are)."""

    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


# ---- bytes-like inputs and other libraries' arrays (in-process)


@pytest.mark.parametrize("make", [bytes, bytearray, lambda b: memoryview(b), lambda b: memoryview(bytearray(b))])
def test_bytes_like_are_uint8_views(make):
    obj = make(b"hello, world")
    arr = args.as_array(obj)
    assert type(arr) is np.ndarray and arr.dtype == np.uint8 and arr.shape == (12,)
    assert arr.tobytes() == b"hello, world"
    assert np.shares_memory(arr, np.frombuffer(obj, np.uint8))  # a view, not a copy


def test_empty_bytes():
    assert args.as_array(b"").shape == (0,)


def test_typed_memoryview_keeps_its_format():
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    arr = args.as_array(memoryview(x))
    assert arr.dtype == np.float64 and arr.shape == (2, 3) and np.shares_memory(arr, x)
    strided = args.as_array(memoryview(x[:, ::2]))  # not contiguous: copied into C order
    assert strided.flags.c_contiguous and strided.tolist() == [[0.0, 2.0], [3.0, 5.0]]


def test_dlpack_objects_are_viewed_without_copying():
    x = np.arange(5, dtype=np.int32)
    arr = args.as_array(DLPackOnly(x))
    assert arr.dtype == np.int32 and np.shares_memory(arr, x)


def test_collectives_take_bytes_and_return_arrays(fresh_world):
    for fn in (aiocomm.all_sum, aiocomm.all_max, aiocomm.all_min, aiocomm.all_gather):
        out = fn(b"\x01\x02\x03\x04")
        assert type(out) is np.ndarray and out.dtype == np.uint8 and out.tolist() == [1, 2, 3, 4]
    assert aiocomm.sum_scatter(bytearray(b"\x05\x06")).tolist() == [5, 6]


def test_recv_like_shape_of_bytes():
    assert args.shape_and_dtype(b"abc") == ((3,), np.dtype(np.uint8))
    assert args.shape_and_dtype(np.zeros((2, 3), np.float32)) == ((2, 3), np.dtype(np.float32))


def test_torch_cpu_tensors(fresh_world):
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    arr = args.as_array(t)
    assert arr.dtype == np.float32 and np.shares_memory(arr, t.numpy())
    out = aiocomm.all_sum(t)
    assert type(out) is np.ndarray and out.tolist() == t.tolist()
    with pytest.raises(TypeError, match=r"detach\(\)"):
        aiocomm.all_sum(torch.ones(2, requires_grad=True))
    with pytest.raises(TypeError, match=r"ml_dtypes\.bfloat16"):
        aiocomm.all_sum(torch.ones(2, dtype=torch.bfloat16))


# ---- bfloat16 (in-process)


def test_bfloat16_names_and_types():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    for spelling in ("bfloat16", ml_dtypes.bfloat16, bf16):
        assert wire.wire_dtype(spelling) == bf16
    assert wire.dtype_from_name("bfloat16") == bf16
    sig = wire.signature("all_sum", bf16, (3,))
    assert sig.dtype == "bfloat16" and wire.parse_signature(sig.encoded) == sig


def test_bfloat16_size_one(fresh_world):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([1.5, -2.25, 3.0], ml_dtypes.bfloat16)
    for fn in (aiocomm.all_sum, aiocomm.all_max, aiocomm.all_min, aiocomm.all_gather, aiocomm.sum_scatter):
        y = fn(x)
        assert y.dtype == x.dtype and y.tolist() == x.tolist()


def test_bfloat16_without_ml_dtypes_says_how_to_get_it():
    """A peer may name bfloat16 on the wire without this process importing
    ml_dtypes; asking for the dtype itself without it is a TypeError with the fix."""
    code = (
        "import sys; sys.modules['ml_dtypes'] = None\n"
        "from aiocomm import wire\n"
        "assert wire.parse_signature(wire.Signature('send', 'bfloat16', (2,)).encoded).dtype == 'bfloat16'\n"
        "try:\n    wire.wire_dtype('bfloat16')\nexcept TypeError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "pip install ml_dtypes" in proc.stdout and "ml_dtypes.bfloat16" in proc.stdout


# ---- messages for unsupported inputs


@pytest.mark.parametrize("bad, fix", [
    (np.array([b"chunk"]), r"np\.frombuffer\(b, np\.uint8\)"),
    (np.array(["text"]), r"encode"),
    (np.array([{}, None], dtype=object), r"pickle\.dumps"),
    (np.zeros(2, "V2"), r"ml_dtypes\.bfloat16"),
    (np.zeros(2, [("a", np.int32), ("b", np.float32)]), r"field"),
    (np.zeros(2, "datetime64[s]"), r"view\(np\.int64\)"),
    (np.zeros(2, np.longdouble), r"float64"),
])
def test_unsupported_dtype_names_the_fix(fresh_world, bad, fix):
    with pytest.raises(TypeError, match=fix) as caught:
        aiocomm.all_sum(bad)
    assert str(bad.dtype).split("[")[0] in str(caught.value)


def test_dir_shows_the_api_only():
    names = dir(aiocomm)
    for name in aiocomm.__all__:
        assert name in names
    for helper in ("np", "Any", "TypeVar", "Callable", "T", "args", "portal", "wire", "claim"):
        assert helper not in names
    from aiocomm import aio  # the module is still there  # noqa: F401


# ---- over real processes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_bytes_and_bfloat16_across_ranks(n):
    pytest.importorskip("ml_dtypes")
    proc = launch(n, "inputs.py", "bfloat16,bytes", timeout=110)
    assert_ok(proc, n, "bfloat16 ok")
    assert_ok(proc, n, "bytes ok")
    assert_ok(proc, n)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_torch_tensors_across_ranks(n):
    """torch CPU tensors in, numpy out, over real ranks (skipped, saying so, without torch)."""
    pytest.importorskip("ml_dtypes")
    pytest.importorskip("torch", reason="torch is not installed: torch tensors across ranks are not tested")
    proc = launch(n, "inputs.py", "torch", timeout=110)
    assert_ok(proc, n, "torch ok")
    assert_ok(proc, n)


@pytest.mark.timeout(120)
def test_bfloat16_ring_in_small_segments():
    """bfloat16 on the ring path in 64-byte segments: many pipelined frames,
    each reduced as bfloat16 values; with a buffer budget so small that
    point-to-point messages are announced (their payload sent on demand)."""
    pytest.importorskip("ml_dtypes")
    env = {"AIOCOMM_SEGMENT_BYTES": "64", "AIOCOMM_SMALL_BYTES": "0", "AIOCOMM_BUFFER_BYTES": "3K"}
    assert_ok(launch(4, "inputs.py", "bfloat16", env=env, timeout=110), 4)


@pytest.mark.timeout(60)
def test_recv_like_bytes():
    pytest.importorskip("ml_dtypes")
    assert_ok(launch(2, "inputs.py", "recv_like_bytes", env={"AIOCOMM_TIMEOUT": "20"}, timeout=50), 2)
