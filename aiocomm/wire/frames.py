"""The wire format: frames and array metadata, with no sockets.

Theory of operation
-------------------
Every message on an aiocomm connection is one *frame*::

    +--------------------------- 36-byte header (little endian) ---------------------------+
    | magic "AIOC" | version u8 | kind u8 | flags u16 | context u64 | tag u64 | payload u64 | meta u32 |
    +--------------------------------------------------------------------------------------+
    | meta: ``meta`` bytes of msgpack (array metadata or a control map)                    |
    | payload: ``payload`` raw bytes (the array's memory, C order, native little endian)   |

* ``context`` names the group the frame belongs to, so groups never mix.
* ``tag`` orders frames inside a context: collectives use ``seq << 8 | lane``
  (a per-group collective counter and a sub-stream), point-to-point traffic
  uses tag 0 and relies on TCP's ordering between one pair of ranks.
* Data frames carry ``[op, dtype, shape]`` as meta, the *whole* operation's
  signature, so the receiver checks every frame against what it expects and
  a mismatch between ranks is an error, never silent corruption.
* Array bytes are never pickled or copied into ``bytes``: :class:`FrameReader`
  asks its owner (``route``) where a frame's payload must go as soon as the
  header and meta are in, and the transport reads straight into that memory.

:class:`FrameReader` is a pure state machine (bytes in, frames out) shaped like
``asyncio.BufferedProtocol`` so the transport can hand its buffers to the
event loop.  A reader that saw bad bytes goes to its error state and stays
there; every later call raises the same :class:`ProtocolError`.

Large messages and flow control (see :mod:`aiocomm.transport.flow`): a data
frame that would not fit the receiver's buffer budget is announced instead of
sent.  The announcement is an ``RTS`` frame (``flags`` holds the data kind;
meta is the signature followed by 16 bytes: message id and byte count); the
receiver answers ``CTS`` (``tag`` = the id) once a matching receive is posted,
and the payload follows as ``RDATA`` (``tag`` = the id).  ``CREDIT`` (``tag`` =
a byte count) returns buffer budget to a sender; ``REVOKE`` (``tag`` = the id)
withdraws an announcement whose send failed.  ``CTS`` and ``CREDIT`` travel
back on the sender's own connection.

Failures: ``ABORT`` breaks a context (a group) everywhere, with the reason;
``LOST`` tells the other members of a group whose collective waits that a
peer was lost, for members that wait on it without a connection to it.

The handshake is in :mod:`aiocomm.wire.handshake`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import numpy as np

from ..errors import MismatchError, ProtocolError

MAGIC = b"AIOC"
VERSION = 1
HEADER = struct.Struct("<4sBBHQQQI")
HEADER_SIZE = HEADER.size  # 36
_new_tuple = tuple.__new__  # builds a named tuple without its Python-level __new__ (a third of the cost)

#: Largest msgpack meta section accepted from a peer.
MAX_META = 64 * 1024
#: Largest payload a header may announce (1 TiB is rejected before any allocation).
MAX_PAYLOAD = 1 << 38  # 256 GiB
#: Bytes the reader stages at a time for headers, meta and small payloads.
STAGE_SIZE = 256 * 1024


class Kind(enum.IntEnum):
    CHALLENGE = 1
    HELLO = 2
    WELCOME = 3
    REJECT = 4
    COLL = 10  # a segment of a collective
    P2P = 11  # a point-to-point message
    RTS = 12  # a data frame announced, its payload held back until CTS (large or over budget)
    CTS = 13  # clear to send: a receive is posted for the announced frame (tag = its id)
    RDATA = 14  # the payload of an announced frame (tag = its id)
    CREDIT = 15  # buffer budget handed back to a sender (tag = bytes)
    REVOKE = 16  # the sender gave up on an announced frame (tag = its id)
    RDONE = 17  # the payload of an announced frame is written into the memory its CTS offered (tag = its id)
    ABORT = 20  # a rank gave up on a context; carries the reason
    LOST = 21  # a rank lost a peer while a collective of the context waited: {"lost": rank, "reason": str}
    JOIN = 30  # rendezvous: a rank publishes its address
    ROSTER = 31  # rendezvous: every rank's address


HANDSHAKE_KINDS = frozenset({Kind.CHALLENGE, Kind.HELLO, Kind.WELCOME, Kind.REJECT})
DATA_KINDS = frozenset({Kind.COLL, Kind.P2P})
PAYLOAD_KINDS = frozenset({Kind.COLL, Kind.P2P, Kind.RDATA})  # the kinds that may carry a payload
RTS_TRAILER = struct.Struct("<QQ")  # after an RTS frame's signature: message id, byte count
#: An RDATA frame's flags: its bytes were taken from the sender's credit (it
#: was sent before any CTS, as an eager frame is), so the receiver hands them back.
RDATA_COUNTED = 1
_KINDS = {int(k): k for k in Kind}  # Kind(n) goes through the enum machinery: slow per frame

#: The documented dtypes, by the name used on the wire.  ``bfloat16`` is the
#: one numpy lacks: it comes from ``ml_dtypes`` (the package JAX uses), which
#: is imported only when a program uses it (a program that passes a bfloat16
#: array has it installed).
DTYPE_NAMES: tuple[str, ...] = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)
_WIRE_NAMES = frozenset(DTYPE_NAMES)  # what a peer may name in array metadata
# The dtypes loaded so far, by name; bfloat16 joins when ml_dtypes is first needed.
_DTYPES = {name: np.dtype(name) for name in DTYPE_NAMES if name != "bfloat16"}
_NATIVE = {dt: dt for dt in _DTYPES.values()}  # dtype -> itself, a fast membership test
#: The supported dtypes loaded so far (a set that bfloat16 joins once loaded).
NATIVE_DTYPES: set[np.dtype] = set(_NATIVE)
_NAMES = {dt: name for name, dt in _DTYPES.items()}

_BFLOAT16_FIX = "install ml_dtypes (pip install ml_dtypes) and use ml_dtypes.bfloat16"


def _load_bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, registered as a supported dtype (``TypeError``
    saying how to get it when ml_dtypes is missing)."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            f"aiocomm's bfloat16 is ml_dtypes.bfloat16, and ml_dtypes is not installed: {_BFLOAT16_FIX}"
        ) from None
    dt: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    _DTYPES["bfloat16"] = _NATIVE[dt] = dt
    _NAMES[dt] = "bfloat16"
    NATIVE_DTYPES.add(dt)
    return dt


def dtype_from_name(name: str) -> np.dtype:
    """The numpy dtype a wire name (one of :data:`DTYPE_NAMES`) stands for;
    ``TypeError`` for any other name, or for bfloat16 without ml_dtypes."""
    dt = _DTYPES.get(name)
    if dt is not None:
        return dt
    if name == "bfloat16":
        return _load_bfloat16()
    raise TypeError(f"aiocomm does not support dtype {name!r}; supported: {', '.join(DTYPE_NAMES)}")


def _unsupported(dt: np.dtype) -> TypeError:
    """The ``TypeError`` for an unsupported numpy dtype: what it is, and the
    fix where there is one."""
    what = f"aiocomm does not support dtype {dt}" + ("" if str(dt) == dt.str else f" ({dt.str})")
    if dt.kind == "S":
        hint = ("byte strings are not arrays of bytes; pass bytes, bytearray or memoryview as they are "
                "(aiocomm takes them as uint8), or view them yourself: np.frombuffer(b, np.uint8)")
    elif dt.kind == "U":
        hint = "text is not an array of numbers; encode it and pass the bytes: np.frombuffer(s.encode(), np.uint8)"
    elif dt.kind == "O":
        hint = ("Python objects have no fixed layout to send; convert to a numeric dtype, or send "
                "serialized bytes: np.frombuffer(pickle.dumps(obj), np.uint8)")
    elif dt.kind in "mM":
        hint = f"send the underlying integers: x.view(np.int64) (and .view({dt.str!r}) after receiving)"
    elif dt.fields is not None:
        hint = "send each field as an array of its own, or the raw bytes: x.view(np.uint8)"
    elif dt.type.__module__.split(".")[0] == "ml_dtypes":
        hint = "of ml_dtypes' types aiocomm supports bfloat16; send others as raw bytes, x.view(np.uint8)"
    elif dt.kind == "V" and dt.itemsize == 2:
        hint = ("if these are bfloat16 values, aiocomm's bfloat16 is ml_dtypes.bfloat16: "
                "pip install ml_dtypes and pass x.view(ml_dtypes.bfloat16)")
    elif dt.kind == "f":
        hint = "use float64 (x.astype(np.float64))"
    elif dt.kind == "c":
        hint = "use complex128 (x.astype(np.complex128))"
    else:
        hint = "send the raw bytes, x.view(np.uint8), and view them back after receiving"
    return TypeError(f"{what}: {hint}. Supported: {', '.join(DTYPE_NAMES)}")


def wire_dtype(dtype: Any) -> np.dtype:
    """The native-order numpy dtype for ``dtype``, or ``TypeError`` naming it
    and, where there is one, the fix."""
    native = _NATIVE.get(dtype) if isinstance(dtype, np.dtype) else None
    if native is not None:
        return native
    if isinstance(dtype, str) and dtype == "bfloat16":
        return dtype_from_name(dtype)
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"aiocomm does not support dtype {dtype!r}: numpy does not know it ({exc})") from exc
    if dt.name == "bfloat16" and dt.kind == "V" and dt.itemsize == 2:
        if dt.type.__module__.split(".")[0] == "ml_dtypes":
            return dtype_from_name("bfloat16")
        raise TypeError(
            f"aiocomm does not support this bfloat16 ({dt.type.__module__}.{dt.type.__name__}): "
            f"aiocomm's bfloat16 is ml_dtypes.bfloat16; {_BFLOAT16_FIX}"
        )
    if dt.name not in _DTYPES or dt.fields is not None:
        raise _unsupported(dt)
    return _DTYPES[dt.name]


class Header(NamedTuple):
    kind: Kind
    flags: int
    context: int
    tag: int
    payload_len: int
    meta_len: int


@dataclass(frozen=True)
class Signature:
    """What a data frame belongs to: the operation and its whole array's type.

    ``encoded`` is its meta section, computed once; receivers compare it byte
    for byte with what arrives and decode only when the bytes differ.
    """

    op: str
    dtype: str
    shape: tuple[int, ...]
    encoded: bytes = field(init=False, repr=False, compare=False)
    described: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        encoded = msgpack.packb([self.op, self.dtype, list(self.shape)], use_bin_type=True)
        object.__setattr__(self, "encoded", encoded)
        object.__setattr__(self, "described", f"{self.op}(shape={self.shape}, dtype={self.dtype})")

    def describe(self) -> str:
        """The call in words (one string per signature: shared memory writes
        it for its peers only when it changes, found by identity)."""
        return self.described


_SIGNATURES: dict[tuple[str, np.dtype, tuple[int, ...]], Signature] = {}


def signature(op: str, dtype: np.dtype, shape: tuple[int, ...]) -> Signature:
    """The :class:`Signature` of ``op`` on an array of ``dtype`` (a supported
    numpy dtype) and ``shape``, from a cache: programs repeat the same few
    shapes, and encoding one costs more than the rest of a small frame's
    header work."""
    key = (op, dtype, shape)
    sig = _SIGNATURES.get(key)
    if sig is None:
        if len(_SIGNATURES) >= 4096:
            _SIGNATURES.clear()
        sig = _SIGNATURES[key] = Signature(op, _NAMES[dtype], shape)
    return sig


def encode_frame_head(kind: Kind, context: int, tag: int, meta: bytes, payload_len: int) -> bytes:
    """Header plus meta bytes of one frame; the payload follows separately."""
    return HEADER.pack(MAGIC, VERSION, kind, 0, context, tag, payload_len, len(meta)) + meta


def control_frame(kind: Kind, fields: dict[str, Any], context: int = 0, tag: int = 0) -> bytes:
    """A whole frame carrying only a msgpack map."""
    return encode_frame_head(kind, context, tag, msgpack.packb(fields, use_bin_type=True), 0)


def decode_header(raw: bytes | memoryview, max_meta: int = MAX_META) -> Header:
    """Parse and validate a header; ``ProtocolError`` says what is wrong."""
    magic, version, kind, flags, context, tag, payload_len, meta_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (not an aiocomm peer)")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    known = _KINDS.get(kind)
    if known is None:
        raise ProtocolError(f"unknown frame kind {kind}")
    kind = known
    if meta_len > max_meta:
        raise ProtocolError(f"meta section of {meta_len} bytes exceeds the limit of {max_meta}")
    if payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {payload_len} bytes exceeds the limit of {MAX_PAYLOAD}")
    if kind not in PAYLOAD_KINDS and payload_len:
        raise ProtocolError(f"{kind.name} frame must not carry a payload ({payload_len} bytes)")
    return Header(kind, flags, context, tag, payload_len, meta_len)


def decode_meta(raw: bytes | memoryview) -> Any:
    """Decode a msgpack meta section with limits; never executes or pickles."""
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_META,
            max_bin_len=MAX_META,
            max_array_len=4096,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for malformed input
        raise ProtocolError(f"malformed msgpack meta: {exc}") from exc


def decode_signature(meta: Any) -> Signature:
    """The data frame meta ``[op, dtype, shape]`` as a :class:`Signature`."""
    if (
        not isinstance(meta, list)
        or len(meta) != 3
        or not isinstance(meta[0], str)
        or not isinstance(meta[1], str)
        or not isinstance(meta[2], list)
        or not all(isinstance(d, int) and d >= 0 for d in meta[2])
        or len(meta[2]) > 64
    ):
        raise ProtocolError(f"malformed array metadata {meta!r}")
    if meta[1] not in _WIRE_NAMES:
        raise ProtocolError(f"unknown dtype {meta[1]!r} in array metadata")
    return Signature(meta[0], meta[1], tuple(meta[2]))


def parse_signature(raw: bytes) -> Signature:
    """A data frame's raw meta section as a :class:`Signature`."""
    return decode_signature(decode_meta(raw))


def check_signature(expected: Signature, got: Signature | bytes, *, me: int, peer: int) -> None:
    """Raise ``MismatchError`` naming both sides if a frame is not what we expect.

    ``got`` may be the raw meta bytes: equal bytes need no decoding.
    """
    if isinstance(got, bytes):
        if got == expected.encoded:
            return
        got = parse_signature(got)
    if expected != got:
        raise MismatchError(
            f"rank {me} expected {expected.describe()} from rank {peer}, "
            f"but rank {peer} sent {got.describe()}"
        )


def require_map(meta: Any, kind: Kind, keys: Sequence[str]) -> dict[str, Any]:
    if not isinstance(meta, dict) or any(k not in meta for k in keys):
        raise ProtocolError(f"malformed {kind.name} map {meta!r}; needs keys {list(keys)}")
    return meta


# ---------------------------------------------------------------- reader


class Sink:
    """Where one frame's payload goes: ``view`` (exactly payload bytes), or
    ``None`` to read and drop the payload.  The reader calls :meth:`done`
    once the whole frame is in; owners subclass it to act on that."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview | None) -> None:
        self.view = view

    def done(self) -> None:
        """The frame is complete (its payload, if kept, is in ``view``)."""


Route = Callable[[Header, bytes], Sink]

# Magic, version and kind as they appear in the first six bytes of a valid
# header: one dict lookup checks all three and gives the Kind.
_PARSE = struct.Struct("<6sHQQQI")
_parse_header = _PARSE.unpack_from
_PREFIXES = {MAGIC + bytes((VERSION, int(k))): k for k in Kind}
_PAYLOAD_KINDS = PAYLOAD_KINDS


class FrameReader:
    """Incremental frame parser with zero-copy payload delivery.

    Use it like ``asyncio.BufferedProtocol``: write into :meth:`get_buffer`,
    then report the count to :meth:`buffer_updated`.  ``route(header, meta)``
    is called once per frame with the raw meta bytes (decoding them is the
    owner's choice: see :func:`decode_meta`), before its payload is read, and
    returns the :class:`Sink` for the payload; the sink's ``done()`` is called
    when the frame is complete.  Small frames are parsed from a staging
    buffer; once a frame's payload outgrows what is staged, the rest is read
    straight into the sink's memory.
    """

    __slots__ = ("_route", "_stage", "_sv", "_lo", "_hi", "_header", "_sink", "_filled", "error", "max_meta")

    def __init__(self, route: Route, *, stage_size: int = STAGE_SIZE, max_meta: int = MAX_META) -> None:
        assert stage_size >= HEADER_SIZE + max_meta
        self.max_meta = max_meta
        self._route = route
        self._stage = bytearray(stage_size)
        self._sv = memoryview(self._stage)
        self._lo = 0  # first unconsumed staged byte
        self._hi = 0  # end of staged bytes
        self._header: Header | None = None  # of a frame whose payload is still coming
        self._sink: Sink | None = None  # that frame's sink
        self._filled = 0  # payload bytes of that frame delivered so far
        self.error: ProtocolError | None = None

    @property
    def between_frames(self) -> bool:
        """True when no routed frame's payload is still coming (every frame
        routed so far is complete)."""
        return self._header is None

    @property
    def idle(self) -> bool:
        """True between frames with nothing staged (a clean place to stop)."""
        return self._header is None and self._lo == self._hi

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self.error = exc
        return exc

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self.error is not None:
            raise self.error
        sink = self._sink
        if sink is not None and sink.view is not None:  # (every staged byte is consumed then)
            return sink.view[self._filled :]
        lo, hi = self._lo, self._hi
        if lo == hi:
            self._lo = self._hi = 0
            return self._sv
        if hi == len(self._stage):
            n = hi - lo
            self._stage[:n] = self._sv[lo:hi]
            self._lo, self._hi = 0, n
            return self._sv[n:]
        return self._sv[hi:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.error is not None:
            raise self.error
        sink = self._sink
        if sink is not None and sink.view is not None:
            # The bytes went straight into the sink's memory.
            filled = self._filled + nbytes
            if filled == self._header.payload_len:  # type: ignore[union-attr]
                self._header = self._sink = None
                self._filled = 0
                sink.done()
            else:
                self._filled = filled
            return
        self._hi += nbytes
        try:
            self._parse()
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def set_route(self, route: Route) -> None:
        """Route later frames with ``route`` (after a handshake, say)."""
        self._route = route

    def grow(self, stage_size: int = STAGE_SIZE, max_meta: int = MAX_META) -> None:
        """Stage more bytes at a time and accept larger meta sections (a
        connection starts small, so an unauthenticated one costs little)."""
        assert stage_size >= HEADER_SIZE + max_meta
        if stage_size > len(self._stage):
            staged = self._stage[self._lo : self._hi]
            self._stage = bytearray(stage_size)
            self._stage[: len(staged)] = staged
            self._sv = memoryview(self._stage)
            self._lo, self._hi = 0, len(staged)
        self.max_meta = max_meta

    def _parse(self) -> None:
        stage, sv = self._stage, self._sv
        lo, hi = self._lo, self._hi
        try:
            while True:
                header = self._header
                if header is None:
                    if hi - lo < HEADER_SIZE:
                        return
                    prefix, flags, context, tag, payload_len, meta_len = _parse_header(stage, lo)
                    kind = _PREFIXES.get(prefix)
                    if (
                        kind is None or meta_len > self.max_meta or payload_len > MAX_PAYLOAD
                        or (payload_len and kind not in _PAYLOAD_KINDS)
                    ):
                        decode_header(sv[lo : lo + HEADER_SIZE], self.max_meta)  # raises, naming what is wrong
                    start = lo + HEADER_SIZE
                    end = start + meta_len
                    if hi < end:
                        return
                    header = _new_tuple(Header, (kind, flags, context, tag, payload_len, meta_len))
                    lo = end
                    sink = self._route(header, bytes(sv[start:end]))
                    view = sink.view
                    if view is not None and len(view) != payload_len:
                        raise ProtocolError(f"routing gave {len(view)} bytes for a {payload_len}-byte payload")
                    if hi - lo >= payload_len:  # the whole payload is staged: a small frame
                        if payload_len:
                            if view is not None:
                                view[:] = sv[lo : lo + payload_len]
                            lo += payload_len
                        sink.done()
                        continue
                    filled = 0
                else:  # a payload that began in an earlier read (dropped, or staged)
                    sink = self._sink  # type: ignore[assignment]
                    view = sink.view
                    payload_len = header.payload_len
                    filled = self._filled
                take = min(hi - lo, payload_len - filled)
                if take and view is not None:
                    view[filled : filled + take] = sv[lo : lo + take]
                lo += take
                filled += take
                if filled == payload_len:
                    self._header = self._sink = None
                    sink.done()
                    continue
                # More to come: it goes straight into the sink's memory (see get_buffer).
                self._header, self._sink, self._filled = header, sink, filled
                return
        finally:
            self._lo = lo
