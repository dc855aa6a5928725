"""Energy to the floor, runtime and the site outlook, checked against oracles, never against themselves.

Oracles:

* the chemistry's own OCV integrated with :func:`numpy.trapezoid` on a fine grid;
* a slow reference simulation written here (a Python loop per step and per pack, the
  chemistry's own resistance methods, water-filling by iteration);
* a Monte Carlo draw of the SoC and capacity errors for the P5/P95 energy;
* the emulator's true packs: :meth:`emulators.pack.PackBank.energy_to_floor_wh` and
  :func:`emulators.truth.time_to_floor_s` (cell-level physics with RC states; the twin's
  module never imports :mod:`emulators`, only this test does).
"""

from __future__ import annotations

import dataclasses
import doctest
import math
import time

import numpy as np
import polars as pl
import pytest
from numpy.typing import NDArray

from emulators import truth
from emulators.run import Emulation, EmulationOptions
from emulators.scenario import load_scenario
from twin.chemistry import get_chemistry
from twin.estimators import energy as energy_module
from twin.estimators.base import EstimatorError
from twin.estimators.energy import (
    EnergyPacks,
    OutlookOptions,
    SiteOutlook,
    energy_to_floor_wh,
    site_outlook,
    time_to_floor_s,
)

F64 = NDArray[np.float64]
FLOOR = 0.10

# Three packs of different chemistries with BMS current limits (about 0.2 C).
THREE = EnergyPacks(
    pack_ids=("nmc", "lfp", "lmo"),
    chemistry=("nmc811", "lfp", "lmo"),
    series=np.array([96, 120, 96]),
    rated_group_ah=np.array([300.0, 404.0, 66.2]),
    capacity_ah=np.array([280.0, 350.0, 42.0]),
    capacity_rel_std=np.full(3, 0.03),
    i_dis_max_a=np.array([60.0, 70.0, 12.0]),
    v_min_cell_v=np.array([2.5, 2.0, 3.0]),
    series_r_ohm=np.array([0.01, 0.0, 0.02]),
)
SOC3 = np.array([0.8, 0.75, 0.7])
TEMP3 = np.array([25.0, 20.0, 30.0])
ALL3 = np.ones(3, dtype=bool)


def one_pack(chemistry: str, *, capacity_ah: float = 100.0, series: int = 96) -> EnergyPacks:
    chem = get_chemistry(chemistry)
    return EnergyPacks(
        pack_ids=("p",),
        chemistry=(chemistry,),
        series=np.array([series]),
        rated_group_ah=np.array([capacity_ah]),
        capacity_ah=np.array([capacity_ah * 0.9]),
        capacity_rel_std=np.array([0.03]),
        i_dis_max_a=np.array([np.inf]),
        v_min_cell_v=np.array([chem.v_min_v]),
        series_r_ohm=np.array([0.0]),
    )


def zero_current_wh(packs: EnergyPacks, soc: F64, temp_c: F64) -> F64:
    return energy_to_floor_wh(packs, soc, floor_soc=FLOOR, temp_c=temp_c, current_a=np.zeros(packs.n_packs))


def fleet(n_per: int = 25) -> EnergyPacks:
    """Mixed chemistries, as the nevada site."""
    mix = (("nmc811", 300.0, 96), ("nmc532", 171.0, 96), ("lmo", 66.2, 96), ("lfp", 404.0, 120))
    rows = [(f"{c}-{k}", c, ah, s) for c, ah, s in mix for k in range(n_per)]
    meta = pl.DataFrame(
        {
            "pack": [r[0] for r in rows],
            "chemistry": [r[1] for r in rows],
            "rated_capacity_ah": [r[2] for r in rows],
            "series_cells": [r[3] for r in rows],
            "current_max_discharge_a": [0.18 * r[2] for r in rows],
            "intake_soh": [0.9] * len(rows),
        }
    )
    return EnergyPacks.from_meta(meta)


# ------------------------------------------------------------------------------------------------
# 1. Energy to the floor
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chemistry", ["nmc811", "nmc532", "lfp", "lmo"])
def test_energy_at_zero_current_is_the_integral_of_the_ocv(chemistry: str) -> None:
    packs = one_pack(chemistry)
    chem = get_chemistry(chemistry)
    for soc in (0.15, 0.437, 0.8, 1.0):
        grid = np.linspace(FLOOR, soc, 20_001)
        expected = 96 * 90.0 * np.trapezoid(chem.ocv(grid), grid)
        got = float(zero_current_wh(packs, np.array([soc]), np.array([25.0]))[0])
        assert got == pytest.approx(expected, rel=1e-3)


def test_energy_is_zero_at_and_below_the_floor_and_grows_with_soc() -> None:
    packs = one_pack("lfp")
    socs = np.linspace(0.0, 1.0, 401)[:, None]
    e = zero_current_wh(packs, socs, np.array([25.0]))[:, 0]
    assert e.shape == (401,)
    assert np.all(e[socs[:, 0] <= FLOOR] == 0.0)
    above = socs[:, 0] > FLOOR
    assert np.all(np.diff(e[above]) > 0.0)
    assert np.all(np.diff(e) >= 0.0)


def test_ohmic_loss_reduces_the_energy_by_i_r_times_the_charge() -> None:
    packs = one_pack("nmc532", capacity_ah=171.0)
    chem = get_chemistry("nmc532")
    soc, current, temp = np.array([0.8]), np.array([0.5 * 171.0]), np.array([10.0])
    at_rest = float(zero_current_wh(packs, soc, temp)[0])
    loaded = float(energy_to_floor_wh(packs, soc, floor_soc=FLOOR, temp_c=temp, current_a=current)[0])
    assert loaded < at_rest
    # The loss is |I| x Ah x R_pack, R_pack between its values over the SoC swept.
    ah = 171.0 * 0.9 * (0.8 - FLOOR)
    grid = np.linspace(FLOOR, 0.8, 200)
    r_cell = chem.r0_ohm(171.0, grid, 10.0) + chem.r1_ohm(171.0, grid, 10.0) + chem.r2_ohm(171.0, grid, 10.0)
    r_pack = 96 * r_cell
    loss = at_rest - loaded
    assert 85.5 * ah * r_pack.min() <= loss <= 85.5 * ah * r_pack.max()
    assert loss == pytest.approx(85.5 * ah * float(np.mean(r_pack)), rel=0.01)
    # The sign of the current does not matter; a huge current leaves nothing (clipped at 0).
    assert float(energy_to_floor_wh(packs, soc, floor_soc=FLOOR, temp_c=temp, current_a=-current)[0]) == loaded
    assert float(energy_to_floor_wh(packs, soc, floor_soc=FLOOR, temp_c=temp, current_a=current * 1e4)[0]) == 0.0


def test_energy_broadcasts_over_draws_and_propagates_nan() -> None:
    socs = np.array([[0.8, 0.75, 0.7], [0.5, np.nan, 0.05]])
    e = energy_to_floor_wh(THREE, socs, floor_soc=FLOOR, temp_c=TEMP3, current_a=np.zeros(3))
    assert e.shape == (2, 3)
    assert np.isnan(e[1, 1])
    assert e[1, 2] == 0.0
    each = [float(zero_current_wh(THREE, row, TEMP3)[j]) for row in socs for j in range(3)]
    assert np.allclose(e.reshape(-1), each, equal_nan=True)
    # Per-pack floors broadcast too.
    floors = np.array([0.8, 0.0, 0.2])
    per_floor = energy_to_floor_wh(THREE, SOC3, floor_soc=floors, temp_c=TEMP3, current_a=np.zeros(3))
    assert per_floor[0] == 0.0
    assert per_floor[1] > zero_current_wh(THREE, SOC3, TEMP3)[1]


def test_from_meta_reads_the_contract_columns() -> None:
    meta = pl.DataFrame(
        {
            "pack": ["a", "b", "c"],
            "chemistry": ["nmc811", "lfp", "lmo"],
            "rated_capacity_ah": [300.0, 404.0, 66.2],
            "series_cells": [96, 120, 96],
            "intake_soh": [None, 0.8, 0.64],
            "voltage_min_v": [240.0, 300.0, 280.0],
            "current_max_discharge_a": [54.0, None, 1e4],
        },
        schema_overrides={"intake_soh": pl.Float64, "current_max_discharge_a": pl.Float64},
    )
    packs = EnergyPacks.from_meta(meta, capacity_ah={"c": 40.0}, capacity_rel_std=0.05)
    assert packs.pack_ids == ("a", "b", "c")
    assert np.allclose(packs.capacity_ah, [300.0, 404.0 * 0.8, 40.0])
    assert np.allclose(packs.capacity_rel_std, 0.05)
    # meta's v_min per cell where higher than the chemistry's: 2.5 vs 240/96; 2.0 vs 2.5; 3.0 vs 2.92.
    assert np.allclose(packs.v_min_cell_v, [2.5, 2.5, 3.0])
    # A null limit is unknown (the cell type's rating still applies), and the rating caps a large one.
    assert np.allclose(packs.i_dis_max_a, [54.0, 6.6 * 404.0, 3.0 * 66.2])
    assert not packs.capacity_ah.flags.writeable
    with pytest.raises(EstimatorError, match="capacity_ah"):
        dataclasses.replace(packs, capacity_ah=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(EstimatorError, match="unique"):
        dataclasses.replace(packs, pack_ids=("a", "a", "c"))


# ------------------------------------------------------------------------------------------------
# 2. Runtime by forward simulation
# ------------------------------------------------------------------------------------------------


def runtime(power_w: float, soc: F64 = SOC3, available: NDArray[np.bool_] = ALL3, **kw: float) -> float:
    out = time_to_floor_s(
        THREE,
        power_w,
        soc[None, :],
        temp_c=TEMP3,
        available=available,
        floor_soc=FLOOR,
        options=OutlookOptions(**kw),  # type: ignore[arg-type]
    )
    assert out.shape == (1,)
    return float(out[0])


def power_limit_w(soc: F64) -> float:
    """The sum of the three packs' discharge power limits at ``soc`` (the chemistry's own methods)."""
    total = 0.0
    for j, name in enumerate(THREE.chemistry):
        chem, series, rated = get_chemistry(name), THREE.series[j], THREE.rated_group_ah[j]
        r_cell = sum(f(rated, soc[j], TEMP3[j]) for f in (chem.r0_ohm, chem.r1_ohm, chem.r2_ohm))
        r = series * float(r_cell) + THREE.series_r_ohm[j]
        voc = series * float(chem.ocv(soc[j]))
        i = max(min(THREE.i_dis_max_a[j], (voc - series * THREE.v_min_cell_v[j]) / r), 0.0)
        total += i * (voc - i * r)
    return total


def test_runtime_at_small_power_is_energy_over_power() -> None:
    energy = float(zero_current_wh(THREE, SOC3, TEMP3).sum())
    power = 5_000.0
    assert runtime(power) == pytest.approx(energy * 3600.0 / power, rel=0.02)
    assert runtime(power) < energy * 3600.0 / power  # the ohmic loss


def test_runtime_near_the_power_limit_is_much_shorter_than_energy_over_power() -> None:
    energy = float(zero_current_wh(THREE, SOC3, TEMP3).sum())
    power = 0.97 * power_limit_w(SOC3)
    found = runtime(power)
    assert 0.0 < found < 0.5 * energy * 3600.0 / power
    # Above the sum of the limits the site cannot carry the power at all (one short step credited).
    assert runtime(1.05 * power_limit_w(SOC3)) <= OutlookOptions().min_dt_s


def test_unavailable_packs_contribute_nothing() -> None:
    without_lfp = np.array([True, False, True])
    base = runtime(8_000.0, available=without_lfp)
    assert runtime(8_000.0, soc=np.array([0.8, 0.2, 0.7]), available=without_lfp) == base
    assert runtime(8_000.0, soc=np.array([0.8, np.nan, 0.7]), available=ALL3) == base
    energy = float(zero_current_wh(THREE, SOC3, TEMP3)[without_lfp].sum())
    assert base == pytest.approx(energy * 3600.0 / 8_000.0, rel=0.03)
    assert runtime(8_000.0, available=np.zeros(3, dtype=bool)) == 0.0


def test_horizon_nan_and_shape_rules() -> None:
    assert runtime(50.0) == math.inf
    assert runtime(5_000.0, horizon_s=3600.0) == math.inf
    assert math.isnan(runtime(0.0))
    assert math.isnan(runtime(-1_000.0))
    with pytest.raises(EstimatorError, match="shape"):
        time_to_floor_s(THREE, 1_000.0, SOC3, temp_c=TEMP3, available=ALL3, floor_soc=FLOOR)
    with pytest.raises(EstimatorError, match="target_steps"):
        OutlookOptions(target_steps=0)


def test_scenarios_side_by_side_equal_one_at_a_time() -> None:
    socs = np.array([[0.8, 0.75, 0.7], [0.4, 0.9, 0.3], [0.12, 0.11, 0.5]])
    together = time_to_floor_s(THREE, 20_000.0, socs, temp_c=TEMP3, available=ALL3, floor_soc=FLOOR)
    alone = [runtime(20_000.0, soc=row) for row in socs]
    assert together.tolist() == alone
    assert together[0] > together[2] > 0.0


# ------------------------------------------------------------------------------------------------
# 3. Agreement with a slow reference simulation
# ------------------------------------------------------------------------------------------------


def _water_fill_loop(total: float, weight: list[float], cap: list[float]) -> list[float]:
    """Iterative water-filling: share in proportion to weight, clip the over-cap packs, repeat."""
    share = [0.0] * len(weight)
    free = [w > 0.0 and c > 0.0 for w, c in zip(weight, cap, strict=True)]
    while True:
        rest = total - sum(share[j] for j in range(len(share)) if not free[j])
        w_free = sum(w for w, f in zip(weight, free, strict=True) if f)
        if w_free <= 0.0 or rest <= 0.0:
            return [share[j] if not free[j] else 0.0 for j in range(len(share))]
        over = [j for j in range(len(share)) if free[j] and rest * weight[j] / w_free > cap[j]]
        if not over:
            return [rest * weight[j] / w_free if free[j] else share[j] for j in range(len(share))]
        for j in over:
            share[j], free[j] = cap[j], False


def reference_runtime_s(power_w: float, soc0: F64, dt_s: float) -> float:
    """The same physics, one pack and one step at a time with the chemistry's own methods."""
    soc = [float(s) for s in soc0]
    t = 0.0
    while True:
        energy, cap, voc, res, i_lim = [], [], [], [], []
        for j, name in enumerate(THREE.chemistry):
            chem, series, q = get_chemistry(name), float(THREE.series[j]), float(THREE.capacity_ah[j])
            rated, temp = float(THREE.rated_group_ah[j]), float(TEMP3[j])
            s = soc[j]
            grid = np.linspace(FLOOR, max(s, FLOOR), 401)
            e = series * q * float(np.trapezoid(chem.ocv(grid), grid))
            r_cell = sum(float(f(rated, s, temp)) for f in (chem.r0_ohm, chem.r1_ohm, chem.r2_ohm))
            r = series * r_cell + float(THREE.series_r_ohm[j])
            v = series * float(chem.ocv(s))
            i = max(min(float(THREE.i_dis_max_a[j]), (v - series * float(THREE.v_min_cell_v[j])) / r), 0.0)
            energy.append(e)
            cap.append(min(i * (v - i * r), e * 3600.0 / dt_s))
            voc.append(v)
            res.append(r)
            i_lim.append(i)
        share = _water_fill_loop(power_w, energy, cap)
        unserved = power_w - sum(share)
        if unserved > 0.005 * power_w:
            return t + dt_s * max(power_w - unserved, 0.0) / power_w
        for j in range(3):
            current = (voc[j] - math.sqrt(max(voc[j] ** 2 - 4.0 * res[j] * share[j], 0.0))) / (2.0 * res[j])
            current = min(current, i_lim[j])
            soc[j] -= current * dt_s / (float(THREE.capacity_ah[j]) * 3600.0)
        t += dt_s


@pytest.mark.parametrize(("share_of_limit", "dt_s"), [(0.35, 20.0), (0.97, 5.0)])
def test_runtime_agrees_with_a_slow_reference_simulation(share_of_limit: float, dt_s: float) -> None:
    power = share_of_limit * power_limit_w(SOC3)
    expected = reference_runtime_s(power, SOC3, dt_s)
    assert expected > 600.0
    assert runtime(power) == pytest.approx(expected, rel=0.02)


def test_dispatch_clips_packs_one_after_another_as_the_power_grows() -> None:
    """The compiled dispatch against the iterative water-filling, at every number of clipped packs.

    The runs above clip a pack or two; here the power sweeps the levels at which each pack
    reaches its cap (``cap / weight``), so the fill level is found with 0, 1, ... all packs
    at their caps, with two packs clipping at the same level, packs left out (weight 0) and
    one with no power left (cap 0), then beyond the sum of the caps.
    """
    rng = np.random.default_rng(4)
    n = 30
    weight = rng.uniform(1.0, 10.0, n)
    cap = weight * rng.uniform(50.0, 500.0, n)
    weight[[3, 17]] = 0.0  # left out
    cap[[3, 17, 21]] = 0.0  # and one at its limit already
    weight[5], cap[5], weight[6], cap[6] = 2.0, 500.0, 4.0, 1000.0  # the same level, 250 W per unit of weight
    live = np.flatnonzero((weight > 0.0) & (cap > 0.0))
    order = live[np.argsort(cap[live] / weight[live], kind="stable")]
    tied = int(np.flatnonzero(order == 5)[0])
    assert order[tied + 1] == 6
    # The power at which each pack clips: the caps below its level, plus its level times the weight from it on.
    levels = cap[order] / weight[order]
    from_it_on = np.cumsum(weight[order][::-1])[::-1]
    clips_at = np.concatenate(([0.0], np.cumsum(cap[order])[:-1])) + levels * from_it_on
    between = 0.5 * (np.concatenate(([0.0], clips_at[:-1])) + clips_at)
    clipped_counts = set()
    for total in [*between, *clips_at, 1.1 * cap.sum()]:
        share = np.full(n, np.nan)
        unserved = energy_module._dispatch(float(total), weight, cap, share)
        expected = _water_fill_loop(float(total), weight.tolist(), cap.tolist())
        np.testing.assert_allclose(share, expected, rtol=1e-12, atol=1e-9 * total)
        assert unserved == pytest.approx(max(total - cap.sum(), 0.0), abs=1e-9 * total)
        assert np.all(share <= cap)
        clipped_counts.add(int(np.sum(share[live] >= cap[live] * (1.0 - 1e-12))))
    # Every count of packs at their caps was met, but one: the tied pair clip together.
    assert clipped_counts == set(range(live.size + 1)) - {tied + 1}


@pytest.mark.parametrize("n", [1, 7, 8, 9, 127, 128, 129, 256, 257, 805, 1000, 4099])
def test_kernel_sums_add_in_numpys_order(n: int) -> None:
    """The kernels' sum is numpy's to the bit (its pairwise order): the simulation's results are the numpy version's."""
    draws = np.random.default_rng(n).uniform(1e3, 1e5, (8, n))  # like the packs' energies, Wh
    assert [energy_module._sum(a) for a in draws] == [a.sum() for a in draws]


# ------------------------------------------------------------------------------------------------
# 4. The site outlook
# ------------------------------------------------------------------------------------------------


def outlook(
    packs: EnergyPacks,
    soc: F64,
    soc_std: F64,
    *,
    battery_w: float | None,
    load_w: float | None,
    available: NDArray[np.bool_] | None = None,
    options: OutlookOptions | None = None,
) -> SiteOutlook:
    n = packs.n_packs
    return site_outlook(
        packs,
        soc=soc,
        soc_std=soc_std,
        temp_c=np.full(n, 25.0),
        current_a=np.zeros(n),
        available=np.ones(n, dtype=bool) if available is None else available,
        battery_w=battery_w,
        load_w=load_w,
        options=options or OutlookOptions(),
    )


def ordered(lo: float | None, mid: float | None, hi: float | None) -> bool:
    assert lo is not None
    assert mid is not None
    assert hi is not None
    return lo <= mid <= hi


def test_outlook_bands_are_ordered_and_widen_with_soc_std() -> None:
    packs = fleet(5)
    n = packs.n_packs
    soc = np.random.default_rng(3).uniform(0.4, 0.9, n)
    energy_wh = float(zero_current_wh(packs, soc, np.full(n, 25.0)).sum())
    power = energy_wh / 8.0  # about 8 h to the floor
    # Capacity errors independent between packs here (no common share), so that the SoC's
    # part of the site's error budget dominates and the widening shows in full.
    independent = OutlookOptions(capacity_error_correlation=0.0)
    narrow = outlook(packs, soc, np.full(n, 0.01), battery_w=power, load_w=1.5 * power, options=independent)
    wide = outlook(packs, soc, np.full(n, 0.05), battery_w=power, load_w=1.5 * power, options=independent)
    for o in (narrow, wide):
        assert o.energy_kwh_p5 < o.energy_kwh < o.energy_kwh_p95
        assert o.soc_p5 < o.soc < o.soc_p95
        assert ordered(o.runtime_s_p5, o.runtime_s_p50, o.runtime_s_p95)
        assert ordered(o.ridethrough_s_p5, o.ridethrough_s_p50, o.ridethrough_s_p95)
        assert np.all(o.pack_energy_kwh_p5 <= o.pack_energy_kwh)
        assert np.all(o.pack_energy_kwh <= o.pack_energy_kwh_p95)
        assert o.runtime_s_p50 is not None
        assert o.ridethrough_s_p50 is not None
        assert o.ridethrough_s_p50 < o.runtime_s_p50
    assert narrow.energy_kwh == wide.energy_kwh
    assert wide.energy_kwh_p95 - wide.energy_kwh_p5 > 1.5 * (narrow.energy_kwh_p95 - narrow.energy_kwh_p5)
    assert np.all(
        wide.pack_energy_kwh_p95 - wide.pack_energy_kwh_p5 > narrow.pack_energy_kwh_p95 - narrow.pack_energy_kwh_p5
    )
    assert wide.runtime_s_p5 is not None
    assert narrow.runtime_s_p5 is not None
    assert wide.runtime_s_p95 is not None
    assert narrow.runtime_s_p95 is not None
    assert wide.runtime_s_p95 - wide.runtime_s_p5 > 1.5 * (narrow.runtime_s_p95 - narrow.runtime_s_p5)
    # Well below the power limits, each runtime scenario carries its energy quantile.
    assert wide.runtime_s_p5 * power / 3.6e6 == pytest.approx(wide.energy_kwh_p5, rel=0.02)
    assert wide.runtime_s_p95 * power / 3.6e6 == pytest.approx(wide.energy_kwh_p95, rel=0.02)
    # The site SoC weighs each pack by its energy capacity.
    weight = packs.series * packs.capacity_ah * np.array([get_chemistry(c).v_nominal_v for c in packs.chemistry])
    assert wide.soc == pytest.approx(float((soc * weight).sum() / weight.sum()))


def test_only_the_shared_part_of_the_soc_error_loads_on_the_chemistry_s_common_error() -> None:
    """var_site = sum_i (b_i² - kappa² m_i²) + sum_c (kappa sum_i m_i)²: checked on the SoC-only budget.

    With every pack's error its own (shared 0) the site's variance is the sum of the packs';
    with all of it shared it gains the chemistry's common term; the default is all shared.
    """
    packs = fleet(5)
    n = packs.n_packs
    soc = np.random.default_rng(4).uniform(0.4, 0.9, n)
    std = np.full(n, 0.03)
    o = OutlookOptions(capacity_error_correlation=0.0)
    kappa = o.soc_error_correlation
    packs = dataclasses.replace(packs, capacity_rel_std=np.zeros(n))  # the SoC's budget alone

    def site(shared: F64 | None) -> float:
        out = site_outlook(
            packs,
            soc=soc,
            soc_std=std,
            soc_std_shared=shared,
            temp_c=np.full(n, 25.0),
            current_a=np.zeros(n),
            available=np.ones(n, dtype=bool),
            battery_w=None,
            load_w=None,
            options=o,
        )
        return (out.energy_kwh_p95 - out.energy_kwh) / o.quantile_z

    own, half, default = site(np.zeros(n)), site(0.5 * std), site(None)
    assert default == pytest.approx(site(std), rel=1e-12)
    # b_i from the per-pack bands at zero current: dE/dsoc times the SoC std, in kWh.
    packs_out = site_outlook(
        packs, soc=soc, soc_std=std, temp_c=np.full(n, 25.0), current_a=np.zeros(n),
        available=np.ones(n, dtype=bool), battery_w=None, load_w=None, options=o,
    )  # fmt: skip
    b = (packs_out.pack_energy_kwh_p95 - packs_out.pack_energy_kwh_p5) / (2.0 * o.quantile_z)
    chem = np.unique(packs.chemistry, return_inverse=True)[1]

    def expected(m: F64) -> float:
        common = np.bincount(chem, weights=kappa * m)
        return float(np.sqrt(np.sum(b * b - (kappa * m) ** 2) + np.sum(common**2)))

    assert own == pytest.approx(expected(np.zeros(n)), rel=2e-3)
    assert half == pytest.approx(expected(0.5 * b), rel=2e-3)
    assert default == pytest.approx(expected(b), rel=2e-3)
    assert own < half < default


def test_outlook_energy_band_matches_a_monte_carlo_draw() -> None:
    packs = fleet(3)
    n = packs.n_packs
    rng = np.random.default_rng(11)
    soc = rng.uniform(0.35, 0.85, n)
    std = rng.uniform(0.01, 0.05, n)
    options = OutlookOptions(soc_error_correlation=0.6, capacity_error_correlation=0.5)
    found = outlook(packs, soc, std, battery_w=None, load_w=None, options=options)
    draws = 20_000
    kappa, rho = options.soc_error_correlation, options.capacity_error_correlation
    # Each pack's error: its own part and its loading on an error common to its chemistry's packs.
    chem = np.unique(np.array(packs.chemistry), return_inverse=True)[1]
    n_chem = int(chem.max()) + 1
    soc_common = rng.standard_normal((draws, n_chem))[:, chem]
    cap_common = rng.standard_normal((draws, n_chem))[:, chem]
    soc_d = soc + std * (np.sqrt(1.0 - kappa**2) * rng.standard_normal((draws, n)) + kappa * soc_common)
    rel = packs.capacity_rel_std
    cap_d = 1.0 + rel * (np.sqrt(1.0 - rho**2) * rng.standard_normal((draws, n)) + rho * cap_common)
    site = (zero_current_wh(packs, np.clip(soc_d, 0.0, 1.0), np.full(n, 25.0)) * cap_d).sum(axis=1) / 1000.0
    p5, p50, p95 = np.quantile(site, [0.05, 0.5, 0.95])
    assert found.energy_kwh == pytest.approx(p50, rel=0.01)
    assert found.energy_kwh_p5 == pytest.approx(p5, rel=0.01)
    assert found.energy_kwh_p95 == pytest.approx(p95, rel=0.01)
    # Per pack: the 5th and 95th percentiles of each pack's own draw.
    pack_d = zero_current_wh(packs, np.clip(soc_d, 0.0, 1.0), np.full(n, 25.0)) * cap_d / 1000.0
    lo, hi = np.quantile(pack_d, [0.05, 0.95], axis=0)
    assert np.allclose(found.pack_energy_kwh_p5, lo, rtol=0.05)
    assert np.allclose(found.pack_energy_kwh_p95, hi, rtol=0.05)


def test_scenarios_of_several_powers_side_by_side_give_each_its_own_result() -> None:
    """Rows are simulated independently: stacked with rows of another power, each is bit for bit as alone."""
    packs = fleet(4)
    n = packs.n_packs
    rng = np.random.default_rng(5)
    soc = np.clip(rng.uniform(0.3, 0.9, n)[None, :] + np.array([[-0.03], [0.0], [0.03]]), 0.0, 1.0)
    power = float(zero_current_wh(packs, soc[1], np.full(n, 25.0)).sum()) / 6.0  # about 6 h
    kw = {"temp_c": np.full(n, 25.0), "available": np.ones(n, dtype=bool), "floor_soc": 0.1}
    # 3x the power makes the packs' current limits bind: that row takes the water-filling path.
    alone = [time_to_floor_s(packs, w, soc, **kw) for w in (power, 3.0 * power)]
    stacked = time_to_floor_s(packs, np.repeat([power, 3.0 * power], 3), np.concatenate([soc, soc]), **kw)
    np.testing.assert_array_equal(stacked, np.concatenate(alone))
    assert np.all(np.diff(alone[0]) > 0.0)
    assert np.all(alone[1] < alone[0])
    # A row without a positive power is NaN; the others as before.
    mixed = time_to_floor_s(packs, np.array([power, -1.0, power]), soc, **kw)
    assert np.isnan(mixed[1])
    np.testing.assert_array_equal(mixed[[0, 2]], alone[0][[0, 2]])
    with pytest.raises(EstimatorError, match="one per scenario"):
        time_to_floor_s(packs, np.array([power, power]), soc, **kw)


def test_outlook_without_discharge_or_packs() -> None:
    soc, std = SOC3, np.full(3, 0.02)
    charging = outlook(THREE, soc, std, battery_w=-3_000.0, load_w=12_000.0)
    assert charging.runtime_s_p5 is None
    assert charging.runtime_s_p50 is None
    assert charging.runtime_s_p95 is None
    assert ordered(charging.ridethrough_s_p5, charging.ridethrough_s_p50, charging.ridethrough_s_p95)
    unknown = outlook(THREE, soc, std, battery_w=None, load_w=None)
    assert unknown.runtime_s_p50 is None
    assert unknown.ridethrough_s_p50 is None
    some = outlook(THREE, soc, std, battery_w=5_000.0, load_w=None, available=np.array([True, False, True]))
    assert np.isnan(some.pack_energy_kwh[1])
    assert np.isnan(some.pack_energy_kwh_p5[1])
    assert some.energy_kwh == pytest.approx(float(np.nansum(some.pack_energy_kwh)))
    none = outlook(THREE, soc, std, battery_w=5_000.0, load_w=5_000.0, available=np.zeros(3, dtype=bool))
    assert none.runtime_s_p50 is None
    assert none.ridethrough_s_p50 is None
    assert none.energy_kwh == 0.0
    assert math.isnan(none.soc)


def test_outlook_is_deterministic_and_leaves_its_inputs_alone() -> None:
    packs = fleet(4)
    n = packs.n_packs
    rng = np.random.default_rng(5)
    soc = rng.uniform(0.2, 0.9, n)
    soc[3] = np.nan
    inputs: dict[str, NDArray[np.generic]] = {
        "soc": soc,
        "soc_std": rng.uniform(0.0, 0.05, n),
        "temp_c": rng.uniform(5.0, 40.0, n),
        "current_a": rng.uniform(-20.0, 40.0, n),
        "available": rng.uniform(size=n) > 0.1,
    }
    copies = {k: v.copy() for k, v in inputs.items()}
    for v in inputs.values():
        v.flags.writeable = False

    def call() -> SiteOutlook:
        return site_outlook(
            packs,
            soc=soc,
            soc_std=as_f64(inputs["soc_std"]),
            temp_c=as_f64(inputs["temp_c"]),
            current_a=as_f64(inputs["current_a"]),
            available=inputs["available"].astype(np.bool_, copy=False),
            battery_w=40_000.0,
            load_w=60_000.0,
        )

    first, second = call(), call()
    for f in dataclasses.fields(SiteOutlook):
        a, b = getattr(first, f.name), getattr(second, f.name)
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b, equal_nan=True), f.name
            assert not a.flags.writeable
        else:
            assert a == b, f.name
    for k, v in inputs.items():
        assert np.array_equal(v, copies[k], equal_nan=True), k
    assert math.isnan(first.pack_energy_kwh[3])


def as_f64(a: NDArray[np.generic]) -> F64:
    """The same array, typed as float64 (no copy)."""
    return a.astype(np.float64, copy=False)


def test_module_doctests_pass() -> None:
    result = doctest.testmod(energy_module)
    assert result.failed == 0
    assert result.attempted >= 3


def test_outlook_speed_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    packs = fleet(200)
    n = packs.n_packs
    soc = np.random.default_rng(2).uniform(0.5, 0.9, n)
    power = float(zero_current_wh(packs, soc, np.full(n, 25.0)).sum()) / 10.0
    args = {
        "soc": soc,
        "soc_std": np.full(n, 0.02),
        "temp_c": np.full(n, 25.0),
        "current_a": np.zeros(n),
        "available": np.ones(n, dtype=bool),
        "battery_w": power,
        "load_w": 1.2 * power,
    }
    site_outlook(packs, **args)  # type: ignore[arg-type]
    started = time.perf_counter()
    out = site_outlook(packs, **args)  # type: ignore[arg-type]
    elapsed_ms = (time.perf_counter() - started) * 1e3
    with capsys.disabled():
        print(f"\nsite_outlook, {n} packs, ~10 h to the floor: {elapsed_ms:.1f} ms")
    assert out.runtime_s_p50 == pytest.approx(10.0 * 3600.0, rel=0.02)


# ------------------------------------------------------------------------------------------------
# 5. Against the emulator's truth
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulated() -> Emulation:
    emu = Emulation(load_scenario("small"), EmulationOptions(duration_s=120.0, chunk_s=120.0, truth=False))
    for _ in emu.chunks():
        pass
    return emu


@pytest.mark.parametrize("power_w", [47_000.0, 120_000.0])
def test_energy_and_runtime_agree_with_the_emulator_truth(emulated: Emulation, power_w: float) -> None:
    bank = emulated.bank
    n = emulated.fleet.n_packs
    capacity = bank.pack_capacity_ah()  # the strings' true usable capacity
    packs = EnergyPacks.from_meta(
        emulated.fleet.meta, capacity_ah=dict(zip(emulated.fleet.pack_ids, capacity.tolist(), strict=True))
    )
    soc, temp = bank.pack_soc(), bank.temp_c.copy()
    current = np.zeros(n)
    found = site_outlook(
        packs,
        soc=soc,
        soc_std=np.full(n, 1e-9),
        temp_c=temp,
        current_a=current,
        available=np.ones(n, dtype=bool),
        battery_w=power_w,
        load_w=power_w,
    )
    true_kwh = float(bank.energy_to_floor_wh(FLOOR, current).sum()) / 1000.0
    assert found.energy_kwh == pytest.approx(true_kwh, rel=0.03)
    true_s = truth.time_to_floor_s(bank, power_w, floor_soc=FLOOR, env_temp_c=temp, excluded=np.zeros(n, dtype=bool))
    assert 0.0 < true_s < math.inf
    assert found.runtime_s_p50 == pytest.approx(true_s, rel=0.05)
    assert found.ridethrough_s_p50 == found.runtime_s_p50
    assert found.runtime_s_p5 is not None
    assert found.runtime_s_p95 is not None
    assert found.runtime_s_p5 < true_s < found.runtime_s_p95
