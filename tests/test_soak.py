"""Soak: mixed collectives from several tasks at once on 4 ranks."""

import pytest

from .conftest import assert_ok, launch


@pytest.mark.timeout(120)
def test_soak_short():
    assert_ok(launch(4, "soak.py", "200"), 4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_long():
    assert_ok(launch(4, "soak.py", "4000", timeout=850), 4)
