"""Day-one papercuts of the runtime (issue 27): a wrong token, mpi4py
missing, the nccl/jaccl messages, and the size and time variables."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from aiocomm import wire

from .conftest import ROOT, WORKERS, clean_env, spawn_world

INIT = ["-c", "import aiocomm; aiocomm.init()"]


def _addresses(tmp_path) -> list[str]:
    return [entry[0] for entry in json.loads((tmp_path / "hosts.json").read_text())]


# ---- item 5: a wrong token fails fast, as AuthenticationError naming the peer


@pytest.mark.timeout(60)
def test_wrong_token_two_ranks_fail_fast_with_authentication_error(tmp_path):
    t0 = time.monotonic()
    procs = spawn_world(2, tmp_path, INIT, tokens=["job-a-secret", "job-b-secret"], stderr=subprocess.PIPE)
    errs = [err for _, err in _communicate_all(procs, 40)]
    elapsed = time.monotonic() - t0
    addrs = _addresses(tmp_path)
    for rank, (proc, err) in enumerate(zip(procs, errs, strict=True)):
        last = err.strip().splitlines()[-1]
        assert proc.returncode != 0, err
        assert last.startswith("aiocomm.errors.AuthenticationError"), err
        assert addrs[1 - rank] in last, (addrs, last)  # the peer's address
        assert "AIOCOMM_TOKEN" in last, last  # the likely cause
        assert "secret" not in err  # never a token
    assert elapsed < 8, f"took {elapsed:.1f}s with the default AIOCOMM_CONNECT_TIMEOUT"


@pytest.mark.timeout(60)
def test_wrong_token_one_of_three_every_rank_fails_fast(tmp_path):
    """Rank 0 holds another token: rank 1 (which only waits for rank 0's
    connection) must learn it too, not wait for AIOCOMM_CONNECT_TIMEOUT."""
    t0 = time.monotonic()
    procs = spawn_world(3, tmp_path, INIT, tokens=["other", "good", "good"], stderr=subprocess.PIPE)
    errs = [err for _, err in _communicate_all(procs, 40)]
    elapsed = time.monotonic() - t0
    addrs = _addresses(tmp_path)
    for rank, (proc, err) in enumerate(zip(procs, errs, strict=True)):
        last = err.strip().splitlines()[-1]
        assert proc.returncode != 0, err
        assert last.startswith("aiocomm.errors.AuthenticationError"), (rank, err)
        peer = 1 if rank == 0 else 0  # whom each rank finds holding another token
        assert addrs[peer] in last, (rank, addrs, last)
    assert elapsed < 8, f"took {elapsed:.1f}s with the default AIOCOMM_CONNECT_TIMEOUT"


def _bad_hello(host: str, port: int, claim: int, size: int, to: int) -> bytes:
    """What a stranger that knows the layout but not the token gets back."""
    with socket.create_connection((host, port), timeout=5) as s:
        got = s.recv(4096)  # CHALLENGE
        s.sendall(wire.control_frame(
            wire.Kind.HELLO, {"rank": claim, "size": size, "to": to, "nonce": b"x" * 16, "mac": b"y" * 32}))
        try:
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass
        return got


@pytest.mark.timeout(90)
def test_strangers_claiming_a_rank_during_bring_up_do_not_break_the_job(tmp_path):
    """Bad HELLOs claiming to be rank 0 hammer rank 1 while rank 0 starts
    late: the job still forms (a stranger cannot fake a refusal)."""
    script = ("import os, time, aiocomm, numpy as np\n"
              "if os.environ['AIOCOMM_RANK'] == '0': time.sleep(3)\n"
              "w = aiocomm.init()\n"
              "print('SUM', aiocomm.all_sum(np.ones(2)).tolist(), flush=True)\n")
    procs = spawn_world(2, tmp_path, ["-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    host, port = _addresses(tmp_path)[1].rsplit(":", 1)
    replies: list[bytes] = []
    stop = time.monotonic() + 4

    def hammer() -> None:
        while time.monotonic() < stop:
            try:
                replies.append(_bad_hello(host, int(port), 0, 2, 1))
            except OSError:
                time.sleep(0.05)

    thread = threading.Thread(target=hammer)
    thread.start()
    outs = _communicate_all(procs, 60)
    thread.join()
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "SUM [2.0, 2.0]" in out, (out, err[-3000:])
    assert replies and all(b"WELCOME" not in r for r in replies)


def _communicate_all(procs, timeout: float) -> list[tuple[str, str]]:
    """Every rank's output, read at once (a rank that logs into a full pipe
    no one reads yet would stall)."""
    outs: list[tuple[str, str]] = [("", "")] * len(procs)

    def read(i: int) -> None:
        try:
            outs[i] = procs[i].communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            procs[i].kill()
            out, err = procs[i].communicate()
            outs[i] = (out, err + f"\n(still running after {timeout}s: killed)")

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(procs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def _frames(data: bytes) -> list[tuple[wire.Header, bytes]]:
    out = []
    while data:
        header = wire.decode_header(data[:wire.HEADER_SIZE])
        end = wire.HEADER_SIZE + header.meta_len
        out.append((header, data[wire.HEADER_SIZE:end]))
        data = data[end:]
    return out


def _hello_for(acceptor: wire.AcceptorHandshake, dialer: wire.DialerHandshake) -> tuple[wire.Header, bytes]:
    ((header, meta),) = _frames(acceptor.start())
    ((hello, hello_meta),) = _frames(dialer.receive(header, meta))
    return hello, hello_meta


def test_handshake_refuses_a_wrong_proof_with_one_fixed_reject():
    from aiocomm.errors import AuthenticationError, ProtocolError

    acceptor = wire.AcceptorHandshake(b"right", 1, 2, 0)
    dialer = wire.DialerHandshake(b"wrong", 0, 2, 1)
    hello = _hello_for(acceptor, dialer)
    with pytest.raises(AuthenticationError):
        acceptor.receive(*hello)
    assert acceptor.claimed == 0
    ((reject, reject_meta),) = _frames(acceptor.refusal)
    assert reject.kind == wire.Kind.REJECT
    assert wire.decode_meta(reject_meta) == {"reason": wire.REFUSED_PROOF}  # nothing else, nothing secret
    with pytest.raises(AuthenticationError, match="AIOCOMM_TOKEN differs"):
        dialer.receive(reject, reject_meta)

    # A HELLO that gets the layout wrong is closed without a word.
    acceptor = wire.AcceptorHandshake(b"right", 1, 3, 0)
    dialer = wire.DialerHandshake(b"wrong", 0, 2, 1)
    with pytest.raises(ProtocolError) as info:
        acceptor.receive(*_hello_for(acceptor, dialer))
    assert not isinstance(info.value, AuthenticationError)
    assert acceptor.refusal == b"" and acceptor.claimed is None


def test_a_reject_before_the_challenge_is_no_refused_proof():
    from aiocomm.errors import AuthenticationError, ProtocolError

    dialer = wire.DialerHandshake(b"t", 0, 2, 1)
    ((reject, meta),) = _frames(wire.control_frame(wire.Kind.REJECT, {"reason": wire.REFUSED_PROOF}))
    with pytest.raises(ProtocolError) as info:
        dialer.receive(reject, meta)
    assert not isinstance(info.value, AuthenticationError)


# ---- item 8: nccl and jaccl name the backends that exist


@pytest.mark.parametrize("backend", ["nccl", "jaccl"])
def test_unimplemented_backends_name_ring_and_mpi(fresh_world, backend):
    import aiocomm

    with pytest.raises(RuntimeError) as info:
        aiocomm.init(strict=True, backend=backend)
    message = str(info.value)
    assert f"backend {backend!r} is unavailable" in message
    assert "only the 'ring'" not in message
    assert "'ring'" in message and "'mpi'" in message and "aiocomm[mpi]" in message
    with pytest.warns(RuntimeWarning) as warned:
        world = aiocomm.init(backend=backend)
    assert world.size() == 1
    assert "'mpi'" in str(warned[0].message) and "only the 'ring'" not in str(warned[0].message)


# ---- item 7: mpirun without mpi4py says so


def _without_mpi4py(backend: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, str(WORKERS / "no_mpi4py.py"), backend], cwd=ROOT,
                          env=clean_env(**env), capture_output=True, text=True, timeout=60)
    assert "mpi4py hidden" in proc.stdout, (proc.stdout, proc.stderr)
    return proc.stdout + proc.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", [
    {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},  # mpirun, aiocomm-launch --backend mpi
    {"PMI_RANK": "1", "PMI_SIZE": "2"},  # MPICH's Hydra
])
def test_mpi_launcher_without_mpi4py_says_mpi4py_is_missing(launcher):
    out = _without_mpi4py("any", **launcher)
    assert "FAILED CommError" in out, out
    assert "mpi4py is not installed" in out and "pip install 'aiocomm[mpi]'" in out, out
    assert "AIOCOMM_COORDINATOR" in out, out  # the other way out, named second


@pytest.mark.timeout(60)
def test_ring_under_an_mpi_launcher_without_mpi4py_is_not_about_mpi4py():
    """backend='ring' asked for TCP: the missing coordinator is the problem, not mpi4py."""
    out = _without_mpi4py("ring", OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2")
    failed = next(line for line in out.splitlines() if line.startswith("FAILED"))
    assert failed.startswith("FAILED CommError") and "no coordinator address" in failed, out
    assert "mpi4py" not in failed, out
