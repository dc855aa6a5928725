"""Energy to the reserve floor, runtime and ride-through of the site, with P5/P50/P95 bands.

Three questions the operator asks of the batteries, answered from what the twin knows about
each pack (:class:`EnergyPacks`: chemistry, series count, capacity estimate, limits) and its
SoC estimate:

* **Energy to the floor** (:func:`energy_to_floor_wh`): the energy a pack gives while its
  usable SoC falls from ``soc`` to the reserve floor::

      E = series * Q * ∫_floor^soc OCV(s) ds  -  |I| * Q * ∫_floor^soc R_pack(s) ds

  with ``Q`` the capacity of one cell group (Ah), ``OCV`` the chemistry's open-circuit
  voltage of one cell and ``R_pack(s) = series * (R0 + R1 + R2)(s, T) + series_r_ohm`` the
  pack's steady-state resistance (the RC pairs are charged at a constant current); the second
  term is ``I² R x hours`` with ``hours = Ah given / |I|``, the resistance averaged over the
  SoC swept. Both integrals come from cumulative tables on a 0.1 % SoC grid per chemistry,
  integrated exactly for the linearly interpolated OCV (:data:`GRID_POINTS`).
* **Runtime and ride-through** (:func:`time_to_floor_s`): how long the available packs can
  hold a constant power, by forward simulation, not energy over power: near the floor (or
  at high power) the packs' current and voltage limits bind before the energy runs out.
  Each step, per pack: ``Voc = series * OCV(soc)``; ``R = R_pack(soc, T)``; the discharge
  current limit ``min(i_dis_max_a, (Voc - series * v_min_cell_v) / R)`` (>= 0) and the power
  limit ``I (Voc - I R)``; the power is shared in proportion to each pack's energy to the
  floor, capped at its power limit and at its energy over the step, the excess going to the
  packs below their caps (water-filling, as the site controller does); each pack's current
  solves ``P = I (Voc - I R)`` and its SoC falls by ``I dt / (3600 Q)``. The run stops when
  more than :attr:`OutlookOptions.shortfall_share` of the power goes unserved, crediting
  the served share of that last step. The step is adaptive: about
  :attr:`OutlookOptions.target_steps` steps to reach the floor, and a failing step is
  retried from the previous state with half the step, down to
  :attr:`OutlookOptions.min_dt_s`, so the end is found to within a few ``min_dt_s``.
* **The site's outlook with its uncertainty** (:func:`site_outlook`): site energy, SoC,
  runtime at the present battery power and ride-through at the present load, each at P5,
  P50 and P95 (see below).

Simplifications, on purpose:

* RC transients are ignored: the RC pairs are taken as charged at the present current (the
  steady-state resistance ``R0 + R1 + R2``). For the hours-long discharges asked about here
  the pairs' time constants (seconds to minutes) do not matter.
* Hysteresis (LFP) and the entropic term are ignored, and temperature is held at its present
  value per pack.
* A pack is one equivalent cell group: its usable SoC and the usable capacity of the string.
  The weakest cell's own voltage limit is not modelled, only the mean cell's
  (``v_min_cell_v``).

How :func:`site_outlook` finds the bands, cheaply and deterministically (no sampling): each
available pack's energy ``E_i`` at its SoC estimate is the median; its sensitivities are
``g_i = dE_i/dsoc`` (exact, from the OCV and the resistance at its SoC) and
``dE_i/dQ = E_i / Q``. Of each pack's SoC error (``soc_std_i``) the part an error of its
chemistry's OCV table causes (``shared_i``, at most ``soc_std_i``: the SoC filter's
``soc_usable_std_shared``) loads by ``kappa = soc_error_correlation`` (1) on an error common
to every pack of its chemistry (the table errs the same way for all its packs, so the
site's error does not average out over many packs); the rest, the sensors' errors and the
extreme cells' offsets and capacities, is the pack's own. The
capacity has a relative error ``r_i = capacity_rel_std`` loading by ``rho =
capacity_error_correlation`` on an error common to the packs of its chemistry (a biased
aging law errs the same way for all of them: they all aged since their intake test). The
common errors of different chemistries are independent: their tables and laws are (on the
emulated sites the errors of different chemistries have opposite signs as often as not).
With ``b_i = g_i soc_std_i``, ``m_i = g_i shared_i``, ``a_i = E_i r_i`` and ``c`` the chemistries::

    var_site = sum_i (b_i² - kappa² m_i²) + sum_c (kappa sum_{i in c} m_i)²
             + (1 - rho²) sum_i a_i² + sum_c (rho sum_{i in c} a_i)²
    E_P5, E_P95 = E -+ z sqrt(var_site)                           (clipped at 0)

Three scenarios of the packs' SoC (P5, P50, P95) carry these quantiles into the forward
simulation: pack ``i`` of chemistry ``c`` is shifted by ``-+ z sigma_site v_i / var_site / g_i`` with
``v_i = b_i² - kappa² m_i² + (1 - rho²) a_i² + kappa m_i sum_{j in c} kappa m_j + rho a_i sum_{j in c} rho a_j``
its share of the variance (the
conditional mean of its error given the site's), so each scenario's site energy moves by
``z sigma_site`` to first order; SoC is clipped to [0, 1]. Runtime and ride-through are one
:func:`time_to_floor_s` call together: the three scenarios at the battery power and the
three at the load side by side (one call of three when the two powers are equal).

Everything is numpy over packs (and scenarios) but the forward simulation's steps, a loop
numpy cannot vectorise, which is compiled (numba); the only Python loops are over the (at
most four) chemistries.

Sign convention: current and power are positive on discharge. SoC is a fraction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Final

import numpy as np
import polars as pl
from numpy.typing import NDArray

from twin._jit import kernel
from twin.chemistry import REFERENCE_TEMP_C, CellChemistry, get_chemistry
from twin.estimators.base import EstimatorError, check_columns, check_non_negative, check_pack_ids

__all__ = [
    "GRID_POINTS",
    "EnergyPacks",
    "OutlookOptions",
    "SiteOutlook",
    "energy_to_floor_wh",
    "site_outlook",
    "site_soc_weights",
    "time_to_floor_s",
]

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
B = NDArray[np.bool_]
IP = NDArray[np.intp]

GRID_POINTS: Final = 1001
"""Points of the SoC grid the tables are sampled on (0.1 % steps; every chemistry's own grid is on it)."""

_STEP: Final = 1.0 / (GRID_POINTS - 1)
_S_PER_H: Final = 3600.0
_WH_PER_KWH: Final = 1000.0
_MIN_WEIGHT_WH: Final = 1e-6  # below a microwatt-hour a pack counts as empty (as the site's dispatch does)
_TINY: Final = 1e-300
_MAX_EXTRA_STEPS: Final = 256  # bound on the steps beyond target_steps (refinements); never reached in practice


def _frozen(values: object, dtype: type[np.generic], n: int) -> NDArray[np.generic]:
    arr = np.array(np.broadcast_to(np.asarray(values, dtype=dtype), (n,)), dtype=dtype, copy=True)
    arr.flags.writeable = False
    return arr


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _Tables:
    """The chemistries sampled on one grid and stacked, for gathers at ``row + k``.

    ``ocv``/``docv``: cell OCV at the grid point and its change to the next point, V;
    ``cum_ocv``: ∫_0^s OCV ds at the grid point, V (per unit SoC); ``rsoc``/``drsoc``: the
    resistance SoC factor and its change; ``cum_rsoc``: ∫_0^s soc_factor ds. ``points``: the
    columns ``ocv, docv, cum_ocv, rsoc, drsoc`` side by side, a row per grid point, for the
    simulation kernel: a pack's look-up reads one place in memory, not five.
    """

    chemistries: tuple[CellChemistry, ...]
    ocv: F64
    docv: F64
    cum_ocv: F64
    rsoc: F64
    drsoc: F64
    cum_rsoc: F64
    points: F64


def _cumulative(values: F64) -> F64:
    out: F64 = np.concatenate(([0.0], np.cumsum((values[1:] + values[:-1]) * (0.5 * _STEP))))
    return out


def _step_to_next(values: F64) -> F64:
    out: F64 = np.append(np.diff(values), 0.0)
    return out


@functools.cache
def _tables(names: tuple[str, ...]) -> _Tables:
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    chems = tuple(get_chemistry(n) for n in names)
    ocv = [np.asarray(c.ocv(grid), dtype=np.float64) for c in chems]
    rsoc = [np.asarray(c.soc_factor(grid), dtype=np.float64) for c in chems]
    columns = {
        "ocv": np.concatenate(ocv),
        "docv": np.concatenate([_step_to_next(v) for v in ocv]),
        "cum_ocv": np.concatenate([_cumulative(v) for v in ocv]),
        "rsoc": np.concatenate(rsoc),
        "drsoc": np.concatenate([_step_to_next(v) for v in rsoc]),
    }
    tables = _Tables(
        chemistries=chems,
        **columns,
        cum_rsoc=np.concatenate([_cumulative(v) for v in rsoc]),
        points=np.stack(list(columns.values()), axis=1),
    )
    for f in fields(tables):
        value = getattr(tables, f.name)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return tables


@dataclass(frozen=True, slots=True)
class _At:
    """Table positions of an array of SoC: flat index ``row + k`` and fraction of the grid step."""

    index: IP
    frac: F64


def _locate(row: IP, soc: F64) -> _At:
    """Positions of ``soc`` (finite, any shape ending in packs) in each pack's table rows."""
    x = np.clip(soc, 0.0, 1.0) * (GRID_POINTS - 1)
    k = np.minimum(x.astype(np.intp), GRID_POINTS - 2)
    frac: F64 = x - k
    k += row
    return _At(index=k, frac=frac)


def _ocv_and_cum(t: _Tables, at: _At) -> tuple[F64, F64]:
    """Cell OCV (V) and ∫_0^soc OCV ds (V) at ``at``; the integral is exact for the interpolated OCV."""
    v0 = t.ocv.take(at.index)
    dv = t.docv.take(at.index)
    f = at.frac
    ocv: F64 = v0 + dv * f
    cum: F64 = t.cum_ocv.take(at.index) + (v0 + 0.5 * dv * f) * (f * _STEP)
    return ocv, cum


def _rsoc_and_cum(t: _Tables, at: _At) -> tuple[F64, F64]:
    """Resistance SoC factor and its integral from 0 at ``at``."""
    r0 = t.rsoc.take(at.index)
    dr = t.drsoc.take(at.index)
    f = at.frac
    rsoc: F64 = r0 + dr * f
    cum: F64 = t.cum_rsoc.take(at.index) + (r0 + 0.5 * dr * f) * (f * _STEP)
    return rsoc, cum


# ------------------------------------------------------------------------------------------------
# Packs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class EnergyPacks:
    """What the twin knows about each pack for energy and runtime (per-pack read-only arrays).

    Attributes:
        pack_ids: pack identifiers, unique.
        chemistry: chemistry name per pack (a :mod:`twin.chemistry` name).
        series: series cell groups per pack.
        rated_group_ah: rated capacity of one cell group, Ah; the resistances scale with it.
        capacity_ah: capacity estimate of one cell group (the string's usable capacity), Ah.
        capacity_rel_std: relative standard deviation of ``capacity_ah`` (0.03 is 3 %).
        i_dis_max_a: the BMS's discharge current limit of the pack, A (``inf`` when unknown).
        v_min_cell_v: lowest mean cell voltage allowed under load, V.
        series_r_ohm: extra series resistance of the whole pack (cabling, connectors), Ω.

    Examples:
        >>> import numpy as np
        >>> packs = EnergyPacks(
        ...     pack_ids=("a", "b"), chemistry=("nmc811", "lfp"), series=np.array([96, 120]),
        ...     rated_group_ah=np.array([300.0, 404.0]), capacity_ah=np.array([290.0, 350.0]),
        ...     capacity_rel_std=np.full(2, 0.03), i_dis_max_a=np.full(2, np.inf),
        ...     v_min_cell_v=np.array([2.5, 2.0]), series_r_ohm=np.zeros(2))
        >>> np.round(energy_to_floor_wh(packs, np.array([0.9, 0.9]), floor_soc=0.1,
        ...     temp_c=np.full(2, 25.0), current_a=np.zeros(2)) / 1000, 1)
        array([ 83.6, 110.5])
    """

    pack_ids: tuple[str, ...]
    chemistry: tuple[str, ...]
    series: I64
    rated_group_ah: F64
    capacity_ah: F64
    capacity_rel_std: F64
    i_dis_max_a: F64
    v_min_cell_v: F64
    series_r_ohm: F64
    _tables: _Tables = field(init=False, repr=False)
    _row: IP = field(init=False, repr=False)
    _groups: tuple[tuple[CellChemistry, IP], ...] = field(init=False, repr=False)
    _r_ohm_ah: F64 = field(init=False, repr=False)
    _v_nominal_v: F64 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Freeze the arrays and check shapes and ranges.

        Raises:
            EstimatorError: on a shape mismatch, duplicated ids or a non-physical value.
            ChemistryError: for an unknown chemistry name.
        """
        n = check_pack_ids("EnergyPacks", self.pack_ids, self.chemistry)
        names = tuple(sorted(set(self.chemistry)))
        for name in names:
            get_chemistry(name)
        for name, dtype in (
            ("series", np.int64),
            ("rated_group_ah", np.float64),
            ("capacity_ah", np.float64),
            ("capacity_rel_std", np.float64),
            ("i_dis_max_a", np.float64),
            ("v_min_cell_v", np.float64),
            ("series_r_ohm", np.float64),
        ):
            try:
                arr = _frozen(getattr(self, name), dtype, n)
            except ValueError as exc:
                msg = f"EnergyPacks {name} must hold one value per pack ({n})"
                raise EstimatorError(msg) from exc
            object.__setattr__(self, name, arr)
        checks = (
            ("series", self.series >= 1),
            ("rated_group_ah", np.isfinite(self.rated_group_ah) & (self.rated_group_ah > 0.0)),
            ("capacity_ah", np.isfinite(self.capacity_ah) & (self.capacity_ah > 0.0)),
            ("capacity_rel_std", np.isfinite(self.capacity_rel_std) & (self.capacity_rel_std >= 0.0)),
            ("i_dis_max_a", self.i_dis_max_a > 0.0),
            ("v_min_cell_v", np.isfinite(self.v_min_cell_v) & (self.v_min_cell_v > 0.0)),
            ("series_r_ohm", np.isfinite(self.series_r_ohm) & (self.series_r_ohm >= 0.0)),
        )
        for name, ok in checks:
            if not bool(np.all(ok)):
                bad = int(np.flatnonzero(~ok)[0])
                msg = f"EnergyPacks {name} out of range for pack {self.pack_ids[bad]!r}: {getattr(self, name)[bad]}"
                raise EstimatorError(msg)
        tables = _tables(names)
        index = np.searchsorted(np.array(names), np.array(self.chemistry)).astype(np.intp)
        per_chem = np.array([c.r0_ohm_ah + c.r1_ohm_ah + c.r2_ohm_ah for c in tables.chemistries])
        v_nom = np.array([c.v_nominal_v for c in tables.chemistries])
        derived: dict[str, object] = {
            "_tables": tables,
            "_row": index * GRID_POINTS,
            "_groups": tuple((c, np.flatnonzero(index == j)) for j, c in enumerate(tables.chemistries)),
            "_r_ohm_ah": per_chem[index],
            "_v_nominal_v": v_nom[index],
        }
        for name, value in derived.items():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
            object.__setattr__(self, name, value)

    @property
    def n_packs(self) -> int:
        """Number of packs."""
        return len(self.pack_ids)

    @classmethod
    def from_meta(
        cls,
        meta: pl.DataFrame,
        *,
        capacity_ah: Mapping[str, float] | None = None,
        capacity_rel_std: float = 0.03,
    ) -> EnergyPacks:
        """Build the packs from pack_meta rows (the contract's columns).

        The capacity prior is, per pack, ``capacity_ah[pack]`` if given, else
        ``rated_capacity_ah x intake_soh`` (``intake_soh`` 1 when null). The discharge
        current limit is the meta's ``current_max_discharge_a`` (``inf`` when null), and
        never above the cell type's continuous rating (``max_discharge_c x rated``). The
        lowest cell voltage is the chemistry's ``v_min_v``, or ``voltage_min_v / series``
        where the pack announces a higher one.

        Args:
            meta: one row per pack with ``pack``, ``chemistry``, ``rated_capacity_ah``,
                ``series_cells`` and optionally ``intake_soh``, ``voltage_min_v`` and
                ``current_max_discharge_a``.
            capacity_ah: capacity estimates of one cell group by pack id, Ah.
            capacity_rel_std: relative standard deviation of every capacity.

        Returns:
            The packs, in the order of the meta's rows.

        Raises:
            EstimatorError: if a column is missing or a value is out of range.
            ChemistryError: for an unknown chemistry.
        """
        check_columns(meta, ("pack", "chemistry", "rated_capacity_ah", "series_cells"), estimator="EnergyPacks")
        n = meta.height

        def column(name: str, default: float) -> F64:
            if name not in meta.columns:
                return np.full(n, default)
            out: F64 = meta.get_column(name).cast(pl.Float64).fill_null(default).to_numpy().copy()
            return out

        ids = tuple(str(p) for p in meta.get_column("pack").to_list())
        chemistry = tuple(str(c) for c in meta.get_column("chemistry").to_list())
        rated = column("rated_capacity_ah", math.nan)
        series = meta.get_column("series_cells").cast(pl.Int64).to_numpy().copy()
        prior = rated * column("intake_soh", 1.0)
        if capacity_ah:
            given = np.array([capacity_ah.get(p, math.nan) for p in ids], dtype=np.float64)
            prior = np.where(np.isnan(given), prior, given)
        names = sorted(set(chemistry))
        chems = [get_chemistry(c) for c in names]
        index = np.searchsorted(np.array(names), np.array(chemistry))
        v_min_chem = np.array([c.v_min_v for c in chems])[index]
        c_max = np.array([c.max_discharge_c for c in chems])[index]
        v_min_meta = column("voltage_min_v", 0.0) / np.maximum(series, 1)
        return cls(
            pack_ids=ids,
            chemistry=chemistry,
            series=series,
            rated_group_ah=rated,
            capacity_ah=prior,
            capacity_rel_std=np.full(n, capacity_rel_std),
            i_dis_max_a=np.minimum(column("current_max_discharge_a", math.inf), c_max * rated),
            v_min_cell_v=np.maximum(v_min_chem, v_min_meta),
            series_r_ohm=np.zeros(n),
        )

    def _temp_factor(self, temp_c: F64) -> F64:
        """Each pack's resistance temperature factor; ``temp_c`` has any shape ending in packs."""
        t = np.where(np.isfinite(temp_c), temp_c, REFERENCE_TEMP_C)
        out = np.empty(t.shape)
        for chem, cols in self._groups:
            out[..., cols] = chem.temp_factor(t[..., cols])
        return out

    def _r_scale_ohm(self, temp_c: F64) -> F64:
        """Pack resistance per unit SoC factor: ``series * (R0 + R1 + R2)`` at 50 % SoC and ``temp_c``, Ω."""
        out: F64 = self.series * (self._r_ohm_ah / self.rated_group_ah) * self._temp_factor(temp_c)
        return out


# ------------------------------------------------------------------------------------------------
# Energy to the floor
# ------------------------------------------------------------------------------------------------


def _energy_parts(packs: EnergyPacks, soc: F64, floor: F64, temp_c: F64, current_a: F64) -> tuple[F64, F64, F64, F64]:
    """Energy to the floor (Wh, NaN where ``soc`` is NaN) and what its derivative needs.

    Returns:
        ``(energy_wh, ocv_v, rsoc, r_scale_ohm)``: the energy, the cell OCV and the
        resistance SoC factor at ``soc``, and the pack resistance scale at ``temp_c``.
    """
    t = packs._tables
    shape = np.broadcast_shapes(soc.shape, floor.shape, temp_c.shape, current_a.shape)
    finite = np.isfinite(soc)
    s = np.broadcast_to(np.where(finite, np.clip(soc, 0.0, 1.0), 0.0), shape)
    lo = np.broadcast_to(np.clip(np.where(np.isfinite(floor), floor, 0.0), 0.0, 1.0), shape)
    at_soc, at_floor = _locate(packs._row, s), _locate(packs._row, lo)
    ocv, cum_soc = _ocv_and_cum(t, at_soc)
    _, cum_floor = _ocv_and_cum(t, at_floor)
    rsoc, rcum_soc = _rsoc_and_cum(t, at_soc)
    _, rcum_floor = _rsoc_and_cum(t, at_floor)
    swing = np.clip(s - lo, 0.0, None)
    r_scale = packs._r_scale_ohm(np.broadcast_to(temp_c, shape))
    q = packs.capacity_ah
    open_wh = packs.series * q * np.clip(cum_soc - cum_floor, 0.0, None)
    loss_wh = np.abs(current_a) * q * (r_scale * np.clip(rcum_soc - rcum_floor, 0.0, None) + packs.series_r_ohm * swing)
    energy: F64 = np.where(finite & np.isfinite(floor), np.clip(open_wh - loss_wh, 0.0, None), np.nan)
    return energy, ocv, rsoc, r_scale


def energy_to_floor_wh(packs: EnergyPacks, soc: F64, *, floor_soc: float | F64, temp_c: F64, current_a: F64) -> F64:
    """Return the energy each pack gives while its usable SoC falls to ``floor_soc``, Wh.

    ``series x capacity x ∫_floor^soc OCV ds`` less the ohmic loss at ``|current_a|`` over
    that discharge (``I² R_total x hours``, ``R_total`` the steady-state resistance averaged
    over the SoC swept), clipped at 0. Any leading shape broadcasts, for example ``(D, P)``
    draws x packs; the last axis is the packs.

    Args:
        packs: the packs.
        soc: usable SoC per pack, fraction (clipped to [0, 1]); NaN gives NaN.
        floor_soc: the reserve floor, fraction (scalar or broadcastable).
        temp_c: cell temperature per pack, °C (NaN is taken as 25 °C).
        current_a: discharge current the energy is drawn at, A (its sign is ignored).

    Returns:
        The energy, Wh, with the broadcast shape of the inputs.

    Examples:
        >>> import numpy as np
        >>> import polars as pl
        >>> meta = pl.DataFrame({"pack": ["p1"], "chemistry": ["lmo"], "rated_capacity_ah": [66.2],
        ...     "series_cells": [96]})
        >>> packs = EnergyPacks.from_meta(meta)
        >>> e = energy_to_floor_wh(packs, np.array([0.1, 0.5, 0.9]).reshape(3, 1), floor_soc=0.1,
        ...     temp_c=np.array([25.0]), current_a=np.array([10.0]))
        >>> np.round(e[:, 0] / 1000, 2)
        array([ 0.  ,  9.65, 19.76])
    """
    energy, _, _, _ = _energy_parts(
        packs,
        np.asarray(soc, dtype=np.float64),
        np.asarray(floor_soc, dtype=np.float64),
        np.asarray(temp_c, dtype=np.float64),
        np.asarray(current_a, dtype=np.float64),
    )
    return energy


# ------------------------------------------------------------------------------------------------
# Forward simulation
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutlookOptions:
    """How the outlook is computed (units in the names; defaults immutable).

    Attributes:
        floor_soc: reserve floor on each pack's usable SoC, fraction.
        quantile_z: the normal quantile of the bands (1.645: P5 and P95).
        soc_error_correlation: loading of the part of each pack's SoC error its chemistry's
            OCV table causes (``soc_std_shared``) on an error common to the packs of the
            chemistry: the common part of pack ``i``'s error has standard deviation
            ``soc_error_correlation * soc_std_shared_i``. 1: a table is the same for all its
            packs (0.5 before the shared part was the table's alone: over 24 draws of the
            emulated site with tables 3 mV off, the bands held the truth 67-77 % of the time).
        capacity_error_correlation: the same for the capacity errors (the aging law's bias).
        horizon_s: give up (report ``inf``) beyond this, s.
        target_steps: forward-simulation steps aimed at to reach the floor.
        min_dt_s: the smallest simulation step, s.
        shortfall_share: the site counts as unable to carry the power once this share of
            it goes unserved.
    """

    floor_soc: float = 0.10
    quantile_z: float = 1.6448536269514722
    soc_error_correlation: float = 1.0
    capacity_error_correlation: float = 0.5
    horizon_s: float = 7 * 86400.0
    target_steps: int = 120
    min_dt_s: float = 10.0
    shortfall_share: float = 0.005

    def __post_init__(self) -> None:
        """Check every option.

        Raises:
            EstimatorError: for a value out of range.
        """
        check_non_negative(self)
        if not isinstance(self.target_steps, int) or self.target_steps < 1:
            msg = f"OutlookOptions.target_steps must be an integer >= 1, got {self.target_steps!r}"
            raise EstimatorError(msg)
        for name in ("horizon_s", "min_dt_s"):
            if getattr(self, name) <= 0:
                msg = f"OutlookOptions.{name} must be positive"
                raise EstimatorError(msg)
        if self.floor_soc >= 1.0:
            msg = f"OutlookOptions.floor_soc must be below 1, got {self.floor_soc}"
            raise EstimatorError(msg)
        if self.shortfall_share >= 1.0:
            msg = f"OutlookOptions.shortfall_share must be below 1, got {self.shortfall_share}"
            raise EstimatorError(msg)


# The forward simulation is compiled (numba, :func:`twin._jit.kernel`). A step of one scenario
# makes a few passes over the packs, each a short loop, so that the arithmetic ones vectorise:
# the look-up of the tables (gathers, one pack at a time), the limits, the dispatch (a sum,
# the proportional shares and, rarely, the water-filling) and the step. The arithmetic is
# that of the numpy implementation it replaced, operation for operation and in the same
# order (numpy's pairwise sums included), so the results agree to rounding (580 reference
# arrays bit for bit; one random fleet in 20 differed in the last bits of a P5 runtime).

_AT_ROWS: Final = 6  # the look-up: fraction of the grid step, then the columns of _Tables.points
_PACK_ROWS: Final = 5  # the limits: energy to the floor, power cap, Voc, R, current limit


@kernel
def _block_sum(a: F64, start: int, n: int) -> float:
    """Sum of ``a[start:start + n]``, ``n <= 128``, as numpy adds such a block: in eight running sums."""
    if n < 8:
        total = 0.0
        for i in range(start, start + n):
            total += a[i]
        return total
    r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
    r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
    end = start + n - n % 8
    for i in range(start + 8, end, 8):
        r0, r1, r2, r3 = r0 + a[i], r1 + a[i + 1], r2 + a[i + 2], r3 + a[i + 3]
        r4, r5, r6, r7 = r4 + a[i + 4], r5 + a[i + 5], r6 + a[i + 6], r7 + a[i + 7]
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(end, start + n):
        total += a[i]
    return float(total)


@kernel
def _sum(a: F64) -> float:
    """``a.sum()`` to the bit: numpy's pairwise summation, halving down to blocks of at most 128.

    numba cannot cache a recursive function (it crashes loading it), so numpy's recursion is
    walked with two stacks: the halves still to sum, and the sums of left halves waiting for
    their right half (the next sum at the same depth).
    """
    todo = np.empty((64, 3), dtype=np.int64)  # start, length, depth
    done, done_depth = np.empty(64), np.empty(64, dtype=np.int64)
    todo[0, 0], todo[0, 1], todo[0, 2] = 0, a.size, 0
    n_todo, n_done = 1, 0
    while n_todo > 0:
        n_todo -= 1
        start, n, depth = todo[n_todo, 0], todo[n_todo, 1], todo[n_todo, 2]
        if n > 128:
            half = n // 2 - (n // 2) % 8
            todo[n_todo, 0], todo[n_todo, 1], todo[n_todo, 2] = start + half, n - half, depth + 1
            todo[n_todo + 1, 0], todo[n_todo + 1, 1], todo[n_todo + 1, 2] = start, half, depth + 1
            n_todo += 2
            continue
        total = _block_sum(a, start, n)
        while n_done > 0 and done_depth[n_done - 1] == depth:
            n_done -= 1
            total = done[n_done] + total
            depth -= 1
        done[n_done], done_depth[n_done] = total, depth
        n_done += 1
    return float(0.0 + done[0])


@kernel
def _water_fill(total: float, weight: F64, cap: F64, share: F64) -> float:
    """Share ``total`` in proportion to ``weight``, no share above ``cap``: fill ``share``, return what is unserved.

    Exactly: a pack clips at the fill level ``cap / weight``; with the levels sorted, the
    power delivered at each level is a cumulative sum, and the level that delivers ``total``
    is found by counting. ``weight`` and ``cap`` must be >= 0, and ``cap`` 0 where ``weight``
    is; at least one pack.
    """
    n = weight.size
    level = np.full(n, np.inf)
    for j in range(n):
        if weight[j] > 0.0:
            level[j] = cap[j] / weight[j]
    order = np.argsort(level, kind="mergesort")  # stable
    # The caps summed up the levels; the weight from each level on, summed from the end so
    # that a small remainder is not lost.
    cum_cap, tail_weight = np.empty(n), np.zeros(n + 1)
    cum_cap[0] = cap[order[0]]
    for i in range(1, n):
        cum_cap[i] = cum_cap[i - 1] + cap[order[i]]
    tail_weight[n - 1] = weight[order[n - 1]]
    for i in range(n - 2, -1, -1):
        tail_weight[i] = tail_weight[i + 1] + weight[order[i]]
    k = 0
    for i in range(n):
        above = tail_weight[i + 1]
        delivered = cum_cap[i] + level[order[i]] * above if above > 0.0 else cum_cap[i]
        if delivered < total:
            k += 1
    k = min(k, n - 1)
    below = cum_cap[k - 1] if k > 0 else 0.0
    # No weight left above the level: every pack is at its cap (an infinite level).
    fill = np.maximum((total - below) / tail_weight[k] if tail_weight[k] > 0.0 else np.inf, 0.0)
    for j in range(n):
        share[j] = np.minimum(cap[j], fill * weight[j]) if weight[j] > 0.0 else 0.0
    return float(np.maximum(total - _sum(share), 0.0))


@kernel
def _dispatch(total: float, weight: F64, cap: F64, share: F64) -> float:
    """:func:`_water_fill` with a fast path: the proportional shares when none exceeds its cap."""
    w_sum = _sum(weight)
    if not w_sum > 0.0:
        return _water_fill(total, weight, cap, share)
    per_weight = total / w_sum
    slow = False
    for j in range(weight.size):
        share[j] = weight[j] * per_weight
        slow |= share[j] > cap[j]
    return _water_fill(total, weight, cap, share) if slow else 0.0


@kernel
def _look_up(soc: F64, row: IP, points: F64, at: F64) -> None:
    """Each pack's place in the tables at ``soc`` (in [0, 1]): the fraction of the grid step, then the table row.

    Into the rows of ``at`` (:data:`_AT_ROWS`). The one pass that cannot vectorise (a gather
    per pack), so it does nothing else.
    """
    last = GRID_POINTS - 2
    for j in range(soc.size):
        x = soc[j] * (GRID_POINTS - 1)
        k = min(max(int(x), 0), last)  # never out of the tables, even for a NaN
        at[0, j] = x - k
        point = np.uint64(k + row[j])  # unsigned: no check for an index from the end
        for c in range(_AT_ROWS - 1):
            at[c + 1, j] = points[point, c]


@kernel
def _limits(
    at: F64,
    wh_per_v: F64,
    cum_floor: F64,
    r_scale: F64,
    r_series: F64,
    series: F64,
    v_min_pack: F64,
    i_max: F64,
    per_s_dt: float,
    out: F64,
) -> None:
    """From the look-up ``at``, each pack's energy to the floor, power cap, Voc, R and current limit.

    Into the rows of ``out`` (:data:`_PACK_ROWS`). The power cap is the lower of the power
    limit and the energy over the step (``per_s_dt`` is ``3600 / dt``).
    """
    half_step = 0.5 * _STEP
    frac, ocv0, docv, cum, rsoc0, drsoc = at[0], at[1], at[2], at[3], at[4], at[5]
    energy, cap, voc, r, i_lim = out[0], out[1], out[2], out[3], out[4]
    for j in range(frac.size):
        f = frac[j]
        ocv = docv[j] * f + ocv0[j]
        above = (ocv0[j] + ocv) * f * half_step + cum[j] - cum_floor[j]  # the trapezoid from the grid point
        e = np.maximum(above, 0.0) * wh_per_v[j]
        r_j = (drsoc[j] * f + rsoc0[j]) * r_scale[j] + r_series[j]
        voc_j = ocv * series[j]
        # The current keeping the mean cell above v_min, within the BMS limit; its power.
        i_j = np.maximum(np.minimum((voc_j - v_min_pack[j]) / r_j, i_max[j]), 0.0)
        energy[j], voc[j], r[j], i_lim[j] = e, voc_j, r_j, i_j
        cap[j] = np.minimum(e * per_s_dt, (voc_j - i_j * r_j) * i_j)  # the energy over the step, too


@kernel
def _advance(soc: F64, share: F64, limits: F64, soc_per_as: F64, dt: float, out: F64) -> None:
    """Each pack's SoC after delivering its ``share`` for ``dt`` (into ``out``).

    Its current solves ``P = I (Voc - I R)``, in the form that is stable for small ``P``.
    """
    voc, r, i_lim = limits[2], limits[3], limits[4]
    for j in range(soc.size):
        root = np.sqrt(np.maximum(r[j] * share[j] * -4.0 + voc[j] * voc[j], 0.0)) + voc[j]
        current = np.minimum(share[j] * 2.0 / root, i_lim[j]) * (dt * soc_per_as[j])
        out[j] = np.maximum(soc[j] - current, 0.0)


@kernel
def _simulate(
    power: F64,
    soc: F64,
    dt_s: F64,
    wh_per_v: F64,
    row: IP,
    cum_floor: F64,
    r_scale: F64,
    r_series: F64,
    series: F64,
    v_min_pack: F64,
    i_max: F64,
    soc_per_as: F64,
    points: F64,
    min_dt_s: float,
    horizon_s: float,
    shortfall_share: float,
    max_steps: int,
) -> F64:
    """The forward simulation of :func:`time_to_floor_s`; returns the time to the floor per scenario.

    Per scenario: ``power`` and the first step ``dt_s``; per scenario and pack (``(D, P)``):
    ``soc`` in [0, 1] and ``wh_per_v``, the energy per unit of ∫OCV ds (0 leaves a pack
    out); per pack: its first table row, ∫OCV ds at the floor, the resistance's scale and
    series part, the series count, its lowest voltage, its current limit and the SoC per
    ampere-second. Scenarios are independent, so each runs alone to its end.
    """
    d, n = soc.shape
    out = np.empty(d)
    at, limits, share = np.empty((_AT_ROWS, n)), np.empty((_PACK_ROWS, n)), np.empty(n)
    for i in range(d):
        s, prev_s, stepped = soc[i].copy(), soc[i].copy(), np.empty(n)
        total, dt = power[i], dt_s[i]
        now = prev_now = 0.0
        end = np.nan
        running = True
        for _ in range(max_steps):
            _look_up(s, row, points, at)
            per_s_dt = _S_PER_H / dt  # caps a pack at its energy over the step
            _limits(at, wh_per_v[i], cum_floor, r_scale, r_series, series, v_min_pack, i_max, per_s_dt, limits)
            unserved = _dispatch(total, limits[0], limits[1], share)
            if unserved > shortfall_share * total:
                if dt > min_dt_s:
                    # Go back one step and retry with half the step: the end lies within it.
                    s[:] = prev_s
                    now = prev_now
                    dt = max(0.5 * dt, min_dt_s)
                    continue
                end = now + dt * (np.maximum(total - unserved, 0.0) / total)  # the served share of the step
                running = False
                break
            _advance(s, share, limits, soc_per_as, dt, stepped)
            prev_s, s, stepped = s, stepped, prev_s
            prev_now, now = now, now + dt
            if now >= horizon_s:
                end = np.inf
                running = False
                break
        # Not reached in practice (the step count is bounded); what is left ran at least this long.
        out[i] = now if running else end
    return out


def time_to_floor_s(
    packs: EnergyPacks,
    power_w: float | F64,
    soc: F64,
    *,
    temp_c: F64,
    available: B,
    floor_soc: float,
    options: OutlookOptions = OutlookOptions(),
) -> F64:
    """Return how long the available packs can deliver ``power_w``, s, by forward simulation.

    The model and the dispatch are described in the module docstring. ``D`` scenarios (rows
    of ``soc``) are simulated side by side, each with its own step: about
    ``energy / power / target_steps``, clipped to ``[min_dt_s, horizon_s / target_steps]``,
    halved (down to ``min_dt_s``) when a step fails so that the end is located finely.

    Args:
        packs: the packs.
        power_w: the constant battery power to hold, W, positive on discharge: one for
            every scenario, or one per scenario (rows are simulated independently, so
            stacking scenarios of several powers gives each the same result as alone).
        soc: usable SoC, shape ``(D, P)``, fraction; a NaN takes that pack out of that
            scenario.
        temp_c: cell temperature per pack, °C, held constant (NaN is taken as 25 °C).
        available: per pack, True if it takes part (online, contactor closed).
        floor_soc: the reserve floor on each pack's usable SoC, fraction.
        options: the step control, horizon and shortfall share.

    Returns:
        Per scenario, seconds until more than ``shortfall_share`` of the power goes
        unserved; ``inf`` beyond ``horizon_s``; NaN for a scenario whose power is
        ``<= 0`` (or not finite).

    Raises:
        EstimatorError: if ``soc`` is not ``(D, P)``, or ``power_w`` neither one number nor
            one per scenario.
    """
    s = np.array(soc, dtype=np.float64, order="C")  # the kernel is compiled for C-ordered arrays
    if s.ndim != 2 or s.shape[1] != packs.n_packs:
        msg = f"soc must have shape (D, {packs.n_packs}), got {s.shape}"
        raise EstimatorError(msg)
    d = s.shape[0]
    try:
        power = np.broadcast_to(np.asarray(power_w, dtype=np.float64), (d,))
    except ValueError as exc:
        msg = f"power_w must be one number or one per scenario ({d})"
        raise EstimatorError(msg) from exc
    runs = np.isfinite(power) & (power > 0.0)
    if not runs.all():
        out_nan = np.full(d, np.nan)
        if runs.any():
            out_nan[runs] = time_to_floor_s(
                packs, power[runs], s[runs], temp_c=temp_c, available=available, floor_soc=floor_soc, options=options
            )
        return out_nan
    t = packs._tables
    row = packs._row
    use = np.asarray(available, dtype=np.bool_) & np.isfinite(s)
    s = np.where(use, np.clip(s, 0.0, 1.0), 0.0)
    temp = np.broadcast_to(np.asarray(temp_c, dtype=np.float64), (packs.n_packs,))
    r_scale = packs._r_scale_ohm(temp)
    r_series = packs.series_r_ohm
    series = packs.series.astype(np.float64)
    v_min_pack = series * packs.v_min_cell_v
    i_max = packs.i_dis_max_a
    wh_per_v = np.where(use, series * packs.capacity_ah, 0.0)  # energy per unit of ∫OCV ds; 0 leaves a pack out
    soc_per_as = 1.0 / (packs.capacity_ah * _S_PER_H)
    floor = np.full(packs.n_packs, float(np.clip(floor_soc, 0.0, 1.0)))
    _, cum_floor = _ocv_and_cum(t, _locate(row, floor))
    _, cum_now = _ocv_and_cum(t, _locate(row, s))
    target = options.target_steps
    e0 = (np.clip(cum_now - cum_floor, 0.0, None) * wh_per_v).sum(axis=1)
    dt = np.clip(e0 * _S_PER_H / power / target, options.min_dt_s, max(options.horizon_s / target, options.min_dt_s))
    return _simulate(
        np.array(power),  # a writeable copy: numba compiles once per kind of array (read-only is another)
        s,
        dt,
        wh_per_v,
        row,
        cum_floor,
        r_scale,
        r_series,
        series,
        v_min_pack,
        i_max,
        soc_per_as,
        t.points,
        options.min_dt_s,
        options.horizon_s,
        options.shortfall_share,
        target + _MAX_EXTRA_STEPS,
    )


# ------------------------------------------------------------------------------------------------
# Site outlook
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class SiteOutlook:
    """The site's energy, SoC, runtime and ride-through with their P5/P95 bands.

    Attributes:
        pack_energy_kwh: per pack, energy to the floor at its SoC estimate, kWh (NaN where
            not available).
        pack_energy_kwh_p5: its 5th percentile, kWh.
        pack_energy_kwh_p95: its 95th percentile, kWh.
        energy_kwh: site energy to the floor, summed over the available packs, kWh.
        energy_kwh_p5: its 5th percentile, kWh.
        energy_kwh_p95: its 95th percentile, kWh.
        soc: site SoC, the mean of the available packs' SoC weighted by their energy
            capacity (``series x capacity x nominal voltage``), fraction (NaN if none).
        soc_p5: the same over the P5 scenario's SoC.
        soc_p95: the same over the P95 scenario's SoC.
        runtime_s_p5: time the packs can hold the present battery power, P5, s (None when
            the battery is not discharging or no pack is available; ``inf`` beyond the
            horizon).
        runtime_s_p50: the median, s.
        runtime_s_p95: the 95th percentile, s.
        ridethrough_s_p5: time the packs can carry the whole present load (grid lost), P5,
            s (None when there is no load or no pack is available).
        ridethrough_s_p50: the median, s.
        ridethrough_s_p95: the 95th percentile, s.
    """

    pack_energy_kwh: F64
    pack_energy_kwh_p5: F64
    pack_energy_kwh_p95: F64
    energy_kwh: float
    energy_kwh_p5: float
    energy_kwh_p95: float
    soc: float
    soc_p5: float
    soc_p95: float
    runtime_s_p5: float | None
    runtime_s_p50: float | None
    runtime_s_p95: float | None
    ridethrough_s_p5: float | None
    ridethrough_s_p50: float | None
    ridethrough_s_p95: float | None


def _readonly(a: F64) -> F64:
    a.flags.writeable = False
    return a


def _runtimes(
    packs: EnergyPacks,
    powers: tuple[float | None, float | None],
    scenarios: F64,
    temp_c: F64,
    available: B,
    options: OutlookOptions,
) -> tuple[tuple[float | None, float | None, float | None], ...]:
    """P5/P50/P95 times to the floor at each power (None where a power is None or not positive).

    The powers' scenarios are simulated side by side in one :func:`time_to_floor_s` call
    (each row as it would be alone, in half the steps of two calls); equal powers once.
    """
    valid = [w if w is not None and math.isfinite(w) and w > 0.0 and available.any() else None for w in powers]
    runs = sorted({w for w in valid if w is not None})
    d = scenarios.shape[0]
    bands: dict[float, tuple[float | None, float | None, float | None]] = {}
    if runs:
        found = time_to_floor_s(
            packs,
            np.repeat(np.array(runs, dtype=np.float64), d),
            np.concatenate([scenarios] * len(runs)),
            temp_c=temp_c,
            available=available,
            floor_soc=options.floor_soc,
            options=options,
        )
        for k, w in enumerate(runs):
            # The scenarios are ordered (every pack's SoC moves one way), so is the runtime;
            # sorting only removes step-size noise when the bands are narrower than a step.
            p5, p50, p95 = np.sort(found[k * d : (k + 1) * d]).tolist()
            bands[w] = (p5, p50, p95)
    return tuple(bands[w] if w is not None else (None, None, None) for w in valid)


def site_soc_weights(packs: EnergyPacks, use: B, capacity_ah: F64 | None = None) -> F64:
    """Each pack's weight in the site's SoC: its energy when full (series x capacity x nominal voltage), 0 if unused.

    Args:
        packs: the packs.
        use: packs that count (available, with an estimate).
        capacity_ah: capacities to use instead of ``packs.capacity_ah``.
    """
    q = packs.capacity_ah if capacity_ah is None else capacity_ah
    out: F64 = np.where(use, packs.series * q * packs._v_nominal_v, 0.0)
    return out


def site_outlook(
    packs: EnergyPacks,
    *,
    soc: F64,
    soc_std: F64,
    temp_c: F64,
    current_a: F64,
    available: B,
    battery_w: float | None,
    load_w: float | None,
    options: OutlookOptions = OutlookOptions(),
    soc_std_shared: F64 | None = None,
) -> SiteOutlook:
    """Return the site's energy, SoC, runtime and ride-through at P5/P50/P95.

    The bands come from a linearised error budget and three SoC scenarios, as the module
    docstring describes; deterministic, no sampling.

    Args:
        packs: the packs.
        soc: usable SoC estimate per pack, fraction (NaN: the pack is left out).
        soc_std: its standard deviation per pack, fraction (NaN counts as 0).
        temp_c: cell temperature per pack, °C (NaN is taken as 25 °C).
        current_a: present current per pack, A (the energy is drawn at it; NaN counts as 0).
        available: per pack, True if it takes part (online, contactor closed).
        battery_w: present battery power, W, positive on discharge (runtime; None: unknown).
        load_w: present site load, W (ride-through; None: unknown).
        options: floor, quantile, common SoC error and simulation control.
        soc_std_shared: the part of ``soc_std`` an error common to a chemistry's packs can
            cause (at most ``soc_std``; default all of it): only this part loads on the
            chemistry's common error, the rest is the pack's own (sensors, extreme cells).

    Returns:
        The outlook. Per-pack arrays are read-only.

    Examples:
        >>> import numpy as np
        >>> import polars as pl
        >>> meta = pl.DataFrame({"pack": ["a", "b"], "chemistry": ["nmc811", "lfp"],
        ...     "rated_capacity_ah": [300.0, 404.0], "series_cells": [96, 120]})
        >>> packs = EnergyPacks.from_meta(meta)
        >>> out = site_outlook(packs, soc=np.array([0.8, 0.7]), soc_std=np.array([0.02, 0.05]),
        ...     temp_c=np.full(2, 25.0), current_a=np.zeros(2), available=np.ones(2, dtype=bool),
        ...     battery_w=20_000.0, load_w=None)
        >>> out.energy_kwh_p5 < out.energy_kwh < out.energy_kwh_p95
        True
        >>> out.runtime_s_p5 < out.runtime_s_p50 < out.runtime_s_p95, out.ridethrough_s_p50
        (True, None)
    """
    n = packs.n_packs
    soc_a = np.broadcast_to(np.asarray(soc, dtype=np.float64), (n,))
    std = np.nan_to_num(np.broadcast_to(np.asarray(soc_std, dtype=np.float64), (n,)), nan=0.0)
    std = np.clip(std, 0.0, None)
    if soc_std_shared is None:
        shared = std
    else:
        shared = np.nan_to_num(np.broadcast_to(np.asarray(soc_std_shared, dtype=np.float64), (n,)), nan=0.0)
        shared = np.clip(shared, 0.0, std)
    temp = np.broadcast_to(np.asarray(temp_c, dtype=np.float64), (n,))
    current = np.nan_to_num(np.broadcast_to(np.asarray(current_a, dtype=np.float64), (n,)), nan=0.0)
    use = np.broadcast_to(np.asarray(available, dtype=np.bool_), (n,)) & np.isfinite(soc_a)
    z, kappa, floor = options.quantile_z, options.soc_error_correlation, options.floor_soc
    s = np.where(use, np.clip(soc_a, 0.0, 1.0), np.nan)

    # Per pack: energy at the estimate and at the SoC band's ends (one call, three rows).
    band = z * std
    # Row 0 at max(soc, floor): the same energy (zero below the floor), and the OCV and
    # resistance there give the slope dE/dsoc from above for a pack at or below the floor.
    stacked = np.stack([np.clip(s, floor, 1.0), np.clip(s - band, 0.0, 1.0), np.clip(s + band, 0.0, 1.0)])
    energies, ocv, rsoc, r_scale = _energy_parts(packs, stacked, np.asarray(floor), temp, current)
    e, e_lo, e_hi = energies
    q = packs.capacity_ah
    cap_err = z * e * packs.capacity_rel_std
    pack_p5 = np.clip(e - np.hypot(e - e_lo, cap_err), 0.0, None)
    pack_p95 = e + np.hypot(e_hi - e, cap_err)

    # The site's error budget, with the exact dE/dsoc = Q (series OCV - |I| R_pack).
    r_pack = r_scale[0] * rsoc[0] + packs.series_r_ohm
    g = np.where(use, np.clip(q * (packs.series * ocv[0] - np.abs(current) * r_pack), 0.0, None), 0.0)
    e0 = np.where(use, e, 0.0)
    rho = options.capacity_error_correlation
    a = e0 * packs.capacity_rel_std
    b = np.where(use, g * std, 0.0)
    m = np.where(use, g * shared, 0.0)  # the part that can be common
    var_indep = b * b - (kappa * m) ** 2 + (1.0 - rho * rho) * a * a
    # The common errors, one per chemistry: each pack's covariance with its chemistry's sum.
    chem = packs._row // GRID_POINTS
    b_common = np.bincount(chem, weights=kappa * m, minlength=len(packs._tables.chemistries))[chem]
    a_common = np.bincount(chem, weights=rho * a, minlength=len(packs._tables.chemistries))[chem]
    share = var_indep + kappa * m * b_common + rho * a * a_common
    var = float(share.sum())
    sigma = math.sqrt(var)
    total = float(e0.sum())
    # Each pack's SoC shift that moves the site energy by z sigma: its share of the variance.
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(use & (g > 0.0) & (var > 0.0), z * sigma * share / (var * g), 0.0)
    scenarios = np.stack([np.clip(s - shift, 0.0, 1.0), s, np.clip(s + shift, 0.0, 1.0)])

    weight = site_soc_weights(packs, use)
    w_sum = float(weight.sum())
    if w_sum > 0.0:
        site_soc = (np.where(use, scenarios, 0.0) * weight).sum(axis=1) / w_sum
        soc_p5, soc_p50, soc_p95 = (float(x) for x in site_soc)
    else:
        soc_p5 = soc_p50 = soc_p95 = math.nan
    runtime, ride = _runtimes(packs, (battery_w, load_w), scenarios, temp, use, options)
    return SiteOutlook(
        pack_energy_kwh=_readonly(np.where(use, e / _WH_PER_KWH, np.nan)),
        pack_energy_kwh_p5=_readonly(np.where(use, pack_p5 / _WH_PER_KWH, np.nan)),
        pack_energy_kwh_p95=_readonly(np.where(use, pack_p95 / _WH_PER_KWH, np.nan)),
        energy_kwh=total / _WH_PER_KWH,
        energy_kwh_p5=max(total - z * sigma, 0.0) / _WH_PER_KWH,
        energy_kwh_p95=(total + z * sigma) / _WH_PER_KWH,
        soc=soc_p50,
        soc_p5=soc_p5,
        soc_p95=soc_p95,
        runtime_s_p5=runtime[0],
        runtime_s_p50=runtime[1],
        runtime_s_p95=runtime[2],
        ridethrough_s_p5=ride[0],
        ridethrough_s_p50=ride[1],
        ridethrough_s_p95=ride[2],
    )
