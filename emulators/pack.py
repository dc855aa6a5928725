"""Pack physics for the whole fleet at once: equivalent circuit, hysteresis, heat, limits.

Every pack is a string of ``series`` cell groups (``parallel`` cells each, lumped), held as
rows of 2-D numpy arrays ``(n_packs, max_series)``; packs with fewer groups are padded and
masked. One :meth:`PackBank.step` advances every cell of every pack by ``dt_s`` with a
fixed number of numpy operations: there is no Python loop over packs or cells.

Per cell group *i* of pack *p* (current positive on discharge)::

    soc_i'   = -I_eff / (3600 Q_i)                     I_eff = I on discharge, η·I on charge
    i_f'     = (I - i_f) / τ                           one RC pair, shared time constant per pack
    h'       = -γ |I| / Q (h + sign I)                 LFP hysteresis state in [-1, 1] (Plett 2004)
    v_i      = OCV(soc_i) + H(soc_i)·h - R0_i(T, soc_i)·I - R1_i(T, soc_i)·i_f
    m cp T'  = I² R + I T dU/dT - hA (T - T_env)       lumped per pack

``R0_i = r0_ohm_ah / Q_rated · soc_factor(soc_i) · arrhenius(T) · r_cell_i · r_growth_p``,
so cells of one pack differ in capacity, resistance and initial SoC, their voltages spread
realistically, and the weakest cell sets the pack's limits: the BMS's current limit is the
largest current that keeps every cell inside [v_min, v_max].

The RC and hysteresis states are per pack rather than per cell: with one time constant per
pack, ``v1_i = R1_i · i_f`` is exact for a series string (all cells carry the same current),
and the hysteresis state is normalised, its amplitude ``H(soc_i)`` being per cell.

References:
    Plett, G. L. (2004). Extended Kalman filtering for battery management systems of
    LiPB-based HEV battery packs, Part 2. J. Power Sources 134, 262-276 (hysteresis model).
    Parameters per chemistry: :mod:`twin.chemistry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from twin.chemistry import CellChemistry

__all__ = ["GRID_POINTS", "ChemistryTables", "PackBank", "PackParams", "StepResult"]

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
B = NDArray[np.bool_]

GRID_POINTS: Final = 1001
_R_GAS: Final = 8.314462618
_T_REF_K: Final = 298.15
_KELVIN: Final = 273.15
#: Connector, busbar and contactor resistance as a share of the string's cell resistance
#: (Kona packs: 2.9-4.3 % of pack R_ohm; Fischer et al. 2026, in BATTERY_NOTES 1.2).
CONNECTOR_SHARE: Final = 0.035


@dataclass(frozen=True, slots=True)
class ChemistryTables:
    """The fleet's chemistries resampled on one uniform SoC grid, stacked for gathers.

    A cell's table value is ``table[chem_row + k]`` interpolated, with ``k`` from its SoC,
    so cells of every chemistry are looked up in one vectorised gather.
    """

    chemistries: tuple[CellChemistry, ...]
    ocv_v: F64  # (n_chem * GRID_POINTS,)
    ocv_slope: F64
    hyst_v: F64
    hyst_slope: F64
    rsoc: F64
    rsoc_slope: F64
    entropic_v_per_k: F64
    cum_energy_vh: F64  # ∫_0^soc OCV ds, for energy to a floor

    @classmethod
    def build(cls, chemistries: Sequence[CellChemistry]) -> ChemistryTables:
        """Tabulate every chemistry on the common grid."""
        grid = np.linspace(0.0, 1.0, GRID_POINTS)
        step = grid[1] - grid[0]

        def stack(values: list[F64]) -> tuple[F64, F64]:
            table = np.concatenate(values)
            slope = np.concatenate([np.append(np.diff(v) / step, 0.0) for v in values])
            return table, slope

        ocv, ocv_slope = stack([np.asarray(c.ocv(grid), dtype=np.float64) for c in chemistries])
        hyst, hyst_slope = stack([np.asarray(c.hysteresis_v(grid), dtype=np.float64) for c in chemistries])
        rsoc, rsoc_slope = stack([np.asarray(c.soc_factor(grid), dtype=np.float64) for c in chemistries])
        entropic = np.concatenate([np.asarray(c.entropic(grid), dtype=np.float64) for c in chemistries])
        cum = []
        for c in chemistries:
            v = np.asarray(c.ocv(grid), dtype=np.float64)
            cum.append(np.concatenate([[0.0], np.cumsum((v[1:] + v[:-1]) * 0.5 * step)]))
        return cls(
            chemistries=tuple(chemistries),
            ocv_v=ocv,
            ocv_slope=ocv_slope,
            hyst_v=hyst,
            hyst_slope=hyst_slope,
            rsoc=rsoc,
            rsoc_slope=rsoc_slope,
            entropic_v_per_k=entropic,
            cum_energy_vh=np.concatenate(cum),
        )


def _lookup(table: F64, slope: F64, index: I64, frac: F64) -> F64:
    """Interpolate a stacked table at precomputed grid indices (``frac`` in grid steps)."""
    out: F64 = table[index] + slope[index] * frac
    return out


@dataclass(frozen=True, slots=True)
class PackParams:
    """Static parameters of every pack and cell group (true values: the emulator's, never the twin's).

    Shapes: ``(P,)`` per pack, ``(P, S)`` per cell group, with ``S`` the largest series count.
    """

    chem_index: I64  # (P,) row of the pack's chemistry in the tables
    series: I64  # (P,)
    parallel: I64  # (P,)
    rated_group_ah: F64  # (P,) rated capacity of one cell group (cell Ah x parallel)
    capacity_ah: F64  # (P, S) true capacity of each cell group at the start
    r_cell: F64  # (P, S) resistance multiplier of each group (spread, SoH correlation)
    soc0: F64  # (P, S) initial SoC of each group
    mask: B  # (P, S) True where a modelled cell group exists
    weight: F64  # (P, S) how many series cell groups each modelled group stands for (0 on padding)
    i_dis_max_a: F64  # (P,) rated discharge current
    i_chg_max_a: F64  # (P,) rated charge current
    tables: ChemistryTables
    cooling_ua_w_per_k_per_ah: float = 0.0  # extra forced-air cooling, per rated pack Ah
    _derived: dict[str, F64] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Check shapes and derive per-pack chemistry constants."""
        n, s = self.capacity_ah.shape
        for name in ("r_cell", "soc0", "mask", "weight"):
            if getattr(self, name).shape != (n, s):
                msg = f"{name} has shape {getattr(self, name).shape}, expected {(n, s)}"
                raise ValueError(msg)
        if not np.allclose(self.weight.sum(axis=1), self.series) or np.any(self.weight[~self.mask] != 0):
            msg = "weights do not add up to the series counts"
            raise ValueError(msg)
        chems = self.tables.chemistries
        ci = self.chem_index

        def per_pack(attr: str) -> F64:
            return np.array([getattr(c, attr) for c in chems], dtype=np.float64)[ci]

        pack_ah = self.rated_group_ah * self.series  # Ah x cells: the thermal mass scales with it
        d = self._derived
        d["r0_ref"] = per_pack("r0_ohm_ah") / self.rated_group_ah
        d["r1_ref"] = per_pack("r1_ohm_ah") / self.rated_group_ah
        d["tau_s"] = per_pack("tau1_s")
        d["ea"] = per_pack("activation_energy_j_per_mol")
        d["eta"] = per_pack("coulombic_efficiency")
        d["v_min"] = per_pack("v_min_v")
        d["v_max"] = per_pack("v_max_v")
        d["v_nom"] = per_pack("v_nominal_v") * self.series
        d["gamma"] = per_pack("hyst_rate_per_as")
        d["i_dis_max"] = np.minimum(self.i_dis_max_a, per_pack("max_discharge_c") * self.rated_group_ah)
        d["i_chg_max"] = np.minimum(self.i_chg_max_a, per_pack("max_charge_c") * self.rated_group_ah)
        d["heat_cap_j_per_k"] = per_pack("mass_kg_per_ah") * per_pack("cp_j_per_kg_k") * pack_ah
        d["ua_w_per_k"] = (
            per_pack("h_w_per_m2_k") * per_pack("area_m2_per_ah") + self.cooling_ua_w_per_k_per_ah
        ) * pack_ah
        d["row"] = (ci * GRID_POINTS).astype(np.float64)

    @property
    def n_packs(self) -> int:
        """Number of packs."""
        return int(self.capacity_ah.shape[0])

    def derived(self, name: str) -> F64:
        """A per-pack constant derived from the chemistry (``r0_ref``, ``v_min``, ...)."""
        return self._derived[name]


@dataclass(slots=True)
class StepResult:
    """What one step produced, per pack (true values; sensors are applied elsewhere)."""

    current_a: F64
    voltage_v: F64
    cell_v_min_v: F64
    cell_v_max_v: F64
    cell_v_min_idx: I64
    cell_v_max_idx: I64
    temp_c: F64
    heat_w: F64
    max_discharge_a: F64
    max_charge_a: F64


class PackBank:
    """The state of every pack and cell group, advanced together.

    The per-cell work of a step is a fixed, small number of numpy passes over ``(P, S)``
    arrays: the SoC update, one OCV lookup, the open-circuit and terminal voltages, and the
    reductions for the weakest and strongest cell. What varies little between the cells of
    one string (the SoC shape of the resistance, the hysteresis amplitude, the entropic
    coefficient) is evaluated at the string's mean SoC, once per pack.

    Args:
        params: the fleet's true parameters.
        temp_c: initial pack temperatures (P,).

    Examples:
        >>> import numpy as np
        >>> from twin.chemistry import get_chemistry
        >>> tables = ChemistryTables.build([get_chemistry("nmc811")])
        >>> shape = (2, 4)
        >>> params = PackParams(
        ...     chem_index=np.zeros(2, dtype=np.int64), series=np.full(2, 4), parallel=np.ones(2, dtype=np.int64),
        ...     rated_group_ah=np.full(2, 100.0), capacity_ah=np.full(shape, 100.0), r_cell=np.ones(shape),
        ...     soc0=np.full(shape, 0.8), mask=np.ones(shape, dtype=bool), weight=np.ones(shape),
        ...     i_dis_max_a=np.full(2, 200.0), i_chg_max_a=np.full(2, 100.0), tables=tables)
        >>> bank = PackBank(params, temp_c=np.full(2, 25.0))
        >>> result = bank.step(np.array([0.0, 1000.0]), np.full(2, 25.0), dt_s=1.0)
        >>> bool(result.current_a[1] > 0 and result.voltage_v[1] < result.voltage_v[0])
        True
    """

    def __init__(self, params: PackParams, *, temp_c: F64) -> None:
        self.params = params
        p = params
        n = p.n_packs
        self.soc: F64 = np.where(p.mask, p.soc0, 0.5).astype(np.float64)
        self.capacity_ah: F64 = np.where(p.mask, p.capacity_ah, 1.0).astype(np.float64)
        self.r_cell: F64 = np.where(p.mask, p.r_cell, 1.0).astype(np.float64)
        self.r_growth: F64 = np.ones(n)
        self.i_filtered: F64 = np.zeros(n)
        self.hyst: F64 = np.zeros(n)
        self.temp_c: F64 = np.asarray(temp_c, dtype=np.float64).copy()
        self.extra_heat_w: F64 = np.zeros(n)
        self.contactor_closed: B = np.ones(n, dtype=bool)
        self._row = (p.chem_index * GRID_POINTS)[:, None]
        self._pad_low = np.where(p.mask, 0.0, np.inf)
        self._pad_high = np.where(p.mask, 0.0, -np.inf)
        self._inv_series = 1.0 / p.series
        self._last: StepResult | None = None
        self._cells_changed()
        self._refresh()
        self._cells_v: F64 = self._voc.copy()

    # ------------------------------------------------------------------ internals

    def _cells_changed(self) -> None:
        """Recompute what depends on the cells' capacity and resistance (after aging or a fault)."""
        w = self.params.weight
        self._inv_cap = np.where(self.params.mask, 1.0 / self.capacity_ah, 0.0)
        self._inv_r_cell = 1.0 / self.r_cell
        self._r_cell_sum = (self.r_cell * w).sum(axis=1)

    def _pack_lookup(self, table: F64, slope: F64, soc: F64) -> F64:
        x = np.clip(soc, 0.0, 1.0) * (GRID_POINTS - 1)
        k = np.minimum(x.astype(np.int64), GRID_POINTS - 2)
        i = k + self._row[:, 0]
        out: F64 = table[i] + slope[i] * ((x - k) / (GRID_POINTS - 1))
        return out

    def _refresh(self) -> None:
        """Recompute the open-circuit voltages, resistances and limits from the state."""
        p, t = self.params, self.params.tables
        soc = self.soc
        self._soc_mean = (soc * p.weight).sum(axis=1) * self._inv_series
        # One OCV lookup per cell group.
        x = np.clip(soc, 0.0, 1.0)
        x *= GRID_POINTS - 1
        k = x.astype(np.int64)
        np.minimum(k, GRID_POINTS - 2, out=k)
        x -= k
        x *= 1.0 / (GRID_POINTS - 1)
        k += self._row
        ocv = t.ocv_v[k]
        ocv += t.ocv_slope[k] * x
        # Per pack: resistance scale and the hysteresis and RC terms.
        rsoc = self._pack_lookup(t.rsoc, t.rsoc_slope, self._soc_mean)
        t_k = self.temp_c + _KELVIN
        arr = np.exp(p.derived("ea") / _R_GAS * (1.0 / t_k - 1.0 / _T_REF_K))
        scale = rsoc * arr * self.r_growth
        self._k0 = p.derived("r0_ref") * scale
        self._k1 = p.derived("r1_ref") * scale
        hyst_v = self._pack_lookup(t.hyst_v, t.hyst_slope, self._soc_mean) * self.hyst
        ocv -= (self._k1 * self.i_filtered)[:, None] * self.r_cell
        ocv += hyst_v[:, None]
        self._voc = ocv
        self._voc_pack = (ocv * p.weight).sum(axis=1)
        self._r_pack = self._k0 * self._r_cell_sum * (1.0 + CONNECTOR_SHARE)
        # BMS limits: the largest current keeping every cell inside [v_min, v_max].
        r_conn = 1.0 / (self._k0 * (1.0 + CONNECTOR_SHARE))
        head_dis = ((ocv - p.derived("v_min")[:, None]) * self._inv_r_cell + self._pad_low).min(axis=1) * r_conn
        head_chg = ((p.derived("v_max")[:, None] - ocv) * self._inv_r_cell + self._pad_low).min(axis=1) * r_conn
        derate = np.clip(self.temp_c / 10.0, 0.0, 1.0) * np.clip((55.0 - self.temp_c) / 10.0, 0.0, 1.0)
        closed = self.contactor_closed
        self._i_dis = np.where(closed, np.clip(np.minimum(head_dis, p.derived("i_dis_max")), 0.0, None), 0.0)
        self._i_chg = np.where(
            closed, np.clip(np.minimum(head_chg, p.derived("i_chg_max") * derate), 0.0, None), 0.0
        )

    # ------------------------------------------------------------------ public

    def limits(self) -> tuple[F64, F64]:
        """Return the BMS's present current limits (discharge, charge), A, both >= 0.

        The largest current that keeps every cell group inside [v_min, v_max], capped by the
        pack's rated currents; zero for packs whose contactor is open. Charging is derated
        below 10 °C and above 45 °C (lithium plating, SEI growth).
        """
        return self._i_dis, self._i_chg

    def open_circuit_v(self) -> F64:
        """Return each pack's open-circuit voltage including the RC and hysteresis terms (V)."""
        return self._voc_pack

    def resistance_ohm(self) -> F64:
        """Return each pack's present ohmic resistance (cells plus connectors), Ω."""
        return self._r_pack

    def resistance_ohm_at(self, temp_c: float = 25.0, soc: float = 0.5) -> F64:
        """Return each pack's ohmic resistance at a reference temperature and SoC (Ω)."""
        p, t = self.params, self.params.tables
        rsoc = self._pack_lookup(t.rsoc, t.rsoc_slope, np.full(p.n_packs, soc))
        arr = np.exp(p.derived("ea") / _R_GAS * (1.0 / (temp_c + _KELVIN) - 1.0 / _T_REF_K))
        out: F64 = p.derived("r0_ref") * rsoc * arr * self.r_growth * self._r_cell_sum * (1.0 + CONNECTOR_SHARE)
        return out

    def power_limits_w(self) -> tuple[F64, F64]:
        """Return the largest discharge and charge power each pack can take now (W, >= 0)."""
        i_dis, i_chg = self._i_dis, self._i_chg
        voc, r = self._voc_pack, self._r_pack
        return i_dis * np.maximum(voc - i_dis * r, 0.0), i_chg * (voc + i_chg * r)

    def current_for_power(self, power_w: F64) -> F64:
        """Solve ``P = I (Voc - I R)`` for the current of each pack, within the BMS limits."""
        voc, r = self._voc_pack, self._r_pack
        disc = np.maximum(voc * voc - 4.0 * r * power_w, 0.0)
        current = (voc - np.sqrt(disc)) / (2.0 * r)
        out: F64 = np.clip(current, -self._i_chg, self._i_dis)
        return out

    def step(self, power_w: F64, env_temp_c: F64, *, dt_s: float) -> StepResult:
        """Advance every pack by ``dt_s`` at the requested power (W, positive = discharge).

        The power is converted to current against the present state and clipped to the
        BMS limits; the result says what the packs actually did.
        """
        current = self.current_for_power(np.where(self.contactor_closed, power_w, 0.0))
        return self.step_current(current, env_temp_c, dt_s=dt_s)

    def step_current(self, current_a: F64, env_temp_c: F64, *, dt_s: float) -> StepResult:
        """Advance every pack by ``dt_s`` at a given current (A, positive = discharge).

        Unlike :meth:`step`, the current is not clipped to the BMS limits: this is how a
        cycler drives a cell (used to validate the model against measured data).
        """
        p = self.params
        current = np.asarray(current_a, dtype=np.float64)
        # Terminal voltages at the start of the step with this step's current (what a BMS samples).
        cells = self._voc - (self._k0 * current)[:, None] * self.r_cell
        self._cells_v = cells
        v_min_idx = (cells + self._pad_low).argmin(axis=1)
        v_max_idx = (cells + self._pad_high).argmax(axis=1)
        rows = np.arange(p.n_packs)
        voltage = self._voc_pack - current * self._r_pack

        # Charge: coulombic efficiency applies to charging current only.
        eff = np.where(current < 0.0, p.derived("eta") * current, current)
        self.soc -= (eff * (dt_s / 3600.0))[:, None] * self._inv_cap
        self.i_filtered += (current - self.i_filtered) * (1.0 - np.exp(-dt_s / p.derived("tau_s")))
        pack_q = self._pack_q()
        decay = 1.0 - np.exp(-p.derived("gamma") * np.abs(current) * dt_s / pack_q)
        self.hyst -= decay * (self.hyst + np.sign(current))

        # Heat: Joule loss (ohmic and RC), reversible heat, injected fault heat; convection.
        t = p.tables
        entropic = self._pack_lookup(t.entropic_v_per_k, np.zeros_like(t.entropic_v_per_k), self._soc_mean)
        t_k = self.temp_c + _KELVIN
        r1_pack = self._k1 * self._r_cell_sum
        heat = (
            current * current * self._r_pack
            + self.i_filtered**2 * r1_pack
            - current * t_k * entropic * p.series  # reversible heat (Bernardi), I > 0 on discharge
            + self.extra_heat_w
        )
        loss = p.derived("ua_w_per_k") * (self.temp_c - env_temp_c)
        self.temp_c += (heat - loss) * dt_s / p.derived("heat_cap_j_per_k")

        self._refresh()
        result = StepResult(
            current_a=current,
            voltage_v=voltage,
            cell_v_min_v=cells[rows, v_min_idx],
            cell_v_max_v=cells[rows, v_max_idx],
            cell_v_min_idx=v_min_idx,
            cell_v_max_idx=v_max_idx,
            temp_c=self.temp_c.copy(),
            heat_w=heat,
            max_discharge_a=self._i_dis,
            max_charge_a=self._i_chg,
        )
        self._last = result
        return result

    def _pack_q(self) -> F64:
        if not hasattr(self, "_pack_q_cache"):
            self._pack_q_cache: F64 = (self.capacity_ah * self.params.weight).sum(axis=1) * self._inv_series
        return self._pack_q_cache

    def cell_voltages(self) -> F64:
        """Return every cell group's terminal voltage at the last step, (P, S); padding is NaN."""
        out: F64 = np.where(self.params.mask, self._cells_v, np.nan)
        return out

    def string_charge_ah(self) -> tuple[F64, F64]:
        """Return the charge (Ah) each string can still give and still take before a cell hits a limit."""
        soc = np.clip(self.soc, 0.0, 1.0)
        held = soc * self.capacity_ah
        q_low: F64 = (held + self._pad_low).min(axis=1)
        held -= self.capacity_ah
        q_high: F64 = -(held - self._pad_low).max(axis=1)
        return q_low, q_high

    def pack_soc(self) -> F64:
        """Return each pack's usable SoC: what the weakest-limited string can still deliver.

        The string is empty when its lowest cell is empty and full when its fullest cell is
        full, so the usable SoC is ``q_low / (q_low + q_high)``, with ``q_low`` the charge the
        string can still give and ``q_high`` the charge it can still take.
        """
        q_low, q_high = self.string_charge_ah()
        total = q_low + q_high
        out: F64 = np.where(total > 0, q_low / np.where(total > 0, total, 1.0), 0.0)
        return out

    def pack_capacity_ah(self) -> F64:
        """Return each string's usable capacity (Ah): charge between the empty and full limits."""
        q_low, q_high = self.string_charge_ah()
        out: F64 = q_low + q_high
        return out

    def energy_to_floor_wh(self, floor_soc: float, current_a: F64 | None = None) -> F64:
        """Return each pack's true energy (Wh) until its usable SoC reaches ``floor_soc``.

        The string gives ``q_low - floor * (q_low + q_high)`` Ah before its usable SoC reaches
        the floor; every cell's OCV is integrated over the SoC it gives up meanwhile, less the
        ohmic loss at ``current_a`` (default: the last step's current) over that discharge.
        """
        p, t = self.params, self.params.tables
        q_low, q_high = self.string_charge_ah()
        ah = np.clip(q_low - floor_soc * (q_low + q_high), 0.0, None)
        soc = np.clip(self.soc, 0.0, 1.0)
        end = np.clip(soc - ah[:, None] * self._inv_cap, 0.0, 1.0)

        def cum(x: F64) -> F64:
            pos = x * (GRID_POINTS - 1)
            k = np.minimum(pos.astype(np.int64), GRID_POINTS - 2)
            i = k + self._row
            lo, hi = t.cum_energy_vh[i], t.cum_energy_vh[i + 1]
            out: F64 = lo + (hi - lo) * (pos - k)
            return out

        wh = ((cum(soc) - cum(end)) * self.capacity_ah * p.weight).sum(axis=1)
        if current_a is None:
            current_a = self._last.current_a if self._last is not None else np.zeros(p.n_packs)
        i = np.abs(current_a)
        hours = np.where(i > 0, ah / np.where(i > 0, i, 1.0), 0.0)
        out: F64 = np.clip(wh - i * i * self._r_pack * hours, 0.0, None)
        return out

    def apply_aging(self, capacity_ratio: F64, r_growth: F64) -> None:
        """Scale every cell group's capacity by ``capacity_ratio`` (P,) or (P, S); set resistance growth (P,)."""
        ratio = np.asarray(capacity_ratio, dtype=np.float64)
        self.capacity_ah *= ratio if ratio.ndim == 2 else ratio[:, None]
        self.r_growth = np.asarray(r_growth, dtype=np.float64).copy()
        self._invalidate()

    def set_cell(self, pack: int, group: int, *, capacity_factor: float = 1.0, resistance_factor: float = 1.0) -> None:
        """Change one cell group's capacity and resistance (a weak-cell fault)."""
        self.capacity_ah[pack, group] *= capacity_factor
        self.r_cell[pack, group] *= resistance_factor
        self._invalidate()

    def _invalidate(self) -> None:
        if hasattr(self, "_pack_q_cache"):
            del self._pack_q_cache
        self._cells_changed()
        self._refresh()
