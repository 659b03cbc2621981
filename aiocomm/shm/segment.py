"""One rank's shared segment, the peers' segments mapped beside it, and the
waits between them.  No sockets and no event loop in here.

A segment is an anonymous ``memfd`` (nothing in ``/dev/shm``: it vanishes
when the last process that maps it ends, also after a SIGKILL of the whole
job).  Its owner publishes ``(pid, fd)``; a peer on the same host maps it
through ``/proc/<pid>/fd/<fd>``, which needs the same user (ptrace access),
as any shared memory between two processes of one job does.

Layout (bytes)::

    0     int64 epoch        barriers passed by the owner (see Channel.barrier)
    8     int64 signature    hash of the owner's current call (op, dtype, shape), even barriers
    16    int64 broken       why the owner gave up on the group (0: it did not)
    24    int64 signature    the same, for a call whose first barrier is odd
    32    int64 text length  of the signature's description, at byte 256
    40    int64 reason length
    48    int64 lost             the world rank the owner lost, when that is why it gave up
    64    int32 bell         changes with every epoch; peers sleep on it (futex)
    256   the description of the owner's current call (for MismatchError)
    1664  why the owner gave up (the text of its error; length at byte 40)
    3072  64 bytes           byte k: rank k is asleep on this segment's bell
    4096  input slot         (slot bytes)
    ...   output slot        (slot bytes)

Memory order: numpy writes the slots, then the epoch is stored; x86-64
keeps stores in order, so a peer that sees the epoch sees the data.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
from typing import Any

import numpy as np

CONTROL = 4096
EPOCH, BROKEN, TEXT, REASON, LOST = 0, 2, 4, 5, 6
SIGNATURES = (1, 3)  # the signature of the call whose first barrier has an even / odd epoch
_BELL_OFFSET = 64
_TEXT_OFFSET = 256
_REASON_OFFSET = 1664
_SLEEPERS_OFFSET = 3072
_TEXT_MAX = _REASON_OFFSET - _TEXT_OFFSET
_REASON_MAX = _SLEEPERS_OFFSET - _REASON_OFFSET
MAX_RANKS = 64  # on one host, in one group (a sleeper flag each)
_NOBODY = bytes(MAX_RANKS)

_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_libc: Any = None


def supported() -> str | None:
    """Why shared memory cannot be used here, or None."""
    if not hasattr(os, "memfd_create"):
        return "this system has no memfd_create"
    if _SYS_FUTEX is None or platform.machine() != "x86_64":
        # (stores must not be reordered: see the module's notes on memory order)
        return f"the shared-memory path is written for x86-64, not {platform.machine()}"
    if not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return "/proc is not mounted"
    return None


def _libc_fn() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is let go during each call
        libc.syscall.restype = ctypes.c_long
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


def _syscall() -> Any:
    return _libc_fn().syscall


class Segment:
    """A mapped segment (this rank's own, or a peer's)."""

    __slots__ = ("mm", "address", "size", "control", "bell", "bell_address", "slot_bytes", "input", "output", "fd")

    def __init__(self, fd: int, slot_bytes: int, own: bool) -> None:
        """Map ``fd`` (kept only if ``own``: the owner's, until every peer mapped it).

        Mapped with libc's mmap, not Python's: Python's keeps a duplicate of
        the descriptor for as long as the mapping lives, one per group and
        member."""
        size = CONTROL + 2 * slot_bytes
        address = _libc_fn().mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of a shared segment failed: {os.strerror(ctypes.get_errno())}")
        self.address = address
        self.size = size
        self.fd = fd if own else -1
        self.slot_bytes = slot_bytes
        self.mm = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address))
        self.control = self.mm[:64].view(np.int64)
        self.bell = self.mm[_BELL_OFFSET : _BELL_OFFSET + 4].view(np.int32)
        self.bell_address = address + _BELL_OFFSET
        self.input = self.mm[CONTROL : CONTROL + slot_bytes]
        self.output = self.mm[CONTROL + slot_bytes : CONTROL + 2 * slot_bytes]

    @classmethod
    def create(cls, slot_bytes: int) -> Segment:
        fd = os.memfd_create("aiocomm-shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, CONTROL + 2 * slot_bytes)
            return cls(fd, slot_bytes, own=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, pid: int, fd: int, slot_bytes: int) -> Segment:
        """Map a peer's segment (raises OSError if it is gone)."""
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(mine).st_size != CONTROL + 2 * slot_bytes:
                raise OSError(f"the segment of pid {pid} has another size")
            return cls(mine, slot_bytes, own=False)
        finally:
            os.close(mine)

    def let_go_of_fd(self) -> None:
        """Every peer has mapped this segment: the descriptor is no longer needed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- the control block

    def _put_text(self, length_slot: int, offset: int, limit: int, text: str) -> None:
        data = text.encode()[:limit]
        self.mm[offset : offset + len(data)] = np.frombuffer(data, np.uint8)
        self.control[length_slot] = len(data)

    def _text(self, length_slot: int, offset: int, limit: int) -> str:
        length = max(0, min(int(self.control[length_slot]), limit))
        return self.mm[offset : offset + length].tobytes().decode(errors="replace")

    def describe(self, text: str) -> None:
        """Publish the description of the owner's current call (for MismatchError)."""
        self._put_text(TEXT, _TEXT_OFFSET, _TEXT_MAX, text)

    def description(self) -> str:
        return self._text(TEXT, _TEXT_OFFSET, _TEXT_MAX)

    def explain(self, reason: str) -> None:
        """Publish why the owner gave up on the group."""
        self._put_text(REASON, _REASON_OFFSET, _REASON_MAX, reason)

    def reason(self) -> str:
        return self._text(REASON, _REASON_OFFSET, _REASON_MAX)

    def ring(self, epoch: int) -> None:
        """Publish ``epoch`` and wake peers asleep on this segment."""
        self.control[EPOCH] = epoch
        self.bell[0] = epoch & 0x7FFFFFFF
        if ctypes.string_at(self.address + _SLEEPERS_OFFSET, MAX_RANKS) != _NOBODY:
            self.wake()

    def wake(self) -> None:
        _syscall()(_SYS_FUTEX, ctypes.c_void_p(self.bell_address), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)

    def sleep(self, me: int, seen_bell: int, seconds: float) -> None:
        """Sleep (as rank ``me`` of the group) until this segment's bell
        differs from ``seen_bell``, or ``seconds`` pass.  A wake-up lost to
        the race between the flag and the bell costs at most ``seconds``."""
        timeout = struct.pack("qq", int(seconds), int((seconds % 1) * 1e9))
        self.mm[_SLEEPERS_OFFSET + me] = 1
        try:
            _syscall()(_SYS_FUTEX, ctypes.c_void_p(self.bell_address), _FUTEX_WAIT, seen_bell,
                       ctypes.c_char_p(timeout), None, 0)
        finally:
            self.mm[_SLEEPERS_OFFSET + me] = 0

    def close(self) -> None:
        """Unmap (only once no array of this module's uses it: the channel's own)."""
        self.let_go_of_fd()
        if self.address:
            self.control = self.bell = self.input = self.output = self.mm = np.empty(0, np.uint8)
            _libc_fn().munmap(self.address, self.size)
            self.address = 0
