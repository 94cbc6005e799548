"""Helpers for users' tests and ours: synthetic scenes, raster fixtures, hypothesis strategies.

Heavy helpers (Keras model builders in :mod:`terrapatch.testing.models`) are
imported on first use.
"""

from __future__ import annotations

from terrapatch.testing.rasters import coordinate_raster, mosaic_vrt, write_raster
from terrapatch.testing.scene import CLASSES, Scene, make_scene

__all__ = ["CLASSES", "Scene", "coordinate_raster", "make_scene", "mosaic_vrt", "write_raster"]
