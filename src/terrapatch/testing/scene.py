"""Synthetic multi-resolution Sentinel-2-like scene: rasters, label map and labelled points.

:func:`make_scene` writes, in about a second, a scene that behaves like the seed's
Sentinel-2 data: 4 bands at 10 m (B2, B3, B4, B8) and 6 bands at 20 m (B5, B6, B7,
B8A, B11, B12) on nested grids, six land-cover classes with distinct spectra and
textures that a small CNN can learn, a nodata (0) border along an oblique swath
edge, a 10 m label raster and labelled points split in two files (like the seed's
``pos_a`` / ``pos_b``). Everything is deterministic for a given seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from terrapatch.vector import write_points

#: Class names, in label order.
CLASSES = ("water", "forest", "cropland", "urban", "grassland", "bare soil")

#: Mean top-of-atmosphere reflectance × 10000 per class for
#: B2, B3, B4, B8 (10 m) then B5, B6, B7, B8A, B11, B12 (20 m).
SPECTRA = np.array([
    [900, 800, 600, 400, 550, 450, 420, 380, 250, 180],          # water
    [600, 750, 500, 3000, 1100, 2300, 2800, 3100, 1600, 800],    # forest
    [800, 1100, 1000, 3600, 1500, 2900, 3400, 3700, 2400, 1500],  # cropland
    [1400, 1450, 1500, 2100, 1650, 1900, 2050, 2200, 2600, 2300],  # urban
    [900, 1200, 1050, 2600, 1400, 2100, 2450, 2700, 2200, 1400],  # grassland
    [1600, 1800, 2100, 2600, 2300, 2450, 2550, 2700, 3300, 2900],  # bare soil
], dtype=np.float64)

#: Texture amplitude (relative) per class.
TEXTURE = np.array([0.03, 0.12, 0.08, 0.25, 0.06, 0.10])


@dataclass(frozen=True)
class Scene:
    """Paths of a generated scene."""

    directory: Path
    img_10m: Path
    img_20m: Path
    labels_10m: Path
    points_train: Path
    points_valid: Path
    crs: CRS
    transform_10m: Affine
    transform_20m: Affine


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Bilinearly upsampled random field with features about ``cell`` pixels wide."""
    h, w = shape
    gh, gw = h // cell + 2, w // cell + 2
    coarse = rng.standard_normal((gh, gw))
    ys = np.arange(h) / cell
    xs = np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    return np.asarray((a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy)


def _class_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Patchy land cover: warped Voronoi cells, each with a class."""
    h, w = shape
    n_seeds = max(12, (h * w) // 4000)
    sy = rng.uniform(0, h, n_seeds)
    sx = rng.uniform(0, w, n_seeds)
    cls = rng.integers(0, len(CLASSES), n_seeds)
    cls[: len(CLASSES)] = np.arange(len(CLASSES))  # every class present
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy += 12 * _smooth_noise(rng, shape, 24)
    xx += 12 * _smooth_noise(rng, shape, 24)
    best = np.full(shape, np.inf)
    labels = np.zeros(shape, dtype=np.uint8)
    for y, x, c in zip(sy, sx, cls, strict=True):
        d = (yy - y) ** 2 + (xx - x) ** 2
        closer = d < best
        best[closer] = d[closer]
        labels[closer] = c
    return labels


def _reflectance(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """10 bands at 10 m, shape (10, h, w), float64 DN."""
    h, w = labels.shape
    fine = rng.standard_normal((h, w))
    blotchy = _smooth_noise(rng, (h, w), 4)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx + 0.3 * yy) * 2 * np.pi / 6.0)
    texture = np.select(
        [labels == 3, labels == 2, labels == 1],
        [fine, stripes + 0.3 * fine, blotchy + 0.2 * fine],
        default=0.5 * blotchy + 0.3 * fine,
    )
    gain = 1.0 + TEXTURE[labels] * texture
    illumination = 1.0 + 0.05 * _smooth_noise(rng, (h, w), 64)
    bands = SPECTRA[labels].transpose(2, 0, 1) * gain * illumination
    bands += rng.normal(0, 20, bands.shape)  # sensor noise
    return np.asarray(np.clip(bands, 1, 10000))


def make_scene(
    directory: str | os.PathLike[str],
    size: int = 512,
    n_points: int = 3000,
    seed: int = 0,
    border: int = 24,
    epsg: int = 32631,
) -> Scene:
    """Write a synthetic Sentinel-2-like 10 m / 20 m scene and labelled points.

    Parameters
    ----------
    directory
        Output directory (created if needed).
    size
        Width and height of the 10 m image in pixels (even; the 20 m image is half).
    n_points
        Number of random labelled points, split 80 % / 20 % into train / valid files.
    seed
        Random seed; the same seed gives the same files.
    border
        Mean width, in 10 m pixels, of the nodata swath border on the right side.
    epsg
        CRS of the scene.

    Returns
    -------
    Scene
        The written paths: ``s2_10m.tif`` (uint16, 4 bands, nodata 0), ``s2_20m.tif``
        (uint16, 6 bands, nodata 0), ``labels_10m.tif`` (uint8, nodata 255),
        ``points_train.geojson`` and ``points_valid.geojson`` (field ``class``).
    """
    if size % 2 or size < 64:
        raise ValueError(f"size: {size} must be an even number ≥ 64")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = _class_map(rng, (size, size))
    bands = _reflectance(rng, labels)
    # Oblique swath edge on the right: nodata beyond it.
    yy, xx = np.mgrid[0:size, 0:size]
    edge = size - border - 0.15 * (yy - size / 2)
    valid10 = xx < edge
    b10 = np.where(valid10, np.rint(bands[:4]), 0).astype(np.uint16)
    half = size // 2
    coarse = bands[4:].reshape(6, half, 2, half, 2).mean(axis=(2, 4))
    valid20 = valid10.reshape(half, 2, half, 2).all(axis=(1, 3))
    b20 = np.where(valid20, np.rint(coarse), 0).astype(np.uint16)
    lab = np.where(valid10, labels, 255).astype(np.uint8)

    crs = CRS.from_epsg(epsg)
    x0, y0 = 600000.0, 5000000.0
    t10 = Affine(10.0, 0.0, x0, 0.0, -10.0, y0)
    t20 = Affine(20.0, 0.0, x0, 0.0, -20.0, y0)
    common = {"driver": "GTiff", "crs": crs, "compress": "deflate", "tiled": True,
              "blockxsize": 256, "blockysize": 256}
    paths: dict[str, tuple[Path, np.ndarray, Affine, int]] = {
        "img_10m": (out / "s2_10m.tif", b10, t10, 0),
        "img_20m": (out / "s2_20m.tif", b20, t20, 0),
        "labels_10m": (out / "labels_10m.tif", lab[None], t10, 255),
    }
    for path, data, transform, nodata in paths.values():
        profile = dict(common, width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype.name, transform=transform, nodata=nodata)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)

    px = rng.uniform(0, size, n_points)
    py = rng.uniform(0, size, n_points)
    cls = lab[py.astype(int), px.astype(int)]
    inside = cls != 255
    px, py, cls = px[inside], py[inside], cls[inside].astype(np.int64)
    x = x0 + px * 10.0
    y = y0 - py * 10.0
    n_train = round(0.8 * len(x))
    train = out / "points_train.geojson"
    valid = out / "points_valid.geojson"
    write_points(train, x[:n_train], y[:n_train], {"class": cls[:n_train]}, crs=crs)
    write_points(valid, x[n_train:], y[n_train:], {"class": cls[n_train:]}, crs=crs)
    return Scene(out, paths["img_10m"][0], paths["img_20m"][0], paths["labels_10m"][0],
                 train, valid, crs, t10, t20)
