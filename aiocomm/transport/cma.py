"""Writing a message straight into its receive's memory on the same host.

Theory of operation
-------------------
Between two ranks of one host, the payload of a large point-to-point
message need not cross a socket (two copies, through the kernel's socket
buffers).  The receiver's ``CTS`` *offers* the memory of the posted receive
(:data:`OFFER`: its host id, its pid, the array's address); the sender,
if it is on the same host (equal :func:`host_id`), writes the
payload there with one ``process_vm_writev`` (Linux's cross-memory attach:
one copy, from the sender's array to the receive's) and then sends
``RDONE`` instead of ``RDATA`` on the same connection.  Everything else
(matching, signatures, deadlines, losing a peer) is the TCP path's, because
only the payload moves another way.

Why the sender writes, rather than the receiver reading: the sender writes
synchronously, in its event loop, from an array that cannot change meanwhile
(its caller still waits in ``send``, or it is this rank's own held copy),
so no failure of the sender at any moment can let a receive complete with a
torn message: a receive completes only on ``RDONE``, which the sender sends
after the write has returned.  The receiver keeps an offered array alive
until ``RDONE``, ``RDATA`` or ``REVOKE`` says the sender will not write into
it again (or for good, if the sender was lost meanwhile: it may still be
writing).  The offer also names a random mark of the receiver's process
image, which the sender reads back first: a pid that now belongs to another
program (the receiver died and its pid was reused, or it ``exec``-ed) gets
no write.

Permission: the same as a debugger's (same user; with Yama's
``ptrace_scope`` of 1 the ranks are not each other's ancestors, so each rank
allows any process of its user to attach, ``PR_SET_PTRACER_ANY``, as Open
MPI's shared-memory transport does).  Where the write is refused anyway, the
sender falls back to ``RDATA`` for that peer from then on.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import socket
import struct
from typing import Any

import numpy as np

#: A CTS's meta when the receiver offers its memory: host id, pid, address,
#: byte count, and where this process keeps its mark and the mark itself.
OFFER = struct.Struct("<qQQQQ16s")
#: Messages of at least this many bytes may move this way (smaller ones: the socket is as fast).
CMA_FROM = 2 << 20


def grace(nbytes: int) -> float:
    """How long a sender waits for the ``CTS`` of a message of ``nbytes``
    before it sends it the socket's way: a round trip between two event
    loops, with room for a busy one, and about one copy of the message (what
    waiting may cost is then bounded by what the socket's way costs)."""
    return 0.002 + nbytes / 8e9


_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value
_libc: Any = None
_state: dict[str, Any] = {}


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _lib() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is let go during each call
        for fn in (libc.process_vm_writev, libc.process_vm_readv):
            fn.restype = ctypes.c_ssize_t
            fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.POINTER(_Iovec),
                           ctypes.c_ulong, ctypes.c_ulong]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc = libc
    return _libc


def available() -> str | None:
    """Why payloads cannot be written across processes here, or None."""
    if "why" not in _state:
        why = None
        if not os.path.isdir("/proc/self"):
            why = "/proc is not mounted"
        else:
            try:
                if not hasattr(_lib(), "process_vm_writev"):
                    why = "the C library has no process_vm_writev"
            except OSError as exc:
                why = f"no C library: {exc}"
        if why is None:
            _allow_peers()
        _state["why"] = why
    return _state["why"]  # type: ignore[no-any-return]


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


def _allow_peers() -> None:
    """Under Yama's ptrace_scope 1, let the job's other ranks (not our
    ancestors) write into this process (scope 2 or 3: they cannot; the first
    write is refused and the peer falls back to the socket)."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as fh:
            scope = fh.read().strip()
    except OSError:
        return  # no Yama: same user suffices
    if scope == "1":
        _lib().prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0)


def _mark() -> np.ndarray:
    """This process image's mark: 16 random bytes at an address of its own.
    A sender reads it before it writes (:func:`write`), so the write never
    lands in another program: one that took over the pid (the receiver died
    and the pid was reused) or the receiver's own ``exec`` of a new program
    (its memory is then another's).  A forked child gets a copy, but its
    own pid."""
    mark = _state.get("mark")
    if mark is None or _state.get("pid") != os.getpid():
        mark = _state["mark"] = np.frombuffer(bytearray(os.urandom(16)), np.uint8)
        _state["pid"] = os.getpid()
    return mark


def offer(host: int, out: np.ndarray) -> bytes:
    """The meta of a CTS that offers ``out`` (C-contiguous) to the sender.
    (Its pages are not faulted in first: measured, 2 ranks, 64 MiB, the
    writer faulting them is faster than the receiver doing it beforehand,
    21 against 27 ms a round trip.)"""
    mark = _mark()
    return OFFER.pack(host, os.getpid(), out.ctypes.data, out.nbytes, mark.ctypes.data, mark.tobytes())


def _move(fn: Any, pid: int, local: int, remote: int, total: int) -> None:
    done = 0
    while done < total:
        here = _Iovec(local + done, total - done)
        there = _Iovec(remote + done, total - done)
        got = fn(pid, ctypes.byref(here), 1, ctypes.byref(there), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, os.strerror(err))
        if got == 0:
            raise OSError(errno.EFAULT, "nothing was moved")
        done += got


def write(pid: int, address: int, data: np.ndarray, mark_at: int, mark: bytes) -> None:
    """Write C-contiguous ``data`` at ``address`` in process ``pid``, if
    that process still holds ``mark`` at ``mark_at`` (else ESRCH: it is
    another program now).  Raises OSError: EPERM, not allowed; ESRCH, no
    such process; EFAULT, no such memory there."""
    lib = _lib()
    seen = np.zeros(len(mark), np.uint8)
    try:
        _move(lib.process_vm_readv, pid, seen.ctypes.data, mark_at, seen.nbytes)
    except OSError as exc:
        if exc.errno != errno.EFAULT:
            raise
    if seen.tobytes() != mark:
        raise OSError(errno.ESRCH, f"process {pid} is no longer the one that offered its memory")
    _move(lib.process_vm_writev, pid, data.ctypes.data, address, data.nbytes)


__all__ = ["CMA_FROM", "OFFER", "available", "grace", "host_id", "offer", "write"]
