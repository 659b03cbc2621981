"""Hostile bytes and strangers: rejected, logged, and the group is undisturbed."""

import subprocess
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiocomm import wire
from aiocomm.errors import ProtocolError
from aiocomm.wire import FrameReader, Kind, Sink

from .conftest import assert_ok, launch, spawn_world


@pytest.mark.timeout(120)
def test_junk_on_a_listening_port_is_rejected():
    proc = launch(3, "junk.py")
    assert_ok(proc, 3)
    assert "closing connection from unidentified peer" in proc.stderr or "bad magic" in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_two_jobs_on_one_machine_never_cross():
    # Each job's thread records what it got: its finished process, or the
    # exception that ended it (a launcher that hung past its timeout raises
    # subprocess.TimeoutExpired). Both jobs must finish, and both succeed.
    def run(out, key):
        try:
            out[key] = launch(3, "collectives_matrix.py", "all_sum", timeout=100)
        except BaseException as exc:  # reported below, whatever it is
            out[key] = exc

    results: dict[str, object] = {}
    threads = [threading.Thread(target=run, args=(results, k)) for k in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(110)
    assert not any(t.is_alive() for t in threads), f"a job did not finish: {results}"
    assert sorted(results) == ["a", "b"], results
    for key, proc in results.items():
        assert isinstance(proc, subprocess.CompletedProcess), f"job {key} did not finish: {proc!r}"
        assert_ok(proc, 3)


# ---- property-based fuzz of the decoder and the handshake

def _route(header, meta):
    # Like the transport before the handshake: decode, and never accept a payload.
    wire.decode_meta(meta)
    if header.payload_len:
        raise ProtocolError("no payload before the handshake")
    return Sink(None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(1, 512), min_size=1, max_size=20))
def test_reader_on_arbitrary_bytes_raises_only_protocol_errors(data, chunks):
    reader = FrameReader(_route)
    pos = 0
    try:
        for size in chunks * 20:
            if pos >= len(data):
                break
            buf = reader.get_buffer(-1)
            n = min(size, len(buf), len(data) - pos)
            buf[:n] = data[pos:pos + n]
            pos += n
            reader.buffer_updated(n)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            reader.get_buffer(-1)


meta_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Kind)), meta_values, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_valid_headers_with_arbitrary_maps(kind, meta, context, tag):
    raw = msgpack.packb(meta, use_bin_type=True)
    frame = wire.HEADER.pack(b"AIOC", 1, kind, 0, context, tag, 0, len(raw)) + raw
    completed = []

    class Noted(Sink):
        __slots__ = ("header",)

        def done(self):
            completed.append(self.header)

    def route(header, meta):
        sink = _route(header, meta)
        noted = Noted(sink.view)
        noted.header = header
        return noted

    reader = FrameReader(route)
    buf = reader.get_buffer(-1)
    buf[: len(frame)] = frame
    try:
        reader.buffer_updated(len(frame))
    except ProtocolError:
        return
    assert [h.tag for h in completed] == [tag]


@settings(max_examples=300, deadline=None)
@given(meta_values)
def test_handshake_rejects_arbitrary_hellos(meta):
    with pytest.raises(ProtocolError):
        wire.check_hello(meta, b"token", b"n" * 16, my_rank=0, size=4)


@pytest.mark.timeout(60)
def test_wrong_token_cannot_join(tmp_path):
    """A rank of another job (different token) is refused by the handshake."""
    procs = spawn_world(2, tmp_path, ["-c", "import aiocomm; aiocomm.init()"], tokens=["job-a", "job-b"],
                        env={"AIOCOMM_CONNECT_TIMEOUT": "3"}, stderr=subprocess.PIPE)
    errs = [p.communicate(timeout=30)[1] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert any("AuthenticationError" in e or "failed authentication" in e for e in errs), errs
