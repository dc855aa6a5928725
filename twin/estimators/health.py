"""Pack aging, remaining useful life and knees: BLAST-Lite laws driven by each pack's own stressors.

Each pack's aging law (:mod:`twin.chemistry.aging`, through its chemistry's ``aging_model``)
is advanced by the stressors the pack actually sees, accumulated from checkpoints on a fixed
event-time grid (as :class:`twin.estimators.capacity.CapacityTracker` is fed) and closed into
chunks of :attr:`HealthOptions.chunk_s`: time, time-averaged temperature and SoC (with the
SoC occupancy the laws average their rates over), depth of discharge within the chunk, mean
C-rates, and equivalent full cycles, counted against the present capacity estimate.

**Rate scalar.** A law is a fleet average; a pack ages ``s`` times faster (BLAST-Lite's
``degradation_scalar``). ``s`` is unknown, so the law is run for a grid of scalars at once
(:attr:`HealthOptions.scalar_grid_points`, log-spaced over ``median * exp(±k sigma)``), each
grid point with its own state, and the capacity estimates weigh them (a grid Bayesian filter):

* the model: ``soh(t) = h0 * q(t; s) / q(t0; s)``, ``t0`` the start of tracking and ``h0``
  the SoH then, unknown with prior ``N(intake_soh × q(t0; s) / q(tc; s), soh_prior_std²)``,
  ``tc`` the commissioning (the intake test; a new pack's intake SoH is 1): the fade since
  the intake depends on the scalar too, so it weighs the scalar before any capacity is seen;
* the data: once per chunk, the capacity estimate over the rated capacity, with variance
  ``(capacity_std / rated)² * capacity_corr_s / chunk_s + model_error_soh²`` (successive
  estimates share the same (ΔSoC, Ah) pairs for about ``capacity_corr_s``; counting each
  chunk as independent would be overconfident);
* ``h0`` enters linearly, so it is integrated out exactly per grid point (three running sums
  per pack and grid point); the posterior over ``s`` is the lognormal prior times that marginal
  likelihood. The SoH estimate is the posterior mean of ``h0 * q(t)/q(t0)``: the capacity
  estimates smoothed by the law.

The law's state at ``t0`` places the pack on its curve: its first life (``first_life``:
years in service and EFC, at typical EV stressors, :data:`FIRST_LIFE`) and its time at this
site before tracking began (``commissioned_ms``, at
:attr:`HealthOptions.site_efc_per_day_prior`), as BLAST-Lite would run it, with each grid
point's scalar.

**Remaining useful life.** From now, the law runs forward (steps growing with the law age,
as in :mod:`emulators.eol`) under the pack's recent duty: exponentially weighted chunk
statistics with a memory of :attr:`HealthOptions.duty_days`. The SoH threshold is per pack
(:attr:`HealthOptions.eol_soh_second_life`, :attr:`HealthOptions.eol_soh_new`, or given).
The forecast is run for the posterior quantiles of ``s`` (``rul_quantile_points`` of them)
and, for each, three values of ``h0`` (Gauss-Hermite), so P5/P50/P95 carry both the rate and
the level uncertainty. Days and EFC are real (``aging_clock_scale`` is the emulator's
``aging_speedup``: the law sees time and throughput multiplied by it; 1 in the field).

**Knees.** Per pack a history of (EFC, SoH observation, time) at chunk ends (decimated by
pairs when full) is fitted with a line and with a line plus a quadratic departure from a
candidate onset (every history point in turn; the shape of
:class:`~twin.chemistry.aging.KneeModel`); a knee is flagged when the departure explains
significantly more (F statistic above :attr:`HealthOptions.knee_f_min`, on independent
points), adds at least :attr:`HealthOptions.knee_min_extra` and ends at least
:attr:`HealthOptions.knee_slope_ratio` times steeper than before; the onset is the
departure's start. The same test on the resistance (optional input) flags accelerating resistance growth.
A flagged capacity knee makes the forecast knee-aware: the extra loss of
:class:`twin.chemistry.aging.KneeModel` from the onset on.

Validity: the share of chunks whose stressors lie inside the law's tested range
(``law.validity``) is reported; outside it the law extrapolates.

Vectorised over packs (and grid points); pure numerics, no I/O. The result does not depend on
how telemetry was batched as long as the checkpoints come on a fixed event-time grid.

References:
    P. Gasper, K. Smith et al., NREL BLAST-Lite, https://github.com/NREL/BLAST-Lite (the laws,
    ``degradation_scalar``, the incremental state updates).
    P. M. Attia et al., Knees in lithium-ion battery aging trajectories, J. Electrochem. Soc.
    169 060517 (2022) (knee onset, Bacon-Watts / two-segment fits).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import polars as pl
from numpy.typing import NDArray

from twin.chemistry import get_chemistry
from twin.chemistry.aging import (
    FIRST_LIFE,
    REST_C_RATE,
    SOC_GRID,
    AgingLaw,
    AgingState,
    KneeModel,
    Stressors,
    first_life_stressors,
    get_aging_law,
)
from twin.estimators.base import EstimatorError, check_names, check_non_negative

__all__ = [
    "FIRST_LIFE",
    "HealthEstimate",
    "HealthOptions",
    "HealthState",
    "HealthTracker",
    "prior_soh",
]

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
B = NDArray[np.bool_]
IP = NDArray[np.intp]

_FIRST_LIFE_CHUNK_DAYS: Final = 30.0
_MIN_CURVE_Q: Final = 0.05
"""Relative capacity on a law's curve below which a grid scalar's placement is implausible."""
_MS_PER_DAY: Final = 86_400_000.0
_GH3_NODES: Final = np.array([-math.sqrt(3.0), 0.0, math.sqrt(3.0)])
_GH3_WEIGHTS: Final = np.array([1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0])
_MID_NODE: Final = int(np.argmin(np.abs(SOC_GRID - 0.5)))


@dataclass(frozen=True, slots=True)
class HealthOptions:
    """Tuning of the health tracker (units in the names; defaults immutable).

    Attributes:
        eol_soh_second_life: end-of-life SoH of a second-life pack, fraction of rated capacity.
        eol_soh_new: end-of-life SoH of a new pack.
        chunk_s: length of an aging chunk (stressors are averaged over it; as the emulator's
            ``aging_every_s``), s. Chunks lie on a fixed event-time grid.
        duty_days: memory of the recent duty the forecast repeats (exponential weights), days.
        aging_clock_scale: multiplies time and throughput as the laws see them (the emulator's
            ``aging_speedup``; 1 in the field).
        scalar_prior_median: median of the rate scalar's lognormal prior.
        scalar_prior_sigma: its log standard deviation (law error and pack spread).
        scalar_grid_sigmas: the grid spans ``median * exp(±this * sigma)``.
        scalar_grid_points: grid points (odd).
        soh_prior_std: standard deviation of the SoH at the start of tracking around the
            intake SoH (second life) or 1 (new).
        capacity_corr_s: time over which successive capacity estimates share their data, s.
        model_error_soh: model error added to every SoH observation's standard deviation.
        max_gap_s: longer checkpoint intervals count as calendar time at the held SoC and
            temperature, without throughput, s.
        site_efc_per_day_prior: EFC per day assumed for a pack's time at the site before
            tracking began.
        rul_quantile_points: posterior quantiles of the scalar the forecast is run for.
        knee_risk_second_life: the chance that a second-life pack without a detected knee
            meets one within its forecast. A knee leaves no trace before it begins, and past
            it a pack can lose what life it has left within 15-25 % of its cycle count
            (BATTERY_NOTES 3, Attia et al. 2022); the share of retired packs near their knee
            is not published: 10 % is an assumption (the emulated sites make the same one).
            The forecast weighs in the case of a knee beginning now by this share, so P5
            reads it whenever the share reaches 5 %. 0 turns it off.
        knee_risk_new: the same for a new pack (0: its knee lies beyond its first life).
        horizon_days: forecasts stop here (RUL inf beyond), real days.
        step_fraction: forecast step as a share of the law's age. The duty is constant over a
            forecast, so BLAST-Lite's incremental rules hardly depend on the step: 0.05 moved
            RUL P5/P50/P95 by at most 0.9 % against 0.01 (nevada, 60 packs) at a fifth of the
            steps.
        min_step_days: shortest forecast step, real days.
        history_points: knee-history length per pack (decimated by pairs when full).
        knee_min_points: fewest history points for a knee test.
        knee_f_min: F statistic the hinge must reach over a single line.
        knee_slope_ratio: the slope after the hinge must be this many times the slope before.
        knee_min_extra: the hinge must add at least this much loss (or growth) by the last
            point, relative to the series' mean level (one or two sensor-noise widths of a
            capacity estimate are not a knee).
    """

    eol_soh_second_life: float = 0.6
    eol_soh_new: float = 0.7
    chunk_s: float = 3600.0
    duty_days: float = 7.0
    aging_clock_scale: float = 1.0
    scalar_prior_median: float = 1.0
    scalar_prior_sigma: float = 0.5
    scalar_grid_sigmas: float = 4.0
    scalar_grid_points: int = 81
    soh_prior_std: float = 0.03
    capacity_corr_s: float = 86_400.0
    model_error_soh: float = 0.003
    max_gap_s: float = 600.0
    site_efc_per_day_prior: float = 1.0
    rul_quantile_points: int = 15
    knee_risk_second_life: float = 0.10
    knee_risk_new: float = 0.0
    horizon_days: float = 36_500.0
    step_fraction: float = 0.05
    min_step_days: float = 1.0 / 24.0
    history_points: int = 512
    knee_min_points: int = 12
    knee_f_min: float = 12.0
    knee_slope_ratio: float = 2.0
    knee_min_extra: float = 0.015

    def __post_init__(self) -> None:
        """Check ranges.

        Raises:
            EstimatorError: a value out of range.
        """
        check_non_negative(self)
        if not (0 < self.eol_soh_new < 1 and 0 < self.eol_soh_second_life < 1):
            msg = "end-of-life SoH thresholds must lie in (0, 1)"
            raise EstimatorError(msg)
        positive = ("chunk_s", "duty_days", "aging_clock_scale", "scalar_prior_median", "scalar_prior_sigma")
        for name in (*positive, "soh_prior_std", "step_fraction", "min_step_days", "horizon_days"):
            if getattr(self, name) <= 0:
                msg = f"HealthOptions.{name} must be positive"
                raise EstimatorError(msg)
        if not (self.knee_risk_second_life <= 1 and self.knee_risk_new <= 1):
            msg = "HealthOptions knee risks are chances: at most 1"
            raise EstimatorError(msg)
        if self.scalar_grid_points < 5 or self.rul_quantile_points < 3 or self.history_points < 16:
            msg = "HealthOptions needs scalar_grid_points >= 5, rul_quantile_points >= 3, history_points >= 16"
            raise EstimatorError(msg)

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> HealthOptions:
        """Build options from a mapping, rejecting unknown names with "did you mean".

        Raises:
            EstimatorError: an unknown name or a value out of range.
        """
        check_names(values, [f.name for f in dataclasses.fields(cls)], what="HealthOptions field")
        return cls(**values)  # type: ignore[arg-type]

    def scalar_grid(self) -> F64:
        """Return the grid of rate scalars."""
        span = self.scalar_grid_sigmas * self.scalar_prior_sigma
        out: F64 = self.scalar_prior_median * np.exp(np.linspace(-span, span, int(self.scalar_grid_points)))
        return out


@dataclass(frozen=True, slots=True, eq=False)
class _Packs:
    """What the meta says about each pack, as arrays."""

    pack_ids: tuple[str, ...]
    chemistry: tuple[str, ...]
    law_names: tuple[str, ...]
    rated_ah: F64
    second_life: B
    soh_prior: F64
    eol_soh: F64
    first_life_days: F64
    first_life_efc: F64
    commissioned_ms: F64  # NaN: unknown
    meta_ms: F64  # the metadata's own time (ts_ms); NaN: unknown

    @classmethod
    def from_meta(cls, meta: pl.DataFrame, options: HealthOptions, eol_soh: Mapping[str, float] | None) -> _Packs:
        for required in ("pack", "chemistry", "rated_capacity_ah"):
            if required not in meta.columns:
                msg = f"HealthTracker: the meta lacks the column {required}"
                raise EstimatorError(msg)
        rows = meta.unique(subset="pack", keep="last", maintain_order=True)
        n = rows.height
        if n == 0:
            msg = "HealthTracker needs at least one pack"
            raise EstimatorError(msg)
        ids = tuple(str(p) for p in rows.get_column("pack").to_list())
        chems = tuple(str(c) for c in rows.get_column("chemistry").to_list())
        laws = tuple(get_chemistry(c).aging_model for c in chems)
        rated = rows.get_column("rated_capacity_ah").cast(pl.Float64).to_numpy()
        if not np.all(np.isfinite(rated) & (rated > 0)):
            msg = "HealthTracker: rated_capacity_ah must be positive for every pack"
            raise EstimatorError(msg)

        def column(name: str, default: Any) -> list[Any]:
            return rows.get_column(name).to_list() if name in rows.columns else [default] * n

        life = column("life", None)
        intake = column("intake_soh", None)
        second = np.array([x == "second_life" for x in life], dtype=np.bool_)
        first = column("first_life", None)
        years = np.array([float((f or {}).get("years_in_service") or 0.0) for f in first])
        efc1 = np.array([float((f or {}).get("efc") or 0.0) for f in first])
        commissioned = np.array([np.nan if c is None else float(c) for c in column("commissioned_ms", None)])
        soh_prior = np.array([1.0 if x is None or not np.isfinite(x) else float(x) for x in intake])
        default_eol = np.where(second, options.eol_soh_second_life, options.eol_soh_new)
        given = eol_soh or {}
        eol = np.array([float(given.get(p, d)) for p, d in zip(ids, default_eol, strict=True)])
        return cls(
            pack_ids=ids,
            chemistry=chems,
            law_names=laws,
            rated_ah=rated,
            second_life=second,
            soh_prior=soh_prior,
            eol_soh=eol,
            first_life_days=years * 365.0,
            first_life_efc=efc1,
            commissioned_ms=commissioned,
            meta_ms=np.array([np.nan if t is None else float(t) for t in column("ts_ms", None)]),
        )


@dataclass(frozen=True, slots=True, eq=False)
class _LawGroup:
    """The packs of one aging law and their grid states (pack-major: row ``i * G + g``)."""

    name: str
    members: IP
    state: AgingState
    q0: F64  # (n_members * G,) relative capacity at the start of tracking
    efc0: F64  # (n_members * G,) law EFC at the start of tracking
    site_fade: F64  # (n_members * G,) capacity at the start of tracking over capacity at commissioning


@dataclass(frozen=True, slots=True, eq=False)
class HealthState:
    """Everything the tracker has learnt (immutable; arrays are not written after creation).

    Attributes:
        pack_ids: the packs, in the order of the arrays.
        started: tracking has started (the first checkpoint came).
        t0_ms: event time of the first checkpoint.
        chunk_end_ms: the next chunk boundary (event time).
        groups: per aging law, the grid states.
        sums: the running chunk sums per pack (time, SoC·time, ...).
        soc_min: lowest SoC in the chunk per pack.
        soc_max: highest SoC in the chunk per pack.
        occupancy: time near each SoC node in the chunk, (n, 51), s.
        last_ts_ms: last checkpoint per pack (-1: none).
        last_soc: its SoC.
        last_temp_c: its temperature.
        last_throughput_ah: its cumulative throughput (NaN: not given).
        capacity_ah: the capacity estimate used to count EFC (latest valid, else the prior).
        obs_ah: the chunk's latest valid capacity estimate, Ah (NaN: none).
        obs_var_ah2: its variance, Ah².
        obs_r: the chunk's latest resistance (NaN: none).
        cal_a: Σ r²/σ² per pack and grid point (n, G).
        cal_b: Σ r·y/σ² (n, G).
        cal_c: Σ y²/σ² (n,).
        efc: real EFC since tracking began.
        duty: exponentially weighted duty statistics (weight, temp·w, soc·w, dod·w, c-rates·w,
            efc per day·w), each (n,).
        duty_occupancy: weighted SoC occupancy (n, 51).
        chunks: closed chunks.
        in_validity: chunks whose stressors were inside the law's range, per pack.
        hist: knee history (efc, soh, ts, r, count) sums, each (n, H).
        hist_len: filled history slots.
        hist_merge: chunks per history slot (doubles at each decimation).
        hist_fill: chunks in the slot being filled.
    """

    pack_ids: tuple[str, ...]
    started: bool
    t0_ms: int
    chunk_end_ms: int
    groups: tuple[_LawGroup, ...]
    sums: Mapping[str, F64]
    soc_min: F64
    soc_max: F64
    occupancy: F64
    last_ts_ms: I64
    last_soc: F64
    last_temp_c: F64
    last_throughput_ah: F64
    capacity_ah: F64
    obs_ah: F64
    obs_var_ah2: F64
    obs_r: F64
    cal_a: F64
    cal_b: F64
    cal_c: F64
    efc: F64
    duty: Mapping[str, F64]
    duty_occupancy: F64
    chunks: int
    in_validity: I64
    hist: Mapping[str, F64]
    hist_len: int
    hist_merge: int
    hist_fill: int


@dataclass(frozen=True, slots=True, eq=False)
class HealthEstimate:
    """Health per pack, in the order of ``pack_ids`` (RULs are NaN before any duty is known).

    Attributes:
        pack_ids: the packs.
        soh: SoH now (law-smoothed capacity estimates), fraction of rated capacity.
        soh_std: its standard deviation.
        rul_days_p5: 5th percentile of the remaining useful life, days (inf: beyond the horizon).
        rul_days_p50: median RUL, days.
        rul_days_p95: 95th percentile, days.
        rul_efc_p5: 5th percentile of the remaining EFC.
        rul_efc_p50: median remaining EFC.
        rul_efc_p95: 95th percentile.
        eol_soh: the end-of-life threshold applied.
        knee: an accelerating capacity fade was detected.
        knee_onset_ms: its onset (event time; -1: none).
        resistance_knee: an accelerating resistance growth was detected.
        resistance_knee_onset_ms: its onset (-1: none).
        rate_scalar: posterior median of the rate scalar.
        rate_scalar_p5: its 5th percentile.
        rate_scalar_p95: its 95th percentile.
        efc: equivalent full cycles since tracking began (real).
        validity_share: share of chunks inside the law's tested range (NaN: none yet).
        model: the aging law per pack.
    """

    pack_ids: tuple[str, ...]
    soh: F64
    soh_std: F64
    rul_days_p5: F64
    rul_days_p50: F64
    rul_days_p95: F64
    rul_efc_p5: F64
    rul_efc_p50: F64
    rul_efc_p95: F64
    eol_soh: F64
    knee: B
    knee_onset_ms: I64
    resistance_knee: B
    resistance_knee_onset_ms: I64
    rate_scalar: F64
    rate_scalar_p5: F64
    rate_scalar_p95: F64
    efc: F64
    validity_share: F64
    model: tuple[str, ...] = field(default=())

    def to_frame(self) -> pl.DataFrame:
        """Return the estimate as one row per pack (the columns :func:`twin.passport.passport` reads)."""
        return pl.DataFrame(
            {
                "pack": list(self.pack_ids),
                "soh": self.soh,
                "soh_std": self.soh_std,
                "rul_days_p5": self.rul_days_p5,
                "rul_days_p50": self.rul_days_p50,
                "rul_days_p95": self.rul_days_p95,
                "rul_efc_p5": self.rul_efc_p5,
                "rul_efc_p50": self.rul_efc_p50,
                "rul_efc_p95": self.rul_efc_p95,
                "eol_soh": self.eol_soh,
                "knee": self.knee,
                "knee_onset_ms": self.knee_onset_ms,
                "resistance_knee": self.resistance_knee,
                "resistance_knee_onset_ms": self.resistance_knee_onset_ms,
                "rate_scalar": self.rate_scalar,
                "efc": self.efc,
                "validity_share": self.validity_share,
                "aging_model": list(self.model),
            }
        )


_SUM_KEYS: Final = ("t", "soc", "temp", "abs_c", "chg_c", "chg_t", "dis_c", "dis_t")
_DUTY_KEYS: Final = ("w", "temp", "soc", "dod", "c_mean", "c_chg", "c_dis", "efc_per_day")
_HIST_KEYS: Final = ("x", "y", "ts", "r", "n", "nr")


class HealthTracker:
    """Aging, rate scalar, SoH, RUL and knees of every pack, from checkpoints of its operation.

    Args:
        meta: pack_meta rows (``pack``, ``chemistry``, ``rated_capacity_ah``; optionally
            ``life``, ``intake_soh``, ``first_life`` and ``commissioned_ms``).
        options: tuning.
        eol_soh: end-of-life SoH per pack id, overriding the defaults by life.

    Examples:
        >>> import numpy as np, polars as pl
        >>> meta = pl.DataFrame({"pack": ["a"], "chemistry": ["lfp"], "rated_capacity_ah": [100.0],
        ...     "life": ["new"], "commissioned_ms": [0]})
        >>> tracker = HealthTracker(meta, HealthOptions(aging_clock_scale=50.0))
        >>> t0 = 86_400_000 * 400
        >>> for k in range(24 * 60 * 2):  # two days, a checkpoint a minute, 1 EFC a day
        ...     i = 8.33 if (k // 360) % 2 == 0 else -8.33
        ...     tracker.checkpoint(ts_ms=t0 + k * 60_000, soc=np.array([0.5]), temp_c=np.array([25.0]),
        ...         current_a=np.array([i]), capacity_ah=np.array([97.0]), capacity_std_ah=np.array([1.0]),
        ...         valid=np.array([True]))
        >>> est = tracker.estimate()
        >>> round(float(est.soh[0]), 2), bool(est.rul_days_p5[0] <= est.rul_days_p50[0] <= est.rul_days_p95[0])
        (0.97, True)
        >>> est.model
        ('lfp_gr_250ah_prismatic',)
    """

    def __init__(
        self,
        meta: pl.DataFrame,
        options: HealthOptions = HealthOptions(),
        *,
        eol_soh: Mapping[str, float] | None = None,
    ) -> None:
        self.options = options
        self.meta = meta
        self._eol_given = dict(eol_soh or {})
        self._packs = _Packs.from_meta(meta, options, eol_soh)
        self._grid = options.scalar_grid()
        log_grid = np.log(self._grid / options.scalar_prior_median)
        prior = -0.5 * (log_grid / options.scalar_prior_sigma) ** 2
        self._log_prior = prior - np.log(np.sum(np.exp(prior - prior.max()))) - prior.max()
        self._laws: dict[str, AgingLaw] = {name: get_aging_law(name) for name in set(self._packs.law_names)}
        self._knee = KneeModel()
        self._state = self._initial_state()
        self._cache: tuple[int, int, HealthEstimate] | None = None
        # The packs' curves placed ahead of the first checkpoint (prepare), and when (per pack).
        self._placed: tuple[_LawGroup, ...] | None = None
        self._placed_ms = np.full(len(self._packs.pack_ids), np.nan)

    @property
    def pack_ids(self) -> tuple[str, ...]:
        """The tracked packs, in the order of the estimate's arrays."""
        return self._packs.pack_ids

    # ------------------------------------------------------------------ state

    def _initial_state(self) -> HealthState:
        n = len(self._packs.pack_ids)
        g = self._grid.size
        h = int(self.options.history_points)
        zeros = np.zeros(n)
        return HealthState(
            pack_ids=self._packs.pack_ids,
            started=False,
            t0_ms=-1,
            chunk_end_ms=-1,
            groups=(),
            sums={k: zeros.copy() for k in _SUM_KEYS},
            soc_min=np.full(n, np.inf),
            soc_max=np.full(n, -np.inf),
            occupancy=np.zeros((n, SOC_GRID.size)),
            last_ts_ms=np.full(n, -1, dtype=np.int64),
            last_soc=np.full(n, np.nan),
            last_temp_c=np.full(n, np.nan),
            last_throughput_ah=np.full(n, np.nan),
            capacity_ah=self._packs.rated_ah * self._packs.soh_prior,
            obs_ah=np.full(n, np.nan),
            obs_var_ah2=np.full(n, np.nan),
            obs_r=np.full(n, np.nan),
            cal_a=np.zeros((n, g)),
            cal_b=np.zeros((n, g)),
            cal_c=zeros.copy(),
            efc=zeros.copy(),
            duty={k: zeros.copy() for k in _DUTY_KEYS},
            duty_occupancy=np.zeros((n, SOC_GRID.size)),
            chunks=0,
            in_validity=np.zeros(n, dtype=np.int64),
            hist={k: np.zeros((n, h)) for k in _HIST_KEYS},
            hist_len=0,
            hist_merge=1,
            hist_fill=0,
        )

    def snapshot(self) -> HealthState:
        """Return the state (immutable; restoring it later resumes exactly here)."""
        return self._state

    def restore(self, state: HealthState) -> None:
        """Resume from a snapshot of a tracker over the same packs.

        Raises:
            EstimatorError: for a state of other packs.
        """
        if state.pack_ids != self.pack_ids or state.cal_a.shape[1] != self._grid.size:
            msg = "health state does not fit these packs and options"
            raise EstimatorError(msg)
        self._state = state
        self._cache = None

    def clone(self) -> HealthTracker:
        """Return a tracker with the same meta and options and a fresh state."""
        return HealthTracker(self.meta, self.options, eol_soh=self._eol_given)

    def grown(self, meta: pl.DataFrame) -> HealthTracker:
        """Return a tracker for a new pack set that keeps the state of every pack it already knew.

        Known packs (by id) keep their grid states, calibration, duty and history; new packs
        start at their first checkpoint. A pack whose aging law changed restarts.

        Args:
            meta: pack_meta rows of the new pack set.

        Returns:
            The new tracker (this one is unchanged).
        """
        out = HealthTracker(meta, self.options, eol_soh=self._eol_given)
        old, new = self._state, out._state
        where = {p: i for i, p in enumerate(old.pack_ids)}
        old_law = dict(zip(self._packs.pack_ids, self._packs.law_names, strict=True))
        keep = [
            (i, where[p])
            for i, p in enumerate(out._packs.pack_ids)
            if p in where and old_law[p] == out._packs.law_names[i]
        ]
        if not old.started and keep and self._placed is not None:
            # Not tracking yet: the packs already placed keep their curves (prepare places the rest).
            known = [(d, s_) for d, s_ in keep if np.isfinite(self._placed_ms[s_])]
            if known:
                unplaced = np.zeros(len(out._packs.pack_ids), dtype=np.bool_)
                base = out._start_groups(0, only=unplaced)  # the laws' initial states only
                laws = {p: old_law[p] for p in old_law if np.isfinite(self._placed_ms[where[p]])}
                out._placed = _carry_groups(base, self._placed, out._packs, where, laws, self._grid.size)
                dst, src = (np.array(side, dtype=np.intp) for side in zip(*known, strict=True))
                out._placed_ms[dst] = self._placed_ms[src]
        if not old.started or not keep:
            return out
        dst = np.array([d for d, _ in keep], dtype=np.intp)
        src = np.array([s for _, s in keep], dtype=np.intp)

        def carry(fresh: NDArray[Any], stale: NDArray[Any]) -> Any:
            arr = np.array(fresh, copy=True)
            arr[dst] = stale[src]
            return arr

        changes: dict[str, Any] = {}
        for name in (
            "soc_min",
            "soc_max",
            "occupancy",
            "last_ts_ms",
            "last_soc",
            "last_temp_c",
            "last_throughput_ah",
            "capacity_ah",
            "obs_ah",
            "obs_var_ah2",
            "obs_r",
            "cal_a",
            "cal_b",
            "cal_c",
            "efc",
            "duty_occupancy",
            "in_validity",
        ):
            changes[name] = carry(getattr(new, name), getattr(old, name))
        for name, keys in (("sums", _SUM_KEYS), ("duty", _DUTY_KEYS), ("hist", _HIST_KEYS)):
            changes[name] = {k: carry(getattr(new, name)[k], getattr(old, name)[k]) for k in keys}
        # Grid states: place the new packs, then put the known packs' rows back.
        t0 = old.t0_ms
        fresh = np.ones(len(out._packs.pack_ids), dtype=np.bool_)
        fresh[dst] = False
        groups = out._start_groups(t0, only=fresh)
        rebuilt = _carry_groups(groups, old.groups, out._packs, where, old_law, self._grid.size)
        out._state = dataclasses.replace(
            new,
            started=True,
            t0_ms=t0,
            chunk_end_ms=old.chunk_end_ms,
            groups=tuple(rebuilt),
            chunks=old.chunks,
            hist_len=old.hist_len,
            hist_merge=old.hist_merge,
            hist_fill=old.hist_fill,
            **changes,
        )
        return out

    # ------------------------------------------------------------------ inputs

    def prepare(self) -> None:
        """Place the packs on their laws' curves now, each at its metadata's time.

        The placement walks every pack's first life for every grid scalar (about 2 s for the
        805 packs of nevada). Done when the metadata arrives, it does not stall the first
        batch of telemetry; packs already placed are not placed again. The result does not
        depend on when this runs (see :meth:`_placement`).
        """
        if self._state.started:
            return
        todo = np.isfinite(self._packs.meta_ms) & ~np.isfinite(self._placed_ms)
        if not todo.any():
            return
        at = np.where(todo, self._packs.meta_ms, 0.0)
        fresh = self._start_groups(at, only=todo)
        self._placed = fresh if self._placed is None else _merge_rows(self._placed, fresh, todo, self._grid.size)
        self._placed_ms = np.where(todo, self._packs.meta_ms, self._placed_ms)

    def _placement(self, first_ms: int) -> tuple[_LawGroup, ...]:
        """The packs' curves at the start of tracking (the first checkpoint at ``first_ms``).

        Each pack with a metadata time is placed at it (by :meth:`prepare`, ahead); when the
        first checkpoint comes more than a day later (metadata retained for long), its curves
        are advanced over the gap by the site's assumed duty, a few steps. A pack without a
        metadata time is placed at the first checkpoint. Each pack's rows depend on its own
        metadata and on the first checkpoint's time only.
        """
        self.prepare()
        meta_ms = self._packs.meta_ms
        ready = np.isfinite(meta_ms) & (self._placed_ms == meta_ms) & (meta_ms <= first_ms)
        if self._placed is None or not ready.any():
            return self._start_groups(float(first_ms))
        groups = self._placed
        if not ready.all():
            groups = _merge_rows(groups, self._start_groups(float(first_ms), only=~ready), ~ready, self._grid.size)
        late = ready & (first_ms - meta_ms > _MS_PER_DAY)
        if late.any():
            groups = self._advance(groups, np.where(late, (first_ms - meta_ms) / _MS_PER_DAY, 0.0))
        return groups

    def _advance(self, groups: tuple[_LawGroup, ...], days: F64) -> tuple[_LawGroup, ...]:
        """Age placed curves by ``days`` per pack at the site's assumed duty (before tracking starts)."""
        g = self._grid.size
        out = []
        for grp in groups:
            law = self._laws[grp.name]
            d = np.repeat(days[grp.members], g)
            rows = np.flatnonzero(d > 0)
            if rows.size == 0:
                out.append(grp)
                continue
            sub = _take_state(grp.state, rows)
            q_before = np.asarray(sub.q, dtype=np.float64).copy()
            base = first_life_stressors(np.zeros(rows.size))
            scalar = np.tile(self._grid, grp.members.size)[rows]
            left = d[rows].copy()
            while np.any(left > 0):
                # Steps grow with the law's age (a long step right after a short life would
                # overshoot BLAST-Lite's incremental power laws), up to the placement's chunk.
                dt = np.minimum(left, np.clip(0.25 * np.asarray(sub.t_days), 1.0, _FIRST_LIFE_CHUNK_DAYS))
                efc = self.options.site_efc_per_day_prior * dt
                sub = law.step(sub, dataclasses.replace(base, dt_days=dt, efc=efc), scalar=scalar)
                left = left - dt
            state = _put_state(grp.state, rows, sub)
            fade = grp.site_fade.copy()
            fade[rows] = fade[rows] * np.asarray(sub.q) / np.maximum(q_before, _MIN_CURVE_Q)
            out.append(dataclasses.replace(grp, state=state, q0=state.q.copy(), efc0=state.efc.copy(), site_fade=fade))
        return tuple(out)

    def _start_groups(self, t0_ms: float | F64, only: B | None = None) -> tuple[_LawGroup, ...]:
        """Place every pack on its law's curve at the start of tracking, for every grid scalar.

        Args:
            t0_ms: when each pack is placed (one time, or one per pack).
            only: packs to place (the others keep the law's initial state; :meth:`grown`
                puts their known states back), default all.
        """
        o, pk = self.options, self._packs
        g = self._grid.size
        t0 = np.broadcast_to(np.asarray(t0_ms, dtype=np.float64), pk.commissioned_ms.shape)
        site_days = np.where(np.isfinite(pk.commissioned_ms), (t0 - pk.commissioned_ms) / _MS_PER_DAY, 0.0)
        site_days = np.maximum(site_days, 0.0)
        days = pk.first_life_days + site_days
        # Less than a day of history is none: one tiny first step would put the power laws on
        # their steep start and the next (BLAST-Lite incremental) step would overshoot.
        days = np.where(days < 1.0, 0.0, days)
        if only is not None:
            days = np.where(only, days, 0.0)
        efc_total = pk.first_life_efc + o.site_efc_per_day_prior * site_days
        per_day = efc_total / np.maximum(days, 1.0)
        groups = []
        for name in sorted(self._laws):
            law = self._laws[name]
            members = np.flatnonzero(np.array([x == name for x in pk.law_names])).astype(np.intp)
            state = law.initial_state(members.size * g)
            fade = np.ones(members.size * g)
            # Only the rows with a life to walk are stepped (one pack joining costs one pack).
            rows = np.flatnonzero(np.repeat(days[members], g) > 0)
            if rows.size:
                d = np.repeat(days[members], g)[rows]
                first = np.minimum(np.repeat(pk.first_life_days[members], g)[rows], d)
                rate = np.repeat(per_day[members], g)[rows]
                scalar = np.tile(self._grid, members.size)[rows]
                sub = _take_state(state, rows)
                q_intake = np.asarray(sub.q, dtype=np.float64).copy()
                # The first-life stressors are constant: built once, only the chunk length changes.
                base = first_life_stressors(np.zeros(rows.size))
                # Chunks end at commissioning, where the intake test measured the pack.
                chunks = int(np.ceil(first.max() / _FIRST_LIFE_CHUNK_DAYS) + np.ceil(d.max() / _FIRST_LIFE_CHUNK_DAYS))
                for _ in range(chunks + 1):
                    target = np.where(sub.t_days < first, first, d)
                    dt = np.clip(target - sub.t_days, 0.0, _FIRST_LIFE_CHUNK_DAYS)
                    if not np.any(dt > 0):
                        break
                    sub = law.step(sub, dataclasses.replace(base, dt_days=dt, efc=rate * dt), scalar=scalar)
                    q_intake = np.where((first > 0) & np.isclose(sub.t_days, first), np.asarray(sub.q), q_intake)
                state = _put_state(state, rows, sub)
                fade[rows] = np.asarray(sub.q) / np.maximum(q_intake, _MIN_CURVE_Q)
            groups.append(
                _LawGroup(
                    name=name,
                    members=members,
                    state=state,
                    q0=state.q.copy(),
                    efc0=state.efc.copy(),
                    site_fade=fade,
                )
            )
        return tuple(groups)

    def checkpoint(
        self,
        *,
        ts_ms: int,
        soc: F64,
        temp_c: F64,
        current_a: F64,
        capacity_ah: F64,
        capacity_std_ah: F64,
        valid: B,
        throughput_ah: F64 | None = None,
        resistance_ohm_25c: F64 | None = None,
    ) -> None:
        """Offer every pack's state at one grid time (arrays aligned with :attr:`pack_ids`).

        The interval since a pack's previous checkpoint is added to the chunk with the
        trapezoid of SoC and temperature and this checkpoint's current; when ``ts_ms`` reaches
        the chunk boundary the chunk closes: the laws advance, the capacity observation is
        weighed, the duty statistics and the knee history are updated.

        Args:
            ts_ms: the checkpoint's event time, ms (non-decreasing; earlier ones are ignored).
            soc: usable SoC per pack (the SoC filter's), fraction.
            temp_c: cell temperature per pack (``temp_avg_c``), °C.
            current_a: mean current since the previous checkpoint (or the latest sample), A,
                positive on discharge.
            capacity_ah: the capacity estimate per pack, Ah; NaN where it rests on no
                measurement (the prior alone must not count as data).
            capacity_std_ah: its standard deviation, Ah.
            valid: packs whose values are current (fresh telemetry at this checkpoint); for
                the others the interval is calendar time at the held SoC and temperature.
            throughput_ah: cumulative |charge| per pack, A·h (its increments give the EFC
                exactly); without it, ``|current_a|`` times the interval.
            resistance_ohm_25c: resistance per pack at 25 °C (for resistance knees), Ω.

        Raises:
            EstimatorError: arrays of the wrong length.
        """
        n = len(self.pack_ids)
        arrays = {
            "soc": soc,
            "temp_c": temp_c,
            "current_a": current_a,
            "capacity_ah": capacity_ah,
            "capacity_std_ah": capacity_std_ah,
            "valid": valid,
        }
        if throughput_ah is not None:
            arrays["throughput_ah"] = throughput_ah
        if resistance_ohm_25c is not None:
            arrays["resistance_ohm_25c"] = resistance_ohm_25c
        for name, value in arrays.items():
            if np.shape(value) != (n,):
                msg = f"HealthTracker.checkpoint: {name} has shape {np.shape(value)}, expected ({n},)"
                raise EstimatorError(msg)
        s = self._state
        ts = int(ts_ms)
        if not s.started:
            grid = round(self.options.chunk_s * 1000)
            s = dataclasses.replace(
                s, started=True, t0_ms=ts, chunk_end_ms=(ts // grid + 1) * grid, groups=self._placement(ts)
            )
        self._state = _accumulate(s, ts, arrays, self.options)
        if ts >= self._state.chunk_end_ms:
            self._close_chunk(ts)  # the estimate's cache is keyed by the closed chunks

    # ------------------------------------------------------------------ chunks

    def _close_chunk(self, ts_ms: int) -> None:
        s, o, pk = self._state, self.options, self._packs
        n = len(pk.pack_ids)
        g = self._grid.size
        stress = _chunk_stressors(s, o.aging_clock_scale)
        groups = []
        inside = np.zeros(n, dtype=np.bool_)
        ratio = np.zeros((n, g))
        for grp in s.groups:
            law = self._laws[grp.name]
            sub = _take(stress, grp.members, g)
            new = law.step(grp.state, sub, scalar=np.tile(self._grid, grp.members.size))
            groups.append(dataclasses.replace(grp, state=new))
            flags = law.validity.flags(_take(stress, grp.members, 1))
            inside[grp.members] = ~flags.any
            ratio[grp.members] = _curve_ratio(new.q, grp.q0).reshape(grp.members.size, g)
        has_time = s.sums["t"] > 0
        # The chunk's capacity observation, weighed for every grid scalar.
        y = s.obs_ah / pk.rated_ah
        inflation = max(1.0, o.capacity_corr_s / o.chunk_s)
        var = s.obs_var_ah2 / pk.rated_ah**2 * inflation + o.model_error_soh**2
        seen = np.isfinite(y) & np.isfinite(var)
        w = np.where(seen, 1.0 / np.where(seen, var, 1.0), 0.0)
        y0 = np.where(seen, y, 0.0)
        cal_a = s.cal_a + w[:, None] * ratio * ratio
        cal_b = s.cal_b + (w * y0)[:, None] * ratio
        cal_c = s.cal_c + w * y0 * y0
        # Exponentially weighted duty (memory duty_days).
        days = s.sums["t"] / 86_400.0
        decay = math.exp(-o.chunk_s / 86_400.0 / o.duty_days)
        t_safe = np.maximum(s.sums["t"], 1e-9)
        chunk = {
            "temp": stress_temp_c(stress),
            "soc": np.asarray(stress.soc_mean),
            "dod": np.asarray(stress.dod),
            "c_mean": np.asarray(stress.c_rate_mean),
            "c_chg": np.asarray(stress.c_rate_charge_mean),
            "c_dis": np.asarray(stress.c_rate_discharge_mean),
            "efc_per_day": s.sums["abs_c"] / 3600.0 / 2.0 / np.maximum(days, 1e-12),
        }
        weight = np.where(has_time, days, 0.0)
        duty = {"w": decay * s.duty["w"] + weight}
        for k, v in chunk.items():
            duty[k] = decay * s.duty[k] + weight * np.where(has_time, v, 0.0)
        occ = s.occupancy / t_safe[:, None]
        duty_occ = decay * s.duty_occupancy + weight[:, None] * np.where(has_time[:, None], occ, 0.0)
        efc = s.efc + s.sums["abs_c"] / 3600.0 / 2.0
        hist = _record(s, efc, y, ts_ms, s.obs_r)
        n_hist = self.options.history_points
        grid_ms = round(o.chunk_s * 1000)
        self._state = dataclasses.replace(
            s,
            chunk_end_ms=(ts_ms // grid_ms + 1) * grid_ms,
            groups=tuple(groups),
            sums={k: np.zeros(n) for k in _SUM_KEYS},
            soc_min=np.full(n, np.inf),
            soc_max=np.full(n, -np.inf),
            occupancy=np.zeros((n, SOC_GRID.size)),
            obs_ah=np.full(n, np.nan),
            obs_var_ah2=np.full(n, np.nan),
            obs_r=np.full(n, np.nan),
            cal_a=cal_a,
            cal_b=cal_b,
            cal_c=cal_c,
            efc=efc,
            duty=duty,
            duty_occupancy=duty_occ,
            chunks=s.chunks + 1,
            in_validity=s.in_validity + (inside & has_time),
            **_decimated(hist, n_hist),
        )

    # ------------------------------------------------------------------ outputs

    def _posterior(self) -> tuple[F64, F64, F64, F64]:
        """Return the posterior weights over the grid (n, G) and h0's mean, variance per grid point, and r now."""
        s, o, pk = self._state, self.options, self._packs
        n, g = len(pk.pack_ids), self._grid.size
        # The intake SoH less the fade each grid scalar implies since commissioning.
        fade = np.ones((n, g))
        for grp in s.groups:
            fade[grp.members] = grp.site_fade.reshape(grp.members.size, g)
        mu0 = pk.soh_prior[:, None] * fade
        p0 = 1.0 / o.soh_prior_std**2
        a = s.cal_a + p0
        b = s.cal_b + mu0 * p0
        loglik = -0.5 * (s.cal_c[:, None] + mu0 * mu0 * p0 - b * b / a) - 0.5 * np.log(a / p0)
        logw = self._log_prior[None, :] + loglik
        ratio = np.ones((n, g))
        placed = np.ones((n, g), dtype=np.bool_)
        for grp in s.groups:
            ratio[grp.members] = _curve_ratio(grp.state.q, grp.q0).reshape(grp.members.size, g)
            placed[grp.members] = (grp.q0 > _MIN_CURVE_Q).reshape(grp.members.size, g)
        # A scalar whose first life would have worn the law's capacity out is not this pack's.
        placed |= ~placed.any(axis=1, keepdims=True)
        logw = np.where(placed, logw, -np.inf)
        logw -= logw.max(axis=1, keepdims=True)
        w = np.exp(logw)
        w /= w.sum(axis=1, keepdims=True)
        return w, b / a, 1.0 / a, ratio

    def estimate(self) -> HealthEstimate:
        """Return SoH, rate scalar, RUL quantiles and knees of every pack."""
        s = self._state
        # Everything below changes only when a chunk closes (posterior, duty, laws, knee
        # history): the forecast, the costly part, runs once per chunk, not per call.
        key = (s.chunks, id(self._packs))
        if self._cache is not None and self._cache[:2] == key:
            return self._cache[2]
        o, pk = self.options, self._packs
        n = len(pk.pack_ids)
        w, h0, h0_var, ratio = self._posterior()
        soh_g = h0 * ratio
        soh = np.sum(w * soh_g, axis=1)
        soh_var = np.sum(w * (h0_var * ratio * ratio + soh_g * soh_g), axis=1) - soh * soh
        cdf = np.cumsum(w, axis=1)
        log_grid = np.log(self._grid)

        def scalar_quantile(q: float) -> F64:
            idx = np.clip((cdf < q).sum(axis=1), 0, self._grid.size - 1)
            return np.asarray(self._grid[idx], dtype=np.float64)

        rate = np.exp(np.sum(w * log_grid[None, :], axis=1))
        knee, knee_ms, rknee, rknee_ms = _knees(s, o)
        rul = self._forecast(w, h0, h0_var, knee, knee_ms) if s.chunks > 0 else None
        nan = np.full(n, np.nan)
        out = HealthEstimate(
            pack_ids=pk.pack_ids,
            soh=soh,
            soh_std=np.sqrt(np.maximum(soh_var, 0.0)),
            rul_days_p5=rul[0] if rul else nan,
            rul_days_p50=rul[1] if rul else nan,
            rul_days_p95=rul[2] if rul else nan,
            rul_efc_p5=rul[3] if rul else nan,
            rul_efc_p50=rul[4] if rul else nan,
            rul_efc_p95=rul[5] if rul else nan,
            eol_soh=pk.eol_soh.copy(),
            knee=knee,
            knee_onset_ms=knee_ms,
            resistance_knee=rknee,
            resistance_knee_onset_ms=rknee_ms,
            rate_scalar=rate,
            rate_scalar_p5=scalar_quantile(0.05),
            rate_scalar_p95=scalar_quantile(0.95),
            efc=s.efc.copy(),
            validity_share=np.where(s.chunks > 0, s.in_validity / max(s.chunks, 1), np.nan),
            model=pk.law_names,
        )
        self._cache = (key[0], key[1], out)
        return out

    def _forecast(self, w: F64, h0: F64, h0_var: F64, knee: B, knee_ms: I64) -> tuple[F64, ...]:
        """Run the laws forward under the recent duty; return RUL days P5/P50/P95 and EFC P5/P50/P95.

        Each pack runs for ``rul_quantile_points`` quantiles of its rate scalar (and three
        levels each); a pack with a knee risk (:attr:`HealthOptions.knee_risk_second_life`)
        and no detected knee runs once more at its median scalar with a knee beginning now,
        weighed by the risk.
        """
        s, o, pk = self._state, self.options, self._packs
        n, g = len(pk.pack_ids), self._grid.size
        m = int(o.rul_quantile_points)
        levels = (np.arange(m) + 0.5) / m
        cdf = np.cumsum(w, axis=1)
        pick = np.clip((cdf[:, None, :] < levels[None, :, None]).sum(axis=2), 0, g - 1)  # (n, m) grid indices
        risk = np.where(knee, 0.0, np.where(pk.second_life, o.knee_risk_second_life, o.knee_risk_new))
        duty = _duty(s)
        scale = o.aging_clock_scale
        days = np.full((n, m + 1, 3), np.inf)  # the last: a knee beginning now
        efcs = np.full((n, m + 1, 3), np.inf)
        onset_all = _onset_efc(s, knee, knee_ms)
        for grp in s.groups:
            law = self._laws[grp.name]
            mem = grp.members
            risky = np.flatnonzero(risk[mem] > 0.0)  # members that also run with a knee now
            picked = np.concatenate([pick[mem].reshape(-1), pick[mem[risky], m // 2]])  # grid index per row
            local = np.concatenate([np.repeat(np.arange(mem.size), m), risky])
            rows = local * g + picked
            now = np.arange(rows.size) >= mem.size * m
            state = _take_state(grp.state, rows)
            q0 = grp.q0[rows]
            scalar = self._grid[picked]
            pack_of = mem[local]
            h = h0[pack_of, picked]
            hs = np.sqrt(np.maximum(h0_var[pack_of, picked], 0.0))
            target = pk.eol_soh[pack_of][:, None] / np.maximum(h[:, None] + hs[:, None] * _GH3_NODES[None, :], 1e-6)
            # Knee-aware: the extra loss of the knee model from the detected onset on (or from now).
            onset_real = np.where(now, s.efc[pack_of], onset_all[pack_of])
            has_knee = np.isfinite(onset_real)
            efc_law0 = state.efc
            x0 = np.where(has_knee, scalar * np.maximum(s.efc[pack_of] - onset_real, 0.0) * scale, 0.0)
            loss0 = self._knee.loss(x0)
            d = _take(duty, pack_of, 1)
            r_prev = state.q / np.maximum(q0, 1e-12)
            elapsed = np.zeros(rows.size)
            efc_real = np.zeros(rows.size)
            out_days = np.full((rows.size, 3), np.inf)
            out_efc = np.full((rows.size, 3), np.inf)
            already = r_prev[:, None] <= target
            out_days[already] = 0.0
            out_efc[already] = 0.0
            open_ = ~np.all(already, axis=1)
            efc_rate = np.asarray(d.efc) / np.maximum(np.asarray(d.dt_days), 1e-12)  # real EFC per real day
            while np.any(open_):
                step = np.maximum(o.step_fraction * state.t_days / scale, o.min_step_days)
                step = np.where(open_, np.minimum(step, o.horizon_days - elapsed), 0.0)
                stress = _scaled(d, step, scale)
                new = law.step(state, stress, scalar=scalar)
                extra = np.where(has_knee, self._knee.loss(x0 + scalar * (new.efc - efc_law0)) - loss0, 0.0)
                r_new = (new.q - extra) / np.maximum(q0, 1e-12)
                crossed = open_[:, None] & (r_new[:, None] <= target) & ~np.isfinite(out_days)
                frac = np.clip((r_prev[:, None] - target) / np.maximum((r_prev - r_new)[:, None], 1e-15), 0.0, 1.0)
                out_days = np.where(crossed, elapsed[:, None] + frac * step[:, None], out_days)
                out_efc = np.where(crossed, efc_real[:, None] + frac * (step * efc_rate)[:, None], out_efc)
                elapsed += step
                efc_real += step * efc_rate
                r_prev, state = r_new, new
                open_ = open_ & ~np.all(np.isfinite(out_days), axis=1) & (elapsed < o.horizon_days - 1e-9)
            base = mem.size * m
            days[mem, :m] = out_days[:base].reshape(mem.size, m, 3)
            efcs[mem, :m] = out_efc[:base].reshape(mem.size, m, 3)
            days[mem[risky], m] = out_days[base:]
            efcs[mem[risky], m] = out_efc[base:]
        weight = np.empty((n, m + 1, 3))
        weight[:, :m] = _GH3_WEIGHTS[None, None, :] / m * (1.0 - risk)[:, None, None]
        weight[:, m] = _GH3_WEIGHTS[None, :] * risk[:, None]
        qd = _weighted_quantiles(days.reshape(n, -1), weight.reshape(n, -1), (0.05, 0.5, 0.95))
        qe = _weighted_quantiles(efcs.reshape(n, -1), weight.reshape(n, -1), (0.05, 0.5, 0.95))
        return (*qd, *qe)

    def __repr__(self) -> str:
        """Return a short description."""
        return f"HealthTracker({len(self.pack_ids)} packs, {self._state.chunks} chunks)"


def prior_soh(
    meta: pl.DataFrame, at_ms: int, options: HealthOptions = HealthOptions()
) -> tuple[dict[str, float], dict[str, float]]:
    """Each pack's SoH prior at ``at_ms`` and its spread from the unknown rate scalar.

    The mean is the intake SoH (1 if new) times the fade since commissioning, averaged over the
    scalar's prior; the spread is that fade's standard deviation under the same prior (the law
    placed on its curve as the tracker places it: first life at :data:`FIRST_LIFE`, then the
    site's life at :attr:`HealthOptions.site_efc_per_day_prior`). For estimators that need one
    number per pack before any capacity is measured; the intake test's own error is not in the
    spread.

    Returns:
        SoH prior by pack id, and its standard deviation (SoH points) by pack id.
    """
    coarse = dataclasses.replace(options, scalar_grid_points=9)
    tracker = HealthTracker(meta, coarse)
    g = tracker._grid.size
    weight = np.exp(tracker._log_prior)
    weight /= weight.sum()
    n = len(tracker.pack_ids)
    fade = np.ones((n, g))
    placed = np.ones((n, g), dtype=np.bool_)
    for grp in tracker._start_groups(at_ms):
        fade[grp.members] = grp.site_fade.reshape(grp.members.size, g)
        placed[grp.members] = (grp.q0 > _MIN_CURVE_Q).reshape(grp.members.size, g)
    placed |= ~placed.any(axis=1, keepdims=True)  # as the posterior weighs them
    w = np.where(placed, weight[None, :], 0.0)
    w /= w.sum(axis=1, keepdims=True)
    soh = tracker._packs.soh_prior[:, None] * fade
    mean = np.sum(w * soh, axis=1)
    std = np.sqrt(np.maximum(np.sum(w * (soh - mean[:, None]) ** 2, axis=1), 0.0))
    mean = np.clip(mean, 0.05, 1.2)
    ids = tracker.pack_ids
    return (
        {p: float(v) for p, v in zip(ids, mean, strict=True)},
        {p: float(v) for p, v in zip(ids, std, strict=True)},
    )


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def stress_temp_c(stress: Stressors) -> F64:
    """Return the stressors' temperature in °C."""
    out: F64 = np.asarray(stress.temp_k) - 273.15
    return out


def _accumulate(s: HealthState, ts: int, x: Mapping[str, Any], o: HealthOptions) -> HealthState:
    """Add the interval since each pack's previous checkpoint to the chunk sums (pure)."""
    newer = ts > s.last_ts_ms  # an older or repeated checkpoint changes nothing
    valid = np.asarray(x["valid"], dtype=np.bool_) & newer
    soc = np.asarray(x["soc"], dtype=np.float64)
    temp = np.asarray(x["temp_c"], dtype=np.float64)
    cur = np.asarray(x["current_a"], dtype=np.float64)
    cap_est = np.asarray(x["capacity_ah"], dtype=np.float64)
    cap_std = np.asarray(x["capacity_std_ah"], dtype=np.float64)
    new_soc = np.clip(np.where(valid & np.isfinite(soc), soc, s.last_soc), 0.0, 1.0)
    new_temp = np.where(valid & np.isfinite(temp), temp, s.last_temp_c)
    prev_soc = np.where(np.isfinite(s.last_soc), s.last_soc, new_soc)
    prev_temp = np.where(np.isfinite(s.last_temp_c), s.last_temp_c, new_temp)
    started = (s.last_ts_ms >= 0) & newer
    known = np.isfinite(new_soc) & np.isfinite(new_temp) & np.isfinite(prev_soc) & np.isfinite(prev_temp)
    dt = np.where(started & known, (ts - s.last_ts_ms) / 1000.0, 0.0)
    gap = dt > o.max_gap_s
    mid_soc = np.where(gap, prev_soc, 0.5 * (prev_soc + new_soc))
    mid_temp = np.where(gap, prev_temp, 0.5 * (prev_temp + new_temp))
    capacity = np.where(np.isfinite(cap_est) & (cap_est > 0), cap_est, s.capacity_ah)
    moving = valid & np.isfinite(cur) & ~gap
    amps = np.where(moving, cur, 0.0)
    if "throughput_ah" in x:
        thr = np.asarray(x["throughput_ah"], dtype=np.float64)
        d_thr = np.where(np.isfinite(thr) & np.isfinite(s.last_throughput_ah), thr - s.last_throughput_ah, np.nan)
        use = moving & np.isfinite(d_thr) & (d_thr >= 0)
        abs_ah = np.where(use, d_thr, np.abs(amps) * dt / 3600.0)
        last_thr = np.where(newer & np.isfinite(thr), thr, s.last_throughput_ah)
    else:
        abs_ah = np.abs(amps) * dt / 3600.0
        last_thr = s.last_throughput_ah
    c_dt = abs_ah * 3600.0 / np.maximum(capacity, 1e-9)  # |I|/Q x dt, s/h
    rest = c_dt < REST_C_RATE * dt  # BLAST-Lite's rest threshold
    charging = (amps < 0) & ~rest
    discharging = (amps > 0) & ~rest
    sums = {
        "t": s.sums["t"] + dt,
        "soc": s.sums["soc"] + np.where(dt > 0, mid_soc, 0.0) * dt,  # 0 x NaN is NaN
        "temp": s.sums["temp"] + np.where(dt > 0, mid_temp, 0.0) * dt,
        "abs_c": s.sums["abs_c"] + np.where(rest, 0.0, c_dt),
        "chg_c": s.sums["chg_c"] + np.where(charging, c_dt, 0.0),
        "chg_t": s.sums["chg_t"] + np.where(charging, dt, 0.0),
        "dis_c": s.sums["dis_c"] + np.where(discharging, c_dt, 0.0),
        "dis_t": s.sums["dis_t"] + np.where(discharging, dt, 0.0),
    }
    counted = dt > 0
    occupancy = s.occupancy.copy()
    pos = np.clip(np.where(counted, mid_soc, 0.5), 0.0, 1.0) * (SOC_GRID.size - 1)
    lo = np.minimum(pos.astype(np.intp), SOC_GRID.size - 2)
    frac = pos - lo
    rows = np.arange(soc.size)
    occupancy[rows, lo] += (1.0 - frac) * dt
    occupancy[rows, lo + 1] += frac * dt
    soc_min = np.where(counted, np.minimum(s.soc_min, np.minimum(prev_soc, new_soc)), s.soc_min)
    soc_max = np.where(counted, np.maximum(s.soc_max, np.maximum(prev_soc, new_soc)), s.soc_max)
    obs_ok = valid & np.isfinite(cap_est) & np.isfinite(cap_std) & (cap_est > 0) & (cap_std > 0)
    r_in = np.asarray(x.get("resistance_ohm_25c", np.full(soc.size, np.nan)), dtype=np.float64)
    return dataclasses.replace(
        s,
        sums=sums,
        soc_min=soc_min,
        soc_max=soc_max,
        occupancy=occupancy,
        last_ts_ms=np.where(newer, ts, s.last_ts_ms).astype(np.int64),
        last_soc=np.where(newer, new_soc, s.last_soc),
        last_temp_c=np.where(newer, new_temp, s.last_temp_c),
        last_throughput_ah=last_thr,
        capacity_ah=np.where(obs_ok, cap_est, s.capacity_ah),
        obs_ah=np.where(obs_ok, cap_est, s.obs_ah),
        obs_var_ah2=np.where(obs_ok, cap_std * cap_std, s.obs_var_ah2),
        obs_r=np.where(valid & np.isfinite(r_in), r_in, s.obs_r),
    )


def _chunk_stressors(s: HealthState, scale: float) -> Stressors:
    """The closed chunk's stressors per pack, as the laws see them (time and EFC times ``scale``)."""
    t = s.sums["t"]
    has = t > 0
    t_safe = np.where(has, t, 1.0)
    occupancy = np.where(has[:, None], s.occupancy / t_safe[:, None], 0.0)
    occupancy[~has, _MID_NODE] = 1.0
    return Stressors(
        dt_days=t / 86_400.0 * scale,
        temp_k=np.where(has, s.sums["temp"] / t_safe, 25.0) + 273.15,
        soc_mean=np.where(has, s.sums["soc"] / t_safe, 0.5),
        dod=np.where(has, np.clip(s.soc_max - s.soc_min, 0.0, 1.0), 0.0),
        c_rate_mean=np.where(has, s.sums["abs_c"] / t_safe, 0.0),
        c_rate_charge_mean=s.sums["chg_c"] / np.maximum(s.sums["chg_t"], 1e-9),
        c_rate_discharge_mean=s.sums["dis_c"] / np.maximum(s.sums["dis_t"], 1e-9),
        efc=s.sums["abs_c"] / 3600.0 / 2.0 * scale,
        soc_occupancy=occupancy,
    )


def _take(stress: Stressors, idx: IP, repeat: int) -> Stressors:
    """The stressors of packs ``idx``, each repeated ``repeat`` times (pack-major)."""

    def pick(a: F64) -> F64:
        return np.repeat(np.asarray(a)[idx], repeat, axis=0)

    return Stressors(
        dt_days=pick(stress.dt_days),
        temp_k=pick(stress.temp_k),
        soc_mean=pick(stress.soc_mean),
        dod=pick(stress.dod),
        c_rate_mean=pick(stress.c_rate_mean),
        c_rate_charge_mean=pick(stress.c_rate_charge_mean),
        c_rate_discharge_mean=pick(stress.c_rate_discharge_mean),
        efc=pick(stress.efc),
        soc_occupancy=pick(stress.soc_occupancy),
    )


def _scaled(day: Stressors, days: F64, scale: float) -> Stressors:
    """``days`` (real, per row) of a one-day duty, as the laws see them."""
    return Stressors(
        dt_days=days * scale,
        temp_k=day.temp_k,
        soc_mean=day.soc_mean,
        dod=day.dod,
        c_rate_mean=day.c_rate_mean,
        c_rate_charge_mean=day.c_rate_charge_mean,
        c_rate_discharge_mean=day.c_rate_discharge_mean,
        efc=np.asarray(day.efc) * days * scale,
        soc_occupancy=day.soc_occupancy,
    )


def _take_state(state: AgingState, rows: IP) -> AgingState:
    return AgingState(**{f.name: np.asarray(getattr(state, f.name))[rows] for f in dataclasses.fields(AgingState)})


def _curve_ratio(q: F64, q0: F64) -> F64:
    """Capacity now over capacity at the start of tracking, on the law's curve, in [0, 1].

    The BLAST-Lite laws are fits that go on below zero; a grid scalar that places a pack there
    (q0 at or below :data:`_MIN_CURVE_Q`) is given no weight by the posterior, and its ratio is
    kept finite here.
    """
    out: F64 = np.where(q0 > _MIN_CURVE_Q, np.clip(q / np.maximum(q0, _MIN_CURVE_Q), 0.0, 1.0), 1.0)
    return out


def _merge_rows(base: tuple[_LawGroup, ...], other: tuple[_LawGroup, ...], packs: B, g: int) -> tuple[_LawGroup, ...]:
    """``base`` with the grid rows of ``packs`` taken from ``other`` (same laws and members)."""
    out = []
    for a, b in zip(base, other, strict=True):
        rows = np.flatnonzero(np.repeat(packs[a.members], g))
        if rows.size == 0:
            out.append(a)
            continue
        out.append(
            dataclasses.replace(
                a,
                state=_put_state(a.state, rows, _take_state(b.state, rows)),
                q0=_put_rows(a.q0, b.q0, rows),
                efc0=_put_rows(a.efc0, b.efc0, rows),
                site_fade=_put_rows(a.site_fade, b.site_fade, rows),
            )
        )
    return tuple(out)


def _put_rows(x: F64, y: F64, rows: IP) -> F64:
    z: F64 = np.array(x, copy=True)
    z[rows] = y[rows]
    return z


def _carry_groups(
    groups: tuple[_LawGroup, ...],
    old_groups: tuple[_LawGroup, ...],
    packs: _Packs,
    where: Mapping[str, int],
    old_law: Mapping[str, str],
    g: int,
) -> tuple[_LawGroup, ...]:
    """``groups`` (of ``packs``) with the rows of every pack ``old_groups`` knew under the same law."""
    old_rows = {p: (grp, j) for grp in old_groups for j, p in enumerate(np.asarray(grp.members))}
    rebuilt = []
    for grp in groups:
        arrays = {f.name: np.array(getattr(grp.state, f.name), copy=True) for f in dataclasses.fields(AgingState)}
        q0, efc0, fade = grp.q0.copy(), grp.efc0.copy(), grp.site_fade.copy()
        for j, member in enumerate(grp.members):  # per pack, only when the pack set grows
            pid = packs.pack_ids[member]
            if pid not in where or pid not in old_law or old_law[pid] != packs.law_names[member]:
                continue
            src_grp, k = old_rows[where[pid]]
            rows_new, rows_old = slice(j * g, (j + 1) * g), slice(k * g, (k + 1) * g)
            for f in dataclasses.fields(AgingState):
                arrays[f.name][rows_new] = np.asarray(getattr(src_grp.state, f.name))[rows_old]
            q0[rows_new] = src_grp.q0[rows_old]
            efc0[rows_new] = src_grp.efc0[rows_old]
            fade[rows_new] = src_grp.site_fade[rows_old]
        rebuilt.append(dataclasses.replace(grp, state=AgingState(**arrays), q0=q0, efc0=efc0, site_fade=fade))
    return tuple(rebuilt)


def _put_state(state: AgingState, rows: IP, part: AgingState) -> AgingState:
    """``state`` with ``rows`` replaced by ``part``'s rows (pure)."""
    out = {}
    for f in dataclasses.fields(AgingState):
        arr = np.array(getattr(state, f.name), copy=True)
        arr[rows] = np.asarray(getattr(part, f.name))
        out[f.name] = arr
    return AgingState(**out)


def _duty(s: HealthState) -> Stressors:
    """One real day of each pack's recent duty (exponentially weighted)."""
    d = s.duty
    w = d["w"]
    has = w > 0
    ws = np.where(has, w, 1.0)

    def mean(key: str, default: float) -> F64:
        out: F64 = np.where(has, d[key] / ws, default)
        return out

    occupancy = np.where(has[:, None], s.duty_occupancy / ws[:, None], 0.0)
    occupancy[~has, _MID_NODE] = 1.0
    occupancy /= np.maximum(occupancy.sum(axis=1, keepdims=True), 1e-12)
    return Stressors(
        dt_days=np.ones(w.size),
        temp_k=mean("temp", 25.0) + 273.15,
        soc_mean=mean("soc", 0.5),
        dod=mean("dod", 0.0),
        c_rate_mean=mean("c_mean", 0.0),
        c_rate_charge_mean=mean("c_chg", 0.0),
        c_rate_discharge_mean=mean("c_dis", 0.0),
        efc=mean("efc_per_day", 0.0),
        soc_occupancy=occupancy,
    )


def _record(s: HealthState, efc: F64, soh: F64, ts_ms: int, r: F64) -> dict[str, Any]:
    """Add the chunk's point to the knee history (summed into the slot being filled)."""
    hist = {k: v.copy() for k, v in s.hist.items()}
    slot = s.hist_len
    fill = s.hist_fill
    if slot >= hist["x"].shape[1]:
        slot = hist["x"].shape[1] - 1
    seen = np.isfinite(soh)
    y = np.where(seen, soh, 0.0)
    hist["x"][:, slot] += np.where(seen, efc, 0.0)
    hist["y"][:, slot] += y
    hist["ts"][:, slot] += np.where(seen, float(ts_ms), 0.0)
    hist["n"][:, slot] += seen
    r_seen = np.isfinite(r)
    hist["r"][:, slot] += np.where(r_seen, r, 0.0)
    hist["nr"][:, slot] += r_seen
    fill += 1
    length = s.hist_len
    if fill >= s.hist_merge:
        fill = 0
        length = slot + 1
    return {"hist": hist, "hist_len": length, "hist_fill": fill, "hist_merge": s.hist_merge}


def _decimated(h: dict[str, Any], capacity: int) -> dict[str, Any]:
    """Halve the knee history by summing adjacent slots when it is full."""
    if h["hist_len"] < capacity:
        return h
    hist = h["hist"]
    half = capacity // 2
    merged = {k: np.zeros_like(v) for k, v in hist.items()}
    for k, v in hist.items():
        merged[k][:, :half] = v[:, 0 : 2 * half : 2] + v[:, 1 : 2 * half : 2]
    return {"hist": merged, "hist_len": half, "hist_fill": 0, "hist_merge": h["hist_merge"] * 2}


def _knees(s: HealthState, o: HealthOptions) -> tuple[B, I64, B, I64]:
    """Two-segment tests of SoH and resistance against EFC over the history."""
    n = len(s.pack_ids)
    h = s.hist
    m = s.hist_len
    none = (np.zeros(n, dtype=np.bool_), np.full(n, -1, dtype=np.int64))
    if m < o.knee_min_points:
        return (*none, *none)
    cnt = h["n"][:, :m]
    ok = cnt > 0
    x = np.where(ok, h["x"][:, :m] / np.maximum(cnt, 1), np.nan)
    y = np.where(ok, h["y"][:, :m] / np.maximum(cnt, 1), np.nan)
    ts = np.where(ok, h["ts"][:, :m] / np.maximum(cnt, 1), np.nan)
    independent = min(1.0, s.hist_merge * o.chunk_s / max(o.capacity_corr_s, 1e-9))
    k_flag, k_ms = _hinge(x, y, ts, o, sign=-1.0, independent=independent)
    cr = h["nr"][:, :m]
    okr = (cr > 0) & ok
    r = np.where(okr, h["r"][:, :m] / np.maximum(cr, 1), np.nan)
    r_flag, r_ms = _hinge(np.where(okr, x, np.nan), r, ts, o, sign=1.0, independent=independent)
    return k_flag, k_ms, r_flag, r_ms


def _hinge(x: F64, y: F64, ts: F64, o: HealthOptions, *, sign: float, independent: float) -> tuple[B, I64]:
    """Fit ``y = a + b x + c max(0, x - x_j)**2`` at every history point ``j``, vectorised over packs and ``j``.

    The quadratic departure from a line is the shape of :class:`twin.chemistry.aging.KneeModel`
    (and of most measured knees, which are gradual): its ``x_j`` estimates the *onset* of the
    acceleration, where a two-line fit would find a later knee point. ``x`` is non-decreasing
    along each row (cumulative EFC), so the sums over ``k > j`` are suffix sums. A knee: the
    best fit beats the line by an F statistic above ``knee_f_min`` (degrees of freedom counted
    on independent points), the slope at the last point has the sign ``sign`` (fade: -1,
    resistance growth: +1) and is at least ``knee_slope_ratio`` times the slope before the
    onset in that direction, and the acceleration adds at least ``knee_min_extra`` (relative).
    """
    n, m = x.shape
    ok = np.isfinite(x) & np.isfinite(y)
    cnt = ok.sum(axis=1)
    flag = np.zeros(n, dtype=np.bool_)
    onset = np.full(n, -1, dtype=np.int64)
    if not np.any(cnt >= o.knee_min_points):
        return flag, onset
    w = ok.astype(np.float64)
    safe = np.maximum(cnt, 1)
    xm = np.where(ok, x, 0.0).sum(1) / safe
    xs = np.sqrt((np.where(ok, x - xm[:, None], 0.0) ** 2).sum(1) / safe)
    xs = np.where(xs > 0, xs, 1.0)
    ym = np.where(ok, y, 0.0).sum(1) / safe
    xn = np.where(ok, (x - xm[:, None]) / xs[:, None], 0.0)
    yn = np.where(ok, y - ym[:, None], 0.0)

    def suffix(a: F64) -> F64:  # sum over k > j
        total = np.cumsum(a[:, ::-1], axis=1)[:, ::-1]
        out: F64 = total - a
        return out

    p = [suffix(w * xn**k) for k in range(5)]  # sums of x^k over k > j
    py = [suffix(w * xn**k * yn) for k in range(3)]  # sums of x^k y
    xj = xn
    h2 = p[2] - 2.0 * xj * p[1] + xj**2 * p[0]  # sum (x - xj)^2
    h4 = p[4] - 4.0 * xj * p[3] + 6.0 * xj**2 * p[2] - 4.0 * xj**3 * p[1] + xj**4 * p[0]
    h2x = p[3] - 2.0 * xj * p[2] + xj**2 * p[1]
    h2y = py[2] - 2.0 * xj * py[1] + xj**2 * py[0]
    n1, x1, x2 = w.sum(1), (w * xn).sum(1), (w * xn * xn).sum(1)
    y1, xy1, yy = (w * yn).sum(1), (w * xn * yn).sum(1), (w * yn * yn).sum(1)
    xtx = np.empty((n, m, 3, 3))
    xtx[..., 0, 0] = n1[:, None]
    xtx[..., 0, 1] = xtx[..., 1, 0] = x1[:, None]
    xtx[..., 1, 1] = x2[:, None]
    xtx[..., 0, 2] = xtx[..., 2, 0] = h2
    xtx[..., 1, 2] = xtx[..., 2, 1] = h2x
    xtx[..., 2, 2] = h4
    xtx += np.eye(3) * 1e-9
    xty = np.stack([np.broadcast_to(y1[:, None], (n, m)), np.broadcast_to(xy1[:, None], (n, m)), h2y], -1)
    theta = np.linalg.solve(xtx, xty[..., None])[..., 0]
    sse_h = yy[:, None] - np.einsum("njp,njp->nj", theta, xty)
    det = n1 * x2 - x1 * x1
    b_line = np.where(det > 0, (n1 * xy1 - x1 * y1) / np.where(det > 0, det, 1.0), 0.0)
    a_line = np.where(n1 > 0, (y1 - b_line * x1) / np.maximum(n1, 1.0), 0.0)
    sse_l = yy - a_line * y1 - b_line * xy1
    rank = np.cumsum(w, axis=1) - 1.0
    side = max(o.knee_min_points // 3, 2)
    usable = ok & (rank >= side) & (rank <= cnt[:, None] - 1 - side)
    sse_h = np.where(usable, sse_h, np.inf)
    j = np.argmin(sse_h, axis=1)
    rows = np.arange(n)
    best = sse_h[rows, j]
    # Points closer than the capacity estimates' correlation time are not independent.
    dof = np.maximum(cnt * independent - 3.0, 1.0)
    fit = np.isfinite(best)
    best_f = np.where(fit, best, 0.0)
    f_stat = np.where(fit, (sse_l - best_f) / np.maximum(best_f / dof, 1e-30), 0.0)
    x_last = np.where(ok, xn, -np.inf).max(axis=1)
    span = np.maximum(x_last - xn[rows, j], 0.0)
    before = theta[rows, j, 1] * sign
    after = (theta[rows, j, 1] + 2.0 * theta[rows, j, 2] * span) * sign  # the slope at the last point
    steeper = (after > 0) & (after >= o.knee_slope_ratio * np.maximum(before, 0.0))
    extra = theta[rows, j, 2] * sign * span * span  # added by the acceleration by the last point, y units
    level = np.abs(ym) + 1e-12
    big = extra >= o.knee_min_extra * level
    flag = (cnt >= o.knee_min_points) & fit & (f_stat > o.knee_f_min) & steeper & big
    onset = np.where(flag, np.nan_to_num(ts[rows, j], nan=-1.0), -1).astype(np.int64)
    return flag, onset


def _onset_efc(s: HealthState, knee: B, knee_ms: I64) -> F64:
    """The real EFC at each flagged knee's onset (NaN without a knee)."""
    h = s.hist
    m = max(s.hist_len, 1)
    cnt = h["n"][:, :m]
    ts = np.where(cnt > 0, h["ts"][:, :m] / np.maximum(cnt, 1), np.nan)
    x = np.where(cnt > 0, h["x"][:, :m] / np.maximum(cnt, 1), np.nan)
    at = np.nanargmin(np.where(np.isfinite(ts), np.abs(ts - knee_ms[:, None]), np.inf), axis=1) if m else 0
    out: F64 = np.where(knee, x[np.arange(knee.size), at], np.nan)
    return out


def _weighted_quantiles(values: F64, weights: F64, qs: tuple[float, ...]) -> list[F64]:
    """Quantiles of weighted samples per row (inf values allowed), by the weighted CDF."""
    order = np.argsort(values, axis=1)
    v = np.take_along_axis(values, order, axis=1)
    w = np.take_along_axis(weights, order, axis=1)
    cdf = np.cumsum(w, axis=1) / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    mid = cdf - 0.5 * w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    out = []
    for q in qs:
        idx = np.clip((mid < q).sum(axis=1), 1, v.shape[1] - 1)
        rows = np.arange(v.shape[0])
        lo, hi = v[rows, idx - 1], v[rows, idx]
        m_lo, m_hi = mid[rows, idx - 1], mid[rows, idx]
        frac = np.clip((q - m_lo) / np.maximum(m_hi - m_lo, 1e-300), 0.0, 1.0)
        finite = np.isfinite(lo) & np.isfinite(hi)
        lo_f, hi_f = np.where(finite, lo, 0.0), np.where(finite, hi, 0.0)
        val = np.where(finite, lo_f + frac * (hi_f - lo_f), np.where(frac < 0.5, lo, hi))
        val = np.where(q <= m_lo, lo, val)
        out.append(np.asarray(val, dtype=np.float64))
    return out
