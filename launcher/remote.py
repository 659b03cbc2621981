"""The launcher's agent on a remote host: ``python -m launcher.remote CMD...``.

ssh runs it instead of the rank's command directly.  It writes the hostfile
it received in ``AIOCOMM_HOSTFILE_JSON`` to a private file, starts the rank in
its own process group, and stops that group (SIGTERM, then SIGKILL) when its
standard input closes — that is, when the launcher or its ssh connection goes
away — so no rank outlives its job.  It exits with the rank's status.

Its standard input carries the launcher's stdin for the rank in frames: a
4-byte big-endian length and that many bytes; a zero length means the user's
input ended (the rank's stdin is closed, the rank keeps running).  A raw end
of file means the launcher is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

GRACE = 5.0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("launcher.remote: no command", file=sys.stderr)
        return 2
    env = dict(os.environ)
    tmp = None
    hostfile_json = env.pop("AIOCOMM_HOSTFILE_JSON", None)
    if hostfile_json is not None:
        tmp = tempfile.NamedTemporaryFile("w", prefix="aiocomm-hosts-", suffix=".json", delete=False)
        tmp.write(hostfile_json)
        tmp.close()
        env["AIOCOMM_HOSTFILE"] = tmp.name
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, start_new_session=True)
    assert proc.stdin is not None
    child_stdin: Any = proc.stdin

    def stop(sig: int = signal.SIGTERM) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def read_exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = sys.stdin.buffer.read(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def watch_stdin() -> None:
        nonlocal child_stdin
        try:
            while (head := read_exactly(4)) is not None:
                size = int.from_bytes(head, "big")
                if size == 0:  # the user's input ended
                    if child_stdin is not None:
                        child_stdin.close()
                        child_stdin = None
                    continue
                data = read_exactly(size)
                if data is None:
                    break
                if child_stdin is not None:
                    try:
                        child_stdin.write(data)
                        child_stdin.flush()
                    except OSError:
                        child_stdin = None
        except (OSError, ValueError):
            pass
        stop()  # the launcher or its connection is gone

    threading.Thread(target=watch_stdin, daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop(s))
    try:
        code = proc.wait()
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Not SystemExit: interpreter shutdown would trip over the thread still
    # blocked reading stdin.
    os._exit(status)
