"""Shared memory between the ranks of a group that all run on one host.

Layers: :mod:`.segment` (one memfd segment, its control block, futex
waits) -> :mod:`.channel` (a group's segments, barriers, the collectives).
The ring backend (:mod:`aiocomm.backends.ring`) decides, once per group and
the same way on every rank, whether a group uses them: at the group's first
collective its members exchange, over TCP, ``(host, pid, segment fd)``;
when every member is on this host and none was told ``AIOCOMM_TRANSPORT=tcp``,
the group's reductions and gathers move through shared memory from then on,
in the calling thread of the blocking face (no hand-off to the event loop)
or in the group's own thread for the async face.  The other collectives
keep to TCP, after the same agreement on what was called; so do messages
(send/recv), but for large payloads, which the sender writes straight into
the receive's memory (:mod:`aiocomm.transport.cma`).  A group over several hosts uses a channel among its ranks on each
host for its first and last level (:mod:`aiocomm.hierarchy`).
"""

from __future__ import annotations

from ..transport.cma import host_id
from .channel import Channel, Health
from .segment import MAX_RANKS, Segment, supported

__all__ = ["Channel", "Health", "MAX_RANKS", "Segment", "host_id", "supported"]
