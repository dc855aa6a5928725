"""Emulator scenarios: the site, its packs, its weather and its faults, read from TOML.

A scenario is validated once, at the edge, into frozen pydantic models; unknown keys are
rejected with the key's path and a "did you mean". Packaged scenarios live in
``emulators/scenarios/*.toml`` and load by name; a user's file loads by path::

    >>> from emulators.scenario import load_scenario
    >>> s = load_scenario("small")
    >>> s.pack_count
    12

Units are in every field name (``_mw``, ``_ah``, ``_s``, ``_c``); ``soc`` and ``soh`` are
fractions in [0, 1]. Power is positive on discharge, as everywhere in the project.

Energy and power ratings (:attr:`PackGroup.rated_energy_wh`, :attr:`Scenario.nameplate_energy_mwh`,
:attr:`Scenario.nameplate_power_mw`) use the per-family nominal cell voltages in
:data:`NOMINAL_CELL_VOLTAGE_V`. They are kept here, not taken from ``twin/chemistry``, so that
a scenario can be sized without the chemistry tables (which are written separately).
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from twin.errors import ScenarioError

__all__ = [
    "IDENTIFIER_PATTERN",
    "NOMINAL_CELL_VOLTAGE_V",
    "Beta",
    "CellSpread",
    "Chemistry",
    "ClimateConfig",
    "CloudConfig",
    "ContactorOpen",
    "ContainerConfig",
    "DispatchPolicy",
    "Fault",
    "GatewayOffline",
    "GridConfig",
    "Life",
    "LoadConfig",
    "PackGroup",
    "PackSelector",
    "Scenario",
    "SensorConfig",
    "SensorOffset",
    "SensorStuck",
    "Signal",
    "SohDistribution",
    "SolarConfig",
    "TelemetryConfig",
    "TelemetryDropout",
    "ThermalRunawayPrecursor",
    "TruncNormal",
    "Uniform",
    "WeakCell",
    "list_scenarios",
    "load_scenario",
    "parse_scenario",
]

IDENTIFIER_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Identifier rule of the MQTT contract (DESIGN.md, "Contract")."""

# A pack id is "{group}-{index:04d}"; 48 characters leave room for the suffix within 64.
_GROUP_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,48}$"

Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
GroupName = Annotated[str, StringConstraints(pattern=_GROUP_NAME_PATTERN)]

Chemistry = Literal["nmc811", "nmc532", "lfp", "lmo"]
Life = Literal["new", "second_life"]

NOMINAL_CELL_VOLTAGE_V: Mapping[str, float] = types.MappingProxyType(
    {
        # Nominal (mid-SoC, C/3) cell voltages by family, used only to size scenarios.
        # NMC: 3.65 V is the usual datasheet figure for graphite/NMC cells (LG, Samsung SDI;
        # the Chen2020 NMC811 OCV is 3.75 V at 50 % SoC, BATTERY_NOTES 1.1, minus IR at C/3).
        "nmc811": 3.65,
        "nmc532": 3.65,
        # LFP: 3.2 V, the near-universal datasheet value (Sony/Murata US26650: OCV 3.30 V
        # at 50 % SoC, BATTERY_NOTES 1.1).
        "lfp": 3.2,
        # LMO/LNO (Nissan Leaf, AESC): 3.75 V; the Leaf 24 kWh pack is 360 V for 96 s.
        "lmo": 3.75,
    }
)
"""Nominal cell voltage (V) per chemistry family, for nameplate energy and power only."""

_SCENARIO_PACKAGE = "emulators"
_SCENARIO_DIR = "scenarios"

# Floats given as TOML arrays arrive as lists; accept the list but not strings inside it.
_Float = Annotated[float, Strict()]
_Monthly = Annotated[tuple[_Float, ...], Field(strict=False, min_length=12, max_length=12)]


class _Model(BaseModel):
    """Base of every scenario model: frozen, strict, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- distributions


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _norm_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


class TruncNormal(_Model):
    """A normal distribution of SoH truncated to [low, high].

    ``mu`` and ``sigma`` are the parameters of the parent normal, not the mean and standard
    deviation after truncation (see :attr:`expected_value`).
    """

    kind: Literal["truncnorm"]
    mu: float = Field(gt=0.0, le=1.2)
    sigma: float = Field(gt=0.0, le=0.5)
    low: float = Field(gt=0.0, le=1.1)
    high: float = Field(gt=0.0, le=1.1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.low < self.high:
            msg = f"low ({self.low}) must be below high ({self.high})"
            raise ValueError(msg)
        if self._mass() < 1e-3:
            msg = "less than 0.1 % of the normal lies inside [low, high]; move mu or widen sigma"
            raise ValueError(msg)
        return self

    def _mass(self) -> float:
        a = (self.low - self.mu) / self.sigma
        b = (self.high - self.mu) / self.sigma
        return _norm_cdf(b) - _norm_cdf(a)

    @property
    def expected_value(self) -> float:
        """Return the mean of the truncated distribution."""
        a = (self.low - self.mu) / self.sigma
        b = (self.high - self.mu) / self.sigma
        return self.mu + self.sigma * (_norm_pdf(a) - _norm_pdf(b)) / self._mass()

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Draw ``n`` values by rejection from the parent normal.

        Args:
            rng: the random generator; the draws are deterministic given its state.
            n: how many values to draw.

        Returns:
            An array of ``n`` values inside [low, high].
        """
        out = np.empty(n, dtype=np.float64)
        filled = 0
        mass = self._mass()
        # The validator guarantees mass >= 1e-3, so this loop runs a handful of times.
        while filled < n:
            m = int((n - filled) / mass * 1.2) + 16
            x = rng.normal(self.mu, self.sigma, m)
            x = x[(x >= self.low) & (x <= self.high)]
            take = min(n - filled, x.size)
            out[filled : filled + take] = x[:take]
            filled += take
        return out


class Beta(_Model):
    """A beta distribution of SoH scaled onto [low, high]."""

    kind: Literal["beta"]
    alpha: float = Field(gt=0.0, le=1000.0)
    beta: float = Field(gt=0.0, le=1000.0)
    low: float = Field(gt=0.0, le=1.1)
    high: float = Field(gt=0.0, le=1.1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.low < self.high:
            msg = f"low ({self.low}) must be below high ({self.high})"
            raise ValueError(msg)
        return self

    @property
    def expected_value(self) -> float:
        """Return the mean of the distribution."""
        return self.low + (self.high - self.low) * self.alpha / (self.alpha + self.beta)

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Draw ``n`` values.

        Args:
            rng: the random generator.
            n: how many values to draw.

        Returns:
            An array of ``n`` values inside [low, high].
        """
        return self.low + (self.high - self.low) * rng.beta(self.alpha, self.beta, n)


class Uniform(_Model):
    """A uniform distribution of SoH on [low, high]."""

    kind: Literal["uniform"]
    low: float = Field(gt=0.0, le=1.1)
    high: float = Field(gt=0.0, le=1.1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.low < self.high:
            msg = f"low ({self.low}) must be below high ({self.high})"
            raise ValueError(msg)
        return self

    @property
    def expected_value(self) -> float:
        """Return the mean of the distribution."""
        return 0.5 * (self.low + self.high)

    def sample(self, rng: np.random.Generator, n: int) -> NDArray[np.float64]:
        """Draw ``n`` values.

        Args:
            rng: the random generator.
            n: how many values to draw.

        Returns:
            An array of ``n`` values inside [low, high].
        """
        return rng.uniform(self.low, self.high, n)


SohDistribution = Annotated[TruncNormal | Beta | Uniform, Field(discriminator="kind")]
"""Starting-SoH distribution of a pack group, chosen by its ``kind`` key."""


# --------------------------------------------------------------------------- packs


class CellSpread(_Model):
    """Cell-to-cell spread inside one pack.

    Defaults are the fresh-cell values of BATTERY_NOTES section 3 (Baumhöfer 2014: capacity
    CoV 0.54 %; Kona field data: R CoV 1.5–2.4 %).
    """

    capacity_cov: float = Field(default=0.005, ge=0.0, le=0.5)
    resistance_cov: float = Field(default=0.02, ge=0.0, le=1.0)
    initial_soc_sd: float = Field(default=0.005, ge=0.0, le=0.2)


class PackGroup(_Model):
    """A group of identical-by-design packs: one OEM, chemistry, configuration and life.

    Attributes:
        name: the group's identifier; pack ids are ``{name}-{index:04d}``.
        count: packs in the group (0 allowed, for a mix that leaves a type out).
        chemistry: cell type, one of the ``twin/chemistry`` families.
        life: ``"new"`` or ``"second_life"``.
        oem: a free label for the pack's origin.
        cell_capacity_ah: the OEM's rating of a new cell; SoH is relative to it.
        series_cells: series cell groups per pack.
        parallel_cells: cells in parallel per group.
        max_discharge_c_rate: the continuous discharge limit the *site* allows each pack
            (set by its power-conversion channel, usually far below what the cells could
            do), applied to the rated capacity: a current limit in amperes that does not
            shrink as the pack ages.
        max_charge_c_rate: the same for charge; the discharge limit when omitted.
        soh: distribution of the packs' starting SoH.
        resistance_sigma: lognormal sigma of a pack's resistance multiplier.
        soh_resistance_corr: correlation between a pack's starting SoH and its resistance
            multiplier (negative: faded packs are more resistive; PulseBat −0.45…−0.89).
        aging_rate_sigma: lognormal sigma of a pack's aging-rate scalar (BLAST-Lite
            ``degradation_scalar``).
        knee_probability: probability that a pack is near or past its knee at the start.
        bms_soh_reset_share: share of packs whose BMS reports SoH 100 % whatever the truth.
        bms_soh_error_sd: error of the other BMSs' reported SoH (fraction).
        cells: cell-to-cell spread inside each pack.
    """

    name: GroupName
    count: int = Field(ge=0, le=100_000)
    chemistry: Chemistry
    life: Life
    oem: str = Field(min_length=1, max_length=64)
    cell_capacity_ah: float = Field(gt=0.0, le=2000.0)
    series_cells: int = Field(ge=1, le=400)
    parallel_cells: int = Field(ge=1, le=200)
    max_discharge_c_rate: float = Field(gt=0.0, le=20.0)
    max_charge_c_rate: float | None = Field(default=None, gt=0.0, le=20.0)
    soh: SohDistribution
    resistance_sigma: float = Field(default=0.05, ge=0.0, le=2.0)
    soh_resistance_corr: float = Field(default=-0.7, ge=-1.0, le=1.0)
    aging_rate_sigma: float = Field(default=0.15, ge=0.0, le=2.0)
    knee_probability: float = Field(default=0.0, ge=0.0, le=1.0)
    bms_soh_reset_share: float = Field(default=0.0, ge=0.0, le=1.0)
    bms_soh_error_sd: float = Field(default=0.0, ge=0.0, le=0.5)
    cells: CellSpread = CellSpread()

    @model_validator(mode="after")
    def _check(self) -> Self:
        # A new pack's starting SoH is near 1: manufacturing spread only.
        if self.life == "new" and (self.soh.expected_value < 0.95 or self.soh.high > 1.05):
            msg = (
                f"a new pack group needs a starting SoH near 1.0 (mean >= 0.95, high <= 1.05); "
                f"got mean {self.soh.expected_value:.3f}, high {self.soh.high}"
            )
            raise ValueError(msg)
        return self

    @property
    def nominal_cell_voltage_v(self) -> float:
        """Return the nominal cell voltage of the chemistry family (V)."""
        return NOMINAL_CELL_VOLTAGE_V[self.chemistry]

    @property
    def nominal_voltage_v(self) -> float:
        """Return the pack's nominal voltage (V)."""
        return self.series_cells * self.nominal_cell_voltage_v

    @property
    def capacity_ah(self) -> float:
        """Return the pack's rated capacity (Ah), as new."""
        return self.cell_capacity_ah * self.parallel_cells

    @property
    def rated_energy_wh(self) -> float:
        """Return one pack's rated energy as new (Wh)."""
        return self.nominal_voltage_v * self.capacity_ah

    @property
    def charge_c_rate(self) -> float:
        """Return the charge C-rate limit (the discharge limit when none is given)."""
        return self.max_discharge_c_rate if self.max_charge_c_rate is None else self.max_charge_c_rate

    @property
    def max_discharge_power_w(self) -> float:
        """Return one pack's discharge power limit at nominal voltage (W)."""
        return self.rated_energy_wh * self.max_discharge_c_rate

    @property
    def max_charge_power_w(self) -> float:
        """Return one pack's charge power limit at nominal voltage (W)."""
        return self.rated_energy_wh * self.charge_c_rate

    @property
    def commissioning_energy_wh(self) -> float:
        """Return one pack's expected energy at commissioning: rated energy × mean starting SoH (Wh)."""
        return self.rated_energy_wh * self.soh.expected_value


# --------------------------------------------------------------------------- site


class LoadConfig(_Model):
    """The GPU data centre: IT load dynamics and cooling.

    ``it_base_mw`` is the IT draw with every training slot running a job and inference at
    its daily mean. Training capacity (``training_share``) is split into
    ``training_job_slots`` equal slots; each alternates between a running job and idle with
    Poisson starts and stops. A running job dips by ``checkpoint_depth`` for
    ``checkpoint_duration_s`` every ``checkpoint_period_s`` (each job draws its own period
    within ± ``checkpoint_period_jitter``). An idle slot draws ``idle_fraction`` of its
    capacity. Inference follows a daily cosine peaking at ``inference_peak_hour_utc`` with
    multiplicative Ornstein–Uhlenbeck noise. Cooling is ``it × (PUE − 1)``, where PUE rises
    linearly with ambient temperature between ``pue_min`` and ``pue_max``.
    """

    it_base_mw: float = Field(gt=0.0, le=10_000.0)
    training_share: float = Field(ge=0.0, le=1.0)
    training_job_slots: int = Field(default=4, ge=1, le=256)
    job_start_rate_per_h: float = Field(ge=0.0, le=3600.0)
    job_stop_rate_per_h: float = Field(ge=0.0, le=3600.0)
    idle_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    checkpoint_period_s: float = Field(gt=0.0, le=86_400.0)
    checkpoint_period_jitter: float = Field(default=0.1, ge=0.0, le=0.5)
    checkpoint_duration_s: float = Field(gt=0.0)
    checkpoint_depth: float = Field(ge=0.0, le=1.0)
    inference_diurnal_amplitude: float = Field(default=0.25, ge=0.0, le=1.0)
    inference_peak_hour_utc: float = Field(default=22.0, ge=0.0, lt=24.0)
    inference_noise_sd: float = Field(default=0.03, ge=0.0, le=0.5)
    inference_noise_tau_s: float = Field(default=600.0, gt=0.0)
    pue_ref: float = Field(default=1.15, ge=1.0, le=3.0)
    pue_ref_ambient_c: float = Field(default=20.0, ge=-50.0, le=60.0)
    pue_per_c: float = Field(default=0.006, ge=0.0, le=0.1)
    pue_min: float = Field(default=1.05, ge=1.0, le=3.0)
    pue_max: float = Field(default=1.5, ge=1.0, le=3.0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.checkpoint_duration_s >= self.checkpoint_period_s * (1.0 - self.checkpoint_period_jitter):
            msg = "checkpoint_duration_s must be shorter than the shortest checkpoint period"
            raise ValueError(msg)
        if not self.pue_min <= self.pue_ref <= self.pue_max:
            msg = f"need pue_min <= pue_ref <= pue_max, got {self.pue_min}, {self.pue_ref}, {self.pue_max}"
            raise ValueError(msg)
        return self

    @property
    def job_occupancy(self) -> float:
        """Return the long-run share of time a training slot runs a job."""
        total = self.job_start_rate_per_h + self.job_stop_rate_per_h
        return 1.0 if total == 0.0 else self.job_start_rate_per_h / total

    @property
    def expected_it_mw(self) -> float:
        """Return the long-run mean IT load (MW) implied by the parameters."""
        dip = self.checkpoint_depth * self.checkpoint_duration_s / self.checkpoint_period_s
        occ = self.job_occupancy
        training = occ * (1.0 - dip) + (1.0 - occ) * self.idle_fraction
        return self.it_base_mw * (self.training_share * training + (1.0 - self.training_share))


class CloudConfig(_Model):
    """Weather as a semi-Markov chain of sky regimes acting on a clear-sky index.

    Regimes: clear (index 1), broken cloud (an Ornstein–Uhlenbeck process around
    ``broken_index_mean``, which can exceed 1 briefly: cloud enhancement) and overcast
    (``overcast_index``). Each regime lasts an exponential time with the given mean; the
    next regime is drawn with the ``*_weight`` probabilities, so the long-run share of a
    regime is proportional to weight × dwell. Changes are smoothed over ``ramp_s``.
    """

    clear_dwell_h: float = Field(default=36.0, gt=0.0)
    broken_dwell_h: float = Field(default=6.0, gt=0.0)
    overcast_dwell_h: float = Field(default=12.0, gt=0.0)
    clear_weight: float = Field(default=0.6, ge=0.0)
    broken_weight: float = Field(default=0.3, ge=0.0)
    overcast_weight: float = Field(default=0.1, ge=0.0)
    broken_index_mean: float = Field(default=0.65, gt=0.0, le=1.2)
    broken_index_sd: float = Field(default=0.2, ge=0.0, le=1.0)
    broken_tau_s: float = Field(default=300.0, gt=0.0)
    overcast_index: float = Field(default=0.25, ge=0.0, le=1.0)
    ramp_s: float = Field(default=60.0, ge=0.0, le=3600.0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.clear_weight + self.broken_weight + self.overcast_weight <= 0.0:
            msg = "at least one of clear_weight, broken_weight, overcast_weight must be positive"
            raise ValueError(msg)
        return self

    @property
    def regime_shares(self) -> tuple[float, float, float]:
        """Return the long-run share of time in the clear, broken and overcast regimes."""
        raw = (
            self.clear_weight * self.clear_dwell_h,
            self.broken_weight * self.broken_dwell_h,
            self.overcast_weight * self.overcast_dwell_h,
        )
        total = sum(raw)
        return (raw[0] / total, raw[1] / total, raw[2] / total)


class SolarConfig(_Model):
    """A fixed-tilt PV plant.

    Defaults follow PVWatts v5 conventions (system losses 14 %, module temperature
    coefficient −0.37 %/°C for a standard module, NOCT 45 °C) [memory: Dobos, NREL/TP-6A20-62641, 2014].
    """

    dc_mw: float = Field(ge=0.0, le=10_000.0)
    ac_mw: float = Field(ge=0.0, le=10_000.0)
    latitude_deg: float = Field(ge=-90.0, le=90.0)
    longitude_deg: float = Field(ge=-180.0, le=180.0)
    tilt_deg: float = Field(ge=0.0, le=90.0)
    azimuth_deg: float = Field(default=180.0, ge=0.0, lt=360.0)
    system_loss: float = Field(default=0.14, ge=0.0, le=0.5)
    inverter_efficiency: float = Field(default=0.97, gt=0.0, le=1.0)
    temp_coeff_per_c: float = Field(default=-0.0037, ge=-0.01, le=0.0)
    noct_c: float = Field(default=45.0, ge=20.0, le=80.0)
    albedo: float = Field(default=0.2, ge=0.0, le=1.0)
    clouds: CloudConfig = CloudConfig()


class GridConfig(_Model):
    """The grid connection: limits and availability.

    Outages alternate with up-time; both are exponential, with mean outage
    ``mean_outage_h`` and long-run availability ``availability``.
    """

    import_limit_mw: float = Field(ge=0.0, le=10_000.0)
    export_limit_mw: float = Field(ge=0.0, le=10_000.0)
    availability: float = Field(default=1.0, ge=0.0, le=1.0)
    mean_outage_h: float = Field(default=2.0, gt=0.0)


class ClimateConfig(_Model):
    """Ambient temperature: a daily mean and a daily swing, plus correlated weather noise.

    Give the daily mean either as twelve monthly values (``monthly_mean_c``, interpolated
    between mid-months) or as a sinusoid (``annual_mean_c``, ``annual_amplitude_c``,
    coldest on ``coldest_day_of_year``); the daily swing either as twelve monthly
    half-ranges (``monthly_diurnal_amplitude_c``) or one value (``diurnal_amplitude_c``).
    The swing is a cosine peaking at ``peak_hour_utc``; the noise is an
    Ornstein–Uhlenbeck process (``noise_sd_c``, ``noise_tau_h``).
    """

    monthly_mean_c: _Monthly | None = None
    annual_mean_c: float | None = Field(default=None, ge=-60.0, le=60.0)
    annual_amplitude_c: float | None = Field(default=None, ge=0.0, le=60.0)
    coldest_day_of_year: float = Field(default=15.0, ge=1.0, le=366.0)
    monthly_diurnal_amplitude_c: _Monthly | None = None
    diurnal_amplitude_c: float | None = Field(default=None, ge=0.0, le=40.0)
    peak_hour_utc: float = Field(ge=0.0, lt=24.0)
    noise_sd_c: float = Field(default=2.0, ge=0.0, le=20.0)
    noise_tau_h: float = Field(default=12.0, gt=0.0, le=24.0 * 30)

    @model_validator(mode="after")
    def _check(self) -> Self:
        sinusoid = self.annual_mean_c is not None or self.annual_amplitude_c is not None
        if (self.monthly_mean_c is None) == (not sinusoid):
            msg = "give either monthly_mean_c or annual_mean_c with annual_amplitude_c, not both"
            raise ValueError(msg)
        if sinusoid and (self.annual_mean_c is None or self.annual_amplitude_c is None):
            msg = "annual_mean_c and annual_amplitude_c go together"
            raise ValueError(msg)
        if (self.monthly_diurnal_amplitude_c is None) == (self.diurnal_amplitude_c is None):
            msg = "give exactly one of monthly_diurnal_amplitude_c and diurnal_amplitude_c"
            raise ValueError(msg)
        if self.monthly_mean_c is not None and any(abs(v) > 60.0 for v in self.monthly_mean_c):
            msg = "monthly_mean_c values must lie within ±60 °C"
            raise ValueError(msg)
        if self.monthly_diurnal_amplitude_c is not None and any(
            not 0.0 <= v <= 40.0 for v in self.monthly_diurnal_amplitude_c
        ):
            msg = "monthly_diurnal_amplitude_c values must lie within 0–40 °C"
            raise ValueError(msg)
        return self


class ContainerConfig(_Model):
    """Thermal management of the battery containers, per pack.

    The container air is held between ``heating_setpoint_c`` and ``cooling_setpoint_c``
    within the HVAC capacities; ``envelope_ua_w_per_k_per_pack`` couples it to ambient and
    ``cell_h_w_per_m2_k`` couples the cells to the container air (BATTERY_NOTES 1.3:
    h ≈ 5–15 W/(m²·K) in the sources).
    """

    cooling_setpoint_c: float = Field(default=25.0, ge=-20.0, le=60.0)
    heating_setpoint_c: float = Field(default=10.0, ge=-40.0, le=40.0)
    cooling_capacity_w_per_pack: float = Field(default=3000.0, ge=0.0)
    heating_capacity_w_per_pack: float = Field(default=2000.0, ge=0.0)
    envelope_ua_w_per_k_per_pack: float = Field(default=15.0, ge=0.0)
    cell_h_w_per_m2_k: float = Field(default=10.0, gt=0.0, le=1000.0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.heating_setpoint_c >= self.cooling_setpoint_c:
            msg = "heating_setpoint_c must be below cooling_setpoint_c"
            raise ValueError(msg)
        return self


class SensorConfig(_Model):
    """Measurement errors of the pack BMS and gateway.

    ``current_offset_sd_a`` is the spread of a fixed per-pack offset; ``bms_soc_drift_per_h``
    is the standard deviation per hour of the BMS's SoC random walk (a fraction).
    Temperatures are quantised to whole degrees by default, as many BMSs report them.
    """

    pack_voltage_noise_v: float = Field(default=0.1, ge=0.0)
    cell_voltage_noise_v: float = Field(default=0.002, ge=0.0)
    cell_voltage_quantum_v: float = Field(default=0.001, ge=0.0)
    current_noise_a: float = Field(default=0.2, ge=0.0)
    current_offset_sd_a: float = Field(default=0.1, ge=0.0)
    temp_noise_c: float = Field(default=0.3, ge=0.0)
    temp_quantum_c: float = Field(default=1.0, ge=0.0)
    bms_soc_drift_per_h: float = Field(default=0.002, ge=0.0, le=0.1)


class CellModelConfig(_Model):
    """How far the emulated cells are from the chemistry tables the twin knows.

    ``ocv_error_mv``: RMS over SoC of the difference between the real cells' OCV and the
    chemistry's table, common to the packs of one chemistry (a table measured on other cells
    of the type, another lot, another age): a smooth curve per chemistry (four sine and four
    cosine terms of SoC) drawn from the scenario's seed. 0 (the default) gives the cells the
    table itself, so the twin's OCV model is exact and its SoC error is the sensors' alone.
    """

    ocv_error_mv: float = Field(default=0.0, ge=0.0, le=50.0)


class DispatchPolicy(_Model):
    """How the site uses its battery.

    The battery serves the data centre first; the grid covers what the battery cannot.
    Surplus solar charges the battery before it is exported when ``charge_from_solar_first``
    (otherwise export comes first). With ``grid_charging_allowed`` the battery also charges
    from the grid's spare import capacity while the site SoC is below ``target_soc``.
    No pack is discharged below ``reserve_floor_soc``.
    """

    reserve_floor_soc: float = Field(default=0.1, ge=0.0, lt=1.0)
    target_soc: float = Field(default=0.9, gt=0.0, le=1.0)
    charge_from_solar_first: bool = True
    grid_charging_allowed: bool = False

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.reserve_floor_soc >= self.target_soc:
            msg = "reserve_floor_soc must be below target_soc"
            raise ValueError(msg)
        return self


class TelemetryConfig(_Model):
    """Publishing cadences (DESIGN.md: cells every 10–60 s, slower than the pack telemetry)."""

    pack_telemetry_s: float = Field(default=1.0, gt=0.0, le=60.0)
    cells_s: float = Field(default=10.0, gt=0.0, le=600.0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.cells_s < self.pack_telemetry_s:
            msg = "cells_s must not be shorter than pack_telemetry_s"
            raise ValueError(msg)
        return self


# --------------------------------------------------------------------------- faults


class PackSelector(_Model):
    """Which packs a fault hits.

    With ``index`` the one pack at that position of ``group``; without it, ``count`` packs
    drawn with the scenario seed, from ``group`` or (without a group) from the whole site.
    """

    group: GroupName | None = None
    index: int | None = Field(default=None, ge=0)
    count: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.index is not None and self.group is None:
            msg = "index needs a group"
            raise ValueError(msg)
        if self.index is not None and self.count != 1:
            msg = "give either index or count, not both"
            raise ValueError(msg)
        return self


Signal = Literal["pack_voltage_v", "current_a", "temp_c", "cell_voltage_v"]
"""A measured signal a sensor fault acts on; its unit is in its name."""


class _FaultBase(_Model):
    """What every fault has: its target packs, its start (seconds after the scenario's
    start) and its duration (omitted: to the end of the run)."""

    target: PackSelector
    start_s: float = Field(ge=0.0)
    duration_s: float | None = Field(default=None, gt=0.0)


class SensorStuck(_FaultBase):
    """A sensor repeats its last reading."""

    kind: Literal["sensor_stuck"]
    signal: Signal


class SensorOffset(_FaultBase):
    """A sensor reads ``offset`` too high (in the signal's own unit)."""

    kind: Literal["sensor_offset"]
    signal: Signal
    offset: float


class TelemetryDropout(_FaultBase):
    """Telemetry messages are lost with probability ``loss_fraction``."""

    kind: Literal["telemetry_dropout"]
    loss_fraction: float = Field(default=1.0, gt=0.0, le=1.0)


class GatewayOffline(_FaultBase):
    """The pack's gateway disconnects (its last will reports offline)."""

    kind: Literal["gateway_offline"]


class WeakCell(_FaultBase):
    """One series cell group loses capacity and gains resistance (random cell when no index)."""

    kind: Literal["weak_cell"]
    cell_index: int | None = Field(default=None, ge=0)
    capacity_factor: float = Field(default=0.7, gt=0.0, le=1.0)
    resistance_factor: float = Field(default=2.0, ge=1.0, le=100.0)


class ThermalRunawayPrecursor(_FaultBase):
    """A cell self-heats (e.g. a soft internal short), ramping up to ``self_heat_w``."""

    kind: Literal["thermal_runaway_precursor"]
    cell_index: int | None = Field(default=None, ge=0)
    self_heat_w: float = Field(default=5.0, gt=0.0, le=10_000.0)


class ContactorOpen(_FaultBase):
    """The pack's contactor opens: no current, voltage still reported."""

    kind: Literal["contactor_open"]


Fault = Annotated[
    SensorStuck | SensorOffset | TelemetryDropout | GatewayOffline | WeakCell | ThermalRunawayPrecursor | ContactorOpen,
    Field(discriminator="kind"),
]
"""A fault to inject, chosen by its ``kind`` key."""


# --------------------------------------------------------------------------- scenario


class Scenario(_Model):
    """A complete emulator scenario: the site, its pack groups, environment and faults.

    Two energy figures are derived. :attr:`rated_energy_mwh` sums the packs' ratings as new.
    :attr:`nameplate_energy_mwh` is what a second-life site declares: the energy its packs
    hold at commissioning, i.e. rated energy × each group's mean starting SoH. Power,
    :attr:`nameplate_power_mw`, is each pack's discharge current limit (C-rate × rated Ah)
    at nominal voltage.
    """

    site: Identifier
    description: str = Field(default="", max_length=4000)
    start: AwareDatetime
    seed: int = Field(ge=0, le=2**63 - 1)
    pack_groups: Annotated[tuple[PackGroup, ...], Field(strict=False, min_length=1)]
    load: LoadConfig
    solar: SolarConfig
    grid: GridConfig
    climate: ClimateConfig
    container: ContainerConfig = ContainerConfig()
    sensors: SensorConfig = SensorConfig()
    cell_model: CellModelConfig = CellModelConfig()
    dispatch: DispatchPolicy = DispatchPolicy()
    telemetry: TelemetryConfig = TelemetryConfig()
    faults: Annotated[tuple[Fault, ...], Field(strict=False)] = ()

    @field_validator("start", mode="before")
    @classmethod
    def _start_is_toml_datetime(cls, value: object) -> object:
        if isinstance(value, str):
            msg = "write start as a TOML datetime without quotes, e.g. start = 2025-07-01T07:00:00Z"
            raise ValueError(msg)
        return value

    @field_validator("start")
    @classmethod
    def _start_to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _check(self) -> Self:
        names = [g.name for g in self.pack_groups]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            msg = f"pack group names must be unique; repeated: {', '.join(duplicates)}"
            raise ValueError(msg)
        if self.pack_count < 1:
            msg = "the scenario has no packs (every group has count = 0)"
            raise ValueError(msg)
        groups = {g.name: g for g in self.pack_groups}
        for i, fault in enumerate(self.faults):
            sel = fault.target
            if sel.group is None:
                if sel.count > self.pack_count:
                    msg = f"faults[{i}]: count {sel.count} exceeds the site's {self.pack_count} packs"
                    raise ValueError(msg)
                continue
            if sel.group not in groups:
                hint = _did_you_mean(sel.group, groups)
                msg = f"faults[{i}]: target group {sel.group!r} does not exist{hint}"
                raise ValueError(msg)
            group = groups[sel.group]
            if sel.index is not None and sel.index >= group.count:
                msg = f"faults[{i}]: index {sel.index} is outside group {sel.group!r} of {group.count} packs"
                raise ValueError(msg)
            if sel.count > group.count:
                msg = f"faults[{i}]: count {sel.count} exceeds group {sel.group!r} of {group.count} packs"
                raise ValueError(msg)
            cell_index = getattr(fault, "cell_index", None)
            if cell_index is not None and cell_index >= group.series_cells:
                msg = (
                    f"faults[{i}]: cell_index {cell_index} is outside the "
                    f"{group.series_cells} series cells of group {sel.group!r}"
                )
                raise ValueError(msg)
        return self

    @property
    def pack_count(self) -> int:
        """Return the total number of packs."""
        return sum(g.count for g in self.pack_groups)

    @property
    def rated_energy_mwh(self) -> float:
        """Return the packs' total energy as new (MWh)."""
        return sum(g.count * g.rated_energy_wh for g in self.pack_groups) / 1e6

    @property
    def nameplate_energy_mwh(self) -> float:
        """Return the site's energy at commissioning: rated energy × mean starting SoH (MWh)."""
        return sum(g.count * g.commissioning_energy_wh for g in self.pack_groups) / 1e6

    @property
    def nameplate_power_mw(self) -> float:
        """Return the site's discharge power limit, summed over packs (MW)."""
        return sum(g.count * g.max_discharge_power_w for g in self.pack_groups) / 1e6

    @property
    def nameplate_charge_power_mw(self) -> float:
        """Return the site's charge power limit, summed over packs (MW)."""
        return sum(g.count * g.max_charge_power_w for g in self.pack_groups) / 1e6

    def group(self, name: str) -> PackGroup:
        """Return the pack group called ``name``.

        Args:
            name: the group's name.

        Returns:
            The group.

        Raises:
            ScenarioError: no group has that name.
        """
        for g in self.pack_groups:
            if g.name == name:
                return g
        msg = f"scenario {self.site!r} has no pack group {name!r}{_did_you_mean(name, self.group_names)}"
        raise ScenarioError(msg)

    @property
    def group_names(self) -> tuple[str, ...]:
        """Return the pack group names in file order."""
        return tuple(g.name for g in self.pack_groups)

    def pack_ids(self) -> tuple[str, ...]:
        """Return every pack's identifier, ``{group}-{index:04d}``, group by group.

        Returns:
            The identifiers, each matching :data:`IDENTIFIER_PATTERN`.
        """
        return tuple(f"{g.name}-{i:04d}" for g in self.pack_groups for i in range(g.count))

    def scaled(self, n_packs: int) -> Scenario:
        """Return the scenario resized to ``n_packs`` packs with the same mix.

        Group counts are proportional to the original (largest remainder), every non-empty
        group keeps at least one pack, and the total is exactly ``n_packs``. The data-centre
        load, the PV plant and the grid limits are scaled by the ratio of the new to the old
        nameplate energy, so the hours of storage per unit load stay the same. Fault
        targets keep their group; an index beyond the new group size wraps around and a
        count is capped at the group size.

        Args:
            n_packs: the new total pack count.

        Returns:
            A new, validated scenario.

        Raises:
            ScenarioError: ``n_packs`` is smaller than the number of non-empty groups.
        """
        counts = _proportional_counts([g.count for g in self.pack_groups], n_packs)
        data = self.model_dump(mode="python")
        for group, count in zip(data["pack_groups"], counts, strict=True):
            group["count"] = count
        new_counts = dict(zip(self.group_names, counts, strict=True))
        for fault in data["faults"]:
            target = fault["target"]
            size = new_counts[target["group"]] if target["group"] is not None else n_packs
            if target["index"] is not None:
                target["index"] %= size
            target["count"] = min(target["count"], size)
        new_energy = sum(c * g.commissioning_energy_wh for c, g in zip(counts, self.pack_groups, strict=True))
        factor = new_energy / 1e6 / self.nameplate_energy_mwh
        data["load"]["it_base_mw"] *= factor
        data["solar"]["dc_mw"] *= factor
        data["solar"]["ac_mw"] *= factor
        data["grid"]["import_limit_mw"] *= factor
        data["grid"]["export_limit_mw"] *= factor
        return parse_scenario(data, source=f"{self.site} scaled to {n_packs} packs")


def _proportional_counts(counts: list[int], n: int) -> list[int]:
    """Split ``n`` in proportion to ``counts``, at least one for each non-zero count."""
    nonempty = [i for i, c in enumerate(counts) if c > 0]
    if n < len(nonempty):
        msg = f"cannot keep {len(nonempty)} non-empty pack groups with only {n} packs"
        raise ScenarioError(msg)
    total = sum(counts)
    quota = [n * c / total for c in counts]
    out = [max(1, math.floor(q)) if c > 0 else 0 for q, c in zip(quota, counts, strict=True)]
    # Largest remainder: add where the quota most exceeds the count, remove where the count
    # most exceeds the quota (never below one). A handful of groups, so a plain loop is fine.
    while sum(out) < n:
        i = max(nonempty, key=lambda k: (quota[k] - out[k], -k))
        out[i] += 1
    while sum(out) > n:
        i = max((k for k in nonempty if out[k] > 1), key=lambda k: (out[k] - quota[k], -k))
        out[i] -= 1
    return out


# --------------------------------------------------------------------------- loading


def list_scenarios() -> tuple[str, ...]:
    """Return the names of the packaged scenarios, sorted.

    Returns:
        Names accepted by :func:`load_scenario`, e.g. ``("cold_lfp", "nevada", "small")``.
    """
    folder = resources.files(_SCENARIO_PACKAGE).joinpath(_SCENARIO_DIR)
    return tuple(sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")))


def load_scenario(name_or_path: str | os.PathLike[str]) -> Scenario:
    """Load a packaged scenario by name, or a scenario file by path.

    A string without a path separator and without a ``.toml`` suffix is a packaged name
    (see :func:`list_scenarios`); anything else is a path.

    Args:
        name_or_path: ``"nevada"`` or ``"path/to/site.toml"``.

    Returns:
        The validated scenario.

    Raises:
        ScenarioError: the name or file does not exist, is not valid TOML, or fails
            validation. The message names the file, each failing field's path, and the
            reason; an unknown key comes with a "did you mean".
    """
    if isinstance(name_or_path, str) and _is_packaged_name(name_or_path):
        names = list_scenarios()
        if name_or_path not in names:
            hint = _did_you_mean(name_or_path, names)
            msg = f"no packaged scenario {name_or_path!r}{hint}; packaged: {', '.join(names)}"
            raise ScenarioError(msg)
        resource = resources.files(_SCENARIO_PACKAGE).joinpath(_SCENARIO_DIR, f"{name_or_path}.toml")
        source = f"{name_or_path}.toml (packaged)"
        text = resource.read_text(encoding="utf-8")
    else:
        path = Path(name_or_path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            msg = f"{source}: cannot read scenario file: {exc.strerror or exc}"
            raise ScenarioError(msg) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{source}: not valid TOML: {exc}"
        raise ScenarioError(msg) from exc
    return parse_scenario(data, source=source)


def parse_scenario(data: Mapping[str, Any], *, source: str = "<scenario>") -> Scenario:
    """Validate already-parsed scenario data.

    Args:
        data: the TOML document as a mapping.
        source: where the data came from, for error messages.

    Returns:
        The validated scenario.

    Raises:
        ScenarioError: the data fail validation; one line per error, ``source: path: reason``.
    """
    try:
        return Scenario.model_validate(dict(data))
    except ValidationError as exc:
        lines = [_format_error(err, source) for err in exc.errors(include_url=False)]
        noun = "error" if len(lines) == 1 else "errors"
        msg = f"{source}: {len(lines)} scenario {noun}\n" + "\n".join(lines)
        raise ScenarioError(msg) from exc


def _is_packaged_name(value: str) -> bool:
    return not value.endswith(".toml") and "/" not in value and os.sep not in value


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_error(err: Mapping[str, Any], source: str) -> str:
    loc: tuple[str | int, ...] = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and loc:
        key = str(loc[-1])
        valid = _field_names_at(loc[:-1])
        hint = _did_you_mean(key, valid)
        if not hint and valid:
            hint = f" (valid keys here: {', '.join(sorted(valid))})"
        parent = _render_loc(loc[:-1])
        return f"{source}: {parent + '.' if parent else ''}{key}: unknown key {key!r}{hint}"
    message = str(err["msg"]).removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        message += _did_you_mean(str(ctx.get("tag", "")), tags)
    elif kind == "literal_error":
        ctx = err.get("ctx") or {}
        options = [t.strip(" '") for t in str(ctx.get("expected", "")).replace(" or ", ",").split(",")]
        message += _did_you_mean(str(err.get("input", "")), options)
    path = _render_loc(loc)
    return f"{source}: {path}: {message}" if path else f"{source}: {message}"


def _step(models: list[type[BaseModel]], part: str) -> tuple[list[type[BaseModel]], bool]:
    """Follow one named step of a location: (models reached, whether it was a field)."""
    # A discriminated union puts the tag (e.g. "beta") in the location before the member's
    # fields; check tags first, since a tag may also be a field name of its member.
    tagged = [m for m in models if _kind_of(m) == part]
    if len(models) > 1 and tagged:
        return tagged, False
    if any(part in model.model_fields for model in models):
        return [m for model in models if part in model.model_fields for m in _models_in(model, part)], True
    return models, False


def _render_loc(loc: tuple[str | int, ...]) -> str:
    """Render a pydantic location as ``pack_groups[2].soh.sigma``, dropping union tags."""
    parts: list[str] = []
    models: list[type[BaseModel]] = [Scenario]
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
            continue
        models, is_field = _step(models, part)
        if is_field:
            parts.append(f".{part}" if parts else part)
    return "".join(parts)


def _field_names_at(loc: tuple[str | int, ...]) -> set[str]:
    """Return the field names valid at ``loc`` (union members merged)."""
    models: list[type[BaseModel]] = [Scenario]
    for part in loc:
        if isinstance(part, str):
            models, _ = _step(models, part)
    return {name for model in models for name in model.model_fields}


def _kind_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("kind")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return str(args[0]) if args else None


def _models_in(model: type[BaseModel], field: str) -> list[type[BaseModel]]:
    return list(_walk_annotation(model.model_fields[field].annotation))


def _walk_annotation(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _walk_annotation(arg)
