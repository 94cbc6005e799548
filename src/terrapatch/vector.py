"""Vector I/O for samples: read labelled points with pyogrio, write point layers.

Reading follows OTBTF's PatchesExtraction: every layer of the file is read in
order; features without the label field (or with a null value) are skipped;
labels are read as integers (reals truncated, numeric strings parsed); a
feature carrying the field but not a point geometry is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import shapely
from rasterio.crs import CRS

from terrapatch.errors import CRSMismatchError, InputError, MissingInputError
from terrapatch.geometry import crs_label
from terrapatch.progress import logger
from terrapatch.writer import check_writable, output_group

#: Vector output formats by extension.
VECTOR_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON",
                  ".shp": "ESRI Shapefile"}


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


def _labels_as_int(values: np.ndarray, path: str, field: str) -> np.ndarray:
    """Integer labels from a (non-null) field column: reals truncated, numeric strings parsed."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        return np.asarray(np.trunc(values).astype(np.int64))
    labels = np.zeros(values.shape, dtype=np.int64)
    for i, v in enumerate(values):
        try:
            labels[i] = int(float(str(v).strip()))
        except ValueError:
            raise InputError(
                f"field: value {v!r} of field {field!r} (feature {i}) in {path!r} is not a number"
            ) from None
    return labels


GEOMETRY_NAMES = ("Point", "LineString", "LinearRing", "Polygon", "MultiPoint",
                  "MultiLineString", "MultiPolygon", "GeometryCollection")


@dataclass(frozen=True)
class LayerFeatures:
    """The features of one layer that carry a field: geometries, raw values, CRS."""

    name: str
    geometries: np.ndarray
    values: np.ndarray
    crs: CRS | None


def read_layers(
    path: str | os.PathLike[str],
    field: str,
    geometry_types: tuple[int, ...],
    expected: str,
    parameter: str = "vector",
) -> tuple[list[LayerFeatures], int]:
    """Read, from every layer in file order, the features that carry ``field``.

    Features without the field, with a null value or an empty geometry are skipped and
    counted. A feature carrying the field whose geometry type id (shapely) is not in
    ``geometry_types`` is an error saying it is not ``expected``.

    Returns
    -------
    layers, n_skipped
        One :class:`LayerFeatures` per layer holding the field, and the skipped count.
    """
    path = os.fspath(path)
    if not Path(path).exists():
        raise MissingInputError(f"{parameter}: file {path!r} does not exist")
    try:
        names = [str(name) for name, _ in pyogrio.list_layers(path)]
    except Exception as exc:
        raise InputError(f"{parameter}: {path!r} is not a readable vector file ({exc})") from None
    layers: list[LayerFeatures] = []
    skipped = 0
    all_fields: list[str] = []
    for layer in names:
        info = pyogrio.read_info(path, layer=layer)
        fields = [str(f) for f in info["fields"]]
        all_fields.extend(f for f in fields if f not in all_fields)
        if field not in fields:
            skipped += int(max(info["features"], 0))
            continue
        _meta, _fids, wkb, field_data = pyogrio.raw.read(path, layer=layer, columns=[field])
        geoms = shapely.from_wkb(wkb)
        column = np.asarray(field_data[0])
        if column.dtype.kind == "f":
            has_value = np.isfinite(column)
        elif column.dtype.kind == "O":
            has_value = np.array([v is not None for v in column], dtype=bool)
        else:
            has_value = np.ones(column.shape, dtype=bool)
        keep = has_value & ~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)
        skipped += int((~keep).sum())
        kinds = shapely.get_type_id(geoms[keep])
        wrong = ~np.isin(kinds, geometry_types)
        if wrong.any():
            bad = int(np.flatnonzero(keep)[np.flatnonzero(wrong)[0]])
            kind = int(shapely.get_type_id(geoms[bad]))
            label = GEOMETRY_NAMES[kind] if 0 <= kind < len(GEOMETRY_NAMES) else str(kind)
            raise InputError(
                f"{parameter}: feature {bad} of layer {layer!r} in {path!r} is a {label}, "
                f"not {expected}"
            )
        crs = CRS.from_user_input(info["crs"]) if info["crs"] else None
        layers.append(LayerFeatures(layer, geoms[keep], column[keep], crs))
    if not layers:
        raise InputError(
            f"field: {field!r} is not a field of {path!r} "
            f"(fields: {', '.join(all_fields) or 'none'})"
        )
    return layers, skipped


def read_points(
    path: str | os.PathLike[str],
    field: str,
    crs: CRS | None = None,
    reproject: bool = False,
    parameter: str = "vector",
) -> PointSet:
    """Read labelled points from every layer of a vector file (GeoJSON, GPKG, Shapefile…).

    Parameters
    ----------
    path
        Vector file.
    field
        Attribute holding the integer class label.
    crs
        CRS the points must be in (source 1's); default: the first layer's. A layer in
        another CRS is an error unless ``reproject`` is True, in which case its points
        are transformed.
    reproject
        Reproject points to ``crs`` instead of failing on a CRS mismatch.
    parameter
        Parameter name quoted in errors.
    """
    layers, skipped = read_layers(
        path, field, (0,), "a point; sample positions must be points "
        "(terrapatch.sampling.select_patches and sample_polygons make points)", parameter)
    target = crs if crs is not None else next(
        (layer.crs for layer in layers if layer.crs is not None), None)
    xs, ys, labels = [np.empty(0)], [np.empty(0)], [np.empty(0, dtype=np.int64)]
    not_finite = 0
    for layer in layers:
        coords = shapely.get_coordinates(layer.geometries)
        x, y = coords[:, 0], coords[:, 1]
        finite = np.isfinite(x) & np.isfinite(y)
        if not finite.all():  # NaN coordinates: no position, skipped like a missing one
            not_finite += int((~finite).sum())
            x, y = x[finite], y[finite]
            layer = LayerFeatures(layer.name, layer.geometries[finite], layer.values[finite],
                                  layer.crs)
        if target is not None and layer.crs is not None and layer.crs != target:
            if not reproject:
                raise CRSMismatchError(
                    f"{parameter}: CRS {crs_label(layer.crs)} of layer {layer.name!r} in "
                    f"{os.fspath(path)!r} differs from the rasters' CRS {crs_label(target)}; "
                    "reproject the points, or give reproject=True"
                )
            if len(x):
                from rasterio.warp import transform

                tx, ty = transform(layer.crs, target, x, y)
                x, y = np.asarray(tx), np.asarray(ty)
        xs.append(x)
        ys.append(y)
        labels.append(_labels_as_int(layer.values, os.fspath(path), field))
    x, y, lab = np.concatenate(xs), np.concatenate(ys), np.concatenate(labels)
    if not_finite:
        logger.warning("%s: %d feature(s) of %s with NaN or infinite coordinates skipped",
                       parameter, not_finite, os.fspath(path))
    return PointSet(x.astype(np.float64), y.astype(np.float64), lab, target,
                    skipped + not_finite)


def vector_driver(path: str | os.PathLike[str], parameter: str = "out") -> str:
    """OGR driver name for an output path, from its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in VECTOR_DRIVERS:
        raise InputError(
            f"{parameter}: cannot tell the vector format of {os.fspath(path)!r}; "
            f"use one of {', '.join(sorted(VECTOR_DRIVERS))}"
        )
    return VECTOR_DRIVERS[suffix]


def write_points(
    path: str | os.PathLike[str],
    x: np.ndarray,
    y: np.ndarray,
    fields: Mapping[str, np.ndarray],
    crs: Any = None,
    parameter: str = "out",
    layer: str | None = None,
) -> Path:
    """Write a point layer atomically (in its pending folder, then renamed).

    The format comes from the extension (``.gpkg``, ``.geojson``, ``.shp``); the layer
    is named ``layer`` (default: the file name without extension). A shapefile's files
    appear together. A path already staged by the caller is written where it is.
    """
    target = check_writable(path, parameter)
    driver = vector_driver(target, parameter)
    geometry = shapely.to_wkb(shapely.points(np.asarray(x, float), np.asarray(y, float)))
    names = list(fields)
    data = [np.asarray(fields[n]) for n in names]
    crs_text = None if crs is None else CRS.from_user_input(crs).to_wkt()
    with output_group() as stage:
        pyogrio.raw.write(stage(target, parameter), geometry=geometry, field_data=data,
                          fields=names, crs=crs_text, driver=driver, geometry_type="Point",
                          layer=layer or Path(target).stem)
    return target
