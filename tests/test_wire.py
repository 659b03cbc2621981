"""The wire format, bytes in and frames out, with no sockets."""

import importlib.util
import random

import msgpack
import numpy as np
import pytest

from aiocomm import wire
from aiocomm.errors import AuthenticationError, MismatchError, ProtocolError
from aiocomm.wire import FrameReader, Kind, Signature, Sink


def data_frame(tag: int, arr: np.ndarray, op: str = "send") -> bytes:
    sig = Signature(op, arr.dtype.name, arr.shape)
    return wire.encode_frame_head(Kind.P2P, 7, tag, sig.encoded, arr.nbytes) + arr.tobytes()


class Recorder(Sink):
    """A sink that notes its frame's header in ``completed`` when the frame is in."""

    __slots__ = ("header", "completed")

    def __init__(self, view, header, completed: list) -> None:
        super().__init__(view)
        self.header = header
        self.completed = completed

    def done(self) -> None:
        self.completed.append(self.header)


def feed(reader: FrameReader, stream: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(stream):
        buf = reader.get_buffer(-1)
        n = min(len(buf), rng.randint(1, 5000), len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        pos += n
        reader.buffer_updated(n)


@pytest.mark.parametrize("seed", range(5))
def test_frames_survive_any_chunking(seed):
    rng = random.Random(seed)
    arrays = [np.arange(rng.randint(0, 40000), dtype=np.float32) * i for i in range(30)]
    stream = b"".join(data_frame(i, a) for i, a in enumerate(arrays))
    destinations, completed = [], []

    def route(header, meta):
        sig = wire.parse_signature(meta)
        out = np.empty(sig.shape, sig.dtype)
        destinations.append(out)
        return Recorder(memoryview(out.view(np.uint8)), header, completed)

    reader = FrameReader(route)
    feed(reader, stream, rng)
    assert [h.tag for h in completed] == list(range(30))
    for got, want in zip(destinations, arrays, strict=True):
        assert np.array_equal(got, want)
    assert reader.idle


def test_discarded_payload_is_skipped():
    stream = data_frame(1, np.ones(100000, np.float64)) + data_frame(2, np.arange(3.0))
    kept, completed = [], []

    def route(header, meta):
        if header.tag == 1:
            return Recorder(None, header, completed)
        out = np.empty(3)
        kept.append(out)
        return Recorder(memoryview(out.view(np.uint8)), header, completed)

    feed(FrameReader(route), stream, random.Random(1))
    assert [h.tag for h in completed] == [1, 2] and kept[0].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("junk,needle", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b" " * 40, "bad magic"),
    (wire.HEADER.pack(b"AIOC", 99, Kind.P2P, 0, 0, 0, 0, 0), "version"),
    (wire.HEADER.pack(b"AIOC", 1, 77, 0, 0, 0, 0, 0), "unknown frame kind"),
    (wire.HEADER.pack(b"AIOC", 1, Kind.P2P, 0, 0, 0, 1 << 40, 0), "exceeds the limit"),
    (wire.HEADER.pack(b"AIOC", 1, Kind.P2P, 0, 0, 0, 0, 1 << 30), "meta section"),
    (wire.HEADER.pack(b"AIOC", 1, Kind.HELLO, 0, 0, 0, 5, 0), "must not carry a payload"),
    (wire.HEADER.pack(b"AIOC", 1, Kind.P2P, 0, 0, 0, 0, 3) + b"\xc1\xc1\xc1", "malformed msgpack"),
])
def test_bad_bytes_are_protocol_errors_and_the_reader_stays_broken(junk, needle):
    reader = FrameReader(lambda h, m: (wire.decode_meta(m), Sink(None))[1])
    buf = reader.get_buffer(-1)
    buf[: len(junk)] = junk
    with pytest.raises(ProtocolError, match=needle):
        reader.buffer_updated(len(junk))
    with pytest.raises(ProtocolError, match=needle):
        reader.get_buffer(-1)


def test_signature_checks():
    with pytest.raises(ProtocolError):
        wire.decode_signature(["send", "float32", [-1]])
    with pytest.raises(ProtocolError):
        wire.decode_signature(["send", "object", [1]])
    a, b = Signature("all_sum", "float32", (3,)), Signature("all_sum", "float32", (4,))
    want = r"rank 0 expected all_sum\(shape=\(3,\).*rank 1 sent all_sum\(shape=\(4,\)"
    with pytest.raises(MismatchError, match=want):
        wire.check_signature(a, b, me=0, peer=1)


def test_wire_dtype():
    for name in wire.DTYPE_NAMES:
        if name == "bfloat16" and importlib.util.find_spec("ml_dtypes") is None:
            continue  # ml_dtypes' (the test extra has it); tests/test_inputs.py covers it
        assert wire.wire_dtype(name).name == name
    assert wire.wire_dtype(">f4") == np.dtype("<f4")
    with pytest.raises(TypeError, match="datetime64"):
        wire.wire_dtype("datetime64[s]")


def test_handshake_macs():
    token, nonce = b"secret", b"n" * 16
    hello = wire.hello_fields(token, nonce, rank=1, size=4, to=2, nonce=b"m" * 16)
    assert wire.check_hello(hello, token, nonce, my_rank=2, size=4) == (1, b"m" * 16)
    with pytest.raises(AuthenticationError):
        wire.check_hello(hello, b"other", nonce, my_rank=2, size=4)
    with pytest.raises(ProtocolError, match="group size"):
        wire.check_hello(hello, token, nonce, my_rank=2, size=5)
    with pytest.raises(ProtocolError, match="wanted rank 2"):
        wire.check_hello(hello, token, nonce, my_rank=3, size=4)
    welcome = wire.welcome_fields(token, b"m" * 16, rank=2, peer=1, window=5, place=(-3, 99), inbox=(7, 8))
    assert wire.check_welcome(welcome, token, b"m" * 16, my_rank=1, expected=2) == (5, (-3, 99), (7, 8))
    with pytest.raises(AuthenticationError):
        wire.check_welcome(welcome, b"x", b"m" * 16, my_rank=1, expected=2)
    # the place is proven too: a pid changed on the way would direct writes into another process
    with pytest.raises(AuthenticationError):
        wire.check_welcome({**welcome, "pid": 100}, token, b"m" * 16, my_rank=1, expected=2)
    with pytest.raises(ProtocolError, match="malformed place"):
        wire.check_welcome({**welcome, "pid": -1}, token, b"m" * 16, my_rank=1, expected=2)
    # and so is the inbox: another descriptor would direct small messages into another file
    with pytest.raises(AuthenticationError):
        wire.check_welcome({**welcome, "inbox": 9}, token, b"m" * 16, my_rank=1, expected=2)
    with pytest.raises(ProtocolError, match="malformed inbox"):
        wire.check_welcome({**welcome, "bell": "x"}, token, b"m" * 16, my_rank=1, expected=2)
    assert b"secret" not in msgpack.packb(hello)
