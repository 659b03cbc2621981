"""Mismatches on the pipelined ring path: a MismatchError on every rank, never data.

The other mismatch tests (``test_p2p_split_faces.py``) use arrays of a few
bytes, which take the small-message algorithms.  Here the arrays are
megabytes: over ``SMALL_BYTES`` (32 KiB) and over the default 1 MiB
segment, so each collective runs the segmented, pipelined ring, and one
rank disagrees in shape or dtype (also with the same byte count, and with a
small array that takes the other path).  One job per case: after a failed
large collective a rank may close a connection (the rule against torn
messages), so a world is not reused for the next case.  A test stops at its
first failing case and shows that job's output.
"""

from __future__ import annotations

import pytest

from .conftest import launch


@pytest.fixture(autouse=True)
def _tcp_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipelined ring is TCP's: ranks of one host would otherwise use shared
    memory (whose own mismatch checks tests/test_rooted.py runs)."""
    monkeypatch.setenv("AIOCOMM_TRANSPORT", "tcp")

BASE_DTYPE = "float32"
#: kind -> what the odd rank's call says in a MismatchError's message, for
#: 1200 rows (the others' call says (rows, 1024) and BASE_DTYPE).
KINDS = {
    "shape": "(1206, 1024)",
    "dtype": "float64",
    "dtype_same_bytes": "int32",
    "reshape": "(2400, 512)",
    "straddle": "(6, 256)",
}
OPS = ["all_sum", "all_max", "all_min", "all_gather", "sum_scatter"]

#: A regression: on 3 ranks a mismatched large all_gather gave one rank
#: PeerLostError, not MismatchError, in about 9 runs of 10 of this case (32
#: MiB arrays, rank 1 odd): the rank that detected the mismatch closed the
#: connection that still held its unsent segments (against torn messages)
#: before the group's ABORT could follow them.  It now lets them go out first
#: (RingBackend._settle_writes).  The case runs 4 times.
ALL_GATHER_3_RANKS_REPRO = [("shape", 1, 8400)] * 4


def _cases(n: int, op: str) -> list[tuple[str, int, int]]:
    """Each kind once, with the odd rank moving round the ring from kind to kind.
    all_max and all_min run all_sum's code with another ufunc: shape and dtype."""
    kinds = ["shape", "dtype"] if op in ("all_max", "all_min") else list(KINDS)
    cases = [(kind, (i + 1) % n, 1200) for i, kind in enumerate(kinds)]
    return ALL_GATHER_3_RANKS_REPRO + cases if (n, op) == (3, "all_gather") else cases


def _params() -> list[object]:
    out: list[object] = []
    for n in (2, 3):
        for op in OPS:
            out.append(pytest.param(n, op, id=f"{n}-{op}"))
    return out


def _failures(proc, n: int, kind: str, rows: int) -> list[str]:
    """What went wrong in one job (empty: every rank raised MismatchError, twice)."""
    base_shape = f"({rows}, 1024)"
    odd_says = KINDS[kind].replace("(1206,", f"({rows + 6},").replace("(2400,", f"({rows * 2},")
    if proc.returncode != 0:
        return ["the job failed"]
    out = []
    for r in range(n):
        mine = [line.split("] ", 1)[1] for line in proc.stdout.splitlines() if line.startswith(f"[rank {r}] ")]
        first = [line for line in mine if line.startswith("CASE ")]
        later = [line for line in mine if line.startswith("LATER ")]
        if "DONE" not in mine or len(first) != 1 or len(later) != 1:
            out.append(f"rank {r} did not report its calls")
            continue
        if not first[0].startswith("CASE MISMATCH "):
            out.append(f"rank {r}: {first[0]}")
        elif not all(s in first[0] for s in (odd_says, base_shape, BASE_DTYPE)):
            out.append(f"rank {r}'s MismatchError does not name both sides: {first[0]}")
        elif float(first[0].rsplit("(", 1)[1].rstrip("s)")) > 10:
            out.append(f"rank {r} waited for its MismatchError: {first[0]}")
        if not later[0].startswith("LATER MISMATCH "):
            out.append(f"rank {r}, a later call on the broken group: {later[0]}")
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,op", _params())
def test_large_mismatch_raises_on_every_rank_and_returns_no_data(n, op):
    for kind, odd, rows in _cases(n, op):
        proc = launch(n, "mismatch_pipelined.py", op, kind, str(odd), str(rows), timeout=55)
        failures = _failures(proc, n, kind, rows)
        assert not failures, "\n".join(failures) + (
            f"\n{op} on {n} ranks of ({rows}, 1024) float32, rank {odd} with {kind}: exit {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
