"""Small messages between ranks of one host, through shared memory.

Theory of operation
-------------------
Every rank keeps one *inbox*: a ``memfd`` holding a ring per possible sender
(world rank ``r`` writes only into region ``r``), and an eventfd, its *bell*,
that its event loop waits on.  The acceptor's ``WELCOME`` names both
descriptors; a dialer on the same host takes its own copies of them
(``pidfd_getfd``, the permission a debugger needs, as :mod:`.cma`), maps its
region and from then on may put an eager point-to-point message of at most
:data:`SMALL` bytes there instead of on the socket: one copy in, one copy
out, no system call.  The blocking face's ``send`` does so from the caller's
thread, and its ``recv`` takes such a message straight out of the ring in
the caller's thread while it spins (see ``RingBackend.in_caller``), so a
message between two blocking callers needs no hand-off to either loop.

Only the medium changes: a message in the ring is the same eager frame as on
the socket (its context, signature and payload), it takes the same credit
(:mod:`.flow`: a receiver buffers no more than before), and what a receiver
does with it is what it does with a frame from the socket
(``Matcher.arrive``; a mismatched receive raises ``MismatchError`` and the
message stays).

Order with the socket: each record carries a *mark*, the number of bytes the
sender had queued on its connection to this rank when it wrote the record.
The receiver counts the bytes it routed from that connection
(``Mesh.routed``); a record is taken only once its mark is reached (every
frame the sender queued before it has its place), and before a data frame
from the socket is routed, the records written before it (marks up to its
first byte) are taken first.  So messages between two ranks keep the order
they were sent in, whichever way each one went.

Messages larger than :data:`SMALL` and smaller than ``cma.CMA_FROM`` go
the same way from a blocking sender's thread, in *parts* of at most
:data:`SMALL` bytes, so that the receiver copies one part out while the
sender copies the next in.  The first part's record carries the signature
and the message's whole size; the others (``_MORE``) carry only their
bytes and where in the message they go, and no other record comes between
them (the sender holds its outlet's lock throughout).  The sender takes
credit for the whole message before its first part, so the receiver's loop
may take the parts into a buffer of its own when no receive is there for
them: a sender that finds no room for a part sets ``STALLED`` and rings the
bell with ``_STALL_BELL``, and the loop then drains that ring whether or
not a receive waits for it.  A receive of such a message completes only
once its last part is in (a part-taken message whose sender is lost is one
that never came whole); a sender that cannot finish one (its deadline
passed before the receiver made room, or it was interrupted) closes the
connection rather than leave half a message behind, as the TCP path does
with a frame it could not finish.

Ring: ``TAIL`` (written only by the sender) and ``HEAD`` (only by the
receiver) are byte counts that only grow.  A record is written whole, then
``TAIL`` is published; x86's store order makes the record visible before the
new tail, so a sender killed halfway leaves nothing half-written to read.
A record does not wrap: a sender with too little room before the end writes
a skip marker and starts again at the beginning.  ``WAITING`` is set by the
receiver's loop while it waits for a message from that sender (a receive is
posted there); a sender rings the bell after writing only then.  Both sides
pass a lock (a full barrier on x86) between their store and their load of
the other's word, so a message is never left unseen with nobody spinning for
it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
import threading
from typing import Any

import numpy as np

#: Payload bytes of the largest message that goes through an inbox.
SMALL = 256 << 10
#: Bytes of each sender's ring (a power of two, a multiple of the page).
RING_BYTES = 1 << 20
_PAGE = 4096
#: Bytes of each sender's region of an inbox: its control page, then its ring.
REGION = _PAGE + RING_BYTES
#: Control words (int64 indices, a cache line apart).  ``STALLED``: set by
#: the sender when a part of a message found no room, cleared by the receiver.
TAIL, HEAD, WAITING, STALLED = 0, 8, 16, 24
#: A record's header: mark, context, meta bytes, payload bytes.
RECORD = struct.Struct("<qQII")
_pack = RECORD.pack
_unpack_from = RECORD.unpack_from
_HEAD_BYTES = RECORD.size
_WRAP = RING_BYTES - 1
_SKIP = 0xFFFFFFFF  # a record's meta size that says: go on at the ring's start
_MORE = 0xFFFFFFFE  # a record's meta size that says: the next part of the message begun before
_FIRST = 1 << 30  # in a record's meta size: the first part; the message's size follows its meta
_TOTAL = struct.Struct("<q")
_STALL_BELL = 1 << 32  # what a stalled sender adds to the bell (a plain ring adds 1): look at the STALLED words
_NAME = "aiocomm-inbox"
_SYS_PIDFD_GETFD = 438
_PUNCH_HOLE, _KEEP_SIZE = 0x02, 0x01  # fallocate's FALLOC_FL_PUNCH_HOLE, FALLOC_FL_KEEP_SIZE
_libc: Any = None


def record_bytes(meta: int, payload: int) -> int:
    """A record's size in its ring: header, meta and payload, 8-aligned."""
    return (_HEAD_BYTES + meta + payload + 7) & ~7


def _lib() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        _libc = libc
    return _libc


def _map(fd: int, size: int, offset: int) -> tuple[int, memoryview]:
    """Map ``size`` bytes of ``fd`` from ``offset``: the address and a byte
    view.  With libc's mmap, not Python's, which keeps a duplicate of the
    descriptor for as long as the mapping lives."""
    address = _lib().mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, offset)
    if address in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of an inbox failed: {os.strerror(err)}")
    return address, memoryview((ctypes.c_uint8 * size).from_address(address)).cast("B")


def available() -> str | None:
    """Why small messages cannot go through inboxes here, or None."""
    if platform.machine() != "x86_64":  # (stores must not be reordered: see the notes on the ring)
        return f"the inbox is written for x86-64, not {platform.machine()}"
    if not hasattr(os, "memfd_create") or not hasattr(os, "pidfd_open") or not hasattr(os, "eventfd"):
        return "this system has no memfd_create, pidfd_open or eventfd"
    return None


def _getfd(pid: int, fd: int) -> int:
    """A descriptor of this process for descriptor ``fd`` of process ``pid`` (OSError if refused)."""
    pidfd = os.pidfd_open(pid)
    try:
        got = _lib().syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd of descriptor {fd} of process {pid}: {os.strerror(err)}")
        return int(got)
    finally:
        os.close(pidfd)


class Ring:
    """The receiver's view of one sender's ring (its lock: one reader at a
    time, the loop or a caller spinning for a message)."""

    __slots__ = ("control", "data", "lock", "taken", "dead", "partial")

    def __init__(self, control: memoryview, data: memoryview) -> None:
        self.control = control  # int64 words
        self.data = data  # RING_BYTES
        self.lock = threading.Lock()
        self.taken = 0  # messages taken out of it (under the lock)
        self.dead = False  # its sender was lost: nothing more is taken out of it (set under the lock)
        #: A message taken part by part, not whole yet (under the lock): who
        #: takes the rest (the mesh's to set; None: no message is halfway)
        self.partial: Any = None

    def used(self) -> bool:
        """Whether its sender ever wrote into it."""
        return self.control[TAIL] != 0

    def empty(self) -> bool:
        control = self.control
        return control[HEAD] == control[TAIL]

    def pending(self) -> bool:
        """Whether there is anything to take: a record, or the rest of a message halfway out."""
        control = self.control
        return control[HEAD] != control[TAIL] or self.partial is not None

    def peek(self) -> tuple[int, int, bytes, int, int, int, int] | None:
        """The oldest record: ``(mark, context, meta, payload offset, payload
        bytes, where the next record begins, the message's bytes)``, or None
        (the message's bytes: the payload's, for a whole message; more, for
        its first part; -1 for a later part, whose mark is where in the
        message its bytes go).  Call with the lock."""
        control = self.control
        head = control[HEAD]
        while head != control[TAIL]:
            at = head & _WRAP
            if RING_BYTES - at < _HEAD_BYTES:
                head += RING_BYTES - at
                control[HEAD] = head
                continue
            mark, context, meta_len, nbytes = _unpack_from(self.data, at)
            start = at + _HEAD_BYTES
            if meta_len < _FIRST:
                return (mark, context, self.data[start : start + meta_len].tobytes(), start + meta_len, nbytes,
                        head + record_bytes(meta_len, nbytes), nbytes)
            if meta_len == _SKIP:
                head += RING_BYTES - at
                control[HEAD] = head
                continue
            if meta_len == _MORE:
                return mark, context, b"", start, nbytes, head + record_bytes(0, nbytes), -1
            meta_len -= _FIRST
            (total,) = _TOTAL.unpack_from(self.data, start + meta_len)
            return (mark, context, self.data[start : start + meta_len].tobytes(), start + meta_len + 8, nbytes,
                    head + record_bytes(meta_len + 8, nbytes), total)
        return None

    def payload(self, at: int, nbytes: int) -> memoryview:
        return self.data[at : at + nbytes]

    def advance(self, head: int, whole: bool = True) -> None:
        """The record before ``head`` is taken: its room goes back to the
        sender (``whole``: it ended a message)."""
        self.control[HEAD] = head
        if whole:
            self.taken += 1

    def waiting(self, flag: bool) -> None:
        self.control[WAITING] = int(flag)


class Inbox:
    """This rank's inbox: the rings peers on this host write into, and its bell."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
        self.bell = -1
        self._rings: dict[int, Ring] = {}
        try:
            os.ftruncate(self.fd, size * REGION)  # (sparse: a region's pages exist once its sender writes)
            # (never unmapped: a caller's thread may still look at a ring as the engine shuts down)
            _, self._view = _map(self.fd, size * REGION, 0)
            # (each sender's STALLED word, one per region)
            self._stalled = np.frombuffer(self._view, np.int64)[STALLED :: REGION // 8]
            self.bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            self.close()
            raise

    def ring(self, src: int) -> Ring:
        """Sender ``src``'s ring."""
        ring = self._rings.get(src)
        if ring is None:  # (setdefault: a caller's thread and the loop may both come first)
            base = src * REGION
            ring = self._rings.setdefault(src, Ring(self._view[base : base + _PAGE].cast("q"),
                                                    self._view[base + _PAGE : base + REGION]))
        return ring

    def stalled(self) -> list[int]:
        """The senders that wait for room in their ring (their word cleared)."""
        words = self._stalled
        found = np.flatnonzero(words)
        if not len(found):
            return []
        words[found] = 0
        return found.tolist()  # type: ignore[no-any-return]

    def taken(self) -> int:
        """Messages taken out of this inbox so far."""
        return sum(ring.taken for ring in list(self._rings.values()))

    def quiet(self) -> bool:
        """Read the bell (its ring was heard): whether a sender that waits
        for room rang it (see :meth:`stalled`)."""
        try:
            return os.eventfd_read(self.bell) >= _STALL_BELL
        except BlockingIOError:
            return False

    def fds(self) -> list[int]:
        return [fd for fd in (self.fd, self.bell) if fd >= 0]

    def close(self) -> None:
        """Give the rings' memory back and close the descriptors.  The
        mapping stays (see :meth:`__init__`); its pages read as zeros, empty
        rings, from then on."""
        if self.fd >= 0 and self.bell >= 0:  # (mapped: see __init__)
            rings = list(self._rings.values())
            for ring in rings:  # (no reader is halfway through a record meanwhile)
                ring.lock.acquire()
            try:
                _lib().fallocate(self.fd, _PUNCH_HOLE | _KEEP_SIZE, 0, self.size * REGION)
            finally:
                for ring in rings:
                    ring.lock.release()
        for fd in self.fds():
            os.close(fd)
        self.fd = self.bell = -1


class Outlet:
    """The sender's side of its ring in a peer's inbox (its lock: one writer
    at a time, whichever thread sends)."""

    __slots__ = ("control", "data", "bell", "lock", "torn", "_address", "_fence")

    def __init__(self, pid: int, inbox_fd: int, bell_fd: int, rank: int) -> None:
        """Map region ``rank`` of the inbox of process ``pid`` (descriptors
        ``inbox_fd`` and ``bell_fd`` there).  OSError if that is refused or
        they are not what an inbox's are."""
        self.bell = -1
        self._address = 0
        fd = _getfd(pid, inbox_fd)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{_NAME}"):
                raise OSError(f"descriptor {inbox_fd} of process {pid} is not an aiocomm inbox")
            if os.fstat(fd).st_size < (rank + 1) * REGION:
                raise OSError(f"the inbox of process {pid} has no region for rank {rank}")
            self._address, view = _map(fd, REGION, rank * REGION)
        finally:
            os.close(fd)
        try:
            self.bell = _getfd(pid, bell_fd)
            if os.readlink(f"/proc/self/fd/{self.bell}") != "anon_inode:[eventfd]":
                raise OSError(f"descriptor {bell_fd} of process {pid} is not an eventfd")
        except BaseException:
            self.close()
            raise
        self.control = view[:_PAGE].cast("q")
        self.data = view[_PAGE:]
        self.lock = threading.Lock()
        self.torn = False  # a message stopped halfway: nothing more goes this way (set with the lock)
        self._fence = threading.Lock()

    def put(self, mark: int, context: int, meta: bytes, payload: memoryview, total: int = -1) -> bool:
        """Write one record, if there is room (call with the lock; ``payload``:
        the message's bytes; ``total``: the first part of a message of that
        many bytes).  Whether it was written."""
        nbytes = len(payload)
        if total < 0:
            head = _pack(mark, context, len(meta), nbytes) + meta
        else:
            head = _pack(mark, context, len(meta) | _FIRST, nbytes) + meta + _TOTAL.pack(total)
        return self._write(head, payload)

    def put_more(self, where: int, context: int, payload: memoryview) -> bool:
        """Write the next part of the message begun by :meth:`put` (its bytes
        from ``where`` on), if there is room."""
        return self._write(_pack(where, context, _MORE, len(payload)), payload)

    def _write(self, head: bytes, payload: memoryview) -> bool:
        nbytes = len(payload)
        head_end = len(head)
        need = (head_end + nbytes + 7) & ~7
        control, data = self.control, self.data
        tail = control[TAIL]
        at = tail & _WRAP
        if RING_BYTES - at < need:
            skip = RING_BYTES - at
            if tail + skip + need - control[HEAD] > RING_BYTES:
                return False
            if skip >= _HEAD_BYTES:
                RECORD.pack_into(data, at, 0, 0, _SKIP, 0)
            tail += skip
            at = 0
        elif tail + need - control[HEAD] > RING_BYTES:
            return False
        data[at : at + head_end] = head
        if nbytes:
            data[at + head_end : at + head_end + nbytes] = payload
        control[TAIL] = tail + need  # (published after the record: x86 keeps stores in order)
        return True

    def ring_if_waiting(self) -> None:
        """After :meth:`put`: wake the receiver's loop if it waits for this ring."""
        with self._fence:  # (a full barrier between the tail's store and this load)
            pass
        if self.control[WAITING]:
            try:
                os.eventfd_write(self.bell, 1)
            except OSError:  # (closed: the connection is ending)
                pass

    def stall(self) -> None:
        """No room for the next part: ask the receiver's loop to take what is there."""
        self.control[STALLED] = 1
        with self._fence:  # (the word is out before the bell)
            pass
        try:
            os.eventfd_write(self.bell, _STALL_BELL)
        except OSError:
            pass

    def close(self) -> None:
        """Close the bell and unmap the ring (call with the lock, once no
        :meth:`put` may follow: its connection is closing)."""
        if self.bell >= 0:
            os.close(self.bell)
            self.bell = -1
        if self._address:
            self.control = self.data = memoryview(b"")
            _lib().munmap(self._address, REGION)
            self._address = 0


__all__ = ["SMALL", "RING_BYTES", "REGION", "Inbox", "Outlet", "Ring", "available", "record_bytes"]
