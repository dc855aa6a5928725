"""Scenario models, the packaged scenarios, and their loading and scaling."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulators.scenario import (
    IDENTIFIER_PATTERN,
    NOMINAL_CELL_VOLTAGE_V,
    Beta,
    Chemistry,
    Scenario,
    TruncNormal,
    Uniform,
    list_scenarios,
    load_scenario,
    parse_scenario,
)
from twin.errors import ScenarioError


def _toml_text(name: str) -> str:
    return (resources.files("emulators") / "scenarios" / f"{name}.toml").read_text(encoding="utf-8")


def _raw(name: str) -> dict[str, Any]:
    return tomllib.loads(_toml_text(name))


@pytest.fixture(scope="module")
def nevada() -> Scenario:
    return load_scenario("nevada")


# --------------------------------------------------------------------------- packaged scenarios


def test_packaged_scenarios_are_listed_and_load() -> None:
    names = list_scenarios()
    assert {"nevada", "small", "cold_lfp"} <= set(names)
    for name in names:
        assert isinstance(load_scenario(name), Scenario)


def test_nevada_matches_the_reference_site(nevada: Scenario) -> None:
    assert 780 <= nevada.pack_count <= 830
    assert nevada.nameplate_energy_mwh == pytest.approx(63.0, rel=0.02)
    assert nevada.nameplate_power_mw == pytest.approx(12.0, rel=0.02)
    # Rated (as-new) energy is larger: the second-life packs have faded.
    assert nevada.rated_energy_mwh > nevada.nameplate_energy_mwh * 1.05


def test_nevada_mixes_new_and_second_life_packs(nevada: Scenario) -> None:
    new = [g for g in nevada.pack_groups if g.life == "new"]
    second = [g for g in nevada.pack_groups if g.life == "second_life"]
    assert {g.chemistry for g in new} == {"nmc811"}
    assert all(g.cell_capacity_ah == pytest.approx(100.0, rel=0.1) for g in new)
    assert {g.chemistry for g in second} >= {"nmc532", "lmo", "lfp"}
    assert len({g.oem for g in second}) >= 3
    new_share = sum(g.count for g in new) / nevada.pack_count
    assert 0.1 < new_share < 0.6


def test_second_life_starting_soh_spans_060_to_095(nevada: Scenario) -> None:
    second = [g for g in nevada.pack_groups if g.life == "second_life"]
    assert min(g.soh.low for g in second) == pytest.approx(0.60, abs=0.02)
    assert max(g.soh.high for g in second) == pytest.approx(0.95, abs=0.02)
    rng = np.random.default_rng(1)
    drawn = np.concatenate([g.soh.sample(rng, g.count) for g in second])
    assert drawn.min() >= 0.60
    assert drawn.max() <= 0.95
    assert np.quantile(drawn, 0.05) < 0.68
    assert np.quantile(drawn, 0.95) > 0.88


def test_leaf_gen1_packs_follow_gao_2024(nevada: Scenario) -> None:
    (leaf,) = [g for g in nevada.pack_groups if g.chemistry == "lmo"]
    assert leaf.soh.low >= 0.60
    assert leaf.soh.high <= 0.67
    assert 0.60 < leaf.soh.expected_value < 0.67


def test_new_packs_start_near_full_health(nevada: Scenario) -> None:
    for g in nevada.pack_groups:
        if g.life == "new":
            assert g.soh.expected_value > 0.98


def test_small_is_nevada_cut_to_twelve_packs(nevada: Scenario) -> None:
    small = load_scenario("small")
    cut = nevada.scaled(12)
    assert small.pack_count == 12
    assert [g.count for g in small.pack_groups] == [g.count for g in cut.pack_groups]
    assert [g.name for g in small.pack_groups] == [g.name for g in nevada.pack_groups]
    assert small.load.it_base_mw == pytest.approx(cut.load.it_base_mw, rel=0.02)
    assert small.solar.dc_mw == pytest.approx(cut.solar.dc_mw, rel=0.02)


def test_cold_lfp_is_mostly_second_life_lfp() -> None:
    cold = load_scenario("cold_lfp")
    lfp = sum(g.count for g in cold.pack_groups if g.chemistry == "lfp" and g.life == "second_life")
    assert lfp / cold.pack_count >= 0.6
    # Weak heating: the heater cannot hold the setpoint at −10 °C.
    c = cold.container
    assert c.heating_capacity_w_per_pack < c.envelope_ua_w_per_k_per_pack * (c.heating_setpoint_c + 10.0)


def test_every_chemistry_has_a_nominal_voltage() -> None:
    assert set(NOMINAL_CELL_VOLTAGE_V) == set(get_args(Chemistry))
    assert NOMINAL_CELL_VOLTAGE_V["nmc811"] == 3.65
    assert NOMINAL_CELL_VOLTAGE_V["lfp"] == 3.2
    assert NOMINAL_CELL_VOLTAGE_V["lmo"] == 3.75


def test_pack_energy_and_power_follow_the_configuration(nevada: Scenario) -> None:
    g = nevada.group("ultium_new")
    assert g.rated_energy_wh == pytest.approx(96 * 3.65 * 3 * 100.0)
    assert g.max_discharge_power_w == pytest.approx(g.rated_energy_wh * g.max_discharge_c_rate)


def test_pack_ids_are_unique_contract_identifiers(nevada: Scenario) -> None:
    ids = nevada.pack_ids()
    assert len(ids) == len(set(ids)) == nevada.pack_count
    assert all(re.fullmatch(IDENTIFIER_PATTERN, i) for i in ids)


def test_start_is_normalised_to_utc() -> None:
    text = _toml_text("small").replace("start = 2025-07-01T07:00:00Z", "start = 2025-07-01T00:00:00-07:00")
    s = parse_scenario(tomllib.loads(text))
    assert s.start.utcoffset() is not None
    assert s.start.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert s.start.hour == 7


# --------------------------------------------------------------------------- rejection


@pytest.mark.parametrize(
    ("anchor", "occurrence", "key", "path"),
    [
        ("site = ", 0, "sitee", "sitee"),
        ("[load]\n", 0, "it_base_kw", "load.it_base_kw"),
        ("[solar.clouds]\n", 0, "overcast", "solar.clouds.overcast"),
        ("[[pack_groups]]\n", 1, "chemestry", "pack_groups[1].chemestry"),
        ("cells = { ", 0, "capacity_sd", "pack_groups[0].cells.capacity_sd"),
        ("[[faults]]\n", 0, "capacity_factr", "faults[0].capacity_factr"),
    ],
)
def test_unknown_key_in_a_user_file_is_named(tmp_path: Path, anchor: str, occurrence: int, key: str, path: str) -> None:
    text = _insert_after(_toml_text("small"), anchor, occurrence, f"{key} = 1")
    file = tmp_path / "user.toml"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(file)
    message = str(info.value)
    assert str(file) in message
    assert f"{path}: unknown key {key!r}" in message


def test_unknown_key_suggests_the_near_miss() -> None:
    data = _raw("small")
    data["pack_groups"][1]["chemestry"] = "lfp"
    with pytest.raises(ScenarioError, match=r"did you mean 'chemistry'\?"):
        parse_scenario(data, source="user.toml")


@pytest.mark.parametrize("site", ["bad site", "", "a" * 65, "a/b", "a+b", "séte"])
def test_bad_site_id_is_rejected(site: str) -> None:
    data = _raw("small")
    data["site"] = site
    with pytest.raises(ScenarioError, match=r"user\.toml: site:"):
        parse_scenario(data, source="user.toml")


def test_naive_or_quoted_start_is_rejected() -> None:
    for text in (
        _toml_text("small").replace("start = 2025-07-01T07:00:00Z", "start = 2025-07-01T07:00:00"),
        _toml_text("small").replace("start = 2025-07-01T07:00:00Z", 'start = "2025-07-01T07:00:00Z"'),
    ):
        with pytest.raises(ScenarioError, match=r"start:"):
            parse_scenario(tomllib.loads(text))


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["pack_groups"][0].update(chemistry="nmc622"), "pack_groups[0].chemistry"),
        (lambda d: d["pack_groups"][0].update(count="4"), "pack_groups[0].count"),
        (lambda d: d["pack_groups"][1]["soh"].update(low=0.99), "pack_groups[1].soh"),
        (lambda d: d["pack_groups"][0].update(soh={"kind": "uniform", "low": 0.7, "high": 0.8}), "near 1.0"),
        (lambda d: d["faults"][0]["target"].update(group="bolt"), "did you mean 'bolt_2l'"),
        (lambda d: d["faults"][0]["target"].update(index=99), "faults[0]: index 99"),
        (lambda d: d["faults"][0].update(kind="weak_cel"), "did you mean 'weak_cell'"),
        (lambda d: d["pack_groups"][1].update(name="ultium_new"), "repeated: ultium_new"),
        (lambda d: d["dispatch"].update(reserve_floor_soc=0.95), "reserve_floor_soc"),
        (lambda d: d["load"].update(it_base_mw=float("nan")), "load.it_base_mw"),
    ],
)
def test_bad_values_are_rejected_with_their_path(mutate: Any, fragment: str) -> None:
    data = _raw("small")
    mutate(data)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, source="user.toml")
    assert fragment in str(info.value)


def test_unknown_packaged_name_suggests_one() -> None:
    with pytest.raises(ScenarioError, match=r"did you mean 'nevada'\?"):
        load_scenario("nevda")


def test_missing_file_and_bad_toml_are_scenario_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("site = 'x'\n[load\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        load_scenario(bad)


def test_models_are_frozen(nevada: Scenario) -> None:
    with pytest.raises(ValueError, match="frozen"):
        nevada.seed = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- scaling


def test_scaled_to_twelve_keeps_every_group(nevada: Scenario) -> None:
    cut = nevada.scaled(12)
    counts = [g.count for g in cut.pack_groups]
    assert sum(counts) == 12
    assert all(c >= 1 for c in counts)
    assert [g.name for g in cut.pack_groups] == [g.name for g in nevada.pack_groups]
    # Load, PV and grid shrink with the energy, so hours of storage per unit load hold.
    ratio = cut.nameplate_energy_mwh / nevada.nameplate_energy_mwh
    assert cut.load.it_base_mw == pytest.approx(nevada.load.it_base_mw * ratio)
    assert cut.solar.dc_mw == pytest.approx(nevada.solar.dc_mw * ratio)
    assert cut.solar.ac_mw == pytest.approx(nevada.solar.ac_mw * ratio)
    assert cut.grid.import_limit_mw == pytest.approx(nevada.grid.import_limit_mw * ratio)
    # Fault targets stay valid.
    for fault in cut.faults:
        if fault.target.group is not None and fault.target.index is not None:
            assert fault.target.index < cut.group(fault.target.group).count


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=9, max_value=3000))
def test_scaled_is_proportional(n: int) -> None:
    nevada = load_scenario("nevada")
    cut = nevada.scaled(n)
    counts = np.array([g.count for g in cut.pack_groups])
    quota = n * np.array([g.count for g in nevada.pack_groups]) / nevada.pack_count
    assert counts.sum() == n
    assert np.all(np.abs(counts - quota) < 1.0)


def test_scaled_below_the_group_count_fails(nevada: Scenario) -> None:
    with pytest.raises(ScenarioError, match="non-empty pack groups"):
        nevada.scaled(3)


# --------------------------------------------------------------------------- SoH distributions


@pytest.mark.parametrize(
    "dist",
    [
        TruncNormal(kind="truncnorm", mu=0.849, sigma=0.049, low=0.744, high=0.95),
        TruncNormal(kind="truncnorm", mu=1.0, sigma=0.005, low=0.98, high=1.0),
        Beta(kind="beta", alpha=1.8, beta=1.4, low=0.746, high=0.95),
        Uniform(kind="uniform", low=0.6, high=0.67),
    ],
)
def test_soh_samples_stay_in_range_with_the_stated_mean(dist: TruncNormal | Beta | Uniform) -> None:
    x = dist.sample(np.random.default_rng(7), 20_000)
    assert x.min() >= dist.low
    assert x.max() <= dist.high
    assert x.mean() == pytest.approx(dist.expected_value, abs=0.002)


# --------------------------------------------------------------------------- helpers


def _insert_after(text: str, anchor: str, occurrence: int, entry: str) -> str:
    """Insert ``entry`` at the ``occurrence``-th ``anchor``: a new line after a table header or
    top-level key line, or a first member of an inline table."""
    at = -1
    for _ in range(occurrence + 1):
        at = text.index(anchor, at + 1)
    if anchor.endswith("{ "):
        cut = at + len(anchor)
        return text[:cut] + entry + ", " + text[cut:]
    if anchor.endswith("\n"):
        cut = at + len(anchor)
        return text[:cut] + entry + "\n" + text[cut:]
    return text[:at] + entry + "\n" + text[at:]
