"""Draw a scenario's fleet: every pack's and cell group's true parameters, its BMS and its meta.

Sampling, per pack group of the scenario (all from one seeded generator, in a fixed order,
so the same scenario and seed give the same fleet):

* starting SoH from the group's distribution;
* a pack resistance factor, log-normal with the group's sigma, whose log is correlated
  with the standardised SoH by ``soh_resistance_corr`` (PulseBat: −0.45 to −0.89), on top
  of the mean growth that fade brings (``EMPIRICAL_R_PER_FADE``);
* per cell group: capacity ~ N(1, capacity CoV) × SoH, resistance ~ N(1, resistance CoV),
  initial SoC ~ pack SoC + N(0, sd) (BATTERY_NOTES section 3: fresh CoV 0.5 %, R 2 %);
* an aging-rate scalar, log-normal (BLAST-Lite ``degradation_scalar``), and for a share
  of packs a knee whose onset has already passed or is near;
* what the BMS believes: SoH (some second-life BMSs reset it to 100 %), hence the
  capacity its coulomb counter divides by.

``cell_level=False`` lumps each string into two groups, its weakest cell group and the
rest, which keeps the weakest-cell limit and a realistic min/max spread at a fraction of
the cost (for long runs).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
import polars as pl
from numpy.typing import NDArray

from emulators.pack import ChemistryTables, PackParams, ocv_deviation
from emulators.scenario import Scenario
from twin.chemistry import get_chemistry
from twin.chemistry.aging import EMPIRICAL_R_PER_FADE

__all__ = ["Fleet", "build_fleet"]

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

#: Share of the start SoC spread between packs (the site was not at one SoC when the run starts).
_START_SOC_MEAN = 0.70
_START_SOC_SD = 0.03
#: Stream of the cells' OCV deviation's generator (with the seed and the chemistry's name).
_OCV_STREAM = 0x0C7


@dataclass(frozen=True, slots=True)
class Fleet:
    """A drawn fleet: true parameters (for the emulator) and what the packs announce (meta)."""

    pack_ids: tuple[str, ...]
    group_index: I64  # (P,) index into scenario.pack_groups
    params: PackParams
    soh0: F64  # (P,) true starting SoH of the string
    aging_scalar: F64  # (P,)
    knee: NDArray[np.bool_]  # (P,)
    bms_soh: F64  # (P,) SoH the BMS reports
    years_in_service: F64  # (P,) first-life age (0 for new packs)
    first_life_efc: F64  # (P,)
    site_days: F64  # (P,) days since commissioning at this site
    cell_position: I64  # (P, S) the series position each modelled group stands at
    meta: pl.DataFrame  # one row per pack, the contract's pack_meta columns

    @property
    def n_packs(self) -> int:
        """Number of packs."""
        return len(self.pack_ids)


def with_intake(fleet: Fleet, intake_soh: F64) -> Fleet:
    """``fleet`` whose second-life packs announce ``intake_soh`` (also their ``retirement_soh``)."""
    second = fleet.meta["intake_soh"].is_not_null().to_numpy()
    value = pl.Series(np.round(np.clip(intake_soh, 0.0, 1.2), 4)).set(pl.Series(~second), None)
    first = fleet.meta["first_life"].to_list()
    for row, v in zip(first, value.to_list(), strict=True):
        if row is not None:
            row["retirement_soh"] = v
    meta = fleet.meta.with_columns(
        value.alias("intake_soh"), pl.Series("first_life", first, dtype=fleet.meta["first_life"].dtype)
    )
    return dataclasses.replace(fleet, meta=meta)


def build_fleet(scenario: Scenario, rng: np.random.Generator, *, cell_level: bool = True) -> Fleet:
    """Draw every pack of ``scenario`` (see the module docstring for what is drawn).

    Args:
        scenario: the validated scenario.
        rng: the generator (the caller seeds it from the scenario).
        cell_level: model every cell group (True) or two groups per string (False).

    Returns:
        The fleet.
    """
    groups = [g for g in scenario.pack_groups if g.count > 0]
    chem_names = sorted({g.chemistry for g in groups})
    chems = [get_chemistry(n) for n in chem_names]
    # The cells' own OCV, off the tables by a curve per chemistry, each from a generator of its
    # own (so the scenario's other draws, and the other chemistries' curves, do not depend on it).
    rms = scenario.cell_model.ocv_error_mv * 1e-3
    deviations = [
        ocv_deviation(rms, np.random.default_rng([scenario.seed, _OCV_STREAM, zlib.crc32(n.encode())]))
        for n in chem_names
    ]
    tables = ChemistryTables.build(chems, deviations)
    counts = np.array([g.count for g in groups])
    n = int(counts.sum())
    group_index = np.repeat(np.arange(len(groups)), counts)
    series = np.repeat([g.series_cells for g in groups], counts).astype(np.int64)
    parallel = np.repeat([g.parallel_cells for g in groups], counts).astype(np.int64)
    rated_group_ah = np.repeat([g.cell_capacity_ah * g.parallel_cells for g in groups], counts).astype(float)
    chem_index = np.repeat([chem_names.index(g.chemistry) for g in groups], counts).astype(np.int64)

    soh = np.empty(n)
    r_pack = np.empty(n)
    scalar = np.empty(n)
    knee = np.zeros(n, dtype=bool)
    bms_soh = np.empty(n)
    years = np.zeros(n)
    efc1 = np.zeros(n)
    cap_cov = np.repeat([g.cells.capacity_cov for g in groups], counts)
    res_cov = np.repeat([g.cells.resistance_cov for g in groups], counts)
    soc_sd = np.repeat([g.cells.initial_soc_sd for g in groups], counts)
    start = 0
    for g in groups:  # a loop over a handful of groups, not over packs
        sl = slice(start, start + g.count)
        s = np.clip(g.soh.sample(rng, g.count), 0.05, 1.05)
        soh[sl] = s
        z_soh = (s - s.mean()) / s.std() if g.count > 1 and s.std() > 0 else np.zeros(g.count)
        rho = g.soh_resistance_corr
        z_r = rho * z_soh + np.sqrt(1.0 - rho * rho) * rng.standard_normal(g.count)
        # Fade brings resistance with it; the spread around that follows the group's sigma.
        r_pack[sl] = (1.0 + EMPIRICAL_R_PER_FADE * (1.0 - float(s.mean()))) * np.exp(g.resistance_sigma * z_r)
        scalar[sl] = np.exp(g.aging_rate_sigma * rng.standard_normal(g.count))
        knee[sl] = rng.random(g.count) < g.knee_probability
        reset = rng.random(g.count) < g.bms_soh_reset_share
        err = g.bms_soh_error_sd * rng.standard_normal(g.count)
        bms_soh[sl] = np.where(reset, 1.0, np.clip(s + err, 0.0, 1.2))
        if g.life == "second_life":
            years[sl] = rng.uniform(6.0, 11.0, g.count)
            efc1[sl] = years[sl] * rng.uniform(80.0, 160.0, g.count) * (1.0 - s) / 0.25
        start += g.count

    s_max = int(series.max()) if cell_level else 2
    position = np.arange(s_max)[None, :]
    if cell_level:
        mask = position < series[:, None]
        weight = mask.astype(float)
    else:
        mask = np.ones((n, 2), dtype=bool)
        weight = np.column_stack([np.ones(n), series - 1.0])
    cap_f = 1.0 + cap_cov[:, None] * rng.standard_normal((n, s_max))
    r_f = 1.0 + res_cov[:, None] * rng.standard_normal((n, s_max))
    soc_pack = np.clip(rng.normal(_START_SOC_MEAN, _START_SOC_SD, n), 0.2, 0.95)
    soc0 = soc_pack[:, None] + soc_sd[:, None] * rng.standard_normal((n, s_max))
    if cell_level:
        cell_position = np.broadcast_to(position, (n, s_max)).astype(np.int64).copy()
    else:
        # Group 0 is the weakest cell group (lowest capacity of the string, drawn as the
        # minimum of `series` draws); group 1 stands for the rest at the mean.
        draws_min = 1.0 - cap_cov * np.sqrt(2.0 * np.log(np.maximum(series, 2)))
        cap_f = np.column_stack([draws_min, np.ones(n)])
        r_f = np.column_stack([1.0 + res_cov, np.ones(n)])
        soc0 = np.column_stack([soc_pack - soc_sd, soc_pack])
        cell_position = np.column_stack([rng.integers(0, series), np.full(n, -1)]).astype(np.int64)
    cap_f = np.clip(cap_f, 0.5, 1.5)
    r_f = np.clip(r_f, 0.5, 2.0)
    capacity = rated_group_ah[:, None] * soh[:, None] * cap_f
    c_dis = np.repeat([g.max_discharge_c_rate for g in groups], counts)
    c_chg = np.repeat([g.max_charge_c_rate or g.max_discharge_c_rate * 0.5 for g in groups], counts)
    params = PackParams(
        chem_index=chem_index,
        series=series,
        parallel=parallel,
        rated_group_ah=rated_group_ah,
        capacity_ah=capacity,
        r_cell=r_pack[:, None] * r_f,
        soc0=np.clip(soc0, 0.0, 1.0),
        mask=mask,
        weight=weight,
        i_dis_max_a=c_dis * rated_group_ah,
        i_chg_max_a=c_chg * rated_group_ah,
        tables=tables,
        cooling_ua_w_per_k_per_ah=0.0,
    )
    pack_ids = tuple(scenario.pack_ids())
    # Second-life packs came to the site over the last two years; a new pack's SoH (about 1)
    # says it was commissioned in the last weeks (700 days of duty would have aged it by ~15 %).
    site_days = rng.uniform(30.0, 700.0, n)
    is_new = np.array([groups[i].life != "second_life" for i in group_index])
    site_days = np.where(is_new, site_days * (14.0 / 700.0), site_days)
    meta = _meta(scenario, groups, group_index, pack_ids, params, soh, years, efc1, site_days, rng)
    return Fleet(
        pack_ids=pack_ids,
        group_index=group_index,
        params=params,
        soh0=soh,
        aging_scalar=scalar,
        knee=knee,
        bms_soh=bms_soh,
        years_in_service=years,
        first_life_efc=efc1,
        site_days=site_days,
        cell_position=cell_position,
        meta=meta,
    )


def _meta(
    scenario: Scenario,
    groups: list,  # type: ignore[type-arg]
    group_index: I64,
    pack_ids: tuple[str, ...],
    params: PackParams,
    soh: F64,
    years: F64,
    efc1: F64,
    site_days: F64,
    rng: np.random.Generator,
) -> pl.DataFrame:
    """The contract's pack_meta rows: what each pack announces about itself."""
    start_ms = int(scenario.start.timestamp() * 1000)
    n = len(pack_ids)
    chem = params.tables.chemistries
    v_nom = np.array([c.v_nominal_v for c in chem])[params.chem_index]
    v_min = np.array([c.v_min_v for c in chem])[params.chem_index]
    v_max = np.array([c.v_max_v for c in chem])[params.chem_index]
    life = [groups[i].life for i in group_index]
    second = np.array([x == "second_life" for x in life])
    commissioned = start_ms - (site_days * 86_400_000).astype(np.int64)
    intake = np.clip(soh + np.abs(rng.normal(0.0, 0.01, n)), 0.0, 1.2)
    first_life = [
        {
            "vehicle": f"{groups[g].oem} EV" if s else None,
            "years_in_service": round(float(y), 2) if s else None,
            "odometer_km": None,
            "efc": round(float(e), 1) if s else None,
            "retirement_soh": round(float(i), 4) if s else None,
            "grading_method": "full capacity test at intake" if s else None,
        }
        if s
        else None
        for g, s, y, e, i in zip(group_index, second, years, efc1, intake, strict=True)
    ]
    ah = params.rated_group_ah
    return pl.DataFrame(
        {
            "pack": list(pack_ids),
            "ts_ms": np.full(n, start_ms),
            "chemistry": [chem[i].name for i in params.chem_index],
            "life": life,
            "oem": [groups[i].oem for i in group_index],
            "rated_capacity_ah": ah,
            "rated_energy_kwh": np.round(ah * params.series * v_nom / 1000.0, 3),
            "series_cells": params.series,
            "parallel_cells": params.parallel,
            "voltage_min_v": np.round(params.series * v_min, 2),
            "voltage_max_v": np.round(params.series * v_max, 2),
            "current_max_discharge_a": np.round(params.i_dis_max_a, 2),
            "current_max_charge_a": np.round(params.i_chg_max_a, 2),
            "temp_max_c": np.full(n, 55.0),
            "commissioned_ms": commissioned,
            "intake_soh": pl.Series(np.round(intake, 4)).set(pl.Series(~second), None),
            "first_life": first_life,
        }
    )
