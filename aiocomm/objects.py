"""Python objects between ranks: ``send_obj``, ``recv_obj``, ``broadcast_obj``
and ``all_gather_obj``, built on the array operations.

An object is pickled with protocol 5: the pickle stream travels as bytes,
and every buffer that pickle hands out of band (a contiguous numpy array's
memory, a ``PickleBuffer``) travels as its own message straight from the
object's memory, without a copy; the receiver unpickles over the arrays it
received, so numpy arrays in the result use them without a copy either.
Messages are cut into pieces of at most :data:`PIECE_BYTES`, so objects and
buffers of any size move on every backend (MPI counts stop at 2**31 - 1).

Each operation is written once, as a generator of *steps* -- ``(name, args,
kwargs)`` of a call of the face that drives it (:func:`aiocomm.send`, or
``await aiocomm.aio.send``) -- and both faces drive the same generators.

Unpickling runs code chosen by the sender.  The ring only accepts members
of the authenticated group (``AIOCOMM_TOKEN``), so only they can send: do not
give the token to anyone you would not let run code in your job.
"""

from __future__ import annotations

import pickle
from collections.abc import Generator
from typing import Any

import numpy as np

#: Largest piece of one message (pieces of a larger buffer are reassembled).
PIECE_BYTES = 1 << 30

Step = tuple[str, tuple[Any, ...], dict[str, Any]]
Steps = Generator[Step, Any, Any]
_WORDS = np.int64


def pickled(obj: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """``obj``'s pickle stream (protocol 5) and its out-of-band buffers, as uint8 arrays (no copies)."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return np.frombuffer(stream, np.uint8), [np.frombuffer(b.raw(), np.uint8) for b in buffers]


def unpickled(stream: np.ndarray, buffers: list[np.ndarray]) -> Any:
    # (peers are authenticated; see above)
    return pickle.loads(stream.data, buffers=buffers)


def pieces(nbytes: int) -> list[tuple[int, int]]:
    """Byte ranges of the pieces a message of ``nbytes`` travels in (one, if empty)."""
    if nbytes == 0:
        return [(0, 0)]
    return [(a, min(a + PIECE_BYTES, nbytes)) for a in range(0, nbytes, PIECE_BYTES)]


def _joined(parts: list[np.ndarray], nbytes: int) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    whole = np.empty(nbytes, np.uint8)
    for (a, b), part in zip(pieces(nbytes), parts, strict=True):
        whole[a:b] = part
    return whole


def _call(name: str, *args: Any, **kwargs: Any) -> Step:
    return name, args, kwargs


# ---------------------------------------------------------------- point to point


def send_obj_steps(obj: Any, dst: int, kw: dict[str, Any]) -> Steps:
    stream, buffers = pickled(obj)
    yield _call("send", np.array([stream.size, len(buffers)], _WORDS), dst, **kw)
    if buffers:
        yield _call("send", np.array([b.size for b in buffers], _WORDS), dst, **kw)
    for message in (stream, *buffers):
        for a, b in pieces(message.size):
            yield _call("send", message[a:b], dst, **kw)


def _recv_message(nbytes: int, src: int, kw: dict[str, Any]) -> Generator[Step, Any, np.ndarray]:
    parts = []
    for a, b in pieces(nbytes):
        parts.append((yield _call("recv", (b - a,), np.uint8, src, **kw)))
    return _joined(parts, nbytes)


def recv_obj_steps(src: int, kw: dict[str, Any]) -> Steps:
    head = yield _call("recv", (2,), _WORDS, src, **kw)
    size, count = int(head[0]), int(head[1])
    sizes = (yield _call("recv", (count,), _WORDS, src, **kw)) if count else np.empty(0, _WORDS)
    stream = yield from _recv_message(size, src, kw)
    buffers = []
    for nbytes in sizes.tolist():
        buffers.append((yield from _recv_message(int(nbytes), src, kw)))
    return unpickled(stream, buffers)


# ---------------------------------------------------------------- collectives


def broadcast_obj_steps(obj: Any, root: int, rank: int, kw: dict[str, Any]) -> Steps:
    if rank == root:
        stream, buffers = pickled(obj)
        head = np.array([stream.size, len(buffers)], _WORDS)
    else:
        stream, buffers, head = np.empty(0, np.uint8), [], np.zeros(2, _WORDS)
    head = yield _call("broadcast", head, root, **kw)
    size, count = int(head[0]), int(head[1])
    sizes = np.array([b.size for b in buffers], _WORDS) if rank == root else np.zeros(count, _WORDS)
    if count:
        sizes = yield _call("broadcast", sizes, root, **kw)
    received = []
    for i, nbytes in enumerate([size, *sizes.tolist()]):
        mine = (stream if i == 0 else buffers[i - 1]) if rank == root else None
        parts = []
        for a, b in pieces(int(nbytes)):
            piece = mine[a:b] if mine is not None else np.empty(b - a, np.uint8)
            parts.append((yield _call("broadcast", piece, root, **kw)))
        received.append(_joined(parts, int(nbytes)))
    if rank == root:
        return obj
    return unpickled(received[0], received[1:])


def all_gather_obj_steps(obj: Any, kw: dict[str, Any]) -> Steps:
    stream, buffers = pickled(obj)
    messages = [stream, *buffers]
    sizes, counts = yield _call("all_gather_v", np.array([m.size for m in messages], _WORDS), **kw)
    # every rank's message sizes: its pickle stream's first, then its buffers'
    per_rank, start = [], 0
    for c in counts:
        per_rank.append([int(s) for s in sizes[start : start + c]])
        start += c
    gathered: list[list[np.ndarray]] = [[] for _ in counts]
    for i in range(max(counts)):  # message i of every rank (empty for ranks that have fewer)
        chunks = max(len(pieces(sizes_[i])) if i < len(sizes_) else 1 for sizes_ in per_rank)
        parts: list[list[np.ndarray]] = [[] for _ in counts]
        for c in range(chunks):
            if i < len(messages) and c < len(pieces(messages[i].size)):
                a, b = pieces(messages[i].size)[c]
                piece = messages[i][a:b]
            else:
                piece = np.empty(0, np.uint8)
            data, lengths = yield _call("all_gather_v", piece, **kw)
            offset = 0
            for k, length in enumerate(lengths):
                if i < len(per_rank[k]) and c < len(pieces(per_rank[k][i])):
                    part = data[offset : offset + length]
                    parts[k].append(part if offset % 64 == 0 else part.copy())  # arrays in it stay aligned
                offset += length
        for k, sizes_ in enumerate(per_rank):
            if i < len(sizes_):
                gathered[k].append(_joined(parts[k], sizes_[i]))
    return [unpickled(msgs[0], msgs[1:]) for msgs in gathered]
