"""Shared pytest fixtures: real data location, synthetic rasters, quiet TensorFlow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REAL_DATA = Path(
    os.environ.get("TERRAPATCH_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/real")
)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Directory of the real rasters (../shared/data/real); skips when absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not available at {REAL_DATA} (needs ../shared beside the repo)")
    return REAL_DATA
