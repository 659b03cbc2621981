"""What ported MLX programs pass, over real ranks: bfloat16 gradients,
file chunks as bytes (mlx-lm's share.py), torch CPU tensors.

argv: the parts to run, comma-separated (bfloat16, bytes, torch,
recv_like_bytes; default: the first three).  Each part asked for must run:
``torch`` without torch installed fails the job.
"""

import hashlib
import sys

import ml_dtypes
import numpy as np

import aiocomm

world = aiocomm.init(strict=True)
n, r = world.size(), world.rank()
parts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["bfloat16", "bytes", "torch"]
bf16 = ml_dtypes.bfloat16


def gradient(rank: int, shape: tuple[int, ...]) -> np.ndarray:
    """Every rank's bfloat16 input, so each can compute the expected result.
    Positive values: no cancellation, so the relative error of a bfloat16
    sum stays within a few units in the last place."""
    rng = np.random.default_rng(1000 + rank)
    return rng.uniform(0.5, 1.5, shape).astype(bf16)


def close(got: np.ndarray, want32: np.ndarray, what: str) -> None:
    """``got`` (bfloat16) is ``want32`` (a float32 sum of the bfloat16
    inputs) up to bfloat16 rounding: 2**-8 relative per addition."""
    assert got.dtype == bf16, f"{what}: dtype {got.dtype}"
    assert got.shape == want32.shape, f"{what}: shape {got.shape} != {want32.shape}"
    err = np.abs(got.astype(np.float32) - want32) / np.abs(want32)
    assert float(err.max(initial=0)) <= n * 2.0**-8, (
        f"{what}: relative error {err.max()}\n got {got[:8]}\nwant {want32[:8]}"
    )


def same_everywhere(x: np.ndarray, what: str) -> None:
    """Every rank holds the same bits."""
    rows = aiocomm.all_gather(x.reshape(1, -1).view(np.uint16))
    assert (rows == rows[0]).all(), f"{what}: ranks disagree"


if "bfloat16" in parts:
    for shape in [(1000,), (37, 5), (4 * n, 3)]:
        inputs = [gradient(k, shape) for k in range(n)]
        g = inputs[r]
        total32 = np.sum([x.astype(np.float32) for x in inputs], axis=0)
        what = f"bfloat16{shape} on {n} ranks"

        # Averaging gradients (data parallel): all_sum, then divide.
        s = aiocomm.all_sum(g)
        close(s, total32, f"all_sum {what}")
        same_everywhere(s, f"all_sum {what}")
        mean = (s.astype(np.float32) / n).astype(bf16)
        assert np.allclose(mean.astype(np.float32), total32 / n, rtol=n * 2.0**-7), what

        want_max = np.maximum.reduce(inputs)
        assert np.array_equal(aiocomm.all_max(g), want_max) and aiocomm.all_max(g).dtype == bf16, what
        assert np.array_equal(aiocomm.all_min(g), np.minimum.reduce(inputs)), what
        gathered = aiocomm.all_gather(g)
        assert gathered.dtype == bf16 and np.array_equal(gathered, np.concatenate(inputs)), what
        if shape[0] % n == 0:
            m = shape[0] // n
            close(aiocomm.sum_scatter(g), total32[r * m:(r + 1) * m], f"sum_scatter {what}")

        # Point to point around the ring, by name and by example.  Odd ranks
        # receive first: a message over the receiver's buffer budget is
        # announced, and its send waits for the matching recv.
        right, left = (r + 1) % n, (r - 1) % n
        if n > 1:
            for receive in ([lambda: aiocomm.recv(shape, "bfloat16", left)] * 2
                            + [lambda: aiocomm.recv_like(g, left)]):
                if r % 2:
                    got = receive()
                    aiocomm.send(g, right)
                else:
                    aiocomm.send(g, right)
                    got = receive()
                assert got.dtype == bf16 and np.array_equal(got, inputs[left]), what
    print("bfloat16 ok", flush=True)

if "bytes" in parts:
    # mlx-lm's share.py: rank 0 reads a file and sends it in chunks of bytes.
    payload = bytes(np.random.default_rng(7).integers(0, 256, 10_007, dtype=np.uint8)) if r == 0 else None
    size = int(aiocomm.all_sum(np.array([len(payload) if r == 0 else 0]))[0])
    chunk = 4096
    if r == 0:
        for start in range(0, size, chunk):
            for dst in range(1, n):
                aiocomm.send(payload[start:start + chunk], dst)  # bytes as they are
        received = payload
    else:
        pieces = [aiocomm.recv((min(chunk, size - start),), np.uint8, 0) for start in range(0, size, chunk)]
        assert all(type(p) is np.ndarray and p.dtype == np.uint8 for p in pieces)
        received = b"".join(p.tobytes() for p in pieces)
    digests = aiocomm.all_gather(hashlib.sha256(received).digest())  # 32 bytes per rank, as uint8
    assert digests.dtype == np.uint8 and digests.shape == (32 * n,), digests.shape
    assert (digests.reshape(n, 32) == digests[:32]).all(), "a rank received a different file"

    # The all_sum broadcast (the source has the data, the others zeros), with bytearray and memoryview.
    blob = bytearray(b"shared object") if r == 0 else bytearray(13)
    assert aiocomm.all_sum(blob).tobytes() == b"shared object"
    assert aiocomm.all_sum(memoryview(bytes(blob))).tobytes() == b"shared object"
    print("bytes ok", flush=True)

if "torch" in parts:
    import torch  # asked for: a missing torch fails the job (the test skips before, saying why)

    t = torch.full((3, 2), float(r + 1))
    out = aiocomm.all_sum(t)
    assert type(out) is np.ndarray and out.dtype == np.float32, type(out)
    assert (out == n * (n + 1) / 2).all(), out
    gathered = aiocomm.all_gather(torch.tensor([r], dtype=torch.int64))
    assert gathered.tolist() == list(range(n)), gathered
    if n > 1:
        aiocomm.send(torch.arange(4, dtype=torch.int32) + r, (r + 1) % n)
        got = aiocomm.recv((4,), np.int32, (r - 1) % n)
        assert got.tolist() == [(r - 1) % n + i for i in range(4)], got
    print("torch ok", flush=True)

if "recv_like_bytes" in parts and n > 1:
    # recv_like with a bytes object: a uint8 array of its length.
    if r == 0:
        aiocomm.send(b"abcdef", 1)
    elif r == 1:
        got = aiocomm.recv_like(bytes(6), 0)
        assert got.dtype == np.uint8 and got.tobytes() == b"abcdef", got

print("OK", flush=True)
