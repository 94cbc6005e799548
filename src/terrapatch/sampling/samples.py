"""Results of sample selection and their writers: points, patch groups, polygon statistics.

:class:`Samples` (points with attribute columns), :class:`PatchSelection` (grid
selection with train / valid / test groups), :class:`PolygonStatistics` (pixel counts
per class and per polygon, written as JSON or OTB's statistics XML) and
:class:`PolygonSamples` (points drawn in polygons), plus :func:`write_class_map`.
Every file is written atomically; files written together appear together or not at
all.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from terrapatch.errors import NoSamplesError
from terrapatch.geometry import Grid
from terrapatch.progress import logger
from terrapatch.raster import PathLike
from terrapatch.vector import write_points
from terrapatch.writer import atomic_output, check_writable, final_path, output_group

#: Names of the grid selection groups, in group-index order.
GROUPS = ("train", "valid", "test")

@dataclass(frozen=True)
class Samples:
    """Sample points with attribute columns.

    Attributes
    ----------
    x, y
        Point coordinates (float64) in ``crs``.
    fields
        Attribute name → one value per point (e.g. ``class``, ``id``).
    crs
        CRS of the coordinates (the raster's), or None.
    """

    x: np.ndarray
    y: np.ndarray
    fields: dict[str, np.ndarray]
    crs: Any = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: np.ndarray) -> Samples:
        """The points selected by a boolean mask or an index array."""
        return Samples(self.x[index], self.y[index],
                       {k: v[index] for k, v in self.fields.items()}, self.crs)

    def write(self, path: PathLike, parameter: str = "out", layer: str | None = None) -> Path:
        """Write the points (GPKG, GeoJSON or Shapefile, from the extension), atomically.

        Raises :class:`~terrapatch.errors.NoSamplesError` when there is no point.
        """
        if len(self) == 0:
            raise NoSamplesError(f"{parameter}: no point to write to "
                                 f"{os.fspath(final_path(path))!r}")
        return write_points(path, self.x, self.y, self.fields, crs=self.crs, parameter=parameter,
                            layer=layer)


@dataclass(frozen=True)
class PatchSelection:
    """Result of :func:`select_patches`.

    Attributes
    ----------
    samples
        Every selected patch as a point at the centre of its reference pixel, in
        row-major grid order, with fields ``id`` (0, 1, 2…) and, when a label image was
        given, ``class`` (its value at the reference pixel).
    groups
        Group of each point: 0 train, 1 valid, 2 test (:data:`GROUPS`).
    starts
        ``(cols, rows)``: first column / row of each selected patch.
    psize
        Patch size ``(x, y)`` in pixels.
    grid
        Grid of the reference raster.
    n_candidates
        Grid positions whose patch lies inside the raster.
    n_invalid
        Candidates dropped for nodata / mask pixels in their window, or for a reference
        pixel without class.
    """

    samples: Samples
    groups: np.ndarray
    starts: tuple[np.ndarray, np.ndarray]
    psize: tuple[int, int]
    grid: Grid
    n_candidates: int
    n_invalid: int

    def __len__(self) -> int:
        return len(self.samples)

    def group(self, group: int | str) -> Samples:
        """The points of one group (index or name ``"train"``, ``"valid"``, ``"test"``)."""
        index = GROUPS.index(group) if isinstance(group, str) else int(group)
        return self.samples.subset(self.groups == index)

    def counts(self) -> dict[str, int]:
        """Number of points per group name."""
        return {name: int((self.groups == i).sum()) for i, name in enumerate(GROUPS)}

    def write(self, train: PathLike | None, valid: PathLike | None = None,
              test: PathLike | None = None) -> dict[str, Path]:
        """Write each group to its vector file; groups without a file are logged and skipped.

        Returns ``{group name: path}`` (``train``, ``valid``, ``test``) of the files
        written. Raises :class:`~terrapatch.errors.NoSamplesError` when a file is given
        for a group that received no point.
        """
        targets = dict(zip(GROUPS, (train, valid, test), strict=True))
        for index, (key, path) in enumerate(targets.items()):
            if path is None:
                continue
            check_writable(path, key)
            if not (self.groups == index).any():
                raise NoSamplesError(
                    f"{key}: no patch was assigned to group {GROUPS[index]} "
                    f"({len(self)} patches selected in all: {self.counts()})"
                )
        written: dict[str, Path] = {}
        with output_group() as stage:  # all group files appear together, or none
            for index, (key, path) in enumerate(targets.items()):
                points = self.group(index)
                if path is None:
                    if len(points):
                        logger.info("grid selection: %d points of group %s not written "
                                    "(%s=None)", len(points), key, key)
                    continue
                points.write(stage(path, key), key, layer=Path(path).stem)
                written[key] = Path(path)
        return written


@dataclass(frozen=True)
class PolygonStatistics:
    """Pixel counts of polygons rasterised on a raster grid (pixel-centre rule).

    Attributes
    ----------
    per_class
        Class code → number of pixels whose centre falls in a polygon of that class
        (every class of the file, 0 included).
    per_polygon
        Pixels per polygon, in feature order (a pixel covered by overlapping polygons
        counts for the last one, as GDAL burns them).
    polygon_classes
        Class code of each polygon.
    class_names
        Class code → name for string class fields; None for numeric fields.
    field
        The class field.
    n_skipped
        Features skipped (no geometry, or a null class value).
    """

    per_class: dict[int, int]
    per_polygon: np.ndarray
    polygon_classes: np.ndarray
    class_names: dict[int, str] | None
    field: str
    n_skipped: int = 0

    def class_key(self, code: int) -> str:
        """The class as written in files: its name for string fields, else its code."""
        if self.class_names is not None:
            return self.class_names[code]
        return str(code)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``samplesPerClass``, ``samplesPerVector`` (+ ``classNames``)."""
        out: dict[str, Any] = {
            "field": self.field,
            "samplesPerClass": {str(c): int(n) for c, n in sorted(self.per_class.items())},
            "samplesPerVector": {str(i): int(n) for i, n in enumerate(self.per_polygon) if n},
            "skippedFeatures": self.n_skipped,
        }
        if self.class_names is not None:
            out["classNames"] = {str(c): name for c, name in sorted(self.class_names.items())}
        return out

    def write(self, path: PathLike, parameter: str = "out") -> Path:
        """Write JSON, or OTB's statistics XML when ``path`` ends with ``.xml``."""
        target = Path(path)
        with atomic_output(target, parameter) as tmp:
            if target.suffix.lower() == ".xml":
                _write_statistics_xml(tmp, self)
            else:
                tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target


@dataclass(frozen=True)
class PolygonSamples:
    """Result of :func:`sample_polygons`.

    Attributes
    ----------
    samples
        The points, with fields ``class`` (integer code), ``id`` (0, 1, 2…), ``polygon``
        (index of the polygon in feature order) and, for string class fields,
        ``class_name``.
    statistics
        The polygon statistics the draw was based on.
    quotas
        Class code → number of points drawn.
    """

    samples: Samples
    statistics: PolygonStatistics
    quotas: dict[int, int]

    @property
    def class_names(self) -> dict[int, str] | None:
        """Class code → name for string class fields (None for numeric fields)."""
        return self.statistics.class_names

    def write(self, path: PathLike, parameter: str = "out",
              class_map: PathLike | None = None) -> dict[str, Path]:
        """Write the points and, for string class fields, the code → name map as JSON.

        The map goes to ``class_map``, by default beside the points as
        ``<stem>.classes.json``. Returns ``{parameter: path}`` and, when a map is
        written, ``{"class_map": its path}``.
        """
        written = {parameter: Path(path)}
        with output_group() as stage:  # points and class map appear together, or neither
            self.samples.write(stage(path, parameter), parameter, layer=Path(path).stem)
            if self.class_names is not None:
                target = Path(class_map) if class_map is not None else \
                    Path(path).with_suffix(".classes.json")
                write_class_map(stage(target, "class_map"), self.class_names,
                                self.statistics.field, "class_map")
                written["class_map"] = target
        return written


def write_class_map(path: PathLike, class_names: Mapping[int, str], field_name: str,
                    parameter: str = "class_map") -> Path:
    """Write a class code → name map as JSON (``{"field": ..., "classes": {code: name}}``)."""
    target = Path(path)
    payload = {"field": field_name,
               "classes": {str(c): n for c, n in sorted(class_names.items())}}
    with atomic_output(target, parameter) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    logger.info("class codes of field %r written to %s", field_name, target)
    return target


def _write_statistics_xml(path: Path, stats: PolygonStatistics) -> None:
    """Write OTB's statistics XML: ``GeneralStatistics`` / ``Statistic`` / ``StatisticMap``."""
    root = ET.Element("GeneralStatistics")
    per_class = ET.SubElement(root, "Statistic", name="samplesPerClass")
    for code, n in sorted(stats.per_class.items()):
        if n:
            ET.SubElement(per_class, "StatisticMap", key=stats.class_key(code), value=str(n))
    per_vector = ET.SubElement(root, "Statistic", name="samplesPerVector")
    for i, n in enumerate(stats.per_polygon.tolist()):
        if n:
            ET.SubElement(per_vector, "StatisticMap", key=str(i), value=str(n))
    ET.indent(root, space="    ")
    text = '<?xml version="1.0" ?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    path.write_text(text, encoding="utf-8")

