"""Fixtures shared by the test files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test helpers (multirank.py, the drivers) import each other by module name.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def data_overrides() -> list[str]:
    """The embedded SFT data and tokenizer, named explicitly."""
    from multirank import embedded_data_overrides

    return embedded_data_overrides()
