"""The launcher's agent: one beside every rank, on the rank's own host.

Theory of operation
-------------------
The launcher never starts a rank directly.  It starts this agent (for a
local rank as its child, for an ssh rank as the remote command) with::

    python -I -S -c BOOTSTRAP FD SIZE

where ``BOOTSTRAP`` reads ``SIZE`` bytes of this file's source from file
descriptor ``FD`` (the control channel) and runs it.  ``-I`` keeps the
working directory, ``PYTHON*`` variables and the user's site-packages out of
``sys.path`` and ``-S`` skips ``site``: nothing in the user's directory (a
``launcher/`` package, a ``json.py``) can replace the agent or a module it
imports, and the remote host needs only a Python interpreter, not this
package.

The control channel (the agent's stdin over ssh, a pipe for a local rank)
then carries frames, each a kind byte, a 4-byte big-endian length and that
many bytes:

====  =====================================================================
``H`` header (JSON, first frame): ``argv``, ``env`` (added to the host's
      environment: the job token travels here, never on a command line),
      ``cwd``, ``stdin`` (``inherit``, ``null`` or ``frames``), ``pass_fds``,
      ``hostfile_json`` (written to a private file), ``marker``
``I`` bytes for the rank's stdin (``stdin == "frames"``)
``E`` the rank's stdin ends
``S`` deliver this signal (decimal) to the rank's process group
``T`` stop the rank: SIGTERM to its process group, SIGKILL after ``GRACE``
====  =====================================================================

End of file on the channel means the launcher is gone (killed, or its ssh
connection dropped): the agent stops the rank as for ``T``.

The agent starts the rank in a session of its own and becomes a *child
subreaper* (Linux), so processes the rank leaves behind, even ones that
detached with ``setsid``, become the agent's children.  When the rank exits,
the agent stops its process group and every such leftover (SIGTERM, SIGKILL
a second later): when the rank is gone, nothing it started holds the job's
output open.  The rank also gets SIGKILL should the agent itself die.

The agent reports to the launcher on its stderr (which the rank shares) in
lines that start with the job's random ``marker``, each a JSON object:
``{"started": pid}``, ``{"failure": {...}}`` for each line the runtime
appended to ``AIOCOMM_FAILURE_FILE`` (a private file the agent sets), and
last ``{"exit": returncode, "stopped": bool}`` (a negative returncode is a
signal, as in :mod:`subprocess`).  It exits with the rank's status (128 +
signal number for a signal).

Only the standard library may be imported here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

#: Seconds between SIGTERM and SIGKILL when stopping the rank.
GRACE = 5.0
#: Seconds leftover processes get between SIGTERM and SIGKILL after the rank exited.
LEFTOVER_GRACE = 1.0

#: Run by ``python -I -S -c``: read the agent's source from the control channel and run it.
BOOTSTRAP = (
    "import sys;_control=open(int(sys.argv[1]),'rb');"
    "exec(compile(_control.read(int(sys.argv[2])),'aiocomm-launch-agent','exec'))"
)


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One control frame (used by the launcher too)."""
    return kind + len(payload).to_bytes(4, "big") + payload


def _read_frame(control: IO[bytes]) -> tuple[bytes, bytes] | None:
    head = control.read(5)
    if len(head) < 5:
        return None
    size = int.from_bytes(head[1:], "big")
    payload = control.read(size)
    if len(payload) < size:
        return None
    return head[:1], payload


class Agent:
    def __init__(self, header: dict[str, Any]) -> None:
        self.header = header
        self.marker: bytes = header["marker"].encode()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.stopped = False  # the launcher asked for a signal or a stop before the rank exited
        self.lock = threading.RLock()  # also taken by signal handlers on the main thread

    # --- reports to the launcher -------------------------------------------------
    def report(self, obj: dict[str, Any]) -> None:
        # One write per line: whole, even if a leftover process still writes to stderr.
        data = self.marker + b" " + json.dumps(obj).encode() + b"\n"
        try:
            while data:
                data = data[os.write(2, data):]
        except OSError:
            pass

    # --- signals -----------------------------------------------------------------
    def signal_rank(self, sig: int) -> None:
        with self.lock:
            if self.proc is None or self.proc.returncode is not None:
                return
            self.stopped = True
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM (or ``sig``) to the rank's group, SIGKILL ``GRACE`` seconds later."""
        self.signal_rank(sig)
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
        timer = threading.Timer(GRACE, self.signal_rank, (signal.SIGKILL,))
        timer.daemon = True
        timer.start()

    # --- the control channel -------------------------------------------------------
    def serve_control(self, control: IO[bytes], rank_stdin: IO[bytes] | None) -> None:
        try:
            while (item := _read_frame(control)) is not None:
                kind, payload = item
                if kind == b"I" and rank_stdin is not None:
                    try:
                        rank_stdin.write(payload)
                        rank_stdin.flush()
                    except (OSError, ValueError):
                        rank_stdin = None
                elif kind == b"E" and rank_stdin is not None:
                    try:
                        rank_stdin.close()
                    except OSError:
                        pass
                    rank_stdin = None
                elif kind == b"S":
                    self.signal_rank(int(payload))
                elif kind == b"T":
                    self.stop()
        except (OSError, ValueError):
            pass
        self.stop()  # the launcher or its connection is gone

    # --- running the rank ------------------------------------------------------------
    def run(self, control: IO[bytes]) -> int:
        header = self.header
        _become_subreaper()
        tmp = tempfile.mkdtemp(prefix="aiocomm-agent-")  # private: mode 0700
        try:
            env = dict(os.environ)
            env.update(header.get("env", {}))
            if header.get("hostfile_json") is not None:
                path = os.path.join(tmp, "hostfile.json")
                with open(path, "w") as fh:
                    fh.write(header["hostfile_json"])
                env["AIOCOMM_HOSTFILE"] = path
            failures = os.path.join(tmp, "failures.jsonl")
            env["AIOCOMM_FAILURE_FILE"] = failures
            stdin_mode = header.get("stdin", "null")
            stdin: Any = {"inherit": None, "frames": subprocess.PIPE}.get(stdin_mode, subprocess.DEVNULL)
            argv = header["argv"]
            try:
                # Started before any thread of ours exists, so preexec_fn is safe here.
                self.proc = subprocess.Popen(
                    argv, env=env, cwd=header.get("cwd") or None, stdin=stdin,
                    pass_fds=tuple(header.get("pass_fds", ())), start_new_session=True,
                    preexec_fn=die_with_parent(),
                )
            except OSError as exc:
                where = f" in {header['cwd']}" if header.get("cwd") else ""
                os.write(2, f"aiocomm-launch: cannot start {argv[0]!r}{where}: {exc.strerror or exc}\n".encode())
                code = 127 if isinstance(exc, FileNotFoundError) else 126
                self.report({"exit": code, "stopped": False, "start_error": str(exc)})
                return code
            self.report({"started": self.proc.pid})
            threading.Thread(target=self.serve_control, args=(control, self.proc.stdin), daemon=True).start()
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, lambda s, _f: self.stop(s))
            code = self.proc.wait()
            with self.lock:
                stopped = self.stopped
            _clear_leftovers(self.proc.pid)
            try:
                with open(failures, "rb") as fh:
                    for line in fh:
                        try:
                            self.report({"failure": json.loads(line)})
                        except ValueError:
                            pass
            except OSError:
                pass
            self.report({"exit": code, "stopped": stopped})
            return 128 - code if code < 0 else code
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _become_subreaper() -> None:
    """Orphans of the rank's process tree become our children (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def die_with_parent(sig: int = signal.SIGKILL) -> Any:
    """A preexec_fn that asks for ``sig`` when the parent (the agent, the
    launcher) dies (Linux only), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # (the parent died before that call)
            os._exit(128 + int(sig))

    return preexec


def _children() -> list[int]:
    me = os.getpid()
    kids: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return kids
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == me:
            kids.append(int(name))
    return kids


def _clear_leftovers(pgid: int) -> None:
    """Stop what the rank left behind: its process group and, as subreaper,
    every orphan of its tree (SIGTERM, then SIGKILL after LEFTOVER_GRACE)."""
    sig = signal.SIGTERM
    term_until = time.monotonic() + LEFTOVER_GRACE
    give_up = term_until + 2.0
    while True:
        group_alive = True
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            group_alive = False
        kids = _children()
        for pid in kids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        while True:  # reap what has exited
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if not kids and not group_alive:
            return
        now = time.monotonic()
        if now > give_up:
            return
        if now > term_until:
            sig = signal.SIGKILL
        time.sleep(0.02)


def main(control: IO[bytes]) -> int:
    item = _read_frame(control)
    if item is None or item[0] != b"H":
        os.write(2, b"aiocomm-launch agent: no header on the control channel\n")
        return 2
    return Agent(json.loads(item[1])).run(control)


if __name__ == "__main__":
    _channel = globals().get("_control")
    if _channel is None:  # run as a file: python agent.py FD
        _channel = open(int(sys.argv[1]), "rb")
    status = main(_channel)
    # Not SystemExit: interpreter shutdown could trip over the control thread blocked in read.
    os._exit(status)
