"""Every example runs on 4 local ranks with a small size (a smoke test)."""

import importlib.util
import subprocess
import sys

import pytest

from .conftest import ROOT, clean_env

CASES = {
    "monte_carlo_pi.py": (["20000"], "pi ~= 3.1"),
    "data_parallel.py": (["150", "500"], "weights identical on every rank"),
    "pipeline.py": (["10", "16"], "arrived in order and correct"),
    "async_service.py": (["10"], "the loop stayed responsive: 5 status replies"),
    "split_groups.py": ([], "rank 3 at (1, 1): row sum 5, column sum 4, row members [2, 3]"),
    "port_from_mlx.py": ([], "ported: every mx.distributed call ran on 4 ranks"),
    "share_file.py": (["100000", "30000"], "shared 100000 bytes from rank 0 in 4 chunks"),
    "bfloat16_gradients.py": (["150", "500"], "weights identical on every rank"),
    "elastic_training.py": (["--second"], "30 steps on 2 survivors (2 redone); weights match the one-process run"),
}
#: Launcher options an example needs.
LAUNCH = {"elastic_training.py": ["--on-failure", "continue"]}
#: What an example needs beyond aiocomm's own dependencies (the test extra has it).
NEEDS = {"bfloat16_gradients.py": "ml_dtypes"}


def test_every_example_is_tested():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(CASES)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(CASES))
def test_example(name):
    args, expected = CASES[name]
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{name} needs {NEEDS[name]} (pip install -e '.[test]')")
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "-n", "4", *LAUNCH.get(name, []), str(ROOT / "examples" / name), *args],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert expected in proc.stdout, proc.stdout
