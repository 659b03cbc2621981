"""``python -m aiocomm.bench.compare --floor PATH --rounds K``: the floor as a
peer, and ratios taken within each round of peers run in turn."""

from __future__ import annotations

import json
import re

import pytest

from .test_bench_plot import _compare

# A stand-in for ../shared/bench/floor_shm_allsum.py: the same output, with a
# latency that doubles at each run, and its arguments noted.
FAKE_FLOOR = """\
import json, pathlib, sys
here = pathlib.Path(__file__).with_suffix(".runs")
runs = json.loads(here.read_text()) if here.exists() else []
runs.append(sys.argv[1:])
here.write_text(json.dumps(runs))
for size in sys.argv[2:]:
    us = 1000.0 * 2 ** (len(runs) - 1)
    print(json.dumps({"lib": "floor-shm", "n": int(sys.argv[1]), "bytes": int(size), "us": us, "busbw": 0.001}))
"""


def _rows(text: str) -> dict[tuple[int, str], float]:
    """(round, peer) -> median_us of the 8-byte rows."""
    rows, k = {}, 0
    for line in text.splitlines():
        if line.startswith("# round "):
            k = int(line.split()[2])
        found = re.match(r"  (\S+) +2 +8 +([\d.]+) ", line)
        if found:
            rows[(k, found[1])] = float(found[2])
    return rows


@pytest.mark.timeout(120)
def test_floor_runs_each_round_and_each_ratio_is_of_its_own_round(tmp_path):
    floor = tmp_path / "floor.py"
    floor.write_text(FAKE_FLOOR)
    proc = _compare("--peers", "aiocomm,floor", "--floor", str(floor), "--rounds", "2", "--ranks", "2",
                    "--sizes", "8", "--small-iters", "20")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    # the floor got the rank count and the sizes in bytes, once a round
    assert json.loads((tmp_path / "floor.runs").read_text()) == [["2", "8"], ["2", "8"]]
    assert "# round 1 of 2" in out and "# round 2 of 2" in out, out
    rows = _rows(out)
    assert rows[(1, "floor")] == 1000.0 and rows[(2, "floor")] == 2000.0, out
    ratios = [float(r) for r in re.findall(r"  floor +2 +8 +[\d.]+ +[\d.]+ +([\d.]+)x lat yes", out)]
    # (the table's figures are rounded: aiocomm's median to 0.1 us)
    assert ratios == pytest.approx([rows[(k, "floor")] / rows[(k, "aiocomm")] for k in (1, 2)], rel=0.01), out
    assert f"  floor                 2          8  {ratios[0]:.2f}x lat, {ratios[1]:.2f}x lat" in out, out


@pytest.mark.timeout(60)
def test_floor_without_a_path_is_skipped_and_a_wrong_path_refused(tmp_path):
    proc = _compare("--peers", "floor", "--ranks", "2", "--sizes", "8")
    assert proc.returncode == 0, proc.stderr
    assert "# skipping floor: pass --floor PATH" in proc.stdout, proc.stdout
    missing = tmp_path / "nowhere.py"
    proc = _compare("--peers", "floor", "--floor", str(missing), "--ranks", "2", "--sizes", "8")
    assert proc.returncode == 2 and f"--floor {missing}: no such file" in proc.stderr, proc.stderr
    proc = _compare("--peers", "floor", "--rounds", "0")
    assert proc.returncode == 2 and "--rounds 0: at least 1" in proc.stderr, proc.stderr
