"""broadcast, gather, all_to_all, all_gather_v and barrier over real
processes: every dtype and odd shape against numpy, every root, both faces,
the pipelined paths, 1-8 ranks, both backends; and mismatches (another root,
shape, dtype or operation on one rank) raising MismatchError on every rank
(tests/workers/rooted_matrix.py)."""

import pytest

from .conftest import assert_ok, launch
from .test_mpi import MPI_SKIP, mpirun, ok


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_rooted_and_exchanges_on_the_ring(n):
    assert_ok(launch(n, "rooted_matrix.py", timeout=170), n, "OK rooted")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [2, 4])
def test_rooted_and_exchanges_pipelined(n):
    """Every size on the large paths (chain broadcast, ring all_gather_v), in 64-byte segments."""
    env = {"AIOCOMM_SEGMENT_BYTES": "64", "AIOCOMM_SMALL_BYTES": "0", "AIOCOMM_TRANSPORT": "tcp"}
    assert_ok(launch(n, "rooted_matrix.py", env=env, timeout=170), n, "OK rooted")


@pytest.mark.timeout(180)
def test_rooted_and_exchanges_async_face():
    assert_ok(launch(3, "rooted_matrix.py", "async", timeout=170), 3, "OK rooted")


@MPI_SKIP
@pytest.mark.timeout(180)
@pytest.mark.parametrize("n,face", [(2, "blocking"), (3, "blocking"), (4, "blocking"), (2, "async")])
def test_rooted_and_exchanges_over_mpi(n, face):
    ok(mpirun(n, "rooted_matrix.py", face, timeout=170), n, "OK rooted")
