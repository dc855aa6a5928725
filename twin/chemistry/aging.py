"""Calendar and cycle aging laws in the style of NREL BLAST-Lite, streamed chunk by chunk over many packs.

The pack emulator (truth) and the twin's RUL estimator both advance these laws one chunk at a
time (an hour, a day, a week of telemetry) for hundreds of packs at once. Everything here is pure
numerics on numpy arrays indexed by pack: no I/O, no clock, no Python loop per pack.

The pieces:

- :class:`Stressors`: what one chunk did to each pack (time, mean temperature, mean SoC, time at
  each SoC, depth of discharge, C-rates, equivalent full cycles). Build it from telemetry with
  :func:`stressors_from_series`, or by hand with :meth:`Stressors.from_means`.
- :class:`AgingState`: the per-pack degradation state (frozen, read-only arrays), including the
  outputs ``q`` (relative capacity) and ``r_growth`` (relative resistance, 1.0 = new).
- One law class per BLAST-Lite cell model, registered by name in :data:`AGING_LAWS`; fetch one with
  :func:`get_aging_law`. Each law has ``name``, ``provenance``, ``validity`` and the pure
  ``step(state, stressors, *, scalar, knee) -> AgingState``.
- :class:`KneeModel`: optional accelerated fade after a per-pack knee onset.
- :func:`anode_potential_v`: the graphite anode potential Ua(SoC) used as a calendar stressor.

Conventions:

- Current is positive on discharge (the project-wide convention of ``twin.contract``).
- SoC and relative capacity are fractions in [0, 1]; temperatures are kelvin inside the laws.
- ``efc`` and the C-rates are normalised by the ``capacity_ah`` handed to
  :func:`stressors_from_series`. BLAST-Lite >= 1.1 expresses both in units of the cell's *nominal*
  capacity (its ``delta_efc`` and ``Crate`` are multiplied by the present relative capacity ``q``),
  so pass the nominal (nameplate) capacity to follow the published fits. The exception is the
  second-life Nissan Leaf law, whose "nominal" is the capacity at second-life intake.
- Each law's ``q`` is relative to the model's own start of life. A pack that enters service at
  SoH ``h0`` (relative to its nameplate) has ``soh(t) = h0 * q(t)``.

Incremental updates (BLAST-Lite ``blast/models/degradation_model.py``, BSD-3; HEAD ``bae8c71`` as
cited in BATTERY_NOTES.md, parameters checked against the 1.1.1 release):
rates are evaluated from each chunk's stressors, then every state advances by the same rules
BLAST-Lite uses for time-varying input, for instance the power law ``y = k*x**p`` advances by
``dy = k*p*(y/k)**((p-1)/p)*dx``, and the first step is ``y = k*dx**p``
(:func:`power_law_increment`). All increments are multiplied by the per-pack ``scalar`` (BLAST's
``degradation_scalar``). For a power law, in the limit of small chunks a scalar ``s`` gives the
trajectory ``y = k*(s*x)**p``: it speeds up the pack's aging clock.

Time-averaged rates: BLAST-Lite evaluates each rate at every sample of a chunk and averages it
over time with the trapezoid rule. Rates that depend non-linearly on SoC (through Ua) differ a lot
between "average of the rate" and "rate of the average SoC"; for one 10-90 % cycle a day the Kokam
calendar rate differs by 2x. :class:`Stressors` therefore carries ``soc_occupancy``, the fraction of
the chunk spent near each node of :data:`SOC_GRID`, and the laws average their SoC-dependent rates
over it. Temperature enters as the chunk's time-averaged value; within-chunk temperature swings are
not resolved (a +/-5 K daily swing changes an Arrhenius rate with Ea = 37 kJ/mol by about 1 %).

Validity: each law carries the experimental range BLAST-Lite states (``experimental_range``).
Stressors outside it are reported by ``law.validity.flags(stressors)``; they never raise.

References:
    P. Gasper, K. Smith et al., NREL BLAST-Lite, https://github.com/NREL/BLAST-Lite (BSD-3-Clause).
    M. Safari, C. Delacourt, J. Electrochem. Soc. 158 (5) A562 (2011), doi:10.1149/1.3567007.
    P. M. Attia et al., "Knees in lithium-ion battery aging trajectories", J. Electrochem. Soc. 169
    060517 (2022); data tables in the repository valentinsulzer/kneepoint-review.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import ClassVar, Final, NamedTuple, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from twin.errors import ChemistryError

__all__ = [
    "AGING_LAWS",
    "ATTIA_MEDIAN_KNEE_TO_EOL",
    "EMPIRICAL_R_PER_FADE",
    "FIRST_LIFE",
    "REST_C_RATE",
    "SEVERSON_LFP_KNEE_TO_EOL",
    "SOC_GRID",
    "AgingLaw",
    "AgingState",
    "KneeModel",
    "LfpGr250AhPrismatic",
    "LfpGrSonyMurata3Ah",
    "LmoGrNissanLeaf66Ah2ndLife",
    "Nmc111GrKokam75Ah",
    "Nmc622GrDenso50Ah",
    "Nmc811GrSiLgm50",
    "NmcGr50AhB1",
    "Stressors",
    "Validity",
    "ValidityFlags",
    "anode_potential_v",
    "first_life_stressors",
    "get_aging_law",
    "power_b_increment",
    "power_law_increment",
    "sigmoid_increment",
    "stressors_from_series",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]
BoolArray = NDArray[np.bool_]

SECONDS_PER_DAY: Final = 86_400.0
SECONDS_PER_HOUR: Final = 3_600.0
ZERO_CELSIUS_K: Final = 273.15
R_GAS_J_PER_MOL_K: Final = 8.3144  # the value BLAST-Lite uses in its Arrhenius terms

SOC_GRID: Final[FloatArray] = np.linspace(0.0, 1.0, 51)
"""Nodes (step 0.02) on which :attr:`Stressors.soc_occupancy` records the time spent at each SoC."""

REST_C_RATE: Final = 1e-2
"""|I|/Q below this (1/h) counts as rest in the mean C-rates, as in BLAST-Lite ``_extract_stressors``."""

EMPIRICAL_R_PER_FADE: Final = 1.5
"""Relative resistance gained per unit of capacity fade for laws without a resistance law.

About +30 % resistance at 20 % fade (end of life): BATTERY_NOTES.md section 3, "Resistance growth and
thermal non-uniformity" (lab cycling of LCO cells); consistent with the linear R-capacity relation
across retired packs (Drallmeier et al., arXiv 2203.12376) and the SoH-R correlation of the PulseBat
retired cells (rho = -0.45 to -0.89). An empirical link, not part of the BLAST-Lite fits.
"""

ATTIA_MEDIAN_KNEE_TO_EOL: Final = 0.86
"""Median knee-point / end-of-life ratio over 17 sources and 303 cells (Attia et al. 2022)."""

SEVERSON_LFP_KNEE_TO_EOL: Final = 0.77
"""Median Bacon-Watts knee / EOL for the Severson 2019 LFP cells, n = 116 (Attia et al. 2022 data)."""

_UA_NORM_V: Final = 0.123  # Ua at about 50 % SoC, the BLAST-Lite normalisation (UaN = Ua / 0.123)
_TREF_NORM_K: Final = ZERO_CELSIUS_K + 35.0  # BLAST-Lite TdegKN = T / (273.15 + 35)


def _readonly(a: FloatArray) -> FloatArray:
    a.flags.writeable = False
    return a


def anode_potential_v(soc: ArrayLike) -> FloatArray:
    """Return the graphite anode potential vs Li/Li+ (V) for a full-cell SoC, elementwise.

    The lithiation fraction is ``Xa = 0.0085 + soc*(0.78 - 0.0085)`` (Schimpe et al. 2017
    stoichiometry, as BLAST-Lite assumes for every cell) and the open-circuit potential is the fit of
    Safari & Delacourt, J. Electrochem. Soc. 158 A562 (2011), as coded in BLAST-Lite
    ``blast/models/degradation_model.py::_get_Ua``. BLAST-Lite uses it as the calendar-aging
    stressor: low Ua (high SoC) drives SEI growth.

    Args:
        soc: state of charge, fraction in [0, 1], any shape.

    Returns:
        Ua in volts, same shape as ``soc``.

    Examples:
        >>> [round(float(u), 4) for u in anode_potential_v([0.1, 0.5, 0.9])]
        [0.2332, 0.1233, 0.0882]
    """
    xa = 8.5e-3 + np.asarray(soc, dtype=np.float64) * (0.78 - 8.5e-3)
    ua: FloatArray = (
        0.6379
        + 0.5416 * np.exp(-305.5309 * xa)
        + 0.044 * np.tanh(-(xa - 0.1958) / 0.1088)
        - 0.1978 * np.tanh((xa - 1.0571) / 0.0854)
        - 0.6875 * np.tanh((xa + 0.0117) / 0.0529)
        - 0.0175 * np.tanh((xa - 0.5692) / 0.0875)
    )
    return ua


_UA_GRID: Final[FloatArray] = _readonly(anode_potential_v(SOC_GRID))


# --------------------------------------------------------------------------------------------------
# Stressors
# --------------------------------------------------------------------------------------------------


def _frozen_as(value: object, shape: tuple[int, ...]) -> bool:
    """Whether ``value`` is already a read-only float array of ``shape`` (kept as it is, no copy)."""
    return (
        isinstance(value, np.ndarray)
        and value.dtype == np.float64
        and value.shape == shape
        and not value.flags.writeable
        and value.flags.owndata  # not a read-only view of an array someone can still write
    )


def _pack_vector(name: str, value: ArrayLike, n: int) -> FloatArray:
    if _frozen_as(value, (n,)):
        return value  # type: ignore[return-value]
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 1:
        msg = f"{name} must be a scalar or a 1-D array of one value per pack, got shape {arr.shape}"
        raise ValueError(msg)
    try:
        out = np.array(np.broadcast_to(arr, (n,)), dtype=np.float64)
    except ValueError as exc:
        msg = f"{name} has {arr.size} values for {n} packs"
        raise ValueError(msg) from exc
    return _readonly(out)


def _tent_weights(soc: FloatArray, weights: FloatArray) -> FloatArray:
    """Spread per-sample time weights onto SOC_GRID by linear interpolation, per pack.

    ``soc`` and ``weights`` are (n_steps, n_packs); returns (n_packs, len(SOC_GRID)). Linear (tent)
    interpolation keeps the mean: sum(occupancy * SOC_GRID) equals the weighted mean SoC.
    """
    n_grid = SOC_GRID.size
    n_packs = soc.shape[1]
    pos = np.clip(soc, 0.0, 1.0) * (n_grid - 1)
    lo = np.minimum(np.floor(pos).astype(np.intp), n_grid - 2)
    frac = pos - lo
    base = np.arange(n_packs, dtype=np.intp)[np.newaxis, :] * n_grid
    idx = (base + lo).ravel()
    size = n_packs * n_grid
    occ: FloatArray = np.asarray(
        np.bincount(idx, weights=(weights * (1.0 - frac)).ravel(), minlength=size)
        + np.bincount(idx + 1, weights=(weights * frac).ravel(), minlength=size),
        dtype=np.float64,
    )
    return occ.reshape(n_packs, n_grid)


@dataclass(frozen=True)
class Stressors:
    """What one chunk of operation did to each pack: the inputs of every aging law.

    All fields are read-only float arrays with one entry per pack (``soc_occupancy`` has one row
    per pack). Build them with :func:`stressors_from_series` from telemetry, or with
    :meth:`from_means` from known averages.

    Attributes:
        dt_days: length of the chunk (days).
        temp_k: time-averaged cell temperature over the chunk (K).
        soc_mean: time-averaged SoC (fraction).
        dod: depth of discharge, max - min SoC over the chunk (fraction).
        c_rate_mean: time-averaged |I|/Q over the whole chunk, rest included (1/h).
        c_rate_charge_mean: mean |I|/Q over the time spent charging (1/h), 0 if no charging.
        c_rate_discharge_mean: mean |I|/Q over the time spent discharging (1/h), 0 if none.
        efc: equivalent full cycles in the chunk, integral of |I| dt / (2 Q).
        soc_occupancy: (n_packs, len(SOC_GRID)) fraction of the chunk spent near each SoC node;
            rows sum to 1. Laws average their SoC-dependent rates over it.
    """

    dt_days: FloatArray
    temp_k: FloatArray
    soc_mean: FloatArray
    dod: FloatArray
    c_rate_mean: FloatArray
    c_rate_charge_mean: FloatArray
    c_rate_discharge_mean: FloatArray
    efc: FloatArray
    soc_occupancy: FloatArray

    def __post_init__(self) -> None:
        n = np.asarray(self.dt_days).size
        for f in fields(self):
            if f.name == "soc_occupancy":
                continue
            arr = _pack_vector(f.name, getattr(self, f.name), n)
            if not np.all(np.isfinite(arr)):
                msg = f"Stressors.{f.name} has non-finite values"
                raise ValueError(msg)
            object.__setattr__(self, f.name, arr)
        # Frozen arrays are kept (dataclasses.replace on a chunk's stressors copied the
        # occupancy, packs x SoC grid, at every step of a placement).
        if not _frozen_as(self.soc_occupancy, (n, SOC_GRID.size)):
            occ = np.array(self.soc_occupancy, dtype=np.float64)
            if occ.shape != (n, SOC_GRID.size):
                msg = f"soc_occupancy must have shape ({n}, {SOC_GRID.size}), got {occ.shape}"
                raise ValueError(msg)
            object.__setattr__(self, "soc_occupancy", _readonly(occ))
        if np.any(self.dt_days < 0) or np.any(self.efc < 0) or np.any(self.temp_k <= 0):
            msg = "Stressors need dt_days >= 0, efc >= 0 and temp_k > 0"
            raise ValueError(msg)

    @property
    def n_packs(self) -> int:
        """Number of packs."""
        return int(self.dt_days.size)

    @classmethod
    def from_means(
        cls,
        *,
        dt_days: ArrayLike,
        temp_k: ArrayLike,
        soc_mean: ArrayLike,
        dod: ArrayLike = 0.0,
        c_rate_mean: ArrayLike = 0.0,
        c_rate_charge_mean: ArrayLike = 0.0,
        c_rate_discharge_mean: ArrayLike = 0.0,
        efc: ArrayLike = 0.0,
        n_packs: int | None = None,
    ) -> Stressors:
        """Build stressors from known per-chunk averages, assuming the SoC sat at ``soc_mean``.

        Scalars broadcast to ``n_packs`` (default: the length of the longest argument).

        Args:
            dt_days: chunk length (days).
            temp_k: mean temperature (K).
            soc_mean: mean SoC; the occupancy is concentrated there.
            dod: depth of discharge.
            c_rate_mean: mean |I|/Q over the chunk (1/h).
            c_rate_charge_mean: mean charge C-rate while charging (1/h).
            c_rate_discharge_mean: mean discharge C-rate while discharging (1/h).
            efc: equivalent full cycles in the chunk.
            n_packs: number of packs, if no argument has one value per pack.

        Returns:
            The stressors.

        Examples:
            >>> s = Stressors.from_means(dt_days=1.0, temp_k=[298.15, 308.15], soc_mean=0.5)
            >>> s.n_packs, float(s.soc_occupancy[0] @ SOC_GRID)
            (2, 0.5)
        """
        args = {
            "dt_days": dt_days,
            "temp_k": temp_k,
            "soc_mean": soc_mean,
            "dod": dod,
            "c_rate_mean": c_rate_mean,
            "c_rate_charge_mean": c_rate_charge_mean,
            "c_rate_discharge_mean": c_rate_discharge_mean,
            "efc": efc,
        }
        n = max(np.asarray(v).size for v in args.values()) if n_packs is None else n_packs
        vec = {k: _pack_vector(k, v, n) for k, v in args.items()}
        occ = _tent_weights(np.clip(vec["soc_mean"], 0.0, 1.0)[np.newaxis, :], np.ones((1, n)))
        return cls(**vec, soc_occupancy=occ)


def _as_steps_by_packs(name: str, value: ArrayLike) -> FloatArray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr[:, np.newaxis]
    if arr.ndim != 2:
        msg = f"{name} must be shaped (n_steps, n_packs) or (n_steps,), got {arr.shape}"
        raise ValueError(msg)
    return arr


def stressors_from_series(
    time_s: ArrayLike,
    soc: ArrayLike,
    current_a: ArrayLike,
    capacity_ah: ArrayLike,
    temp_c: ArrayLike,
) -> Stressors:
    """Extract one chunk's stressors for every pack from sampled series, vectorised over packs.

    Time-averages (``temp_k``, ``soc_mean``, ``soc_occupancy``) use the trapezoid rule on the
    samples, as BLAST-Lite does. The current is treated as held over each interval:
    ``current_a[i]`` is the mean current from ``time_s[i]`` to ``time_s[i+1]`` (so the last row's
    current is not used). To stream without losing an interval, start each chunk with the last
    row of the previous chunk. Then ``efc`` = integral |I| dt / (2 Q) equals sum |dSoC| / 2 when
    the SoC is coulomb-counted against ``capacity_ah``.

    Args:
        time_s: sample times (s), (n_steps,) shared by all packs or (n_steps, n_packs);
            non-decreasing.
        soc: SoC (fraction), (n_steps, n_packs), or (n_steps,) for one pack. Clipped to [0, 1].
        current_a: current (A), positive on discharge, same shape as ``soc`` (or broadcastable
            to it like ``temp_c``).
        capacity_ah: capacity that C-rates and EFC are normalised by (Ah), scalar or
            (n_packs,). BLAST-Lite's fits use the nominal capacity (see the module docstring).
        temp_c: cell temperature (degC): a scalar, (n_steps,) shared by all packs,
            (1, n_packs) constant per pack, or (n_steps, n_packs).

    Returns:
        The chunk's :class:`Stressors`, one entry per pack.

    Raises:
        ValueError: on mismatched shapes, non-finite values, decreasing time or capacity <= 0.

    Examples:
        One day at 15-min steps: charge 10 -> 90 % at 0.25C, rest, discharge back, rest.

        >>> t = np.arange(97) * 900.0
        >>> soc = np.interp(t / 3600, [0, 3.2, 12, 15.2, 24], [0.1, 0.9, 0.9, 0.1, 0.1])
        >>> i = np.append(-np.diff(soc) / (900 / 3600) * 50.0, 0.0)  # 50 Ah, + = discharge
        >>> s = stressors_from_series(t, soc, i, 50.0, 25.0)
        >>> round(float(s.efc[0]), 3), round(float(s.dod[0]), 3), round(float(s.c_rate_charge_mean[0]), 3)
        (0.8, 0.8, 0.246)
    """
    soc2 = np.clip(_as_steps_by_packs("soc", soc), 0.0, 1.0)
    n_steps, n_packs = soc2.shape
    if n_steps < 1:
        msg = "need at least one sample"
        raise ValueError(msg)
    shape = (n_steps, n_packs)
    try:
        t = np.broadcast_to(_as_steps_by_packs("time_s", time_s), shape)
        cur = np.broadcast_to(_as_steps_by_packs("current_a", current_a), shape)
        temp = np.broadcast_to(_as_steps_by_packs("temp_c", temp_c), shape)
    except ValueError as exc:
        msg = f"time_s, current_a and temp_c must broadcast to soc's shape {shape}"
        raise ValueError(msg) from exc
    cap = np.asarray(_pack_vector("capacity_ah", capacity_ah, n_packs))
    for name, arr in (("time_s", t), ("soc", soc2), ("current_a", cur), ("temp_c", temp), ("capacity_ah", cap)):
        if not np.all(np.isfinite(arr)):
            msg = f"{name} has non-finite values; drop or fill gaps before extracting stressors"
            raise ValueError(msg)
    if np.any(cap <= 0):
        msg = "capacity_ah must be > 0"
        raise ValueError(msg)
    dt = np.diff(t, axis=0)
    if np.any(dt < 0):
        msg = "time_s must be non-decreasing"
        raise ValueError(msg)

    total_s = t[-1] - t[0]
    has_time = total_s > 0
    # Trapezoid weights per sample; a chunk of zero length weights its samples equally.
    w = np.zeros(shape)
    w[:-1] += 0.5 * dt
    w[1:] += 0.5 * dt
    w = np.where(has_time, w / np.where(has_time, total_s, 1.0), 1.0 / n_steps)

    c_rate = np.abs(cur[:-1]) / cap  # held over each interval, 1/h
    moving = c_rate >= REST_C_RATE
    charging = moving & (cur[:-1] < 0)
    discharging = moving & (cur[:-1] > 0)
    c_dt = c_rate * dt
    t_chg = np.sum(np.where(charging, dt, 0.0), axis=0)
    t_dis = np.sum(np.where(discharging, dt, 0.0), axis=0)

    return Stressors(
        dt_days=total_s / SECONDS_PER_DAY,
        temp_k=np.sum(w * temp, axis=0) + ZERO_CELSIUS_K,
        soc_mean=np.sum(w * soc2, axis=0),
        dod=np.max(soc2, axis=0) - np.min(soc2, axis=0),
        c_rate_mean=np.where(has_time, np.sum(np.where(moving, c_dt, 0.0), axis=0), 0.0)
        / np.where(has_time, total_s, 1.0),
        c_rate_charge_mean=np.sum(np.where(charging, c_dt, 0.0), axis=0) / np.where(t_chg > 0, t_chg, 1.0),
        c_rate_discharge_mean=np.sum(np.where(discharging, c_dt, 0.0), axis=0) / np.where(t_dis > 0, t_dis, 1.0),
        efc=np.sum(c_dt, axis=0) / (2.0 * SECONDS_PER_HOUR),
        soc_occupancy=_tent_weights(soc2, w),
    )


# --------------------------------------------------------------------------------------------------
# Validity
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidityFlags:
    """Per-pack booleans, True where a chunk's stressors are outside a law's tested range.

    Attributes:
        temperature: mean temperature outside the cycling range (chunks with cycling) or the
            calendar range (storage chunks).
        dod: a cycling chunk whose depth of discharge is outside the tested DoD range.
        c_rate: mean charge or discharge C-rate above the tested maximum.
    """

    temperature: BoolArray
    dod: BoolArray
    c_rate: BoolArray

    @property
    def any(self) -> BoolArray:
        """True where any stressor is out of range."""
        out: BoolArray = self.temperature | self.dod | self.c_rate
        return out


@dataclass(frozen=True)
class Validity:
    """The range of conditions a law was fitted on (BLAST-Lite ``experimental_range``).

    Out-of-range input is a flag for the caller (an alert, a wider uncertainty band), never an
    exception: the law still returns its extrapolation.

    Attributes:
        cycling_temp_c: cell temperatures of the cycling tests (degC).
        calendar_temp_c: cell temperatures of the storage tests (degC), where the source states
            them; otherwise the cycling range.
        dod: depth-of-discharge range of the cycling tests.
        max_c_rate_charge: highest tested charge C-rate (1/h).
        max_c_rate_discharge: highest tested discharge C-rate (1/h).
    """

    cycling_temp_c: tuple[float, float]
    calendar_temp_c: tuple[float, float]
    dod: tuple[float, float]
    max_c_rate_charge: float
    max_c_rate_discharge: float

    def flags(self, stressors: Stressors) -> ValidityFlags:
        """Flag, per pack, the stressors outside this range.

        Args:
            stressors: one chunk's stressors.

        Returns:
            The per-pack flags.
        """
        temp_c = stressors.temp_k - ZERO_CELSIUS_K
        cycling = stressors.efc > 1e-9
        lo = np.where(cycling, self.cycling_temp_c[0], self.calendar_temp_c[0])
        hi = np.where(cycling, self.cycling_temp_c[1], self.calendar_temp_c[1])
        tol = 1e-9
        return ValidityFlags(
            temperature=(temp_c < lo - tol) | (temp_c > hi + tol),
            dod=cycling & ((stressors.dod < self.dod[0] - tol) | (stressors.dod > self.dod[1] + tol)),
            c_rate=(stressors.c_rate_charge_mean > self.max_c_rate_charge + tol)
            | (stressors.c_rate_discharge_mean > self.max_c_rate_discharge + tol),
        )


# --------------------------------------------------------------------------------------------------
# Incremental state updates (BLAST-Lite degradation_model.py), vectorised
# --------------------------------------------------------------------------------------------------


def _broadcast(*arrays: ArrayLike) -> list[FloatArray]:
    as_float = [np.asarray(a, dtype=np.float64) for a in arrays]
    return [np.asarray(a, dtype=np.float64) for a in np.broadcast_arrays(*as_float)]


def power_law_increment(y0: ArrayLike, dx: ArrayLike, k: ArrayLike, p: ArrayLike) -> FloatArray:
    """Return the increment of a power-law state ``y = k*x**p`` over ``dx``, as BLAST-Lite does.

    From BLAST-Lite ``BatteryDegradationModel._update_power_state``: while the state is still zero
    the first step is exact, ``y = k*dx**p``; after that the rate is evaluated at the present state,
    ``dy = k*p*(y/k)**((p-1)/p)*dx``, so ``k`` may change from chunk to chunk. Where ``dx <= 0`` or
    ``k <= 0`` the increment is 0 (BLAST-Lite would return a negative or NaN increment for
    ``k < 0``; a negative fitted rate means the fit is extrapolating).

    Args:
        y0: present state (>= 0).
        dx: advance of the independent variable (days or EFC, in the law's scaling).
        k: rate coefficient from this chunk's stressors.
        p: exponent (> 0).

    Returns:
        The increment dy, broadcast shape of the inputs.

    Examples:
        >>> y = power_law_increment(0.0, 1.0, 0.01, 0.5)
        >>> y = y + power_law_increment(y, 3.0, 0.01, 0.5)  # Euler step from x = 1 to 4
        >>> round(float(y), 4), 0.01 * 4**0.5
        (0.025, 0.02)
    """
    y, x, kk, pp = _broadcast(y0, dx, k, p)
    active = (x > 0) & (kk > 0) & (pp > 0)
    first = active & (y <= 0)
    later = active & (y > 0)
    k_safe = np.where(active, kk, 1.0)
    p_safe = np.where(active, pp, 1.0)
    x_safe = np.where(active, x, 0.0)
    ratio = np.where(later, y, 1.0) / k_safe
    dy_first = k_safe * x_safe**p_safe
    dy_later = k_safe * p_safe * ratio ** ((p_safe - 1.0) / p_safe) * x_safe
    out: FloatArray = np.where(first, dy_first, np.where(later, dy_later, 0.0))
    return out


def power_b_increment(y0: ArrayLike, dx: ArrayLike, k: ArrayLike, p: ArrayLike) -> FloatArray:
    """Return the increment of a state ``y = (k*x)**p``, as BLAST-Lite ``_update_power_B_state``.

    First step ``y = (k*dx)**p``; afterwards ``z = y**(1/p)/k`` and ``dy = p*(k*z)**p/z*dx``.
    Zero where ``dx <= 0`` or ``k <= 0``.

    Args:
        y0: present state (>= 0).
        dx: advance of the independent variable.
        k: rate coefficient.
        p: exponent (> 0).

    Returns:
        The increment dy.
    """
    y, x, kk, pp = _broadcast(y0, dx, k, p)
    active = (x > 0) & (kk > 0) & (pp > 0)
    first = active & (y <= 0)
    later = active & (y > 0)
    k_safe = np.where(active, kk, 1.0)
    p_safe = np.where(active, pp, 1.0)
    x_safe = np.where(active, x, 0.0)
    z = np.where(later, y, 1.0) ** (1.0 / p_safe) / k_safe
    dy_first = (k_safe * x_safe) ** p_safe
    dy_later = p_safe * (k_safe * z) ** p_safe / z * x_safe
    out: FloatArray = np.where(first, dy_first, np.where(later, dy_later, 0.0))
    return out


def sigmoid_increment(y0: ArrayLike, dx: ArrayLike, y_inf: ArrayLike, k: ArrayLike, p: ArrayLike) -> FloatArray:
    """Return the increment of a sigmoid state, as BLAST-Lite ``_update_sigmoid_state``.

    Trajectory ``y = 2*y_inf*(1/2 - 1/(1 + exp((k*x)**p)))``. While the state is zero the first step
    is exact; afterwards the equivalent ``x`` of the present state is inverted and the slope there
    is applied to ``dx``. Written with ``tanh`` and ``exp(-z)`` so large arguments cannot overflow.
    Zero where ``dx <= 0``, ``k <= 0``, ``y_inf <= 0`` or the state has reached ``y_inf``.

    Args:
        y0: present state (>= 0).
        dx: advance of the independent variable.
        y_inf: limit of the sigmoid.
        k: 1 / (x at the half maximum).
        p: steepness at the half maximum.

    Returns:
        The increment dy.
    """
    y, x, yi, kk, pp = _broadcast(y0, dx, y_inf, k, p)
    active = (x > 0) & (kk > 0) & (yi > 0) & (pp > 0)
    first = active & (y <= 0)
    later = active & (y > 0) & (y < yi)
    k_safe = np.where(active, kk, 1.0)
    p_safe = np.where(active, pp, 1.0)
    yi_safe = np.where(active, yi, 1.0)
    x_safe = np.where(active, x, 0.0)
    # 1/2 - 1/(1 + e^a) = tanh(a/2)/2
    dy_first = yi_safe * np.tanh(0.5 * (k_safe * x_safe) ** p_safe)
    y_l = np.where(later, y, 0.5 * yi_safe)
    log_arg = 2.0 * yi_safe / (yi_safe - y_l) - 1.0  # > 1 for 0 < y < y_inf
    x_inv = np.log(log_arg) ** (1.0 / p_safe) / k_safe
    z = (k_safe * x_inv) ** p_safe
    ez = np.exp(-z)
    # e^z/(e^z + 1)^2 = e^-z/(1 + e^-z)^2
    dydx = 2.0 * yi_safe * p_safe * z * ez / (x_inv * (1.0 + ez) ** 2)
    out: FloatArray = np.where(first, dy_first, np.where(later, dydx * x_safe, 0.0))
    return out


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgingState:
    """Per-pack degradation state after some history; every field is a read-only (n_packs,) array.

    ``q`` and ``r_growth`` are the outputs, kept in step with the internal states by the law that
    produced the state. Loss components are fractions of the model's start-of-life capacity.

    Attributes:
        t_days: age since the model's start (days).
        efc: cumulative equivalent full cycles.
        q_cal_loss: time-driven (calendar) capacity loss; LLI for the models that name it.
        q_cyc_loss: throughput-driven (cycling) capacity loss.
        q_lam_loss: loss of active material (Kokam sigmoid; zero for the other laws).
        q_breakin_loss: break-in loss (Sony/Murata at > 3 EFC/day; zero for the other laws).
        r_cal_gain: time-driven relative resistance gain.
        r_cyc_gain: throughput-driven relative resistance gain.
        knee_onset_efc: EFC at which the knee starts; ``inf`` means no knee for that pack.
        knee_x_efc: scalar-weighted EFC accumulated since the knee onset (the knee's own clock).
        q_knee_loss: extra capacity loss after the knee.
        r_knee_gain: extra relative resistance after the knee.
        q: relative capacity by the model's output rule, relative to the model's own start; not
            clipped, so a law driven far past end of life can report q < 0.
        r_growth: relative resistance R/R_new (1.0 = new).
    """

    t_days: FloatArray
    efc: FloatArray
    q_cal_loss: FloatArray
    q_cyc_loss: FloatArray
    q_lam_loss: FloatArray
    q_breakin_loss: FloatArray
    r_cal_gain: FloatArray
    r_cyc_gain: FloatArray
    knee_onset_efc: FloatArray
    knee_x_efc: FloatArray
    q_knee_loss: FloatArray
    r_knee_gain: FloatArray
    q: FloatArray
    r_growth: FloatArray

    def __post_init__(self) -> None:
        n = np.asarray(self.t_days).size
        for f in fields(self):
            object.__setattr__(self, f.name, _pack_vector(f.name, getattr(self, f.name), n))

    @property
    def n_packs(self) -> int:
        """Number of packs."""
        return int(self.t_days.size)

    def with_knee_onset(self, knee_onset_efc: ArrayLike) -> AgingState:
        """Return this state with a new per-pack knee onset (EFC; ``inf`` switches the knee off).

        An onset already in the past starts the knee at the next step; knee fade already
        accumulated is kept.

        Args:
            knee_onset_efc: onset per pack, or one value for all.

        Returns:
            The new state.
        """
        onset = _pack_vector("knee_onset_efc", knee_onset_efc, self.n_packs)
        return _replace(self, knee_onset_efc=onset)


def _replace(state: AgingState, **changes: FloatArray) -> AgingState:
    values = {f.name: getattr(state, f.name) for f in fields(state)}
    values.update(changes)
    return AgingState(**values)


# --------------------------------------------------------------------------------------------------
# Knee
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KneeModel:
    """Accelerated fade after a knee: extra loss growing as a power (default: square) of EFC.

    After a pack's onset (``AgingState.knee_onset_efc``) its knee clock ``x`` advances by
    ``scalar * dEFC``, and the extra loss is ``q_knee = fade_at_ref * (x/ref_efc)**exponent``,
    with resistance ``r_knee = r_per_fade * q_knee``. Because the state keeps ``x`` (not only the
    loss) the update is exact, so it does not depend on the chunking. Before the onset nothing
    changes; calendar time alone never advances a knee.

    The onset location follows Attia et al., J. Electrochem. Soc. 169 060517 (2022), whose tables
    (repo valentinsulzer/kneepoint-review) give a median knee/EOL ratio of 0.86 over 17 sources and
    303 cells, and 0.77 (Bacon-Watts) for the Severson LFP cells. The default post-knee shape
    (10 % extra loss 400 EFC after onset, quadratic) is a placeholder to calibrate per fleet, not a
    published value; with it a pack at 90 % loses its remaining life in about a sixth of its cycle
    life, in line with the 15-25 % quoted in BATTERY_NOTES.md section 3. ``r_per_fade`` defaults
    to :data:`EMPIRICAL_R_PER_FADE`.

    Attributes:
        onset_fraction_of_life: knee EFC / end-of-life EFC used by :meth:`onset_efc`.
        fade_at_ref: extra capacity loss reached ``ref_efc`` EFC after the onset.
        ref_efc: EFC after the onset at which ``fade_at_ref`` is reached.
        exponent: growth exponent (> 1 makes the fade accelerate).
        r_per_fade: relative resistance gained per unit of knee fade.

    Examples:
        >>> knee = KneeModel()
        >>> knee.onset_efc([1000.0, 3000.0]).tolist()
        [860.0, 2580.0]
        >>> round(float(knee.loss(np.array(200.0))), 4)
        0.025
    """

    onset_fraction_of_life: float = ATTIA_MEDIAN_KNEE_TO_EOL
    fade_at_ref: float = 0.10
    ref_efc: float = 400.0
    exponent: float = 2.0
    r_per_fade: float = EMPIRICAL_R_PER_FADE

    def __post_init__(self) -> None:
        if not 0.0 < self.onset_fraction_of_life <= 1.0:
            msg = "onset_fraction_of_life must be in (0, 1]"
            raise ValueError(msg)
        if self.fade_at_ref < 0 or self.ref_efc <= 0 or self.exponent < 1 or self.r_per_fade < 0:
            msg = "KneeModel needs fade_at_ref >= 0, ref_efc > 0, exponent >= 1, r_per_fade >= 0"
            raise ValueError(msg)

    def onset_efc(self, eol_efc: ArrayLike) -> FloatArray:
        """Return the knee onset for packs whose end of life (counted from BOL) is ``eol_efc``.

        Args:
            eol_efc: expected EFC at end of life per pack, e.g. from running the law forward
                under the planned duty.

        Returns:
            ``onset_fraction_of_life * eol_efc``.
        """
        out: FloatArray = self.onset_fraction_of_life * np.asarray(eol_efc, dtype=np.float64)
        return out

    def loss(self, x_efc: FloatArray) -> FloatArray:
        """Return the knee's extra capacity loss after ``x_efc`` (scalar-weighted) EFC past onset.

        Args:
            x_efc: the knee clock.

        Returns:
            Extra capacity loss (fraction).
        """
        out: FloatArray = self.fade_at_ref * (np.maximum(x_efc, 0.0) / self.ref_efc) ** self.exponent
        return out


# --------------------------------------------------------------------------------------------------
# Laws
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class AgingLaw(Protocol):
    """What every aging law offers. Laws are frozen dataclasses of parameters; ``step`` is pure."""

    @property
    def name(self) -> str:
        """Registry name."""
        ...

    @property
    def provenance(self) -> str:
        """Citation and BLAST-Lite source file."""
        ...

    @property
    def validity(self) -> Validity:
        """Tested range of conditions."""
        ...

    def initial_state(self, n_packs: int, *, knee_onset_efc: ArrayLike | None = None) -> AgingState:
        """Return the start-of-life state of ``n_packs`` packs."""
        ...

    def step(
        self,
        state: AgingState,
        stressors: Stressors,
        *,
        scalar: ArrayLike = 1.0,
        knee: KneeModel | None = None,
    ) -> AgingState:
        """Advance every pack by one chunk."""
        ...


class _Components(NamedTuple):
    q_cal_loss: FloatArray
    q_cyc_loss: FloatArray
    q_lam_loss: FloatArray
    q_breakin_loss: FloatArray
    r_cal_gain: FloatArray
    r_cyc_gain: FloatArray


def _temp_column(temp: FloatArray) -> tuple[FloatArray, IntArray | None]:
    """Temperatures as a column for a rate on the SoC grid, each distinct one once, and where each pack's is.

    A rate on (packs x SoC grid) costs an exp per node and pack. The health tracker's
    placement holds every pack at one temperature in its first-life chunks, and its forecast
    runs a pack's rate quantiles (about sixteen rows) at the pack's one duty temperature: the
    grid is then evaluated once per distinct temperature (the same values, at a fraction of the
    cost). Returns the column and the row of it each pack reads (None: one row for all, or
    one row each in order).
    """
    if temp.size > 1 and bool(np.all(temp == temp[0])):
        return temp[:1, np.newaxis], None
    if temp.size > 8:
        uniq, at = np.unique(temp, return_inverse=True)
        if 2 * uniq.size <= temp.size:
            return uniq[:, np.newaxis], at
    return temp[:, np.newaxis], None


def _occupancy_mean(stressors: Stressors, rate_on_grid: FloatArray, at: IntArray | None = None) -> FloatArray:
    """Time-average a rate given on (n_packs or 1, SOC_GRID) nodes with the chunk's SoC occupancy.

    ``at``: the row of ``rate_on_grid`` each pack reads (:func:`_temp_column`), if not its own.
    """
    rate = rate_on_grid if at is None else rate_on_grid[at]
    out: FloatArray = np.sum(stressors.soc_occupancy * rate, axis=1)
    return out


def _arrhenius(temp_k: FloatArray, ea_j_per_mol: float, tref_k: float = 298.15) -> FloatArray:
    out: FloatArray = np.exp(-(ea_j_per_mol / R_GAS_J_PER_MOL_K) * (1.0 / temp_k - 1.0 / tref_k))
    return out


class _BlastLaw:
    """Shared step machinery; subclasses provide ``_advance`` and the output rule."""

    _initial_lam: ClassVar[float] = 0.0
    _initial_breakin: ClassVar[float] = 0.0

    def initial_state(self, n_packs: int, *, knee_onset_efc: ArrayLike | None = None) -> AgingState:
        """Return the start-of-life state of ``n_packs`` packs.

        Args:
            n_packs: number of packs.
            knee_onset_efc: optional per-pack knee onset (EFC); ``inf`` or None means no knee.

        Returns:
            A state with zero age and ``q`` = 1, ``r_growth`` = 1 (up to BLAST-Lite's tiny seeds of
            the sigmoid states).
        """
        if n_packs < 0:
            msg = "n_packs must be >= 0"
            raise ValueError(msg)
        zeros = np.zeros(n_packs)
        comps = _Components(
            zeros, zeros, np.full(n_packs, self._initial_lam), np.full(n_packs, self._initial_breakin), zeros, zeros
        )
        q, r = self._outputs(comps)
        onset = np.inf if knee_onset_efc is None else knee_onset_efc
        return AgingState(
            t_days=zeros,
            efc=zeros,
            q_cal_loss=comps.q_cal_loss,
            q_cyc_loss=comps.q_cyc_loss,
            q_lam_loss=comps.q_lam_loss,
            q_breakin_loss=comps.q_breakin_loss,
            r_cal_gain=comps.r_cal_gain,
            r_cyc_gain=comps.r_cyc_gain,
            knee_onset_efc=_pack_vector("knee_onset_efc", onset, n_packs),
            knee_x_efc=zeros,
            q_knee_loss=zeros,
            r_knee_gain=zeros,
            q=q,
            r_growth=r,
        )

    def step(
        self,
        state: AgingState,
        stressors: Stressors,
        *,
        scalar: ArrayLike = 1.0,
        knee: KneeModel | None = None,
    ) -> AgingState:
        """Advance every pack by one chunk of stressors; pure, returns a new state.

        Rates are evaluated from this chunk's stressors, then each state advances with BLAST-Lite's
        incremental rules (power law, power-B, sigmoid) and every increment is multiplied by the
        pack's ``scalar``. With a ``knee``, packs whose EFC passes their ``knee_onset_efc`` also
        accumulate knee fade (see :class:`KneeModel`); without one, knee terms stay as they are.

        Args:
            state: the state before the chunk.
            stressors: the chunk's stressors, one entry per pack of ``state``.
            scalar: per-pack degradation-rate multiplier (BLAST ``degradation_scalar``), >= 0.
            knee: optional knee model applied to packs with a finite onset.

        Returns:
            The state after the chunk.

        Raises:
            ValueError: if the pack counts differ or a scalar is negative or not finite.
        """
        n = state.n_packs
        if stressors.n_packs != n:
            msg = f"stressors have {stressors.n_packs} packs, the state has {n}"
            raise ValueError(msg)
        s = np.asarray(_pack_vector("scalar", scalar, n))
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            msg = "scalar must be finite and >= 0"
            raise ValueError(msg)
        comps = self._advance(state, stressors, s)
        q_law, r_law = self._outputs(comps)

        efc_new = state.efc + stressors.efc
        knee_x, q_knee, r_knee = state.knee_x_efc, state.q_knee_loss, state.r_knee_gain
        if knee is not None:
            onset = state.knee_onset_efc
            past = np.maximum(0.0, efc_new - np.maximum(state.efc, onset))
            past = np.where(np.isfinite(onset), past, 0.0)
            knee_x = knee_x + s * past
            q_knee = np.where(knee_x > 0, knee.loss(knee_x), state.q_knee_loss)
            r_knee = state.r_knee_gain + knee.r_per_fade * (q_knee - state.q_knee_loss)

        return AgingState(
            t_days=state.t_days + stressors.dt_days,
            efc=efc_new,
            q_cal_loss=comps.q_cal_loss,
            q_cyc_loss=comps.q_cyc_loss,
            q_lam_loss=comps.q_lam_loss,
            q_breakin_loss=comps.q_breakin_loss,
            r_cal_gain=comps.r_cal_gain,
            r_cyc_gain=comps.r_cyc_gain,
            knee_onset_efc=state.knee_onset_efc,
            knee_x_efc=knee_x,
            q_knee_loss=q_knee,
            r_knee_gain=r_knee,
            q=q_law - q_knee,
            r_growth=r_law + r_knee,
        )

    def _advance(self, state: AgingState, stressors: Stressors, scalar: FloatArray) -> _Components:
        raise NotImplementedError

    def _outputs(self, c: _Components) -> tuple[FloatArray, FloatArray]:
        """Default output rule: capacity losses add up, and so do the resistance gains."""
        q: FloatArray = 1.0 - c.q_cal_loss - c.q_cyc_loss - c.q_lam_loss - c.q_breakin_loss
        r: FloatArray = 1.0 + c.r_cal_gain + c.r_cyc_gain
        return q, r


def _empirical_r(q_cal_loss: FloatArray, q_cyc_loss: FloatArray) -> tuple[FloatArray, FloatArray]:
    r_cal: FloatArray = EMPIRICAL_R_PER_FADE * q_cal_loss
    r_cyc: FloatArray = EMPIRICAL_R_PER_FADE * q_cyc_loss
    return r_cal, r_cyc


@dataclass(frozen=True)
class Nmc811GrSiLgm50(_BlastLaw):
    """NMC811 | graphite-SiOx, LG M50 21700 5 Ah: power laws in time and EFC.

    Fit by P. Gasper (NREL) to the aging data of Truong Bui et al., IEEE (2021),
    https://ieeexplore.ieee.org/document/9617644 (cell chemistry: O'Regan et al. 2022).
    BLAST-Lite ``blast/models/nmc811_grSi_LGM50_5Ah_2021.py`` (``Nmc811_GrSi_LGM50_5Ah_Battery``).

    - ``k_cal = b0 + b1*exp(TN**3/UaN**(1/3)) + b2*TN**3/UaN**0.5 + b3*exp(soc**0.5/TN**2)
      + b4*exp(soc**3)``, time-averaged over the chunk's SoC occupancy;
      ``q_cal = k_cal*(t_days/1e4)**p_cal``.
    - ``k_cyc = c0*exp(c1*Cdis**3)*exp(c2*TN**3*Cdis**0.5)``; ``q_cyc = k_cyc*(EFC/1e4)**p_cyc``.

    with ``TN = T/308.15``, ``UaN = Ua/0.123`` and ``Cdis`` the mean discharge C-rate.
    Not sensitive to charge rate or DoD (all tests were at 100 % DoD).

    Resistance: the source has no resistance law, so ``r_growth = 1 + EMPIRICAL_R_PER_FADE * fade``,
    an empirical link (about +30 % at 20 % fade, BATTERY_NOTES.md section 3).
    """

    name: str = "nmc811_grsi_lgm50"
    provenance: str = (
        "Truong Bui et al. 2021 (IEEE 9617644) data, fit by NREL; BLAST-Lite blast/models/nmc811_grSi_LGM50_5Ah_2021.py"
    )
    validity: Validity = Validity(
        cycling_temp_c=(0.0, 25.0),
        calendar_temp_c=(0.0, 60.0),
        dod=(1.0, 1.0),
        max_c_rate_charge=0.3,
        max_c_rate_discharge=2.0,
    )
    nominal_capacity_ah: float = 5.0
    p_cal: float = 0.651697743905278
    q1_b0: float = -2.39156628786525
    q1_b1: float = 2.44205317834185
    q1_b2: float = -4.45998246136905
    q1_b3: float = 0.448140062203916
    q1_b4: float = -0.185337797906876
    p_cyc: float = 0.441996792536332
    q3_b0: float = 0.181235015387132
    q3_b1: float = -0.123779206033993
    q3_b2: float = 1.24459541295018

    def _advance(self, state: AgingState, stressors: Stressors, scalar: FloatArray) -> _Components:
        tn, at = _temp_column(stressors.temp_k / _TREF_NORM_K)
        uan = _UA_GRID / _UA_NORM_V
        k_cal_grid = (
            self.q1_b0
            + self.q1_b1 * np.exp(tn**3 / uan ** (1.0 / 3.0))
            + self.q1_b2 * tn**3 / uan**0.5
            + self.q1_b3 * np.exp(SOC_GRID**0.5 / tn**2)
            + self.q1_b4 * np.exp(SOC_GRID**3)
        )
        k_cal = _occupancy_mean(stressors, k_cal_grid, at)
        cdis = stressors.c_rate_discharge_mean
        tn1 = stressors.temp_k / _TREF_NORM_K
        k_cyc = self.q3_b0 * np.exp(self.q3_b1 * cdis**3) * np.exp(self.q3_b2 * tn1**3 * cdis**0.5)
        q_cal = state.q_cal_loss + scalar * power_law_increment(
            state.q_cal_loss, stressors.dt_days / 1e4, k_cal, self.p_cal
        )
        q_cyc = state.q_cyc_loss + scalar * power_law_increment(
            state.q_cyc_loss, stressors.efc / 1e4, k_cyc, self.p_cyc
        )
        return _Components(q_cal, q_cyc, state.q_lam_loss, state.q_breakin_loss, *_empirical_r(q_cal, q_cyc))


@dataclass(frozen=True)
class Nmc622GrDenso50Ah(_BlastLaw):
    """NMC622 | graphite DENSO 50 Ah EV cell: square-root laws in time and EFC.

    Smith et al., J. Electrochem. Soc. 168 100530 (2021), doi:10.1149/1945-7111/ac2ebd, as coded in
    BLAST-Lite ``blast/models/nmc622_gr_DENSO50Ah_2021.py`` (``Nmc622_Gr_DENSO50Ah_Battery``):

    - ``A(Ea) = exp(-(Ea/8.3144)*(1/T - 1/298.15))``, ``s`` = mean SoC;
    - ``b1t = A(37 kJ/mol)*(-1.97e-4 + 0.0101*s - 0.0157*s**2 + 0.00835*s**3 - 4.06e-6*s*T
      + 3.32e-5*max(0, T - 328.15))``;
    - ``b1N = max(0, 3.24*A(-58 kJ/mol)*sqrt(DoD*C_chg)*(1 + 2.1*s) - 0.099)
      + 1.44*A(-13 kJ/mol)*DoD**6``;
    - ``q_cal = b1t*sqrt(t_days)``, ``q_cyc = b1t*b1N*0.985*sqrt(EFC)``.

    BLAST-Lite evaluates this law at the chunk's mean SoC and temperature (no time-averaging of
    the rate), and so does this class. Break-in terms are disabled in BLAST-Lite and here.

    Resistance: the source has no resistance law, so ``r_growth = 1 + EMPIRICAL_R_PER_FADE * fade``,
    an empirical link (about +30 % at 20 % fade, BATTERY_NOTES.md section 3).
    """

    name: str = "nmc622_gr_denso50ah"
    provenance: str = (
        "Smith et al., J. Electrochem. Soc. 168 100530 (2021), doi:10.1149/1945-7111/ac2ebd; "
        "BLAST-Lite blast/models/nmc622_gr_DENSO50Ah_2021.py"
    )
    validity: Validity = Validity(
        cycling_temp_c=(10.0, 60.0),
        calendar_temp_c=(10.0, 60.0),
        dod=(0.1, 1.0),
        max_c_rate_charge=1.0,
        max_c_rate_discharge=1.0,
    )
    nominal_capacity_ah: float = 50.0
    b1t_ea: float = 37000.0
    b1t_0: float = -0.000197
    b1t_1: float = 0.0101
    b1t_2: float = -0.0157
    b1t_3: float = 0.00835
    b1t_4: float = -4.06e-6
    b1t_5: float = 3.32e-5
    b1n_ea_1: float = -58000.0
    b1n_0: float = 3.24
    b1n_1: float = 2.1
    b1n_2: float = -0.099
    b1n_3: float = 1.44
    b1n_ea_2: float = -13000.0
    b1n_4: float = 0.985

    def _advance(self, state: AgingState, stressors: Stressors, scalar: FloatArray) -> _Components:
        t = stressors.temp_k
        s = stressors.soc_mean
        dod = stressors.dod
        b1t = _arrhenius(t, self.b1t_ea) * (
            self.b1t_0
            + self.b1t_1 * s
            + self.b1t_2 * s**2
            + self.b1t_3 * s**3
            + self.b1t_4 * s * t
            + self.b1t_5 * np.maximum(0.0, t - 328.15)
        )
        stress = np.sqrt(dod * stressors.c_rate_charge_mean)
        b1n = (
            np.maximum(0.0, self.b1n_0 * _arrhenius(t, self.b1n_ea_1) * stress * (1.0 + self.b1n_1 * s) + self.b1n_2)
            + self.b1n_3 * _arrhenius(t, self.b1n_ea_2) * dod**6
        )
        q_cal = state.q_cal_loss + scalar * power_law_increment(state.q_cal_loss, stressors.dt_days, b1t, 0.5)
        q_cyc = state.q_cyc_loss + scalar * power_law_increment(
            state.q_cyc_loss, stressors.efc, b1t * b1n * self.b1n_4, 0.5
        )
        return _Components(q_cal, q_cyc, state.q_lam_loss, state.q_breakin_loss, *_empirical_r(q_cal, q_cyc))


@dataclass(frozen=True)
class NmcGr50AhB1(_BlastLaw):
    """Large-format NMC | graphite pouch "NMC-Gr B1", about 50 Ah, E/P = 16 1/h.

    Data reported in doi:10.1016/j.est.2023.109042 (fit by NREL). BLAST-Lite
    ``blast/models/nmc_gr_50Ah_B1_2020.py`` (``NMC_Gr_50Ah_B1``):

    - ``kcal = 36.2*exp(-4.4*UaN**(1/3)/TN**3)`` (time-averaged over SoC occupancy);
      ``q_cal = kcal*(t_days/1e4)**0.708``;
    - ``kcyc = |0.844*(DoD**2*TN**3*Crate**0.5)**0.458|``; ``q_cyc = kcyc*(EFC/1e5)**0.467``.

    ``TN = T/(273.15 + 35)`` as at BLAST-Lite HEAD; the PyPI 1.1.0 release had ``T/(293.15 + 35)``,
    which does not reproduce the BATTERY_NOTES.md scenario table. ``Crate`` is the chunk's mean
    |I|/Q, rest included.

    Resistance: the source has no resistance law, so ``r_growth = 1 + EMPIRICAL_R_PER_FADE * fade``,
    an empirical link (about +30 % at 20 % fade, BATTERY_NOTES.md section 3).
    """

    name: str = "nmc_gr_50ah_b1"
    provenance: str = (
        "data in doi:10.1016/j.est.2023.109042 (cell 'NMC-Gr B1'); BLAST-Lite blast/models/nmc_gr_50Ah_B1_2020.py"
    )
    validity: Validity = Validity(
        cycling_temp_c=(10.0, 45.0),
        calendar_temp_c=(10.0, 45.0),
        dod=(0.8, 1.0),
        max_c_rate_charge=1.75,
        max_c_rate_discharge=1.75,
    )
    nominal_capacity_ah: float = 50.0
    p1: float = 36.2
    p2: float = -4.4
    pcal: float = 0.708
    p3: float = 0.844
    p4: float = 0.458
    pcyc: float = 0.467

    def _advance(self, state: AgingState, stressors: Stressors, scalar: FloatArray) -> _Components:
        tn = stressors.temp_k / _TREF_NORM_K
        uan = _UA_GRID / _UA_NORM_V
        tn2, at = _temp_column(tn)
        kcal = _occupancy_mean(stressors, self.p1 * np.exp(self.p2 * uan ** (1.0 / 3.0) / (tn2**3)), at)
        kcyc = np.abs(self.p3 * (stressors.dod**2 * tn**3 * stressors.c_rate_mean**0.5) ** self.p4)
        q_cal = state.q_cal_loss + scalar * power_law_increment(
            state.q_cal_loss, stressors.dt_days / 1e4, kcal, self.pcal
        )
        q_cyc = state.q_cyc_loss + scalar * power_law_increment(state.q_cyc_loss, stressors.efc / 1e5, kcyc, self.pcyc)
        return _Components(q_cal, q_cyc, state.q_lam_loss, state.q_breakin_loss, *_empirical_r(q_cal, q_cyc))


@dataclass(frozen=True)
class LfpGr250AhPrismatic(_BlastLaw):
    """Large-format LFP | graphite prismatic, > 250 Ah, E/P = 6 1/h.

    Data reported in doi:10.1016/j.est.2023.109042 (fit by NREL). BLAST-Lite
    ``blast/models/lfp_gr_250AhPrismatic_2019.py`` (``Lfp_Gr_250AhPrismatic``):

    - ``kcal = 8.37e4*exp(-5.21e3/T)*exp(-3.56e3*Ua/T)`` (time-averaged over SoC occupancy);
      ``q_cal = kcal*t_days**0.526``;
    - ``kcyc = (4.38e-8 + 1.55e-8*DoD + 1.68e-7*Crate)*(exp(2.19e3/T) + exp(-1.55e5/T))``;
      ``q_cyc = kcyc*EFC**0.828``.

    The cycling fit balances the calendar law's temperature dependence inside 10-45 degC and
    extrapolates poorly outside it; charge was limited to 0.65C.

    Resistance: the source has no resistance law, so ``r_growth = 1 + EMPIRICAL_R_PER_FADE * fade``,
    an empirical link (about +30 % at 20 % fade, BATTERY_NOTES.md section 3).
    """

    name: str = "lfp_gr_250ah_prismatic"
    provenance: str = (
        "data in doi:10.1016/j.est.2023.109042 (cell 'LFP-Gr 250Ah'); "
        "BLAST-Lite blast/models/lfp_gr_250AhPrismatic_2019.py"
    )
    validity: Validity = Validity(
        cycling_temp_c=(10.0, 45.0),
        calendar_temp_c=(10.0, 45.0),
        dod=(0.8, 1.0),
        max_c_rate_charge=0.65,
        max_c_rate_discharge=1.0,
    )
    nominal_capacity_ah: float = 250.0
    p1: float = 8.37e4
    p2: float = -5.21e3
    p3: float = -3.56e3
    pcal: float = 0.526
    p4: float = 4.38e-8
    p5: float = 1.55e-8
    p6: float = 1.68e-7
    p7: float = 2.19e3
    p8: float = 1.55e5
    pcyc: float = 0.828

    def _advance(self, state: AgingState, stressors: Stressors, scalar: FloatArray) -> _Components:
        t = stressors.temp_k
        t2, at = _temp_column(t)
        kcal = _occupancy_mean(stressors, abs(self.p1) * np.exp(self.p2 / t2) * np.exp(self.p3 * _UA_GRID / t2), at)
        kcyc = (self.p4 + self.p5 * stressors.dod + self.p6 * stressors.c_rate_mean) * (
            np.exp(self.p7 / t) + np.exp(-self.p8 / t)
        )
        q_cal = state.q_cal_loss + scalar * power_law_increment(state.q_cal_loss, stressors.dt_days, kcal, self.pcal)
        q_cyc = state.q_cyc_loss + scalar * power_law_increment(state.q_cyc_loss, stressors.efc, kcyc, self.pcyc)
        return _Components(q_cal, q_cyc, state.q_lam_loss, state.q_breakin_loss, *_empirical_r(q_cal, q_cyc))


def _erf(x: FloatArray) -> FloatArray:
    """Vectorised erf, Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    out: FloatArray = sign * (1.0 - poly * np.exp(-a * a))
    return out


def _skewnorm_pdf(x: FloatArray, skew: float, width: float) -> FloatArray:
    """2*phi(x')*Phi(skew*x') with x' = (x - 0.5)/width, as BLAST-Lite's ``_skewnormpdf``."""
    xp = (x - 0.5) / width
    phi = np.exp(-0.5 * xp * xp) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + _erf(skew * xp / math.sqrt(2.0)))
    out: FloatArray = 2.0 * phi * cdf
    return out


@dataclass(frozen=True)
class LfpGrSonyMurata3Ah(_BlastLaw):
    """LFP | graphite Sony/Murata US26650 3 Ah (TUM data, Naumann et al.), with resistance laws.

    Calendar data: Naumann et al., doi:10.1016/j.est.2018.01.019; cycle data: Naumann et al.,
    doi:10.1016/j.jpowsour.2019.227666; capacity model identification at NREL,
    doi:10.1149/1945-7111/ac86a8 (resistance laws from Naumann et al., refitted). BLAST-Lite
    ``blast/models/lfp_gr_SonyMurata3Ah_2018.py``
    (``Lfp_Gr_SonyMurata3Ah_Battery``):

    - calendar loss: sigmoid in days with limit ``q1(T, Ua)``, rate ``q2`` and steepness
      ``q3(T, Ua)`` (both time-averaged over the SoC occupancy);
    - cycling loss: ``(q5*EFC)**q6`` with ``q5 = |b0 + b1*DoD + b2*exp(DoD**2*Crate**3)|``;
    - break-in loss: sigmoid in EFC, only in chunks with more than 3 EFC per day (BLAST-Lite's rule);
    - resistance: ``dr_cal = k_ref*exp(-Ea/R*(1/T - 1/298.15))*(C*(soc - 0.5)**3 + D)`` per second
      and ``dr_cyc = (A*Crate + B)*(C'*(DoD - 0.5)**3 + D')*EFC/100`` (Naumann's laws refitted).

    BATTERY_NOTES.md section 1.4 quotes the SimSES port of Naumann's square-root calendar law; the
    scenario table there was produced with the BLAST-Lite sigmoid law implemented here. The notes
    give ``D' = 0.9182``; BLAST-Lite's source has ``0.91882``, used here.
    """

    name: str = "lfp_gr_sonymurata3ah"
    provenance: str = (
        "Naumann et al. 2018 (doi:10.1016/j.est.2018.01.019) and 2020 (doi:10.1016/j.jpowsour.2019.227666) "
        "data, fit in doi:10.1149/1945-7111/ac86a8; BLAST-Lite blast/models/lfp_gr_SonyMurata3Ah_2018.py"
    )
    validity: Validity = Validity(
        cycling_temp_c=(20.0, 40.0),
        calendar_temp_c=(20.0, 40.0),
        dod=(0.8, 1.0),
        max_c_rate_charge=1.0,
        max_c_rate_discharge=2.0,
    )
    nominal_capacity_ah: float = 3.0
    q2: float = 0.000130510034211874
    q1_b0: float = 0.989687151293590
    q1_b1: float = -2881067.56019324
    q1_b2: float = 8742.06309157261
    q3_b0: float = 0.000332850281062177
    q3_b1: float = 734553185711.369
    q3_b2: float = -2.82161575620780e-06
    q3_b3: float = -3284991315.45121
    q3_b4: float = 0.00127227593657290
    q8: float = 0.00303553871631028
    q9: float = 1.43752162947637
    q7_b0: float = 0.582258029148225
    q7_soc_skew: float = 0.0583128906965484
    q7_soc_width: float = 0.208738181522897
    q7_dod_skew: float = -3.80744333129564
    q7_dod_width: float = 1.16126260428210
    q7_dod_growth: float = 25.4130804598602
    q6: float = 1.12847759334355
    q5_b0: float = -6.81260579372875e-06
    q5_b1: float = 2.59615973160844e-05
    q5_b2: float = 2.11559710307295e-06
    k_ref_r_cal: float = 3.4194e-10
    ea_r_cal: float = 71827.0
    c_r_cal: float = -3.3903
    d_r_cal: float = 1.5604
    a_r_cyc: float = -0.002
    b_r_cyc: float = 0.0021
    c_r_cyc: float = 6.8477
    d_r_cyc: float = 0.91882
    breakin_min_efc_per_day: float = 3.0
    _initial_breakin: ClassVar[float] = 1e-10  # BLAST-Lite seeds the break-in state at 1e-10

    def _advance(self, state: AgingState, stressors: Stressors, scalar: FloatArray) -> _Components:
        t = stressors.temp_k
        t2, at = _temp_column(t)
        dod = stressors.dod
        crate = stressors.c_rate_mean
        ua = _UA_GRID
        q1 = _occupancy_mean(
            stressors,
            np.abs(self.q1_b0 * np.exp(self.q1_b1 / t2**2 * ua**0.5) * np.exp(self.q1_b2 / t2 * ua**0.5)),
            at,
        )
        q3 = _occupancy_mean(
            stressors,
            np.abs(
                self.q3_b0
                * np.exp(self.q3_b1 / t2**4 * ua ** (1.0 / 3.0))
                * np.exp(self.q3_b2 * t2**3 * ua**0.25)
                * np.exp(self.q3_b3 / t2**3 * ua ** (1.0 / 3.0))
                * np.exp(self.q3_b4 * t2**2 * ua**0.25)
            ),
            at,
        )
        q5 = np.abs(self.q5_b0 + self.q5_b1 * dod + self.q5_b2 * np.exp(dod**2 * crate**3))
        soc_factor = _occupancy_mean(stressors, _skewnorm_pdf(SOC_GRID, self.q7_soc_skew, self.q7_soc_width))
        q7 = np.abs(
            self.q7_b0
            * soc_factor
            * _skewnorm_pdf(dod, self.q7_dod_skew, self.q7_dod_width)
            * np.tanh(0.5 * self.q7_dod_growth * dod)  # BLAST's sigmoid(dod, 1, growth, 1)
        )
        k_r_cal = _arrhenius(t, self.ea_r_cal) * self.k_ref_r_cal
        k_r_cal_soc = _occupancy_mean(stressors, self.c_r_cal * (SOC_GRID - 0.5) ** 3 + self.d_r_cal)
        k_r_cyc = (self.a_r_cyc * crate + self.b_r_cyc) * (self.c_r_cyc * (dod - 0.5) ** 3 + self.d_r_cyc)

        q_cal = state.q_cal_loss + scalar * sigmoid_increment(state.q_cal_loss, stressors.dt_days, q1, self.q2, q3)
        q_cyc = state.q_cyc_loss + scalar * power_b_increment(state.q_cyc_loss, stressors.efc, q5, self.q6)
        fast = stressors.efc > self.breakin_min_efc_per_day * stressors.dt_days
        d_breakin = sigmoid_increment(state.q_breakin_loss, stressors.efc, q7, self.q8, self.q9)
        q_breakin = state.q_breakin_loss + scalar * np.where(fast, d_breakin, 0.0)
        r_cal = state.r_cal_gain + scalar * k_r_cal * k_r_cal_soc * stressors.dt_days * SECONDS_PER_DAY
        r_cyc = state.r_cyc_gain + scalar * k_r_cyc * stressors.efc / 100.0
        return _Components(q_cal, q_cyc, state.q_lam_loss, q_breakin, r_cal, r_cyc)


@dataclass(frozen=True)
class Nmc111GrKokam75Ah(_BlastLaw):
    """NMC111 | graphite Kokam 75 Ah pouch (2017 data), with LLI/LAM capacity and resistance laws.

    Aging data and model from the paper BLAST-Lite cites,
    https://ieeexplore.ieee.org/iel7/7951530/7962914/07963578.pdf (2017); BLAST-Lite
    ``blast/models/nmc111_gr_Kokam75Ah_2017.py`` (``Nmc111_Gr_Kokam75Ah_Battery``). With
    ``TN = T/308.15`` and ``UaN = Ua/0.123``:

    - ``q1 = 2.66e7*exp(-17.8/TN)*exp(-5.21*UaN/TN)`` (time-averaged); ``q_LLI,t = q1*t**0.357``;
    - ``q3 = 3.80e3*exp(-18.4/TN)*exp(1.04*exp(DoD**2))``; ``q_LLI,EFC = q3*EFC**0.778``;
    - ``q5 = 1e4 + 153*(T_C - 55)*DoD*(soc_mean/0.6)``; LAM follows a sigmoid in EFC with limit 1,
      ``k = 1/q5``, ``p = 10`` (seeded at 1e-8 as in BLAST-Lite);
    - ``q = min(1 - q_LLI,t - q_LLI,EFC, 1.01 - q_LAM)``;
    - ``r = max(1 + r1*q1*t**r2 + r3*q3*EFC**r4, r5 + r6/q_LAM)`` (both LLI terms power laws).

    No C-rate dependence (tests at 1C). ``q5`` is floored at 1 EFC to keep the sigmoid finite far
    outside the tested range (BLAST-Lite would return NaN). Resistance at high-SoC storage grows
    very fast (r > 10 in 10 years at 90 % SoC); treat it as an extrapolation artefact.
    """

    name: str = "nmc111_gr_kokam75ah"
    provenance: str = "IEEE document 7963578 (2017); BLAST-Lite blast/models/nmc111_gr_Kokam75Ah_2017.py"
    validity: Validity = Validity(
        cycling_temp_c=(0.0, 45.0),
        calendar_temp_c=(0.0, 55.0),
        dod=(0.8, 1.0),
        max_c_rate_charge=1.0,
        max_c_rate_discharge=1.0,
    )
    nominal_capacity_ah: float = 75.0
    q1_0: float = 2.66e7
    q1_1: float = -17.8
    q1_2: float = -5.21
    q2: float = 0.357
    q3_0: float = 3.80e3
    q3_1: float = -18.4
    q3_2: float = 1.04
    q4: float = 0.778
    q5_0: float = 1e4
    q5_1: float = 153.0
    p_lam: float = 10.0
    r1: float = 0.0570
    r2: float = 1.25
    r3: float = 4.87
    r4: float = 0.712
    r5: float = -0.08
    r6: float = 1.09
    _initial_lam: ClassVar[float] = 1e-8  # BLAST-Lite seeds the LAM state at 1e-8

    def _advance(self, state: AgingState, stressors: Stressors, scalar: FloatArray) -> _Components:
        t = stressors.temp_k
        tn = t / _TREF_NORM_K
        uan = _UA_GRID / _UA_NORM_V
        tn2, at = _temp_column(tn)
        q1 = _occupancy_mean(stressors, self.q1_0 * np.exp(self.q1_1 / tn2) * np.exp(self.q1_2 * uan / tn2), at)
        q3 = self.q3_0 * np.exp(self.q3_1 / tn) * np.exp(self.q3_2 * np.exp(stressors.dod**2))
        q5 = self.q5_0 + self.q5_1 * (t - ZERO_CELSIUS_K - 55.0) * stressors.dod * (stressors.soc_mean / 0.6)
        q5 = np.maximum(q5, 1.0)
        dt = stressors.dt_days
        efc = stressors.efc
        q_cal = state.q_cal_loss + scalar * power_law_increment(state.q_cal_loss, dt, q1, self.q2)
        q_cyc = state.q_cyc_loss + scalar * power_law_increment(state.q_cyc_loss, efc, q3, self.q4)
        q_lam = state.q_lam_loss + scalar * sigmoid_increment(state.q_lam_loss, efc, 1.0, 1.0 / q5, self.p_lam)
        r_cal = state.r_cal_gain + scalar * power_law_increment(state.r_cal_gain, dt, self.r1 * q1, self.r2)
        r_cyc = state.r_cyc_gain + scalar * power_law_increment(state.r_cyc_gain, efc, self.r3 * q3, self.r4)
        return _Components(q_cal, q_cyc, q_lam, state.q_breakin_loss, r_cal, r_cyc)

    def _outputs(self, c: _Components) -> tuple[FloatArray, FloatArray]:
        q_lli = 1.0 - c.q_cal_loss - c.q_cyc_loss
        q_lam = 1.01 - c.q_lam_loss
        r_lli = 1.0 + c.r_cal_gain + c.r_cyc_gain
        r_lam = self.r5 + self.r6 / np.maximum(q_lam, 1e-6)
        q: FloatArray = np.minimum(q_lli, q_lam)
        r: FloatArray = np.maximum(r_lli, r_lam)
        return q, r


@dataclass(frozen=True)
class LmoGrNissanLeaf66Ah2ndLife(_BlastLaw):
    """LMO | graphite Nissan Leaf modules in second life (2p half-modules, 66 Ah new, about 46 Ah at intake).

    Braco et al., doi:10.1016/j.est.2020.101695 (cycling) and
    doi:10.1109/EEEIC/ICPSEUROPE54979.2022.9854784 (calendar); BLAST-Lite
    ``blast/models/lmo_gr_NissanLeaf66Ah_2ndLife_2020.py`` (``Lmo_Gr_NissanLeaf66Ah_2ndLife_Battery``):

    - ``k_cal = 3.25e8*exp(-7.58e3/T)*exp(162*soc/T)`` (time-averaged); ``q_cal = k_cal*t_days**0.464``;
    - ``q_cyc = 7.58e-5*EFC**1.08``, only a function of throughput: valid near 25 degC, 100 % DoD,
      1C/1C, the single tested condition.

    Capacity convention: ``q`` here is relative to the module's capacity *at second-life intake*,
    as BLAST-Lite's ``q``. BLAST-Lite also reports ``qNew = 0.7*q``, relative to the new module,
    assuming every module enters second life at 70 % (:attr:`intake_soh`). A caller with a
    measured intake SoH ``h0`` (relative to nameplate) maps it as ``soh = h0*q``
    (:meth:`soh_relative_to_new`), and should pass the intake capacity (``h0`` times nameplate) as
    ``capacity_ah`` to :func:`stressors_from_series` so that EFC counts second-life cycles.
    BLAST-Lite HEAD fails in ``simulate_battery_life(..., is_constant_input=True)`` with
    ``KeyError: 'dod'``; this class has no such path.

    Resistance: the source has no resistance law, so ``r_growth = 1 + EMPIRICAL_R_PER_FADE * fade``,
    an empirical link (about +30 % at 20 % fade, BATTERY_NOTES.md section 3).
    """

    name: str = "lmo_gr_nissanleaf66ah_2ndlife"
    provenance: str = (
        "Braco et al., doi:10.1016/j.est.2020.101695 (second-life cycling data); "
        "BLAST-Lite blast/models/lmo_gr_NissanLeaf66Ah_2ndLife_2020.py"
    )
    validity: Validity = Validity(
        cycling_temp_c=(20.0, 30.0),
        calendar_temp_c=(20.0, 30.0),
        dod=(0.8, 1.0),
        max_c_rate_charge=1.0,
        max_c_rate_discharge=1.0,
    )
    nominal_capacity_ah: float = 66.0
    intake_capacity_ah: float = 46.0
    intake_soh: float = 0.7
    qcal_a: float = 3.25e8
    qcal_b: float = -7.58e3
    qcal_c: float = 162.0
    qcal_p: float = 0.464
    qcyc_a: float = 7.58e-5
    qcyc_p: float = 1.08

    def _advance(self, state: AgingState, stressors: Stressors, scalar: FloatArray) -> _Components:
        t2, at = _temp_column(stressors.temp_k)
        k_cal = _occupancy_mean(
            stressors, self.qcal_a * np.exp(self.qcal_b / t2) * np.exp(self.qcal_c * SOC_GRID / t2), at
        )
        q_cal = state.q_cal_loss + scalar * power_law_increment(state.q_cal_loss, stressors.dt_days, k_cal, self.qcal_p)
        q_cyc = state.q_cyc_loss + scalar * power_law_increment(
            state.q_cyc_loss, stressors.efc, self.qcyc_a, self.qcyc_p
        )
        return _Components(q_cal, q_cyc, state.q_lam_loss, state.q_breakin_loss, *_empirical_r(q_cal, q_cyc))

    def soh_relative_to_new(self, state: AgingState, intake_soh: ArrayLike | None = None) -> FloatArray:
        """Map ``q`` (relative to intake) onto SoH relative to the new module's nameplate.

        Args:
            state: the aging state.
            intake_soh: measured SoH at second-life intake per pack; default :attr:`intake_soh`
                (0.7, BLAST-Lite's ``qNew = 0.7*q``).

        Returns:
            ``intake_soh * q``.
        """
        h0 = self.intake_soh if intake_soh is None else intake_soh
        out: FloatArray = _pack_vector("intake_soh", h0, state.n_packs) * state.q
        return out


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

AGING_LAWS: Final[Mapping[str, AgingLaw]] = MappingProxyType(
    {
        law.name: law
        for law in (
            Nmc811GrSiLgm50(),
            Nmc622GrDenso50Ah(),
            NmcGr50AhB1(),
            LfpGr250AhPrismatic(),
            LfpGrSonyMurata3Ah(),
            Nmc111GrKokam75Ah(),
            LmoGrNissanLeaf66Ah2ndLife(),
        )
    }
)
"""Every aging law with its published parameters, by registry name (read-only)."""


def get_aging_law(name: str) -> AgingLaw:
    """Return the registered aging law called ``name``.

    Args:
        name: registry name, e.g. ``"lfp_gr_250ah_prismatic"``.

    Returns:
        The law with its published parameters.

    Raises:
        ChemistryError: for an unknown name, suggesting the closest names.

    Examples:
        >>> law = get_aging_law("lfp_gr_250ah_prismatic")
        >>> state = law.initial_state(2)
        >>> day = Stressors.from_means(dt_days=1.0, temp_k=298.15, soc_mean=[0.5, 0.9])
        >>> for _ in range(365):
        ...     state = law.step(state, day, scalar=[1.0, 1.0])
        >>> [round(float(q), 4) for q in state.q]
        [0.989, 0.9832]
        >>> get_aging_law("lfp_gr_250ah")
        Traceback (most recent call last):
        ...
        twin.errors.ChemistryError: unknown aging law 'lfp_gr_250ah'; did you mean 'lfp_gr_250ah_prismatic'?
    """
    try:
        return AGING_LAWS[name]
    except KeyError:
        lowered = name.lower()
        close = difflib.get_close_matches(lowered, list(AGING_LAWS), n=3, cutoff=0.66)
        close += [known for known in AGING_LAWS if lowered and lowered in known and known not in close]
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?"
        else:
            hint = f"known laws: {', '.join(sorted(AGING_LAWS))}"
        msg = f"unknown aging law {name!r}; {hint}"
        raise ChemistryError(msg) from None


#: Stressors assumed for an EV's first life and for a pack's time at the site before tracking:
#: 25 °C, mean SoC 0.6, DoD 0.5, 0.3C while driving or charging, mostly parked (mean |C| 0.05).
#: Typical values (BATTERY_NOTES 1.4 and 3), not measurements of any pack. The emulator ages its
#: packs' first lives with them and the twin places the packs on their curves with the same.
FIRST_LIFE: Final = MappingProxyType(
    {"temp_k": 298.15, "soc_mean": 0.6, "dod": 0.5, "c_rate_mean": 0.05, "c_rate": 0.3}
)


def first_life_stressors(dt_days: ArrayLike, efc: ArrayLike = 0.0) -> Stressors:
    """Chunks of :data:`FIRST_LIFE` duty: one row per element of ``dt_days``, with ``efc`` cycles each."""
    n = np.asarray(dt_days).size
    return Stressors.from_means(
        dt_days=dt_days,
        temp_k=np.full(n, FIRST_LIFE["temp_k"]),
        soc_mean=np.full(n, FIRST_LIFE["soc_mean"]),
        dod=np.full(n, FIRST_LIFE["dod"]),
        c_rate_mean=np.full(n, FIRST_LIFE["c_rate_mean"]),
        c_rate_charge_mean=np.full(n, FIRST_LIFE["c_rate"]),
        c_rate_discharge_mean=np.full(n, FIRST_LIFE["c_rate"]),
        efc=efc,
    )
