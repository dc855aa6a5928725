"""Score the twin's estimates against the emulator's truth: the accuracy harness behind ``mgtwin evaluate``.

Inputs, in one run folder: the twin's ``estimates.parquet`` and ``site_estimates.parquet``
(written by ``mgtwin replay``), the emulator's ``truth.parquet`` and ``site_truth.parquet``,
and the telemetry's ``soc_bms`` (the BMS-reported SoC, scored the same way as the twin).
The twin never sees the truth; this module only compares afterwards.

Rules (documented so that the figures can be reproduced):

* Times: each estimate is matched with the truth sample nearest in event time (at most
  ``tolerance_s`` apart), per pack for the pack tables. The first ``skip_s`` of the run are
  left out (the filters start from a wide prior).
* SoC: packs the truth marks available and the twin has an estimate for; the truth is the
  pack's usable SoC (what its weakest cell lets it deliver). ``soc_rmse_bms`` scores the BMS's
  ``soc_bms`` at the same (time, pack) rows.
* Energy, runtime and ride-through: the site figures at the truth's times; MAPE over the
  times where the truth is finite and positive (runtime is undefined while the site charges,
  and beyond the emulator's seven-day horizon); band coverage is the share of those times
  where the truth lies within the twin's P5-P95.

All errors are fractions (0.012 is 1.2 %).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import polars as pl

from twin.errors import TwinError
from twin.replay import ESTIMATES_FILE, SITE_ESTIMATES_FILE

__all__ = [
    "EvaluateError",
    "EvaluateOptions",
    "alert_scores",
    "band_verdict",
    "evaluate_run",
    "plot_run",
    "pool_scores",
]

#: Keys of the JSON summary this module always fills (null when there is nothing to score).
KEYS: Final = (
    "soc_rmse",
    "soc_rmse_bms",
    "soc_rmse_by_chemistry",
    "soc_rmse_bms_by_chemistry",
    "soc_mean_std",
    "soc_z_rms",
    "soc_z_rms_by_chemistry",
    "pack_energy_mape",
    "energy_mape",
    "energy_band_coverage",
    "energy_band50_coverage",
    "energy_band_halfwidth",
    "energy_error_median",
    "runtime_mape",
    "runtime_band_coverage",
    "runtime_band50_coverage",
    "runtime_band_halfwidth",
    "runtime_error_median",
    "ridethrough_mape",
    "ridethrough_band_coverage",
    "ridethrough_band50_coverage",
    "ridethrough_band_halfwidth",
    "ridethrough_error_median",
    "soh_mae",
    "soh_mae_bms",
    "capacity_mape",
    "resistance_mape",
    "rul_mape",
    "rul_band_coverage",
)


class EvaluateError(TwinError):
    """A run folder that cannot be scored: no truth, or no estimates yet."""


@dataclass(frozen=True, slots=True)
class EvaluateOptions:
    """Scoring rules.

    Attributes:
        skip_s: leave out the first seconds of the run.
        tolerance_s: largest time between an estimate and the truth it is compared with.
    """

    skip_s: float = 3600.0
    tolerance_s: float = 30.0


def _need(path: Path, hint: str) -> Path:
    if not path.is_file():
        msg = f"{path} is missing; {hint}"
        raise EvaluateError(msg)
    return path


def load_pairs(
    run: Path, estimates_dir: Path | None = None, options: EvaluateOptions = EvaluateOptions()
) -> dict[str, pl.DataFrame]:
    """Return the matched (estimate, truth) tables: ``packs`` and ``site``.

    Raises:
        EvaluateError: missing truth or estimates.
    """
    est_dir = estimates_dir or run
    truth = pl.read_parquet(_need(run / "truth.parquet", "run the emulator with --truth"))
    site_truth = pl.read_parquet(_need(run / "site_truth.parquet", "run the emulator with --truth"))
    hint = f"run `mgtwin replay {run} --out {est_dir}` first"
    est = pl.read_parquet(_need(est_dir / ESTIMATES_FILE, hint))
    site_est = pl.read_parquet(_need(est_dir / SITE_ESTIMATES_FILE, hint))
    if est.height == 0 or truth.height == 0:
        msg = f"nothing to score in {run}: {est.height} estimates, {truth.height} truth rows"
        raise EvaluateError(msg)
    tol = round(options.tolerance_s * 1000)
    start = min(int(truth.select(pl.col("ts_ms").min()).item()), int(est.select(pl.col("ts_ms").min()).item()))
    since = start + round(options.skip_s * 1000)
    times = est.select("ts_ms").unique()
    bms = (
        pl.scan_parquet(run / "telemetry.parquet")
        .select("ts_ms", "pack", "soc_bms")
        .join(times.lazy(), on="ts_ms", how="semi")
        .collect()
    )
    packs = (
        est.filter(pl.col("ts_ms") >= since)
        .select(
            "ts_ms",
            "pack",
            "chemistry",
            "life",
            "online",
            "soc",
            "soc_std",
            "energy_to_floor_kwh",
            *[c for c in ("capacity_ah", "soh", "soh_bms", "resistance_ohm") if c in est.columns],
        )
        .sort("ts_ms")
        .join_asof(
            truth.select(
                "ts_ms",
                "pack",
                pl.col("soc").alias("soc_true"),
                pl.col("energy_to_floor_kwh").alias("energy_true"),
                pl.col("available").alias("available_true"),
                pl.col("capacity_ah").alias("capacity_true"),
                pl.col("soh").alias("soh_true"),
                pl.col("r0_ohm_25c").alias("resistance_true"),
            ).sort("ts_ms"),
            on="ts_ms",
            by="pack",
            strategy="nearest",
            tolerance=tol,
            check_sortedness=False,  # both sorted by time just above (polars cannot check it by group)
        )
        .join(bms, on=["ts_ms", "pack"], how="left")
        .filter(pl.col("soc_true").is_not_null() & pl.col("available_true") & pl.col("soc").is_not_null())
    )
    site = (
        site_truth.filter(pl.col("ts_ms") >= since)
        .sort("ts_ms")
        .join_asof(site_est.sort("ts_ms"), on="ts_ms", strategy="nearest", tolerance=tol, suffix="_est")
    )
    return {"packs": packs, "site": site}


def _rmse(a: str, b: str) -> pl.Expr:
    return ((pl.col(a) - pl.col(b)) ** 2).mean().sqrt()


def _ape(est: str, true: str) -> pl.Expr:
    return (pl.col(est) - pl.col(true)).abs() / pl.col(true)


#: Where P25 and P75 lie in a P5-P95 band of a normal error, in units of its half-width (0.674 / 1.645).
P25_IN_BAND: Final = 0.6744897501960817 / 1.6448536269514722

#: The site figures scored, with their estimate, band and truth columns.
SITE_FIGURES: Final = (
    ("energy", "energy_to_floor_kwh_est", "energy_to_floor_kwh", "energy_to_floor_kwh_p5", "energy_to_floor_kwh_p95"),
    ("runtime", "runtime_s_p50", "runtime_s", "runtime_s_p5", "runtime_s_p95"),
    ("ridethrough", "ridethrough_s_p50", "ridethrough_s", "ridethrough_s_p5", "ridethrough_s_p95"),
)


def _valid_site(site: pl.DataFrame, est: str, true: str) -> pl.DataFrame:
    return site.filter(
        pl.col(true).is_finite() & (pl.col(true) > 0) & pl.col(est).is_not_null() & pl.col(est).is_finite()
    )


def _place(est: str, true: str, p5: str, p95: str) -> pl.Expr:
    """The truth's place in the band: -1 at P5, 0 at the estimate, +1 at P95 (each side scaled on its own)."""
    above = (pl.col(true) - pl.col(est)) / (pl.col(p95) - pl.col(est))
    below = (pl.col(true) - pl.col(est)) / (pl.col(est) - pl.col(p5))
    return pl.when(pl.col(true) == pl.col(est)).then(0.0).when(pl.col(true) > pl.col(est)).then(above).otherwise(below)


def _site_scores(site: pl.DataFrame, est: str, true: str, p5: str, p95: str) -> dict[str, Any]:
    """MAPE, P5-P95 coverage, the band's median half-width and the median error (both relative to the truth).

    ``coverage50`` is the share of times the truth lies within the P25-P75 that the band
    implies for a normal error (the central 41 % of each side): about 50 % when the band's
    shape is right, not only its P5-P95 width.
    """
    valid = _valid_site(site, est, true)
    if valid.height == 0:
        return {"mape": None, "coverage": None, "coverage50": None, "halfwidth": None, "error": None, "n": 0}
    row = valid.select(
        mape=_ape(est, true).mean(),
        coverage=((pl.col(true) >= pl.col(p5)) & (pl.col(true) <= pl.col(p95))).mean(),
        coverage50=(_place(est, true, p5, p95).abs() <= P25_IN_BAND).mean(),
        halfwidth=((pl.col(p95) - pl.col(p5)) / (2.0 * pl.col(true))).filter(pl.col(p95).is_finite()).median(),
        error=_ape(est, true).median(),
    ).row(0, named=True)
    return {**{k: None if v is None else float(v) for k, v in row.items()}, "n": valid.height}


def band_places(
    run: Path, *, estimates_dir: Path | None = None, options: EvaluateOptions = EvaluateOptions()
) -> pl.DataFrame:
    """The truth's place in each site band at each scored time: ``figure`` and ``place`` (-1 at P5, +1 at P95).

    The same times :func:`evaluate_run` scores; for a histogram of many runs (``mgtwin bands``).
    """
    site = load_pairs(run, estimates_dir, options)["site"]
    parts = [
        _valid_site(site, est, true).select(
            pl.lit(name).alias("figure"), _place(est, true, p5, p95).cast(pl.Float64).alias("place")
        )
        for name, est, true, p5, p95 in SITE_FIGURES
    ]
    return pl.concat(parts).filter(pl.col("place").is_not_null())


def evaluate_run(
    run: Path, *, estimates_dir: Path | None = None, options: EvaluateOptions = EvaluateOptions()
) -> dict[str, Any]:
    """Score a replayed run against its truth.

    Args:
        run: the run folder (truth and telemetry).
        estimates_dir: where ``mgtwin replay`` wrote the estimates (default: ``run``).
        options: scoring rules.

    Returns:
        One JSON-ready dict with at least the keys of :data:`KEYS`, and counts.

    Raises:
        EvaluateError: missing truth or estimates.
    """
    pairs = load_pairs(run, estimates_dir, options)
    packs, site = pairs["packs"], pairs["site"]
    out: dict[str, Any] = dict.fromkeys(KEYS)
    if packs.height:
        scored = packs.filter(pl.col("soc_bms").is_not_null())
        overall = packs.select(
            soc=_rmse("soc", "soc_true"),
            std=pl.col("soc_std").mean(),
            energy=_ape("energy_to_floor_kwh", "energy_true").filter(pl.col("energy_true") > 1.0).mean(),
        ).row(0, named=True)
        out["soc_rmse"] = overall["soc"]
        out["soc_mean_std"] = overall["std"]
        out["pack_energy_mape"] = overall["energy"]
        out["soc_rmse_bms"] = scored.select(_rmse("soc_bms", "soc_true")).item() if scored.height else None
        out["soc_bms_rows"] = scored.height
        by = (
            packs.group_by("chemistry")
            .agg(est=_rmse("soc", "soc_true"), bms=_rmse("soc_bms", "soc_true"), n=pl.len())
            .sort("chemistry")
        )
        out["soc_rmse_by_chemistry"] = {r["chemistry"]: r["est"] for r in by.iter_rows(named=True)}
        out["soc_rmse_bms_by_chemistry"] = {r["chemistry"]: r["bms"] for r in by.iter_rows(named=True)}
        life = packs.group_by("life").agg(est=_rmse("soc", "soc_true"), bms=_rmse("soc_bms", "soc_true")).sort("life")
        out["soc_rmse_by_life"] = {str(r["life"]): r["est"] for r in life.iter_rows(named=True)}
        # The stated uncertainty's calibration: RMS of error over soc_std (1 when honest,
        # below 1 when the std is wider than the errors).
        z = (
            packs.filter(pl.col("soc_std") > 0)
            .with_columns(z=(pl.col("soc") - pl.col("soc_true")) / pl.col("soc_std"))
            .filter(pl.col("z").is_finite())
        )
        out["soc_z_rows"] = z.height
        if z.height:
            out["soc_z_rms"] = z.select((pl.col("z") ** 2).mean().sqrt()).item()
            by_z = z.group_by("chemistry").agg(z=(pl.col("z") ** 2).mean().sqrt()).sort("chemistry")
            out["soc_z_rms_by_chemistry"] = {r["chemistry"]: r["z"] for r in by_z.iter_rows(named=True)}
        if "soh" in packs.columns:
            health = packs.select(
                soh=(pl.col("soh") - pl.col("soh_true")).abs().mean(),
                bms=(pl.col("soh_bms") - pl.col("soh_true")).abs().mean(),
                cap=_ape("capacity_ah", "capacity_true").mean(),
            ).row(0, named=True)
            out["soh_mae"], out["soh_mae_bms"], out["capacity_mape"] = health["soh"], health["bms"], health["cap"]
        if "resistance_ohm" in packs.columns:
            out["resistance_mape"] = packs.select(_ape("resistance_ohm", "resistance_true").mean()).item()
    rul = _rul_scores(run, estimates_dir or run)
    out.update(rul)
    for name, est, true, p5, p95 in SITE_FIGURES:
        scores = _site_scores(site, est, true, p5, p95)
        out[f"{name}_mape"] = scores["mape"]
        out[f"{name}_band_coverage"] = scores["coverage"]
        out[f"{name}_band50_coverage"] = scores["coverage50"]
        out[f"{name}_band_halfwidth"] = scores["halfwidth"]
        out[f"{name}_error_median"] = scores["error"]
        out[f"{name}_points"] = scores["n"]
    out["pack_rows_scored"] = packs.height
    out["packs_scored"] = packs["pack"].n_unique() if packs.height else 0
    out["site_rows_scored"] = site.height
    out["skip_s"] = options.skip_s
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def pool_scores(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool several runs' scores as if their points were one run's: what a band's coverage means.

    A band's coverage on one run is nearly one draw: an error common to a chemistry's packs
    (its OCV table's) lasts the whole run, so a run's band holds the truth nearly always or
    nearly never. Whether P5-P95 holds the truth 90 % of the time is a question about many
    runs, each with its own draw of those errors.

    SoC RMSE (the twin's and the BMS's) and the error over its std are pooled over the rows
    each scored (the root of the row-weighted mean of squares); site MAPE and band
    coverage are weighted by each run's scored points; a band's half-width and error are the
    median of the runs' medians. Runs with nothing to score for a figure are left out of it.

    Args:
        runs: :func:`evaluate_run` results.

    Returns:
        ``runs`` (the count), ``soc_rmse``, ``soc_rmse_bms``, ``soc_z_rms`` and, for
        ``energy``, ``runtime`` and ``ridethrough``: ``_mape``, ``_band_coverage``,
        ``_band50_coverage`` (the implied P25-P75's), ``_band_halfwidth``, ``_error_median``,
        ``_points`` and ``_runs_covering_all`` (how many runs' bands held the truth every
        time). None where nothing was scored.
    """

    def weighted(key: str, weight: str, *, squared: bool = False) -> float | None:
        pairs = [
            (float(r[key]), float(r.get(weight) or 0))
            for r in runs
            if r.get(key) is not None and (r.get(weight) or 0) > 0
        ]
        total = sum(w for _, w in pairs)
        if not total:
            return None
        if squared:
            return math.sqrt(sum(w * v * v for v, w in pairs) / total)
        return sum(w * v for v, w in pairs) / total

    def median(key: str) -> float | None:
        values = sorted(float(r[key]) for r in runs if r.get(key) is not None)
        if not values:
            return None
        mid = len(values) // 2
        return float(values[mid]) if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])

    out: dict[str, Any] = {"runs": len(runs)}
    for key, rows in (("soc_rmse", "pack_rows_scored"), ("soc_rmse_bms", "soc_bms_rows"), ("soc_z_rms", "soc_z_rows")):
        out[key] = weighted(key, rows, squared=True)
    for name in ("energy", "runtime", "ridethrough"):
        points = f"{name}_points"
        out[f"{name}_mape"] = weighted(f"{name}_mape", points)
        out[f"{name}_band_coverage"] = weighted(f"{name}_band_coverage", points)
        out[f"{name}_band50_coverage"] = weighted(f"{name}_band50_coverage", points)
        out[f"{name}_band_halfwidth"] = median(f"{name}_band_halfwidth")
        out[f"{name}_error_median"] = median(f"{name}_error_median")
        out[points] = sum(r.get(points) or 0 for r in runs)
        out[f"{name}_runs_covering_all"] = sum(
            1 for r in runs if (r.get(points) or 0) > 0 and r.get(f"{name}_band_coverage") == 1.0
        )
    return out


def band_verdict(scores: Mapping[str, Any], ocv_error_mv: float | None) -> str | None:
    """One sentence on the site energy band's calibration, for the table (None when there is nothing to say).

    The twin's bands budget model errors (an OCV table some mV off the cells, an aging law's
    bias) besides the filters' own uncertainty. A run whose cells match the twin's tables has
    no such error, so its bands hold the truth every time; on one whose tables are off, the
    error lasts the whole run, so its bands hold the truth nearly always or nearly never.
    Either way one run is one draw: ``mgtwin bands`` pools many.

    Args:
        scores: :func:`evaluate_run`'s result.
        ocv_error_mv: the run's ``cell_model.ocv_error_mv`` (None: not recorded).
    """
    from twin.estimators.soc import SocOptions

    coverage, width, error = (scores.get(f"energy_{k}") for k in ("band_coverage", "band_halfwidth", "error_median"))
    if coverage is None or width is None or error is None:
        return None
    budget = f"{1000.0 * SocOptions().ocv_error_v:g} mV"
    cells = (
        "the cells' OCV is the twin's table"
        if not ocv_error_mv
        else f"the cells' OCV is {ocv_error_mv:g} mV off the tables"
    )
    if coverage > 0.98 and width > 3.0 * error:
        return (
            f"The energy band holds the truth {coverage:.0%} of the time, its half-width {width:.1%} against a median "
            f"error of {error:.1%}: {cells}, and the band budgets for tables {budget} off the cells. One run is one "
            "draw of that error: mgtwin bands pools many (24 draws of the nevada site: about 90 %)."
        )
    if coverage < 0.8:
        return (
            f"The energy band holds the truth only {coverage:.0%} of the time: {cells} (the band budgets for "
            f"{budget}; on LFP's plateau 1 mV is about 1.5 % of SoC). One run is one draw of that error: "
            "mgtwin bands pools many."
        )
    return None


def _rul_scores(run: Path, est_dir: Path) -> dict[str, Any]:
    """RUL at the end of the run against the emulator's true time to end of life (eol_truth.parquet)."""
    path = run / "eol_truth.parquet"
    est_path = est_dir / ESTIMATES_FILE
    if not path.is_file() or not est_path.is_file():
        return {}
    truth = pl.read_parquet(path)
    knee = pl.col("knee") if "knee" in truth.columns else pl.lit(None, dtype=pl.Boolean)
    truth = truth.select("pack", pl.col("days_to_eol").alias("true_days"), knee.alias("knee"))
    est = pl.read_parquet(est_path)
    if "rul_days_p50" not in est.columns:
        return {}
    last = est.filter(pl.col("ts_ms") == pl.col("ts_ms").max()).select(
        "pack", "rul_days_p5", "rul_days_p50", "rul_days_p95"
    )
    both = last.join(truth, on="pack").filter(
        pl.col("true_days").is_finite() & (pl.col("true_days") > 0) & pl.col("rul_days_p50").is_not_null()
    )
    if both.height == 0:
        return {"rul_packs": 0}
    out: dict[str, Any] = {
        "rul_mape": both.select(_ape("rul_days_p50", "true_days").mean()).item(),
        "rul_band_coverage": both.select(
            ((pl.col("true_days") >= pl.col("rul_days_p5")) & (pl.col("true_days") <= pl.col("rul_days_p95"))).mean()
        ).item(),
        "rul_packs": both.height,
    }
    # A knee drawn for a pack may begin after the run: its true RUL is short while the
    # telemetry shows nothing yet. The truth says which packs have one; score both sets.
    if both.get_column("knee").null_count() == 0:
        for label, rows in (("no_knee", both.filter(~pl.col("knee"))), ("knee", both.filter(pl.col("knee")))):
            mape = rows.select(_ape("rul_days_p50", "true_days").mean()).item() if rows.height else None
            out[f"rul_mape_{label}"] = mape
            out[f"rul_packs_{label}"] = rows.height
    return out


def worst_packs(packs: pl.DataFrame, n: int = 6) -> list[str]:
    """The ``n`` packs with the largest SoC RMSE."""
    table = packs.group_by("pack").agg(e=_rmse("soc", "soc_true")).sort("e", descending=True)
    return [str(p) for p in table["pack"].head(n).to_list()]


def plot_run(
    run: Path, out: Path, *, estimates_dir: Path | None = None, options: EvaluateOptions = EvaluateOptions()
) -> list[Path]:
    """Draw estimate against truth with the bands: the site, and the worst packs' SoC.

    Returns:
        The PNG files written (``eval_site.png``, ``eval_packs.png``).
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    est_dir = estimates_dir or run
    pairs = load_pairs(run, est_dir, EvaluateOptions(skip_s=0.0, tolerance_s=options.tolerance_s))
    site_est = pl.read_parquet(est_dir / SITE_ESTIMATES_FILE)
    site_truth = pl.read_parquet(run / "site_truth.parquet")
    t0 = int(site_est.select(pl.col("ts_ms").min()).item())

    def hours(frame: pl.DataFrame) -> Any:
        return ((frame["ts_ms"] - t0) / 3_600_000).to_numpy()

    out.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    panels = (
        (
            "energy to the reserve floor (kWh)",
            "energy_to_floor_kwh",
            "energy_to_floor_kwh_p5",
            "energy_to_floor_kwh_p95",
            "energy_to_floor_kwh",
            1.0,
        ),
        (
            "runtime at the present battery power (h)",
            "runtime_s_p50",
            "runtime_s_p5",
            "runtime_s_p95",
            "runtime_s",
            3600.0,
        ),
        (
            "ride-through of the data-centre load (h)",
            "ridethrough_s_p50",
            "ridethrough_s_p5",
            "ridethrough_s_p95",
            "ridethrough_s",
            3600.0,
        ),
    )
    for ax, (title, mid, lo, hi, true, scale) in zip(axes, panels, strict=True):
        x = hours(site_est)
        ax.fill_between(
            x,
            (site_est[lo] / scale).to_numpy(),
            (site_est[hi] / scale).to_numpy(),
            alpha=0.25,
            color="tab:blue",
            label="twin P5-P95",
            step="post",
        )
        ax.plot(x, (site_est[mid] / scale).to_numpy(), color="tab:blue", lw=1.2, label="twin P50")
        ax.plot(hours(site_truth), (site_truth[true] / scale).to_numpy(), "o", color="black", ms=3, label="truth")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("hours since the start of the run")
    fig.suptitle(f"{run.name}: site estimates against the emulator's truth")
    fig.tight_layout()
    files.append(out / "eval_site.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    packs = pairs["packs"]
    chosen = worst_packs(packs.filter(pl.col("ts_ms") >= t0 + round(options.skip_s * 1000)))
    fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 2.2 * max(len(chosen), 1) + 1), sharex=True, squeeze=False)
    for ax, pack in zip(axes[:, 0], chosen, strict=True):
        p = packs.filter(pl.col("pack") == pack).sort("ts_ms")
        x = hours(p)
        soc, std = p["soc"].to_numpy(), p["soc_std"].to_numpy()
        ax.fill_between(x, soc - 1.645 * std, soc + 1.645 * std, alpha=0.25, color="tab:blue")
        ax.plot(x, soc, color="tab:blue", lw=1.2, label="twin (P5-P95)")
        ax.plot(x, p["soc_true"].to_numpy(), color="black", lw=1.0, label="truth")
        ax.plot(x, p["soc_bms"].to_numpy(), color="tab:orange", lw=0.8, ls="--", label="BMS")
        ax.set_ylabel("SoC")
        ax.set_title(f"{pack} ({p['chemistry'][0]}, {p['life'][0]})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("hours since the start of the run")
    fig.suptitle("the packs with the largest SoC error")
    fig.tight_layout()
    files.append(out / "eval_packs.png")
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)
    return files


def plot_bands(rows: Sequence[Mapping[str, Any]], places: pl.DataFrame, path: Path) -> Path:
    """Draw how well many runs' bands held the truth (``mgtwin bands``): where it fell, and per run.

    Top: for energy, runtime and ride-through, the histogram of the truth's place in the band
    (-1 at P5, +1 at P95, pooled over the runs) against the normal error the band stands for;
    a calibrated band's histogram follows the curve. Bottom: each run's P5-P95 coverage.

    Args:
        rows: the runs' :func:`evaluate_run` results, in order.
        places: :func:`band_places` of those runs, concatenated.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = {"energy": "energy to the floor", "runtime": "runtime", "ridethrough": "ride-through"}
    pooled = pool_scores(rows)
    fig = plt.figure(figsize=(12, 7.5))
    grid = fig.add_gridspec(2, 3, height_ratios=(1.2, 1.0))
    x = np.linspace(-3.0, 3.0, 241)
    sd = 1.0 / 1.6448536269514722  # P5 and P95 at -1 and +1
    density = np.exp(-0.5 * (x / sd) ** 2) / (sd * np.sqrt(2.0 * np.pi))
    for col, key in enumerate(names):
        ax = fig.add_subplot(grid[0, col])
        values = places.filter(pl.col("figure") == key)["place"].to_numpy()
        if values.size:
            ax.hist(
                np.clip(values, -3.0, 3.0),
                bins=list(np.linspace(-3.0, 3.0, 31)),
                density=True,
                color="tab:blue",
                alpha=0.6,
            )
        ax.plot(x, density, color="black", lw=1.2, label="calibrated")
        for edge in (-1.0, 1.0):
            ax.axvline(edge, color="tab:red", ls="--", lw=0.8)
        for edge in (-P25_IN_BAND, P25_IN_BAND):
            ax.axvline(edge, color="tab:gray", ls=":", lw=0.8)
        held, held50 = pooled[f"{key}_band_coverage"], pooled[f"{key}_band50_coverage"]
        text = "nothing scored" if held is None else f"P5-P95 held {held:.0%}"
        if held50 is not None:
            text += f", P25-P75 {held50:.0%}"
        ax.set_title(f"{names[key]}: {text}", fontsize=9)
        ax.set_xlabel("truth's place in the band (-1: P5, +1: P95; clipped at 3)", fontsize=8)
        ax.set_xlim(-3.0, 3.0)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(loc="upper left", fontsize=8)
    ax = fig.add_subplot(grid[1, :])
    runs = np.arange(len(rows))
    for offset, (key, marker) in zip(
        (-0.2, 0.0, 0.2), (("energy", "o"), ("runtime", "s"), ("ridethrough", "^")), strict=True
    ):
        cover = np.array([np.nan if r.get(f"{key}_band_coverage") is None else r[f"{key}_band_coverage"] for r in rows])
        ax.plot(runs + offset, 100.0 * cover, marker, ms=5, label=names[key], alpha=0.8)
    ax.axhspan(80.0, 98.0, color="tab:green", alpha=0.1, label="80-98 % (pooled target)")
    labels = [Path(str(r.get("run", i))).name for i, r in enumerate(rows)]
    ax.set_xticks(runs, labels, rotation=60, fontsize=7, ha="right", rotation_mode="anchor")
    ax.set_ylabel("P5-P95 held the truth, % of the run")
    ax.set_ylim(-5.0, 105.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, ncols=4)
    fig.suptitle(f"{len(rows)} runs: where the truth fell in the twin's site bands")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- alerts (issue 6)


def alert_scores(run: Path, alerts: pl.DataFrame, *, grace_s: float = 600.0) -> dict[str, Any]:
    """Score alerts against the faults the emulator injected (``faults.parquet``, written with ``--truth``).

    Matching: a raised alert detects a fault when it names the fault's pack (a site-level
    alert, without a pack, may detect a fault on any pack), its kind is one that detects the
    fault's kind (:data:`twin.alerts.FAULT_ALERT_KINDS`), and it is raised within the
    fault's window or within ``grace_s`` of its start, whichever ends later (a short
    fault may end before its minimum duration has passed). Precision is the share of raised
    alerts that detect some fault; recall the share of (fault, pack) windows detected;
    the delay runs from a window's start to its first detecting alert.

    Args:
        run: the run folder (with ``faults.parquet``).
        alerts: the alerts (the contract's Alert columns; only ``state == "raised"`` count),
            e.g. from :func:`twin.alerts.alerts_from_run`.
        grace_s: how long after a fault's start an alert still counts when the fault is shorter.

    Returns:
        ``alerts_precision``, ``alerts_recall``, ``alert_delay_s_median`` (None when there is
        nothing to score), counts, and per fault kind: windows, detected, median delay and
        the alert kinds that detected it.

    Raises:
        EvaluateError: no ``faults.parquet`` in the run folder.
    """
    from twin.alerts import FAULT_ALERT_KINDS

    faults = pl.read_parquet(_need(run / "faults.parquet", "emulate with --truth to write the injected faults"))
    raised = alerts.filter(pl.col("state") == "raised").select(
        pl.int_range(pl.len()).alias("alert"),
        pl.col("ts_ms").cast(pl.Int64),
        pl.col("kind").cast(pl.String).alias("alert_kind"),
        pl.col("pack").cast(pl.String).alias("alert_pack"),
    )
    windows = faults.select(
        pl.int_range(pl.len()).alias("window"),
        "pack",
        pl.col("kind").alias("fault_kind"),
        "start_ms",
        pl.max_horizontal("end_ms", pl.col("start_ms") + round(grace_s * 1000)).alias("until_ms"),
    )
    detects = pl.DataFrame(
        [(f, a) for f, kinds in FAULT_ALERT_KINDS.items() for a in sorted(kinds)],
        schema={"fault_kind": pl.String, "alert_kind": pl.String},
        orient="row",
    )
    matches = (
        raised.join(detects, on="alert_kind", how="inner")
        .join(windows, on="fault_kind", how="inner")
        .filter(
            (pl.col("alert_pack").is_null() | (pl.col("alert_pack") == pl.col("pack")))
            & (pl.col("ts_ms") >= pl.col("start_ms"))
            & (pl.col("ts_ms") <= pl.col("until_ms"))
        )
    )
    first = matches.group_by("window").agg(
        (pl.col("ts_ms").min() - pl.col("start_ms").first()).alias("delay_ms"),
        pl.col("alert_kind").unique().sort().alias("alert_kinds"),
    )
    per_window = windows.join(first, on="window", how="left")
    true_alerts = matches["alert"].n_unique() if matches.height else 0
    detected = per_window.filter(pl.col("delay_ms").is_not_null())
    delays = detected["delay_ms"].cast(pl.Float64) / 1000.0
    by_kind: dict[str, Any] = {}
    for kind in sorted(set(windows["fault_kind"].to_list())):  # a handful of kinds
        part = per_window.filter(pl.col("fault_kind") == kind)
        hit = part.filter(pl.col("delay_ms").is_not_null())
        by_kind[kind] = {
            "windows": part.height,
            "detected": hit.height,
            "delay_s_median": float(hit["delay_ms"].median()) / 1000.0 if hit.height else None,  # type: ignore[arg-type]
            "alert_kinds": sorted({k for ks in hit["alert_kinds"].to_list() for k in ks}),
        }
    out: dict[str, Any] = {
        "alerts_precision": true_alerts / raised.height if raised.height else None,
        "alerts_recall": detected.height / windows.height if windows.height else None,
        "alert_delay_s_median": float(delays.median()) if delays.len() else None,  # type: ignore[arg-type]
        "alerts_raised": raised.height,
        "alerts_true": true_alerts,
        "fault_windows": windows.height,
        "fault_windows_detected": detected.height,
        "alerts_by_fault_kind": by_kind,
        "alerts_grace_s": grace_s,
    }
    return out
