"""The benchmark refuses sizes it would have to round, and says when the
rank count changes a size (tiny runs: a smoke test, not a timing)."""

import subprocess
import sys

import pytest

from aiocomm.bench.run import main

from .conftest import ROOT, clean_env


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "8,6"], "6 bytes is not a whole number of float32 items (4 bytes each); use 4 or 8"),
    (["--dtype", "float64", "--sizes", "12"], "use 8 or 16"),
    (["--sizes", "0"], "at least one float32 item"),
    (["--dtype", "U3"], "np.frombuffer"),
    (["--sizes", "8x"], "comma list of byte counts"),
])
def test_bad_sizes_and_dtypes_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_sizes_changed_by_the_rank_count_are_reported():
    pytest.importorskip("ml_dtypes")
    proc = subprocess.run([sys.executable, "-m", "launcher", "-n", "3", sys.executable, "-m", "aiocomm.bench",
                           "--op", "all_gather", "--dtype", "bfloat16", "--sizes", "8", "--small-iters", "3"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 bytes is not 3 equal blocks of bfloat16: measuring 6 bytes" in proc.stdout, proc.stdout
    assert "dtype=bfloat16" in proc.stdout and " yes" in proc.stdout
