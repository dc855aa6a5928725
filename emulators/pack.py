"""Pack physics for the whole fleet at once: equivalent circuit, hysteresis, heat, limits.

Every pack is a string of ``series`` cell groups (``parallel`` cells each, lumped), held as
rows of 2-D numpy arrays ``(n_packs, max_series)``; packs with fewer groups are padded and
masked. One :meth:`PackBank.step` advances every cell of every pack by ``dt_s`` with a
fixed number of numpy operations: there is no Python loop over packs or cells.

Per cell group *i* of pack *p* (current positive on discharge)::

    soc_i'   = -I_eff / (3600 Q_i)                     I_eff = I on discharge, η·I on charge
    i_f1'    = (I - i_f1) / τ1                         fast RC pair, time constant per pack
    i_f2'    = (I - i_f2) / τ2                         slow RC pair (R2 = 0 for one-RC chemistries)
    h'       = -γ |I| / Q (h + sign I)                 LFP hysteresis state in [-1, 1] (Plett 2004)
    v_i      = OCV(soc_i) + H(soc_i)·h - R0_i·I - R1_i·i_f1 - R2_i·i_f2
    m cp T'  = I² R + i_f1² R1 + i_f2² R2 + I T dU/dT - hA (T - T_env)     lumped per pack

``R0_i = r0_ohm_ah / Q_rated · soc_factor(soc_i) · temp_factor(T) · r_cell_i · r_growth_p``
(likewise ``R1_i``, ``R2_i``; ``temp_factor`` is the chemistry's, Arrhenius or its measured
table),
so cells of one pack differ in capacity, resistance and initial SoC, their voltages spread
realistically, and the weakest cell sets the pack's limits: the BMS's current limit is the
largest current that keeps every cell inside [v_min, v_max].

The RC and hysteresis states are per pack rather than per cell: with one time constant per
pair and pack, ``v_rc,i = (k1 · i_f1 + k2 · i_f2) · r_cell_i`` is exact for a series string
(all cells carry the same current; ``k1``, ``k2`` are the pairs' resistances per unit cell
multiplier), and the hysteresis state is normalised, its amplitude ``H(soc_i)`` being per cell.

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
    def build(cls, chemistries: Sequence[CellChemistry], ocv_error_v: Sequence[F64] | None = None) -> ChemistryTables:
        """Tabulate every chemistry on the common grid.

        ``ocv_error_v``: per chemistry, the real cells' OCV minus the table's on the grid
        (:func:`ocv_deviation`); none by default.
        """
        grid = np.linspace(0.0, 1.0, GRID_POINTS)
        step = grid[1] - grid[0]
        error = [np.zeros(GRID_POINTS)] * len(chemistries) if ocv_error_v is None else list(ocv_error_v)
        if len(error) != len(chemistries) or any(np.shape(e) != (GRID_POINTS,) for e in error):
            msg = f"ocv_error_v needs one array of {GRID_POINTS} values per chemistry"
            raise ValueError(msg)

        def stack(values: list[F64]) -> tuple[F64, F64]:
            table = np.concatenate(values)
            slope = np.concatenate([np.append(np.diff(v) / step, 0.0) for v in values])
            return table, slope

        true_ocv = [np.asarray(c.ocv(grid), dtype=np.float64) + e for c, e in zip(chemistries, error, strict=True)]
        ocv, ocv_slope = stack(true_ocv)
        hyst, hyst_slope = stack([np.asarray(c.hysteresis_v(grid), dtype=np.float64) for c in chemistries])
        rsoc, rsoc_slope = stack([np.asarray(c.soc_factor(grid), dtype=np.float64) for c in chemistries])
        entropic = np.concatenate([np.asarray(c.entropic(grid), dtype=np.float64) for c in chemistries])
        cum = []
        for v in true_ocv:
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


def ocv_deviation(rms_v: float, rng: np.random.Generator, terms: int = 4) -> F64:
    """A smooth OCV deviation on the grid with RMS ``rms_v``: ``terms`` sines and cosines of SoC.

    Its coefficients are standard normal, their amplitude falling as ``1/k`` (smooth, as a
    table measured on other cells differs); zero for ``rms_v`` 0 (the generator untouched).
    """
    if rms_v <= 0.0:
        return np.zeros(GRID_POINTS)
    s = np.linspace(0.0, 1.0, GRID_POINTS)
    k = np.arange(1, terms + 1)[:, None]
    a, b = rng.standard_normal((2, terms, 1)) / k
    curve: F64 = (a * np.sin(np.pi * k * s) + b * np.cos(np.pi * k * s)).sum(axis=0)
    curve *= rms_v / float(np.sqrt(np.mean(curve * curve)))
    return curve


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
        d["r2_ref"] = per_pack("r2_ohm_ah") / self.rated_group_ah
        d["tau2_s"] = per_pack("tau2_s")
        d["ea"] = per_pack("activation_energy_j_per_mol")
        # The temperature factor as hinges in u = 1/T - 1/T_ref (CellChemistry.temp_factor_hinges):
        # ln f = const + slope*u + sum_j change_j*max(u - knot_j, 0), padded with zero changes.
        hinges = [c.temp_factor_hinges() for c in chems]
        n_knots = max((h[2].size for h in hinges), default=0)
        knots = np.zeros((len(chems), n_knots))
        changes = np.zeros((len(chems), n_knots))
        for row, (_, _, k, ch) in enumerate(hinges):
            knots[row, : k.size], changes[row, : ch.size] = k, ch
        d["tf_const"] = np.array([h[0] for h in hinges], dtype=np.float64)[ci]
        d["tf_slope"] = np.array([h[1] for h in hinges], dtype=np.float64)[ci]
        d["tf_knots"] = knots[ci]  # (P, J)
        d["tf_changes"] = changes[ci]  # (P, J)
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


#: The OCV that padded cells hold in the work arrays (relative, float32-safe): with the signs
#: chosen below it never wins a reduction over a string's cells.
_PAD_V: Final = 1e30


def _padding_runs(mask: B, max_runs: int = 16) -> tuple[tuple[int, int, int], ...] | None:
    """The padding as ``(first_row, stop_row, first_padded_column)`` runs of consecutive packs.

    ``None`` when a mask row is not a prefix or there are more than ``max_runs`` runs (the
    padding is then addressed through the mask).
    """
    n, s = mask.shape
    counts = mask.sum(axis=1)
    if n == 0 or not np.array_equal(mask, np.arange(s)[None, :] < counts[:, None]):
        return None
    cuts = (np.flatnonzero(np.diff(counts)) + 1).tolist()
    if len(cuts) + 1 > max_runs:
        return None
    starts, stops = [0, *cuts], [*cuts, n]
    return tuple((a, b, int(counts[a])) for a, b in zip(starts, stops, strict=True) if counts[a] < s)


class PackBank:
    """The state of every pack and cell group, advanced together.

    The per-cell work of a step is a fixed, small number of numpy passes over ``(P, S)``
    arrays: one OCV lookup, the terminal voltages and the reductions for the weakest and
    strongest cell, and the two reductions for the BMS limits. What varies little between
    the cells of one string (the SoC shape of the resistance, the hysteresis amplitude, the
    entropic coefficient) is evaluated at the string's mean SoC, once per pack.

    How the hot path stays cheap (the physics is that of the module docstring):

    * Charge is integrated per pack, in float64: every cell of a series string passes the
      same current, so cell *i* holds ``soc_i = soc_base_i - ah_p / Q_i``, with ``ah_p``
      the charge the string has given since the last *rebase* (at the start, and whenever
      capacities change). The string's charge limits, its mean SoC and the usable SoC are
      then per-pack formulas, with no pass over the cells.
    * The OCV table index of each cell moves by a grid step only every few tens of steps,
      so the table value and slope at the index are kept per cell and gathered again only
      for the cells that crossed a grid point.
    * Per-cell voltages are held in float32, relative to a per-chemistry reference voltage
      (±1 V, so about 1e-7 V resolution); pack sums, SoC and every per-pack quantity are
      float64. The winners of the per-cell reductions are re-evaluated in float64.
    * Padded cells hold an OCV of ``_PAD_V`` (and, before a maximum, ``-_PAD_V``), so the
      reductions run over whole contiguous rows with no masking pass.
    * Work arrays are allocated once; the numpy calls write into them (``out=``), so a step
      allocates no ``(P, S)`` temporaries (each costs page faults at this size).

    Attributes such as ``soc``, ``capacity_ah``, ``r_cell``, ``r_growth``, ``i_filtered``,
    ``i_filtered2``, ``hyst``, ``temp_c`` may be changed between steps; call :meth:`_invalidate` afterwards
    so that the voltages and limits follow (writes to ``soc`` are also noticed at the next
    step, as before).

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
        >>> bool(np.allclose(bank.soc[1], 0.8 - result.current_a[1] / 3600 / 100))
        True
    """

    #: dtype of the per-cell voltage work arrays (float32 halves the memory traffic).
    _CELL_DTYPE: type[np.floating] = np.float32

    def __init__(self, params: PackParams, *, temp_c: F64) -> None:
        self.params = params
        p = params
        n = p.n_packs
        self.capacity_ah: F64 = np.where(p.mask, p.capacity_ah, 1.0).astype(np.float64)
        self.r_cell: F64 = np.where(p.mask, p.r_cell, 1.0).astype(np.float64)
        self.r_growth: F64 = np.ones(n)
        self.i_filtered: F64 = np.zeros(n)  # current through the fast RC pair
        self.i_filtered2: F64 = np.zeros(n)  # ... and through the slow one
        self.hyst: F64 = np.zeros(n)
        self.temp_c: F64 = np.asarray(temp_c, dtype=np.float64).copy()
        self.extra_heat_w: F64 = np.zeros(n)
        self.contactor_closed: B = np.ones(n, dtype=bool)
        self._init_constants()
        self._init_work()
        # Charge state: soc = soc_base - ah / Q per cell (pads stay at 0.5, 1 / Q = 0 there).
        self._soc_base: F64 = np.where(p.mask, p.soc0, 0.5).astype(np.float64)
        self._ah: F64 = np.zeros(n)
        self._soc_arr: F64 = self._soc_base.copy()
        self._soc_chk: F64 = self._soc_base.copy()
        self._soc_state = _SOC_STALE
        self._last: StepResult | None = None
        self._cells_changed()
        self._refresh(swap=False)
        self._ocv_prev[...] = self._ocv
        self._cv_m: F64 = self._g.copy()
        self._cv_hv: F64 = self._hv.copy()

    def _init_constants(self) -> None:
        """Per-pack constants and the tables in the form the hot path reads them."""
        p = self.params
        n, s = p.capacity_ah.shape
        d = p.derived
        self._r0_ref, self._r1_ref, self._tau_s = d("r0_ref"), d("r1_ref"), d("tau_s")
        self._r2_ref, self._tau2_s = d("r2_ref"), d("tau2_s")
        self._tf_slope = d("tf_slope")
        self._tf_const = d("tf_const") if np.any(d("tf_const")) else None
        self._tf_hinges = [
            (d("tf_knots")[:, j].copy(), d("tf_changes")[:, j].copy()) for j in range(d("tf_knots").shape[1])
        ]
        self._eta, self._gamma = d("eta"), d("gamma")
        self._v_min, self._v_max = d("v_min"), d("v_max")
        self._i_dis_max, self._i_chg_max = d("i_dis_max"), d("i_chg_max")
        self._heat_cap, self._ua = d("heat_cap_j_per_k"), d("ua_w_per_k")
        self._series_f = p.series.astype(np.float64)
        self._inv_series = 1.0 / p.series
        self._w_sum = p.weight.sum(axis=1)
        self._row = p.chem_index.astype(np.intp) * GRID_POINTS
        self._row_f = self._row.astype(np.float64)
        cum = p.tables.cum_energy_vh
        self._cum_pairs = cum + 1j * np.append(cum[1:], cum[-1])
        self._rc_factor: dict[float, tuple[F64, F64]] = {}
        # Cell tables relative to a reference voltage per chemistry (the OCV at 50 % SoC).
        t = p.tables
        n_chem = len(t.chemistries)
        v_ref_chem = t.ocv_v[np.arange(n_chem) * GRID_POINTS + (GRID_POINTS - 1) // 2]
        self._v_ref: F64 = v_ref_chem[p.chem_index]
        self._ocv_rel_table: F64 = t.ocv_v - np.repeat(v_ref_chem, GRID_POINTS)
        step_table = np.zeros_like(t.ocv_v)
        step_table[:-1] = np.diff(t.ocv_v)
        step_table[GRID_POINTS - 1 :: GRID_POINTS] = 0.0
        self._ocv_step_table: F64 = step_table
        # Per-pack tables, looked up together: resistance shape, hysteresis amplitude, entropy.
        self._pack_table = np.stack([t.rsoc, t.hyst_v, t.entropic_v_per_k], axis=1)
        self._pack_slope = np.stack([t.rsoc_slope, t.hyst_slope, np.zeros_like(t.entropic_v_per_k)], axis=1)
        # Padded cells hold the OCV _PAD_V, so they lose the reductions over each string.
        self._pad_mask = ~p.mask
        self._pad_runs = _padding_runs(p.mask)
        self._flat_row = np.arange(n, dtype=np.intp) * s
        self._w_d = p.weight.astype(self._CELL_DTYPE)

    def _init_work(self) -> None:
        """Allocate the per-cell work arrays once; the hot path writes into them."""
        n, s = self.params.capacity_ah.shape
        dtype = self._CELL_DTYPE
        self._buf = np.empty((n, s), dtype)  # terminal voltages, then grid fractions, then limit terms
        self._moved = np.empty((n, s), bool)
        self._bxk = np.zeros((n, s), dtype)  # grid position at the rebase less the table index
        self._kf = np.zeros((n, s), dtype)  # the table index (unclipped)
        self._tk = np.zeros((n, s), dtype)  # relative OCV at that index
        self._sk = np.zeros((n, s), dtype)  # OCV change per grid step there
        self._ocv = np.empty((n, s), dtype)  # relative OCV of the present state
        self._ocv_prev = np.empty((n, s), dtype)  # ... and at the start of the last step

    # ------------------------------------------------------------------ internals

    def _cells_changed(self) -> None:
        """Recompute what depends on the cells' capacity and resistance, and rebase the charge."""
        p, dtype = self.params, self._CELL_DTYPE
        w = p.weight
        self._inv_cap = np.where(p.mask, 1.0 / self.capacity_ah, 0.0)
        self._icx = (self._inv_cap * (GRID_POINTS - 1)).astype(dtype)
        self._inv_r_cell = 1.0 / self.r_cell
        self._inv_r_d = self._inv_r_cell.astype(dtype)
        self._r_d = self.r_cell.astype(dtype)
        self._r_cell_sum = (self.r_cell * w).sum(axis=1)
        self._pack_q_ah: F64 = (self.capacity_ah * w).sum(axis=1) * self._inv_series
        self._icap_w_sum = (self._inv_cap * w).sum(axis=1)
        self._rebased()

    def _rebased(self) -> None:
        """Recompute what depends on ``_soc_base`` (with ``_ah`` zero)."""
        p = self.params
        base, cap = self._soc_base, self.capacity_ah
        held = base * cap
        self._held_min = np.where(p.mask, held, np.inf).min(axis=1)
        self._room_min = np.where(p.mask, cap - held, np.inf).min(axis=1)
        self._cap_min = np.where(p.mask, cap, np.inf).min(axis=1)
        self._soc_w_sum = (base * p.weight).sum(axis=1)
        self._charge_cache: tuple[F64, F64, F64, F64] | None = None
        # Every cell's table entries at its position now.
        x = base * (GRID_POINTS - 1)
        kf = np.floor(x)
        self._kf[...] = kf
        self._bxk[...] = x - kf
        k = np.minimum(np.maximum(kf, 0), GRID_POINTS - 1).astype(np.intp)
        k += self._row[:, None]
        self._tk[...] = self._ocv_rel_table[k]
        self._sk[...] = np.where(kf < 0, 0.0, self._ocv_step_table[k])
        pad = self._pad_mask  # padding holds _PAD_V and never moves (1 / Q = 0 there)
        self._bxk[pad] = 0.5
        self._tk[pad] = _PAD_V
        self._sk[pad] = 0.0

    def _soc_now(self) -> F64:
        if self._soc_state != _SOC_STALE:
            return self._soc_arr
        out: F64 = self._soc_base - self._ah[:, None] * self._inv_cap
        return out

    def _sync_soc(self) -> None:
        """Take over a SoC written from outside (in place or by assignment) since the last step."""
        if self._soc_state == _SOC_GIVEN:
            np.not_equal(self._soc_arr, self._soc_chk, out=self._moved)
            if self._moved.any():
                self._soc_state = _SOC_SET
        if self._soc_state == _SOC_SET:
            self._soc_base = self._soc_arr.copy()
            self._ah = np.zeros(self.params.n_packs)
            self._rebased()
            np.copyto(self._soc_chk, self._soc_arr)
            self._soc_state = _SOC_GIVEN

    def _pack_lookup(self, table: F64, slope: F64, soc: F64) -> F64:
        x = np.clip(soc, 0.0, 1.0) * (GRID_POINTS - 1)
        k = np.minimum(x.astype(np.int64), GRID_POINTS - 2)
        i = k + self._row
        out: F64 = table[i] + slope[i] * ((x - k) / (GRID_POINTS - 1))
        return out

    def _temp_factor(self, temp_c: F64) -> F64:
        """Each pack's resistance factor at ``temp_c`` (P,): its chemistry's ``temp_factor``."""
        u = 1.0 / (temp_c + _KELVIN) - 1.0 / _T_REF_K
        expo = self._tf_slope * u
        for knot, change in self._tf_hinges:
            expo += change * np.maximum(u - knot, 0.0)
        if self._tf_const is not None:
            expo += self._tf_const
        out: F64 = np.exp(expo)
        return out

    def _pack_q(self) -> F64:
        return self._pack_q_ah

    def _fill_padding(self, a: NDArray[np.floating], value: float) -> None:
        """Set the padded cells of ``a`` (P, S) to ``value``."""
        runs = self._pad_runs
        if runs is None:
            np.copyto(a, value, where=self._pad_mask)
            return
        for r0, r1, first in runs:
            a[r0:r1, first:] = value

    def _update_ocv(self, out: NDArray[np.floating]) -> None:
        """Write every cell's OCV (relative to ``_v_ref``) at the present charge into ``out``.

        A cell's grid position is ``x = soc * (GRID_POINTS - 1) = bx - ah * icx``; with ``k``
        the table index it was last looked up at, the fraction of the grid step is
        ``x - k = bxk - ah * icx`` (``bxk = bx - k``), and the OCV ``t[k] + s[k] * (x - k)``.
        """
        frac, moved = self._buf, self._moved
        np.multiply(self._icx, self._ah.astype(frac.dtype)[:, None], out=frac)
        np.subtract(self._bxk, frac, out=frac)
        # Cells whose fraction left [0, 1), in one unsigned comparison of the bits (negative
        # numbers and NaN compare above 1.0 as well).
        bits = frac.view(np.uint32 if frac.dtype == np.float32 else np.uint64)
        np.greater_equal(bits, bits.dtype.type(_ONE_BITS[frac.dtype.itemsize]), out=moved)
        if moved.any():
            self._gather(np.flatnonzero(moved))
        np.multiply(self._sk, frac, out=out)
        np.add(out, self._tk, out=out)

    def _gather(self, cells: NDArray[np.intp]) -> None:
        """Move the flat ``cells``, whose fraction left [0, 1), to the grid step they are in now.

        Outside the table (SoC below 0 or above 1) the slope is zero, so the OCV is the end
        value: the same as clipping the SoC.
        """
        last = GRID_POINTS - 1
        frac, bxk, kf = self._buf.reshape(-1), self._bxk.reshape(-1), self._kf.reshape(-1)
        f = frac[cells]
        steps = np.floor(f)
        frac[cells] = f - steps
        bxk[cells] -= steps
        k_new = kf[cells] + steps
        kf[cells] = k_new
        k = np.minimum(np.maximum(k_new, 0), last).astype(np.intp)
        k += self._row[cells // self._buf.shape[1]]
        self._tk.reshape(-1)[cells] = self._ocv_rel_table[k]
        step = self._ocv_step_table[k]
        step[k_new < 0] = 0.0
        self._sk.reshape(-1)[cells] = step

    def _refresh(self, *, swap: bool = False) -> None:
        """Recompute the open-circuit voltages, resistances and limits from the state.

        With ``swap``, the OCV at the start of the step is kept for :meth:`cell_voltages`.
        """
        ah = self._ah
        self._soc_mean = soc_mean = (self._soc_w_sum - ah * self._icap_w_sum) * self._inv_series
        # Per pack, at the string's mean SoC: resistance shape, hysteresis amplitude, entropy.
        x = np.minimum(np.maximum(soc_mean, 0.0), 1.0) * (GRID_POINTS - 1)
        k = np.minimum(x.astype(np.intp), GRID_POINTS - 2)
        frac = (x - k) / (GRID_POINTS - 1)
        k += self._row
        per_pack = self._pack_slope[k]
        per_pack *= frac[:, None]
        per_pack += self._pack_table[k]
        rsoc, hyst_amp, self._entropic = per_pack.T
        # One OCV per cell group.
        ocv = self._ocv_prev if swap else self._ocv
        self._update_ocv(ocv)
        if swap:
            self._ocv, self._ocv_prev = ocv, self._ocv
        temp = self.temp_c
        scale = rsoc * self._temp_factor(temp) * self.r_growth
        self._k0 = k0 = self._r0_ref * scale
        self._k1 = k1 = self._r1_ref * scale
        self._k2 = k2 = self._r2_ref * scale
        self._g = g = k1 * self.i_filtered + k2 * self.i_filtered2  # RC voltage per unit cell resistance
        self._hv = hv = hyst_amp * self.hyst
        ocv_sum = np.einsum("ij,ij->i", ocv, self._w_d).astype(np.float64)
        self._voc_pack: F64 = (self._v_ref + hv) * self._w_sum + ocv_sum - g * self._r_cell_sum
        self._r_pack: F64 = k0 * self._r_cell_sum * (1.0 + CONNECTOR_SHARE)
        # BMS limits: the largest current keeping every cell inside [v_min, v_max]. Cell i
        # reaches v_min at (ocv_i + hv - v_min) / R_i - g and v_max at (v_max - hv - ocv_i) / R_i + g;
        # the least of each over the string sets the limit.
        buf, inv_r_d, dtype = self._buf, self._inv_r_d, ocv.dtype
        flat, inv_r = ocv.reshape(-1), self._inv_r_cell.reshape(-1)
        low = self._v_ref + hv - self._v_min
        np.add(ocv, low.astype(dtype)[:, None], out=buf)  # padding: _PAD_V, never the least
        np.multiply(buf, inv_r_d, out=buf)
        i = buf.argmin(axis=1) + self._flat_row
        head_dis = (flat[i] + low) * inv_r[i] - g
        high = self._v_max - hv - self._v_ref
        np.subtract(high.astype(dtype)[:, None], ocv, out=buf)
        np.multiply(buf, inv_r_d, out=buf)
        self._fill_padding(buf, _PAD_V)
        i = buf.argmin(axis=1) + self._flat_row
        head_chg = (high - flat[i]) * inv_r[i] + g
        r_conn = 1.0 / (k0 * (1.0 + CONNECTOR_SHARE))
        # Charging derates below 10 °C and above 45 °C (the two ramps never overlap).
        derate = np.clip(np.minimum(temp, 55.0 - temp) / 10.0, 0.0, 1.0)
        closed = self.contactor_closed
        self._i_dis: F64 = np.where(closed, np.maximum(np.minimum(head_dis * r_conn, self._i_dis_max), 0.0), 0.0)
        self._i_chg: F64 = np.where(
            closed, np.maximum(np.minimum(head_chg * r_conn, self._i_chg_max * derate), 0.0), 0.0
        )

    # ------------------------------------------------------------------ public

    @property
    def soc(self) -> F64:
        """Every cell group's true SoC, (P, S) (padding holds 0.5)."""
        if self._soc_state == _SOC_STALE:
            np.multiply(self._inv_cap, self._ah[:, None], out=self._soc_arr)
            np.subtract(self._soc_base, self._soc_arr, out=self._soc_arr)
            np.copyto(self._soc_chk, self._soc_arr)
            self._soc_state = _SOC_GIVEN
        return self._soc_arr

    @soc.setter
    def soc(self, value: F64) -> None:
        arr = np.array(value, dtype=np.float64)
        if arr.shape != self._soc_base.shape:
            msg = f"soc has shape {arr.shape}, expected {self._soc_base.shape}"
            raise ValueError(msg)
        self._soc_arr = arr
        self._soc_state = _SOC_SET

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
        arr = self._temp_factor(np.full(p.n_packs, float(temp_c)))
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
        self._sync_soc()
        current = np.asarray(current_a, dtype=np.float64)
        # Terminal voltages at the start of the step with this step's current (what a BMS
        # samples): v_i = v_ref + hv + ocv_i - m R_i, with m the RC and ohmic drop per unit R.
        ocv, buf = self._ocv, self._buf
        m = self._g + self._k0 * current
        hv = self._hv
        np.multiply(self._r_d, m.astype(buf.dtype)[:, None], out=buf)
        np.subtract(ocv, buf, out=buf)
        v_min_idx = buf.argmin(axis=1)  # padding holds _PAD_V
        self._fill_padding(buf, -_PAD_V)
        v_max_idx = buf.argmax(axis=1)
        flat, r_flat = ocv.reshape(-1), self.r_cell.reshape(-1)
        base = self._v_ref + hv
        i = v_min_idx + self._flat_row
        cell_v_min = base + flat[i] - m * r_flat[i]
        i = v_max_idx + self._flat_row
        cell_v_max = base + flat[i] - m * r_flat[i]
        self._cv_m, self._cv_hv = m, hv
        voltage = self._voc_pack - current * self._r_pack

        # Charge: coulombic efficiency applies to charging current only.
        eff = np.where(current < 0.0, self._eta * current, current)
        self._ah = self._ah + eff * (dt_s / 3600.0)
        self._soc_state = _SOC_STALE
        self._charge_cache = None
        rc = self._rc_factor.get(dt_s)
        if rc is None:
            rc = self._rc_factor[dt_s] = (-np.expm1(-dt_s / self._tau_s), -np.expm1(-dt_s / self._tau2_s))
        self.i_filtered += (current - self.i_filtered) * rc[0]
        self.i_filtered2 += (current - self.i_filtered2) * rc[1]
        # Plett's hysteresis rate: gamma per ampere-second of throughput relative to the capacity in A·s.
        decay = 1.0 - np.exp(-self._gamma * np.abs(current) * dt_s / (self._pack_q_ah * 3600.0))
        self.hyst -= decay * (self.hyst + np.sign(current))

        # Heat: Joule loss (ohmic and both RC pairs), reversible heat, injected fault heat; convection.
        t_k = self.temp_c + _KELVIN
        i1, i2 = self.i_filtered, self.i_filtered2
        heat = (
            current * current * self._r_pack
            + (i1 * i1 * self._k1 + i2 * i2 * self._k2) * self._r_cell_sum
            - current * t_k * self._entropic * self._series_f  # reversible heat (Bernardi), I > 0 on discharge
            + self.extra_heat_w
        )
        loss = self._ua * (self.temp_c - env_temp_c)
        self.temp_c += (heat - loss) * dt_s / self._heat_cap

        self._refresh(swap=True)
        result = StepResult(
            current_a=current,
            voltage_v=voltage,
            cell_v_min_v=cell_v_min,
            cell_v_max_v=cell_v_max,
            cell_v_min_idx=v_min_idx,
            cell_v_max_idx=v_max_idx,
            temp_c=self.temp_c.copy(),
            heat_w=heat,
            max_discharge_a=self._i_dis,
            max_charge_a=self._i_chg,
        )
        self._last = result
        return result

    def cell_voltages(self, *, out: F64 | None = None) -> F64:
        """Return every cell group's terminal voltage at the last step, (P, S); padding is NaN.

        Args:
            out: a float64 array of that shape to write into (default: a new array).
        """
        if out is None:
            out = np.empty(self._soc_base.shape)
        np.multiply(self.r_cell, self._cv_m[:, None], out=out)
        np.subtract(self._ocv_prev, out, out=out)
        out += (self._v_ref + self._cv_hv)[:, None]
        np.copyto(out, np.nan, where=self._pad_mask)
        return out

    def string_charge_ah(self) -> tuple[F64, F64]:
        """Return the charge (Ah) each string can still give and still take before a cell hits a limit.

        Per cell, with the SoC clipped to [0, 1], the charge held is ``clip(h_i, 0, Q_i)``
        with ``h_i = soc_base_i Q_i - ah``; its least value over the string is
        ``clip(min_i h_i, 0, min_i Q_i)``, and likewise for the charge it can still take.
        """
        q_low, q_high = self._charge()
        return q_low.copy(), q_high.copy()

    def _charge(self) -> tuple[F64, F64]:
        """:meth:`string_charge_ah`, computed once per state (callers must not modify it)."""
        if self._soc_state == _SOC_SET:
            self._sync_soc()
        cached = self._charge_cache
        if cached is None:
            ah = self._ah
            q_low: F64 = np.clip(np.minimum(self._held_min - ah, self._cap_min), 0.0, None)
            q_high: F64 = np.clip(np.minimum(self._room_min + ah, self._cap_min), 0.0, None)
            total = q_low + q_high
            usable: F64 = np.where(total > 0, q_low / np.where(total > 0, total, 1.0), 0.0)
            cached = self._charge_cache = (q_low, q_high, total, usable)
        return cached[0], cached[1]

    def pack_soc(self) -> F64:
        """Return each pack's usable SoC: what the weakest-limited string can still deliver.

        The string is empty when its lowest cell is empty and full when its fullest cell is
        full, so the usable SoC is ``q_low / (q_low + q_high)``, with ``q_low`` the charge the
        string can still give and ``q_high`` the charge it can still take.
        """
        self._charge()
        assert self._charge_cache is not None
        return self._charge_cache[3].copy()

    def cell_soc_mean(self) -> F64:
        """Return each string's mean cell SoC, every cell's clipped to [0, 1] (weighted by ``weight``).

        Per pack from the charge integrated so far; only strings with a cell outside [0, 1]
        are summed cell by cell.
        """
        p = self.params
        self._charge()
        ah = self._ah
        out: F64 = (self._soc_w_sum - ah * self._icap_w_sum) * self._inv_series
        outside = np.flatnonzero((self._held_min - ah < 0.0) | (self._room_min + ah < 0.0))
        if outside.size:
            soc = np.clip(self._soc_now()[outside], 0.0, 1.0)
            out[outside] = (soc * p.weight[outside]).sum(axis=1) * self._inv_series[outside]
        return out

    def pack_capacity_ah(self) -> F64:
        """Return each string's usable capacity (Ah): charge between the empty and full limits."""
        self._charge()
        assert self._charge_cache is not None
        return self._charge_cache[2].copy()

    def energy_to_floor_wh(self, floor_soc: float, current_a: F64 | None = None) -> F64:
        """Return each pack's true energy (Wh) until its usable SoC reaches ``floor_soc``.

        The string gives ``q_low - floor * (q_low + q_high)`` Ah before its usable SoC reaches
        the floor; every cell's OCV is integrated over the SoC it gives up meanwhile, less the
        ohmic loss at ``current_a`` (default: the last step's current) over that discharge.
        """
        p = self.params
        q_low, q_high = self._charge()
        ah = np.clip(q_low - floor_soc * (q_low + q_high), 0.0, None)
        start, end, k, lo, wh_start, wh_end, _ = self._energy_work()
        self._soc_into(start)
        np.clip(start, 0.0, 1.0, out=start)
        np.multiply(self._inv_cap, ah[:, None], out=end)
        np.subtract(start, end, out=end)
        np.clip(end, 0.0, 1.0, out=end)
        self._cum_energy(start, k, lo, wh_start)
        self._cum_energy(end, k, lo, wh_end)
        wh_start -= wh_end
        wh_start *= self.capacity_ah
        wh = np.einsum("ij,ij->i", wh_start, p.weight)
        if current_a is None:
            current_a = self._last.current_a if self._last is not None else np.zeros(p.n_packs)
        i = np.abs(current_a)
        hours = np.where(i > 0, ah / np.where(i > 0, i, 1.0), 0.0)
        out: F64 = np.clip(wh - i * i * self._r_pack * hours, 0.0, None)
        return out

    def _energy_work(self) -> tuple[F64, F64, NDArray[np.intp], F64, F64, F64, NDArray[np.complex128]]:
        work = getattr(self, "_energy_arrays", None)
        if work is None:
            shape = self._soc_base.shape
            work = self._energy_arrays = (
                np.empty(shape),
                np.empty(shape),
                np.empty(shape, dtype=np.intp),
                np.empty(shape),
                np.empty(shape),
                np.empty(shape),
                np.empty(shape, dtype=np.complex128),
            )
        return work

    def _cum_energy(self, soc: F64, k: NDArray[np.intp], lo: F64, out: F64) -> None:
        """∫ OCV dsoc from 0 to ``soc`` per cell (V·h per Ah) into ``out``; ``soc`` (in [0, 1]) is overwritten."""
        soc *= GRID_POINTS - 1
        np.floor(soc, out=lo)  # the grid index, as a float (soc >= 0: truncation)
        np.clip(lo, 0, GRID_POINTS - 2, out=lo)  # (clip is the fast path; minimum with a scalar is not)
        soc -= lo
        lo += self._row_f[:, None]
        np.copyto(k, lo, casting="unsafe")
        # Both ends of the grid step in one gather: (cum[k], cum[k + 1]) as one complex number.
        pair = self._energy_work()[6]
        self._cum_pairs.take(k, out=pair)
        np.subtract(pair.imag, pair.real, out=out)
        out *= soc
        out += pair.real

    def _soc_into(self, out: F64) -> None:
        """Write every cell's present SoC into ``out``."""
        if self._soc_state == _SOC_STALE:
            np.multiply(self._inv_cap, self._ah[:, None], out=out)
            np.subtract(self._soc_base, out, out=out)
        else:
            np.copyto(out, self._soc_arr)

    def apply_aging(self, capacity_ratio: F64, r_growth: F64) -> None:
        """Scale every cell group's capacity by ``capacity_ratio`` (P,) or (P, S); set resistance growth (P,)."""
        ratio = np.asarray(capacity_ratio, dtype=np.float64)
        self.capacity_ah *= ratio if ratio.ndim == 2 else ratio[:, None]
        self.r_growth = np.asarray(r_growth, dtype=np.float64).copy()
        self._invalidate()

    def set_cell(
        self,
        pack: int,
        group: int,
        *,
        capacity_factor: float = 1.0,
        resistance_factor: float = 1.0,
        top_balanced: bool = False,
    ) -> None:
        """Change one cell group's capacity and resistance (a weak-cell fault).

        With ``top_balanced`` the cell is taken to have been weak all along in a string the
        BMS balances at the top of charge: it is full when the others are, so below full it
        holds the same charge deficit over less capacity, ``soc = 1 - (1 - soc) / factor``.
        Otherwise the cell keeps its SoC (a sudden loss of capacity).
        """
        if top_balanced:
            soc = self.soc.copy()
            soc[pack, group] = max(0.0, 1.0 - (1.0 - soc[pack, group]) / capacity_factor)
            self.soc = soc
        self.capacity_ah[pack, group] *= capacity_factor
        self.r_cell[pack, group] *= resistance_factor
        self._invalidate()

    def _invalidate(self) -> None:
        """Recompute everything derived from the state after it was changed from outside.

        Every cell keeps its SoC: a changed capacity changes the charge it holds, not its SoC.
        """
        self._sync_soc()
        self._soc_base = self._soc_now().copy()  # from the capacities before the change
        self._ah = np.zeros(self.params.n_packs)
        self._soc_state = _SOC_STALE
        self._cells_changed()
        self._refresh()


#: Bits of 1.0 as float32 and float64, by item size.
_ONE_BITS: Final = {4: 0x3F800000, 8: 0x3FF0000000000000}
_SOC_STALE: Final = 0  # ``_soc_arr`` is out of date
_SOC_GIVEN: Final = 1  # ``_soc_arr`` is up to date and ``_soc_chk`` holds a copy to notice writes
_SOC_SET: Final = 2  # ``_soc_arr`` was assigned from outside: rebase on it
