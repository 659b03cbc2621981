"""The README's "Two faces" snippets run as printed, every time, on 2 and 3
ranks (the async one once sent to a rank that never received)."""

import re

import pytest

from .conftest import ROOT, launch


def _snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Two faces, one engine"):text.index("## Launching")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_section_has_both_faces():
    blocking, asynchronous = _snippets()
    assert "aiocomm.all_sum(x)" in blocking and "uvloop.run(main())" in asynchronous


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("face", [0, 1], ids=["blocking", "async"])
def test_snippet_runs(tmp_path, n, face):
    script = tmp_path / "snippet.py"
    script.write_text(_snippets()[face] + "\nprint('OK', flush=True)\n")
    proc = launch(n, str(script), env={"AIOCOMM_TIMEOUT": "20"}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OK") == n, proc.stdout


def _beyond_mlx() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Beyond MLX"):text.index("## Examples")]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return snippet


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 3])
def test_the_beyond_mlx_snippet_runs(tmp_path, n):
    script = tmp_path / "beyond.py"
    script.write_text(_beyond_mlx() + "\nprint('OK', flush=True)\n")
    proc = launch(n, str(script), env={"AIOCOMM_TIMEOUT": "20"}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OK") == n, proc.stdout
