"""Identify equivalent-circuit parameters from HPPC pulse tests and slow cycles.

Pure numpy, no I/O: the caller loads a test record (time, current, voltage) and gets back
frozen results. Current is **positive on discharge**, the project's convention; convert
cycler data that uses the opposite sign before calling (the ORNL Nissan Leaf files log
discharge as negative current).

Three identifications live here:

- :func:`fit_ecm_from_hppc` finds the discharge pulses of a hybrid pulse power
  characterisation (HPPC) record and returns, for every pulse, the state of charge, the
  ohmic resistance ``R0`` from the instantaneous voltage step at the pulse start, and one
  RC pair (``R1``, ``tau1``) from a least-squares fit of the voltage relaxation after the
  pulse.
- :func:`fit_arrhenius` combines resistances measured at several temperatures into an
  activation energy.
- :func:`ocv_from_slow_cycle` turns a slow constant-current discharge and the constant
  current / constant voltage charge that follows it into an open-circuit-voltage table
  (the average of the two branches, after removing the series-resistance drop).

References:
    Plett, G. L., *Battery Management Systems, Volume I: Battery Modeling*, Artech House
    (2015), ch. 2 (HPPC identification of R0 and RC pairs; OCV as the average of slow
    charge and discharge curves).
    Wiggins, G., Allu, S., Wang, H., *Battery cell data from a 2013 Nissan Leaf*, ORNL,
    doi:10.5281/zenodo.2580327 (the data these functions were written for).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from twin.chemistry.base import GAS_CONSTANT_J_PER_MOL_K
from twin.errors import ChemistryError

__all__ = [
    "ArrheniusFit",
    "EcmFit",
    "EcmSummary",
    "OcvFromCycle",
    "fit_arrhenius",
    "fit_ecm_from_hppc",
    "ocv_from_slow_cycle",
]

FloatArray = npt.NDArray[np.float64]

_KELVIN_OFFSET = 273.15
_SECONDS_PER_HOUR = 3600.0
_TAU_GRID_POINTS = 400


@dataclass(frozen=True, slots=True)
class EcmSummary:
    """Median ECM parameters over the pulses inside a state-of-charge band.

    Attributes:
        r0_ohm: median ohmic resistance, Ω.
        r1_ohm: median RC-pair resistance, Ω.
        tau1_s: median RC time constant, s.
        r_1s_ohm: median DC resistance 1 s into the pulse, Ω.
        r_10s_ohm: median DC resistance 10 s into the pulse, Ω.
        r_30s_ohm: median DC resistance 30 s into the pulse, Ω.
        n_pulses: number of pulses the medians are taken over.
    """

    r0_ohm: float
    r1_ohm: float
    tau1_s: float
    r_1s_ohm: float
    r_10s_ohm: float
    r_30s_ohm: float
    n_pulses: int


@dataclass(frozen=True, slots=True, eq=False)
class EcmFit:
    """Per-pulse result of :func:`fit_ecm_from_hppc`; every array has one entry per pulse.

    Attributes:
        t_start_s: time of the last rest sample before the pulse (the step time), s.
        duration_s: pulse length, s.
        current_a: median pulse current, positive on discharge, A.
        soc: coulomb-counted state of charge at the pulse start, fraction.
        v_rest_v: terminal voltage at the end of the rest before the pulse, V.
        r0_ohm: voltage step to the first pulse sample divided by the current step, Ω.
        r1_ohm: resistance of the RC pair fitted to the relaxation after the pulse, Ω
            (NaN when the record has too little rest after the pulse).
        tau1_s: time constant of that RC pair, s (NaN likewise).
        r_1s_ohm: DC resistance 1 s into the pulse, Ω (NaN if the pulse is shorter).
        r_10s_ohm: DC resistance 10 s into the pulse, Ω (NaN if the pulse is shorter).
        r_30s_ohm: DC resistance 30 s into the pulse, Ω (NaN if the pulse is shorter).
        rmse_v: root-mean-square residual of the relaxation fit, V.
    """

    t_start_s: FloatArray
    duration_s: FloatArray
    current_a: FloatArray
    soc: FloatArray
    v_rest_v: FloatArray
    r0_ohm: FloatArray
    r1_ohm: FloatArray
    tau1_s: FloatArray
    r_1s_ohm: FloatArray
    r_10s_ohm: FloatArray
    r_30s_ohm: FloatArray
    rmse_v: FloatArray

    def __post_init__(self) -> None:
        """Make the per-pulse arrays read-only."""
        _freeze(self)

    @property
    def n_pulses(self) -> int:
        """Number of discharge pulses found."""
        return int(self.soc.size)

    def summary(self, *, soc_min: float = 0.3, soc_max: float = 0.7) -> EcmSummary:
        """Return the median parameters over the pulses with ``soc_min <= soc <= soc_max``.

        Args:
            soc_min: lower end of the state-of-charge band, fraction.
            soc_max: upper end of the state-of-charge band, fraction.

        Returns:
            The medians (NaN entries ignored; NaN if all are NaN) and the number of pulses
            in the band.

        Raises:
            ChemistryError: if no pulse lies inside the band.
        """
        band = (self.soc >= soc_min) & (self.soc <= soc_max)
        n = int(np.count_nonzero(band))
        if n == 0:
            msg = f"no HPPC pulse between SoC {soc_min} and {soc_max}; pulses at {np.round(self.soc, 3)}"
            raise ChemistryError(msg)

        def med(values: FloatArray) -> float:
            picked = values[band]
            picked = picked[~np.isnan(picked)]
            return float(np.median(picked)) if picked.size else float("nan")

        return EcmSummary(
            r0_ohm=med(self.r0_ohm),
            r1_ohm=med(self.r1_ohm),
            tau1_s=med(self.tau1_s),
            r_1s_ohm=med(self.r_1s_ohm),
            r_10s_ohm=med(self.r_10s_ohm),
            r_30s_ohm=med(self.r_30s_ohm),
            n_pulses=n,
        )


@dataclass(frozen=True, slots=True)
class ArrheniusFit:
    """Result of :func:`fit_arrhenius`: ``R(T) = r_ref_ohm * exp(Ea/R_gas * (1/T - 1/T_ref))``.

    Attributes:
        ea_j_per_mol: activation energy, J/mol.
        r_ref_ohm: fitted resistance at the reference temperature, Ω.
        t_ref_c: reference temperature, °C.
        rms_log_residual: root-mean-square residual of ``ln R``, dimensionless.
    """

    ea_j_per_mol: float
    r_ref_ohm: float
    t_ref_c: float
    rms_log_residual: float

    def factor(self, temp_c: npt.ArrayLike) -> FloatArray:
        """Return ``R(T) / R(T_ref)`` for the given temperatures in °C."""
        t_k = np.asarray(temp_c, dtype=np.float64) + _KELVIN_OFFSET
        t_ref_k = self.t_ref_c + _KELVIN_OFFSET
        return np.exp(self.ea_j_per_mol / GAS_CONSTANT_J_PER_MOL_K * (1.0 / t_k - 1.0 / t_ref_k))


@dataclass(frozen=True, slots=True, eq=False)
class OcvFromCycle:
    """Result of :func:`ocv_from_slow_cycle`.

    Attributes:
        soc: state-of-charge grid, fraction, increasing.
        ocv_v: estimated open-circuit voltage on ``soc``, V.
        discharge_v: discharge-branch terminal voltage on ``soc`` (uncorrected), V.
        charge_v: charge-branch terminal voltage on ``soc`` (uncorrected), V.
        series_resistance_ohm: apparent series resistance removed from both branches, Ω.
        discharge_capacity_ah: coulomb-counted discharge throughput, Ah.
        charge_capacity_ah: coulomb-counted charge throughput, Ah.
    """

    soc: FloatArray
    ocv_v: FloatArray
    discharge_v: FloatArray
    charge_v: FloatArray
    series_resistance_ohm: float
    discharge_capacity_ah: float
    charge_capacity_ah: float

    def __post_init__(self) -> None:
        """Make the arrays read-only."""
        _freeze(self)


def _freeze(result: EcmFit | OcvFromCycle) -> None:
    """Replace every array field of a frozen result by a read-only copy."""
    for item in fields(result):
        value = getattr(result, item.name)
        if isinstance(value, np.ndarray):
            frozen = np.array(value, dtype=np.float64, copy=True)
            frozen.flags.writeable = False
            object.__setattr__(result, item.name, frozen)


def _as_1d(name: str, values: npt.ArrayLike) -> FloatArray:
    arr = np.array(values, dtype=np.float64, copy=True)
    if arr.ndim != 1:
        msg = f"{name} must be one-dimensional, got shape {arr.shape}"
        raise ChemistryError(msg)
    if not np.all(np.isfinite(arr)):
        msg = f"{name} contains NaN or infinite values"
        raise ChemistryError(msg)
    return arr


def _check_record(
    time_s: npt.ArrayLike, current_a: npt.ArrayLike, voltage_v: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    t = _as_1d("time_s", time_s)
    i = _as_1d("current_a", current_a)
    v = _as_1d("voltage_v", voltage_v)
    if not t.size == i.size == v.size:
        msg = f"time_s, current_a and voltage_v differ in length: {t.size}, {i.size}, {v.size}"
        raise ChemistryError(msg)
    if t.size < 3:
        msg = "a record needs at least three samples"
        raise ChemistryError(msg)
    if np.any(np.diff(t) <= 0.0):
        msg = "time_s must be strictly increasing"
        raise ChemistryError(msg)
    return t, i, v


def _cumulative_charge_as(time_s: FloatArray, current_a: FloatArray) -> FloatArray:
    """Return the trapezoidal running integral of current, A·s, starting at 0."""
    increments = 0.5 * (current_a[1:] + current_a[:-1]) * np.diff(time_s)
    return np.concatenate(([0.0], np.cumsum(increments)))


def _runs(mask: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Return (first, last) indices of the runs of True in ``mask``, inclusive."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return starts, ends


def _fit_relaxation(t_s: FloatArray, v: FloatArray, tau_bounds_s: tuple[float, float]) -> tuple[float, float, float]:
    """Fit ``v = a - b*exp(-t/tau)`` by variable projection; return (b, tau, rmse).

    For a fixed ``tau`` the model is linear in ``a`` and ``b``, so the residual sum of squares
    has a closed form. It is evaluated on a log-spaced grid of ``tau`` (all at once, as a
    matrix), then on a finer grid between the neighbours of the best point.
    """
    y = v - v.mean()
    grid = np.geomspace(tau_bounds_s[0], tau_bounds_s[1], _TAU_GRID_POINTS)
    for _ in range(2):
        e = np.exp(-t_s[None, :] / grid[:, None])
        ec = e - e.mean(axis=1, keepdims=True)
        cov = ec @ y
        var = np.einsum("ij,ij->i", ec, ec)
        sse = float(y @ y) - cov**2 / var
        k = int(np.argmin(sse))
        lo = grid[max(k - 1, 0)]
        hi = grid[min(k + 1, grid.size - 1)]
        best_tau, best_slope = float(grid[k]), float(cov[k] / var[k])
        best_sse = float(sse[k])
        grid = np.linspace(lo, hi, _TAU_GRID_POINTS)
    # v = a + slope*e, so b = -slope.
    rmse = float(np.sqrt(max(best_sse, 0.0) / t_s.size))
    return -best_slope, best_tau, rmse


def fit_ecm_from_hppc(
    time_s: npt.ArrayLike,
    current_a: npt.ArrayLike,
    voltage_v: npt.ArrayLike,
    *,
    capacity_ah: float | None = None,
    soc_start: float = 1.0,
    min_pulse_current_a: float | None = None,
    min_pulse_s: float = 5.0,
    max_pulse_s: float = 120.0,
    rest_current_a: float = 0.5,
    max_relax_s: float = 600.0,
    min_relax_samples: int = 5,
    tau_bounds_s: tuple[float, float] = (0.5, 500.0),
) -> EcmFit:
    """Identify R0 and one RC pair for every discharge pulse of an HPPC record.

    A pulse is a run of samples with ``current_a >= min_pulse_current_a`` lasting between
    ``min_pulse_s`` and ``max_pulse_s`` and preceded by a rest sample
    (``|current_a| <= rest_current_a``). For each pulse:

    - ``R0 = (V_rest - V_first) / (I_pulse - I_rest)``, the instantaneous step to the first
      sample inside the pulse (0.5 s after the step in the ORNL files);
    - ``R(t)`` at 1, 10 and 30 s: the same ratio using the voltage interpolated ``t``
      seconds after the step (the step time is taken as the last rest sample);
    - ``R1`` and ``tau1`` from the rest that follows the pulse (until the current leaves the
      rest band or ``max_relax_s``): ``v(t) = a - b*exp(-t/tau1)`` is fitted by least
      squares and ``R1 = b / (I_pulse * (1 - exp(-T_pulse/tau1)))``, which is the voltage a
      single RC pair charged for ``T_pulse`` releases.

    SoC comes from coulomb counting from the first sample: ``soc_start`` there, minus the
    discharged charge over ``capacity_ah``. Start the record at a known state (for the ORNL
    files, the rest after the full charge).

    Loops run once per pulse (about ten in an HPPC test); all per-sample work is vectorised.

    Args:
        time_s: sample times, strictly increasing, s.
        current_a: current, positive on discharge, A.
        voltage_v: terminal voltage, V.
        capacity_ah: capacity used for SoC. ``None`` takes the net charge discharged over
            the whole record, so that SoC reaches 0 at the last sample (right for an HPPC
            test run down to the cut-off voltage).
        soc_start: SoC at the first sample, fraction.
        min_pulse_current_a: pulse detection threshold, A. ``None`` uses half the largest
            discharge current in the record.
        min_pulse_s: shortest run accepted as a pulse, s.
        max_pulse_s: longest run accepted as a pulse, s (rejects the constant-current SoC
            steps between pulses).
        rest_current_a: largest |current| counted as rest, A.
        max_relax_s: longest stretch of the post-pulse rest used in the RC fit, s.
        min_relax_samples: fewest rest samples for an RC fit; fewer gives NaN R1 and tau1.
        tau_bounds_s: search interval for tau1, s.

    Returns:
        The per-pulse parameters, in time order.

    Raises:
        ChemistryError: if the arrays are malformed, the capacity is not positive, or no
            pulse is found.
    """
    t, i, v = _check_record(time_s, current_a, voltage_v)
    q_as = _cumulative_charge_as(t, i)
    cap_ah = q_as[-1] / _SECONDS_PER_HOUR if capacity_ah is None else float(capacity_ah)
    if not cap_ah > 0.0:
        msg = f"capacity must be positive, got {cap_ah} Ah (is discharge current positive?)"
        raise ChemistryError(msg)
    soc = soc_start - q_as / _SECONDS_PER_HOUR / cap_ah

    threshold = 0.5 * float(i.max()) if min_pulse_current_a is None else float(min_pulse_current_a)
    if not threshold > 0.0:
        msg = "no discharge current in the record (current must be positive on discharge)"
        raise ChemistryError(msg)
    starts, ends = _runs(i >= threshold)
    is_rest = np.abs(i) <= rest_current_a
    keep = starts >= 1
    starts, ends = starts[keep], ends[keep]
    pre = starts - 1
    duration = t[ends] - t[pre]
    keep = is_rest[pre] & (duration >= min_pulse_s) & (duration <= max_pulse_s)
    starts, ends, pre, duration = starts[keep], ends[keep], pre[keep], duration[keep]
    if starts.size == 0:
        msg = f"no discharge pulse of {min_pulse_s}-{max_pulse_s} s above {threshold:.3g} A after a rest"
        raise ChemistryError(msg)

    # The rest after each pulse runs until the first non-rest sample or the record's end.
    rest_starts, rest_ends = _runs(is_rest)
    n = starts.size
    out = {name: np.full(n, np.nan) for name in ("i", "r0", "r1", "tau", "r1s", "r10s", "r30s", "rmse")}
    for k in range(n):
        s, e, p = int(starts[k]), int(ends[k]), int(pre[k])
        pulse_i = float(np.median(i[s : e + 1]))
        d_i = pulse_i - i[p]
        out["i"][k] = pulse_i
        out["r0"][k] = (v[p] - v[s]) / d_i
        t_rel = t[s : e + 1] - t[p]
        v_at = np.interp([1.0, 10.0, 30.0], t_rel, v[s : e + 1], right=np.nan)
        out["r1s"][k], out["r10s"][k], out["r30s"][k] = (v[p] - v_at) / d_i

        j = int(np.searchsorted(rest_starts, e + 1))
        if j >= rest_starts.size or rest_starts[j] != e + 1:
            continue
        relax = np.arange(e + 1, int(rest_ends[j]) + 1)
        relax = relax[t[relax] - t[e] <= max_relax_s]
        if relax.size < min_relax_samples:
            continue
        b, tau, rmse = _fit_relaxation(t[relax] - t[e], v[relax], tau_bounds_s)
        out["r1"][k] = b / (d_i * (1.0 - np.exp(-duration[k] / tau)))
        out["tau"][k] = tau
        out["rmse"][k] = rmse

    return EcmFit(
        t_start_s=t[pre],
        duration_s=duration,
        current_a=out["i"],
        soc=soc[pre],
        v_rest_v=v[pre],
        r0_ohm=out["r0"],
        r1_ohm=out["r1"],
        tau1_s=out["tau"],
        r_1s_ohm=out["r1s"],
        r_10s_ohm=out["r10s"],
        r_30s_ohm=out["r30s"],
        rmse_v=out["rmse"],
    )


def fit_arrhenius(temp_c: npt.ArrayLike, r_ohm: npt.ArrayLike, *, t_ref_c: float = 25.0) -> ArrheniusFit:
    """Fit ``ln R = ln R_ref + Ea/R_gas * (1/T - 1/T_ref)`` by least squares.

    Args:
        temp_c: temperatures, °C (at least two distinct values).
        r_ohm: resistance at each temperature, Ω (positive).
        t_ref_c: reference temperature, °C.

    Returns:
        The activation energy and the fitted resistance at ``t_ref_c``.

    Raises:
        ChemistryError: on mismatched lengths, fewer than two temperatures or a
            non-positive resistance.

    Examples:
        The Nissan Leaf R0 at mid SoC (mΩ) at 10, 25 and 40 °C:

        >>> fit = fit_arrhenius([10.0, 25.0, 40.0], [2.58e-3, 1.57e-3, 1.52e-3])
        >>> round(fit.ea_j_per_mol / 1000, 1), round(float(fit.factor(10.0)), 2)
        (13.2, 1.33)
        >>> round(fit_arrhenius([10.0, 25.0], [2.58e-3, 1.57e-3]).ea_j_per_mol / 1000, 1)
        23.2
    """
    t_c = _as_1d("temp_c", temp_c)
    r = _as_1d("r_ohm", r_ohm)
    if t_c.size != r.size:
        msg = f"temp_c and r_ohm differ in length: {t_c.size} and {r.size}"
        raise ChemistryError(msg)
    if np.unique(t_c).size < 2:
        msg = "an Arrhenius fit needs at least two distinct temperatures"
        raise ChemistryError(msg)
    if np.any(r <= 0.0):
        msg = "resistances must be positive"
        raise ChemistryError(msg)
    x = 1.0 / (t_c + _KELVIN_OFFSET) - 1.0 / (t_ref_c + _KELVIN_OFFSET)
    design = np.column_stack((np.ones_like(x), x))
    coef, *_ = np.linalg.lstsq(design, np.log(r), rcond=None)
    resid = np.log(r) - design @ coef
    return ArrheniusFit(
        ea_j_per_mol=float(coef[1] * GAS_CONSTANT_J_PER_MOL_K),
        r_ref_ohm=float(np.exp(coef[0])),
        t_ref_c=float(t_ref_c),
        rms_log_residual=float(np.sqrt(np.mean(resid**2))),
    )


def ocv_from_slow_cycle(
    discharge: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    charge: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike],
    *,
    soc_grid: npt.ArrayLike | None = None,
    cc_tolerance: float = 0.01,
    r_soc_band: tuple[float, float] = (0.1, 0.5),
) -> OcvFromCycle:
    """Estimate OCV(SoC) as the average of a slow discharge and the charge that follows.

    Each branch is referenced to its own coulomb count: the discharge runs from SoC 1 at
    its first sample to SoC 0 at its last, the charge from 0 to 1. At equal current the
    resistive drop (and a symmetric hysteresis) cancels in the average. In the
    constant-voltage part of the charge the current falls, so the drop no longer cancels;
    both branches are therefore corrected with an apparent series resistance
    ``R_s = median((V_chg - V_dis) / (I_chg + I_dis))`` taken where both branches are at
    constant current inside ``r_soc_band``: ``OCV = ((V_chg - I_chg*R_s) + (V_dis + I_dis*R_s)) / 2``.
    Where both currents are equal this is exactly the plain average.

    Args:
        discharge: the discharge as ``(time_s, current_a, voltage_v)``, current positive.
        charge: the charge that follows as ``(time_s, current_a, voltage_v)``, current
            negative under the project's sign convention (positive = discharge).
        soc_grid: output grid, fraction. ``None`` gives 101 points from 0 to 1.
        cc_tolerance: a charge sample counts as constant current while its current is
            within this fraction of the charge's largest current.
        r_soc_band: SoC band used to estimate ``R_s``.

    Returns:
        The OCV table, both raw branches on the grid, ``R_s`` and the two throughputs.

    Raises:
        ChemistryError: on malformed arrays, a branch with the wrong current sign, or no
            constant-current overlap inside ``r_soc_band``.
    """
    td, i_d, v_d = _check_record(*discharge)
    tc, i_c, v_c = _check_record(*charge)
    q_d = _cumulative_charge_as(td, i_d)
    q_c = -_cumulative_charge_as(tc, i_c)
    if not (q_d[-1] > 0.0 and q_c[-1] > 0.0):
        msg = "the discharge needs positive and the charge negative current (positive = discharge)"
        raise ChemistryError(msg)
    soc_d = 1.0 - q_d / q_d[-1]
    soc_c = q_c / q_c[-1]
    grid = np.linspace(0.0, 1.0, 101) if soc_grid is None else _as_1d("soc_grid", soc_grid)

    # np.interp needs increasing x: the discharge SoC falls with time, so reverse it.
    vd = np.interp(grid, soc_d[::-1], v_d[::-1])
    id_ = np.interp(grid, soc_d[::-1], i_d[::-1])
    vc = np.interp(grid, soc_c, v_c)
    ic = -np.interp(grid, soc_c, i_c)

    cc = ic >= (1.0 - cc_tolerance) * ic.max()
    band = cc & (grid >= r_soc_band[0]) & (grid <= r_soc_band[1]) & (ic + id_ > 0.0)
    if not np.any(band):
        msg = f"no constant-current overlap of charge and discharge inside SoC {r_soc_band}"
        raise ChemistryError(msg)
    r_s = float(np.median((vc[band] - vd[band]) / (ic[band] + id_[band])))
    ocv = 0.5 * ((vc - ic * r_s) + (vd + id_ * r_s))
    return OcvFromCycle(
        soc=grid,
        ocv_v=ocv,
        discharge_v=vd,
        charge_v=vc,
        series_resistance_ohm=r_s,
        discharge_capacity_ah=float(q_d[-1] / _SECONDS_PER_HOUR),
        charge_capacity_ah=float(q_c[-1] / _SECONDS_PER_HOUR),
    )
