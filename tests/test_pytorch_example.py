"""examples/pytorch/two_branch.py end to end on the real Brandenburg Sentinel-2 data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pytorch" / "two_branch.py"


@pytest.mark.slow
@pytest.mark.realdata
def test_two_branch_example_trains_and_serves_at_native_resolutions(real_data, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("TERRAPATCH_REAL_DATA", str(real_data))
    monkeypatch.setenv("TERRAPATCH_PYTORCH_OUT", str(tmp_path))
    spec = importlib.util.spec_from_file_location("two_branch_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    scores = example.main()
    assert scores["accuracy"] > 2 / example.CLASS_NB  # well above chance (1/8)
    assert scores["agreement"] == 1.0  # patch-based ≡ fully convolutional (I3)
    assert (tmp_path / "two_branch.pt2").is_file() and (tmp_path / "map_fcn.tif").is_file()
