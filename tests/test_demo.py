"""`terrapatch demo` runs the whole workflow and writes maps, quicklooks and a report."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from terrapatch.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--size", "256", "--epochs", "2", "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "| **overall accuracy** |" in report and "single F1" in report and "dual F1" in report
    assert "agree on 100.00 % of the pixels" in report
    for name in ("map_dual_source_pb", "map_dual_source_fcn", "map_single_source_fcn"):
        with rasterio.open(out / f"{name}.tif") as ds:
            assert ds.dtypes[0] == "uint8" and ds.res == (20.0, 20.0)
            values = np.unique(ds.read(1))
            assert set(values.tolist()) <= set(range(6)) | {255}
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "confusion_matrices.png").is_file()
    assert (out / "model_dual_source.onnx").is_file()
    assert (out / "model_dual_source_savedmodel" / "saved_model.pb").is_file()
