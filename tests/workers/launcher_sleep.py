"""Print this rank's pid and the listening sockets it holds, then sleep (no communication)."""

import os
import socket
import stat
import sys
import time

listening = []
for name in sorted(os.listdir("/proc/self/fd"), key=int):
    fd = int(name)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            continue
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        continue
    with s:
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listening.append(fd)
mine = sorted(int(fd) for fd in os.environ.get("AIOCOMM_LISTEN_FDS", "").split(",") if fd)
print(f"pid {os.getpid()} listening {listening} mine {mine}", flush=True)
if os.environ["AIOCOMM_RANK"] == "0":
    try:
        print(f"stdin {sys.stdin.read()!r}", flush=True)
    except OSError as exc:
        print(f"stdin error {exc}", flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 60)
