"""A group's state on the MPI backend (``Group.handle``), and every group of
this process by context id (exit notices report on each; a notice that
another rank broke a group finds it here)."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import TYPE_CHECKING, Any

from ...errors import CommError
from .progress import Worker

if TYPE_CHECKING:
    from .collectives import Carried
    from .p2p import Inbox


class MpiGroup:
    """A group's communicator and what this rank has done on it."""

    __slots__ = ("comm", "ring", "context", "members", "broken", "queues", "inboxes", "heads_sent", "entered",
                 "known", "told", "current", "draining", "lock", "carried", "_worker")

    def __init__(self, comm: Any, context: int, members: tuple[int, ...]) -> None:
        self.comm = comm
        # a copy of it for the messages of large reductions (see collectives._Verdict),
        # made at the first of them
        self.ring: Any = None
        self.context = context
        self.members = members  # world ranks, by group rank
        self.broken: CommError | None = None  # why a collective failed: the group is unusable
        # per ordered stream (the collectives; the sends to one rank; the
        # receives from one rank): done when the last operation called on it is done
        self.queues: dict[Any, asyncio.Future[None]] = {}
        self.inboxes: dict[int, Inbox] = {}  # source (group rank) -> what its receives took from MPI
        self.heads_sent: collections.Counter[int] = collections.Counter()  # destination -> p2p heads sent
        # Collectives are counted as they are issued to MPI (in call order):
        self.entered = 0  # by this rank (its own and stand-ins)
        self.known = 0  # the most any member is known to have issued
        self.told = 0  # the most every member has been told of (by a BROKEN notice)
        self.current: Any = None  # the collective being issued or run here, if any
        self.draining = False  # stand-ins are being issued (see collectives.stand_in)
        self.lock = threading.Lock()  # between issuing a collective and hearing that the group broke
        # (op, dtype, shape) -> the Carried of the blocking face's next such call
        self.carried: dict[tuple[str, Any, tuple[int, ...]], Carried] = {}
        self._worker: Worker | None = None
        by_context[context] = self

    def worker(self) -> Worker:
        """This group's thread for MPI's blocking collectives.  One per group:
        a group runs one collective at a time, and groups never wait for each
        other's threads (a shared pool could fill with collectives whose
        partners are queued behind them on another rank)."""
        if self._worker is None:
            self._worker = Worker(f"aiocomm-mpi-{self.context:x}")
        return self._worker


#: context id -> the group's state.  Kept for the life of the process: the
#: counts in it are what an exit notice reports, after the program dropped
#: its Group.
by_context: dict[int, MpiGroup] = {}
