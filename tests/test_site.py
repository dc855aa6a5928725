"""Site emulation: ambient, PV, data-centre load, grid, dispatch and determinism."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import BaseModel

from emulators.scenario import DispatchPolicy, GridConfig, Scenario, load_scenario
from emulators.site import (
    ambient_temp_c,
    battery_request_w,
    datacentre_load_w,
    dispatch,
    grid_available,
    grid_power_w,
    site_trace,
    solar_power_w,
    time_grid_ms,
)

_H_MS = 3_600_000

M = TypeVar("M", bound=BaseModel)


def _with(model: M, **changes: Any) -> M:
    """Return a validated copy of ``model`` with some fields changed."""
    return type(model).model_validate({**model.model_dump(), **changes})


@pytest.fixture(scope="module")
def nevada() -> Scenario:
    return load_scenario("nevada")


def _day(iso_date: str, dt_s: float, start_hour_utc: int = 0) -> np.ndarray[Any, np.dtype[np.int64]]:
    start = datetime.fromisoformat(f"{iso_date}T{start_hour_utc:02d}:00:00+00:00")
    return time_grid_ms(start, 86_400.0, dt_s)


def test_time_grid_is_even_and_half_open() -> None:
    t = time_grid_ms(datetime(2025, 1, 1, tzinfo=UTC), 3600.0, 60.0)
    assert t.size == 60
    assert t[0] == 1_735_689_600_000
    assert set(np.diff(t).tolist()) == {60_000}
    with pytest.raises(ValueError, match="aware"):
        time_grid_ms(datetime(2025, 1, 1), 3600.0, 60.0)  # noqa: DTZ001 - the point of the test


# --------------------------------------------------------------------------- solar


def test_solar_is_zero_at_night_and_peaks_at_solar_noon(nevada: Scenario) -> None:
    # Sparks NV: 39.5 N, 119.5 W, so local solar noon is near 20:00 UTC.
    unclipped = _with(nevada.solar, ac_mw=1000.0)
    for date, eot_min in (("2025-06-21", -1.8), ("2025-12-21", 1.7), ("2025-03-20", -7.5)):
        t = _day(date, 60.0, start_hour_utc=8)  # local midnight (PST) to midnight
        p = solar_power_w(t, unclipped, np.random.default_rng(0), clear_sky=True)
        hour = 8.0 + (t - t[0]) / _H_MS
        noon = 12.0 - nevada.solar.longitude_deg / 15.0 - eot_min / 60.0
        assert noon == pytest.approx(20.0, abs=0.25)
        night = (hour % 24 > 5.0) & (hour % 24 < 11.0)  # 21:00-03:00 PST
        assert np.all(p[night] == 0.0)
        assert hour[np.argmax(p)] == pytest.approx(noon, abs=5 / 60)
        centroid = float((hour * p).sum() / p.sum())
        assert centroid == pytest.approx(noon, abs=5 / 60)


def test_clear_sky_peak_reaches_but_never_exceeds_the_ac_limit(nevada: Scenario) -> None:
    ac_w = nevada.solar.ac_mw * 1e6
    peaks = []
    for date in ("2025-03-20", "2025-06-21", "2025-12-21"):
        t = _day(date, 60.0)
        ambient = ambient_temp_c(t, nevada.climate, np.random.default_rng(1))
        p = solar_power_w(t, nevada.solar, np.random.default_rng(0), ambient_c=ambient, clear_sky=True)
        assert p.max() <= ac_w * (1 + 1e-12)
        assert p.min() >= 0.0
        peaks.append(p.max())
    assert max(peaks) == pytest.approx(ac_w, rel=0.05)
    assert min(peaks) > 0.6 * ac_w  # winter noon still produces


def test_clouds_are_persistent_and_reduce_yield(nevada: Scenario) -> None:
    t = time_grid_ms(datetime(2025, 4, 1, 7, tzinfo=UTC), 14 * 86_400.0, 60.0)
    cloudy = solar_power_w(t, nevada.solar, np.random.default_rng(3))
    clear = solar_power_w(t, nevada.solar, np.random.default_rng(3), clear_sky=True)
    assert cloudy.sum() < 0.95 * clear.sum()
    assert cloudy.sum() > 0.5 * clear.sum()
    day = clear > 0.2 * clear.max()
    ratio = cloudy[day] / clear[day]
    assert np.mean(ratio < 0.8) > 0.05  # clouds happen
    # Persistence: minute-to-minute changes are far smaller than the spread of the ratio.
    steps = np.abs(np.diff(ratio))
    assert np.median(steps) < 0.1 * np.std(ratio)


def test_ambient_follows_the_season(nevada: Scenario) -> None:
    july = ambient_temp_c(_day("2025-07-15", 600.0), nevada.climate, np.random.default_rng(0))
    january = ambient_temp_c(_day("2025-01-15", 600.0), nevada.climate, np.random.default_rng(0))
    assert july.mean() == pytest.approx(23.9, abs=6.0)
    assert january.mean() == pytest.approx(1.7, abs=6.0)
    assert july.max() - july.min() > 12.0  # desert diurnal swing


def test_cold_scenario_winter_runs_from_minus_10_to_plus_5() -> None:
    cold = load_scenario("cold_lfp")
    t = time_grid_ms(cold.start, 21 * 86_400.0, 600.0)
    temp = ambient_temp_c(t, cold.climate, np.random.default_rng(cold.seed))
    assert -6.0 < temp.mean() < 1.0
    assert np.quantile(temp, 0.05) < -7.0
    assert np.quantile(temp, 0.95) > 2.0
    assert temp.min() > -25.0
    assert temp.max() < 15.0


# --------------------------------------------------------------------------- data centre


def test_datacentre_mean_is_near_the_configured_level(nevada: Scenario) -> None:
    t = time_grid_ms(nevada.start, 3 * 86_400.0, 10.0)
    ambient = np.full(t.size, 20.0)
    load = datacentre_load_w(t, nevada.load, ambient, np.random.default_rng(5))
    assert load.it_w.mean() == pytest.approx(nevada.load.expected_it_mw * 1e6, rel=0.03)
    assert load.it_w.mean() == pytest.approx(nevada.load.it_base_mw * 1e6, rel=0.05)
    assert load.cooling_w.mean() == pytest.approx(0.15 * load.it_w.mean(), rel=0.01)
    np.testing.assert_allclose(load.total_w, load.it_w + load.cooling_w)


def test_checkpoint_dips_are_visible(nevada: Scenario) -> None:
    cfg = _with(
        nevada.load,
        training_job_slots=1,
        job_start_rate_per_h=1.0,
        job_stop_rate_per_h=0.0,  # one job that never stops
        inference_noise_sd=0.0,
        inference_diurnal_amplitude=0.0,
        checkpoint_period_jitter=0.0,
    )
    t = time_grid_ms(nevada.start, 86_400.0, 5.0)
    it = datacentre_load_w(t, cfg, np.full(t.size, 20.0), np.random.default_rng(2)).it_w
    full = cfg.it_base_mw * 1e6
    dip = full - cfg.it_base_mw * 1e6 * cfg.training_share * cfg.checkpoint_depth
    in_dip = np.isclose(it, dip)
    assert np.all(in_dip | np.isclose(it, full))
    starts = np.flatnonzero(np.diff(in_dip.astype(int)) == 1)
    assert len(starts) == pytest.approx(86_400 / cfg.checkpoint_period_s, abs=1)
    assert np.diff(starts).mean() * 5.0 == pytest.approx(cfg.checkpoint_period_s, rel=0.01)
    assert in_dip.sum() * 5.0 / len(starts) == pytest.approx(cfg.checkpoint_duration_s, abs=5.0)


def test_jobs_start_and_stop(nevada: Scenario) -> None:
    cfg = _with(nevada.load, job_start_rate_per_h=0.5, job_stop_rate_per_h=0.5, inference_noise_sd=0.0)
    t = time_grid_ms(nevada.start, 7 * 86_400.0, 60.0)
    it = datacentre_load_w(t, cfg, np.full(t.size, 20.0), np.random.default_rng(4)).it_w
    # Half the slots idle on average: the mean drops towards expected_it_mw, and big steps occur.
    assert it.mean() == pytest.approx(cfg.expected_it_mw * 1e6, rel=0.1)
    slot_w = cfg.it_base_mw * 1e6 * cfg.training_share / cfg.training_job_slots
    assert np.sum(np.abs(np.diff(it)) > 0.5 * slot_w * (1 - cfg.idle_fraction)) > 20


def test_pue_rises_with_ambient(nevada: Scenario) -> None:
    t = time_grid_ms(nevada.start, 3600.0, 60.0)
    cold = datacentre_load_w(t, nevada.load, np.full(t.size, 0.0), np.random.default_rng(0))
    hot = datacentre_load_w(t, nevada.load, np.full(t.size, 38.0), np.random.default_rng(0))
    np.testing.assert_array_equal(cold.it_w, hot.it_w)
    assert (hot.cooling_w / hot.it_w).mean() > (cold.cooling_w / cold.it_w).mean() + 0.1


# --------------------------------------------------------------------------- grid


def test_grid_availability_matches_its_setting() -> None:
    grid = GridConfig(import_limit_mw=1.0, export_limit_mw=0.0, availability=0.9, mean_outage_h=2.0)
    t = time_grid_ms(datetime(2025, 1, 1, tzinfo=UTC), 365 * 86_400.0, 600.0)
    up = grid_available(t, grid, np.random.default_rng(9))
    assert up.mean() == pytest.approx(0.9, abs=0.03)
    outages = np.sum(np.diff(up.astype(int)) == -1)
    assert outages == pytest.approx(365 * 24 * 0.1 / 2.0, rel=0.25)


def test_grid_covers_what_the_battery_cannot_and_reports_the_rest() -> None:
    grid = GridConfig(import_limit_mw=1.0, export_limit_mw=0.5)
    load = np.array([3e6, 3e6, 3e6, 0.0, 0.0, 0.0])
    solar = np.array([0.0, 0.0, 0.0, 2e6, 2e6, 2e6])
    battery = np.array([1.5e6, 2.5e6, 1.5e6, -1.0e6, -1.8e6, -1.0e6])
    up = np.array([True, True, False, True, True, False])
    b = grid_power_w(load, solar, battery, grid=grid, available=up)
    np.testing.assert_allclose(b.grid_w, [1e6, 0.5e6, 0.0, -0.5e6, -0.2e6, 0.0])
    np.testing.assert_allclose(b.unserved_w, [0.5e6, 0.0, 1.5e6, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(b.curtailed_w, [0.0, 0.0, 0.0, 0.5e6, 0.0, 1e6])
    np.testing.assert_allclose(load + b.curtailed_w, solar + battery + b.grid_w + b.unserved_w)


def test_battery_request_follows_the_policy() -> None:
    grid = GridConfig(import_limit_mw=1.0, export_limit_mw=0.5)
    solar_first = DispatchPolicy()
    export_first = DispatchPolicy(charge_from_solar_first=False)
    grid_charge = DispatchPolicy(grid_charging_allowed=True, target_soc=0.8)
    kw: dict[str, Any] = {"grid": grid, "grid_available": True}
    assert battery_request_w(3e6, 1e6, 0.5, policy=solar_first, **kw) == pytest.approx(2e6)
    assert battery_request_w(1e6, 3e6, 0.5, policy=solar_first, **kw) == pytest.approx(-2e6)
    assert battery_request_w(1e6, 3e6, 0.5, policy=export_first, **kw) == pytest.approx(-1.5e6)
    assert battery_request_w(1e6, 3e6, 0.5, policy=export_first, grid=grid, grid_available=False) == (
        pytest.approx(-2e6)
    )
    assert battery_request_w(3e6, 1e6, 0.5, policy=grid_charge, **kw) == pytest.approx(1e6)
    assert battery_request_w(1e6, 1e6, 0.5, policy=grid_charge, **kw) == pytest.approx(-1e6)
    assert battery_request_w(1e6, 1e6, 0.9, policy=grid_charge, **kw) == pytest.approx(0.0)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_water_fills_around_a_clipped_pack() -> None:
    r = dispatch(
        100.0,
        discharge_energy_wh=np.array([1.0, 1.0, 2.0, 5.0]),
        charge_headroom_wh=np.zeros(4),
        max_discharge_w=np.array([10.0, 100.0, 100.0, 100.0]),
        max_charge_w=np.zeros(4),
        excluded=np.array([False, False, False, True]),
    )
    np.testing.assert_allclose(r.pack_power_w, [10.0, 30.0, 60.0, 0.0])
    assert r.unserved_w == 0.0


def test_dispatch_reports_a_shortfall_and_honours_the_step_energy() -> None:
    r = dispatch(
        -500.0,
        discharge_energy_wh=np.ones(2),
        charge_headroom_wh=np.array([1.0, 100.0]),
        max_discharge_w=np.full(2, 1e3),
        max_charge_w=np.full(2, 150.0),
        excluded=np.zeros(2, dtype=bool),
        dt_s=60.0,
    )
    # The first pack can only take 1 Wh in 60 s = 60 W; the second is at its 150 W limit.
    np.testing.assert_allclose(r.pack_power_w, [-60.0, -150.0])
    assert r.unserved_w == pytest.approx(-290.0)


_packs = st.integers(min_value=1, max_value=40)


@st.composite
def _fleet(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(_packs)
    pos = st.floats(min_value=0.0, max_value=1e5, allow_nan=False, allow_infinity=False)
    return {
        "discharge_energy_wh": draw(hnp.arrays(np.float64, n, elements=pos)),
        "charge_headroom_wh": draw(hnp.arrays(np.float64, n, elements=pos)),
        "max_discharge_w": draw(hnp.arrays(np.float64, n, elements=pos)),
        "max_charge_w": draw(hnp.arrays(np.float64, n, elements=pos)),
        "excluded": draw(hnp.arrays(np.bool_, n)),
    }


@settings(max_examples=300, deadline=None)
@given(fleet=_fleet(), request_w=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_dispatch_conserves_power_and_respects_limits(fleet: dict[str, Any], request_w: float) -> None:
    r = dispatch(request_w, **fleet)
    p = r.pack_power_w
    scale = max(abs(request_w), 1.0)
    assert p.sum() + r.unserved_w == pytest.approx(request_w, abs=1e-9 * scale)
    assert np.all(p[fleet["excluded"]] == 0.0)
    limit = fleet["max_discharge_w"] if request_w >= 0 else fleet["max_charge_w"]
    assert np.all(np.abs(p) <= limit * (1 + 1e-12))
    assert np.all(p * np.sign(request_w) >= 0.0)
    assert r.unserved_w * request_w >= 0.0
    # A shortfall only when every pack that could help is at its limit.
    if abs(r.unserved_w) > 1e-9 * scale:
        weight = fleet["discharge_energy_wh"] if request_w >= 0 else fleet["charge_headroom_wh"]
        # Energy below a microwatt-hour counts as an empty pack (dispatch's _MIN_WEIGHT_WH).
        helping = ~fleet["excluded"] & (weight > 1e-6)
        np.testing.assert_allclose(np.abs(p[helping]), limit[helping], rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(fleet=_fleet(), request_w=st.floats(min_value=1.0, max_value=1e6))
def test_dispatch_splits_by_available_energy_when_no_limit_binds(fleet: dict[str, Any], request_w: float) -> None:
    energy = fleet["discharge_energy_wh"]
    # Energy below a microwatt-hour counts as an empty pack (dispatch's _MIN_WEIGHT_WH).
    usable = ~fleet["excluded"] & (energy > 1e-6)
    assume(energy[usable].sum() > 1e-3)
    fleet["max_discharge_w"] = np.full(energy.size, 1e12)  # no limit binds
    r = dispatch(request_w, **fleet)
    expected = np.where(usable, request_w * energy / energy[usable].sum(), 0.0)
    np.testing.assert_allclose(r.pack_power_w, expected, rtol=1e-9, atol=1e-9 * request_w)
    assert r.unserved_w == 0.0

    charge = dispatch(-request_w, **{**fleet, "max_charge_w": np.full(energy.size, 1e12)})
    headroom = fleet["charge_headroom_wh"]
    h_usable = ~fleet["excluded"] & (headroom > 1e-6)
    if headroom[h_usable].sum() > 1e-3:
        expected = np.where(h_usable, -request_w * headroom / headroom[h_usable].sum(), 0.0)
        np.testing.assert_allclose(charge.pack_power_w, expected, rtol=1e-9, atol=1e-9 * request_w)


def test_dispatch_rejects_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match="one length"):
        dispatch(
            1.0,
            discharge_energy_wh=np.ones(3),
            charge_headroom_wh=np.ones(3),
            max_discharge_w=np.ones(2),
            max_charge_w=np.ones(3),
            excluded=np.zeros(3, dtype=bool),
        )


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_arrays() -> None:
    small = load_scenario("small")
    a = site_trace(small, horizon_s=2 * 86_400.0, dt_s=30.0)
    b = site_trace(small, horizon_s=2 * 86_400.0, dt_s=30.0)
    c = site_trace(small, horizon_s=2 * 86_400.0, dt_s=30.0, rng=np.random.default_rng(small.seed + 1))
    for name in ("times_ms", "load_w", "it_load_w", "cooling_w", "solar_w", "ambient_c", "grid_available"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.load_w, c.load_w)
    assert not np.array_equal(a.ambient_c, c.ambient_c)


def test_site_trace_is_consistent_and_read_only() -> None:
    small = load_scenario("small")
    tr = site_trace(small, horizon_s=86_400.0, dt_s=60.0)
    assert tr.times_ms.size == 1440
    assert tr.times_ms[0] == int(small.start.timestamp() * 1000)
    np.testing.assert_allclose(tr.load_w, tr.it_load_w + tr.cooling_w)
    assert tr.solar_w.max() <= small.solar.ac_mw * 1e6 * (1 + 1e-12)
    with pytest.raises(ValueError, match="read-only"):
        tr.load_w[0] = 0.0


def test_uneven_times_are_accepted_and_unsorted_times_rejected(nevada: Scenario) -> None:
    t = time_grid_ms(nevada.start, 86_400.0, 60.0)
    uneven = np.sort(np.random.default_rng(0).choice(t, 500, replace=False))
    temp = ambient_temp_c(uneven, nevada.climate, np.random.default_rng(0))
    assert np.all(np.isfinite(temp))
    with pytest.raises(ValueError, match="increasing"):
        ambient_temp_c(uneven[::-1], nevada.climate, np.random.default_rng(0))
