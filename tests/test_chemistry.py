"""Tests for ``twin.chemistry``: tables, published bands, vectorisation, registry, LMO derivation.

The LMO tests re-derive the shipped parameters from the ORNL files copied into
``tests/data/nissan_leaf`` and check them against the numbers quoted in BATTERY_NOTES.md
(section 1.2) and against independent views of the same data.
"""

from __future__ import annotations

import dataclasses
import doctest
import types
from importlib import resources

import numpy as np
import numpy.typing as npt
import polars as pl
import pytest

import twin.chemistry as chem
from tests import leaf_data
from twin.chemistry import (
    CHEMISTRIES,
    CHEMISTRY_NAMES,
    CellChemistry,
    EcmFit,
    ValidityRange,
    base,
    fit,
    fit_arrhenius,
    fit_ecm_from_hppc,
    fit_rc_pairs_to_record,
    get_chemistry,
    lfp,
    lmo,
    load_table,
    nmc532,
    nmc811,
    ocv_from_slow_cycle,
)
from twin.errors import ChemistryError

FloatArray = npt.NDArray[np.float64]
SOC_10 = np.linspace(0.0, 1.0, 11)
MILLI = 1e3

# BATTERY_NOTES.md, section 1.1, "OCV table (V) at 10 % steps".
NOTES_OCV = {
    "nmc811": [2.500, 3.296, 3.485, 3.581, 3.667, 3.751, 3.841, 3.948, 4.042, 4.097, 4.200],
    "nmc532": [2.800, 3.511, 3.585, 3.639, 3.671, 3.716, 3.797, 3.880, 3.971, 4.077, 4.200],
    "lfp": [2.286, 3.197, 3.234, 3.270, 3.292, 3.299, 3.303, 3.311, 3.334, 3.342, 3.530],
}

# The notes quote mΩ to two decimals: accept values that round into the quoted range.
NOTES_ROUNDING_MOHM = 0.005

HPPC_FILES = {
    10.0: "NissanLeaf-cell-Low-Current-HPPC-10C.csv",
    25.0: "NissanLeaf-cell-Low-Current-HPPC-25C-2.csv",
    40.0: "NissanLeaf-cell-Low-Current-HPPC-40C-1.csv",
}
CYCLING_FILE = "NissanLeaf-cell-Cycling-10C-24C-40C.csv"
# Discharge segments of the first (24 °C) block; each charge is two segments later.
C15_DISCHARGE_SEGMENTS = (2, 6, 10, 14, 18)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hppc_fits() -> dict[float, EcmFit]:
    """Fit every HPPC file from the rest after its full charge."""
    fits = {}
    for temp_c, name in HPPC_FILES.items():
        df = leaf_data.hppc_from_full_charge(leaf_data.load_bitrode(leaf_data.DATA_DIR / name))
        fits[temp_c] = fit_ecm_from_hppc(
            df["time_s"].to_numpy(), df["current_a"].to_numpy(), df["voltage_v"].to_numpy()
        )
    return fits


@pytest.fixture(scope="module")
def cycling() -> pl.DataFrame:
    """The C/15 cycling record with cycler steps numbered."""
    return leaf_data.steps(leaf_data.load_bitrode(leaf_data.DATA_DIR / CYCLING_FILE))


def _segment(df: pl.DataFrame, segment: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    part = df.filter(pl.col("segment") == segment)
    return part["time_s"].to_numpy(), part["current_a"].to_numpy(), part["voltage_v"].to_numpy()


# -- tables --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEMISTRY_NAMES)
def test_ocv_table_is_strictly_increasing_on_a_full_grid(name: str) -> None:
    c = get_chemistry(name)
    assert c.soc_grid[0] == 0.0
    assert c.soc_grid[-1] == 1.0
    assert np.all(np.diff(c.soc_grid) > 0)
    assert np.all(np.diff(c.ocv_v) > 0)
    assert c.soc_grid.shape == c.ocv_v.shape == c.hyst_v.shape == c.entropic_v_per_k.shape


@pytest.mark.parametrize("name", sorted(NOTES_OCV))
def test_ocv_matches_battery_notes_table(name: str) -> None:
    got = get_chemistry(name).ocv(SOC_10)
    np.testing.assert_allclose(got, NOTES_OCV[name], atol=0.002)


@pytest.mark.parametrize("name", CHEMISTRY_NAMES)
def test_nominal_voltage_is_mean_ocv(name: str) -> None:
    c = get_chemistry(name)
    assert c.v_nominal_v == pytest.approx(np.trapezoid(c.ocv_v, c.soc_grid), abs=0.006)


def test_ocv_slope_nmc_versus_lfp() -> None:
    # Notes 1.1: dOCV/dSoC ≈ 0.9 V per unit SoC at mid SoC for Chen2020, 0.1-0.3 V for LFP.
    nmc = get_chemistry("nmc811").docv_dsoc(0.5)
    lfp_slope = get_chemistry("lfp").docv_dsoc(np.linspace(0.3, 0.9, 13))
    assert 0.7 < float(nmc) < 1.1
    assert np.all(lfp_slope < 0.35)
    assert np.all(get_chemistry("lmo").docv_dsoc(np.linspace(0, 1, 101)) > 0)


def test_lfp_hysteresis_and_entropy_follow_sony_tables() -> None:
    c = get_chemistry("lfp")
    h = c.hysteresis_v(np.linspace(0.05, 0.95, 91))
    assert np.all((h >= 0.017) & (h <= 0.030))
    # Notes 1.3: -0.49 mV/K at 0 %, -0.16 at 10 %, -0.12 at 20 %, then +0.10...+0.15 above 40 %.
    np.testing.assert_allclose(c.entropic([0.0, 0.1, 0.2]) * MILLI, [-0.490, -0.164, -0.118], atol=0.001)
    assert np.all((c.entropic(np.linspace(0.4, 1.0, 13)) * MILLI >= 0.08) & (c.entropic(0.7) * MILLI <= 0.15))
    for name in ("nmc811", "nmc532", "lmo"):
        other = get_chemistry(name)
        assert not np.any(other.hyst_v)
        if name != "lmo":
            assert not np.any(other.entropic_v_per_k)
    # lmo: one rough mean from the HPPC rests (test_lmo_entropic_coefficient_is_the_hppc_rest_mean).
    np.testing.assert_allclose(get_chemistry("lmo").entropic_v_per_k, lmo.ENTROPIC_MV_PER_K / MILLI)


# -- resistance bands ----------------------------------------------------------------


@pytest.mark.parametrize("name", CHEMISTRY_NAMES)
def test_ten_second_dcir_times_ah_in_cross_cell_band(name: str) -> None:
    # Notes 0.2 and 1.2: R x Ah of about 50-140 mΩ·Ah (1-10 s pulse, 25 °C, mid SoC).
    r_ah = float(get_chemistry(name).dcir_ohm(1.0, 0.5, 25.0, 10.0)) * MILLI
    assert 50.0 <= r_ah <= 140.0


def test_nmc811_total_dcir_in_brief_band() -> None:
    c = get_chemistry("nmc811")
    total = (c.r0_ohm_ah + c.r1_ohm_ah) * MILLI
    assert 77.0 <= total <= 100.0
    assert c.r0_ohm_ah / (c.r0_ohm_ah + c.r1_ohm_ah) == pytest.approx(0.4)
    assert c.tau1_s == pytest.approx(30.0)
    assert 20_000.0 <= c.activation_energy_j_per_mol <= 35_000.0


def test_nmc532_matches_kona_e63b_pulse_resistances() -> None:
    c = get_chemistry("nmc532")
    # Fischer et al. 2026 via the notes: logical-cell R_DC,10s 1.9-2.1 mΩ per 63 Ah cell.
    r10 = float(c.dcir_ohm(1.0, 0.5, 25.0, 10.0)) * MILLI
    assert 120.0 <= r10 <= 132.0
    # Pack R_DC(1 s) 56-59 mΩ over 98s3p, less ~3 % connectors: 105-114 mΩ·Ah per cell.
    r1s = float(c.dcir_ohm(1.0, 0.5, 25.0, 1.0)) * MILLI
    assert 105.0 <= r1s <= 114.0


def test_lfp_total_dcir_is_sony_table_value() -> None:
    c = get_chemistry("lfp")
    rint = load_table("CLFP_Sony_US26650_Rint.csv")
    r25_mid = float(np.interp(0.5, rint["SOC"], rint["R_DCh(T=25)"]))
    sony_capacity_ah = 3.0
    total = c.r0_ohm_ah + c.r1_ohm_ah
    assert total == pytest.approx(r25_mid * sony_capacity_ah, abs=1e-4)
    # Between the PulseBat retired LFP (110) and the Sony cell (143.5 mΩ·Ah).
    assert 110.0 <= total * MILLI <= 145.0


def test_lfp_activation_energy_is_fitted_to_sony_table() -> None:
    rint = load_table("CLFP_Sony_US26650_Rint.csv")
    band = (rint["SOC"] >= 0.2) & (rint["SOC"] <= 0.9)
    temps = (10.0, 25.0, 40.0)
    r_mean = [float(np.mean(rint[f"R_DCh(T={t:.0f})"][band])) for t in temps]
    ea = fit_arrhenius(temps, r_mean).ea_j_per_mol
    assert get_chemistry("lfp").activation_energy_j_per_mol == pytest.approx(round(ea, -2))


@pytest.mark.parametrize("name", CHEMISTRY_NAMES)
def test_arrhenius_factor_is_plausible(name: str) -> None:
    c = get_chemistry(name)
    assert float(c.arrhenius(25.0)) == pytest.approx(1.0)
    cold = float(c.arrhenius(10.0))
    # Ea of 12-40 kJ/mol gives a 10 -> 25 °C factor of 1.24-2.0.
    assert 1.2 <= cold <= 2.0
    factors = c.arrhenius(np.array([0.0, 10.0, 25.0, 40.0]))
    assert np.all(np.diff(factors) < 0)


@pytest.mark.parametrize("name", CHEMISTRY_NAMES)
def test_temp_factor_is_arrhenius_unless_a_table_is_given(name: str) -> None:
    c = get_chemistry(name)
    temps = np.linspace(-20.0, 60.0, 33)
    factors = c.temp_factor(temps)
    assert float(c.temp_factor(25.0)) == pytest.approx(1.0, abs=1e-15)
    assert np.all(np.diff(factors) < 0)
    assert 1.2 <= float(c.temp_factor(10.0)) <= 2.0
    if not c.temp_table_c:
        np.testing.assert_allclose(factors, c.arrhenius(temps), rtol=1e-15)
    else:
        # The table points are hit, and every resistance follows the table.
        np.testing.assert_allclose(c.temp_factor(c.temp_table_c), c.temp_table_factor, rtol=1e-12)
        np.testing.assert_allclose(c.r0_ohm(1.0, 0.5, temps), c.r0_ohm_ah * factors, rtol=1e-12)
        np.testing.assert_allclose(c.r2_ohm(1.0, 0.5, temps), c.r2_ohm_ah * factors, rtol=1e-12)


def _table_variant(temps: tuple[float, ...], factors: tuple[float, ...]) -> CellChemistry:
    return dataclasses.replace(get_chemistry("nmc811"), temp_table_c=temps, temp_table_factor=factors)


def test_temp_factor_table_is_piecewise_arrhenius() -> None:
    # Four points with knots on both sides of 25 °C: ln f is linear in 1/T on every interval
    # (its own activation energy) and beyond the ends (the end intervals').
    temps, factors = (0.0, 15.0, 25.0, 45.0), (3.0, 1.5, 1.0, 0.8)
    c = _table_variant(temps, factors)
    t_k = np.array(temps) + 273.15
    spans = ((-30.0, 15.0), (15.0, 25.0), (25.0, 90.0))  # interval j, the end ones extended
    for j, (lo, hi) in enumerate(spans):
        ea = np.log(factors[j] / factors[j + 1]) * base.GAS_CONSTANT_J_PER_MOL_K / (1 / t_k[j] - 1 / t_k[j + 1])
        t = np.linspace(lo, hi, 9)
        want = factors[j] * np.exp(ea / base.GAS_CONSTANT_J_PER_MOL_K * (1 / (t + 273.15) - 1 / t_k[j]))
        np.testing.assert_allclose(c.temp_factor(t), want, rtol=1e-12)


@pytest.mark.parametrize("name", [*CHEMISTRY_NAMES, "four_point_table"])
def test_temp_factor_hinges_reproduce_temp_factor(name: str) -> None:
    c = (
        _table_variant((0.0, 15.0, 25.0, 45.0), (3.0, 1.5, 1.0, 0.8))
        if name == "four_point_table"
        else get_chemistry(name)
    )
    temps = np.linspace(-30.0, 80.0, 111)
    u = 1.0 / (temps + 273.15) - 1.0 / 298.15
    constant, slope, knots, changes = c.temp_factor_hinges()
    log_f = constant + slope * u + (changes[None, :] * np.maximum(u[:, None] - knots[None, :], 0.0)).sum(axis=1)
    np.testing.assert_allclose(np.exp(log_f), c.temp_factor(temps), rtol=1e-12)


@pytest.mark.parametrize(
    ("temps", "factors", "message"),
    [
        ((10.0, 25.0), (1.5,), "equal length"),
        ((25.0,), (1.0,), "at least two"),
        ((25.0, 10.0), (1.0, 1.5), "strictly increasing"),
        ((10.0, 40.0), (1.5, 0.9), "factor 1 at 25"),
        ((10.0, 25.0, 40.0), (1.5, 1.1, 0.9), "factor 1 at 25"),
        ((10.0, 25.0), (-1.5, 1.0), "positive"),
    ],
)
def test_bad_temperature_tables_are_rejected(
    temps: tuple[float, ...], factors: tuple[float, ...], message: str
) -> None:
    with pytest.raises(ChemistryError, match=message):
        _table_variant(temps, factors)


def test_second_rc_pair_defaults_to_none_and_adds_to_the_dc_resistance() -> None:
    for name in ("nmc811", "nmc532", "lfp"):
        c = get_chemistry(name)
        assert c.r2_ohm_ah == 0.0
        assert not np.any(c.r2_ohm(1.0, np.linspace(0, 1, 5), 25.0))
    c = get_chemistry("lmo")
    assert c.r2_ohm_ah > 0.0
    assert c.tau2_s > c.tau1_s
    t = np.array([1.0, 30.0, 300.0, np.inf])
    want = c.r0_ohm_ah + c.r1_ohm_ah * (1 - np.exp(-t / c.tau1_s)) + c.r2_ohm_ah * (1 - np.exp(-t / c.tau2_s))
    np.testing.assert_allclose(c.dcir_ohm(1.0, 0.5, 25.0, t), want, rtol=1e-12)
    with pytest.raises(ChemistryError, match="r2_ohm_ah"):
        dataclasses.replace(c, r2_ohm_ah=-0.01)
    with pytest.raises(ChemistryError, match="tau2_s > tau1_s"):
        dataclasses.replace(c, tau2_s=c.tau1_s)
    with pytest.raises(ChemistryError, match="tau2_s must be a positive"):
        dataclasses.replace(get_chemistry("nmc811"), tau2_s=0.0)


@pytest.mark.parametrize("name", CHEMISTRY_NAMES)
def test_soc_factor_is_a_mild_u_with_a_steeper_low_end(name: str) -> None:
    c = get_chemistry(name)
    assert float(c.soc_factor(0.5)) == pytest.approx(1.0)
    f = c.soc_factor(np.linspace(0, 1, 101))
    assert f.min() >= 0.995
    assert 1.04 <= float(c.soc_factor(1.0)) <= 1.25
    assert float(c.soc_factor(0.02)) > float(c.soc_factor(0.98))
    # Steeper below 10 % SoC than above it.
    low_slope = float(c.soc_factor(0.0) - c.soc_factor(0.1)) / 0.1
    mid_slope = float(c.soc_factor(0.1) - c.soc_factor(0.2)) / 0.1
    assert low_slope > mid_slope > 0


def test_thermal_parameters_reproduce_cell_data() -> None:
    leaf = get_chemistry("lmo")
    assert leaf.mass_kg_per_ah * lmo.RATED_CAPACITY_AH == pytest.approx(0.799, abs=0.005)
    laminate_area_m2 = 2 * (0.290 * 0.216 + 0.290 * 0.0071 + 0.216 * 0.0071)
    assert leaf.area_m2_per_ah * lmo.RATED_CAPACITY_AH == pytest.approx(laminate_area_m2, rel=0.01)
    sony = get_chemistry("lfp")
    assert float(sony.heat_capacity_j_per_k(3.0)) == pytest.approx(0.07 * 1001, rel=0.01)
    samsung_area_m2 = 2 * (0.173 * 0.125 + 0.173 * 0.045 + 0.045 * 0.125)
    assert get_chemistry("nmc811").area_m2_per_ah * 94.0 == pytest.approx(samsung_area_m2, rel=0.01)
    assert float(get_chemistry("nmc811").conductance_w_per_k(94.0)) == pytest.approx(15 * samsung_area_m2, rel=0.01)


# -- vectorisation and immutability ----------------------------------------------------


@pytest.mark.parametrize("name", CHEMISTRY_NAMES)
def test_methods_broadcast_and_do_not_mutate(name: str) -> None:
    c = get_chemistry(name)
    soc = np.linspace(0.0, 1.0, 7)
    soc_before = soc.copy()
    for method in (c.ocv, c.docv_dsoc, c.hysteresis_v, c.entropic, c.soc_factor):
        out = method(soc)
        assert out.shape == soc.shape
        assert out.dtype == np.float64
        assert method(0.3).ndim == 0
        assert method(soc.reshape(7, 1)).shape == (7, 1)
    assert c.soc_from_ocv(c.ocv(soc)).shape == soc.shape
    np.testing.assert_array_equal(soc, soc_before)

    capacity = np.array([[10.0], [33.1], [100.0]])
    temps = np.array([10.0, 25.0, 40.0, 10.0, 25.0, 40.0, 0.0])
    r0 = c.r0_ohm(capacity, soc, temps)
    assert r0.shape == (3, 7)
    expected = np.array(
        [[float(c.r0_ohm(float(q[0]), float(s), float(t))) for s, t in zip(soc, temps, strict=True)] for q in capacity]
    )
    np.testing.assert_allclose(r0, expected, rtol=1e-12)
    assert c.r1_ohm(capacity, soc, 25.0).shape == (3, 7)
    assert c.r2_ohm(capacity, soc, temps).shape == (3, 7)
    assert c.temp_factor(temps.reshape(7, 1)).shape == (7, 1)
    assert c.dcir_ohm(33.1, soc, 25.0, np.array([[1.0], [10.0]])).shape == (2, 7)


@pytest.mark.parametrize("name", CHEMISTRY_NAMES)
def test_soc_from_ocv_inverts_ocv(name: str) -> None:
    c = get_chemistry(name)
    soc = np.linspace(0.0, 1.0, 57)
    np.testing.assert_allclose(c.soc_from_ocv(c.ocv(soc)), soc, atol=1e-9)
    assert float(c.soc_from_ocv(c.ocv_v[0] - 1.0)) == 0.0
    assert float(c.soc_from_ocv(c.ocv_v[-1] + 1.0)) == 1.0
    assert float(c.ocv(-0.5)) == c.ocv_v[0]


def test_tables_and_registry_are_read_only() -> None:
    c = get_chemistry("nmc811")
    with pytest.raises(ValueError, match="read-only"):
        c.ocv_v[0] = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.r0_ohm_ah = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        CHEMISTRIES["nmc811"] = c  # type: ignore[index]
    with pytest.raises(ValueError, match="read-only"):
        load_table("ocv_Chen2020.csv")["soc"][0] = 1.0


def test_caller_arrays_are_copied_not_shared() -> None:
    c = get_chemistry("lmo")
    ocv = c.ocv_v.copy()
    variant = dataclasses.replace(c, ocv_v=ocv)
    ocv[5] = 0.0
    assert variant.ocv_v[5] == c.ocv_v[5]


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ocv_v": "reversed"}, "increase strictly"),
        ({"hyst_v": np.zeros(3)}, "share one shape"),
        ({"r0_ohm_ah": -0.01}, "r0_ohm_ah must be a positive"),
        ({"tau1_s": 0.0}, "tau1_s must be a positive"),
        ({"coulombic_efficiency": 1.2}, "coulombic_efficiency"),
        ({"v_nominal_v": 5.0}, "v_min_v < v_nominal_v < v_max_v"),
        ({"v_max_v": 4.0}, "outside the voltage limits"),
        ({"name": "LFP cell"}, "chemistry name"),
        ({"family": "NCA"}, "family"),
        ({"provenance": " "}, "provenance"),
        ({"soc_grid": "half"}, "soc_grid"),
        ({"entropic_v_per_k": "nan"}, "NaN"),
        ({"r_soc_curvature": -0.1}, "r_soc_curvature"),
    ],
)
def test_post_init_rejects_inconsistent_sets(changes: dict[str, object], message: str) -> None:
    c = get_chemistry("nmc811")
    special = {
        "reversed": c.ocv_v[::-1],
        "half": c.soc_grid * 0.5,
        "nan": np.full_like(c.soc_grid, np.nan),
    }
    kwargs = {k: special[v] if isinstance(v, str) and v in special else v for k, v in changes.items()}
    with pytest.raises(ChemistryError, match=message):
        dataclasses.replace(c, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("temp_c", "c_rate_max", "soc"),
    [((40.0, 10.0), 1.0, (0.0, 1.0)), ((10.0, 40.0), 0.0, (0.0, 1.0)), ((10.0, 40.0), 1.0, (0.2, 1.2))],
)
def test_validity_range_rejects_bad_ranges(
    temp_c: tuple[float, float], c_rate_max: float, soc: tuple[float, float]
) -> None:
    with pytest.raises(ChemistryError):
        ValidityRange(temp_c=temp_c, c_rate_max=c_rate_max, soc=soc)


def test_validity_range_flags_instead_of_raising() -> None:
    v = get_chemistry("lmo").validity
    inside = v.contains(temp_c=[25.0, 5.0, 25.0, 25.0], c_rate=[-0.5, 0.5, 2.0, 0.5], soc=[0.5, 0.5, 0.5, 0.01])
    np.testing.assert_array_equal(inside, [True, False, False, False])


# -- registry --------------------------------------------------------------------------


def test_registry_holds_the_four_cell_types_with_their_aging_laws() -> None:
    assert tuple(CHEMISTRIES) == CHEMISTRY_NAMES == ("nmc811", "nmc532", "lfp", "lmo")
    expected = {
        "nmc811": ("NMC", "nmc811_grsi_lgm50"),
        "nmc532": ("NMC", "nmc622_gr_denso50ah"),
        "lfp": ("LFP", "lfp_gr_250ah_prismatic"),
        "lmo": ("LMO", "lmo_gr_nissanleaf66ah_2ndlife"),
    }
    for name, (family, aging) in expected.items():
        c = CHEMISTRIES[name]
        assert c is get_chemistry(name)
        assert (c.name, c.family, c.aging_model) == (name, family, aging)
        assert isinstance(c, CellChemistry)
        assert len(c.provenance) > 200
    assert "xyz" not in CHEMISTRIES
    with pytest.raises(KeyError):
        CHEMISTRIES["xyz"]


@pytest.mark.parametrize(("name", "suggestion"), [("nmc81", "'nmc811'"), ("NMC811", "'nmc811'"), ("lpf", "'lfp'")])
def test_unknown_name_suggests_the_closest(name: str, suggestion: str) -> None:
    with pytest.raises(ChemistryError, match=f"did you mean {suggestion}"):
        get_chemistry(name)


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(ChemistryError, match="unknown cell chemistry 'sodium'") as info:
        get_chemistry("sodium")
    assert "did you mean" not in str(info.value)


def test_public_api_is_exactly_all() -> None:
    # Submodules (and the ``annotations`` future flag) are attributes but not API.
    public = {
        n
        for n in dir(chem)
        if not n.startswith("_") and n != "annotations" and not isinstance(getattr(chem, n), types.ModuleType)
    }
    assert public == set(chem.__all__)
    for module in (base, fit, lfp, lmo, nmc532, nmc811):
        for name in module.__all__:
            assert hasattr(module, name)


def test_docstring_examples_run() -> None:
    for module in (chem, base, fit):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0
    assert doctest.testmod(base).attempted >= 4


# -- package data ------------------------------------------------------------------------


def test_package_data_files_are_installed() -> None:
    data = resources.files("twin.chemistry").joinpath("data")
    needed = [
        "ocv_Chen2020.csv",
        "ocv_Mohtat2020.csv",
        "CLFP_Sony_US26650_OCV.csv",
        "CLFP_Sony_US26650_HystV.csv",
        "CLFP_Sony_US26650_entropy.csv",
        "CLFP_Sony_US26650_Rint.csv",
        lmo.OCV_TABLE,
        "LICENSES.md",
        "README.md",
    ]
    for name in needed:
        assert data.joinpath(name).is_file(), name
    licences = data.joinpath("LICENSES.md").read_text(encoding="utf-8")
    for marker in ("PyBaMM", "simses-lite", "10.5281/zenodo.2580327", "BSD 3-Clause", "MIT License"):
        assert marker in licences


def test_missing_table_is_a_chemistry_error() -> None:
    with pytest.raises(ChemistryError, match="missing"):
        load_table("no_such_table.csv")


# -- LMO: parameters re-derived from the ORNL data ------------------------------------


def test_lmo_ecm_equals_fit_on_shipped_hppc_data(hppc_fits: dict[float, EcmFit]) -> None:
    c = get_chemistry("lmo")
    mid = hppc_fits[25.0].summary(soc_min=lmo.ECM_SOC_BAND[0], soc_max=lmo.ECM_SOC_BAND[1])
    assert mid.n_pulses == 4
    cap = lmo.RATED_CAPACITY_AH
    assert c.r0_ohm_ah == pytest.approx(round(mid.r0_ohm * cap, lmo.ECM_ROUND_OHM_AH_DECIMALS), abs=1e-12)
    # The 40-s relaxations see only a fast pair (20.5 mOhm.Ah, 17 s); the shipped pairs are the
    # whole-record fit (test_lmo_rc_pairs_are_the_whole_hppc_record_fit).
    assert round(mid.r1_ohm * cap, lmo.ECM_ROUND_OHM_AH_DECIMALS) == pytest.approx(0.0205, abs=1e-12)
    assert round(mid.tau1_s, lmo.TAU_ROUND_DECIMALS) == pytest.approx(17.0, abs=1e-12)

    temps = sorted(hppc_fits)
    r0_mid = [hppc_fits[t].summary(soc_min=0.3, soc_max=0.7).r0_ohm for t in temps]
    ea = fit_arrhenius(temps, r0_mid).ea_j_per_mol
    step = lmo.EA_ROUND_J_PER_MOL
    assert c.activation_energy_j_per_mol == pytest.approx(round(ea / step) * step, abs=1e-9)


@pytest.fixture(scope="module")
def c15_window_ah(cycling: pl.DataFrame) -> float:
    """Mean C/15 discharge throughput of the five pairs of the OCV table: the lmo SoC window, Ah."""
    return float(
        np.mean(
            [
                ocv_from_slow_cycle(_segment(cycling, s), _segment(cycling, s + 2)).discharge_capacity_ah
                for s in C15_DISCHARGE_SEGMENTS
            ]
        )
    )


def _hppc_record(temp_c: float) -> tuple[FloatArray, FloatArray, FloatArray]:
    df = leaf_data.hppc_from_full_charge(leaf_data.load_bitrode(leaf_data.DATA_DIR / HPPC_FILES[temp_c]))
    return df["time_s"].to_numpy(), df["current_a"].to_numpy(), df["voltage_v"].to_numpy()


def _lmo_pair_fit(
    temp_c: float, pulses: EcmFit, window_ah: float, *, r0_ohm: float, blocks: bool = True
) -> fit.TwoRcFit:
    """Fit the lmo model's two RC pairs to a whole HPPC record (the recipe of twin/chemistry/lmo.py).

    The model is the chemistry's own: OCV table and SoC shape, the given R0, SoC counted from 1
    at the rest after the full charge over the C/15 window (``current_a[k]`` over
    ``(t[k-1], t[k]]``), samples with SoC >= ``lmo.RC_FIT_SOC_MIN``; with ``blocks`` the OCV is
    corrected per pulse-to-pulse block.
    """
    c = get_chemistry("lmo")
    t, i, v = _hppc_record(temp_c)
    soc = 1.0 - np.concatenate(([0.0], np.cumsum(i[1:] * np.diff(t)))) / 3600.0 / window_ah
    return fit_rc_pairs_to_record(
        t,
        i,
        v,
        ocv_v=c.ocv(soc),
        r0_ohm=r0_ohm,
        r_scale=c.soc_factor(soc),
        weight=(soc >= lmo.RC_FIT_SOC_MIN).astype(np.float64),
        ocv_blocks=pulses.block_labels(t) if blocks else None,
    )


@pytest.fixture(scope="module")
def lmo_pair_fits(hppc_fits: dict[float, EcmFit], c15_window_ah: float) -> dict[float, fit.TwoRcFit]:
    """The block-corrected two-pair fit of every HPPC record (R0: shipped at 25 °C, measured else)."""
    shipped_r0 = get_chemistry("lmo").r0_ohm_ah / lmo.RATED_CAPACITY_AH
    return {
        t: _lmo_pair_fit(
            t, f, c15_window_ah, r0_ohm=shipped_r0 if t == 25.0 else f.summary(soc_min=0.3, soc_max=0.7).r0_ohm
        )
        for t, f in hppc_fits.items()
    }


def test_lmo_rc_pairs_are_the_whole_hppc_record_fit(lmo_pair_fits: dict[float, fit.TwoRcFit]) -> None:
    c = get_chemistry("lmo")
    got = lmo_pair_fits[25.0]
    cap, r_dec, tau_dec = lmo.RATED_CAPACITY_AH, lmo.ECM_ROUND_OHM_AH_DECIMALS, lmo.TAU_ROUND_DECIMALS
    assert c.r1_ohm_ah == round(got.r1_ohm * cap, r_dec)
    assert c.tau1_s == round(got.tau1_s, tau_dec)
    assert c.r2_ohm_ah == round(got.r2_ohm * cap, r_dec)
    assert c.tau2_s == round(got.tau2_s, tau_dec)
    assert got.rmse_v < 0.002


def test_lmo_fit_without_the_block_correction_follows_the_ocv_table(
    hppc_fits: dict[float, EcmFit], c15_window_ah: float
) -> None:
    # The whole-record fit against the OCV table alone is twice as far off and picks a much
    # faster slow pair (twin/chemistry/lmo.py): the table's few-mV errors, not the transients.
    r0 = get_chemistry("lmo").r0_ohm_ah / lmo.RATED_CAPACITY_AH
    plain = _lmo_pair_fit(25.0, hppc_fits[25.0], c15_window_ah, r0_ohm=r0, blocks=False)
    assert plain.rmse_v > 0.0035
    assert plain.tau2_s < 0.5 * get_chemistry("lmo").tau2_s


def test_lmo_rc_pairs_depend_more_on_temperature_than_r0(
    hppc_fits: dict[float, EcmFit], lmo_pair_fits: dict[float, fit.TwoRcFit]
) -> None:
    # The evidence quoted in twin/chemistry/lmo.py against one factor for all resistances.
    r0 = {t: f.summary(soc_min=0.3, soc_max=0.7).r0_ohm for t, f in hppc_fits.items()}
    ref = lmo_pair_fits[25.0]
    hot, cold = lmo_pair_fits[40.0], lmo_pair_fits[10.0]
    assert r0[40.0] / r0[25.0] == pytest.approx(0.97, abs=0.01)
    assert hot.r1_ohm / ref.r1_ohm == pytest.approx(0.83, abs=0.02)
    assert hot.r2_ohm / ref.r2_ohm == pytest.approx(0.50, abs=0.02)
    assert cold.r1_ohm / ref.r1_ohm == pytest.approx(1.72, abs=0.03)
    assert cold.r2_ohm / ref.r2_ohm == pytest.approx(1.77, abs=0.03)


def test_lmo_temperature_table_is_the_hppc_r0_ratio(hppc_fits: dict[float, EcmFit]) -> None:
    c = get_chemistry("lmo")
    band = {"soc_min": lmo.ECM_SOC_BAND[0], "soc_max": lmo.ECM_SOC_BAND[1]}
    r0 = {t: hppc_fits[t].summary(**band).r0_ohm for t in lmo.TEMP_TABLE_C}
    assert c.temp_table_c == lmo.TEMP_TABLE_C
    assert c.temp_table_factor == tuple(round(r0[t] / r0[25.0], lmo.TEMP_TABLE_DECIMALS) for t in lmo.TEMP_TABLE_C)
    # Not Arrhenius: the two intervals' activation energies differ by an order of magnitude.
    cold = fit_arrhenius([10.0, 25.0], [r0[10.0], r0[25.0]]).ea_j_per_mol
    hot = fit_arrhenius([25.0, 40.0], [r0[25.0], r0[40.0]]).ea_j_per_mol
    assert cold > 20_000.0
    assert 0.0 < hot < 5_000.0


def _hppc_rests(temp_c: float) -> tuple[FloatArray, FloatArray]:
    """Ah from full charge and voltage at the end of every 1-hour rest of an HPPC record."""
    hppc = leaf_data.steps(
        leaf_data.hppc_from_full_charge(leaf_data.load_bitrode(leaf_data.DATA_DIR / HPPC_FILES[temp_c]))
    )
    t, i = hppc["time_s"].to_numpy(), hppc["current_a"].to_numpy()
    ah = np.concatenate(([0.0], np.cumsum(0.5 * (i[1:] + i[:-1]) * np.diff(t)))) / 3600.0
    ends = (
        hppc.with_row_index("row")
        .group_by("segment", maintain_order=True)
        .agg(pl.col("row").last(), pl.col("mode").first(), pl.col("step_time_s").last(), pl.col("voltage_v").last())
        .filter((pl.col("mode") == "REST") & (pl.col("step_time_s") >= 3000.0))
    )
    return ah[ends["row"].to_numpy()], ends["voltage_v"].to_numpy()


def test_lmo_entropic_coefficient_is_the_hppc_rest_mean(c15_window_ah: float) -> None:
    ah25, v25 = _hppc_rests(25.0)
    ah40, v40 = _hppc_rests(40.0)
    ah10, v10 = _hppc_rests(10.0)
    keep = 1.0 - ah25 / c15_window_ah >= lmo.ENTROPIC_SOC_MIN
    assert keep.sum() == 9
    hot = (np.interp(ah25, ah40, v40) - v25)[keep] / 15.0 * MILLI  # mV/K
    assert round(float(hot.mean()), 2) == lmo.ENTROPIC_MV_PER_K
    # The 10 -> 25 °C interval (slower relaxation, so rougher) gives a positive mean as well.
    cold = (v25 - np.interp(ah25, ah10, v10))[keep] / 15.0 * MILLI
    assert 0.0 < float(cold.mean()) < 2.0 * lmo.ENTROPIC_MV_PER_K


def _in_notes_range(values_ohm: FloatArray, lo_mohm: float, hi_mohm: float) -> bool:
    v = values_ohm * MILLI
    return bool(np.all((v >= lo_mohm - NOTES_ROUNDING_MOHM) & (v <= hi_mohm + NOTES_ROUNDING_MOHM)))


def test_lmo_pulse_fits_lie_in_the_notes_ranges(hppc_fits: dict[float, EcmFit]) -> None:
    # BATTERY_NOTES.md 1.2, Nissan Leaf row. The notes' "R(1 s)" is the step to the first
    # pulse sample (0.5 s), i.e. our R0.
    for fit_ in hppc_fits.values():
        assert fit_.n_pulses == 10
        np.testing.assert_allclose(fit_.current_a, 30.0, atol=0.05)
        np.testing.assert_allclose(fit_.duration_s, 30.0, atol=0.05)
        assert np.all(np.diff(fit_.soc) < 0)
        assert fit_.soc[0] == pytest.approx(1.0, abs=0.001)
        assert 0.0 < fit_.soc[-1] < 0.1
        assert np.all(fit_.rmse_v < 0.001)
    at25 = hppc_fits[25.0]
    assert _in_notes_range(at25.r0_ohm, 1.53, 1.77)
    assert _in_notes_range(at25.r_30s_ohm, 2.47, 3.97)
    assert _in_notes_range(at25.r1_ohm, 0.59, 1.0)
    assert np.all((at25.tau1_s >= 16.0 - 0.5) & (at25.tau1_s <= 22.0 + 0.5))
    assert _in_notes_range(hppc_fits[10.0].r0_ohm, 2.57, 2.80)
    assert _in_notes_range(hppc_fits[40.0].r0_ohm, 1.50, 1.63)
    # R x Ah ≈ 51 mΩ·Ah (1 s).
    assert get_chemistry("lmo").r0_ohm_ah * MILLI == pytest.approx(51.0, abs=1.5)


def test_lmo_activation_energy_between_10_and_25_c_matches_notes(hppc_fits: dict[float, EcmFit]) -> None:
    # Notes: "The Leaf data imply an effective Ea of about 24 kJ/mol between 10 and 25 °C".
    r0 = [hppc_fits[t].summary().r0_ohm for t in (10.0, 25.0)]
    assert 21_000.0 <= fit_arrhenius([10.0, 25.0], r0).ea_j_per_mol <= 27_000.0
    # Over 10-40 °C the cell is not Arrhenius (flat above 25 °C): the shipped 3-point Ea is lower.
    assert get_chemistry("lmo").activation_energy_j_per_mol < 20_000.0


def _lmo_ocv_rebuilt(cycling: pl.DataFrame) -> FloatArray:
    tables = [
        ocv_from_slow_cycle(_segment(cycling, seg), _segment(cycling, seg + 2)).ocv_v for seg in C15_DISCHARGE_SEGMENTS
    ]
    return np.asarray(np.round(np.mean(tables, axis=0), 4), dtype=np.float64)


def test_lmo_ocv_table_is_reproducible_from_the_cycling_file(cycling: pl.DataFrame) -> None:
    c = get_chemistry("lmo")
    np.testing.assert_allclose(_lmo_ocv_rebuilt(cycling), c.ocv_v, atol=1e-9)
    np.testing.assert_allclose(c.soc_grid, np.linspace(0.0, 1.0, 101), atol=1e-12)


def test_lmo_ocv_matches_c15_midpoint(cycling: pl.DataFrame) -> None:
    # Independent of ocv_from_slow_cycle: the plain (charge + discharge)/2 of one C/15 pair
    # where both branches run at the same constant current.
    td, i_d, vd = _segment(cycling, 2)
    tc, i_c, vc = _segment(cycling, 4)
    qd = np.concatenate(([0.0], np.cumsum(i_d[1:] * np.diff(td))))
    qc = np.concatenate(([0.0], np.cumsum(-i_c[1:] * np.diff(tc))))
    grid = np.linspace(0.05, 0.5, 46)
    v_dis = np.interp(grid, (1.0 - qd / qd[-1])[::-1], vd[::-1])
    v_chg = np.interp(grid, qc / qc[-1], vc)
    i_chg = -np.interp(grid, qc / qc[-1], i_c)
    assert np.all(i_chg > 0.99 * 2.17)
    midpoint = 0.5 * (v_dis + v_chg)
    assert np.max(np.abs(get_chemistry("lmo").ocv(grid) - midpoint)) < 0.020


def test_lmo_ocv_matches_hppc_one_hour_rests(c15_window_ah: float) -> None:
    # The 25 °C HPPC rests after each 3 Ah step, placed by Ah from full charge on the
    # C/15 window (capacity = mean C/15 discharge throughput).
    ah, rest_v = _hppc_rests(25.0)
    soc = 1.0 - ah / c15_window_ah
    keep = soc >= 0.1
    assert keep.sum() >= 8
    err = get_chemistry("lmo").ocv(soc[keep]) - rest_v[keep]
    assert np.max(np.abs(err)) < 0.020


def test_c15_record_shows_the_lead_resistance(cycling: pl.DataFrame) -> None:
    r_s = [
        ocv_from_slow_cycle(_segment(cycling, s), _segment(cycling, s + 2)).series_resistance_ohm
        for s in C15_DISCHARGE_SEGMENTS
    ]
    assert np.all((np.array(r_s) > 0.10) & (np.array(r_s) < 0.14))


# -- fit routines against synthetic oracles ---------------------------------------------


def _simulate_hppc(
    r0: float, r1: float, tau: float, capacity_ah: float
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """An exact 1-RC response to an ORNL-like HPPC profile; returns t, i, v and the true SoC."""
    segments = [(300.0, 0.0)]
    for _ in range(4):
        segments += [(30.0, 30.0), (40.0, 0.0), (10.0, -22.5), (600.0, 10.0), (600.0, 0.0)]
    dt = 0.5
    currents = np.concatenate([np.full(round(d / dt), c) for d, c in segments])
    t = np.arange(currents.size + 1) * dt
    i = np.concatenate(([0.0], currents))  # i[k] flows over (t[k-1], t[k]]
    decay = np.exp(-dt / tau)
    v1 = np.zeros_like(t)
    for k in range(1, t.size):
        v1[k] = v1[k - 1] * decay + r1 * i[k] * (1.0 - decay)
    soc = 1.0 - np.concatenate(([0.0], np.cumsum(i[1:] * dt))) / 3600.0 / capacity_ah
    v = 3.5 + 0.6 * soc - i * r0 - v1
    f64 = np.float64
    return np.asarray(t, dtype=f64), np.asarray(i, dtype=f64), np.asarray(v, dtype=f64), np.asarray(soc, dtype=f64)


def test_fit_ecm_recovers_a_synthetic_cell() -> None:
    r0, r1, tau, cap = 2.0e-3, 1.0e-3, 20.0, 10.0
    t, i, v, soc = _simulate_hppc(r0, r1, tau, cap)
    result = fit_ecm_from_hppc(t, i, v, capacity_ah=cap)
    assert result.n_pulses == 4

    def dcir(t_s: float) -> float:
        # R0, the RC rise after t_s, and the OCV drop (0.6 V per unit SoC) over t_s at 30 A.
        return float(r0 + r1 * (1 - np.exp(-t_s / tau)) + 0.6 * t_s / 3600.0 / cap)

    np.testing.assert_allclose(result.r0_ohm, dcir(0.5), rtol=1e-6)
    np.testing.assert_allclose(result.r_10s_ohm, dcir(10.0), rtol=1e-6)
    np.testing.assert_allclose(result.r_30s_ohm, dcir(30.0), rtol=1e-6)
    np.testing.assert_allclose(result.r1_ohm, r1, rtol=0.01)
    np.testing.assert_allclose(result.tau1_s, tau, rtol=0.01)
    with pytest.raises(ValueError, match="read-only"):
        result.r0_ohm[0] = 0.0
    starts = np.searchsorted(t, result.t_start_s)
    np.testing.assert_allclose(result.soc, soc[starts], atol=1e-9)
    # The default capacity is the record's own throughput, so SoC ends at 0.
    default = fit_ecm_from_hppc(t, i, v)
    assert default.soc[0] == pytest.approx(1.0)
    assert default.soc[-1] > 0.0


def test_fit_ecm_rejects_bad_records() -> None:
    t = np.arange(100.0)
    with pytest.raises(ChemistryError, match="no discharge pulse"):
        fit_ecm_from_hppc(t, np.where(t > 50, 10.0, 0.0), np.full(100, 3.7), max_pulse_s=20.0)
    with pytest.raises(ChemistryError, match="differ in length"):
        fit_ecm_from_hppc(t, np.zeros(99), np.zeros(100))
    with pytest.raises(ChemistryError, match="strictly increasing"):
        fit_ecm_from_hppc(t[::-1], np.zeros(100), np.zeros(100))
    with pytest.raises(ChemistryError, match="capacity must be positive"):
        fit_ecm_from_hppc(t, -np.ones(100), np.zeros(100))


def _two_rc_hppc(ocv_error_v: float) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """An exact two-RC response to an ORNL-like HPPC profile (1 s samples, 40-min rests).

    Returns t, i, the measured v, the model's (wrong) OCV along the record, and the true SoC.
    The model OCV is off from the true one by a smooth ``ocv_error_v * sin(6 pi soc)``.
    """
    segments = [(300.0, 0.0)]
    for _ in range(4):
        segments += [(30.0, 30.0), (40.0, 0.0), (10.0, -22.5), (1080.0, 10.0), (2400.0, 0.0)]
    dt = 1.0
    currents = np.concatenate([np.full(round(d / dt), c) for d, c in segments])
    t = np.arange(currents.size + 1, dtype=np.float64) * dt
    i = np.concatenate(([0.0], currents)).astype(np.float64)
    x = fit._filtered_currents(t, i, np.array([20.0, 400.0]))
    soc = 1.0 - np.concatenate(([0.0], np.cumsum(i[1:] * dt))) / 3600.0 / 20.0
    true_ocv = 3.5 + 0.6 * soc
    v = true_ocv - 1.5e-3 * i - 0.8e-3 * x[:, 0] - 1.2e-3 * x[:, 1]
    model_ocv = true_ocv + ocv_error_v * np.sin(6.0 * np.pi * soc)
    return t, i, v, model_ocv, soc


def test_fit_rc_pairs_recovers_two_pairs_despite_an_ocv_error() -> None:
    t, i, v, exact_ocv, _ = _two_rc_hppc(0.0)
    exact = fit_rc_pairs_to_record(t, i, v, ocv_v=exact_ocv, r0_ohm=1.5e-3)
    assert (exact.r1_ohm, exact.tau1_s, exact.r2_ohm, exact.tau2_s) == pytest.approx(
        (0.8e-3, 20.0, 1.2e-3, 400.0), rel=1e-3
    )
    assert exact.rmse_v < 1e-5

    t, i, v, wrong_ocv, _ = _two_rc_hppc(0.005)
    pulses = fit_ecm_from_hppc(t, i, v)
    assert pulses.n_pulses == 4
    blocks = pulses.block_labels(t)
    np.testing.assert_array_equal(np.unique(blocks), np.arange(-1, 4))
    corrected = fit_rc_pairs_to_record(t, i, v, ocv_v=wrong_ocv, r0_ohm=1.5e-3, ocv_blocks=blocks)
    assert (corrected.r1_ohm, corrected.tau1_s) == pytest.approx((0.8e-3, 20.0), rel=0.05)
    assert (corrected.r2_ohm, corrected.tau2_s) == pytest.approx((1.2e-3, 400.0), rel=0.05)
    # Against the wrong OCV alone, the pairs take up part of the table's error.
    plain = fit_rc_pairs_to_record(t, i, v, ocv_v=wrong_ocv, r0_ohm=1.5e-3)
    truth = np.array([0.8e-3, 20.0, 1.2e-3, 400.0])

    def worst(f: fit.TwoRcFit) -> float:
        return float(np.max(np.abs(np.array([f.r1_ohm, f.tau1_s, f.r2_ohm, f.tau2_s]) / truth - 1.0)))

    assert worst(corrected) < 0.5 * worst(plain)
    assert plain.rmse_v > 2.0 * corrected.rmse_v


def test_fit_rc_pairs_rejects_bad_arguments() -> None:
    t, i, v, ocv, _ = _two_rc_hppc(0.0)
    with pytest.raises(ChemistryError, match="tau1 bounds < tau2 bounds"):
        fit_rc_pairs_to_record(t, i, v, ocv_v=ocv, r0_ohm=1e-3, tau1_bounds_s=(2.0, 100.0), tau2_bounds_s=(60.0, 900.0))
    with pytest.raises(ChemistryError, match="integer labels"):
        fit_rc_pairs_to_record(t, i, v, ocv_v=ocv, r0_ohm=1e-3, ocv_blocks=np.zeros(t.size))
    with pytest.raises(ChemistryError, match="leave some samples"):
        fit_rc_pairs_to_record(t, i, v, ocv_v=ocv, r0_ohm=1e-3, weight=0.0)
    with pytest.raises(ChemistryError, match="finite"):
        fit_rc_pairs_to_record(t, i, v, ocv_v=np.full(t.size, np.nan), r0_ohm=1e-3)
    with pytest.raises(ChemistryError, match="differ in length"):
        fit_rc_pairs_to_record(t, i[1:], v, ocv_v=ocv, r0_ohm=1e-3)


def test_fit_arrhenius_recovers_activation_energy() -> None:
    temps = np.array([0.0, 10.0, 25.0, 40.0])
    t_k = temps + 273.15
    r = 1.5e-3 * np.exp(30_000.0 / base.GAS_CONSTANT_J_PER_MOL_K * (1 / t_k - 1 / 298.15))
    result = fit_arrhenius(temps, r)
    assert result.ea_j_per_mol == pytest.approx(30_000.0, rel=1e-9)
    assert result.r_ref_ohm == pytest.approx(1.5e-3, rel=1e-9)
    np.testing.assert_allclose(result.factor(temps), r / 1.5e-3, rtol=1e-9)
    with pytest.raises(ChemistryError, match="two distinct"):
        fit_arrhenius([25.0, 25.0], [1.0, 1.0])
    with pytest.raises(ChemistryError, match="positive"):
        fit_arrhenius([10.0, 25.0], [1.0, -1.0])


def test_ocv_from_slow_cycle_recovers_ocv_through_a_cv_phase() -> None:
    def ocv(s: FloatArray) -> FloatArray:
        return 3.3 + 0.8 * s - 0.1 * np.exp(-20 * s)

    r_s, cap_as, dt, i_cc, v_cv = 0.1, 30.0 * 3600, 20.0, 2.0, 4.1
    s = np.linspace(1.0, 0.0, round(cap_as / i_cc / dt) + 1)
    td = np.arange(s.size) * dt
    dis = (td, np.full(s.size, i_cc), ocv(s) - i_cc * r_s)
    # CC-CV charge simulated step by step: current limited by the CV voltage.
    soc, t_c, i_c, v_c = 0.0, [0.0], [-i_cc], [float(ocv(np.array(0.0))) + i_cc * r_s]
    while soc < 1.0 - 1e-9:
        i_now = min(i_cc, (v_cv - float(ocv(np.array(soc)))) / r_s)
        if i_now < 0.05:
            break
        soc = min(1.0, soc + i_now * dt / cap_as)
        t_c.append(t_c[-1] + dt)
        i_c.append(-i_now)
        v_c.append(min(v_cv, float(ocv(np.array(soc))) + i_now * r_s))
    result = ocv_from_slow_cycle(dis, (np.array(t_c), np.array(i_c), np.array(v_c)))
    assert result.series_resistance_ohm == pytest.approx(r_s, rel=0.01)
    # The CV phase stops at 0.05 A, a little short of the true 100 %, which stretches the
    # charge's own SoC scale by well under 1 %; away from the very ends the error stays small.
    err = result.ocv_v - ocv(result.soc)
    inner = (result.soc > 0.02) & (result.soc < 0.98)
    assert np.max(np.abs(err[inner])) < 0.01


# -- loaders -----------------------------------------------------------------------------


def test_leaf_loaders_handle_both_header_styles() -> None:
    with_header = leaf_data.load_bitrode(leaf_data.DATA_DIR / HPPC_FILES[25.0])
    without = leaf_data.load_bitrode(leaf_data.DATA_DIR / HPPC_FILES[10.0])
    assert with_header.schema == without.schema
    assert with_header.columns[:5] == ["time_s", "current_a", "voltage_v", "mode", "capacity_ah"]
    assert with_header["time_s"][0] == 1.0
    assert without["voltage_v"][0] == pytest.approx(3.096)
    for df in (with_header, without):
        assert df.null_count().sum_horizontal().item() == 0
        assert (df.filter(pl.col("mode") == "DCHG")["current_a"] > 0).all()
        assert (df.filter(pl.col("mode") == "CHRG")["current_a"] < 0).all()
        assert (df["time_s"].diff().drop_nulls() > 0).all()


def test_all_copied_leaf_files_load() -> None:
    for path in sorted(leaf_data.DATA_DIR.glob("*.csv")):
        df = leaf_data.load_bitrode(path)
        assert df.height > 2000, path.name
    for path in sorted(leaf_data.DATA_DIR.glob("*.lvm")):
        temps = leaf_data.load_lvm(path)
        assert temps.columns == ["time_s", "tc1_c", "tc2_c", "tc3_c", "tc4_c"]
        assert temps["time_s"][1] == leaf_data.LVM_SAMPLE_PERIOD_S
        tc2 = temps["tc2_c"].to_numpy()
        assert 20.0 < tc2.min() < tc2.max() < 45.0
    assert (leaf_data.DATA_DIR / "LICENSE.txt").is_file()
    assert (leaf_data.DATA_DIR / "SOURCE_README.md").is_file()
