"""Strangers write junk to rank 1's port while the group keeps computing."""

import os
import socket

import msgpack
import numpy as np

import aiocomm
from aiocomm import config, wire

from common import check

world = aiocomm.init()
r, n = world.rank(), world.size()
host, port = config.read_hostfile(os.environ["AIOCOMM_HOSTFILE"])[1][0]


def stranger(payload: bytes, answer_challenge: bool = False) -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        got = b""
        if answer_challenge:
            got = s.recv(4096)  # the listener's CHALLENGE
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        try:
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass
        return got


JUNK = [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    os.urandom(5000),
    wire.HEADER.pack(b"AIOC", 1, wire.Kind.HELLO, 0, 0, 0, 0, 10)[:20],  # truncated header
    wire.HEADER.pack(b"AIOC", 1, wire.Kind.P2P, 0, 0, 0, 1 << 40, 0),  # a 1 TB payload
    wire.HEADER.pack(b"AIOC", 1, wire.Kind.HELLO, 0, 0, 0, 0, 4) + b"\x81\xa1a\xc1",  # bad msgpack map
    wire.control_frame(wire.Kind.HELLO, {"rank": 0, "size": n, "to": 1, "nonce": b"x" * 16, "mac": b"y" * 32}),
    wire.control_frame(wire.Kind.P2P, {"evil": True}),
    msgpack.packb({"not": "a frame"}) * 100,
]

for i in range(60):
    if r == 0 and i % 6 == 0:
        junk = JUNK[(i // 6) % len(JUNK)]
        reply = stranger(junk, answer_challenge=b"HELLO" in repr(junk).encode() or i % 12 == 0)
        assert b"WELCOME" not in reply
    x = np.arange(1000, dtype=np.float64) + r + i
    check(aiocomm.all_sum(x), sum(np.arange(1000, dtype=np.float64) + k + i for k in range(n)), f"round {i}")
    if r == 0:
        aiocomm.send(x, 1)
    elif r == 1:
        check(aiocomm.recv_like(x, 0), np.arange(1000, dtype=np.float64) + i, f"p2p {i}")
print("OK junk", flush=True)
