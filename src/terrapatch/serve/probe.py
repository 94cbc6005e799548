"""Model geometry: derive receptive fields and expression field from a model, and check them.

A model's geometry, as served, is one receptive field per source and one
expression field (:class:`ModelGeometry`). When the user gives none, it is
derived by probing: the model runs on zero inputs whose sizes keep the ratio of
the source spacings, and the smallest sizes and increments it accepts give the
fields (:func:`derive_geometry`). Given values are checked on the smallest
tiles (:func:`check_geometry`); a mismatch is an error that states the expected
and actual shapes and suggests consistent values derived from the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import product

import numpy as np

from terrapatch.engines import Engine, ModelRunError
from terrapatch.errors import ModelError
from terrapatch.geometry import Grid, Layout, ServingSteps, serving_steps, spcscale_hint
from terrapatch.raster import Source
from terrapatch.scales import format_scale

__all__ = [
    "ModelGeometry",
    "Prober",
    "check_geometry",
    "derive_geometry",
    "efield_for_fields",
    "measure_halo",
    "output_channels",
    "probe_tile",
]


@dataclass(frozen=True)
class ModelGeometry:
    """Receptive field per source and expression field, as served.

    Attributes
    ----------
    fields
        ``(rx, ry)`` per source, in the source's pixels.
    efield
        ``(ex, ey)`` output pixels per input window.
    spcscale
        Output spacing in source-1 pixels: an integer, or ``1/k`` (a Fraction) for
        super-resolution.
    """

    fields: tuple[tuple[int, int], ...]
    efield: tuple[int, int]
    spcscale: int | Fraction

    def describe(self, names: Sequence[str]) -> str:
        """As keyword arguments: ``source1.patch_size=(8, 8), ..., efield=(1, 1), spcscale=1``.

        Neutral identifiers, which a facade respells (:mod:`terrapatch.spelling`).
        """
        parts = [f"{n}.patch_size=({rx}, {ry})" for n, (rx, ry) in zip(names, self.fields,
                                                                       strict=True)]
        parts.append(f"efield=({self.efield[0]}, {self.efield[1]})")
        parts.append(f"spcscale={format_scale(self.spcscale)}")
        return ", ".join(parts)


class Prober:
    """Run the model on zero inputs of given sizes; return the output's spatial size."""

    def __init__(self, engine: Engine, names: Sequence[str], bands: Sequence[int],
                 outputs: Sequence[str], extra: Mapping[str, np.ndarray]) -> None:
        self.engine = engine
        self.names = list(names)
        self.bands = list(bands)
        self.outputs = list(outputs)
        self.extra = dict(extra)
        self.cache: dict[tuple[tuple[int, int], ...], tuple[int, int] | None] = {}
        self.last_shapes: dict[str, tuple[int, ...]] = {}
        self.last_error = ""
        self.calls = 0

    def feed(self, sizes: Sequence[tuple[int, int]], batch: int = 1) -> dict[str, np.ndarray]:
        """Zero inputs of the given ``(width, height)`` per source, plus the user inputs."""
        feed = {n: np.zeros((batch, h, w, b), dtype=self.engine.inputs[n].dtype)
                for n, b, (w, h) in zip(self.names, self.bands, sizes, strict=True)}
        feed.update(self.extra)
        return feed

    def __call__(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        """The output's ``(width, height)`` for inputs of these sizes; None if it fails."""
        key = tuple((int(w), int(h)) for w, h in sizes)
        if key in self.cache:
            return self.cache[key]
        result: tuple[int, int] | None = None
        self.last_shapes, self.last_error = {}, ""
        if all(w >= 1 and h >= 1 for w, h in key):
            self.calls += 1
            try:
                out = self.engine.run(self.feed(key), self.outputs)
            except ModelError as exc:
                self.last_error = str(exc)
            else:
                self.last_shapes = {k: tuple(v.shape) for k, v in out.items()}
                spatial = {_spatial_size(v) for v in out.values()}
                if len(spatial) == 1:
                    result = spatial.pop()
                    if result is not None and (result[0] < 1 or result[1] < 1):
                        result = None
        self.cache[key] = result
        return result


def _spatial_size(array: np.ndarray) -> tuple[int, int] | None:
    """``(width, height)`` of a batch-1 output; flattened outputs are assumed square."""
    shape = array.shape
    if array.ndim in (3, 4):
        return (int(shape[2]), int(shape[1]))
    if array.ndim in (1, 2):
        side = math.isqrt(int(shape[0]))
        return (side, side) if side * side == shape[0] else None
    return None


def output_channels(array: np.ndarray) -> int:
    """Channels of an output as OTBTF counts them: last dim for ranks 2 and 4, else 1."""
    return int(array.shape[-1]) if array.ndim in (2, 4) else 1


def _offsets(count: int, radius: int) -> Iterator[tuple[int, ...]]:
    """Integer vectors of length ``count`` by increasing max-norm, then 1-norm."""
    if count == 0:
        yield ()
        return
    vectors = sorted(product(range(-radius, radius + 1), repeat=count),
                     key=lambda v: (max(abs(x) for x in v), sum(abs(x) for x in v)))
    yield from vectors


class _NoGeometry(Exception):
    """Derivation failed; the message says why."""


def _derive(prober: Prober, steps: ServingSteps,
            static: Sequence[tuple[int | None, int | None]], fullyconv: bool,
            spcscale: int | Fraction) -> ModelGeometry:
    strides = steps.sources
    qx, qy = steps.outputs
    n = len(strides)
    if all(w is not None and h is not None for w, h in static):
        sizes = [(int(w), int(h)) for w, h in static]  # type: ignore[arg-type]
        m = prober(sizes)
        if m is None:
            raise _NoGeometry(f"the model fails on its own static input sizes {sizes}")
        if not fullyconv and m != (1, 1):
            raise _NoGeometry(f"the model emits {m[0]}×{m[1]} pixels per patch, not one")
        return ModelGeometry(tuple(sizes), (1, 1) if not fullyconv else m, spcscale)

    found = None
    radius = {1: 0, 2: 12}.get(n, 4)
    for base in (64, 160):
        for offs in _offsets(n - 1, radius):
            t = [base, *[base + o for o in offs]]
            sizes = [(dx * ti, dy * ti) for (dx, dy), ti in zip(strides, t, strict=True)]
            m0 = prober(sizes)
            if m0 is not None:
                found = (sizes, m0)
                break
        if found:
            break
    if found is None:
        raise _NoGeometry(
            "no input sizes in the ratio of the source spacings give an output "
            f"(last error: {prober.last_error or 'none'})"
        )
    sizes, m0 = found
    # Smallest input sizes still giving m0: the receptive field for m0 outputs.
    minimal: list[tuple[int, int]] = list(sizes)
    for i in range(n):
        for dim in (0, 1):
            for _ in range(strides[i][dim] - 1):
                w, h = minimal[i]
                smaller = (w - 1, h) if dim == 0 else (w, h - 1)
                if prober([*minimal[:i], smaller, *minimal[i + 1:]]) == m0:
                    minimal[i] = smaller
                else:
                    break
    # Expression field: smallest output increment the model accepts, in serving units
    # (one unit of input per source gives q output pixels).
    efield = None
    for j in range(1, 65):
        trial = [(w + dx * j, h + dy * j) for (w, h), (dx, dy) in zip(minimal, strides,
                                                                        strict=True)]
        grown = prober(trial)
        if grown == (m0[0] + qx * j, m0[1] + qy * j):
            efield = (qx * j, qy * j)
            break
        if grown is not None and grown != m0 and steps.outputs == (1, 1):
            ratio = Fraction(grown[0] - m0[0], j)
            if ratio.denominator == 1 and ratio > 1:
                raise _NoGeometry(
                    f"the model emits {ratio} output pixels per input pixel, finer than "
                    f"spcscale={format_scale(spcscale)} (a super-resolution model? try "
                    f"spcscale={format_scale(Fraction(spcscale) / ratio)})")
    if efield is None:
        raise _NoGeometry("the model accepts no larger input in the ratio of the spacings")
    if not fullyconv:
        efield = (1, 1)
    fields = []
    for (w, h), (dx, dy) in zip(minimal, strides, strict=True):
        span = [(m0[0] - efield[0]) * dx, (m0[1] - efield[1]) * dy]
        if span[0] % qx or span[1] % qy:
            raise _NoGeometry("the model's output does not fall on whole source pixels")
        rx, ry = w - span[0] // qx, h - span[1] // qy
        if rx < 1 or ry < 1:
            raise _NoGeometry("the model's output is larger than its input allows")
        fields.append((rx, ry))
    if not fullyconv and prober(fields) != (1, 1):
        raise _NoGeometry(
            f"patches of {[f'{rx}×{ry}' for rx, ry in fields]} pixels do not give one output "
            "pixel each (is the model fully convolutional only?)"
        )
    return ModelGeometry(tuple(fields), efield, spcscale)


def derive_geometry(engine: Engine, sources: Sequence[Source], input_names: Sequence[str],
                    output_names: Sequence[str], fullyconv: bool,
                    spcscale: int | Fraction = 1,
                    user_inputs: Mapping[str, np.ndarray] | None = None) -> ModelGeometry:
    """Derive receptive fields and expression field from the model.

    The model is run on zero inputs whose sizes keep the ratio of the source
    spacings (source ``i`` gets ``spcscale · s1 / s_i`` pixels per output pixel, in
    whole serving units: :func:`~terrapatch.geometry.serving_steps`); the smallest
    sizes that give ``m`` output pixels, and the smallest output increment the model
    accepts, give ``rf_i`` and the expression field (``k·j`` output pixels for a
    super-resolution model at ``spcscale = 1/k``). Patch-based models with
    a static input size use it. Rows and columns are assumed to behave alike.

    Raises
    ------
    ModelError
        If no consistent geometry is found; the message says what was tried.
    """
    grids = [s.grid for s in sources]
    steps = serving_steps(grids, spcscale, fullyconv)
    names = [s.name for s in sources]
    if steps is None:
        spacings = ", ".join(f"{n} {g.spacing[0]:g}" for n, g in zip(names, grids, strict=True))
        raise ModelError(
            f"spcscale: cannot derive receptive fields with "
            f"spcscale={format_scale(spcscale)}: the source spacings ({spacings}) and the "
            f"output spacing {float(spcscale) * grids[0].spacing[0]:g} have no common "
            f"multiple of a few pixels; {spcscale_hint(grids)}"
        )
    prober = Prober(engine, input_names, [s.bands for s in sources], output_names,
                     user_inputs or {})
    static = [_static_hw(engine, n) for n in input_names]
    try:
        return _derive(prober, steps, static, fullyconv, spcscale)
    except _NoGeometry as exc:
        raise ModelError(
            f"model: cannot derive the receptive fields from the model {engine.path} "
            f"with spcscale={format_scale(spcscale)}: {exc}; give sourceK.patch_size "
            "(and efield)"
        ) from None


def _static_hw(engine: Engine, name: str) -> tuple[int | None, int | None]:
    shape = engine.inputs[name].shape
    if shape is None or len(shape) != 4:
        return (None, None)
    return (shape[2], shape[1])


def _suggest(engine: Engine, sources: Sequence[Source], input_names: Sequence[str],
             output_names: Sequence[str], fullyconv: bool, spcscale: int | Fraction,
             user_inputs: Mapping[str, np.ndarray]) -> str:
    """A sentence suggesting consistent rf/ef/spcscale values, derived from the model."""
    names = [s.name for s in sources]
    others = [Fraction(f) for f in (1, 2, 3, 4, 6, 8)] + [Fraction(1, k) for k in (2, 3, 4, 8)]
    scales = [Fraction(spcscale)] + ([f for f in others if f != spcscale] if fullyconv else [])
    for f in scales:
        try:
            geometry = derive_geometry(engine, sources, input_names, output_names, fullyconv,
                                       f, user_inputs)
        except ModelError:
            continue
        return f"the model's geometry suggests {geometry.describe(names)}"
    return "terrapatch could not derive a consistent geometry from the model either"


def efield_for_fields(grids: Sequence[Grid], fields: Sequence[tuple[int, int]],
                       found: ModelGeometry, spcscale: int | Fraction
                       ) -> tuple[int, int] | None:
    """Expression field matching given receptive fields, from a derived geometry.

    The model's context is ``rf - d·e`` for every consistent (rf, e), with ``d`` the
    source pixels per output pixel; None unless all sources agree.
    """
    steps = serving_steps(grids, spcscale, True)
    if steps is None:
        return None
    result = []
    for dim in (0, 1):
        values = set()
        for i, (rf, rf_found) in enumerate(zip(fields, found.fields, strict=True)):
            d = steps.input_per_output(i, dim)
            e = (rf[dim] - rf_found[dim]) / d + found.efield[dim]
            values.add(int(e) if e.denominator == 1 else -1)
        if len(values) != 1 or min(values) < 1:
            return None
        result.append(values.pop())
    return (result[0], result[1])


def _output_ok(array: np.ndarray, channels: int, expected: tuple[int, int]) -> bool:
    """Whether a batch-1 (or one-patch) output covers exactly ``expected`` = (w, h) pixels."""
    ew, eh = expected
    if array.size != ew * eh * channels:
        return False
    if array.ndim in (3, 4):
        return array.shape[0] == 1 and array.shape[1:3] == (eh, ew)
    return True


def probe_tile(engine: Engine, sources: Sequence[Source], layout: Layout,
                input_names: Sequence[str], outputs: Sequence[str], fullyconv: bool,
                user_inputs: Mapping[str, np.ndarray], geometry: ModelGeometry
                ) -> tuple[list[int], str]:
    """Run the model on small tiles (1 and 3 blocks wide); return (channels, problem)."""
    ex, ey = geometry.efield
    prober = Prober(engine, input_names, [s.bands for s in sources], outputs, user_inputs)
    if fullyconv:
        grid = layout.output_grid
        trials = []
        for k in (1, 3):
            w, h = min(k * ex, grid.width), min(k * ey, grid.height)
            regions = layout.tile_regions(0, 0, w, h)
            sizes = [(int(r.width), int(r.height)) for r in regions]
            trials.append((sizes, (w, h), f"a {w}×{h}-pixel output tile (fully-convolutional)"))
    else:
        trials = [(list(geometry.fields), (1, 1), "one patch per source (patch-based)")]
    channels: list[int] = []
    for sizes, expected, what in trials:
        feed = prober.feed(sizes)
        fed = ", ".join(f"{n} {tuple(feed[n].shape)}" for n in input_names)
        unit = "tile" if fullyconv else "patch"
        head = f"for {what} the model was fed {fed} and"
        tail = f"expected {expected[0]}×{expected[1]} output pixel(s) per {unit}"
        try:
            result = engine.run(feed, outputs)
        except ModelRunError as exc:
            return [], f"{head} failed ({exc.detail}); {tail}"
        channels = [output_channels(result[k]) for k in outputs]
        if not all(_output_ok(result[k], c, expected)
                   for k, c in zip(outputs, channels, strict=True)):
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items())
            return channels, f"{head} returned {shapes}; {tail}"
    return channels, ""


def check_geometry(engine: Engine, sources: Sequence[Source], layout: Layout,
                    input_names: Sequence[str], outputs: Sequence[str], fullyconv: bool,
                    user_inputs: Mapping[str, np.ndarray], geometry: ModelGeometry
                    ) -> list[int]:
    """Check the geometry on the smallest tile; return channels per output, or raise."""
    channels, problem = probe_tile(engine, sources, layout, input_names, outputs, fullyconv,
                                    user_inputs, geometry)
    if problem:
        names = [s.name for s in sources]
        hint = _suggest(engine, sources, input_names, outputs, fullyconv, geometry.spcscale,
                        user_inputs)
        raise ModelError(
            f"inconsistent geometry ({geometry.describe(names)}): {problem}; {hint}"
        )
    return channels


#: Largest halo, in output pixels, that :func:`measure_halo` looks for.
HALO_LIMIT = 64


def measure_halo(engine: Engine, input_names: Sequence[str], bands: Sequence[int],
                 outputs: Sequence[str], user_inputs: Mapping[str, np.ndarray],
                 steps: ServingSteps, limit: int = HALO_LIMIT,
                 efield: tuple[int, int] = (1, 1)) -> tuple[int | None, str]:
    """Halo of a same-padded model: how far, in output pixels, one input pixel reaches.

    The model runs on a random tensor, then on copies where the centre pixel of one
    input is changed; the farthest output pixel that changes (beyond float
    round-off) from the centre's position gives the halo. When the change reaches
    the probe's edge, a larger probe follows; if the reach then shrinks, the change
    was spread over the whole probe (global context). Tiles that overlap by the
    halo and crop it equal the model applied to the whole image. Models that
    downsample (expression field ``e > 1``, e.g. a U-Net's pooling) are probed at
    both ends of an ``e``-pixel cell, where their reach differs.

    Returns
    -------
    (halo, problem)
        ``halo`` (None when it could not be measured) and, then, why: the model
        failed on the probe tensors, or the change reached the probe's edge (a
        halo beyond ``limit``, e.g. global pooling or attention).
    """
    prober = Prober(engine, input_names, bands, outputs, user_inputs)
    strides, (qx, qy) = steps.sources, steps.outputs
    rng = np.random.default_rng(0)
    earlier: int | None = None  # the reach of a smaller probe whose edge was reached
    for side in (64, 64 * -(-(2 * limit + 16) // 64)):  # multiples of 64: U-Nets
        sizes = [(side * dx, side * dy) for dx, dy in strides]
        base = prober.feed(sizes)
        for name in input_names:
            base[name] = _random_like(base[name], rng)
        try:
            reference = engine.run(base, outputs)
        except ModelRunError as exc:
            return None, f"the model failed on a {side}×{side}-pixel probe ({exc.detail})"
        halo, reached = 0, False
        for name, (dx, dy) in zip(input_names, strides, strict=True):
            _, h, w, _ = base[name].shape
            spots = {(w // 2, h // 2), (w // 2 + max(1, dx * efield[0] // qx) - 1,
                                        h // 2 + max(1, dy * efield[1] // qy) - 1)}
            for (cx, cy), delta in product(sorted(spots), (1.0, -1.0, 4.0)):
                feed = dict(base)
                changed = base[name].copy()
                changed[0, cy, cx, :] = changed[0, cy, cx, :] + np.asarray(
                    delta, dtype=changed.dtype)
                feed[name] = changed
                result = engine.run(feed, outputs)
                for key in outputs:
                    reach = _reach(reference[key], result[key], cx * qx / dx, cy * qy / dy)
                    if reach is None:
                        continue
                    halo = max(halo, reach[0])
                    reached = reached or reach[1]
        if earlier is not None and halo < earlier:
            # A local halo would reach at least as far on a larger probe: the change was
            # spread over the whole probe (a global mean, attention), diluted below
            # round-off.
            break
        if not reached:
            return halo, ""
        if halo > limit:
            break
        earlier = halo
    return None, (f"a change of one input pixel reached output pixels more than {limit} px "
                  "away (the edge of the probe): the model has global context (pooling, "
                  "attention) or a halo beyond the limit")


def _random_like(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random values of ``array``'s shape and type: standard normal, or 0..100 integers."""
    if np.issubdtype(array.dtype, np.floating):
        return rng.standard_normal(array.shape).astype(array.dtype)
    return rng.integers(0, 100, array.shape).astype(array.dtype)


def _reach(before: np.ndarray, after: np.ndarray, x: float, y: float
           ) -> tuple[int, bool] | None:
    """Farthest changed output pixel from ``(x, y)`` and whether it touches the edge.

    None for outputs that are not image batches ``(1, rows, cols, channels)``.
    """
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.ndim != 4 or a.shape != b.shape:
        return None
    scale = max(float(np.abs(a).max()), 1e-12)
    changed = (np.abs(a - b) > 1e-4 * scale).any(axis=(0, 3))
    rows, cols = np.nonzero(changed)
    if rows.size == 0:
        return 0, False
    h, w = changed.shape
    reach = int(np.ceil(max(np.abs(cols - np.floor(x)).max(), np.abs(rows - np.floor(y)).max())))
    edge = bool(rows.min() == 0 or cols.min() == 0 or rows.max() == h - 1 or cols.max() == w - 1)
    return reach, edge
