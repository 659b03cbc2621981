"""The MPI backend: the job's MPI library through mpi4py.

Theory of operation
-------------------
The world is ``MPI.COMM_WORLD`` duplicated (so aiocomm's traffic never
matches the program's own MPI calls), with errors *returned* instead of
aborting; a split is ``MPI_Comm_split`` of the parent's communicator.  A
second duplicate carries :mod:`.notices` between ranks.

Every operation is written once, as a generator of *steps*
(:mod:`.progress`): :mod:`.collectives` and :mod:`.p2p` issue nonblocking
MPI requests and yield each one they must see complete; :mod:`.backend`
drives them from the blocking face (in the caller's thread) or the async
face (through a progress thread), bounding every wait by the operation's
deadline and by what the notices say.

Invariants:

* Ranks that disagree get :class:`~aiocomm.errors.MismatchError`, never
  wrong numbers: collectives agree on a signature first (a reduction small
  enough rides in that agreement, see :mod:`.collectives`); every
  point-to-point message carries its signature in its head.
* An operation given up on (timeout, cancel, a notice) never reads the
  caller's arrays again, or no rank keeps what it read: collectives run in
  place on their own copy (large ones on memory earlier results gave back,
  :mod:`.results`), except large reductions, which read the caller's array
  and end with a verdict every rank waits for (:mod:`.collectives`); a
  send either handed MPI a private copy or is withdrawn with a verdict the
  receiver waits for (:mod:`.p2p`).  Nothing a receive took from MPI is
  lost.
* No rank waits out its timeout for a rank that has left or given up.
* Collectives of one group are issued in call order on every rank (MPI
  requires it): a group runs one collective at a time, in the order they
  were called; its blocking collectives run in its own worker thread.

Layers: :mod:`.library` (the MPI library and process life) ->
:mod:`.reductions`, :mod:`.results`, :mod:`.progress` -> :mod:`.groups` ->
:mod:`.notices`, :mod:`.collectives`, :mod:`.p2p` -> :mod:`.backend`.
"""

from .backend import MpiBackend, start_world
from .library import MPI_LAUNCHER_VARS, load, present, started_by_mpi_launcher, why_unavailable

__all__ = ["MPI_LAUNCHER_VARS", "MpiBackend", "load", "present", "start_world", "started_by_mpi_launcher",
           "why_unavailable"]
