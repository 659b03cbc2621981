"""Backends: what moves a group's data.  One :class:`~aiocomm.group.Group`
API, two implementations chosen at ``init``:

* :mod:`.ring` -- aiocomm's own TCP mesh (:mod:`aiocomm.transport`) and the
  collectives of :mod:`aiocomm.collectives`; always available.  Groups on
  one host move their data through shared memory (:mod:`aiocomm.shm`);
  groups over several hosts with several ranks on a host, in two levels
  (:mod:`.two_level`, :mod:`aiocomm.hierarchy`).
* :mod:`.mpi` -- the MPI library through mpi4py (an optional extra), for
  jobs started by ``mpirun``: shared memory inside a node, fast fabrics
  between nodes.

A backend offers, as coroutines, ``all_reduce``, ``all_gather``,
``sum_scatter``, ``send``, ``recv`` and ``split`` on groups of two or more
ranks (groups of size 1 never reach a backend), plus ``close`` and
``fds``.  The faces never know which one runs.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


class GroupState(Protocol):
    """What a backend sees of a group (:class:`aiocomm.group.Group` is one):
    backends are handed groups and never import the layer above them."""

    members: tuple[int, ...]  # world ranks, by group rank
    context: int  # the group's context id (on every frame of the ring)
    handle: Any  # the backend's own state of the group (an MPI communicator)
    seq: int  # collectives started on the group (the ring's tags)
    streams: dict[int, Any]  # the ring's outgoing connections, by group rank

    def rank(self) -> int: ...

    def size(self) -> int: ...


class SplitResult(NamedTuple):
    """What a backend's split gives the group layer to build the new group."""

    members: tuple[int, ...]  # world ranks, in the new group's order
    rank: int  # this rank in the new group
    context: int  # the new group's context id
    handle: Any = None  # backend state of the new group (an MPI communicator)
