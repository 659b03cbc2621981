"""A group's shared-memory channel, and the collectives over it.

Theory of operation
-------------------
Every rank of the group owns one :class:`~.segment.Segment` and maps every
other member's.  A collective moves its array in *rounds* of at most one
slot: each rank copies its part into its own input slot and passes a
*barrier*; each rank then reads what it needs straight from the others'
slots (for a reduction: its 1/n share of the round, reduced in rank order
into its own output slot, so every rank gets bit-identical values; a second
barrier; then every share copied out), as DeepSpeed's CPU all-reduce does.
Two barriers per round suffice: a slot is written again only after a
barrier that every rank reaches once it has finished reading it.  Every
call begins with a barrier that carries its signature (below), so a large
call never overwrites what a slow peer still reads of the call before.
Calls of at most :data:`SMALL_BYTES` take that one barrier only: their data
travel with it, in the half of the input slot of the barrier's parity (a
rank writes the other half for the next call while a slow peer may still
read this one), and every rank reduces all of it itself, in rank order.

A barrier is an epoch: a rank stores its next epoch in its own control
block and waits until every other rank's is at least as high.  Waiting
spins briefly, then yields the CPU, then sleeps on the laggard's futex
(woken when its epoch moves), so a rank that waits long costs no CPU and a
rank on a shared core does not starve its neighbour.  While it waits it
looks, about once a millisecond, for the reasons the wait can never end: a
peer that died (its pidfd), a peer that gave up on the group (its control
block, or the transport's ABORT), a lost connection, the deadline.

Agreement: a call's first barrier also publishes each rank's signature (a
hash of the operation, dtype and shape, in the slot of that barrier's
parity); every rank compares them all after it, so ranks that disagree all
raise ``MismatchError`` before any data is read.  A rank that gives up (deadline, mismatch, an
error) marks its control block broken and rings its bell: the group is
unusable from then on, on every rank.
"""

from __future__ import annotations

import functools
import hashlib
import os
import select
import time
from collections.abc import Callable

import numpy as np

from .. import collectives, results
from ..errors import CommError, CommTimeoutError, MismatchError, PeerLostError
from .segment import BROKEN, EPOCH, LOST, SIGNATURES, Segment

#: Seconds a waiter spins (then yields the CPU) before it sleeps.
SPIN_SECONDS = 0.0005
#: Longest sleep between two looks at why a wait might never end.
NAP_SECONDS = 0.002
#: Calls of at most this many bytes per rank take one barrier (see Channel._small).
SMALL_BYTES = 64 << 10

Health = Callable[[], "CommError | None"]  # the transport's view: an ABORT, a lost peer

_BROKE_TIMEOUT, _BROKE_MISMATCH, _BROKE_ERROR, _BROKE_LOST = 1, 2, 3, 4


@functools.lru_cache(maxsize=1024)
def signature_hash(description: str) -> int:
    return int.from_bytes(hashlib.blake2b(description.encode(), digest_size=8).digest(), "little", signed=True)


class Channel:
    """The shared-memory side of one group on this rank."""

    def __init__(self, rank: int, members: tuple[int, ...], mine: Segment, peers: dict[int, Segment],
                 pids: dict[int, int]) -> None:
        self.rank = rank
        self.members = members  # world ranks, by group rank
        self.size = len(members)
        self.mine = mine
        self.segments = [mine if k == rank else peers[k] for k in range(self.size)]
        self.others = [(k, peers[k]) for k in sorted(peers)]
        self.epoch = 0
        self.broken: CommError | None = None
        self._described = ""  # the description in this rank's control block
        self.slot_bytes = mine.slot_bytes
        self._poll = select.poll()
        self._pidfds: dict[int, int] = {}
        for k, pid in pids.items():
            fd = _pidfd(pid)
            if fd is not None:
                self._pidfds[fd] = k
                self._poll.register(fd, select.POLLIN)

    # ---- giving up, and noticing that others did

    def give_up(self, exc: CommError, code: int = _BROKE_ERROR) -> CommError:
        """Mark the group broken here and in this rank's control block (peers
        waiting on it wake and see it).  Returns ``exc``."""
        if self.broken is None:
            self.broken = exc
        if not self.mine.control[BROKEN]:
            self.mine.explain(str(exc))
            if isinstance(exc, PeerLostError):
                code = _BROKE_LOST
                self.mine.control[LOST] = -1 if exc.rank is None else exc.rank
            self.mine.control[BROKEN] = code
            self.mine.bell[0] += 1
            self.mine.wake()
        return exc

    def _arrived(self, world_rank: int | None, epoch: int) -> bool:
        """Whether the member with this world rank reached barrier ``epoch``:
        what befalls it afterwards (it exits, its connection closes, it gives
        up on a later step) belongs to a later step, not to this barrier."""
        if world_rank is None or world_rank not in self.members:
            return False
        return int(self.segments[self.members.index(world_rank)].control[EPOCH]) >= epoch

    def _why_stuck(self, k: int, epoch: int, deadline: float, health: Health, what: str,
                   timeout: float) -> CommError | None:
        world = self.members[k]
        if self._pidfds:
            for fd, _ in self._poll.poll(0):
                gone = self.members[self._pidfds[fd]]
                if not self._arrived(gone, epoch):
                    return PeerLostError(
                        f"rank {gone} (same host, shared memory) exited during {what} on rank "
                        f"{self.members[self.rank]}", gone)
        exc = health()
        if exc is not None and not (isinstance(exc, PeerLostError) and self._arrived(exc.rank, epoch)):
            return exc
        for other, seg in self.others:
            if int(seg.control[BROKEN]) and int(seg.control[EPOCH]) < epoch:
                return self._gave_up(other, seg, what)
        if time.monotonic() >= deadline:
            return CommTimeoutError(
                f"rank {self.members[self.rank]} timed out after {timeout:g}s in {what}, waiting for the next step "
                f"from rank {world} (shared memory): pass a larger timeout= or set AIOCOMM_TIMEOUT (seconds)",
                (world,))
        return None

    def _gave_up(self, other: int, seg: Segment, what: str) -> CommError:
        """The error for a peer that marked its control block broken, as the
        transport's ABORT would report it: the origin's own words and class."""
        code = int(seg.control[BROKEN])
        origin = self.members[other]
        text = f"{seg.reason() or f'rank {origin} gave up on this group during {what}'} (reported by rank {origin})"
        err: CommError
        if code == _BROKE_TIMEOUT:
            err = CommTimeoutError(text, (origin,))
        elif code == _BROKE_MISMATCH:
            err = MismatchError(text)
        elif code == _BROKE_LOST:
            lost = int(seg.control[LOST])
            err = PeerLostError(text, lost if lost >= 0 else None)
        else:
            err = CommError(text)
            err.culprit = origin
        return err

    # ---- the barrier

    def barrier(self, deadline: float, health: Health, what: str, timeout: float) -> None:
        epoch = self.epoch + 1
        self.epoch = epoch
        self.mine.ring(epoch)
        for k, seg in self.others:
            control = seg.control
            if control[EPOCH] >= epoch:
                continue
            started = looked = time.perf_counter()
            spins = 0
            while control[EPOCH] < epoch:
                spins += 1
                if spins < 32:
                    continue
                now = time.perf_counter()
                if now - looked >= NAP_SECONDS or spins == 32:
                    looked = now
                    why = self._why_stuck(k, epoch, deadline, health, what, timeout)
                    if why is not None and control[EPOCH] < epoch:  # (it may have arrived as we looked)
                        raise self.give_up(why, _BROKE_TIMEOUT if isinstance(why, CommTimeoutError) else _BROKE_ERROR)
                if now - started < SPIN_SECONDS:
                    os.sched_yield()
                    continue
                bell = int(seg.bell[0])
                if control[EPOCH] >= epoch:
                    break
                seg.sleep(self.rank, bell, NAP_SECONDS)
        if self.mine.fd >= 0 and epoch == 1:  # every peer mapped this segment before its first barrier
            self.mine.let_go_of_fd()

    def _start(self, description: str, deadline: float, health: Health, timeout: float) -> None:
        """Every call's first barrier: publish this call's signature (in the
        slot of that barrier's parity: a slow peer may still be reading the
        one of the call before), pass the barrier, and check every peer's.
        Data written before it (the small calls') travel with it."""
        if self.broken is not None:
            raise self.broken
        sig = signature_hash(description)
        slot = SIGNATURES[(self.epoch + 1) & 1]
        if description is not self._described:
            self.mine.describe(description)
            self._described = description
        self.mine.control[slot] = sig
        self.barrier(deadline, health, description, timeout)
        for _k, seg in self.others:
            if int(seg.control[slot]) != sig:
                self._mismatch(slot, sig, description)

    def _mismatch(self, slot: int, sig: int, description: str) -> None:
        me = self.members[self.rank]
        theirs = "; ".join(f"rank {self.members[k]}: {seg.description()}" for k, seg in self.others
                           if int(seg.control[slot]) != sig)
        raise self.give_up(MismatchError(f"rank {me} called {description}, but not every rank did the same "
                                         f"({theirs})"), _BROKE_MISMATCH)

    def _small(self, nbytes: int) -> list[np.ndarray] | None:
        """For a call of ``nbytes`` per rank small enough for one barrier:
        every segment's input half of this call's parity (else None).  Small
        calls alternate between the two halves of the input slot, so a rank
        may write the next call's data while a slow peer still reads this one's."""
        if nbytes > SMALL_BYTES or 2 * nbytes > self.slot_bytes:
            return None
        half = ((self.epoch + 1) & 1) * (self.slot_bytes // 2)
        return [seg.input[half : half + nbytes] for seg in self.segments]

    # ---- slots for algorithms outside this module (aiocomm.hierarchy)

    def input_half(self, k: int, parity: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of half ``parity`` of rank ``k``'s input slot.

        Rules for a caller that writes them: a call writes input halves only
        after its first barrier (:meth:`agree`) and reads them only before its
        last barrier; output halves may be read after it, by the ranks that
        passed it, so they too are written only after a call's first barrier.
        Taking halves in turn (``parity``) lets a rank write the next part
        while a slower peer still reads the part before."""
        half = self.slot_bytes // 2
        assert nbytes <= half
        return self.segments[k].input[parity * half : parity * half + nbytes]

    def output_half(self, k: int, parity: int, nbytes: int) -> np.ndarray:
        """The same, of rank ``k``'s output slot."""
        half = self.slot_bytes // 2
        assert nbytes <= half
        return self.segments[k].output[parity * half : parity * half + nbytes]

    def trouble(self, health: Health, what: str) -> CommError | None:
        """Why this rank should give up while it waits outside a barrier (for
        work of its own elsewhere): a peer that died or gave up, or what the
        transport knows (``health``); None if nothing is wrong."""
        if self.broken is not None:
            return self.broken
        if self._pidfds:
            for fd, _ in self._poll.poll(0):
                gone = self.members[self._pidfds[fd]]
                return PeerLostError(f"rank {gone} (same host, shared memory) exited during {what} on rank "
                                     f"{self.members[self.rank]}", gone)
        exc = health()
        if exc is not None:
            return exc
        for other, seg in self.others:
            if int(seg.control[BROKEN]):
                return self._gave_up(other, seg, what)
        return None

    # ---- the collectives

    def agree(self, description: str, deadline: float, health: Health, timeout: float) -> None:
        """Only the agreement (before a collective that moves its data another way)."""
        self._start(description, deadline, health, timeout)

    def all_reduce(self, x: np.ndarray, op: str, description: str, deadline: float, health: Health,
                   timeout: float) -> np.ndarray:
        # numpy's default error handling, whatever the calling thread set: a
        # reduction must not raise on one rank only (the TCP path reduces on
        # the loop's thread, with the defaults)
        with np.errstate(divide="warn", over="warn", under="ignore", invalid="warn"):
            return self._all_reduce(x, op, description, deadline, health, timeout)

    def _all_reduce(self, x: np.ndarray, op: str, description: str, deadline: float, health: Health,
                    timeout: float) -> np.ndarray:
        n, r = self.size, self.rank
        dtype = x.dtype
        ufunc = collectives.REDUCERS[op]
        small = self._small(x.nbytes)
        if small is not None:  # one barrier; every rank reduces all of it, in rank order
            inputs = [b.view(dtype) for b in small]
            inputs[r][:] = x.reshape(-1)
            self._start(description, deadline, health, timeout)
            if n == 1:
                alone: np.ndarray = inputs[0].reshape(x.shape).copy()
                return alone
            total: np.ndarray = ufunc(inputs[0], inputs[1])  # (1-d: a 0-d x would give a numpy scalar)
            for k in range(2, n):
                ufunc(total, inputs[k], out=total)
            return total.reshape(x.shape)
        flat = np.ascontiguousarray(x).reshape(-1)
        out = results.empty(x.shape, dtype)  # (large ones: on warm memory, if any)
        result = out.reshape(-1)
        per_round = max(1, self.slot_bytes // dtype.itemsize)
        self._start(description, deadline, health, timeout)
        ins = [seg.input[: per_round * dtype.itemsize].view(dtype) for seg in self.segments]
        outs = [seg.output[: per_round * dtype.itemsize].view(dtype) for seg in self.segments]
        for start in range(0, flat.size, per_round):
            stop = min(start + per_round, flat.size)
            count = stop - start
            ins[r][:count] = flat[start:stop]
            self.barrier(deadline, health, description, timeout)
            shares = collectives.partition(count, n)
            a, b = shares[r]
            share = outs[r][a:b]
            if n == 1:
                share[:] = ins[0][a:b]
            else:
                ufunc(ins[0][a:b], ins[1][a:b], out=share)
                for k in range(2, n):
                    ufunc(share, ins[k][a:b], out=share)
            self.barrier(deadline, health, description, timeout)
            for k, (ka, kb) in enumerate(shares):
                result[start + ka : start + kb] = outs[k][ka:kb]
        return out

    def all_gather(self, x: np.ndarray, description: str, deadline: float, health: Health,
                   timeout: float) -> np.ndarray:
        n, r = self.size, self.rank
        dtype = x.dtype
        flat = np.ascontiguousarray(x).reshape(-1)
        m = flat.size
        out = results.empty(collectives.gathered_shape(x.shape, n), dtype)
        result = out.reshape(-1)
        small = self._small(x.nbytes)
        if small is not None:
            inputs = [b.view(dtype) for b in small]
            inputs[r][:] = flat
            self._start(description, deadline, health, timeout)
            for k in range(n):
                result[k * m : (k + 1) * m] = inputs[k]
            return out
        per_round = max(1, self.slot_bytes // dtype.itemsize)
        self._start(description, deadline, health, timeout)
        ins = [seg.input[: per_round * dtype.itemsize].view(dtype) for seg in self.segments]
        for start in range(0, m, per_round):
            stop = min(start + per_round, m)
            count = stop - start
            ins[r][:count] = flat[start:stop]
            self.barrier(deadline, health, description, timeout)
            for k in range(n):
                result[k * m + start : k * m + stop] = ins[k][:count]
            self.barrier(deadline, health, description, timeout)
        return out

    def broadcast(self, x: np.ndarray, root: int, description: str, deadline: float, health: Health,
                  timeout: float) -> np.ndarray:
        r = self.rank
        dtype = x.dtype
        out = results.copy_of(x) if r == root else results.empty(x.shape, dtype)
        result = out.reshape(-1)
        small = self._small(x.nbytes)
        if small is not None:
            source = small[root].view(dtype)
            if r == root:
                source[:] = result
            self._start(description, deadline, health, timeout)
            if r != root:
                result[:] = source
            return out
        # Pipelined: the root's two slots take turns, so the root copies the
        # next round in while the others copy this one out; one barrier a
        # round (a slot is written again only two rounds later), one at the end.
        per_round = max(1, self.slot_bytes // dtype.itemsize)
        self._start(description, deadline, health, timeout)
        seg = self.segments[root]
        sources = [seg.input[: per_round * dtype.itemsize].view(dtype),
                   seg.output[: per_round * dtype.itemsize].view(dtype)]
        rounds = list(range(0, result.size, per_round))
        for i, start in enumerate(rounds):
            stop = min(start + per_round, result.size)
            if r == root:
                sources[i & 1][: stop - start] = result[start:stop]
            self.barrier(deadline, health, description, timeout)
            if r != root:
                result[start:stop] = sources[i & 1][: stop - start]
        self.barrier(deadline, health, description, timeout)
        return out

    def reduce_scatter(self, x: np.ndarray, op: str, description: str, deadline: float, health: Health,
                       timeout: float) -> np.ndarray:
        with np.errstate(divide="warn", over="warn", under="ignore", invalid="warn"):  # (see all_reduce)
            return self._reduce_scatter(x, op, description, deadline, health, timeout)

    def _reduce_scatter(self, x: np.ndarray, op: str, description: str, deadline: float, health: Health,
                        timeout: float) -> np.ndarray:
        n, r = self.size, self.rank
        dtype = x.dtype
        flat = np.ascontiguousarray(x).reshape(-1)
        m = flat.size // n  # items per block (the caller checked divisibility)
        out = results.empty(collectives.scattered_shape(x.shape, n), dtype)
        result = out.reshape(-1)
        ufunc = collectives.REDUCERS[op]
        small = self._small(x.nbytes)
        if small is not None:
            inputs = [b.view(dtype) for b in small]
            inputs[r][:] = flat
            self._start(description, deadline, health, timeout)
            mine = [inputs[k][r * m : (r + 1) * m] for k in range(n)]
            if n == 1:
                result[:] = mine[0]
            else:
                ufunc(mine[0], mine[1], out=result)
                for k in range(2, n):
                    ufunc(result, mine[k], out=result)
            return out
        per_round = max(1, self.slot_bytes // dtype.itemsize // n)  # items of each block per round
        self._start(description, deadline, health, timeout)
        ins = [seg.input[: per_round * n * dtype.itemsize].view(dtype).reshape(n, per_round)
               for seg in self.segments]
        for start in range(0, m, per_round):
            stop = min(start + per_round, m)
            count = stop - start
            own = ins[r]
            for k in range(n):
                own[k, :count] = flat[k * m + start : k * m + stop]
            self.barrier(deadline, health, description, timeout)
            target = result[start:stop]
            if n == 1:
                target[:] = ins[0][r, :count]
            else:
                ufunc(ins[0][r, :count], ins[1][r, :count], out=target)
                for k in range(2, n):
                    ufunc(target, ins[k][r, :count], out=target)
            self.barrier(deadline, health, description, timeout)
        return out

    def close(self) -> None:
        self._pidfds.clear()
        for seg in self.segments:
            seg.close()


_pidfds: dict[int, int | None] = {}  # pid -> a pidfd of it, shared by every group (one descriptor per peer)


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when process ``pid`` ends, or None
    (no pidfds here: the transport still notices a lost peer)."""
    if pid not in _pidfds:
        try:
            _pidfds[pid] = os.pidfd_open(pid)
        except (OSError, AttributeError):
            _pidfds[pid] = None
    return _pidfds[pid]
