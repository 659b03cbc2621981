"""One rank's shared segment, the peers' segments mapped beside it, and the
waits between them.  No sockets and no event loop in here.

A segment is an anonymous ``memfd`` (nothing in ``/dev/shm``: it vanishes
when the last process that maps it ends, also after a SIGKILL of the whole
job).  Its owner publishes ``(pid, fd)``; a peer on the same host maps it
through ``/proc/<pid>/fd/<fd>``, which needs the same user (ptrace access),
as any shared memory between two processes of one job does.

Layout (bytes)::

    0     int64 epoch        barriers passed by the owner (see Channel.barrier)
    8     int64 signature    hash of the owner's current call (op, dtype, shape)
    16    int64 broken       why the owner gave up on the group (0: it did not)
    24    (unused)
    32    int64 text length  of the signature's description, at byte 256
    64    int32 bell         changes with every epoch; peers sleep on it (futex)
    256   the description of the owner's current call (for MismatchError)
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
EPOCH, SIGNATURE, BROKEN, TEXT = 0, 1, 2, 4
_BELL_OFFSET = 64
_TEXT_OFFSET = 256
_SLEEPERS_OFFSET = 3072
_TEXT_MAX = _SLEEPERS_OFFSET - _TEXT_OFFSET
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


def _syscall() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is let go during the call
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


class Segment:
    """A mapped segment (this rank's own, or a peer's)."""

    __slots__ = ("mm", "control", "bell", "bell_address", "slot_bytes", "input", "output", "fd")

    def __init__(self, mm: mmap.mmap, slot_bytes: int, fd: int = -1) -> None:
        self.mm = mm
        self.fd = fd  # the owner's descriptor, until every peer has mapped it
        self.slot_bytes = slot_bytes
        self.control = np.frombuffer(mm, np.int64, 8, 0)
        self.bell = np.frombuffer(mm, np.int32, 1, _BELL_OFFSET)
        self.bell_address = ctypes.addressof(ctypes.c_char.from_buffer(mm, _BELL_OFFSET))
        self.input = np.frombuffer(mm, np.uint8, slot_bytes, CONTROL)
        self.output = np.frombuffer(mm, np.uint8, slot_bytes, CONTROL + slot_bytes)

    @classmethod
    def create(cls, slot_bytes: int) -> Segment:
        fd = os.memfd_create("aiocomm-shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, CONTROL + 2 * slot_bytes)
            mm = mmap.mmap(fd, CONTROL + 2 * slot_bytes)
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, slot_bytes, fd)

    @classmethod
    def open(cls, pid: int, fd: int, slot_bytes: int) -> Segment:
        """Map a peer's segment (raises OSError if it is gone)."""
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(mine).st_size != CONTROL + 2 * slot_bytes:
                raise OSError(f"the segment of pid {pid} has another size")
            mm = mmap.mmap(mine, CONTROL + 2 * slot_bytes)
        finally:
            os.close(mine)
        return cls(mm, slot_bytes)

    def let_go_of_fd(self) -> None:
        """Every peer has mapped this segment: the descriptor is no longer needed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- the control block

    def describe(self, text: str) -> None:
        data = text.encode()[:_TEXT_MAX]
        self.mm[_TEXT_OFFSET : _TEXT_OFFSET + len(data)] = data
        self.control[TEXT] = len(data)

    def description(self) -> str:
        length = int(self.control[TEXT])
        return bytes(self.mm[_TEXT_OFFSET : _TEXT_OFFSET + max(0, min(length, _TEXT_MAX))]).decode(errors="replace")

    def ring(self, epoch: int) -> None:
        """Publish ``epoch`` and wake peers asleep on this segment."""
        self.control[EPOCH] = epoch
        self.bell[0] = epoch & 0x7FFFFFFF
        if self.mm[_SLEEPERS_OFFSET : _SLEEPERS_OFFSET + MAX_RANKS] != _NOBODY:
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
        self.let_go_of_fd()
        self.control = self.bell = self.input = self.output = np.empty(0, np.int64)
        try:
            self.mm.close()
        except BufferError:  # an array still uses it: the mapping goes when that array does
            pass
