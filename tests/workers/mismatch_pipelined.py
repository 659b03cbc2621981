"""Mismatches on the pipelined ring path: every rank raises MismatchError, nobody gets data.

argv: OP KIND ODD [ROWS] -- OP is all_sum, all_max, all_min, all_gather
or sum_scatter; rank ODD calls it with an input of another KIND (below),
the other ranks with a float32 array of shape (ROWS, 1024) (ROWS: 1200,
4.7 MiB, unless given; a multiple of 6).

The arrays are megabytes, far over the small-message limit (``SMALL_BYTES``,
32 KiB), and over the default 1 MiB segment (``AIOCOMM_SEGMENT_BYTES``), so
the collective runs the segmented ring (reduce-scatter / all-gather) and
each block crosses the wire as several frames.  The odd rank's input:

- ``shape``: more rows (a different byte count);
- ``reshape``: the same elements and bytes in another shape;
- ``dtype``: float64 instead of float32 (twice the bytes);
- ``dtype_same_bytes``: int32 instead of float32 (the same bytes);
- ``straddle``: a small array, which takes the small-message path.

Each rank prints ``CASE <outcome>``, where the outcome is ``MISMATCH`` (and
the message), ``DATA`` (the call returned) or ``OTHER <class>``; then
``LATER <outcome>`` for a second call on the broken group, which must fail
at once with MismatchError too; then ``DONE``.  One case per job: after a
failed large collective a rank may close its connection to a peer (the
README's rule against torn messages), so the world is not reused.
"""

import sys
import time

import numpy as np

import aiocomm

op, kind, odd = sys.argv[1], sys.argv[2], int(sys.argv[3])
world = aiocomm.init(strict=True)
n, r = world.size(), world.rank()

BASE = (int(sys.argv[4]) if len(sys.argv) > 4 else 1200, 1024)  # rows divisible by 2 and 3 (sum_scatter)


def odd_input() -> np.ndarray:
    if kind == "shape":
        return np.ones((BASE[0] + 6, BASE[1]), np.float32)
    if kind == "reshape":
        return np.ones((BASE[0] * 2, BASE[1] // 2), np.float32)
    if kind == "dtype":
        return np.ones(BASE, np.float64)
    if kind == "dtype_same_bytes":
        return np.ones(BASE, np.int32)
    if kind == "straddle":  # 6 KiB, and n * 6 KiB gathered: under 32 KiB
        return np.ones((6, 256), np.float32)
    raise AssertionError(kind)


def outcome(x: np.ndarray) -> str:
    t0 = time.monotonic()
    try:
        got = getattr(aiocomm, op)(x, timeout=20)
    except aiocomm.MismatchError as exc:
        what = "MISMATCH " + str(exc).replace("\n", " | ")
    except BaseException as exc:
        what = f"OTHER {type(exc).__name__}: " + str(exc).replace("\n", " | ")
    else:
        what = f"DATA {got.dtype}{got.shape}"
    return f"{what} ({time.monotonic() - t0:.2f}s)"


x = odd_input() if r == odd else np.ones(BASE, np.float32)
assert x.nbytes > 32 * 1024 or kind == "straddle"
keep = x.copy()
print(f"CASE {outcome(x)}", flush=True)
assert np.array_equal(x, keep), "the input was modified"
print(f"LATER {outcome(x)}", flush=True)
print("DONE", flush=True)
