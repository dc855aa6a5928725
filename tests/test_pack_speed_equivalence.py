"""The optimised :class:`PackBank` against a plain float64 reference of the same physics.

``PackBank`` integrates charge per pack, keeps each cell's OCV table entries between steps,
holds per-cell voltages in float32 and fills padded cells with values that never win a
reduction (see its docstring). ``_Reference`` below is the same model written the direct
way: every cell's SoC integrated on its own, an OCV lookup per cell, masked reductions, all
in float64, both RC pairs updated on their own, and every pack's temperature factor taken
from its chemistry's :meth:`~twin.chemistry.CellChemistry.temp_factor` (Arrhenius, or the
lmo table). Both are driven with the same requests, including past the BMS limits, through
aging, a weak cell, outside writes of the SoC and coarse steps that leave the SoC table,
and must agree far below what any sensor resolves.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from numpy.typing import NDArray

from emulators.fleet import build_fleet
from emulators.pack import CONNECTOR_SHARE, GRID_POINTS, ChemistryTables, PackBank, PackParams, StepResult
from emulators.scenario import load_scenario
from twin.chemistry import get_chemistry

F64 = NDArray[np.float64]

_KELVIN = 273.15


class _Reference:
    """The bank's physics, cell by cell in float64, without any of the shortcuts."""

    def __init__(self, params: PackParams, *, temp_c: F64) -> None:
        p = self.params = params
        n = p.n_packs
        self.soc = np.where(p.mask, p.soc0, 0.5).astype(np.float64)
        self.capacity_ah = np.where(p.mask, p.capacity_ah, 1.0).astype(np.float64)
        self.r_cell = np.where(p.mask, p.r_cell, 1.0).astype(np.float64)
        self.r_growth = np.ones(n)
        self.i_filtered = np.zeros(n)
        self.i_filtered2 = np.zeros(n)
        self.hyst = np.zeros(n)
        self.temp_c = np.asarray(temp_c, dtype=np.float64).copy()
        self.extra_heat_w = np.zeros(n)
        self.contactor_closed = np.ones(n, dtype=bool)
        self._row = (p.chem_index * GRID_POINTS)[:, None]
        self._low = np.where(p.mask, 0.0, np.inf)
        self._high = np.where(p.mask, 0.0, -np.inf)
        self._last_current = np.zeros(n)
        self._invalidate()
        self.cells_v = self._voc.copy()

    def _lookup(self, table: F64, slope: F64, soc: F64, row: NDArray[np.int64]) -> F64:
        x = np.clip(soc, 0.0, 1.0) * (GRID_POINTS - 1)
        k = np.minimum(x.astype(np.int64), GRID_POINTS - 2)
        i = k + row
        out: F64 = table[i] + slope[i] * ((x - k) / (GRID_POINTS - 1))
        return out

    def _invalidate(self) -> None:
        p = self.params
        self._inv_cap = np.where(p.mask, 1.0 / self.capacity_ah, 0.0)
        self._r_sum = (self.r_cell * p.weight).sum(axis=1)
        self._pack_q = (self.capacity_ah * p.weight).sum(axis=1) / p.series
        self._refresh()

    def _refresh(self) -> None:
        p, t = self.params, self.params.tables
        self._soc_mean = (self.soc * p.weight).sum(axis=1) / p.series
        ocv = self._lookup(t.ocv_v, t.ocv_slope, self.soc, self._row)
        row = self._row[:, 0]
        rsoc = self._lookup(t.rsoc, t.rsoc_slope, self._soc_mean, row)
        arr = np.empty(p.n_packs)
        for index, chemistry in enumerate(t.chemistries):
            packs = p.chem_index == index
            arr[packs] = chemistry.temp_factor(self.temp_c[packs])
        scale = rsoc * arr * self.r_growth
        self._k0 = p.derived("r0_ref") * scale
        self._k1 = p.derived("r1_ref") * scale
        self._k2 = p.derived("r2_ref") * scale
        hyst_v = self._lookup(t.hyst_v, t.hyst_slope, self._soc_mean, row) * self.hyst
        v_rc = self._k1 * self.i_filtered + self._k2 * self.i_filtered2
        self._voc = ocv - v_rc[:, None] * self.r_cell + hyst_v[:, None]
        self._voc_pack = (self._voc * p.weight).sum(axis=1)
        self._r_pack = self._k0 * self._r_sum * (1.0 + CONNECTOR_SHARE)
        r_conn = 1.0 / (self._k0 * (1.0 + CONNECTOR_SHARE))
        head_dis = ((self._voc - p.derived("v_min")[:, None]) / self.r_cell + self._low).min(axis=1) * r_conn
        head_chg = ((p.derived("v_max")[:, None] - self._voc) / self.r_cell + self._low).min(axis=1) * r_conn
        derate = np.clip(self.temp_c / 10.0, 0.0, 1.0) * np.clip((55.0 - self.temp_c) / 10.0, 0.0, 1.0)
        closed = self.contactor_closed
        self.i_dis = np.where(closed, np.clip(np.minimum(head_dis, p.derived("i_dis_max")), 0.0, None), 0.0)
        self.i_chg = np.where(closed, np.clip(np.minimum(head_chg, p.derived("i_chg_max") * derate), 0.0, None), 0.0)

    def step(self, power_w: F64, env_temp_c: F64, *, dt_s: float) -> StepResult:
        voc, r = self._voc_pack, self._r_pack
        power = np.where(self.contactor_closed, power_w, 0.0)
        current = (voc - np.sqrt(np.maximum(voc * voc - 4.0 * r * power, 0.0))) / (2.0 * r)
        return self.step_current(np.clip(current, -self.i_chg, self.i_dis), env_temp_c, dt_s=dt_s)

    def step_current(self, current: F64, env_temp_c: F64, *, dt_s: float) -> StepResult:
        p, t = self.params, self.params.tables
        cells = self._voc - (self._k0 * current)[:, None] * self.r_cell
        self.cells_v = cells
        i_min, i_max = (cells + self._low).argmin(axis=1), (cells + self._high).argmax(axis=1)
        rows = np.arange(p.n_packs)
        voltage = self._voc_pack - current * self._r_pack
        eff = np.where(current < 0.0, p.derived("eta") * current, current)
        self.soc -= (eff * (dt_s / 3600.0))[:, None] * self._inv_cap
        self.i_filtered += (current - self.i_filtered) * (1.0 - np.exp(-dt_s / p.derived("tau_s")))
        self.i_filtered2 += (current - self.i_filtered2) * (1.0 - np.exp(-dt_s / p.derived("tau2_s")))
        decay = 1.0 - np.exp(-p.derived("gamma") * np.abs(current) * dt_s / (self._pack_q * 3600.0))
        self.hyst -= decay * (self.hyst + np.sign(current))
        entropic = t.entropic_v_per_k[
            np.minimum((np.clip(self._soc_mean, 0, 1) * 1000).astype(int), 999) + self._row[:, 0]
        ]
        heat = (
            current * current * self._r_pack
            + self.i_filtered**2 * self._k1 * self._r_sum
            + self.i_filtered2**2 * self._k2 * self._r_sum
            - current * (self.temp_c + _KELVIN) * entropic * p.series
            + self.extra_heat_w
        )
        self.temp_c += (
            (heat - p.derived("ua_w_per_k") * (self.temp_c - env_temp_c)) * dt_s / p.derived("heat_cap_j_per_k")
        )
        self._last_current = current
        self._refresh()
        return StepResult(
            current_a=current,
            voltage_v=voltage,
            cell_v_min_v=cells[rows, i_min],
            cell_v_max_v=cells[rows, i_max],
            cell_v_min_idx=i_min,
            cell_v_max_idx=i_max,
            temp_c=self.temp_c.copy(),
            heat_w=heat,
            max_discharge_a=self.i_dis,
            max_charge_a=self.i_chg,
        )

    def string_charge_ah(self) -> tuple[F64, F64]:
        held = np.clip(self.soc, 0.0, 1.0) * self.capacity_ah
        return (held + self._low).min(axis=1), (self.capacity_ah - held + self._low).min(axis=1)

    def pack_soc(self) -> F64:
        q_low, q_high = self.string_charge_ah()
        total = q_low + q_high
        out: F64 = np.where(total > 0, q_low / np.where(total > 0, total, 1.0), 0.0)
        return out

    def energy_to_floor_wh(self, floor_soc: float) -> F64:
        p, t = self.params, self.params.tables
        q_low, q_high = self.string_charge_ah()
        ah = np.clip(q_low - floor_soc * (q_low + q_high), 0.0, None)
        soc = np.clip(self.soc, 0.0, 1.0)
        end = np.clip(soc - ah[:, None] * self._inv_cap, 0.0, 1.0)

        def cum(x: F64) -> F64:
            pos = x * (GRID_POINTS - 1)
            k = np.minimum(pos.astype(np.int64), GRID_POINTS - 2)
            lo, hi = t.cum_energy_vh[k + self._row], t.cum_energy_vh[k + self._row + 1]
            out: F64 = lo + (hi - lo) * (pos - k)
            return out

        wh = ((cum(soc) - cum(end)) * self.capacity_ah * p.weight).sum(axis=1)
        i = np.abs(self._last_current)
        hours = np.where(i > 0, ah / np.where(i > 0, i, 1.0), 0.0)
        out: F64 = np.clip(wh - i * i * self._r_pack * hours, 0.0, None)
        return out

    def apply_aging(self, ratio: F64, r_growth: F64) -> None:
        self.capacity_ah *= ratio[:, None]
        self.r_growth = r_growth.copy()
        self._invalidate()

    def set_cell(self, pack: int, group: int, capacity_factor: float, resistance_factor: float) -> None:
        self.capacity_ah[pack, group] *= capacity_factor
        self.r_cell[pack, group] *= resistance_factor
        self._invalidate()


def _assert_same_step(fast: StepResult, ref: StepResult, bank: PackBank, reference: _Reference) -> None:
    np.testing.assert_allclose(fast.current_a, ref.current_a, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(fast.voltage_v, ref.voltage_v, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fast.cell_v_min_v, ref.cell_v_min_v, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast.cell_v_max_v, ref.cell_v_max_v, rtol=0, atol=1e-5)
    # The weakest and strongest cell are the same, except between cells within a few µV.
    rows = np.arange(fast.current_a.size)
    for got, want in ((fast.cell_v_min_idx, ref.cell_v_min_idx), (fast.cell_v_max_idx, ref.cell_v_max_idx)):
        differ = got != want
        gap = np.abs(reference.cells_v[rows, got] - reference.cells_v[rows, want])
        assert np.all(gap[differ] < 1e-5), gap[differ]
    np.testing.assert_allclose(fast.temp_c, ref.temp_c, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fast.max_discharge_a, ref.max_discharge_a, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(fast.max_charge_a, ref.max_charge_a, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(bank.pack_soc(), reference.pack_soc(), rtol=0, atol=1e-7)
    for got_q, want_q in zip(bank.string_charge_ah(), reference.string_charge_ah(), strict=True):
        np.testing.assert_allclose(got_q, want_q, rtol=0, atol=1e-5)


def _drive(bank: PackBank, reference: _Reference, requests: F64, *, dt_s: float, env_c: float = 25.0) -> None:
    env = np.full(requests.shape[1], env_c)
    for power in requests:
        _assert_same_step(bank.step(power, env, dt_s=dt_s), reference.step(power, env, dt_s=dt_s), bank, reference)


def _check_state(bank: PackBank, reference: _Reference) -> None:
    mask = bank.params.mask
    np.testing.assert_allclose(bank.soc[mask], reference.soc[mask], rtol=0, atol=1e-7)
    np.testing.assert_allclose(bank.cell_voltages()[mask], reference.cells_v[mask], rtol=0, atol=1e-5)
    assert np.isnan(bank.cell_voltages()[~mask]).all()
    np.testing.assert_allclose(bank.energy_to_floor_wh(0.1), reference.energy_to_floor_wh(0.1), rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(bank.open_circuit_v(), reference._voc_pack, rtol=0, atol=1e-4)
    weight, series = bank.params.weight, bank.params.series
    mean = (np.clip(reference.soc, 0.0, 1.0) * weight).sum(axis=1) / series
    np.testing.assert_allclose(bank.cell_soc_mean(), mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(bank.resistance_ohm(), reference._r_pack, rtol=1e-7)


@pytest.mark.parametrize("cell_level", [True, False])
def test_fleet_matches_the_reference_through_limits_aging_and_faults(cell_level: bool) -> None:
    sc = load_scenario("nevada").scaled(24)
    params = build_fleet(sc, np.random.default_rng(7), cell_level=cell_level).params
    n = params.n_packs
    bank, reference = PackBank(params, temp_c=np.full(n, 20.0)), _Reference(params, temp_c=np.full(n, 20.0))
    rng = np.random.default_rng(1)
    rated_w = params.rated_group_ah * params.series * 3.7
    # Ordinary operation, then requests far past the limits (the BMS clips them), both ways.
    _drive(bank, reference, rng.normal(0.0, 0.1, (200, n)) * rated_w, dt_s=1.0)
    _drive(bank, reference, np.tile(10.0 * rated_w, (30, 1)), dt_s=60.0)
    _drive(bank, reference, np.tile(-10.0 * rated_w, (60, 1)), dt_s=60.0)
    _check_state(bank, reference)
    # A weak cell and a year of aging, then more of both.
    bank.set_cell(3, 1, capacity_factor=0.7, resistance_factor=2.5)
    reference.set_cell(3, 1, 0.7, 2.5)
    ratio, growth = rng.uniform(0.95, 1.0, n), rng.uniform(1.0, 1.2, n)
    bank.apply_aging(ratio, growth)
    reference.apply_aging(ratio, growth)
    bank.contactor_closed[5] = reference.contactor_closed[5] = False
    bank.extra_heat_w[6] = reference.extra_heat_w[6] = 50.0
    _drive(bank, reference, rng.normal(0.0, 0.5, (100, n)) * rated_w, dt_s=10.0, env_c=40.0)
    _check_state(bank, reference)


def _hand_built(mask: NDArray[np.bool_], *, soc0: float, seed: int) -> PackParams:
    rng = np.random.default_rng(seed)
    n, s = mask.shape
    # lmo has two RC pairs and a tabulated temperature factor; the others one pair and Arrhenius.
    tables = ChemistryTables.build([get_chemistry("nmc811"), get_chemistry("lfp"), get_chemistry("lmo")])
    weight = np.where(mask, rng.uniform(0.5, 3.0, mask.shape), 0.0)
    series = np.round(weight.sum(axis=1)).astype(np.int64)
    weight *= (series / weight.sum(axis=1))[:, None]
    return PackParams(
        chem_index=np.arange(n) % 3,
        series=series,
        parallel=np.ones(n, dtype=np.int64),
        rated_group_ah=np.full(n, 50.0),
        capacity_ah=50.0 * rng.uniform(0.8, 1.0, (n, s)),
        r_cell=rng.uniform(0.8, 1.5, (n, s)),
        soc0=np.clip(soc0 + 0.02 * rng.standard_normal((n, s)), 0.0, 1.0),
        mask=mask,
        weight=weight,
        i_dis_max_a=np.full(n, 100.0),
        i_chg_max_a=np.full(n, 50.0),
        tables=tables,
    )


@pytest.mark.parametrize("soc0", [0.03, 0.5, 0.97])
def test_scattered_padding_and_the_ends_of_the_table(soc0: float) -> None:
    mask = np.random.default_rng(3).random((8, 7)) < 0.6
    mask[:, 3] = True  # every pack has a group, but the padding is not a prefix
    params = _hand_built(mask, soc0=soc0, seed=4)
    bank, reference = PackBank(params, temp_c=np.full(8, 25.0)), _Reference(params, temp_c=np.full(8, 25.0))
    direction = -1.0 if soc0 > 0.5 else 1.0
    # Coarse steps at a fixed current run the cells past 0 or 1 SoC, where the tables are clipped.
    current = np.full(8, 20.0 * direction)
    env = np.full(8, 25.0)
    for _ in range(12):
        _assert_same_step(
            bank.step_current(current, env, dt_s=600.0),
            reference.step_current(current, env, dt_s=600.0),
            bank,
            reference,
        )
    _check_state(bank, reference)
    _drive(bank, reference, np.random.default_rng(5).normal(0.0, 4000.0, (50, 8)), dt_s=30.0)
    _check_state(bank, reference)


def test_soc_written_from_outside_is_taken_over() -> None:
    params = _hand_built(np.ones((3, 4), dtype=bool), soc0=0.6, seed=6)
    bank, reference = PackBank(params, temp_c=np.full(3, 25.0)), _Reference(params, temp_c=np.full(3, 25.0))
    _drive(bank, reference, np.full((5, 3), 2000.0), dt_s=60.0)
    bank.soc[1, 2] = reference.soc[1, 2] = 0.2  # in place, as before the bank integrated charge per pack
    _drive(bank, reference, np.full((5, 3), 2000.0), dt_s=60.0)
    new = np.full((3, 4), 0.9)
    bank.soc = new  # by assignment
    reference.soc = new.copy()
    bank._invalidate()
    reference._invalidate()
    _drive(bank, reference, np.full((5, 3), -2000.0), dt_s=60.0)
    _check_state(bank, reference)


def test_one_cell_bank_driven_by_current() -> None:
    mask = np.ones((1, 1), dtype=bool)
    params = replace(_hand_built(mask, soc0=0.5, seed=8), weight=np.ones((1, 1)), series=np.ones(1, dtype=np.int64))
    bank, reference = PackBank(params, temp_c=np.full(1, 25.0)), _Reference(params, temp_c=np.full(1, 25.0))
    env = np.full(1, 25.0)
    for amps in (*[50.0] * 40, *[-25.0] * 80, *[0.0] * 10):
        current = np.full(1, amps)
        _assert_same_step(
            bank.step_current(current, env, dt_s=30.0), reference.step_current(current, env, dt_s=30.0), bank, reference
        )
    _check_state(bank, reference)
