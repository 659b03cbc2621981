"""send_obj/recv_obj, broadcast_obj, all_gather_obj and average_gradients
over real processes, both faces and both backends
(tests/workers/objects_trees.py), and one object over 2 GiB."""

import pytest

from .conftest import assert_ok, launch
from .test_mpi import MPI_SKIP, mpirun, ok


@pytest.mark.timeout(180)
@pytest.mark.parametrize("n,face", [(1, "blocking"), (2, "blocking"), (3, "blocking"), (3, "async")])
def test_objects_and_gradients_on_the_ring(n, face):
    assert_ok(launch(n, "objects_trees.py", face, timeout=170), n, "OK objects")


@MPI_SKIP
@pytest.mark.timeout(180)
@pytest.mark.parametrize("n,face", [(3, "blocking"), (2, "async")])
def test_objects_and_gradients_over_mpi(n, face):
    ok(mpirun(n, "objects_trees.py", face, timeout=170), n, "OK objects")


@pytest.mark.timeout(300)
def test_an_object_over_two_gib_on_the_ring():
    proc = launch(2, "objects_trees.py", "blocking", "huge", timeout=290)
    assert_ok(proc, 2, "OK objects")
    assert "[rank 1] OK objects 1" in proc.stdout, proc.stdout


@MPI_SKIP
@pytest.mark.timeout(300)
def test_an_object_over_two_gib_over_mpi():
    """MPI counts stop at 2**31 - 1: the object travels in pieces."""
    proc = mpirun(2, "objects_trees.py", "blocking", "huge", timeout=290)
    ok(proc, 2, "OK objects")
    assert "OK objects 1" in proc.stdout, proc.stdout
