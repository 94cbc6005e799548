"""Vector I/O for samples: read labelled points with pyogrio, write point layers.

Reading follows OTBTF's PatchesExtraction: every layer of the file is read in
order; features without the label field (or with a null value) are skipped;
labels are read as integers (reals truncated, numeric strings parsed); a
feature carrying the field but not a point geometry is an error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import shapely
from rasterio.crs import CRS

from terrapatch.errors import CRSMismatchError, InputError, MissingInputError
from terrapatch.writer import check_writable

_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".shp": "ESRI Shapefile"}


@dataclass(frozen=True)
class PointSet:
    """Labelled sample points.

    Attributes
    ----------
    x, y
        Coordinates (float64), in ``crs``.
    labels
        Integer label of each point (int64).
    crs
        CRS of the coordinates, or None.
    n_skipped
        Features skipped because they lack the field (or its value is null).
    """

    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray
    crs: CRS | None
    n_skipped: int = 0

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _labels_as_int(values: np.ndarray, path: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels, valid mask) for a field column."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64), np.ones(values.shape, dtype=bool)
    if values.dtype.kind == "f":
        valid = np.isfinite(values)
        return np.trunc(np.where(valid, values, 0)).astype(np.int64), valid
    labels = np.zeros(values.shape, dtype=np.int64)
    valid = np.zeros(values.shape, dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            labels[i] = int(float(str(v).strip()))
        except ValueError:
            raise InputError(
                f"field: value {v!r} of field {field!r} (feature {i}) in {path!r} is not a number"
            ) from None
        valid[i] = True
    return labels, valid


def read_points(
    path: str | os.PathLike[str],
    field: str,
    crs: CRS | None = None,
    reproject: bool = False,
    parameter: str = "vec",
) -> PointSet:
    """Read labelled points from every layer of a vector file (GeoJSON, GPKG, Shapefile…).

    Parameters
    ----------
    path
        Vector file.
    field
        Attribute holding the integer class label.
    crs
        CRS the points must be in (source 1's). A different CRS in the file is an error
        unless ``reproject`` is True, in which case the points are transformed.
    reproject
        Reproject points to ``crs`` instead of failing on a CRS mismatch.
    parameter
        Parameter name quoted in errors.
    """
    path = os.fspath(path)
    if not Path(path).exists():
        raise MissingInputError(f"{parameter}: file {path!r} does not exist")
    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
    except Exception as exc:
        raise InputError(f"{parameter}: {path!r} is not a readable vector file ({exc})") from None
    xs, ys, labels = [], [], []
    skipped = 0
    file_crs: str | None = None
    all_fields: list[str] = []
    layer_with_field = False
    for layer in layers:
        info = pyogrio.read_info(path, layer=layer)
        fields = [str(f) for f in info["fields"]]
        all_fields.extend(f for f in fields if f not in all_fields)
        if field not in fields:
            skipped += int(max(info["features"], 0))
            continue
        layer_with_field = True
        file_crs = file_crs or info["crs"]
        _meta, _fids, geometry, field_data = pyogrio.raw.read(
            path, layer=layer, columns=[field], read_geometry=True
        )
        values, valid = _labels_as_int(np.asarray(field_data[0]), path, field)
        geoms = shapely.from_wkb(geometry)
        has_geom = ~shapely.is_missing(geoms)
        keep = valid & has_geom
        skipped += int((~keep).sum())
        types = shapely.get_type_id(geoms[keep])
        if (types != 0).any():
            bad = int(np.flatnonzero(keep)[np.flatnonzero(types != 0)[0]])
            kind = shapely.get_type_id(geoms[bad])
            names = ["Point", "LineString", "LinearRing", "Polygon", "MultiPoint",
                     "MultiLineString", "MultiPolygon", "GeometryCollection"]
            raise InputError(
                f"{parameter}: feature {bad} of layer {layer!r} in {path!r} is a "
                f"{names[kind] if 0 <= kind < len(names) else kind}, not a point; sample "
                "positions must be points (see PatchesSelection or sample_polygons)"
            )
        coords = shapely.get_coordinates(geoms[keep])
        xs.append(coords[:, 0])
        ys.append(coords[:, 1])
        labels.append(values[keep])
    if not layer_with_field:
        raise InputError(
            f"field: {field!r} is not a field of {path!r} "
            f"(fields: {', '.join(all_fields) or 'none'})"
        )
    x = np.concatenate(xs) if xs else np.empty(0)
    y = np.concatenate(ys) if ys else np.empty(0)
    lab = np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)
    points_crs = CRS.from_user_input(file_crs) if file_crs else None
    if crs is not None and points_crs is not None and points_crs != crs:
        if not reproject:
            raise CRSMismatchError(
                f"{parameter}: CRS {_label(points_crs)} of {path!r} differs from the rasters' "
                f"CRS {_label(crs)}; reproject the points (or pass reproject=True)"
            )
        from rasterio.warp import transform

        if len(x):
            tx, ty = transform(points_crs, crs, x, y)
            x, y = np.asarray(tx), np.asarray(ty)
        points_crs = crs
    return PointSet(x.astype(np.float64), y.astype(np.float64), lab, points_crs or crs, skipped)


def _label(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def vector_driver(path: str | os.PathLike[str], parameter: str = "out") -> str:
    """OGR driver name for an output path, from its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in _DRIVERS:
        raise InputError(
            f"{parameter}: cannot tell the vector format of {os.fspath(path)!r}; "
            f"use one of {', '.join(sorted(_DRIVERS))}"
        )
    return _DRIVERS[suffix]


def write_points(
    path: str | os.PathLike[str],
    x: np.ndarray,
    y: np.ndarray,
    fields: Mapping[str, np.ndarray],
    crs: Any = None,
    parameter: str = "out",
) -> Path:
    """Write a point layer atomically (temporary name, then rename).

    The format comes from the extension (``.gpkg``, ``.geojson``, ``.shp``).
    """
    target = check_writable(path, parameter)
    driver = vector_driver(target, parameter)
    geometry = shapely.to_wkb(shapely.points(np.asarray(x, float), np.asarray(y, float)))
    names = list(fields)
    data = [np.asarray(fields[n]) for n in names]
    crs_text = None if crs is None else CRS.from_user_input(crs).to_wkt()
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = tmpdir / target.name
    try:
        pyogrio.raw.write(tmp, geometry=geometry, field_data=data, fields=names, crs=crs_text,
                          driver=driver, geometry_type="Point", layer=target.stem)
        produced = sorted(tmpdir.iterdir())
        for item in produced:  # shapefiles come as several files
            os.replace(item, target.parent / (target.stem + item.name[len(target.stem):]))
    finally:
        for item in tmpdir.iterdir():
            with contextlib.suppress(OSError):
                item.unlink()
        with contextlib.suppress(OSError):
            tmpdir.rmdir()
    return target
