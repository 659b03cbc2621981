"""Shared memory between the ranks of a group that all run on one host.

Layers: :mod:`.segment` (one memfd segment, its control block, futex
waits) -> :mod:`.channel` (a group's segments, barriers, the collectives).
The ring backend (:mod:`aiocomm.backends.ring`) decides, once per group and
the same way on every rank, whether a group uses them: at the group's first
collective its members exchange, over TCP, ``(host, pid, segment fd)``;
when every member is on this host and none was told ``AIOCOMM_TRANSPORT=tcp``,
the group's reductions and gathers move through shared memory from then on,
in the calling thread of the blocking face (no hand-off to the event loop)
or in the group's own thread for the async face.  Messages (send/recv) and
the other collectives keep to TCP, after the same agreement on what was
called.  A group over several hosts uses a channel among its ranks on each
host for its first and last level (:mod:`aiocomm.hierarchy`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket

import numpy as np

from .channel import Channel, Health
from .segment import MAX_RANKS, Segment, supported

__all__ = ["Channel", "Health", "MAX_RANKS", "Segment", "host_id", "supported"]


@functools.lru_cache(maxsize=1)
def host_id() -> int:
    """Which host this process is on, as the group decisions see it.

    Ranks with equal ids can map each other's segments: one kernel (boot
    id), one PID namespace, seen through one mount of /proc (its device:
    ``/proc/<pid>`` names the same process), and one network namespace.
    The network namespace makes two namespaces of one machine two hosts
    (what simulated hosts are: ``ip netns``), and the mount namespace is left
    out on purpose: ``ip netns exec`` gives every process it starts a new one
    with the same /proc, and ranks started that way in one namespace are one
    host."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            parts.append(fh.read().strip())
    except OSError:
        parts.append("no boot id")
    for ns in ("pid", "net"):
        try:
            parts.append(str(os.stat(f"/proc/self/ns/{ns}").st_ino))
        except OSError:
            parts.append(f"no {ns} namespace")
    try:
        parts.append(str(os.stat("/proc/self").st_dev))
    except OSError:
        parts.append("no /proc")
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int(np.frombuffer(digest, np.int64)[0])
