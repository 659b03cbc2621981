"""Two-level collectives on the ring backend: the set-up, and the rings between hosts.

At a group's first collective every member reports its host, process,
shared segment, slot size and ``AIOCOMM_TWO_LEVEL`` (:meth:`RingBackend._decide`).
When the group spans several hosts, :func:`set_up` decides, the same way on
every rank: two levels (:mod:`aiocomm.hierarchy`) if some host has several
of the group's ranks, every member wants them and every rank mapped the
segments of its host's other ranks; else the flat ring.  Any layout works
two-level (hosts with different numbers of ranks run as many rings between
hosts as the smallest host has ranks).  From then on the group's
all_sum/max/min, all_gather and sum_scatter run two-level, in the calling
thread (the blocking face) or the group's worker (the async face), with
their TCP parts on the event loop; its other collectives stay on the flat
ring, after agreeing on what was called: inside each host, as a group on
one host does, and between hosts, where an empty frame carrying the call's
signature meets what another host sent (a two-level call's first part, if
that host called one: ``MismatchError``).

The rings between hosts (:class:`CrossRing`) move their frames in the
group's own context, so an abort of the group ends their waits, and with
tags above every tag the group itself uses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import collectives, hierarchy, shm
from ..wire import Signature, signature
from .ring import MeshLink, _release

if TYPE_CHECKING:
    from . import GroupState
    from .ring import RingBackend, RingGroup

#: A ring between hosts numbers its parts from here: ``seq << 8`` is its tag
#: base, above any a group's own collectives reach.
CROSS_SEQ = 1 << 54

_OP_NAMES = {"sum": "all_sum", "max": "all_max", "min": "all_min"}


class CrossRing:
    """The ring between hosts of this rank's flow (a
    :class:`~aiocomm.backends.GroupState` for :class:`MeshLink`): the
    group's ranks with this rank's local index, one per host."""

    __slots__ = ("members", "context", "handle", "seq", "streams", "_rank")

    def __init__(self, members: tuple[int, ...], rank: int, context: int) -> None:
        self.members = members  # world ranks, by host
        self._rank = rank
        self.context = context  # the group's
        self.handle = None
        self.seq = CROSS_SEQ
        self.streams: dict[int, Any] = {}

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return len(self.members)


class CrossCall:
    """:class:`aiocomm.hierarchy.Cross` for one call: its parts run on the
    loop that owns the mesh, each a collective of its own on the ring."""

    __slots__ = ("backend", "ring", "sig", "timeout")

    def __init__(self, backend: RingBackend, ring: CrossRing | None, sig: Signature, timeout: float) -> None:
        self.backend = backend
        self.ring = ring
        self.sig = sig
        self.timeout = timeout

    def start(self, body: hierarchy.Body) -> concurrent.futures.Future[None]:
        assert self.ring is not None  # (only owners have a ring)
        backend = self.backend
        link = MeshLink(self.ring, backend.mesh, self.sig, self.timeout)  # (its tags: in call order)
        return asyncio.run_coroutine_threadsafe(backend._run_link(self.ring, link, body),
                                                backend.mesh.loop)


async def set_up(backend: RingBackend, group: GroupState, state: RingGroup, table: np.ndarray,
                 segment: shm.Segment | None, timeout: float) -> None:
    """Decide, on a group whose members are not all on this host, whether it
    runs two-level (``table``: every member's row of the set-up), and set it up."""
    me = group.rank()
    layout = hierarchy.Layout.of(table[:, 0].tolist(), me)
    local = layout.hosts[layout.host]
    usable = (segment is not None and layout.worth_it() and bool(np.all(table[:, 2] >= 0))
              and bool(np.all(table[:, 4] == 1)) and max(len(ranks) for ranks in layout.hosts) <= shm.MAX_RANKS)
    rows = {k: g for k, g in enumerate(local) if g != me}
    peers = await backend.map_segments(group, usable, rows, table, segment, "two-level agreement", timeout)
    if peers is None:
        return
    assert segment is not None
    members = tuple(group.members[g] for g in local)
    channel = shm.Channel(layout.local, members, segment, peers, {k: int(table[local[k], 1]) for k in peers})
    weakref.finalize(group, _release, channel)  # (nothing in its arguments may refer to the group)
    two = hierarchy.TwoLevel(layout, channel, int(table[:, 3].min()) // 2)
    ring = None
    if layout.owner:
        ring = CrossRing(tuple(group.members[g] for g in layout.ring(layout.local)), layout.host, group.context)
    # (Ranks of other hosts lost are no reason by themselves: one that
    # finished and exited may close its connections while this host still
    # finishes the call; if one is lost mid-call, its ring's owners find out
    # and abort the group.)
    state.health = backend.health(group.context, [w for w in members if w != backend.rank])
    n = group.size()

    def call(name: str, x: np.ndarray, t: float) -> tuple[CrossCall, str]:
        sig = signature(name, x.dtype, x.shape)
        return CrossCall(backend, ring, sig, t), sig.describe()

    def all_reduce(x: np.ndarray, op: str, t: float) -> np.ndarray:
        cross, describe = call(_OP_NAMES[op], x, t)
        return backend._shm_call(group, state, two.all_reduce, x, op, cross, describe, t)  # type: ignore[no-any-return]

    def all_gather(x: np.ndarray, t: float) -> np.ndarray:
        cross, describe = call("all_gather", x, t)
        return backend._shm_call(group, state, two.all_gather, x, cross, describe, t)  # type: ignore[no-any-return]

    def sum_scatter(x: np.ndarray, t: float) -> np.ndarray:
        collectives.scattered_shape(x.shape, n)  # ValueError before any step
        cross, describe = call("sum_scatter", x, t)
        return backend._shm_call(  # type: ignore[no-any-return]
            group, state, two.reduce_scatter, x, "sum", cross, describe, t)

    def agree(sig: Signature, description: str, deadline: float, health: shm.Health, t: float) -> None:
        # (the call's signature goes to the other hosts as the first part of
        # a two-level call would: a host that called one of those meets it)
        channel.agree(description, deadline, health, t)
        if ring is not None:
            two.wait(CrossCall(backend, ring, sig, t).start(collectives.barrier), description, deadline, health, t)

    state.direct = {"all_reduce": all_reduce, "all_gather": all_gather, "sum_scatter": sum_scatter}
    state.agree = agree
    state.channel = channel
