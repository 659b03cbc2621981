"""Every collective on every dtype and shape, over real processes and loopback TCP."""

import pytest

from .conftest import assert_ok, launch


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n,transport", [(1, "auto"), (2, "auto"), (3, "auto"), (4, "auto"), (5, "auto"),
                                         (2, "tcp"), (3, "tcp"), (5, "tcp")])
def test_every_collective_every_dtype(n, transport):
    """``auto``: shared memory between the ranks (one host); ``tcp``: the ring's own algorithms."""
    assert_ok(launch(n, "collectives_matrix.py", env={"AIOCOMM_TRANSPORT": transport}, timeout=170), n)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_eight_ranks(transport):
    assert_ok(launch(8, "collectives_matrix.py", "all_sum,all_gather,sum_scatter", timeout=230,
                     env={"AIOCOMM_TRANSPORT": transport}), 8)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 3])
def test_many_small_segments(n):
    """The ring path for every size, in 64-byte segments: every array crosses
    the wire as many pipelined frames."""
    env = {"AIOCOMM_SEGMENT_BYTES": "64", "AIOCOMM_SMALL_BYTES": "0", "AIOCOMM_TRANSPORT": "tcp"}
    if n == 3:
        env["AIOCOMM_POLL_US"] = "300"  # polling forced on, with more ranks than CPUs
    proc = launch(n, "collectives_matrix.py", "all_sum,all_gather,sum_scatter", env=env, timeout=170)
    assert_ok(proc, n)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 4])
def test_ring_path_for_small_arrays(n):
    """Small arrays normally take the one-step exchange; force the ring."""
    assert_ok(launch(n, "collectives_matrix.py", env={"AIOCOMM_SMALL_BYTES": "0", "AIOCOMM_TRANSPORT": "tcp"},
                     timeout=170), n)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 3])
def test_shared_memory_in_many_small_rounds(n):
    """Every size through shared memory in 4 KiB slots: every array moves in many rounds."""
    assert_ok(launch(n, "collectives_matrix.py", env={"AIOCOMM_SHM_SLOT_BYTES": "4096"}, timeout=170), n)
