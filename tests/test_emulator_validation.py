"""Validation of the pack emulator against measured data (the issue's "Validation against measured data").

Five checks, each of which can fail:

1. **Voltage.** A one-cell :class:`~emulators.pack.PackBank` of the ``lmo`` chemistry (the
   2013 Nissan Leaf cell the parameters were identified on) is driven by the *measured*
   current of (a) the C/15 cycling at 24 °C and (b) the 1C and 2C constant-current discharges,
   each run starting from the measured state (rest voltage -> SoC through ``soc_from_ocv``,
   the measured C/15 capacity). Criterion of the issue: voltage RMSE <= 20 mV.
2. **Temperature.** The same cell in ambient air through the first 1C/2C/3C discharge with a
   thermocouple log: the emulated peak temperature rise within 2 °C of the measured one.
3. **Aging.** The emulator's own aging path (:class:`~emulators.aging.FleetAging` feeding
   :meth:`~emulators.pack.PackBank.apply_aging`) run for 10 years on the BLAST-Lite reference
   conditions reproduces the relative capacities of BATTERY_NOTES.md section 1.4 within 1
   percentage point, for the laws of the project's chemistries.
4. **Second-life spread.** The ``nevada`` fleet's starting SoH and pack-resistance spread
   match the PulseBat statistics (BATTERY_NOTES.md section 3) each group was calibrated to,
   within three standard errors of the group's sample size.
5. **Determinism.** The same scenario and seed give identical frames, whatever the chunk size.

The 3C discharges (92 A, three times lmo's 1C validity limit) are not scored for voltage:
the cell shows a rate-dependent loss there that the HPPC tests the chemistry is identified on
cannot reveal (``twin/chemistry/lmo.py``, "Not modelled"). Their thermocouple log is used in 2.

Conventions that matter for reading the figures:

- Current is positive on discharge. ``current_a[k]`` of a cycler record is taken as the
  current over ``(t[k-1], t[k]]``, and the emulated voltage at ``t[k]`` is the bank's terminal
  voltage at the end of that interval under ``current_a[k]``.
- **Connector share.** ``PackBank`` adds ``CONNECTOR_SHARE`` (3.5 %) of the string's cell
  resistance for busbars, connectors and contactors (Kona pack measurements). A bare cell on a
  cycler has none, and the chemistry's ``R0`` was identified on the bare cell, so the
  cell-level voltage here is ``open_circuit_v - I * resistance_ohm / (1 + CONNECTOR_SHARE)``.
  The bank's heat term still contains that 3.5 % of the ohmic loss (+0.2 K of the 3C peak rise); it
  cannot be removed without changing ``emulators/pack.py``.
- RMSEs are time-weighted (trapezoid weights): the Bitrode logs sample every 1 s after a
  step and every 10-60 s later, so a per-sample RMSE would weight the first minute of each
  discharge far more than the rest.

Data: ORNL 2013 Nissan Leaf cell (Wiggins, Allu, Wang, doi:10.5281/zenodo.2580327, MIT),
copied in ``tests/data/nissan_leaf`` and loaded with :mod:`tests.leaf_data`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from emulators.aging import FleetAging
from emulators.fleet import Fleet, build_fleet
from emulators.pack import CONNECTOR_SHARE, ChemistryTables, PackBank, PackParams
from emulators.run import Emulation, EmulationOptions
from emulators.scenario import load_scenario
from tests import leaf_data
from tests.test_aging import NOTES_TABLE
from twin.chemistry import CellChemistry, get_chemistry, ocv_from_slow_cycle
from twin.chemistry.aging import get_aging_law

FloatArray = npt.NDArray[np.float64]

MILLI = 1e3
VOLTAGE_RMSE_LIMIT_V = 0.020  # the criterion
TEMPERATURE_RISE_TOLERANCE_K = 2.0  # the criterion
FADE_TOLERANCE = 0.01  # 1 percentage point of relative capacity (the criterion)
STANDARD_ERRORS = 3.0  # sampling tolerance of the fleet-spread statistics

LMO_RATED_AH = 33.1  # ORNL README
CYCLING_FILE = "NissanLeaf-cell-Cycling-10C-24C-40C.csv"
# Discharge segments of the first (24 °C) block whose pairs make the shipped OCV table
# (twin/chemistry/lmo.py); each charge is two segments later.
C15_TABLE_DISCHARGES = (2, 6, 10, 14, 18)
# First segment (the rest after a full charge) of each of the block's six cycles:
# rest, C/15 discharge, rest, CC-CV charge. The sixth was not used for the OCV table.
C15_CYCLE_STARTS = (1, 5, 9, 13, 17, 21)
C15_AMBIENT_C = 24.0
BITRODE_AMBIENT_C = 25.0  # TC4 (ambient) reads 24.9-25.7 °C during these tests
RATES = ("1C", "2C", "3C")
# Below this SoC the chemistry is outside its validity range (CellChemistry.validity) and its
# OCV table has run out (see test_high_rate_discharge_voltage).
SCORED_SOC_MIN = 0.05


# ------------------------------------------------------------------------------------------------
# A bare cell in the emulator
# ------------------------------------------------------------------------------------------------


class Trace(NamedTuple):
    """What the emulated cell did at each sample time of a record."""

    voltage_v: FloatArray
    temp_c: FloatArray
    soc: FloatArray


def _cell_bank(chem: CellChemistry, *, capacity_ah: float, soc0: float, temp_c: float) -> PackBank:
    """Build a one-pack, one-cell bank of ``chem`` (the ``PackBank`` doctest's layout).

    Args:
        chem: the cell type (rated at the Leaf cell's 33.1 Ah).
        capacity_ah: the cell's true capacity (its measured one), Ah.
        soc0: initial SoC.
        temp_c: initial cell temperature, °C.

    Returns:
        The bank, with limits far above any test current (a cycler drives it).
    """
    one = np.ones((1, 1))
    params = PackParams(
        chem_index=np.zeros(1, dtype=np.int64),
        series=np.ones(1, dtype=np.int64),
        parallel=np.ones(1, dtype=np.int64),
        rated_group_ah=np.full(1, LMO_RATED_AH),
        capacity_ah=np.full((1, 1), capacity_ah),
        r_cell=one.copy(),
        soc0=np.full((1, 1), soc0),
        mask=np.ones((1, 1), dtype=bool),
        weight=one.copy(),
        i_dis_max_a=np.full(1, 1e4),
        i_chg_max_a=np.full(1, 1e4),
        tables=ChemistryTables.build([chem]),
    )
    return PackBank(params, temp_c=np.full(1, temp_c))


def _drive(bank: PackBank, time_s: FloatArray, current_a: FloatArray, env_temp_c: float) -> Trace:
    """Drive a one-cell bank with a measured current, as a cycler does (no BMS clipping).

    Args:
        bank: the bank, in its state at ``time_s[0]``.
        time_s: sample times, increasing, s.
        current_a: ``current_a[k]`` flows over ``(time_s[k-1], time_s[k]]``; positive on discharge.
        env_temp_c: ambient temperature, °C.

    Returns:
        The bare-cell terminal voltage (connector share removed), cell temperature and SoC
        at every sample time.
    """
    n = time_s.size
    voltage, temp, soc = np.empty(n), np.empty(n), np.empty(n)
    env = np.full(1, env_temp_c)
    cur = np.zeros(1)
    for k in range(n):
        cur[0] = current_a[k]
        if k:
            bank.step_current(cur, env, dt_s=float(time_s[k] - time_s[k - 1]))
        r_cell = bank.resistance_ohm()[0] / (1.0 + CONNECTOR_SHARE)
        voltage[k] = bank.open_circuit_v()[0] - cur[0] * r_cell
        temp[k] = bank.temp_c[0]
        soc[k] = bank.soc[0, 0]
    return Trace(voltage, temp, soc)


def _time_weights(time_s: FloatArray) -> FloatArray:
    """Trapezoid weights of the samples (half of each neighbouring interval)."""
    w = np.zeros_like(time_s)
    dt = np.diff(time_s)
    w[:-1] += 0.5 * dt
    w[1:] += 0.5 * dt
    return w


def _rmse(err: FloatArray, weight: FloatArray) -> float:
    """Return the weighted root-mean-square of ``err``."""
    return float(np.sqrt(np.sum(weight * err**2) / np.sum(weight)))


# ------------------------------------------------------------------------------------------------
# Measured data
# ------------------------------------------------------------------------------------------------


def _columns(df: pl.DataFrame) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return writable copies of a record's time (s), current (A, + = discharge) and voltage (V)."""
    t, i, v = (np.array(df[c].to_numpy(), dtype=np.float64) for c in ("time_s", "current_a", "voltage_v"))
    return t, i, v


@functools.cache
def _bitrode(rate: str) -> pl.DataFrame:
    """Load the ``rate`` ("1C", "2C", "3C") discharge test with its cycler steps numbered."""
    return leaf_data.steps(leaf_data.load_bitrode(leaf_data.DATA_DIR / f"{rate}-Discharge-Bitrode-data.csv"))


@functools.cache
def _cycling() -> pl.DataFrame:
    """Load the C/15 cycling test with its cycler steps numbered."""
    return leaf_data.steps(leaf_data.load_bitrode(leaf_data.DATA_DIR / CYCLING_FILE))


def _segment(df: pl.DataFrame, segment: int) -> pl.DataFrame:
    """Return the rows of one cycler step (see ``leaf_data.steps``)."""
    return df.filter(pl.col("segment") == segment)


class C15Window(NamedTuple):
    """What the C/15 cycles of the shipped OCV table measure."""

    capacity_ah: float  # mean discharge throughput from the CV end to the 3.0 V cut-off
    series_resistance_ohm: float  # mean R_s of ocv_from_slow_cycle: lead + cell resistance


@functools.cache
def _c15_window() -> C15Window:
    """Measure the C/15 window on the five charge/discharge pairs the OCV table was built from."""
    df = _cycling()
    pairs = [(_columns(_segment(df, s)), _columns(_segment(df, s + 2))) for s in C15_TABLE_DISCHARGES]
    fits = [ocv_from_slow_cycle(discharge, charge) for discharge, charge in pairs]
    return C15Window(
        capacity_ah=float(np.mean([f.discharge_capacity_ah for f in fits])),
        series_resistance_ohm=float(np.mean([f.series_resistance_ohm for f in fits])),
    )


# ------------------------------------------------------------------------------------------------
# 1a. Voltage: C/15 cycling at 24 °C
# ------------------------------------------------------------------------------------------------


def test_c15_cycling_voltage() -> None:
    """The emulated cell follows the six C/15 cycles at 24 °C within 20 mV RMSE.

    The cycling file's voltage was sensed through the current leads: it carries an apparent
    series resistance of about 0.12 Ω (0.24 V jumps when the 2.17 A current starts or stops;
    tests/data/nissan_leaf/README.md). :func:`twin.chemistry.fit.ocv_from_slow_cycle` estimates
    the total series resistance ``R_s`` of each charge/discharge pair (lead plus the cell's
    own long-time resistance); the lead's share is ``R_s`` less the model's cell resistance
    ``R0 + R1`` (24 °C, mid SoC), and the measured voltage is corrected by it:
    ``v_cell = v_measured + I * R_lead``. At 2.17 A the split between lead and cell is only
    good to a few mV, so this test checks the OCV table and the SoC bookkeeping, not the
    cell resistance (tests 1b and 2 do).

    Each cycle (rest after the CV charge, discharge to 3.0 V, rest, CC-CV charge) starts from
    its own measured rest voltage, as the OCV table references each branch to its own coulomb
    count: driven open-loop through all six, the cycler's 0.2-0.7 % charge/discharge Ah
    mismatch adds up to 2.5 % SoC. Every sample is scored (no SoC exclusion); the sixth cycle
    was not used to build the OCV table and is reported separately.
    """
    chem = get_chemistry("lmo")
    window = _c15_window()
    r_cell = float(chem.dcir_ohm(LMO_RATED_AH, 0.5, C15_AMBIENT_C, np.inf))
    r_lead = window.series_resistance_ohm - r_cell
    assert 0.10 < r_lead < 0.13
    df = _cycling()
    errors, weights, per_cycle = [], [], {}
    for first in C15_CYCLE_STARTS:
        t, i, v = _columns(df.filter(pl.col("segment").is_between(first, first + 3)))
        soc0 = float(chem.soc_from_ocv(v[0]))
        bank = _cell_bank(chem, capacity_ah=window.capacity_ah, soc0=soc0, temp_c=C15_AMBIENT_C)
        trace = _drive(bank, t, i, C15_AMBIENT_C)
        err = trace.voltage_v - (v + i * r_lead)
        w = _time_weights(t)
        per_cycle[first] = _rmse(err, w)
        errors.append(err)
        weights.append(w)
    total = _rmse(np.concatenate(errors), np.concatenate(weights))
    table = ", ".join(f"{MILLI * r:.1f}" for r in per_cycle.values())
    print(
        f"C/15 24 °C: R_lead {MILLI * r_lead:.1f} mΩ, capacity {window.capacity_ah:.2f} Ah; "
        f"RMSE per cycle [{table}] mV; all six {MILLI * total:.1f} mV "
        f"(held-out sixth cycle {MILLI * per_cycle[C15_CYCLE_STARTS[-1]]:.1f} mV)"
    )
    assert total <= VOLTAGE_RMSE_LIMIT_V, f"C/15 voltage RMSE {MILLI * total:.1f} mV"
    assert per_cycle[C15_CYCLE_STARTS[-1]] <= VOLTAGE_RMSE_LIMIT_V


# ------------------------------------------------------------------------------------------------
# 1b. Voltage: 1C / 2C / 3C discharges
# ------------------------------------------------------------------------------------------------


class DischargeScore(NamedTuple):
    """Time-weighted voltage RMSE of one file's discharges."""

    rmse_scored_v: float  # samples with emulated SoC >= SCORED_SOC_MIN
    rmse_all_v: float  # every discharge sample, down to the 3.0 V cut-off
    n_discharges: int


@functools.cache
def _discharge_score(rate: str) -> DischargeScore:
    """Emulate every discharge of a Bitrode file that starts from a measured rest.

    Args:
        rate: "1C", "2C" or "3C".

    Returns:
        The pooled, time-weighted RMSE of the file's discharges.
    """
    chem = get_chemistry("lmo")
    capacity = _c15_window().capacity_ah
    df = _bitrode(rate)
    segs = df.group_by("segment", maintain_order=True).agg(pl.col("mode").first())
    modes = dict(zip(segs["segment"].to_list(), segs["mode"].to_list(), strict=True))
    starts = [s for s, m in modes.items() if m == "DCHG" and modes.get(s - 1) == "REST"]
    errors, weights, scored = [], [], []
    for seg in starts:
        rest = _segment(df, seg - 1)
        t, i, v = _columns(pl.concat([rest.tail(1), _segment(df, seg)]))
        i[0] = 0.0
        bank = _cell_bank(chem, capacity_ah=capacity, soc0=float(chem.soc_from_ocv(v[0])), temp_c=BITRODE_AMBIENT_C)
        trace = _drive(bank, t, i, BITRODE_AMBIENT_C)
        errors.append((trace.voltage_v - v)[1:])
        weights.append(_time_weights(t)[1:])
        scored.append(trace.soc[1:] >= SCORED_SOC_MIN)
    err, w, keep = np.concatenate(errors), np.concatenate(weights), np.concatenate(scored)
    return DischargeScore(_rmse(err[keep], w[keep]), _rmse(err, w), len(starts))


VOLTAGE_RATES = ("1C", "2C")


@pytest.mark.parametrize("rate", VOLTAGE_RATES)
def test_high_rate_discharge_voltage(rate: str) -> None:
    """The emulated cell follows the measured 1C and 2C discharges within 20 mV RMSE.

    Every discharge of the file that starts from a rest after the CC-CV charge (four per
    file) starts from that rest voltage (``soc_from_ocv``) with the measured C/15 capacity,
    at 25 °C. The scored samples are those with emulated SoC >= 0.05: the lmo chemistry is
    valid for SoC 0.05-1 (``CellChemistry.validity``), and its OCV table ends at SoC 0 =
    3.25 V, the end of the C/15 window (the cycling file's 3.0 V cut-off was measured through
    the 0.12 Ω leads). The 1C discharges go about 1 % of capacity past that point, where the
    emulator holds the OCV at 3.25 V while the cell falls to 3.0 V. The RMSE over every
    discharge sample is printed alongside.
    """
    score = _discharge_score(rate)
    print(
        f"{rate}: voltage RMSE {MILLI * score.rmse_scored_v:.1f} mV (SoC >= {SCORED_SOC_MIN}), "
        f"{MILLI * score.rmse_all_v:.1f} mV including the cut-off knee, over {score.n_discharges} discharges"
    )
    assert score.n_discharges == 4
    assert score.rmse_scored_v <= VOLTAGE_RMSE_LIMIT_V, f"{rate} voltage RMSE {MILLI * score.rmse_scored_v:.1f} mV"


# ------------------------------------------------------------------------------------------------
# 2. Temperature: 1C / 2C / 3C discharges in still air
# ------------------------------------------------------------------------------------------------


class TemperatureRise(NamedTuple):
    """Peak temperature rise over the first thermocouple-logged discharge of a file."""

    start_c: float  # mean of TC1-TC3 at the discharge start (env_temp_c of the emulation)
    measured_k: float  # peak of the TC1-TC3 mean, less start_c
    measured_hottest_k: float  # peak of the hottest thermocouple, less its own start
    emulated_k: float
    peak_lag_s: float  # measured peak time less the Bitrode discharge end


# The first discharge of each file with a thermocouple log (the 3C log covers only the first
# discharge of its file; the 1C file starts with the rest after an earlier discharge).
THERMAL_DISCHARGE = {"1C": 3, "2C": 0, "3C": 0}
COOL_DOWN_S = 1800.0


@functools.cache
def _temperature_rise(rate: str) -> TemperatureRise:
    """Emulate the thermocouple-logged discharge of a file and measure both peak rises.

    Args:
        rate: "1C", "2C" or "3C".

    Returns:
        The measured and emulated rises.
    """
    chem = get_chemistry("lmo")
    df = _bitrode(rate)
    seg = THERMAL_DISCHARGE[rate]
    dis = _segment(df, seg)
    if seg > 0:
        rest = _segment(df, seg - 1).tail(1)
        v_rest = float(rest["voltage_v"][0])
        t_start = float(rest["time_s"][0])
    else:
        # The record starts inside the first discharge step; the cycler program (CC-CV charge,
        # rest, discharge) is the same as in every later cycle, so the cell starts from the
        # charged, long-rested state that the file's last rest (after the same charge) ends in.
        v_rest = float(df["voltage_v"][-1])
        t_start = 0.0
    t_end = float(dis["time_s"][-1])
    record = df.filter((pl.col("time_s") > t_start) & (pl.col("time_s") <= t_end + COOL_DOWN_S))
    t, i, _ = _columns(record)
    t = np.concatenate(([t_start], t))
    i = np.concatenate(([0.0], i))

    # The .lvm log runs on its own 3 s clock from about the Bitrode start (ORNL's plot.py
    # uses the two clocks as they are); the peak-lag check below confirms they agree.
    lvm = leaf_data.load_lvm(leaf_data.DATA_DIR / f"Temperature-{rate}-discharge.lvm")
    t_lvm = lvm["time_s"].to_numpy()
    tcs = lvm.select("tc1_c", "tc2_c", "tc3_c").to_numpy()
    before = (t_lvm <= t_start) & (t_lvm > t_start - 30.0)
    before = before if before.any() else t_lvm == t_lvm[0]
    window = (t_lvm > t_start) & (t_lvm <= t_end + COOL_DOWN_S)
    mean_tc = tcs.mean(axis=1)
    start_c = float(mean_tc[before].mean())
    k_peak = int(np.flatnonzero(window)[np.argmax(mean_tc[window])])
    hottest = tcs[window].max(axis=0) - tcs[before].mean(axis=0)

    soc0 = float(chem.soc_from_ocv(v_rest))
    bank = _cell_bank(chem, capacity_ah=_c15_window().capacity_ah, soc0=soc0, temp_c=start_c)
    trace = _drive(bank, t, i, start_c)
    return TemperatureRise(
        start_c=start_c,
        measured_k=float(mean_tc[k_peak]) - start_c,
        measured_hottest_k=float(hottest.max()),
        emulated_k=float(trace.temp_c.max()) - start_c,
        peak_lag_s=float(t_lvm[k_peak]) - t_end,
    )


@pytest.mark.parametrize("rate", RATES)
def test_discharge_temperature_rise(rate: str) -> None:
    """The emulated cell's peak temperature rise is within 2 °C of the thermocouples'.

    The cell sat in ambient air at about 25 °C; ``env_temp_c`` and the initial cell
    temperature are the measured start temperature. The lumped model's temperature is the
    cell's mean, so it is compared with the mean of the three cell thermocouples (TC1 near
    the tabs, TC2 mid-cell, TC3 bottom); the hottest thermocouple (TC2, 0.3-1 K above the
    mean) is printed alongside. The measured peak must come 0-150 s after the Bitrode
    discharge end (heat takes that long to reach the surface), which checks the alignment
    of the two logs' clocks.
    """
    rise = _temperature_rise(rate)
    print(
        f"{rate}: from {rise.start_c:.2f} °C, peak rise emulated {rise.emulated_k:.2f} K, measured "
        f"{rise.measured_k:.2f} K (TC mean), {rise.measured_hottest_k:.2f} K (hottest TC); "
        f"measured peak {rise.peak_lag_s:.0f} s after the discharge end"
    )
    assert 0.0 <= rise.peak_lag_s <= 150.0
    assert rise.emulated_k == pytest.approx(rise.measured_k, abs=TEMPERATURE_RISE_TOLERANCE_K)


# ------------------------------------------------------------------------------------------------
# 3. Aging: the emulator's fade on the BLAST-Lite reference conditions
# ------------------------------------------------------------------------------------------------

AGING_CHEMISTRIES = ("nmc811", "nmc532", "lfp")
AGING_CONDITIONS = ("cal50_25", "cal90_25", "cal90_35", "cyc1_25", "cyc1_35")
AGING_TEMP_C = {"cal50_25": 25.0, "cal90_25": 25.0, "cal90_35": 35.0, "cyc1_25": 25.0, "cyc1_35": 35.0}
CALENDAR_SOC = {"cal50_25": 0.5, "cal90_25": 0.9, "cal90_35": 0.9}
# BATTERY_NOTES.md section 1.4, "Scenario check" (written once, in tests/test_aging.py): relative
# capacity after (5, 10) years, for the BLAST-Lite model each chemistry's aging law implements.
NOTES_FADE = {law: NOTES_TABLE[law] for law in ("nmc811_grsi_lgm50", "nmc622_gr_denso50ah", "lfp_gr_250ah_prismatic")}
PROFILE_STEP_S = 900.0  # BLAST-Lite's 15-min sampling of the reference day
PROFILE_STEPS = 96
DAYS_PER_YEAR = 365


def _cyc1_soc(hours: FloatArray) -> FloatArray:
    """The "cyc1" day: 0.25C charge 10 -> 90 % over 0-3.2 h, hold, 0.25C discharge 12-15.2 h, hold."""
    return np.asarray(np.interp(hours % 24.0, [0.0, 3.2, 12.0, 15.2, 24.0], [0.1, 0.9, 0.9, 0.1, 0.1]))


class AgingRig(NamedTuple):
    """One pack per (chemistry, condition), with the emulator's aging path attached."""

    bank: PackBank
    aging: FleetAging
    cycling: npt.NDArray[np.bool_]  # (P,) follows cyc1 (else stands at a calendar SoC)
    calendar_soc: FloatArray  # (P,)
    temp_c: FloatArray  # (P,)
    law_index: dict[str, int]  # law name -> first pack of that chemistry


def _aging_rig() -> AgingRig:
    """Build 15 one-cell packs (3 chemistries x 5 conditions) with first-life aging switched off."""
    chems = [get_chemistry(name) for name in AGING_CHEMISTRIES]
    n_cond = len(AGING_CONDITIONS)
    n = len(chems) * n_cond
    one = np.ones((n, 1))
    rated_ah = 100.0
    params = PackParams(
        chem_index=np.repeat(np.arange(len(chems)), n_cond).astype(np.int64),
        series=np.ones(n, dtype=np.int64),
        parallel=np.ones(n, dtype=np.int64),
        rated_group_ah=np.full(n, rated_ah),
        capacity_ah=np.full((n, 1), rated_ah),
        r_cell=one.copy(),
        soc0=np.full((n, 1), 0.5),
        mask=np.ones((n, 1), dtype=bool),
        weight=one.copy(),
        i_dis_max_a=np.full(n, 1e4),
        i_chg_max_a=np.full(n, 1e4),
        tables=ChemistryTables.build(chems),
    )
    zeros = np.zeros(n)
    # No first life, no site history, no knee, unit aging scalar: the bare published law.
    fleet = Fleet(
        pack_ids=tuple(f"pack{k}" for k in range(n)),
        group_index=np.zeros(n, dtype=np.int64),
        params=params,
        soh0=np.ones(n),
        aging_scalar=np.ones(n),
        knee=np.zeros(n, dtype=bool),
        bms_soh=np.ones(n),
        years_in_service=zeros.copy(),
        first_life_efc=zeros.copy(),
        site_days=zeros.copy(),
        cell_position=np.zeros((n, 1), dtype=np.int64),
        meta=pl.DataFrame(),
    )
    bank = PackBank(params, temp_c=np.full(n, 25.0))
    aging = FleetAging(fleet, bank, speedup=1.0, rng=np.random.default_rng(0))
    conditions = list(AGING_CONDITIONS) * len(chems)
    return AgingRig(
        bank=bank,
        aging=aging,
        cycling=np.array([c.startswith("cyc") for c in conditions]),
        calendar_soc=np.array([CALENDAR_SOC.get(c, 0.0) for c in conditions]),
        temp_c=np.array([AGING_TEMP_C[c] for c in conditions]),
        law_index={chem.aging_model: k * n_cond for k, chem in enumerate(chems)},
    )


class DayStep(NamedTuple):
    """One accumulate() call: SoC, current per unit of present capacity (1/h) and duration."""

    soc: float
    c_rate: float  # + = discharge
    dt_s: float


def _cyc1_steps() -> list[DayStep]:
    """The reference day at BLAST-Lite's 15-min steps.

    Each step holds the mean current that moves the SoC between its two samples (the
    pack follows the SoC profile, so the current is that C-rate times its present capacity)
    and the trapezoid mean of the two SoC samples.
    """
    edges = _cyc1_soc(np.arange(PROFILE_STEPS + 1, dtype=np.float64) * (PROFILE_STEP_S / 3600.0))
    soc_mean = 0.5 * (edges[1:] + edges[:-1])
    c_rate = -np.diff(edges) / (PROFILE_STEP_S / 3600.0)
    return [DayStep(float(s), float(c), PROFILE_STEP_S) for s, c in zip(soc_mean, c_rate, strict=True)]


def _grouped(steps: list[DayStep]) -> list[DayStep]:
    """Merge each run of rest steps at one SoC into a single step (same stressors, fewer calls).

    ``FleetAging.accumulate`` keeps only running sums over time (SoC, temperature and
    |C-rate| times dt, split into charge and discharge) and the SoC minimum and maximum, and
    the C-rates only change at ``apply()``; for steps at the same SoC with no current one long
    step gives exactly the same sums (and the same SoC occupancy, should the accumulator keep
    one). The 26 steps that move the SoC are kept as they are. Checked by
    :func:`test_grouped_profile_gives_the_per_step_stressors`.
    """
    out: list[DayStep] = []
    for step in steps:
        last = out[-1] if out else None
        if last is not None and step.c_rate == 0.0 and last.c_rate == 0.0 and step.soc == last.soc:
            out[-1] = last._replace(dt_s=last.dt_s + step.dt_s)
        else:
            out.append(step)
    return out


def _accumulate_day(rig: AgingRig, steps: list[DayStep]) -> None:
    """Feed one reference day to the emulator's aging accumulator (no apply)."""
    capacity = rig.bank.pack_capacity_ah()
    for step in steps:
        soc = np.where(rig.cycling, step.soc, rig.calendar_soc)
        current = np.where(rig.cycling, step.c_rate * capacity, 0.0)
        rig.aging.accumulate(soc, current, rig.temp_c, step.dt_s)


@functools.cache
def _emulated_fade() -> dict[str, dict[str, tuple[float, float]]]:
    """Run the aging rig 10 years in daily apply() chunks; q after 5 and 10 years per law and condition."""
    rig = _aging_rig()
    day = _grouped(_cyc1_steps())
    capacity0 = rig.bank.capacity_ah[:, 0].copy()
    q = {}
    for d in range(1, 10 * DAYS_PER_YEAR + 1):
        _accumulate_day(rig, day)
        rig.aging.apply()
        if d in (5 * DAYS_PER_YEAR, 10 * DAYS_PER_YEAR):
            q[d] = rig.bank.capacity_ah[:, 0] / capacity0
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for law, first in rig.law_index.items():
        out[law] = {
            cond: (float(q[5 * DAYS_PER_YEAR][first + k]), float(q[10 * DAYS_PER_YEAR][first + k]))
            for k, cond in enumerate(AGING_CONDITIONS)
        }
    return out


def test_grouped_profile_gives_the_per_step_stressors() -> None:
    """Feeding the day's 96 steps one by one or grouped by phase gives the same stressors."""
    per_step, grouped = _aging_rig(), _aging_rig()
    _accumulate_day(per_step, _cyc1_steps())
    _accumulate_day(grouped, _grouped(_cyc1_steps()))
    everyone = np.arange(per_step.bank.params.n_packs)
    a, b = per_step.aging.stressors(everyone), grouped.aging.stressors(everyone)
    for f in dataclasses.fields(a):
        np.testing.assert_allclose(getattr(a, f.name), getattr(b, f.name), rtol=1e-12, atol=1e-12, err_msg=f.name)
    cyc = per_step.cycling
    np.testing.assert_allclose(a.dod[cyc], 0.8, atol=1e-12)
    np.testing.assert_allclose(a.efc[cyc], 0.8, atol=1e-12)
    np.testing.assert_allclose(a.soc_mean[cyc], 0.5, atol=1e-12)


def test_chemistries_use_the_laws_of_the_notes_table() -> None:
    """The aging laws checked here are the ones the project's chemistries name."""
    assert {get_chemistry(c).aging_model for c in AGING_CHEMISTRIES} == set(NOTES_FADE)
    for law in NOTES_FADE:
        assert get_aging_law(law).name == law


AGING_CASES = [pytest.param(law, cond, id=f"{law}-{cond}") for law in sorted(NOTES_FADE) for cond in AGING_CONDITIONS]


@pytest.mark.parametrize(("law", "condition"), AGING_CASES)
def test_emulator_fade_matches_blast_lite_table(law: str, condition: str) -> None:
    """The emulator's relative capacity after 5 and 10 years is within 1 pp of BLAST-Lite's.

    One pack per chemistry and condition, first-life pre-aging off (no years in service, no
    site days, no knee, aging scalar 1), driven through ``FleetAging.accumulate`` with the
    reference day at 15-min steps (the pack follows the SoC profile, so its current scales
    with its present capacity) at constant temperature, and ``apply()`` once a day with
    ``speedup=1``: the emulator's own path from stressors to ``PackBank.apply_aging``.
    """
    got = _emulated_fade()[law][condition]
    want = NOTES_FADE[law][condition]
    print(f"{law} {condition}: emulator q5 {got[0]:.3f} q10 {got[1]:.3f}; BLAST-Lite {want[0]:.3f} {want[1]:.3f}")
    assert got[0] == pytest.approx(want[0], abs=FADE_TOLERANCE), f"{law} {condition} 5 years"
    assert got[1] == pytest.approx(want[1], abs=FADE_TOLERANCE), f"{law} {condition} 10 years"


# ------------------------------------------------------------------------------------------------
# 4. Second-life spread of the nevada fleet
# ------------------------------------------------------------------------------------------------


# BATTERY_NOTES.md section 3, PulseBat retired cells: SoH mean, sd, p10/p50/p90, min, max,
# corr(SoH, R_5s), and the R_5s p90/p10 ratio.
class PulseBat(NamedTuple):
    """One PulseBat cell type's statistics (only those a nevada group is calibrated to)."""

    corr: float  # corr(SoH, R_5s at 50 % SoC)
    r_ratio: tuple[float, float]  # R_5s p90/p10, as a range (low, high)
    soh: dict[str, float]  # SoH statistics: mean, sd, p10, p50, p90


PULSEBAT = {
    # Its SoH (0.980 +- 0.053, min 0.746) is of barely-aged cells; the Bolt group keeps only the sd.
    "NMC 21 Ah": PulseBat(corr=-0.89, r_ratio=(1.1, 1.3), soh={"sd": 0.053}),
    # R p90/p10: the notes' 1.1-1.3 for NMC and LFP; nevada.toml quotes 1.26 for this type.
    "LFP 35 Ah": PulseBat(
        corr=-0.45,
        r_ratio=(1.26, 1.26),
        soh={"mean": 0.849, "sd": 0.049, "p10": 0.786, "p50": 0.847, "p90": 0.909},
    ),
    "LMO 10 Ah": PulseBat(corr=-0.71, r_ratio=(2.2, 2.2), soh={}),
}


class SpreadTarget(NamedTuple):
    """What each second-life group of nevada.toml says it was calibrated to (its comments)."""

    pulsebat: str  # the PulseBat cell type its resistance spread and correlation come from
    soh_stats: tuple[str, ...]  # PulseBat SoH statistics it reproduces
    soh_mean: float  # the group's intended mean SoH
    soh_range: tuple[float, float]  # hard bounds of its SoH draw


NEVADA_SECOND_LIFE = {
    # beta(1.8, 1.4) on [0.746, 0.95]: PulseBat's minimum and spread (sd), centred at 0.861
    # (not PulseBat's barely-aged 0.980); R p90/p10 1.1-1.3; corr -0.89.
    "bolt_2l": SpreadTarget("NMC 21 Ah", ("sd",), 0.861, (0.746, 0.95)),
    # SoH from Gao et al. (60-67 %), not PulseBat; PulseBat LMO for R p90/p10 2.2 and corr -0.71.
    "leaf_2l": SpreadTarget("LMO 10 Ah", (), 0.635, (0.60, 0.67)),
    # PulseBat LFP: 0.849 +- 0.049 truncated at [0.744, 0.95]; R p90/p10 1.26; corr -0.45.
    "lfp_bus_2l": SpreadTarget("LFP 35 Ah", ("mean", "sd", "p10", "p50", "p90"), 0.849, (0.744, 0.95)),
}
_Z90 = 1.2815515655446004  # standard normal 90 % quantile
_NORMAL_QUANTILE = {0.1: -_Z90, 0.5: 0.0, 0.9: _Z90}


def _quantile_se(p: float, sd: float, n: int) -> float:
    """Return the standard error of a sample p-quantile of a normal population (asymptotic).

    Args:
        p: the quantile, 0.1, 0.5 or 0.9.
        sd: the population's standard deviation.
        n: the sample size.

    Returns:
        ``sqrt(p(1-p)/n) / f(q_p)`` with ``f`` the normal density.
    """
    z = _NORMAL_QUANTILE[p]
    density = np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi) / sd
    return float(np.sqrt(p * (1.0 - p) / n) / density)


@functools.cache
def _nevada_fleet() -> tuple[Fleet, tuple[str, ...]]:
    scenario = load_scenario("nevada")
    # The stream Emulation draws the fleet from (the first child of the scenario's seed).
    rng_fleet = np.random.default_rng(scenario.seed).spawn(5)[0]
    names = tuple(g.name for g in scenario.pack_groups if g.count > 0)
    return build_fleet(scenario, rng_fleet), names


@pytest.mark.parametrize("group", sorted(NEVADA_SECOND_LIFE))
def test_second_life_spread_matches_pulsebat(group: str) -> None:
    """Starting SoH and pack resistance of each second-life group match their calibration.

    Pack resistance is the mean of ``params.r_cell`` over the string. Tolerances are three
    standard errors of each statistic for the group's pack count ``n``, computed from the
    target distribution: mean ``sd/sqrt(n)``; sd ``sd/sqrt(2(n-1))``; a p-quantile
    ``sqrt(p(1-p)/n)/f(q_p)`` (normal density ``f``); the log of the p90/p10 ratio of a
    lognormal with sigma ``s``, ``2.28 s/sqrt(n)`` (the two quantiles' variances and
    covariance); a correlation, Fisher ``z`` with ``1/sqrt(n-3)``. A statistic given as a
    range (NMC resistance ratio 1.1-1.3) must fall inside the range widened by that amount.
    """
    fleet, names = _nevada_fleet()
    target = NEVADA_SECOND_LIFE[group]
    ref = PULSEBAT[target.pulsebat]
    members = fleet.group_index == names.index(group)
    n = int(members.sum())
    soh = fleet.soh0[members]
    mask = fleet.params.mask[members]
    r_pack = np.where(mask, fleet.params.r_cell[members], 0.0).sum(axis=1) / mask.sum(axis=1)
    k = STANDARD_ERRORS

    ratio = float(np.quantile(r_pack, 0.9) / np.quantile(r_pack, 0.1))
    corr = float(np.corrcoef(soh, r_pack)[0, 1])
    q10, q50, q90 = np.quantile(soh, [0.1, 0.5, 0.9])
    print(
        f"{group} (n={n}): SoH mean {soh.mean():.4f} sd {soh.std(ddof=1):.4f} min {soh.min():.3f} "
        f"p10/p50/p90 {q10:.3f}/{q50:.3f}/{q90:.3f} max {soh.max():.3f}; "
        f"R p90/p10 {ratio:.3f}; corr(SoH, R) {corr:.3f}"
    )

    # SoH: hard bounds, the intended mean, and the PulseBat statistics it was calibrated to.
    assert soh.min() >= target.soh_range[0]
    assert soh.max() <= target.soh_range[1]
    sd_target = ref.soh.get("sd", float(soh.std(ddof=1)))  # the group's own sd where PulseBat gives none
    assert soh.mean() == pytest.approx(target.soh_mean, abs=k * sd_target / np.sqrt(n))
    for stat in target.soh_stats:
        if stat == "mean":
            assert soh.mean() == pytest.approx(ref.soh["mean"], abs=k * sd_target / np.sqrt(n))
        elif stat == "sd":
            assert soh.std(ddof=1) == pytest.approx(sd_target, abs=k * sd_target / np.sqrt(2 * (n - 1)))
        else:
            p = int(stat[1:]) / 100.0
            got = {"p10": q10, "p50": q50, "p90": q90}[stat]
            assert got == pytest.approx(ref.soh[stat], abs=k * _quantile_se(p, sd_target, n)), stat

    # Resistance spread: the lognormal sigma that gives the target ratio, and its sampling error.
    lo, hi = ref.r_ratio
    sigma = np.log(np.sqrt(lo * hi)) / (2.0 * _Z90)
    log_se = 2.279 * sigma / np.sqrt(n)
    assert lo * np.exp(-k * log_se) <= ratio <= hi * np.exp(k * log_se)

    # Correlation of SoH and resistance, on Fisher's z scale.
    z_se = 1.0 / np.sqrt(n - 3)
    assert np.arctanh(corr) == pytest.approx(np.arctanh(ref.corr), abs=k * z_se)


# ------------------------------------------------------------------------------------------------
# 5. Determinism
# ------------------------------------------------------------------------------------------------

FRAMES = ("telemetry", "cells", "site", "truth", "status")


def _run_small(chunk_s: float) -> dict[str, pl.DataFrame]:
    """Run the small scenario for 300 s and concatenate each kind of frame over the chunks."""
    emulation = Emulation(load_scenario("small"), EmulationOptions(duration_s=300, chunk_s=chunk_s))
    chunks = list(emulation.chunks())
    assert len(chunks) == int(np.ceil(300 / chunk_s))
    out = {}
    for name in FRAMES:
        frames = [f for f in (getattr(c, name) for c in chunks) if f is not None]
        out[name] = pl.concat(frames)
    return out


def test_same_seed_gives_identical_frames() -> None:
    """Two runs of the same scenario and options produce identical frames."""
    first, second = _run_small(100.0), _run_small(100.0)
    assert first["telemetry"].height > 0
    for name in FRAMES:
        assert_frame_equal(first[name], second[name], check_exact=True)


def test_chunk_size_does_not_change_results() -> None:
    """Handing the output over in one chunk of 300 s or three of 100 s changes nothing."""
    small_chunks, one_chunk = _run_small(100.0), _run_small(300.0)
    for name in FRAMES:
        assert_frame_equal(small_chunks[name], one_chunk[name], check_exact=True)
