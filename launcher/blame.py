"""Which rank caused a failed job, its exit status, and the one-line summary.

When one rank fails, the others fail soon after *because of* it (their peer
is gone), and one of them may well exit first.  So the exit order does not
decide.  Each rank's agent relays what the runtime wrote to
``AIOCOMM_FAILURE_FILE`` (:mod:`aiocomm.failure_report`): a record whose
``culprit`` names another rank makes this rank a *victim* of that one.
Following culprits from a failed rank leads to the rank that failed on its
own (its first record blames nobody, or it wrote none: it exited non-zero or
was killed by a signal nobody in the job sent); that is the *cause*.

- A rank the launcher had begun stopping is never blamed: the chain ends at
  the rank that named it.
- A rank that exited 0 while others still needed it is blamed when they name
  it; the job's status is then the first victim's.
- Several independent causes: the one that ended first is the cause; the
  others are listed as failures of their own.
- Under ``--on-failure continue`` a rank that failed while the job ran on
  (:class:`CarryOn`) is *lost*: the job carried on without it, so it is
  nobody's cause on its own account.  It becomes the cause only when a
  failure counted against the job names it, directly or down a chain; a job
  whose failures were all lost has no cause (status 0).

All of this is pure: :func:`decide` takes the outcomes and returns the verdict.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RankOutcome:
    rank: int
    code: int | None = None  # returncode; negative: killed by that signal; None: never ran to an end
    stopped: bool = False  # the launcher had begun stopping it (or forwarded a signal) before it ended
    records: list[dict[str, Any]] = field(default_factory=list)  # the runtime's failure records, in order
    ended_at: float = math.inf  # monotonic time the launcher saw it end
    left: bool = False  # it noted that it ended its program (its status unseen: mpirun ended it while it finalized)
    started: bool = False  # its relay noted that mpirun started it (under --backend mpi)
    lost: bool = False  # it failed while other ranks ran on, and the job carried on (--on-failure continue)

    @property
    def failed(self) -> bool:
        return self.code != 0 and not self.stopped

    @property
    def left_early(self) -> bool:
        return self.code == 0 and not self.stopped

    def culprit(self, size: int) -> int | None:
        """The rank this one's first failure record blames (None: itself or nobody)."""
        if not self.records:
            return None
        culprit = self.records[0].get("culprit")
        if isinstance(culprit, int) and not isinstance(culprit, bool) and 0 <= culprit < size and culprit != self.rank:
            return culprit
        return None


@dataclass
class Verdict:
    cause: int | None  # the rank blamed for the job's failure
    victims: dict[int, int]  # failed rank -> the cause it failed because of
    others: list[int]  # failed ranks that are neither the cause nor its victims
    status: int
    lost: list[int] = field(default_factory=list)  # lost ranks the job carried on without, not named above


def status_of(code: int | None) -> int:
    """Exit status for a returncode, as a shell reports it (128 + signal)."""
    if code is None:
        return 1
    return 128 - code if code < 0 else code


def how_it_ended(code: int | None) -> str:
    if code is None:
        return "did not finish"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with code {code}"


def _root(outcomes: dict[int, RankOutcome], rank: int) -> int:
    """Follow culprits from a failed ``rank`` to the rank that caused its failure."""
    size = max(outcomes) + 1
    seen = [rank]
    current = rank
    while True:
        culprit = outcomes[current].culprit(size)
        if culprit is None or culprit not in outcomes or culprit in seen:
            return current
        blamed = outcomes[culprit]
        if blamed.failed:
            seen.append(culprit)
            current = culprit
            continue
        if blamed.left_early:
            return culprit
        return current  # the launcher stopped it: not to blame


class CarryOn:
    """Which failures a job under ``--on-failure continue`` carries on after.

    Fed the ranks' ends in the order they happen, it calls a rank that fails
    (ends non-zero or by a signal, not stopped by the launcher) *lost*, and
    the others carry on, while the job runs: another rank still runs and no
    rank has ended its program normally yet.  Once one has (it exited 0), the
    job is finishing, and a failure counts against it as with ``stop``; so
    does the failure of the rank that ends last (nobody carried on).  Ranks
    that end together are taken in the order they were seen.

    Under MPI a rank's exit is seen late (MPI_Finalize waits for the other
    ranks), so a rank that noted it is leaving its program (:meth:`left`, the
    runtime's note at a normal exit) also makes the job finishing for the
    others' failures until its own end is seen.
    """

    def __init__(self, ranks: Iterable[int]) -> None:
        self.running = set(ranks)
        self.finishing = False
        self.lost: list[int] = []
        self._leaving: set[int] = set()

    def left(self, rank: int) -> None:
        """``rank`` is leaving its program normally (its status comes later)."""
        self._leaving.add(rank)

    def ended(self, rank: int, code: int | None, stopped: bool) -> bool:
        """``rank`` ended with returncode ``code``; whether it is lost."""
        self.running.discard(rank)
        self._leaving.discard(rank)
        if stopped:
            return False
        if code == 0:
            self.finishing = True
            return False
        if self.finishing or self._leaving or not self.running:
            self.finishing = True  # the job is ending: no later failure is carried on after either
            return False
        self.lost.append(rank)
        return True


def decide(outcomes: dict[int, RankOutcome]) -> Verdict:
    failed = sorted((o for o in outcomes.values() if o.failed and not o.lost), key=lambda o: (o.ended_at, o.rank))
    lost = sorted(o.rank for o in outcomes.values() if o.failed and o.lost)
    if not failed:
        return Verdict(None, {}, [], 0, lost)
    roots = {o.rank: _root(outcomes, o.rank) for o in failed}
    cause = min(set(roots.values()), key=lambda r: (outcomes[r].ended_at, r))
    victims = {r: root for r, root in roots.items() if r != root}
    others = sorted(r for r, root in roots.items() if r == root and r != cause)
    for rank in lost:  # a lost rank that failed because of a cause is its victim too
        root = _root(outcomes, rank)
        if root != rank and root in roots.values():
            victims[rank] = root
    lost = [r for r in lost if r != cause and r not in victims]
    if outcomes[cause].failed:
        status = status_of(outcomes[cause].code)
    else:  # it exited 0 too soon: the job's status is its first victim's
        status = status_of(next(o.code for o in failed if roots[o.rank] == cause))
    return Verdict(cause, victims, others, status, lost)


def ended_clause(code: int | None) -> str:
    """How a process ended, as the predicate of a sentence ("was killed by SIGKILL", "exited with code 3")."""
    how = how_it_ended(code)
    return f"was {how}" if how.startswith("killed") else how


def loss_report(rank: int, host: str, how: str) -> str:
    """The launcher's line, at once, on a rank the job carries on without (``how``: see :func:`ended_clause`)."""
    return f"aiocomm-launch: rank {rank} (host {host}) {how}; the other ranks carry on (--on-failure continue)"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _record_note(outcome: RankOutcome) -> str:
    if not outcome.records:
        return ""
    record = outcome.records[0]
    message = str(record.get("message", ""))
    if len(message) > 160:
        message = message[:157] + "..."
    return f": {record.get('error', 'error')}: {message}" if message else f": {record.get('error', 'error')}"


def summary(outcomes: dict[int, RankOutcome], verdict: Verdict, ending: str | None = None) -> str:
    """One line: why the job ended, the cause, its victims, the rest.

    ``ending`` says what else ended the job (a timeout, a signal to the
    launcher, a closed output) when no rank failed before it.  Ranks the job
    carried on without (``--on-failure continue``) are named as such, never
    as a cause on their own account.
    """
    parts = []
    if ending is not None:
        parts.append(ending)
    if verdict.cause is not None:
        cause = outcomes[verdict.cause]
        if cause.left and cause.failed:
            parts.append(f"rank {cause.rank} ended its program ({how_it_ended(cause.code)}) while other ranks "
                         "still needed it (the cause)")
        elif cause.left:
            parts.append(f"rank {cause.rank} ended its program while other ranks still needed it (the cause)")
        elif cause.left_early:
            parts.append(f"rank {cause.rank} exited with code 0 while other ranks still needed it (the cause)")
        else:
            parts.append(f"rank {cause.rank} {how_it_ended(cause.code)} (the cause){_record_note(cause)}")
        by_cause: dict[int, list[int]] = {}
        for victim, root in sorted(verdict.victims.items()):
            by_cause.setdefault(root, []).append(victim)
        for root, victims in sorted(by_cause.items(), key=lambda item: item[0] != verdict.cause):
            parts.append(f"{_ranks(victims)} failed because of rank {root}")
        for rank in verdict.others:
            parts.append(f"rank {rank} {how_it_ended(outcomes[rank].code)}{_record_note(outcomes[rank])}")
    if verdict.lost:
        by_end: dict[str, list[int]] = {}
        for rank in verdict.lost:
            by_end.setdefault(how_it_ended(outcomes[rank].code), []).append(rank)
        parts.append("the job carried on without " + " and ".join(f"{_ranks(ranks)} ({how})"
                                                                    for how, ranks in by_end.items()))
    if verdict.lost and verdict.cause is None and ending is None:
        finished = sorted(o.rank for o in outcomes.values() if o.code == 0)
        parts.append(f"{_ranks(finished)} exited 0")
    stopped = sorted(o.rank for o in outcomes.values() if o.stopped)
    if stopped:
        parts.append(f"{_ranks(stopped)} stopped by the launcher")
    return "; ".join(parts) if parts else "all ranks exited 0"
