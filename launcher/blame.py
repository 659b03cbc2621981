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

All of this is pure: :func:`decide` takes the outcomes and returns the verdict.
"""

from __future__ import annotations

import math
import signal
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


def decide(outcomes: dict[int, RankOutcome]) -> Verdict:
    failed = sorted((o for o in outcomes.values() if o.failed), key=lambda o: (o.ended_at, o.rank))
    if not failed:
        return Verdict(None, {}, [], 0)
    roots = {o.rank: _root(outcomes, o.rank) for o in failed}
    cause = min(set(roots.values()), key=lambda r: (outcomes[r].ended_at, r))
    victims = {r: root for r, root in roots.items() if r != root}
    others = sorted(r for r, root in roots.items() if r == root and r != cause)
    if outcomes[cause].failed:
        status = status_of(outcomes[cause].code)
    else:  # it exited 0 too soon: the job's status is its first victim's
        status = status_of(next(o.code for o in failed if roots[o.rank] == cause))
    return Verdict(cause, victims, others, status)


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
    launcher, a closed output) when no rank failed before it.
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
    stopped = sorted(o.rank for o in outcomes.values() if o.stopped)
    if stopped:
        parts.append(f"{_ranks(stopped)} stopped by the launcher")
    return "; ".join(parts) if parts else "all ranks exited 0"
