"""The job's output: ranks' bytes in, whole tagged lines out.

Theory of operation
-------------------
Every rank's stdout and stderr arrive on pipes.  A :class:`RankText` per pipe
cuts the bytes into lines and hands each whole line to the :class:`Console`
of its destination (the launcher's stdout or stderr, or the rank's log file),
so lines of different ranks never mix mid-line.

A :class:`Console` is a :class:`Writer`, which writes from a thread of its
own: a slow reader never stalls the launcher's event loop (timeouts, signals
and failures are still handled), every write is finished however the
descriptor is set up (partial writes, non-blocking descriptors), and when
more than ``HIGH_WATER`` bytes wait, the pumps stop reading from the ranks
until it drains, so a rank that outpaces the reader blocks as it would
writing to a pipe itself.  When the reader goes away (EPIPE), the writer
says so once (``on_broken``) and drops everything after.  The launcher's
control channel to each agent (:mod:`.job`) is a plain :class:`Writer`.

Carriage returns (progress bars such as tqdm's) are rendered the way a
terminal would show the rank's line: each ``\\r`` starts overwriting from the
first column.  On a terminal the latest update of a rank's bar is drawn in
place on the last line, under the other output; in a pipe or file only the
bar's final state is written, plus its current state every
``PROGRESS_INTERVAL`` seconds while it runs.  Log files (``--output-dir``)
get the rank's bytes unchanged.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable

#: Pending bytes above which the pumps stop reading from the ranks.
HIGH_WATER = 1 << 20
#: A line longer than this without a newline is written in pieces of this size.
MAX_LINE = 4 << 20
#: In a pipe or file, seconds between the states written of a running progress bar.
PROGRESS_INTERVAL = 5.0

_CLEAR_LINE = b"\r\x1b[K"


def overlay(shown: bytes, segment: bytes) -> bytes:
    """What a terminal shows after ``\\r`` + ``segment`` over a line showing ``shown``."""
    return segment + shown[len(segment):]


class Writer:
    """Bytes to one file descriptor, written by a thread of its own.

    :meth:`write` only queues, so its caller (the event loop, or a thread
    that must not stall) never blocks on a slow reader unless it asks to.
    Every write is finished however the descriptor is set up (partial
    writes, non-blocking descriptors).  When writing fails (the reader went
    away: EPIPE), the writer says so once (``on_broken``, on the loop) and
    drops everything after.  With ``owns_fd`` it closes the descriptor once
    it has written what was queued before :meth:`close`.
    """

    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        on_broken: Callable[[Writer, OSError], None] | None = None,
        name: str = "output",
        owns_fd: bool = False,
    ) -> None:
        self.fd = fd
        self.loop = loop
        self.name = name
        self.on_broken = on_broken
        self.owns_fd = owns_fd
        self.broken: OSError | None = None
        self._chunks: deque[bytes] = deque()
        self._pending = 0
        self._closing = False
        self._cond = threading.Condition()
        self._room_waiters: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name=f"aiocomm-{name}", daemon=True)
        self._thread.start()

    def write(self, data: bytes, wait: bool = False) -> None:
        """Queue ``data``; with ``wait`` (a thread of its own, never the loop),
        first block while more than ``HIGH_WATER`` bytes wait."""
        if not data:
            return
        with self._cond:
            while wait and self._pending > HIGH_WATER and self.broken is None and not self._closing:
                self._cond.wait()
            if self.broken is not None or self._closing:
                return
            self._chunks.append(data)
            self._pending += len(data)
            self._cond.notify_all()

    @property
    def full(self) -> bool:
        return self._pending > HIGH_WATER and self.broken is None

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop once the pending bytes fell to half the high-water mark."""
        assert self.loop is not None
        with self._cond:
            if self._pending > HIGH_WATER // 2 and self.broken is None:
                self._room_waiters.append(callback)
                return
        self.loop.call_soon(callback)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closing:
                    self._cond.wait()
                if not self._chunks:
                    break
                data = b"".join(self._chunks)
                self._chunks.clear()
            if self.broken is None:
                try:
                    _write_all(self.fd, data)
                except OSError as exc:
                    with self._cond:
                        self.broken = exc
                        self._chunks.clear()
                    if self.on_broken is not None:
                        self._call_soon(self.on_broken, self, exc)
            with self._cond:
                self._pending = sum(map(len, self._chunks))
                if self._pending <= HIGH_WATER // 2 or self.broken is not None:
                    waiters, self._room_waiters = self._room_waiters, []
                else:
                    waiters = []
                self._cond.notify_all()
            for callback in waiters:
                self._call_soon(callback)
        if self.owns_fd:
            os.close(self.fd)

    def _call_soon(self, callback: Callable[..., None], *args: object) -> None:
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the job is over
            pass

    def close(self, timeout: float | None = 0) -> None:
        """Write what is pending, then stop the thread (and close the descriptor
        if it is ours); wait up to ``timeout`` seconds for that (None: as long
        as it takes; 0: do not wait)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if timeout != 0:
            self._thread.join(timeout)


class Console(Writer):
    """One destination of the job's output (the launcher's stdout or stderr,
    or a rank's log file): whole lines, tagged with their rank."""

    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop,
        *,
        prefix: bool = True,
        tty: bool = False,
        raw: bool = False,
        on_broken: Callable[[Writer, OSError], None] | None = None,
        name: str = "output",
    ) -> None:
        self.prefix = prefix
        self.tty = tty
        self.raw = raw
        self._floating: tuple[int, bytes] | None = None  # (rank, drawn text) of the bar drawn in place
        self._bars: dict[int, list[float]] = {}  # rank -> [bar's first update, last written] (pipes and files)
        super().__init__(fd, loop, on_broken=on_broken, name=name)

    def close(self, timeout: float | None = None) -> None:
        """Write what is pending (ending a bar drawn in place), then stop the thread."""
        if self._floating is not None:
            self.write(b"\n")
            self._floating = None
        super().close(timeout)

    # --- lines ------------------------------------------------------------------------
    def _tag(self, rank: int) -> bytes:
        return b"[rank %d] " % rank if self.prefix else b""

    def line(self, rank: int, text: bytes) -> None:
        """A whole line of ``rank`` (without its newline)."""
        text = self._tag(rank) + text + b"\n"
        self._bars.pop(rank, None)
        if self._floating is None:
            self.write(text)
            return
        bar_rank, bar = self._floating
        if bar_rank == rank:  # the bar's final state replaces it
            self._floating = None
            self.write(_CLEAR_LINE + text)
        else:  # above the bar, which is drawn again below
            self.write(_CLEAR_LINE + text + bar)

    def progress(self, rank: int, text: bytes) -> None:
        """The state of ``rank``'s current line after a carriage return."""
        if self.tty:
            drawn = self._tag(rank) + text
            self._floating = (rank, drawn)
            self.write(_CLEAR_LINE + drawn)
            return
        now = time.monotonic()
        times = self._bars.setdefault(rank, [now, now])
        if now - times[1] >= PROGRESS_INTERVAL:
            times[1] = now
            self.write(self._tag(rank) + text + b"\n")

    def note(self, text: str) -> None:
        """A message of the launcher itself (a whole line, untagged)."""
        data = text.encode(errors="replace") + b"\n"
        if self._floating is not None:
            data = _CLEAR_LINE + data + self._floating[1]
        self.write(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:  # someone made the descriptor non-blocking
            select.select([], [fd], [])
            continue
        view = view[n:]


class RankText:
    """Cuts one rank's stream into lines for a console, and picks out the
    agent's reports (lines holding ``marker``, see :mod:`.agent`)."""

    def __init__(
        self, rank: int, console: Console, marker: bytes | None = None,
        on_report: Callable[[bytes], None] | None = None,
    ) -> None:
        self.rank = rank
        self.console = console
        self.marker = marker
        self.on_report = on_report
        self._buf = bytearray()
        self._shown = b""  # the current line as a terminal shows it, before _buf (after its last \r)
        self._bar = False  # the current line has carriage returns: a progress bar

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._buf:
                self._buf += data[start:end]
                self._line(bytes(self._buf))
                self._buf.clear()
            else:
                self._line(data[start:end])
            start = end + 1
        if start < len(data):
            self._buf += data[start:]
        if not self._buf:
            return
        if not self.console.raw:
            if b"\r" in self._buf:
                *done, rest = bytes(self._buf).split(b"\r")
                for segment in done:
                    self._shown = overlay(self._shown, segment)
                self._buf[:] = rest
                self._bar = True
            if self._bar:  # the line as it stands, the text after the last \r included
                self.console.progress(self.rank, overlay(self._shown, bytes(self._buf)))
        if len(self._buf) >= MAX_LINE:
            if self.console.raw:
                self.console.write(bytes(self._buf))
            else:
                self._line(bytes(self._buf))
            self._buf.clear()

    def finish(self) -> None:
        """The stream ended: write what is left of its last line."""
        if self.console.raw:
            self.console.write(bytes(self._buf))
        elif self._buf or self._shown:
            self._line(bytes(self._buf))
        self._buf.clear()

    def _line(self, text: bytes) -> None:
        if self.marker is not None and self.marker in text:
            text, _, report = text.partition(self.marker)
            if self.on_report is not None:
                self.on_report(report)
            if not text and not self._shown:
                return
        if self.console.raw:
            self.console.write(text + b"\n")
            return
        shown, self._shown, self._bar = self._shown, b"", False
        for segment in text.split(b"\r"):
            shown = overlay(shown, segment)
        self.console.line(self.rank, shown)
