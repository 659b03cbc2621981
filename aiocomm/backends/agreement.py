"""Agreement among the living members of a group, on the ring's mesh.

Theory of operation
-------------------
``Group.agree`` must give every survivor the same answer even when members
die before or during it; a reduction cannot (a rank that dies halfway
leaves some ranks with its share and others without).  This is the
*hierarchical uniform consensus* of Cachin, Guerraoui and Rodrigues
("Introduction to Reliable and Secure Distributed Programming", 5.2), with
one round of flags in front of it:

1. Every rank sends its flag to every other; each waits for the flag of
   every member it does not suspect.  Its *proposal* is then, per member,
   GONE (suspected), YES or NO.
2. Rounds 0, 1, ... have leaders 0, 1, ...  The leader of a round sends its
   proposal to everyone; a rank that receives the proposal of the round it
   is in (or a later one) acknowledges it.  A leader that gives up on a
   member before every acknowledgement came proposes again (a new version,
   that member gone), so a decision names every member given up on.  A rank leaves round ``r`` only
   when it suspects leader ``r``, and then adopts ``r``'s proposal if it
   had received it.  A leader with the acknowledgement of every member it
   does not suspect sends DECIDED to everyone and decides.
3. A rank that receives DECIDED first sends it to everyone else, then
   decides (so if any rank decided, every survivor hears of it, even if the
   sender dies right after).

A decision is taken by a leader only once every living member holds its
proposal; any later leader holds it too and proposes nothing else, so no
two ranks ever decide differently.  That needs a *perfect* failure
detector, which is what a lost connection is (a process that died: the
kernel closes its sockets).  A rank that stays silent for ``timeout``
seconds where it owes a message (frozen, SIGSTOPped, a host that vanished)
is made dead instead: it is told so (EXCLUDED), and every connection with
it is closed for good (the mesh never lets a lost rank back), so if it
wakes it can neither rejoin nor act on the group as if it were the only
survivor.

A rank that itself stood still (its wait ended far past its deadline) does
not take that for its peers' silence: their clocks start again, and what
they sent meanwhile is read before anyone is blamed (a short grace precedes
every blame).  Only a peer's reader, after everything that peer sent, says
it is lost (a failed send does not: the EXCLUDED it sent first must be heard).
A rank that stood still and then finds every other member gone does not
decide alone: it raises, as one declared failed.

Each rank's messages to one peer travel on one connection in order, and
each rank sends DECIDED last, so a peer's reader ends with its DECIDED (or
its loss); readers linger after the decision to take those last messages.

Limits: between two halves of a partition, each half takes the other for
dead after ``timeout`` and decides without it (as ULFM does); no quorum is
required, so a job that must never fork in two should check ``size()``
against a majority itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import CommError, CommTimeoutError, PeerLostError
from ..transport import Mesh, Op
from ..wire import Kind, signature

log = logging.getLogger("aiocomm")

FLAG, PROPOSAL, ACK, DECIDED, EXCLUDED = 1, 2, 3, 4, 5
#: What a proposal says of each member.
GONE, YES, NO = 0, 1, 2
#: How long a rank waits for the leader of its round, in timeouts (the
#: leader itself may first wait one timeout for a silent member's flag,
#: then one for its acknowledgement).
LEADER_PATIENCE = 2.5
#: A wait that ends this late (seconds, or this share of the timeout) means
#: this rank stood still, not that its peers were silent.
STALL_SECONDS, STALL_SHARE = 0.05, 0.25
#: Before it blames a silent member, a rank lets what arrived be read.
GRACE_SECONDS = 0.02
_I64 = np.dtype(np.int64)


def agreement_context(context: int) -> int:
    """The context of a group's agreements: never aborted with the group."""
    digest = hashlib.blake2b(f"{context}:agreement".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") | 1


class Agreement:
    """One ``agree`` call on one rank (run it once)."""

    def __init__(self, mesh: Mesh, members: tuple[int, ...], me: int, context: int, index: int, flag: bool,
                 failed: tuple[int, ...], timeout: float, lingering: set[asyncio.Task[Any]],
                 on_excluded: Callable[[str], None] | None = None) -> None:
        self.mesh = mesh
        self.on_excluded = on_excluded  # told if an EXCLUDED comes after this rank decided
        self.loop = mesh.loop
        self.members = members
        self.n = len(members)
        self.me = me
        self.context = agreement_context(context)
        self.tag = index
        self.timeout = timeout
        self.sig = signature("agreement", _I64, (self.n + 2,))
        self.lingering = lingering
        start = self.loop.time()
        self.started = start
        # (A peer already lost is not suspected yet: its reader first takes
        # what it sent before it went -- maybe that this rank was excluded.)
        self.suspected = set(failed) - {me}
        self.flags: dict[int, bool] = {me: flag}
        self.proposal: np.ndarray | None = None
        self.proposed: dict[int, np.ndarray] = {}
        self.round = 0
        self.round_since = start  # when this rank entered its round (or last heard from its leader)
        self.leading_since: float | None = None  # when this rank sent its proposal as a leader
        self.version = 0  # of its proposal: a leader proposes again, marking members it has given up on since
        self.acks: set[int] = set()
        self.decision: np.ndarray | None = None
        self.events: asyncio.Queue[tuple[int, np.ndarray | None]] = asyncio.Queue()
        self.outboxes: dict[int, asyncio.Queue[np.ndarray | None]] = {}
        self.excluded_by: int | None = None
        self.stalled = 0.0  # the longest this rank stood still during the agreement (seconds)
        self.done = False

    # ---- messages

    def _message(self, kind: int, round_: int = 0, body: np.ndarray | None = None, version: int = 0) -> np.ndarray:
        msg = np.zeros(self.n + 2, _I64)
        msg[0], msg[1] = kind, round_ | (version << 32)
        if body is not None:
            msg[2:] = body
        return msg

    def _send(self, k: int, msg: np.ndarray | None) -> None:
        box = self.outboxes.get(k)
        if box is None:
            box = self.outboxes[k] = asyncio.Queue()
            self._background(self._sender(k, box))
        box.put_nowait(msg)

    def _send_all(self, msg: np.ndarray) -> None:
        for k in range(self.n):
            if k != self.me and k not in self.suspected:
                self._send(k, msg)

    def _op(self, what: str, seconds: float) -> Op:
        return Op(what, self.context, seconds, self.loop.time() + seconds)

    async def _sender(self, k: int, box: asyncio.Queue[np.ndarray | None]) -> None:
        """What this rank sends ``k``, in order; it ends with DECIDED, EXCLUDED
        or None (nothing more to say: ``k`` is gone)."""
        peer = self.members[k]
        try:
            stream = await self.mesh.open(peer, self._op(f"agreement with rank {peer}", max(self.timeout, 1.0)))
            while True:
                msg = await box.get()
                if msg is None:
                    return
                self.mesh.send(stream, Kind.COLL, self.context, self.tag, self.sig, msg,
                               self._op(f"agreement with rank {peer}", self.timeout))
                if msg[0] in (DECIDED, EXCLUDED):
                    return
        except Exception as exc:  # (a lost peer, a closed connection, a refused dial)
            # Not a loss: the reader decides that, once it has taken everything
            # the peer sent first (maybe that this rank was excluded).
            log.debug("rank %d: agreement message to rank %d not sent: %r", self.mesh.rank, peer, exc)

    async def _reader(self, k: int) -> None:
        """Everything ``k`` sends in this agreement, in order, then its loss or its DECIDED."""
        peer = self.members[k]
        linger_until: float | None = None
        while True:
            if self.done:
                if linger_until is None:
                    linger_until = self.loop.time() + max(self.timeout, 1.0)
                elif self.loop.time() >= linger_until:
                    return
            try:
                msg = await self.mesh.post(peer, Kind.COLL, self.context, self.tag, self.sig, None,
                                           self._op(f"agreement with rank {peer}", 0.5))
            except CommTimeoutError:
                continue
            except CommError:
                self.events.put_nowait((k, None))
                return
            if self.done and msg[0] == EXCLUDED and self.on_excluded is not None:  # (after this rank decided)
                self.on_excluded(self._excluded_text(k))
            self.events.put_nowait((k, msg))
            if msg[0] == DECIDED:
                return

    def _background(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.lingering.add(task)
        task.add_done_callback(self.lingering.discard)

    # ---- the protocol

    async def run(self) -> tuple[bool, tuple[int, ...]]:
        """Agree; returns (the AND of the living members' flags, the members
        the survivors agree are gone, by group rank)."""
        try:
            for k in range(self.n):
                if k != self.me and k not in self.suspected:
                    self._background(self._reader(k))
            self._send_all(self._message(FLAG, 0, self._flag_body()))
            while True:
                self._progress()
                if self.decision is not None:
                    break
                until = self._next_deadline()
                try:
                    k, msg = await asyncio.wait_for(self.events.get(), max(until - self.loop.time(), 0.0))
                except TimeoutError:
                    now = self.loop.time()
                    if now - until > max(STALL_SECONDS, STALL_SHARE * self.timeout):
                        # This rank stood still (frozen, its loop blocked), not
                        # its peers: their clocks start again, and what they
                        # sent meanwhile is waiting to be read.
                        self.stalled = max(self.stalled, now - until)
                        self._restart_clocks(now)
                    await asyncio.sleep(GRACE_SECONDS)  # (what arrived is heard before anyone is blamed)
                    if self.events.empty():
                        self._give_up_on_silent()
                    continue
                self._handle(k, msg)
        finally:
            self.done = True
        decision = self.decision
        assert decision is not None
        if self.stalled and self.n > 1 and all(decision[k] == GONE for k in range(self.n) if k != self.me):
            # It stood still, and everyone was gone when it looked again: the
            # others cut it off (their notice did not reach it), or it is on
            # the losing side of a partition.  Alone, it must not carry on.
            why = (f"rank {self.members[self.me]}: this rank stood still for {self.stalled:.1f}s during an "
                   "agreement and found every other member gone afterwards: the others most likely declared it "
                   "failed; it cannot rejoin the group")
            if self.on_excluded is not None:
                self.on_excluded(why)
            raise CommError(why)
        if decision[self.me] == GONE:
            raise CommError(
                f"rank {self.members[self.me]}: the other members of the group declared this rank failed "
                f"(it was silent for more than timeout={self.timeout:g}s during an agreement, or its "
                "connections were lost); it cannot rejoin the group")
        failed = tuple(k for k in range(self.n) if decision[k] == GONE)
        return bool(all(decision[k] == YES for k in range(self.n) if decision[k] != GONE)), failed

    def _flag_body(self) -> np.ndarray:
        body = np.zeros(self.n, _I64)
        body[self.me] = YES if self.flags[self.me] else NO
        return body

    def _progress(self) -> None:
        """Everything the state now allows, until nothing more changes."""
        while True:
            if self.proposal is None and all(k in self.flags or k in self.suspected for k in range(self.n)):
                self.proposal = np.array(
                    [GONE if k in self.suspected else (YES if self.flags[k] else NO) for k in range(self.n)], _I64)
            if self.round in self.suspected:
                adopted = self.proposed.get(self.round)
                if adopted is not None:
                    self.proposal = adopted
                self.round += 1
                self.round_since = self.loop.time()
                continue
            break
        if self.round == self.me and self.proposal is not None:
            stale = [k for k in self.suspected if self.proposal[k] != GONE]
            if self.leading_since is None or stale:
                # (Again, marking members given up on since as gone: a decision
                # needs every living member's acknowledgement of this version,
                # and a member that decided an earlier value told everyone
                # first, so nobody alive decides anything else.)
                if stale:
                    self.proposal = self.proposal.copy()
                    self.proposal[stale] = GONE
                if self.leading_since is not None:
                    self.version += 1
                self.leading_since = self.loop.time()
                self.acks = set()
                self._send_all(self._message(PROPOSAL, self.me, self.proposal, self.version))
        if self.leading_since is not None and all(
                k == self.me or k in self.suspected or k in self.acks for k in range(self.n)):
            assert self.proposal is not None
            self._decide(self.proposal)

    def _decide(self, value: np.ndarray) -> None:
        self.decision = value
        self._send_all(self._message(DECIDED, 0, value))
        for k in self.suspected:  # nothing more for them: their senders end (after an EXCLUDED queued)
            if k in self.outboxes:
                self.outboxes[k].put_nowait(None)

    def _handle(self, k: int, msg: np.ndarray | None) -> None:
        if msg is not None and msg[0] == EXCLUDED:
            self.excluded_by = self.members[k]
            raise CommError(self._excluded_text(k))
        if k in self.suspected:
            return  # (what a rank made dead says is not heard; a lost one's earlier messages came first)
        if msg is None:
            self.suspected.add(k)
            return
        kind, round_, version, body = int(msg[0]), int(msg[1]) & 0xFFFFFFFF, int(msg[1]) >> 32, msg[2:]
        if kind == FLAG:
            self.flags[k] = body[k] == YES
        elif kind == PROPOSAL:
            self.proposed[round_] = body.copy()
            if round_ == self.round:
                self.round_since = self.loop.time()
            if round_ >= self.round:
                self._send(k, self._message(ACK, round_, version=version))
        elif kind == ACK:
            if round_ == self.me and self.leading_since is not None and version == self.version:
                self.acks.add(k)
        elif kind == DECIDED:
            self._decide(body.copy())

    def _excluded_text(self, k: int) -> str:
        return (f"rank {self.members[self.me]}: rank {self.members[k]} declared this rank failed after it was "
                f"silent for more than timeout={self.timeout:g}s in an agreement; it cannot rejoin the group")

    def _restart_clocks(self, now: float) -> None:
        """Every member's silence counts from ``now`` (after this rank's own stall)."""
        self.started = self.round_since = now
        if self.leading_since is not None:
            self.leading_since = now

    # ---- silence

    def _owed(self) -> dict[int, float]:
        """Members that owe this rank a message now, and since when it waits."""
        owed: dict[int, float] = {}
        if self.proposal is None:
            for k in range(self.n):
                if k not in self.flags and k not in self.suspected:
                    owed[k] = self.started
        leader = self.round
        if leader != self.me and leader < self.n and leader not in self.suspected:
            since = self.round_since + (LEADER_PATIENCE - 1) * self.timeout
            owed[leader] = min(owed.get(leader, since), since)
        if self.leading_since is not None:
            for k in range(self.n):
                if k != self.me and k not in self.suspected and k not in self.acks:
                    owed.setdefault(k, self.leading_since)
        return owed

    def _next_deadline(self) -> float:
        owed = self._owed()
        if not owed:
            return self.loop.time() + self.timeout  # (nothing owed: only messages can move it on)
        return min(owed.values()) + self.timeout

    def _give_up_on_silent(self) -> None:
        now = self.loop.time()
        for k, since in self._owed().items():
            if since + self.timeout <= now:
                self._make_dead(k, now - since)

    def _make_dead(self, k: int, silent: float) -> None:
        """Take silent member ``k`` for dead, here and for good."""
        peer = self.members[k]
        self.suspected.add(k)
        log.warning("rank %d: rank %d sent nothing for %.1fs during an agreement; it is taken for dead",
                    self.members[self.me], peer, silent)
        err = PeerLostError(
            f"rank {self.members[self.me]} gave up on rank {peer}: silent for {silent:.1f}s during an agreement "
            f"(timeout={self.timeout:g}s); it is out of the job", peer)

        self._send(k, self._message(EXCLUDED))  # (now: before the None a decision queues)

        async def exclude() -> None:
            box = self.outboxes[k]
            for _ in range(100):  # best effort: let the notice reach the kernel before the connection closes
                if box.empty():
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            self.mesh.cut_off(peer, err)

        self._background(exclude())
