"""One output tile: read its inputs from every source, run the model, assemble its pixels.

:class:`TileRunner` is the unit every driver shares. A tile is computed by a pure
function of the tile (:meth:`TileRunner.__call__`), so tiles can be distributed;
the local pipeline calls its two stages, :meth:`TileRunner.read` (in a reader
thread) and :meth:`TileRunner.infer` (in the model thread), separately. Every
window comes from the layout (:meth:`~terrapatch.geometry.Layout.tile_regions`
for what a tile reads, :meth:`~terrapatch.geometry.Layout.tile_starts` for the
patches cut out of it); this module computes none on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from terrapatch.engines import Engine, load_engine
from terrapatch.errors import ModelError
from terrapatch.geometry import Layout
from terrapatch.raster import Source, SourceReader, nodata_mask, patches_from_region
from terrapatch.serve.layouts import with_layout
from terrapatch.serve.transforms import Argmax, normalize
from terrapatch.tiling import Tile

__all__ = ["ServeStats", "TileRunner", "all_nodata"]


@dataclass
class ServeStats:
    """Seconds spent reading, in the model and writing (summed over threads), tiles skipped."""

    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` (or a count) to the field ``name``, thread-safely."""
        with self.lock:
            setattr(self, name, getattr(self, name) + seconds)


class TileRunner:
    """Compute output tiles: read a tile's inputs, run the model, return its pixels.

    A tile is computed by a pure function of the tile (:meth:`__call__`), so tiles can
    be distributed; the serving pipeline calls the two stages, :meth:`read` (in a
    reader thread) and :meth:`infer` (in the model thread), separately.

    Parameters
    ----------
    sources
        The sources, source 1 first.
    layout
        The layout giving every window.
    input_names
        Model input fed by each source.
    input_dtypes
        Dtype of each model input (inputs are converted while reading).
    output_names
        Model outputs, stacked as bands in this order.
    channels
        Channels of each output.
    fullyconv
        Fully-convolutional mode (else patch-based).
    user_inputs
        Extra constant model inputs.
    model
        Path of the model, used by :meth:`__call__` to open an engine where none is given.
    model_layout
        ``"nhwc"`` or ``"nchw"``: the layout of the model's image tensors (engines this
        runner opens are wrapped to take channels-last tensors, see :meth:`adapt`).
    normalizations
        Per source, ``(a, b)`` per band (the model gets ``x · a + b``) or None.
    argmax
        Class index (and threshold) applied to each output, or None: raw outputs.
    pad
        How windows reaching past a source's edges are filled (full coverage):
        ``"reflect"``, a constant, or None (windows stay inside the sources).
    device
        Where engines this runner opens run: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Attributes
    ----------
    engine_wrappers
        Picklable callables ``engine → engine`` applied, in order, after the layout by
        :meth:`adapt` to every engine this runner opens (here or on a Dask worker),
        e.g. a classical classifier over a model's deep features. Empty by default.
    """

    def __init__(self, sources: Sequence[Source], layout: Layout, input_names: Sequence[str],
                 input_dtypes: Sequence[np.dtype], output_names: Sequence[str],
                 channels: Sequence[int], fullyconv: bool,
                 user_inputs: Mapping[str, np.ndarray] | None = None,
                 model: str | None = None, model_layout: str = "nhwc",
                 normalizations: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None,
                 argmax: Argmax | None = None, pad: str | float | None = None,
                 device: str = "auto") -> None:
        self.sources = list(sources)
        self.layout = layout
        self.input_names = list(input_names)
        self.input_dtypes = [np.dtype(d) for d in input_dtypes]
        self.output_names = list(output_names)
        self.channels = list(channels)
        self.fullyconv = fullyconv
        self.user_inputs = dict(user_inputs or {})
        self.model = model
        self.model_layout = model_layout
        self.normalizations = list(normalizations or [None] * len(self.sources))
        self.argmax = argmax
        self.pad = pad
        self.device = device
        self.engine_wrappers: list[Callable[[Engine], Engine]] = []
        self._local = threading.local()

    @property
    def bands(self) -> int:
        """Number of output bands (one per output after an argmax)."""
        return len(self.channels) if self.argmax is not None else sum(self.channels)

    def adapt(self, engine: Engine) -> Engine:
        """``engine`` seen with channels-last tensors, then through :attr:`engine_wrappers`."""
        engine = with_layout(engine, self.model_layout)
        for wrap in self.engine_wrappers:
            engine = wrap(engine)
        return engine

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ stages

    def open_readers(self) -> list[SourceReader]:
        """Open one reader per source (for the calling thread)."""
        return [s.open() for s in self.sources]

    def read(self, readers: Sequence[SourceReader], tile: Tile) -> dict[str, np.ndarray] | None:
        """Read a tile's model inputs; None when a source's input is entirely nodata.

        Fully-convolutional: one ``(1, rows, cols, bands)`` tensor per source holding
        the tile's region. Patch-based: ``(n, ry, rx, bands)`` patches, one per output
        pixel (row-major), cut as strided views of the region.
        """
        col, row, width, height = tile.window
        regions = self.layout.tile_regions(col, row, width, height)
        feed: dict[str, np.ndarray] = {}
        for i, (source, reader, region) in enumerate(zip(self.sources, readers, regions,
                                                         strict=True)):
            dtype = self.input_dtypes[i]
            coefficients = self.normalizations[i]
            if self.fullyconv:
                # (rows, cols, bands)
                pixels = reader.read(region, interleave="pixel", pad=self.pad)
                if all_nodata(pixels, source.nodata):
                    return None
                # One contiguous cast (none when the types match), then a batch axis (a view).
                if coefficients is not None:
                    tensor = normalize(pixels, coefficients, -1, dtype)
                else:
                    tensor = pixels if pixels.dtype == dtype else pixels.astype(dtype)
                feed[self.input_names[i]] = tensor[None]
                continue
            data = reader.read(region, pad=self.pad)  # (bands, rows, cols)
            cols, rows = self.layout.tile_starts(col, row, width, height, i)
            rx, ry = self.layout.fields[i]
            covered = (np.all(np.diff(cols) <= rx) and np.all(np.diff(rows) <= ry))
            if covered and all_nodata(data, source.nodata):
                return None
            rr, cc = np.meshgrid(rows - int(region.row_off), cols - int(region.col_off),
                                 indexing="ij")
            if coefficients is not None:
                region_cast = normalize(data, coefficients, 0, dtype)
            else:
                region_cast = data if data.dtype == dtype else data.astype(dtype)
            patches = patches_from_region(region_cast, cc.ravel(), rr.ravel(), (rx, ry))
            if not covered and source.nodata is not None:
                raw = patches_from_region(data, cc.ravel(), rr.ravel(), (rx, ry))
                if all_nodata(raw, source.nodata):
                    return None
            feed[self.input_names[i]] = patches
        feed.update(self.user_inputs)
        return feed

    def infer(self, engine: Engine, tile: Tile, feed: Mapping[str, np.ndarray],
              stats: ServeStats | None = None) -> np.ndarray:
        """Run the model on a tile's inputs; return the target pixels ``(rows, cols, bands)``."""
        start = time.perf_counter()
        result = engine.run(feed, self.output_names)
        if stats is not None:
            stats.add("compute", time.perf_counter() - start)
        return self.assemble(tile, result)

    def infer_batch(self, engine: Engine, tiles: Sequence[Tile],
                    feeds: Sequence[Mapping[str, np.ndarray] | None],
                    stats: ServeStats | None = None) -> list[np.ndarray | None]:
        """Run the model once on several fully-convolutional tiles of one size.

        The tiles' tensors are stacked on the batch axis (user inputs are shared); the
        tiles skipped for nodata (None feeds) give None. Tiles whose tensors differ in
        size, and models whose outputs are not image batches, are run one by one.
        """
        ready = [(t, f) for t, f in zip(tiles, feeds, strict=True) if f is not None]
        if stats is not None:
            stats.add("skipped", len(tiles) - len(ready))
        values: dict[int, np.ndarray] = {}
        shapes = {tuple(f[n].shape for n in self.input_names) for _, f in ready}
        if len(ready) > 1 and len(shapes) == 1 and self.fullyconv:
            stacked = dict(ready[0][1])
            for name in self.input_names:
                stacked[name] = np.concatenate([f[name] for _, f in ready], axis=0)
            start = time.perf_counter()
            result = engine.run(stacked, self.output_names)
            if stats is not None:
                stats.add("compute", time.perf_counter() - start)
            if all(np.ndim(v) == 4 and np.shape(v)[0] == len(ready) for v in result.values()):
                for j, (tile, _) in enumerate(ready):
                    values[id(tile)] = self.assemble(
                        tile, {k: v[j:j + 1] for k, v in result.items()})
        for tile, feed in ready:
            if id(tile) not in values:
                values[id(tile)] = self.infer(engine, tile, feed, stats)
        return [values.get(id(t)) for t in tiles]

    def assemble(self, tile: Tile, result: Mapping[str, np.ndarray]) -> np.ndarray:
        """Reshape the model outputs of a tile to ``(rows, cols, bands)`` of its target."""
        _, _, width, height = tile.window
        parts = []
        for name, channels in zip(self.output_names, self.channels, strict=True):
            array = np.asarray(result[name])
            expected = width * height * channels
            if array.size != expected or (array.ndim in (3, 4) and self.fullyconv
                                          and array.shape[1:3] != (height, width)):
                mode = "fully-convolutional" if self.fullyconv else "patch-based"
                raise ModelError(
                    f"output_names: output {name!r} has shape {tuple(array.shape)} for a "
                    f"{width}×{height}-pixel tile in {mode} mode; expected {expected} values "
                    f"({height}×{width}×{channels})"
                )
            scores = array.reshape(height, width, channels)
            parts.append(scores if self.argmax is None else self.argmax(scores))
        stacked = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        tc, tr, tw, th = tile.target
        wc, wr = tile.window[0], tile.window[1]
        return stacked[tr - wr:tr - wr + th, tc - wc:tc - wc + tw]

    # ------------------------------------------------------------------ task

    def __call__(self, tile: Tile, engine: Engine | None = None) -> np.ndarray | None:
        """Compute one tile (pure function of the tile); None when skipped for nodata."""
        local = self._local
        if getattr(local, "readers", None) is None:
            local.readers = self.open_readers()
        if engine is None:
            if getattr(local, "engine", None) is None:
                if self.model is None:
                    raise ModelError("TileRunner: no engine given and no model path to open")
                local.engine = self.adapt(load_engine(self.model, device=self.device))
            engine = local.engine
        feed = self.read(local.readers, tile)
        if feed is None:
            return None
        return self.infer(engine, tile, feed)

    def close(self) -> None:
        """Close the readers opened by :meth:`__call__` in the calling thread."""
        for reader in getattr(self._local, "readers", None) or []:
            reader.close()
        self._local.readers = None


def all_nodata(data: np.ndarray, nodata: float | None) -> bool:
    """Whether every value of ``data`` is ``nodata`` (never when nodata is None)."""
    if nodata is None or data.size == 0:
        return False
    return bool(nodata_mask(data, nodata).all())
