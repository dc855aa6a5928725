"""Pack ohmic resistance from ordinary operation: recursive least squares on current steps.

A pack's terminal voltage under a current ``i`` (positive on discharge) is, with its
chemistry's equivalent circuit (:mod:`twin.chemistry`)::

    voltage_v = level - R25 * u
    u = (i + rho1 * f1 + rho2 * f2) * temp_factor(T) * soc_factor(soc)

* ``R25``: the pack's ohmic resistance at 25 °C and 50 % SoC (cells, connectors and any
  extra series resistance), Ω: what this tracker estimates;
* ``f1``, ``f2``: the current low-passed with the chemistry's RC time constants ``tau1``,
  ``tau2`` (an RC pair's voltage is ``R1 * f1``), and ``rho1 = R1/R0``, ``rho2 = R2/R0`` the
  chemistry's ratios: aging and pack-to-pack spread scale ``R0``, ``R1`` and ``R2`` alike
  (:mod:`twin.chemistry.base`), so the RC voltage that follows a current step is predicted
  instead of being mistaken for ohmic drop;
* ``level``: everything that moves slowly, the open-circuit voltage, hysteresis and the
  current sensor's offset times ``R``. Its known drift (``dOCV/dSoC`` times the SoC change
  coulomb-counted on the *raw* readings with the capacity prior: the noise integrates away,
  whereas a lagging smoothed current would put a drift error into the level at every ramp,
  correlated with the current, and bias ``R``) is predicted; the rest is a random walk.

The two unknowns ``[level, R25]`` are estimated per pack by recursive least squares with
forgetting, written as the equivalent Kalman filter: the level forgets fast (its random walk,
:attr:`ResistanceOptions.level_rw_v_per_sqrt_s`, per cell group), so only the voltage change
*across* a current step informs ``R25``, averaged over the samples on either side;
``R25`` forgets slowly (:attr:`ResistanceOptions.resistance_rw_per_sqrt_h`) so that its
growth is followed. This is the ΔV/ΔI estimate at current steps, with the noise of one
sample's voltage averaged away over the step's plateau.

Why the regressor is conditioned first:

* **Current noise.** The measured current carries white noise (0.2 A on a BMS). Regressed on
  a noisy current, least squares is biased toward zero (errors in variables) because the
  voltage does not follow the sensor's noise. The current is therefore held between steps:
  a *step* is a sample-to-sample change larger than :attr:`ResistanceOptions.step_sigmas`
  standard deviations of the difference of two noisy readings; at a step the regressor takes
  the new reading, in between it follows the readings with the time constant
  :attr:`ResistanceOptions.current_smoothing_s` (30 s: long enough to average the noise,
  short enough that its lag behind a ramp stays small). Steps smaller than the threshold
  carry no usable information and are left to the level. After a restart both low-passes
  average all the samples so far until their time constant is reached (one noisy first
  reading is not held for a whole time constant).
* **Thresholds.** 5 standard deviations (about 1.4 A with a 0.2 A, 0.1 A-resolution sensor): at
  3.5 a day of 1 Hz samples holds tens of noise "steps", each pulling ``R`` toward zero.
* **Temperature noise.** ``temp_avg_c`` jitters by tenths of a kelvin from sample to sample;
  multiplied into ``u`` it would act like current noise. The temperature factor uses the
  temperature low-passed over :attr:`ResistanceOptions.temp_smoothing_s` (cells change
  temperature over hours).

Normalisation: ``R25`` is ``R`` divided by the chemistry's
:meth:`~twin.chemistry.CellChemistry.temp_factor` at the (smoothed) ``temp_avg_c`` and its
:meth:`~twin.chemistry.CellChemistry.soc_factor` at the pack's SoC, as the emulator's truth
``r0_ohm_25c`` (:meth:`emulators.pack.PackBank.resistance_ohm_at` at 25 °C and 50 %) defines
it: cells plus connectors, the quantity a current step sees.

The prior is the chemistry's ``R0`` at the pack's rated capacity, with the connector share
of :attr:`ResistanceOptions.connector_share`, times ``1 + EMPIRICAL_R_PER_FADE * (1 - SoH
prior)`` (:mod:`twin.chemistry.aging`: fade brings resistance with it), plus the pack's
``series_r_ohm``, with relative standard deviation :attr:`ResistanceOptions.prior_rel_std`.

Growth, two references (both reported):

* ``growth``: ``R25`` over ``R25`` at the first *confident* estimate (relative standard
  deviation below :attr:`ResistanceOptions.confident_rel_std` after at least
  :attr:`ResistanceOptions.min_steps` steps): growth since the twin has known the pack. NaN
  until then.
* ``growth_vs_nominal``: ``R25`` over the chemistry's nominal new-pack resistance at the rated
  capacity (connectors and series resistance included), growth since the pack was new.

SoC input: :meth:`ResistanceTracker.update` takes the packs' SoC as an array aligned with
:attr:`ResistanceTracker.pack_ids` (the SoC filter's mean SoC, ``SocEstimate.soc``), held
over the batch; without it a ``soc`` column of the batch is used per row, else 50 %. The SoC
only enters through the mild SoC factor and the level's predicted drift.

Data handling (per pack, in event time, as :class:`twin.estimators.soc.SocEstimator`):
rows sorted by ``(pack, ts_ms)``; a row at a time already seen is a duplicate, an older one is
late: both ignored and counted, so the state does not depend on how a time-ordered recording
is cut into batches (only each pack's last sample is carried over). An interval longer than
:attr:`ResistanceOptions.max_gap_s` restarts the level and the RC filters (the history in
between is unknown); a NaN voltage or current skips the sample's update (the last finite
current and temperature are held). Rows of unknown packs are ignored and counted.

The batch is laid out as ``(k, pack)`` arrays; the two recursions over samples (the
conditioning, then the filter) are compiled kernels (:mod:`twin._jit`), and the chemistry's
factors between them are numpy over the whole grid: no Python loop per pack or row.

References:
    Plett, G. L. (2015). Battery Management Systems, Vol. II: Equivalent-Circuit Methods,
    Artech House, ch. 4 (RLS with forgetting for ECM parameters).
    Ljung, L., Söderström, T. (1983). Theory and Practice of Recursive Identification, MIT
    Press (recursive least squares with forgetting as a Kalman filter with random-walk
    parameters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self

import numpy as np
import polars as pl
from numpy.typing import NDArray

from twin._jit import kernel
from twin.chemistry import get_chemistry
from twin.chemistry.aging import EMPIRICAL_R_PER_FADE
from twin.estimators.base import (
    Estimator,
    EstimatorError,
    check_columns,
    check_names,
    check_non_negative,
    group_time_order,
    register,
    scattered,
)
from twin.estimators.soc import PackInfo

__all__ = [
    "ResistanceEstimate",
    "ResistanceOptions",
    "ResistanceState",
    "ResistanceTracker",
    "nominal_resistance_ohm",
]

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
B = NDArray[np.bool_]
IP = NDArray[np.intp]

REQUIRED_COLUMNS: Final = ("pack", "ts_ms", "voltage_v", "current_a", "temp_avg_c")
_RESET_VAR_V2: Final = 1e4  # level variance after a gap, V² (anything much larger than the noise)


@dataclass(frozen=True, slots=True)
class ResistanceOptions:
    """Noise model and tuning of the resistance tracker (units in the names; defaults immutable).

    Attributes:
        prior_rel_std: relative standard deviation of the resistance prior.
        voltage_noise_v: pack voltage noise, V.
        voltage_quantum_v: pack voltage resolution, V.
        current_noise_a: current sensor noise per sample, A.
        current_quantum_a: current sensor resolution, A.
        step_sigmas: a current step is a sample-to-sample change larger than this many standard
            deviations of the difference of two noisy readings.
        current_smoothing_s: between steps the regressor follows the readings with this time
            constant, s.
        temp_smoothing_s: time constant of the temperature low-pass, s.
        level_rw_v_per_sqrt_s: random walk of the voltage level per cell group, V/√s (what the
            predicted OCV drift misses).
        resistance_rw_per_sqrt_h: relative random walk of ``R25``, per √h (the forgetting).
        max_gap_s: an interval longer than this restarts the level and the RC filters, s.
        connector_share: connector, busbar and contactor resistance as a share of the cells'
            R0 (2.9-4.3 % on the Kona packs, BATTERY_NOTES 1.2).
        confident_rel_std: the growth reference is the first estimate whose relative standard
            deviation is below this.
        min_steps: ... and which rests on at least this many current steps.
        model_rel_error: relative error of the model behind the estimate (the chemistry's RC
            ratios, its temperature and SoC factors, the temperature sensor), added to the
            filter's own variance in the reported standard deviation.
    """

    prior_rel_std: float = 0.3
    voltage_noise_v: float = 0.1
    voltage_quantum_v: float = 0.1
    current_noise_a: float = 0.2
    current_quantum_a: float = 0.1
    step_sigmas: float = 5.0
    current_smoothing_s: float = 30.0
    temp_smoothing_s: float = 120.0
    level_rw_v_per_sqrt_s: float = 3.3e-5
    resistance_rw_per_sqrt_h: float = 0.005
    max_gap_s: float = 60.0
    connector_share: float = 0.035
    confident_rel_std: float = 0.05
    min_steps: int = 10
    model_rel_error: float = 0.02

    def __post_init__(self) -> None:
        """Check every option is finite and in range.

        Raises:
            EstimatorError: a value out of range.
        """
        check_non_negative(self)
        for name in ("prior_rel_std", "step_sigmas", "current_smoothing_s", "temp_smoothing_s", "max_gap_s"):
            if getattr(self, name) <= 0:
                msg = f"ResistanceOptions.{name} must be positive"
                raise EstimatorError(msg)

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> ResistanceOptions:
        """Build options from a mapping, rejecting unknown names with "did you mean".

        Raises:
            EstimatorError: an unknown name or a value out of range.
        """
        check_names(values, [f.name for f in dataclasses.fields(cls)], what="ResistanceOptions field")
        return cls(**values)  # type: ignore[arg-type]

    @property
    def step_threshold_a(self) -> float:
        """The smallest sample-to-sample current change counted as a step, A."""
        var = self.current_noise_a**2 + self.current_quantum_a**2 / 12.0
        return float(self.step_sigmas * np.sqrt(2.0 * var))


def nominal_resistance_ohm(packs: PackInfo, connector_share: float = 0.035) -> F64:
    """Return each pack's nominal new-pack ohmic resistance at 25 °C and 50 % SoC, Ω.

    The chemistry's ``R0 x Ah`` over the rated group capacity, times the series count and
    ``1 + connector_share``, plus the pack's ``series_r_ohm``.

    Args:
        packs: the packs.
        connector_share: connector share of the cells' R0.

    Returns:
        One value per pack, Ω.
    """
    r0_ah = np.array([get_chemistry(c).r0_ohm_ah for c in packs.chemistry])
    out: F64 = r0_ah / packs.rated_group_ah * packs.series * (1.0 + connector_share) + packs.series_r_ohm
    return out


@dataclass(frozen=True, slots=True, eq=False)
class _Params:
    """Per-pack constants of the tracker."""

    chem_index: I64
    chemistries: tuple[str, ...]
    rho1: F64
    rho2: F64
    tau1_s: F64
    tau2_s: F64
    series: F64
    capacity_ah: F64
    nominal_ohm: F64
    prior_ohm: F64
    pack_enum: pl.Enum  # the pack ids as a polars enum: row -> pack index, built once

    @classmethod
    def build(cls, packs: PackInfo, options: ResistanceOptions) -> _Params:
        names = tuple(sorted(set(packs.chemistry)))
        chems = [get_chemistry(n) for n in names]
        ci = np.array([names.index(c) for c in packs.chemistry], dtype=np.int64)

        def per_pack(values: list[float]) -> F64:
            return np.asarray(values, dtype=np.float64)[ci]

        nominal = nominal_resistance_ohm(packs, options.connector_share)
        soh = np.clip(packs.capacity_ah / packs.rated_group_ah, 0.0, 1.0)
        cells = nominal - packs.series_r_ohm
        prior = cells * (1.0 + EMPIRICAL_R_PER_FADE * (1.0 - soh)) + packs.series_r_ohm
        return cls(
            chem_index=ci,
            chemistries=names,
            rho1=per_pack([c.r1_ohm_ah / c.r0_ohm_ah for c in chems]),
            rho2=per_pack([c.r2_ohm_ah / c.r0_ohm_ah for c in chems]),
            tau1_s=per_pack([c.tau1_s for c in chems]),
            tau2_s=per_pack([c.tau2_s for c in chems]),
            series=packs.series.astype(np.float64),
            capacity_ah=packs.capacity_ah.copy(),
            nominal_ohm=nominal,
            prior_ohm=prior,
            pack_enum=pl.Enum(list(packs.pack_ids)),
        )


@dataclass(frozen=True, slots=True, eq=False)
class ResistanceState:
    """Per-pack state of the tracker (immutable: every array is read-only).

    Attributes:
        pack_ids: the packs, in the order of the arrays.
        r25_ohm: resistance at 25 °C and 50 % SoC, Ω.
        var_rr: its variance, Ω².
        level_v: the voltage level (OCV and slow terms), V.
        var_ll: its variance, V².
        cov_lr: covariance of level and resistance, V·Ω.
        i_held_a: the conditioned current (held between steps), A.
        i_last_a: the last finite measured current, A.
        f1_a: current low-passed with ``tau1``, A.
        f2_a: current low-passed with ``tau2``, A.
        temp_c: low-passed temperature, °C (NaN before the first finite reading).
        soc: SoC last used for the SoC factor, fraction.
        warm_n: samples since the last restart (the low-passes average them all until their
            time constant is reached).
        last_ts_ms: event time of the last processed sample (-1: none).
        steps: current steps the estimate rests on.
        ref_ohm: ``R25`` at the first confident estimate, Ω (NaN: not yet).
        ref_ts_ms: when it was taken (-1: not yet).
        n_duplicate: duplicated rows per pack.
        n_late: late rows per pack.
        n_skipped: samples without a measurement update (NaN voltage or current) per pack.
        n_samples: samples processed per pack (duplicates, late and unknown rows excluded).
        n_ignored: rows of unknown packs or without a timestamp.
    """

    _ARRAYS: ClassVar[tuple[str, ...]] = (
        "r25_ohm",
        "var_rr",
        "level_v",
        "var_ll",
        "cov_lr",
        "i_held_a",
        "i_last_a",
        "f1_a",
        "f2_a",
        "temp_c",
        "soc",
        "warm_n",
        "last_ts_ms",
        "steps",
        "ref_ohm",
        "ref_ts_ms",
        "n_duplicate",
        "n_late",
        "n_skipped",
        "n_samples",
    )

    pack_ids: tuple[str, ...]
    r25_ohm: F64
    var_rr: F64
    level_v: F64
    var_ll: F64
    cov_lr: F64
    i_held_a: F64
    i_last_a: F64
    f1_a: F64
    f2_a: F64
    temp_c: F64
    soc: F64
    warm_n: F64
    last_ts_ms: I64
    steps: I64
    ref_ohm: F64
    ref_ts_ms: I64
    n_duplicate: I64
    n_late: I64
    n_skipped: I64
    n_samples: I64
    n_ignored: int = 0

    def __post_init__(self) -> None:
        """Make the arrays read-only copies.

        Raises:
            EstimatorError: for arrays that do not have one value per pack.
        """
        n = len(self.pack_ids)
        for name in self._ARRAYS:
            arr = np.array(getattr(self, name), copy=True)
            if arr.shape != (n,):
                msg = f"ResistanceState.{name} has shape {arr.shape}, expected ({n},)"
                raise EstimatorError(msg)
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)


@dataclass(frozen=True, slots=True, eq=False)
class ResistanceEstimate:
    """Resistance per pack, in the order of ``pack_ids``.

    Attributes:
        pack_ids: the packs.
        resistance_ohm: ohmic resistance now (at the last smoothed temperature and SoC), Ω.
        resistance_ohm_25c: ohmic resistance at 25 °C and 50 % SoC, Ω.
        std: standard deviation of ``resistance_ohm_25c``, Ω.
        growth: ``resistance_ohm_25c`` over its first confident value (NaN before one).
        growth_vs_nominal: ``resistance_ohm_25c`` over the chemistry's new-pack value.
        samples: current steps the estimate rests on.
        reference_ohm: the first confident value, Ω (NaN before one).
        reference_ts_ms: when it was taken (-1 before one).
    """

    pack_ids: tuple[str, ...]
    resistance_ohm: F64
    resistance_ohm_25c: F64
    std: F64
    growth: F64
    growth_vs_nominal: F64
    samples: I64
    reference_ohm: F64
    reference_ts_ms: I64

    def to_frame(self) -> pl.DataFrame:
        """Return the estimate as one row per pack."""
        return pl.DataFrame(
            {
                "pack": list(self.pack_ids),
                "resistance_ohm": self.resistance_ohm,
                "resistance_ohm_25c": self.resistance_ohm_25c,
                "resistance_std_ohm": self.std,
                "resistance_growth": self.growth,
                "resistance_growth_vs_nominal": self.growth_vs_nominal,
                "resistance_steps": self.samples,
            }
        )


def initial_state(packs: PackInfo, params: _Params, options: ResistanceOptions) -> ResistanceState:
    """Return the prior state of ``packs``."""
    n = packs.n_packs
    nan = np.full(n, np.nan)
    zeros = np.zeros(n)
    none = np.full(n, -1, dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    return ResistanceState(
        pack_ids=packs.pack_ids,
        r25_ohm=params.prior_ohm.copy(),
        var_rr=(options.prior_rel_std * params.prior_ohm) ** 2,
        level_v=zeros,
        var_ll=np.full(n, _RESET_VAR_V2),
        cov_lr=zeros,
        i_held_a=zeros,
        i_last_a=zeros,
        f1_a=zeros,
        f2_a=zeros,
        temp_c=nan,
        soc=np.full(n, 0.5),
        warm_n=zeros,
        last_ts_ms=none,
        steps=count,
        ref_ohm=nan,
        ref_ts_ms=none.copy(),
        n_duplicate=count,
        n_late=count,
        n_skipped=count,
        n_samples=count,
    )


@dataclass(frozen=True, slots=True, eq=False)
class _Grid:
    """A batch as ``(k, pack)`` arrays: the *k*-th new sample of every active pack in row ``k``."""

    packs: IP
    mask: B
    ts_ms: I64
    voltage_v: F64
    current_a: F64
    temp_c: F64
    soc: F64  # (k, pack), or (1, pack) for a SoC held over the batch
    n_duplicate: I64
    n_late: I64
    n_ignored: int


def _grid(batch: pl.DataFrame, enum: pl.Enum, last_ts_ms: I64, soc: F64 | None) -> _Grid:
    """Lay a telemetry batch out as ``(k, pack)`` arrays, dropping duplicates and late rows (``enum``: the pack ids)."""
    check_columns(batch, REQUIRED_COLUMNS, estimator="ResistanceTracker")
    n = len(enum.categories)
    use_column = soc is None and "soc" in batch.columns
    frame = batch.select(
        pl.col("pack").cast(pl.String).cast(enum, strict=False).to_physical().cast(pl.Int64).fill_null(-1),
        pl.col("ts_ms").cast(pl.Int64).fill_null(-1),
        *(pl.col(c).cast(pl.Float64).fill_null(np.nan) for c in REQUIRED_COLUMNS[2:]),
        (pl.col("soc") if use_column else pl.lit(np.nan)).cast(pl.Float64).fill_null(np.nan).alias("soc"),
    )
    pidx = frame.get_column("pack").to_numpy()
    ts = frame.get_column("ts_ms").to_numpy()
    known = (pidx >= 0) & (ts >= 0)
    order = group_time_order(pidx, ts)
    order = order[known[order]]
    pidx, ts = pidx[order], ts[order]
    repeat = np.zeros(pidx.size, dtype=np.bool_)
    repeat[1:] = (pidx[1:] == pidx[:-1]) & (ts[1:] == ts[:-1])
    last = last_ts_ms[pidx]
    seen = ts == last
    late = ts < last
    n_duplicate = np.bincount(pidx[repeat | seen], minlength=n).astype(np.int64)
    n_late = np.bincount(pidx[late & ~repeat], minlength=n).astype(np.int64)
    keep = ~(repeat | seen | late)
    order, pidx = order[keep], pidx[keep]
    counts = np.bincount(pidx, minlength=n)
    packs = np.flatnonzero(counts).astype(np.intp)
    local = np.zeros(n, dtype=np.intp)
    local[packs] = np.arange(packs.size)
    first = np.zeros(n, dtype=np.intp)
    if packs.size:
        first[packs] = np.concatenate([[0], np.cumsum(counts[packs])[:-1]])
    rank = np.arange(pidx.size) - first[pidx]
    k_max = int(counts.max()) if pidx.size else 0
    src = np.full(k_max * packs.size, -1, dtype=np.intp)
    src[rank * packs.size + local[pidx]] = order
    mask = (src >= 0).reshape(k_max, packs.size)
    src[src < 0] = 0

    def grid(name: str) -> F64:
        out = frame.get_column(name).to_numpy().astype(np.float64)[src].reshape(k_max, packs.size)
        out[~mask] = np.nan
        return out

    # A SoC held over the batch is one row: the chemistry's SoC terms are then evaluated once per pack.
    soc_grid = grid("soc") if soc is None else np.asarray(soc, dtype=np.float64)[packs][np.newaxis, :]
    ts_grid = frame.get_column("ts_ms").to_numpy()[src].reshape(k_max, packs.size)
    return _Grid(
        packs=packs,
        mask=mask,
        ts_ms=ts_grid,
        voltage_v=grid("voltage_v"),
        current_a=grid("current_a"),
        temp_c=grid("temp_avg_c"),
        soc=soc_grid,
        n_duplicate=n_duplicate,
        n_late=n_late,
        n_ignored=int(np.count_nonzero(~known)),
    )


def _per_chemistry(params: _Params, packs: IP, values: F64, fn: str) -> F64:
    """Evaluate a chemistry method (``temp_factor``, ``soc_factor``, ``docv_dsoc``) on a ``(k, pack)`` grid."""
    out = np.empty_like(values)
    ci = params.chem_index[packs]
    for k, name in enumerate(params.chemistries):  # a handful of chemistries, not packs
        cols = np.flatnonzero(ci == k)
        if cols.size == ci.size:  # one chemistry: no gather
            out[...] = getattr(get_chemistry(name), fn)(values)
        elif cols.size:
            out[:, cols] = getattr(get_chemistry(name), fn)(values[:, cols])
    return out


@kernel
def _condition(
    mask: B,
    ts_ms: I64,
    current_a: F64,
    temp_c: F64,
    rho1: F64,
    rho2: F64,
    tau1_s: F64,
    tau2_s: F64,
    options: tuple[float, float, float, float],
    last_ts_ms: I64,
    i_held_a: F64,
    i_last_a: F64,
    f1_a: F64,
    f2_a: F64,
    temp_state_c: F64,
    warm_n: F64,
) -> tuple[F64, F64, F64, B, B, F64]:
    """Pass 1 of :func:`step`, compiled: the regressor's conditioning, sample by sample.

    ``mask`` .. ``temp_c`` are the batch's ``(k, pack)`` grid; ``options`` is ``(step threshold
    A, max gap s, current smoothing s, temperature smoothing s)``; ``last_ts_ms`` .. ``warm_n``
    are the active packs' state, updated in place (the caller passes copies). A masked cell is
    no sample and changes nothing.

    Returns:
        ``(k, pack)`` grids for the filter: ``i + rho1*f1 + rho2*f2``; the last reading, held
        over the interval ending at the sample; the interval, s; the restarts; the steps; the
        smoothed temperature (masked cells: zero, false, NaN).
    """
    threshold, max_gap_s, current_smoothing_s, temp_smoothing_s = options
    k_max, n = mask.shape
    u_i = np.zeros((k_max, n))
    held_prev = np.zeros((k_max, n))
    dt_out = np.zeros((k_max, n))
    gap_out = np.zeros((k_max, n), dtype=np.bool_)
    jump_out = np.zeros((k_max, n), dtype=np.bool_)
    temp_out = np.full((k_max, n), np.nan)
    for j in range(n):
        last_ts, i_held, i_last = last_ts_ms[j], i_held_a[j], i_last_a[j]
        f1, f2, temp, warm = f1_a[j], f2_a[j], temp_state_c[j], warm_n[j]
        # The decay factors depend on the interval only, which regular telemetry repeats: they
        # are computed again when it changes.
        dt_seen, a1, a2, c_i, c_t = np.nan, 0.0, 0.0, 0.0, 0.0
        for k in range(k_max):
            if not mask[k, j]:
                continue
            dt = (ts_ms[k, j] - last_ts) / 1000.0
            if dt != dt_seen:
                dt_seen = dt
                a1, a2 = np.exp(-dt / tau1_s[j]), np.exp(-dt / tau2_s[j])
                c_i, c_t = -np.expm1(-dt / current_smoothing_s), -np.expm1(-dt / temp_smoothing_s)
            gap = last_ts < 0 or dt > max_gap_s
            finite_i = np.isfinite(current_a[k, j])
            i_now = current_a[k, j] if finite_i else i_last
            held_prev[k, j] = i_last  # the coulomb count takes the raw reading: noise integrates away, lag would not
            f1 = a1 * f1 + (1.0 - a1) * i_held
            f2 = a2 * f2 + (1.0 - a2) * i_held
            jump = finite_i and not gap and np.abs(i_now - i_last) > threshold
            # Right after a restart the low-passes take the mean of the samples so far: one noisy
            # first reading must not be held for a whole time constant.
            warm = 1.0 if gap else warm + 1.0
            if gap or jump:
                i_held = i_now
            elif finite_i:
                i_held = i_held + np.maximum(c_i, 1.0 / warm) * (i_now - i_held)
            if gap:
                f1, f2 = i_held, i_held
            if finite_i:
                i_last = i_now
            t_meas = temp_c[k, j]
            if np.isfinite(t_meas) and (gap or not np.isfinite(temp)):
                temp = t_meas
            elif np.isfinite(t_meas):
                temp = temp + np.maximum(c_t, 1.0 / warm) * (t_meas - temp)
            u_i[k, j] = i_held + rho1[j] * f1 + rho2[j] * f2
            dt_out[k, j] = dt
            gap_out[k, j] = gap
            jump_out[k, j] = jump
            temp_out[k, j] = temp
            last_ts = ts_ms[k, j]
        last_ts_ms[j], i_held_a[j], i_last_a[j] = last_ts, i_held, i_last
        f1_a[j], f2_a[j], temp_state_c[j], warm_n[j] = f1, f2, temp, warm
    return u_i, held_prev, dt_out, gap_out, jump_out, temp_out


@kernel
def _filter(
    mask: B,
    ts_ms: I64,
    voltage_v: F64,
    current_a: F64,
    u: F64,
    drift_v: F64,
    dt_s: F64,
    gap: B,
    jump: B,
    q_level: F64,
    options: tuple[float, float, float, float, float, int],
    r25_ohm: F64,
    var_rr: F64,
    level_v: F64,
    var_ll: F64,
    cov_lr: F64,
    steps: I64,
    n_skipped: I64,
    ref_ohm: F64,
    ref_ts_ms: I64,
) -> None:
    """Pass 2 of :func:`step`, compiled: the two-state filter ``[level, R25]``, sample by sample.

    ``mask`` .. ``jump`` are ``(k, pack)`` grids: the batch's, and :func:`_condition`'s with
    ``u`` (its temperature and SoC factors applied) and the level's predicted drift, V;
    ``q_level`` is the level's random walk per pack, V²/s; ``options`` is ``(relative random
    walk of R25 per s, voltage noise variance V², level variance after a restart V², model
    relative error, confident relative std, minimum steps)``. ``r25_ohm`` .. ``ref_ts_ms`` are
    the active packs' state, updated in place (the caller passes copies). A masked cell is no
    sample.
    """
    q_rel, r_noise, reset_var, model_rel_error, confident_rel_std, min_steps = options
    k_max, n = mask.shape
    # Samples outer, packs inner: one pack's update is a chain of dependent divisions, and the
    # processor overlaps those of independent packs (five times faster than pack by pack).
    for k in range(k_max):
        for j in range(n):
            if not mask[k, j]:
                continue
            r25, vrr, lev, vll, clr = r25_ohm[j], var_rr[j], level_v[j], var_ll[j], cov_lr[j]
            dt = dt_s[k, j]
            if gap[k, j]:
                lev, vll, clr = 0.0, reset_var, 0.0
            else:
                lev = lev + drift_v[k, j]
                vll = vll + q_level[j] * dt
            vrr = vrr + q_rel * r25 * r25 * dt
            ok = np.isfinite(current_a[k, j]) and np.isfinite(voltage_v[k, j])
            h = -u[k, j]
            s = vll + 2.0 * h * clr + h * h * vrr + r_noise
            a = vll + h * clr
            b = clr + h * vrr
            # Without a measurement the gains are zero (the same arithmetic, so NaN or inf in
            # the state spreads as it would through an update).
            innovation = voltage_v[k, j] - lev - h * r25 if ok else 0.0
            kl = a / s if ok else 0.0
            kr = b / s if ok else 0.0
            lev = lev + kl * innovation
            r25 = r25 + kr * innovation
            vll, clr, vrr = vll - kl * a, clr - kl * b, vrr - kr * b
            r25_ohm[j], var_rr[j], level_v[j], var_ll[j], cov_lr[j] = r25, vrr, lev, vll, clr
            steps[j] += jump[k, j] and ok
            n_skipped[j] += not ok
            model = model_rel_error * r25
            if (
                np.isnan(ref_ohm[j])
                and steps[j] >= min_steps
                and np.sqrt(np.maximum(vrr, 0.0) + model * model) < confident_rel_std * np.abs(r25)
            ):
                ref_ohm[j], ref_ts_ms[j] = r25, ts_ms[k, j]


def step(state: ResistanceState, grid: _Grid, params: _Params, options: ResistanceOptions) -> ResistanceState:
    """Fold one batch laid out as a grid into the state; pure.

    The two recursions over samples run compiled (:func:`_condition`, :func:`_filter`) on
    copies of the active packs' state; the chemistry's factors, which need its Python methods,
    are evaluated in between on the whole grid.

    Args:
        state: the state before the batch.
        grid: the batch (:func:`_grid`).
        params: the per-pack constants.
        options: the tuning.

    Returns:
        The state after the batch.
    """
    o = options
    p = grid.packs
    if p.size == 0:
        return dataclasses.replace(
            state,
            n_duplicate=state.n_duplicate + grid.n_duplicate,
            n_late=state.n_late + grid.n_late,
            n_ignored=state.n_ignored + grid.n_ignored,
        )
    # Pass 1, signal conditioning: held current, RC filters, smoothed temperature (per sample).
    # Indexing with ``p`` copies: the kernels update these in place, the state stays as it was.
    last_ts, i_held, i_last = state.last_ts_ms[p], state.i_held_a[p], state.i_last_a[p]
    f1, f2, temp, warm = state.f1_a[p], state.f2_a[p], state.temp_c[p], state.warm_n[p]
    u_i, held_prev, dt_grid, gap_grid, jump_grid, temp_grid = _condition(
        grid.mask,
        grid.ts_ms,
        grid.current_a,
        grid.temp_c,
        params.rho1[p],
        params.rho2[p],
        params.tau1_s[p],
        params.tau2_s[p],
        # Floats (and an int) whatever the options were given as: another type compiles the kernel again.
        (float(o.step_threshold_a), float(o.max_gap_s), float(o.current_smoothing_s), float(o.temp_smoothing_s)),
        last_ts,
        i_held,
        i_last,
        f1,
        f2,
        temp,
        warm,
    )
    soc_last = state.soc[p]
    soc_grid = np.where(np.isfinite(grid.soc), grid.soc, np.nan)
    soc_grid = np.where(np.isfinite(soc_grid), soc_grid, soc_last[np.newaxis, :])
    soc_grid = np.clip(np.where(np.isfinite(soc_grid), soc_grid, 0.5), 0.0, 1.0)
    t_for_factor = np.where(np.isfinite(temp_grid), temp_grid, 25.0)
    factor = _per_chemistry(params, p, t_for_factor, "temp_factor") * _per_chemistry(params, p, soc_grid, "soc_factor")
    u = u_i * factor
    # The level's predicted drift over each interval: dOCV/dSoC (pack) times the coulomb-counted SoC change.
    slope = _per_chemistry(params, p, soc_grid, "docv_dsoc") * params.series[p]
    drift = -slope * held_prev * dt_grid / (3600.0 * params.capacity_ah[p])
    q_level = (o.level_rw_v_per_sqrt_s * params.series[p]) ** 2
    q_rel = o.resistance_rw_per_sqrt_h**2 / 3600.0
    r_noise = o.voltage_noise_v**2 + o.voltage_quantum_v**2 / 12.0
    # Pass 2, the two-state filter [level, R25].
    r25, vrr = state.r25_ohm[p], state.var_rr[p]
    lev, vll, clr = state.level_v[p], state.var_ll[p], state.cov_lr[p]
    steps, skipped = state.steps[p], state.n_skipped[p]
    ref, ref_ts = state.ref_ohm[p], state.ref_ts_ms[p]
    _filter(
        grid.mask,
        grid.ts_ms,
        grid.voltage_v,
        grid.current_a,
        u,
        drift,
        dt_grid,
        gap_grid,
        jump_grid,
        q_level,
        (
            float(q_rel),
            float(r_noise),
            _RESET_VAR_V2,
            float(o.model_rel_error),
            float(o.confident_rel_std),
            int(o.min_steps),
        ),
        r25,
        vrr,
        lev,
        vll,
        clr,
        steps,
        skipped,
        ref,
        ref_ts,
    )
    last_k = np.maximum(grid.mask.sum(axis=0) - 1, 0)  # each pack's last sample in the batch

    def put(old: NDArray[Any], new: NDArray[Any]) -> Any:
        return scattered(old, p, new)

    return dataclasses.replace(
        state,
        r25_ohm=put(state.r25_ohm, r25),
        var_rr=put(state.var_rr, vrr),
        level_v=put(state.level_v, lev),
        var_ll=put(state.var_ll, vll),
        cov_lr=put(state.cov_lr, clr),
        i_held_a=put(state.i_held_a, i_held),
        i_last_a=put(state.i_last_a, i_last),
        f1_a=put(state.f1_a, f1),
        f2_a=put(state.f2_a, f2),
        temp_c=put(state.temp_c, temp),
        soc=put(state.soc, np.broadcast_to(soc_grid, grid.mask.shape)[last_k, np.arange(p.size)]),
        warm_n=put(state.warm_n, np.minimum(warm, 1e9)),
        last_ts_ms=put(state.last_ts_ms, last_ts),
        steps=put(state.steps, steps),
        ref_ohm=put(state.ref_ohm, ref),
        ref_ts_ms=put(state.ref_ts_ms, ref_ts),
        n_duplicate=state.n_duplicate + grid.n_duplicate,
        n_late=state.n_late + grid.n_late,
        n_skipped=put(state.n_skipped, skipped),
        n_samples=put(state.n_samples, state.n_samples[p] + grid.mask.sum(axis=0)),
        n_ignored=state.n_ignored + grid.n_ignored,
    )


@register
class ResistanceTracker(Estimator[ResistanceState, ResistanceEstimate]):
    """Ohmic resistance of every pack, normalised to 25 °C and 50 % SoC, from current steps.

    See the module docstring for the model, the conditioning of the regressor and the data
    handling.

    Args:
        packs: what is known of each pack (chemistry, rated and prior capacity, series count).
        options: tuning.
        prior_ohm: a resistance prior per pack at 25 °C and 50 % SoC, Ω (an intake DCIR test,
            say), instead of the chemistry's (see the module docstring).

    Examples:
        >>> import numpy as np, polars as pl
        >>> packs = PackInfo.from_meta(pl.DataFrame({"pack": ["p1"], "chemistry": ["nmc811"],
        ...     "rated_capacity_ah": [100.0], "series_cells": [96], "intake_soh": [None]}))
        >>> tracker = ResistanceTracker(packs)
        >>> chem = get_chemistry("nmc811")
        >>> r = 0.05  # the pack's true R at 25 °C, Ω (the prior says 0.036)
        >>> t = np.arange(600)
        >>> i = np.where((t // 30) % 2 == 0, 10.0, 40.0)  # 30 A steps every 30 s
        >>> f = np.empty(600); f[0] = i[0]  # the RC pair's current (tau1 = 30 s)
        >>> for k in range(1, 600):
        ...     f[k] = f[k - 1] + (i[k - 1] - f[k - 1]) * (1 - np.exp(-1 / 30))
        >>> soc = 0.5 - np.concatenate([[0.0], np.cumsum(i[:-1])]) / 3600 / 100
        >>> v = 96 * chem.ocv(soc) - r * (i + 1.5 * f)  # R1 = 1.5 R0 for this chemistry
        >>> tracker.update(pl.DataFrame({"pack": "p1", "ts_ms": t * 1000, "voltage_v": v,
        ...     "current_a": i, "temp_avg_c": 25.0, "soc": soc}))
        >>> est = tracker.estimate()
        >>> round(float(est.resistance_ohm_25c[0]), 3), int(est.samples[0])
        (0.05, 19)

    References:
        Plett, G. L. (2015). Battery Management Systems, Vol. II, Artech House, ch. 4.
    """

    input_columns: ClassVar[tuple[str, ...]] = REQUIRED_COLUMNS

    def __init__(
        self, packs: PackInfo, options: ResistanceOptions = ResistanceOptions(), *, prior_ohm: F64 | None = None
    ) -> None:
        self.packs = packs
        self.options = options
        self._params = _Params.build(packs, options)
        if prior_ohm is not None:
            prior = np.asarray(prior_ohm, dtype=np.float64)
            if prior.shape != (packs.n_packs,) or not np.all(np.isfinite(prior) & (prior > 0)):
                msg = "prior_ohm must hold one positive resistance per pack"
                raise EstimatorError(msg)
            self._params = dataclasses.replace(self._params, prior_ohm=prior.copy())
        self._prior_given = prior_ohm is not None
        self._state = initial_state(packs, self._params, options)

    @property
    def pack_ids(self) -> tuple[str, ...]:
        """The tracked packs, in the order of the estimate's arrays."""
        return self.packs.pack_ids

    @property
    def prior_ohm(self) -> F64:
        """The resistance prior per pack at 25 °C and 50 % SoC, Ω."""
        return self._params.prior_ohm.copy()

    def update(self, batch: pl.DataFrame, *, soc: F64 | None = None) -> None:
        """Fold telemetry rows (any packs, any order) into the estimates.

        Args:
            batch: rows with ``pack``, ``ts_ms``, ``voltage_v``, ``current_a`` and ``temp_avg_c``
                (and optionally ``soc``); the frame is not modified.
            soc: SoC per pack, aligned with :attr:`pack_ids` (the SoC filter's mean SoC), held
                over the batch; NaN entries fall back to the pack's last SoC. Without it the
                batch's ``soc`` column is used if present, else the last SoC (initially 50 %).

        Raises:
            EstimatorError: a required column is missing or ``soc`` has the wrong size.
        """
        if soc is not None:
            soc = np.asarray(soc, dtype=np.float64)
            if soc.shape != (self.packs.n_packs,):
                msg = f"soc has shape {soc.shape}, expected ({self.packs.n_packs},)"
                raise EstimatorError(msg)
        grid = _grid(batch, self._params.pack_enum, np.asarray(self._state.last_ts_ms), soc)
        self._state = step(self._state, grid, self._params, self.options)

    def estimate(self) -> ResistanceEstimate:
        """Return the resistance of every pack now and at 25 °C / 50 % SoC, with its growth."""
        s, prm = self._state, self._params
        every = np.arange(self.packs.n_packs, dtype=np.intp)
        temp = np.where(np.isfinite(s.temp_c), s.temp_c, 25.0)[np.newaxis, :]
        soc = s.soc[np.newaxis, :]
        factor = _per_chemistry(prm, every, temp, "temp_factor") * _per_chemistry(prm, every, soc, "soc_factor")
        return ResistanceEstimate(
            pack_ids=self.pack_ids,
            resistance_ohm=s.r25_ohm * factor[0],
            resistance_ohm_25c=s.r25_ohm.copy(),
            std=np.sqrt(np.maximum(s.var_rr, 0.0) + (self.options.model_rel_error * s.r25_ohm) ** 2),
            growth=s.r25_ohm / s.ref_ohm,
            growth_vs_nominal=s.r25_ohm / prm.nominal_ohm,
            samples=s.steps.copy(),
            reference_ohm=s.ref_ohm.copy(),
            reference_ts_ms=s.ref_ts_ms.copy(),
        )

    def snapshot(self) -> ResistanceState:
        """Return the state (immutable; restoring it later resumes exactly here)."""
        return self._state

    def restore(self, state: ResistanceState) -> None:
        """Resume from a snapshot of a tracker over the same packs.

        Raises:
            EstimatorError: for a state of other packs.
        """
        if not isinstance(state, ResistanceState) or state.pack_ids != self.pack_ids:
            msg = "resistance state does not fit these packs"
            raise EstimatorError(msg)
        self._state = state

    def clone(self) -> Self:
        """Return a tracker with the same packs and options and a fresh state."""
        prior = self._params.prior_ohm if self._prior_given else None
        return type(self)(self.packs, self.options, prior_ohm=prior)

    def counters(self) -> dict[str, int]:
        """Return the data-quality counters summed over packs."""
        s = self._state
        return {
            "duplicate": int(s.n_duplicate.sum()),
            "late": int(s.n_late.sum()),
            "skipped": int(s.n_skipped.sum()),
            "samples": int(s.n_samples.sum()),
            "ignored": s.n_ignored,
        }

    def grown(self, packs: PackInfo) -> ResistanceTracker:
        """Return a tracker for a new pack set that keeps the state of every pack it already knew.

        Packs are matched by id; new packs start from their prior. A known pack whose chemistry
        or rated capacity changed keeps its learnt state too (its parameters change from now on).

        Args:
            packs: the new pack set.

        Returns:
            The new tracker (this one is unchanged).
        """
        out = ResistanceTracker(packs, self.options)
        old, new = self._state, out._state
        where = {pid: i for i, pid in enumerate(old.pack_ids)}
        dst = np.array([i for i, pid in enumerate(packs.pack_ids) if pid in where], dtype=np.intp)
        src = np.array([where[pid] for pid in packs.pack_ids if pid in where], dtype=np.intp)
        changes: dict[str, object] = {}
        for name in ResistanceState._ARRAYS:
            arr = np.array(getattr(new, name), copy=True)
            arr[dst] = np.asarray(getattr(old, name))[src]
            changes[name] = arr
        out._state = dataclasses.replace(new, n_ignored=old.n_ignored, **changes)  # type: ignore[arg-type]
        return out

    @classmethod
    def from_meta(cls, meta: pl.DataFrame, options: ResistanceOptions = ResistanceOptions()) -> Self:
        """Build a tracker for the packs of a pack_meta frame (SoH prior from ``intake_soh``).

        Args:
            meta: pack_meta rows (``pack``, ``chemistry``, ``rated_capacity_ah``,
                ``series_cells``, optionally ``intake_soh``).
            options: tuning.

        Returns:
            The tracker.
        """
        return cls(PackInfo.from_meta(meta), options)

    def __repr__(self) -> str:
        """Return a short description."""
        return f"ResistanceTracker({self.packs.n_packs} packs)"
