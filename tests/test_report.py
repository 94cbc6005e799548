"""Accuracy scores, tables and PNG outputs of terrapatch.report."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from terrapatch.report import class_scores, confusion_matrix, confusion_png, quicklook, scores_table
from terrapatch.testing import write_raster


def test_scores_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1])
    s = class_scores(y_true, y_pred, ["a", "b", "c"])
    assert s.confusion.tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    assert s.precision == pytest.approx([2 / 3, 2 / 4, 2 / 2])
    assert s.recall == pytest.approx([2 / 3, 2 / 2, 2 / 4])
    assert s.f1[1] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert s.overall_accuracy == pytest.approx(6 / 9)
    pe = (3 * 3 + 2 * 4 + 4 * 2) / 81
    assert s.kappa == pytest.approx((6 / 9 - pe) / (1 - pe))
    assert s.support.tolist() == [3, 2, 4]


def test_confusion_ignores_out_of_range_labels():
    cm = confusion_matrix(np.array([0, 1, 255]), np.array([0, 7, 1]), 2)
    assert cm.tolist() == [[1, 0], [0, 0]]


def test_table_and_pngs(tmp_path):
    s = class_scores(np.array([0, 1, 1]), np.array([0, 1, 0]), ["water", "forest"])
    table = scores_table({"single": s, "dual": s})
    assert "| water |" in table and "single F1" in table and "overall accuracy" in table
    data = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    raster = write_raster(tmp_path / "map.tif", data, Affine(20, 0, 0, 0, -20, 0), nodata=255)
    png = quicklook(raster, tmp_path / "map.png", ["water", "forest"])
    cm_png = confusion_png({"single": s, "dual": s}, tmp_path / "cm.png")
    for p in (png, cm_png):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "map.png", "map.tif"]
