"""Helpers for users' tests and ours: synthetic scenes, raster fixtures, assertions, strategies.

- :mod:`terrapatch.testing.scene` and :mod:`terrapatch.testing.rasters`: the synthetic
  scene generator and tiny GeoTIFFs with explicit transforms (``make_scene``,
  ``write_raster``, ``coordinate_raster``, ``mosaic_vrt``).
- :mod:`terrapatch.testing.asserts`: assertions whose messages say what differs
  (``assert_same_map``, ``assert_same_patches``, ``assert_same_values``,
  ``assert_windows_equal``, ``assert_coordinate_patch``) and ``read_raster``.
- :mod:`terrapatch.testing.spellings`: ``assert_respelled`` and ``SpellingCase``, for
  facades that respell the core's identifiers.
- :mod:`terrapatch.testing.strategies`: hypothesis strategies for random nested grids
  (needs ``hypothesis``).
- :mod:`terrapatch.testing.markers`: ``requires_*`` skip markers for optional
  dependencies (needs ``pytest``).

Heavy helpers (Keras model builders in :mod:`terrapatch.testing.models`) are
imported on first use.
"""

from __future__ import annotations

from terrapatch.testing.asserts import (
    Raster,
    assert_coordinate_patch,
    assert_same_map,
    assert_same_patches,
    assert_same_values,
    assert_windows_equal,
    read_raster,
)
from terrapatch.testing.rasters import coordinate_raster, mosaic_vrt, write_raster
from terrapatch.testing.scene import CLASSES, Scene, make_scene
from terrapatch.testing.spellings import SpellingCase, assert_respelled

__all__ = [
    "CLASSES",
    "Raster",
    "Scene",
    "SpellingCase",
    "assert_coordinate_patch",
    "assert_respelled",
    "assert_same_map",
    "assert_same_patches",
    "assert_same_values",
    "assert_windows_equal",
    "coordinate_raster",
    "make_scene",
    "mosaic_vrt",
    "read_raster",
    "write_raster",
]
