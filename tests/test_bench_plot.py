"""``python -m aiocomm.bench.compare --plot FILE.png``: the picture of a real run,
and the install hint without matplotlib."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, clean_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _compare(*args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    program = code + "from aiocomm.bench.compare import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", "import sys; " + program, *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
def test_plot_of_a_small_run_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    proc = _compare("--peers", "aiocomm", "--ranks", "2", "--sizes", "8,64K", "--iters", "3",
                    "--small-iters", "20", "--plot", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # The table is printed as before, the plot besides.
    assert "# peer" in proc.stdout and "  aiocomm               2          8" in proc.stdout, proc.stdout
    assert "  aiocomm               2      65536" in proc.stdout, proc.stdout
    assert f"# plot: {out}" in proc.stdout
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 300


def test_draw_has_a_line_per_library_and_rank_count_in_both_panels():
    pytest.importorskip("matplotlib")
    from aiocomm.bench.compare import draw

    results = {}
    for peer in ("aiocomm", "openmpi"):
        for ranks in (2, 4):
            for nbytes in (8, 1 << 16, 1 << 20):
                results[(peer, ranks, nbytes)] = {"bytes": nbytes, "median_us": 10.0 + nbytes / 1e3 * ranks,
                                                  "busbw_GBps": nbytes / 1e6 / ranks, "correct": True}
    fig = draw(results, "all_sum")
    bw, lat = fig.axes
    assert [line.get_label() for line in bw.lines] == ["aiocomm, 2 ranks", "aiocomm, 4 ranks", "openmpi, 2 ranks",
                                                       "openmpi, 4 ranks"]
    assert len(lat.lines) == 4
    assert bw.get_xscale() == "log" and lat.get_yscale() == "log"
    line = bw.lines[1]  # aiocomm, 4 ranks
    assert list(line.get_xdata()) == [8, 1 << 16, 1 << 20]
    assert list(line.get_ydata()) == [results[("aiocomm", 4, n)]["busbw_GBps"] for n in (8, 1 << 16, 1 << 20)]
    assert list(lat.lines[1].get_ydata()) == [results[("aiocomm", 4, n)]["median_us"] for n in (8, 1 << 16, 1 << 20)]


@pytest.mark.timeout(60)
def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    """Before any benchmark runs: matplotlib hidden as if not installed."""
    out = tmp_path / "bench.png"
    proc = _compare("--peers", "aiocomm", "--ranks", "2", "--sizes", "8", "--plot", str(out),
                    code="sys.modules['matplotlib'] = None; ")
    assert proc.returncode != 0
    assert "pip install 'aiocomm[plot]'" in proc.stderr and "matplotlib" in proc.stderr, proc.stderr
    assert "# peer" not in proc.stdout and not out.exists()
