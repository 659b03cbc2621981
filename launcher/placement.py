"""Which CPUs each local rank runs on (`--bind-to`), as mpirun binds ranks to cores.

The launcher applies this rule; the benchmark reads it to place its reference
processes the same way, so it lives below both.

A rank of aiocomm is two threads that hand work to each other: the caller and
the event loop that owns the sockets.  On one core that hand-off is a plain
context switch; across cores it is a wake-up by interrupt, which on virtual
machines costs tens of microseconds (measured here: 6 us on one core against
58 us across two, for an eventfd round trip between two threads).  Binding
each rank to its own CPUs keeps both threads together and keeps ranks from
being moved onto each other's cores.

``auto`` (the default) binds whenever more than one rank runs on the
machine; ``core`` binds even a lone rank; ``none`` leaves placement to the
scheduler.  With at least one CPU per rank each rank gets its own block of
CPUs; with more ranks than CPUs consecutive ranks share a CPU, so ring
neighbours hand data to each other on one core.  Measured on this project's
2-CPU machine, 4 ranks, 8-byte all_sum: 1.1 ms unbound, 0.55 ms bound; 64 MiB
all_sum the same either way.  (Open MPI leaves oversubscribed ranks unbound
by default; for aiocomm's hand-offs binding measured better.)

Scheduling (``--sched``): when local ranks outnumber the CPUs, ``auto`` (the
default) starts them under ``SCHED_BATCH``, Linux's policy for non-interactive
CPU-bound work: a rank woken by a message no longer preempts the rank that
shares its core in the middle of its work, so each core switches less.  (An
oversubscribed rank never busy-waits: see ``AIOCOMM_POLL_US``.)  Measured
here, 4 ranks on 2 CPUs, 8-byte all_sum, blocking face: 380 -> 336 us per
operation; with a CPU per rank it made 2-rank latency slightly worse (80 ->
83 us), hence only when oversubscribed.  ``batch`` and ``normal`` force it
on or off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

POLICIES = ("auto", "core", "none")
SCHEDULING = ("auto", "batch", "normal")


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def cpu_sets(n: int, policy: str, cpus: Sequence[int] | None = None) -> list[tuple[int, ...] | None]:
    """The CPU set of each of ``n`` local ranks (``None``: not bound)."""
    if policy not in POLICIES:
        raise ValueError(f"--bind-to {policy!r}: expected one of {', '.join(POLICIES)}")
    cpus = list(usable_cpus() if cpus is None else cpus)
    if policy == "none" or n < 1 or not cpus or (policy == "auto" and n == 1):
        return [None] * n
    if n <= len(cpus):
        per = len(cpus) // n
        return [tuple(cpus[j * per : (j + 1) * per]) for j in range(n)]
    return [(cpus[j * len(cpus) // n],) for j in range(n)]


def batch_scheduled(n: int, policy: str, cpus: Sequence[int] | None = None) -> bool:
    """Whether ``n`` local ranks run under ``SCHED_BATCH`` (``--sched``)."""
    if policy not in SCHEDULING:
        raise ValueError(f"--sched {policy!r}: expected one of {', '.join(SCHEDULING)}")
    if not hasattr(os, "SCHED_BATCH"):  # pragma: no cover - not Linux
        return False
    if policy == "auto":
        return n > len(usable_cpus() if cpus is None else cpus)
    return policy == "batch"
