"""Identify equivalent-circuit parameters from HPPC pulse tests and slow cycles.

Pure numpy, no I/O: the caller loads a test record (time, current, voltage) and gets back
frozen results. Current is **positive on discharge**, the project's convention; convert
cycler data that uses the opposite sign before calling (the ORNL Nissan Leaf files log
discharge as negative current).

Four identifications live here:

- :func:`fit_ecm_from_hppc` finds the discharge pulses of a hybrid pulse power
  characterisation (HPPC) record and returns, for every pulse, the state of charge, the
  ohmic resistance ``R0`` from the instantaneous voltage step at the pulse start, and one
  RC pair (``R1``, ``tau1``) from a least-squares fit of the voltage relaxation after the
  pulse.
- :func:`fit_rc_pairs_to_record` fits two RC pairs (a fast and a slow one) to a whole test
  record by least squares, given the model's OCV and ``R0`` along it, optionally with the
  OCV corrected block by block: the 40-s rests after HPPC pulses only see the fast pair,
  while long discharges are dominated by the slow one.
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
    "TwoRcFit",
    "fit_arrhenius",
    "fit_ecm_from_hppc",
    "fit_rc_pairs_to_record",
    "ocv_from_slow_cycle",
]

FloatArray = npt.NDArray[np.float64]

_KELVIN_OFFSET = 273.15
_SECONDS_PER_HOUR = 3600.0
_TAU_GRID_POINTS = 400
_PAIR_GRID_POINTS = 40
_PAIR_REFINEMENTS = 4
_STRETCH_DECAYS = 300.0  # longest closed-form stretch of _filtered_currents, in units of the shortest tau
_COLLINEAR = 1e-6  # pairs whose columns' squared correlation exceeds 1 - this are not fitted jointly


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

    def block_labels(self, time_s: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Return the pulse-to-pulse block of every sample time (for ``fit_rc_pairs_to_record``).

        Block ``k`` runs from the last rest sample before pulse ``k`` (``t_start_s[k]``) to
        just before that of pulse ``k + 1``; the last block runs to the end. Samples before
        the first pulse get -1.

        Args:
            time_s: sample times of the record the pulses were found in, s.

        Returns:
            One integer label per sample.
        """
        t = np.asarray(time_s, dtype=np.float64)
        return np.searchsorted(self.t_start_s, t, side="right").astype(np.int64) - 1

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


@dataclass(frozen=True, slots=True)
class TwoRcFit:
    """Result of :func:`fit_rc_pairs_to_record`: a fast and a slow RC pair.

    Attributes:
        r1_ohm: resistance of the fast pair, Ω (times the record's resistance scale).
        tau1_s: time constant of the fast pair, s.
        r2_ohm: resistance of the slow pair, Ω.
        tau2_s: time constant of the slow pair, s.
        rmse_v: weighted root-mean-square voltage residual of the fit, V.
    """

    r1_ohm: float
    tau1_s: float
    r2_ohm: float
    tau2_s: float
    rmse_v: float


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


def _filtered_currents(time_s: FloatArray, current_a: FloatArray, tau_s: FloatArray) -> FloatArray:
    """Return the RC-pair currents ``x`` (samples x time constants), starting from rest.

    ``x[k] = x[k-1] + (i[k] - x[k-1]) * (1 - exp(-(t[k] - t[k-1])/tau))``: ``current_a[k]``
    flows over ``(t[k-1], t[k]]``, the emulator's exact zero-order-hold update. Within a
    stretch of time ``s`` short enough that ``exp(s/tau)`` stays finite, the recursion has the
    closed form ``x[k] = e[k] * (x[k0] + cumsum(g[l] * i[l] / e[l]))`` with ``e`` the decay
    since the stretch's start and ``g = 1 - a`` the gain, evaluated as array operations; the
    loop runs once per stretch (about ``duration / (500 * min(tau))`` of them).
    """
    dt = np.diff(time_s)
    log_a = -dt[:, None] / tau_s[None, :]  # (n - 1, m)
    gain = -np.expm1(log_a)
    out = np.zeros((time_s.size, tau_s.size))
    span = _STRETCH_DECAYS * float(np.min(tau_s))
    x = out[0]
    k0 = 1
    while k0 < time_s.size:
        k1 = int(np.searchsorted(time_s, time_s[k0 - 1] + span, side="right"))
        k1 = min(max(k1, k0 + 1), time_s.size)
        decay = np.cumsum(log_a[k0 - 1 : k1 - 1], axis=0)  # ln of the decay from t[k0-1] to t[k]
        drive = np.cumsum(gain[k0 - 1 : k1 - 1] * current_a[k0:k1, None] * np.exp(-decay), axis=0)
        out[k0:k1] = np.exp(decay) * (x + drive)
        x = out[k1 - 1]
        k0 = k1
    return out


class _BlockLines:
    """Weighted projection that removes a straight line in ``x`` from every block of samples.

    ``self(z)`` returns ``z`` less its weighted least-squares fit by ``a_b + c_b*x`` within
    each block ``b`` (the columns of a 2-D ``z`` independently). Samples with a negative label
    are passed through unchanged; samples of zero weight are corrected with their block's
    line but do not shape it. Loops run once per block.
    """

    def __init__(self, blocks: npt.NDArray[np.integer], x: FloatArray, w: FloatArray) -> None:
        self._parts: list[tuple[slice | npt.NDArray[np.intp], FloatArray, FloatArray]] = []
        for label in np.unique(blocks[blocks >= 0]):
            rows = np.flatnonzero(blocks == label)
            ww = w[rows]
            if not ww.sum() > 0.0:
                continue
            basis = np.column_stack((np.ones(rows.size), x[rows] - np.average(x[rows], weights=ww)))
            # pinv: a block at constant x (a rest only) keeps just its offset.
            solve = np.linalg.pinv(basis.T @ (basis * ww[:, None])) @ (basis * ww[:, None]).T
            contiguous = rows[-1] - rows[0] + 1 == rows.size
            index: slice | npt.NDArray[np.intp] = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
            self._parts.append((index, basis, solve))

    def __call__(self, z: FloatArray) -> FloatArray:
        out = np.array(z, dtype=np.float64, copy=True)
        for index, basis, solve in self._parts:
            out[index] -= basis @ (solve @ out[index])
        return out


def _best_pair(
    cols: FloatArray, n1: int, y: FloatArray, w: FloatArray, allowed: npt.NDArray[np.bool_] | None = None
) -> tuple[int, int, float, float, float]:
    """Non-negative least squares of ``y ~ r1*cols[:, a] + r2*cols[:, n1 + b]`` for every (a, b) at once.

    Returns the best ``(a, b, r1, r2, sse)`` over the pairs ``allowed`` (all by default). For
    two unknowns the non-negative solution is either the unconstrained one (when both are
    >= 0 and the two columns are not collinear) or the better single-column fit.
    """
    weighted = cols * w[:, None]
    gram = weighted.T @ cols
    proj = weighted.T @ y
    diag = np.diag(gram)
    g11, g22, g12 = diag[:n1, None], diag[None, n1:], gram[:n1, n1:]
    y1, y2, yy = proj[:n1, None], proj[None, n1:], float(w @ (y * y))
    det = g11 * g22 - g12 * g12
    # Nearly collinear columns (two equal time constants) make the 2 x 2 solve meaningless.
    distinct = det > _COLLINEAR * g11 * g22
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = (g22 * y1 - g12 * y2) / det
        r2 = (g11 * y2 - g12 * y1) / det
        both = np.where((r1 >= 0.0) & (r2 >= 0.0) & distinct, yy - r1 * y1 - r2 * y2, np.inf)
        only1 = np.broadcast_to(yy - np.where(y1 > 0.0, y1 * y1 / g11, 0.0), det.shape)
        only2 = np.broadcast_to(yy - np.where(y2 > 0.0, y2 * y2 / g22, 0.0), det.shape)
    sse = np.minimum(both, np.minimum(only1, only2))
    if allowed is not None:
        sse = np.where(allowed, sse, np.inf)
    a, b = np.unravel_index(int(np.argmin(sse)), sse.shape)
    if both[a, b] <= min(only1[a, b], only2[a, b]):
        return int(a), int(b), float(r1[a, b]), float(r2[a, b]), float(sse[a, b])
    if only1[a, b] <= only2[a, b]:
        return int(a), int(b), max(float(y1[a, 0] / g11[a, 0]), 0.0), 0.0, float(sse[a, b])
    return int(a), int(b), 0.0, max(float(y2[0, b] / g22[0, b]), 0.0), float(sse[a, b])


def fit_rc_pairs_to_record(
    time_s: npt.ArrayLike,
    current_a: npt.ArrayLike,
    voltage_v: npt.ArrayLike,
    *,
    ocv_v: npt.ArrayLike,
    r0_ohm: float,
    r_scale: npt.ArrayLike = 1.0,
    weight: npt.ArrayLike = 1.0,
    ocv_blocks: npt.ArrayLike | None = None,
    tau1_bounds_s: tuple[float, float] = (2.0, 60.0),
    tau2_bounds_s: tuple[float, float] = (60.0, 3600.0),
) -> TwoRcFit:
    """Fit a fast and a slow RC pair to a whole record, given the model's OCV and ``R0``.

    The model is ``v = ocv_v - r_scale*(r0_ohm*i + r1*x1 + r2*x2)``, with ``x1``, ``x2`` the
    currents through the two pairs (time constants ``tau1 < tau2``), zero at the first sample
    (start the record at rest) and updated exactly for a current held over each sampling
    interval, as the emulator does (``current_a[k]`` flows over ``(t[k-1], t[k]]``).
    ``r_scale`` carries whatever else the resistances depend on along the record (the SoC
    shape, for instance), so that ``r1`` and ``r2`` are the values at scale 1.

    The residual is weighted by time (trapezoid weights: a record sampled every 0.1 s in
    pulses and every 60 s in rests weighs each second alike) times ``weight`` (0 leaves a
    sample out). For fixed time constants the model is linear in ``r1`` and ``r2``, found by
    non-negative least squares in closed form; the time constants are searched on a
    logarithmic grid over the bounds, then on finer grids around the best point.

    An OCV table is good to a few mV, which at the currents of a pulse test is as much as
    the slow pair's whole voltage. With ``ocv_blocks`` the OCV is corrected inside every
    block of samples by an offset and a slope in discharged charge, fitted together with the
    pairs (projected out of the least squares): the pairs are then identified from the
    transients alone (each pulse, step and relaxation against its own block's OCV line),
    not from the level of the OCV table. Blocks should each hold a load and the rest after
    it (an HPPC test: from the rest before one pulse to the rest before the next).

    Args:
        time_s: sample times, strictly increasing, s.
        current_a: current, positive on discharge, A.
        voltage_v: measured terminal voltage, V.
        ocv_v: the model's open-circuit voltage at every sample, V.
        r0_ohm: ohmic resistance at scale 1, Ω (identified separately, from pulse steps).
        r_scale: resistance scale at every sample (scalar or array), dimensionless.
        weight: extra weight of every sample (scalar or array, >= 0).
        ocv_blocks: block label of every sample (integers); ``None`` fits without the OCV
            correction. Samples with a negative label are left out of the fit.
        tau1_bounds_s: search interval of the fast time constant, s.
        tau2_bounds_s: search interval of the slow time constant, s (above ``tau1_bounds_s``).

    Returns:
        The two pairs and the weighted RMSE of the fit (after the OCV correction, if any).

    Raises:
        ChemistryError: on malformed arrays, bounds that overlap or are not positive, or
            weights that leave nothing to fit.

    Examples:
        A synthetic record from a known model is recovered:

        >>> import numpy as np
        >>> t = np.arange(0.0, 6000.0, 1.0)
        >>> i = np.where((t % 1500.0) < 600.0, 20.0, 0.0)
        >>> i[0] = 0.0
        >>> x = _filtered_currents(t, i, np.array([15.0, 300.0]))
        >>> v = 3.7 - 1e-3 * i - 0.6e-3 * x[:, 0] - 1.5e-3 * x[:, 1]
        >>> fit = fit_rc_pairs_to_record(t, i, v, ocv_v=np.full(t.size, 3.7), r0_ohm=1e-3)
        >>> round(fit.tau1_s, 1), round(fit.tau2_s), round(fit.r1_ohm * 1e3, 3), round(fit.r2_ohm * 1e3, 3)
        (15.0, 300, 0.6, 1.5)
    """
    t, i, v = _check_record(time_s, current_a, voltage_v)
    ocv = np.broadcast_to(np.asarray(ocv_v, dtype=np.float64), t.shape)
    scale = np.broadcast_to(np.asarray(r_scale, dtype=np.float64), t.shape)
    extra = np.broadcast_to(np.asarray(weight, dtype=np.float64), t.shape)
    if not (np.all(np.isfinite(ocv)) and np.all(np.isfinite(scale)) and np.all(np.isfinite(extra))):
        msg = "ocv_v, r_scale and weight must be finite"
        raise ChemistryError(msg)
    lo1, hi1 = tau1_bounds_s
    lo2, hi2 = tau2_bounds_s
    if not 0.0 < lo1 < hi1 <= lo2 < hi2:
        msg = f"need 0 < tau1 bounds < tau2 bounds, got {tau1_bounds_s} and {tau2_bounds_s}"
        raise ChemistryError(msg)
    dt = np.diff(t)
    w = np.zeros_like(t)
    w[:-1] += 0.5 * dt
    w[1:] += 0.5 * dt
    w *= extra
    blocks = None
    if ocv_blocks is not None:
        blocks = np.broadcast_to(np.asarray(ocv_blocks), t.shape)
        if not np.issubdtype(blocks.dtype, np.integer):
            msg = "ocv_blocks must hold integer labels"
            raise ChemistryError(msg)
        w = np.where(blocks >= 0, w, 0.0)
    if np.any(extra < 0.0) or not w.sum() > 0.0:
        msg = "weight must be >= 0 and leave some samples in the fit"
        raise ChemistryError(msg)
    y = ocv - scale * float(r0_ohm) * i - v
    project = None if blocks is None else _BlockLines(blocks, _cumulative_charge_as(t, i), w)
    if project is not None:
        y = project(y)

    grid1 = np.geomspace(lo1, hi1, _PAIR_GRID_POINTS)
    grid2 = np.geomspace(lo2, hi2, _PAIR_GRID_POINTS)
    for _ in range(_PAIR_REFINEMENTS):
        cols = scale[:, None] * _filtered_currents(t, i, np.concatenate((grid1, grid2)))
        if project is not None:
            cols = project(cols)
        a, b, r1, r2, sse = _best_pair(cols, grid1.size, y, w, allowed=grid1[:, None] < grid2[None, :])
        tau1, tau2 = float(grid1[a]), float(grid2[b])
        # The two time constants are coupled: bracket each best point by two grid steps.
        grid1 = np.geomspace(grid1[max(a - 2, 0)], grid1[min(a + 2, grid1.size - 1)], _PAIR_GRID_POINTS)
        grid2 = np.geomspace(grid2[max(b - 2, 0)], grid2[min(b + 2, grid2.size - 1)], _PAIR_GRID_POINTS)
    return TwoRcFit(r1_ohm=r1, tau1_s=tau1, r2_ohm=r2, tau2_s=tau2, rmse_v=float(np.sqrt(max(sse, 0.0) / w.sum())))


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
