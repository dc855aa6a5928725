"""Remaining useful life from a table of capacity checkups: ``mgtwin rul``.

Battery labs and warranty records keep capacity checkups: per cell or pack, the cycle (or
time) of each test and the capacity measured. This module reads such a table (CSV or
Parquet), maps its columns onto ours, fits each series on its first part and forecasts where
its capacity over rated crosses the end-of-life threshold, with P5/P50/P95; where the later
checkups show the crossing, the forecast is scored against it.

The model, per series (``x`` the cycle, or the time in days; ``soh`` the capacity over rated):

* ``soh = h0 - a * x**p_a - b * x**p_b``: BLAST-Lite's calendar plus cycle fade
  (:mod:`twin.chemistry.aging`), both power laws of the cycle count when a lab cycles at a
  steady pace; ``p_a`` from a calendar-like grid (0.5, 0.6, 0.7, or the chemistry's own
  calendar exponent with ``--chemistry``) or absent (one power law), ``p_b`` profiled over
  0.3-2.5 (or ±0.25 around the chemistry's cycle exponent), ``h0``, ``a, b >= 0`` by least
  squares;
* knee-aware: the same plus ``- c * max(0, x - x_k)**2``, a quadratic departure from an onset
  ``x_k`` on the fitted points (the shape of :class:`twin.chemistry.aging.KneeModel`); it is
  kept when it lowers the BIC by more than 10 (a knee that has started within the fitted
  part; a knee that starts later cannot be foreseen from the checkups);
* the bands: a moving-block bootstrap of the chosen model's residuals, each resample also
  dropping a random share (up to 40 %) of the earliest checkups, refit each time with ``p``
  re-profiled; P5/P50/P95 of the crossing. Blocks keep the residuals' correlation and the
  dropped starts show how much the extrapolation depends on the early fade: both are mostly
  the model's own misfit (a calendar plus cycle fade is not one power law), which an i.i.d.
  bootstrap would hide behind bands far too narrow.

Units: the crossing is in the units of the ``cycle`` column, or in days from the ``time_s``
column. The rated capacity is ``--rated-ah``, else each series' first checkup (SoH 1 at the
start).

Errors (:class:`CheckupError`, with "did you mean" for column names): an unknown column or
target name, a value that is not a number, a cycle or time that goes backwards within a
series, a series too short to fit.

Pure numerics apart from :func:`read_checkups` (the file) and the CLI in :mod:`twin.cli`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl
from numpy.typing import NDArray

from twin.chemistry import get_chemistry
from twin.chemistry.aging import get_aging_law
from twin.errors import TwinError

__all__ = [
    "CheckupError",
    "RulOptions",
    "SeriesForecast",
    "checkup_table",
    "forecast_series",
    "parse_mapping",
    "read_checkups",
    "rul_report",
]

F64 = NDArray[np.float64]

#: Our column names a ``--map`` may target.
TARGETS: Final = ("cycle", "time_s", "capacity_ah", "soh", "cell")
_MIN_FIT_POINTS: Final = 4
_DENSO_SQRT: Final = 0.5  # Nmc622_Gr_DENSO50Ah: q_EFC proportional to sqrt(EFC)
#: A knee must lower the BIC by this much ("very strong" evidence, Kass & Raftery 1995): a
#: single power law is only an approximation of a calendar plus cycle fade, and a free knee
#: would otherwise mop up that misfit.
_KNEE_BIC_MARGIN: Final = 10.0


class CheckupError(TwinError):
    """A checkup table that cannot be read as mapped: unknown column, bad value, time going backwards."""


@dataclass(frozen=True, slots=True)
class RulOptions:
    """How to forecast.

    Attributes:
        eol_soh: the end-of-life threshold, capacity over rated.
        fit_fraction: share of each series (by checkups) the model is fitted on.
        rated_ah: rated capacity, Ah; None: each series' first checkup.
        chemistry: a :mod:`twin.chemistry` name whose aging law's cycle exponent constrains ``p``.
        bootstrap: bootstrap resamples.
        seed: the bootstrap's random seed.
        horizon_factor: search the crossing up to this many times the last fitted ``x``.
    """

    eol_soh: float = 0.7
    fit_fraction: float = 0.5
    rated_ah: float | None = None
    chemistry: str | None = None
    bootstrap: int = 400
    seed: int = 0
    horizon_factor: float = 50.0

    def __post_init__(self) -> None:
        """Check ranges.

        Raises:
            CheckupError: a value out of range.
        """
        if not 0.0 < self.eol_soh < 1.0:
            msg = f"--eol must lie in (0, 1), got {self.eol_soh}"
            raise CheckupError(msg)
        if not 0.0 < self.fit_fraction <= 1.0:
            msg = f"--fit-fraction must lie in (0, 1], got {self.fit_fraction}"
            raise CheckupError(msg)
        if self.rated_ah is not None and not self.rated_ah > 0:
            msg = f"--rated-ah must be positive, got {self.rated_ah}"
            raise CheckupError(msg)
        if self.bootstrap < 20:
            msg = "bootstrap needs at least 20 resamples"
            raise CheckupError(msg)


def parse_mapping(text: str) -> dict[str, str]:
    """Parse ``--map`` text: ``target=Source Column`` pairs separated by commas.

    A source column may itself contain commas or ``=``: a new pair starts only at a comma
    followed by one of our target names and ``=``.

    Args:
        text: e.g. ``"cycle=Cycle,capacity_ah=Capacity(Ah),cell=Cell"``.

    Returns:
        Target -> source column.

    Raises:
        CheckupError: an unknown target, a repeated one, or no ``capacity_ah``/``soh`` and
            no ``cycle``/``time_s``.

    Examples:
        >>> parse_mapping("cycle=Cycle,capacity_ah=Capacity(Ah, 25 C),cell=Cell")
        {'cycle': 'Cycle', 'capacity_ah': 'Capacity(Ah, 25 C)', 'cell': 'Cell'}
    """
    pattern = re.compile(r"(?:^|,)\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")
    starts = [m for m in pattern.finditer(text) if m.group(1) in TARGETS or m.start() == 0]
    if not starts:
        msg = f"--map {text!r}: expected target=Column pairs, e.g. cycle=Cycle,capacity_ah=Capacity"
        raise CheckupError(msg)
    out: dict[str, str] = {}
    for k, m in enumerate(starts):
        target = m.group(1)
        end = starts[k + 1].start() if k + 1 < len(starts) else len(text)
        source = text[m.end() : end].strip()
        if target not in TARGETS:
            close = difflib.get_close_matches(target, TARGETS, n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            msg = f"--map: unknown target {target!r}{hint} (targets: {', '.join(TARGETS)})"
            raise CheckupError(msg)
        if target in out:
            msg = f"--map: {target!r} is mapped twice"
            raise CheckupError(msg)
        if not source:
            msg = f"--map: {target!r} has no source column"
            raise CheckupError(msg)
        out[target] = source
    if "capacity_ah" not in out and "soh" not in out:
        msg = "--map must map capacity_ah (or soh)"
        raise CheckupError(msg)
    if "cycle" not in out and "time_s" not in out:
        msg = "--map must map cycle (or time_s)"
        raise CheckupError(msg)
    return out


def read_checkups(path: Path) -> pl.DataFrame:
    """Read a checkup table from CSV or Parquet (by extension; anything else is read as CSV).

    Raises:
        CheckupError: the file is missing or unreadable.
    """
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema=False)  # every column as text: values are parsed and checked here
    except (OSError, pl.exceptions.PolarsError) as exc:
        msg = f"cannot read {path}: {exc}"
        raise CheckupError(msg) from exc


def checkup_table(raw: pl.DataFrame, mapping: Mapping[str, str], options: RulOptions) -> pl.DataFrame:
    """Map, parse and check a raw checkup table: columns ``series``, ``x``, ``soh`` sorted by series.

    ``x`` is the cycle, or days from ``time_s``; ``soh`` is capacity over rated (``--rated-ah``
    or the series' first checkup), or the mapped ``soh``.

    Raises:
        CheckupError: an unknown column (with close names), a value that is not a number, a
            cycle or time going backwards within a series.
    """
    for target, source in mapping.items():
        if source not in raw.columns:
            close = difflib.get_close_matches(source, raw.columns, n=3, cutoff=0.4)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            msg = f"column {source!r} (for {target}) is not in the file{hint} (columns: {', '.join(raw.columns)})"
            raise CheckupError(msg)
    x_target = "cycle" if "cycle" in mapping else "time_s"
    y_target = "capacity_ah" if "capacity_ah" in mapping else "soh"
    frame = raw.with_row_index("_row").select(
        "_row",
        (pl.col(mapping["cell"]).cast(pl.String) if "cell" in mapping else pl.lit("all")).alias("series"),
        pl.col(mapping[x_target]).alias("_x_raw"),
        pl.col(mapping[y_target]).alias("_y_raw"),
    )
    for raw_col, target in (("_x_raw", x_target), ("_y_raw", y_target)):
        text = frame.get_column(raw_col).cast(pl.String).str.strip_chars()
        parsed = text.cast(pl.Float64, strict=False)
        bad = (parsed.is_null() | ~parsed.is_finite()) & text.is_not_null() & (text != "")
        missing = text.is_null() | (text == "")
        if bad.any() or missing.any():
            where = int(frame.get_column("_row").filter(bad | missing)[0])
            value = text.filter(bad | missing)[0]
            msg = (
                f"column {mapping[target]!r} (for {target}): {value!r} in data row {where + 1} is not a number"
                if value
                else f"column {mapping[target]!r} (for {target}): data row {where + 1} is empty"
            )
            raise CheckupError(msg)
        frame = frame.with_columns(parsed.alias(raw_col))
    scale = 1.0 / 86_400.0 if x_target == "time_s" else 1.0
    frame = frame.with_columns((pl.col("_x_raw") * scale).alias("x"), pl.col("_y_raw").alias("y"))
    backwards = frame.with_columns(pl.col("x").diff().over("series").alias("_dx")).filter(pl.col("_dx") < 0)
    if backwards.height:
        row = backwards.row(0, named=True)
        msg = (
            f"column {mapping[x_target]!r} (for {x_target}) goes backwards in series {row['series']!r} at data "
            f"row {int(row['_row']) + 1}: the checkups of a series must be in increasing order"
        )
        raise CheckupError(msg)
    if y_target == "capacity_ah":
        rated = pl.lit(options.rated_ah) if options.rated_ah is not None else pl.col("y").first().over("series")
        frame = frame.with_columns((pl.col("y") / rated).alias("soh"))
    else:
        frame = frame.with_columns(pl.col("y").alias("soh"))
    return frame.select("series", "x", "soh", pl.col("_row").alias("row"))


def _exponent_grid(options: RulOptions) -> F64:
    """Exponent pairs ``(p_a, p_b)``: a calendar-like and a cycle-like power (``p_a = p_b``: one power law).

    BLAST-Lite's fade is a calendar term in time plus a cycle term in EFC, both power laws; in a
    checkup table cycled at a steady pace both are powers of the cycle count, and their sum's
    local exponent drifts, which one power law cannot follow.
    """
    if options.chemistry is None:
        cal = np.array([0.5, 0.6, 0.7])
        cyc = np.linspace(0.3, 2.5, 45)
    else:
        law = get_aging_law(get_chemistry(options.chemistry).aging_model)
        p = next(
            (float(getattr(law, a)) for a in ("p_cyc", "pcyc", "qcyc_p", "q4", "q6") if hasattr(law, a)), _DENSO_SQRT
        )
        pc = next((float(getattr(law, a)) for a in ("p_cal", "pcal", "qcal_p", "q2") if hasattr(law, a)), _DENSO_SQRT)
        cal = np.array([pc])
        cyc = np.linspace(max(p - 0.25, 0.1), p + 0.25, 21)
    pairs = [(a, b) for a in cal for b in cyc] + [(b, b) for b in cyc]
    return np.array(pairs, dtype=np.float64)


def _fit(x: F64, y: F64, grid: F64, onset: float | None, weights: F64 | None = None) -> tuple[F64, F64, F64]:
    """Weighted least squares of ``y = h0 - a x**p_a - b x**p_b [- c max(0, x - onset)**2]``.

    For every exponent pair of ``grid`` (P, 2) and every row of ``y`` and ``weights`` (B, n);
    returns the coefficients (B, P, k), the weighted SSE (B, P; inf where a fade coefficient
    comes out negative, outside the model) and the design (P, n, k). ``x`` is scaled by its
    maximum, so are the coefficients.
    """
    w = np.ones_like(y) if weights is None else weights
    xs = x / max(float(x.max()), 1e-12)
    single = grid[:, 0] == grid[:, 1]
    cols = [
        np.ones((grid.shape[0], x.size)),
        np.where(single[:, None], 0.0, -(xs[None, :] ** grid[:, 0:1])),
        -(xs[None, :] ** grid[:, 1:2]),
    ]
    if onset is not None:
        k = onset / max(float(x.max()), 1e-12)
        cols.append(np.broadcast_to(-(np.maximum(xs - k, 0.0) ** 2), (grid.shape[0], x.size)))
    design = np.stack(cols, axis=-1)  # (P, n, k)
    gram = np.einsum("pnk,bn,pnl->bpkl", design, w, design) + np.eye(design.shape[-1]) * 1e-10
    rhs = np.einsum("pnk,bn->bpk", design, w * y)
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (B, P, k)
    fitted = np.einsum("pnk,bpk->bpn", design, coef)
    sse = np.sum(w[:, None, :] * (y[:, None, :] - fitted) ** 2, axis=-1)
    sse = np.where(np.any(coef[..., 1:] < -1e-12, axis=-1), np.inf, sse)
    return coef, sse, design


def _model(coef: F64, p: F64, onset: float | None, xs: F64, x_max: float) -> F64:
    """The fitted model at scaled ``xs`` for each row of ``coef`` (B, k) and exponent pair ``p`` (B, 2)."""
    single = (p[:, 0] == p[:, 1])[:, None]
    out: F64 = (
        coef[:, 0:1]
        - np.where(single, 0.0, coef[:, 1:2] * xs[None, :] ** p[:, 0:1])
        - coef[:, 2:3] * xs[None, :] ** p[:, 1:2]
    )
    if onset is not None:
        k = onset / max(x_max, 1e-12)
        out = out - coef[:, 3:4] * np.maximum(xs[None, :] - k, 0.0) ** 2
    return out


def _crossing(coef: F64, p: F64, onset: float | None, x_max: float, start: float, eol: float, horizon: float) -> F64:
    """First ``x >= start`` where the fitted model falls to ``eol`` (inf: not within ``horizon * x_max``)."""
    grid = np.concatenate([np.linspace(start, x_max * 2.0, 400), np.geomspace(x_max * 2.0, x_max * horizon, 400)[1:]])
    model = _model(coef, p, onset, grid / max(x_max, 1e-12), x_max)
    below = model <= eol
    first = np.argmax(below, axis=1)
    hit = below[np.arange(first.size), first]
    lo = np.maximum(first - 1, 0)
    rows = np.arange(first.size)
    y0, y1 = model[rows, lo], model[rows, first]
    frac = np.clip((y0 - eol) / np.where(y0 > y1, y0 - y1, 1.0), 0.0, 1.0)
    at = grid[lo] + frac * (grid[first] - grid[lo])
    out: F64 = np.where(hit, np.where(first == 0, grid[0], at), np.inf)
    return out


@dataclass(frozen=True, slots=True)
class SeriesForecast:
    """The forecast of one series and, where the data show it, the actual crossing.

    Attributes:
        series: the series (cell or pack) id.
        points: checkups in the series.
        fit_points: checkups fitted.
        x_fit_end: ``x`` of the last fitted checkup.
        soh_fit_end: its SoH.
        model: ``"power"`` (one power law), ``"2power"`` (two), either with ``"+knee"``.
        exponent: the fitted (cycle-like) ``p_b``.
        calendar_exponent: the fitted calendar-like ``p_a`` (None: one power law).
        knee_onset: the fitted knee onset (None without a knee).
        eol_p5: 5th percentile of the crossing ``x``.
        eol_p50: median crossing.
        eol_p95: 95th percentile.
        rul_p50: ``eol_p50 - x_fit_end``.
        actual: the crossing the later checkups show (interpolated), None if they do not.
        error: ``eol_p50 - actual``.
        rul_relative_error: ``error / (actual - x_fit_end)``.
        covered: ``actual`` inside [P5, P95].
    """

    series: str
    points: int
    fit_points: int
    x_fit_end: float
    soh_fit_end: float
    model: str
    exponent: float
    calendar_exponent: float | None
    knee_onset: float | None
    eol_p5: float
    eol_p50: float
    eol_p95: float
    rul_p50: float
    actual: float | None
    error: float | None
    rul_relative_error: float | None
    covered: bool | None


def forecast_series(series: str, x: F64, soh: F64, options: RulOptions) -> SeriesForecast:
    """Fit one series on its first part and forecast its end-of-life crossing.

    Args:
        series: its id.
        x: cycles (or days), non-decreasing.
        soh: capacity over rated at each ``x``.
        options: the threshold, fit fraction, exponent grid and bootstrap.

    Returns:
        The forecast.

    Raises:
        CheckupError: fewer than four checkups to fit.
    """
    n = x.size
    n_fit = min(n, max(_MIN_FIT_POINTS, math.ceil(options.fit_fraction * n)))
    if n_fit < _MIN_FIT_POINTS:
        msg = f"series {series!r} has {n} checkups; at least {_MIN_FIT_POINTS} are needed to fit"
        raise CheckupError(msg)
    xf, yf = x[:n_fit], soh[:n_fit]
    grid = _exponent_grid(options)
    x_max = float(xf.max())
    # Model choice: the plain power law, or with a knee starting at one of the fitted checkups (BIC).
    coef, sse, _ = _fit(xf, yf[None, :], grid, None)
    if not np.any(np.isfinite(sse[0])):
        msg = f"series {series!r}: its capacity does not fall over the fitted checkups; nothing to extrapolate"
        raise CheckupError(msg)
    best_p = int(np.argmin(sse[0]))
    best: tuple[float, float | None, int, F64] = (float(sse[0, best_p]), None, best_p, coef[0, best_p])
    bic_plain = n_fit * math.log(max(best[0], 1e-300) / n_fit) + 3 * math.log(n_fit)
    bic_best = bic_plain
    for onset in xf[2:-2]:
        c_k, s_k, _ = _fit(xf, yf[None, :], grid, float(onset))
        j = int(np.argmin(s_k[0]))
        bic = n_fit * math.log(max(float(s_k[0, j]), 1e-300) / n_fit) + 5 * math.log(n_fit)
        if np.isfinite(s_k[0, j]) and bic < bic_best - _KNEE_BIC_MARGIN and c_k[0, j, 3] > 0:
            bic_best, best = bic, (float(s_k[0, j]), float(onset), j, c_k[0, j])
    _, onset, p_idx, theta = best
    # Moving-block bootstrap of the chosen model's residuals, p re-profiled each time: blocks
    # keep the residuals' correlation, which is mostly the model's own misfit (a calendar plus
    # cycle fade is not one power law) and widens the bands as it should.
    _, _, design = _fit(xf, yf[None, :], grid, onset)
    fitted = design[p_idx] @ theta
    resid = yf - fitted
    resid = (resid - resid.mean()) * math.sqrt(n_fit / max(n_fit - len(theta), 1))
    rng = np.random.default_rng(options.seed)
    block = max(2, n_fit // 4)
    n_blocks = -(-n_fit // block)
    starts = rng.integers(0, n_fit - block + 1, size=(options.bootstrap, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(options.bootstrap, -1)[:, :n_fit]
    y_star = fitted[None, :] + resid[idx]
    # Each resample also drops a random share (up to 40 %) of the earliest checkups: where the
    # local exponent drifts (several power laws add up), later windows extrapolate
    # differently, and the bands should say so.
    first = rng.integers(0, max(int(0.4 * n_fit) - _MIN_FIT_POINTS // 2, 0) + 1, size=options.bootstrap)
    if onset is not None:
        first = np.minimum(first, max(int(np.searchsorted(xf, onset)) - 2, 0))
    weights = (np.arange(n_fit)[None, :] >= first[:, None]).astype(np.float64)
    c_b, s_b, _ = _fit(xf, y_star, grid, onset, weights)
    j_b = np.argmin(s_b, axis=1)
    rows = np.arange(options.bootstrap)
    feasible = np.isfinite(s_b[rows, j_b])
    crossings = _crossing(
        c_b[rows, j_b], grid[j_b], onset, x_max, float(xf[-1]), options.eol_soh, options.horizon_factor
    )
    point = _crossing(
        theta[None, :], grid[[p_idx]], onset, x_max, float(xf[-1]), options.eol_soh, options.horizon_factor
    )
    crossings = crossings[feasible] if np.any(feasible) else point
    p5, p50, p95 = (float(v) for v in np.quantile(crossings, [0.05, 0.5, 0.95]))
    if not math.isfinite(p50):
        p50 = float(point[0])
    # The actual crossing, where the data show it.
    below = np.flatnonzero(soh <= options.eol_soh)
    actual: float | None = None
    if below.size:
        k = int(below[0])
        if k == 0:
            actual = float(x[0])
        else:
            y0, y1 = float(soh[k - 1]), float(soh[k])
            frac = (y0 - options.eol_soh) / (y0 - y1) if y0 > y1 else 1.0
            actual = float(x[k - 1] + frac * (x[k] - x[k - 1]))
    error = None if actual is None or not math.isfinite(p50) else p50 - actual
    remaining = None if actual is None else actual - float(xf[-1])
    rel = None if error is None or remaining is None or remaining <= 0 else error / remaining
    return SeriesForecast(
        series=series,
        points=n,
        fit_points=n_fit,
        x_fit_end=float(xf[-1]),
        soh_fit_end=float(yf[-1]),
        model=("power+knee" if onset is not None else "power")
        if grid[p_idx, 0] == grid[p_idx, 1]
        else ("2power+knee" if onset is not None else "2power"),
        exponent=float(grid[p_idx, 1]),
        calendar_exponent=None if grid[p_idx, 0] == grid[p_idx, 1] else float(grid[p_idx, 0]),
        knee_onset=onset,
        eol_p5=p5,
        eol_p50=p50,
        eol_p95=p95,
        rul_p50=p50 - float(xf[-1]),
        actual=actual,
        error=error,
        rul_relative_error=rel,
        covered=None if actual is None else bool(p5 <= actual <= p95),
    )


def rul_report(table: pl.DataFrame, options: RulOptions, *, x_unit: str) -> dict[str, Any]:
    """Forecast every series of a checked table (:func:`checkup_table`) and summarise.

    Returns:
        ``{"eol_soh", "fit_fraction", "x_unit", "series": [...], "summary": {...}}`` with one
        dict per series (the fields of :class:`SeriesForecast`) and, over the series whose
        crossing the data show, the mean absolute relative RUL error and the P5-P95 coverage.
        Infinite crossings (none within the horizon) are reported as None.
    """
    out: list[dict[str, Any]] = []
    for (series,), rows in table.group_by("series", maintain_order=True):
        fc = forecast_series(str(series), rows.get_column("x").to_numpy(), rows.get_column("soh").to_numpy(), options)
        out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(fc).items()})
    scored = [s for s in out if s["rul_relative_error"] is not None]
    return {
        "eol_soh": options.eol_soh,
        "fit_fraction": options.fit_fraction,
        "x_unit": x_unit,
        "series": out,
        "summary": {
            "series": len(out),
            "scored": len(scored),
            "rul_mape": float(np.mean([abs(s["rul_relative_error"]) for s in scored])) if scored else None,
            "coverage_p5_p95": float(np.mean([bool(s["covered"]) for s in scored])) if scored else None,
        },
    }
