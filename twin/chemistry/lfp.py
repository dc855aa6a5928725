"""lfp: LFP/graphite, from the measured Sony/Murata US26650FTC1 tables in SimSES.

Tags as in ``BATTERY_NOTES.md``: [verified] read in the source, [computed] derived here or
in the notes from the data, [assumption] an engineering choice.

Source of the tables: simses-lite (``martincornejo/simses-lite``,
``src/simses/model/cell/data/CLFP_Sony_US26650_*.csv``, BSD-3, TUM EES), which cites the
Sony US26650FTC1 product specification and M. Naumann, *Techno-economic evaluation of
stationary lithium-ion energy storage systems with special consideration of aging*, PhD
thesis, TU Munich, 2018. Cell: 3.0 Ah, 2.0-3.6 V.

OCV (valid 0-1 SoC, 25 °C): ``data/CLFP_Sony_US26650_OCV.csv``, 201 points [verified]. The
soc grid of this parameter set is that table's grid. Between 30 % and 90 % SoC the OCV
moves only about 70 mV, so SoC is poorly observable from voltage there.

Hysteresis: ``data/CLFP_Sony_US26650_HystV.csv`` (101 points, 17-30 mV) [verified],
interpolated linearly onto the OCV grid and used as the half-width ``H`` [assumption:
SimSES adds the value without a sign and does not say whether it is the half or the full
width]. ``hyst_rate_per_as`` = 30, so ``h`` relaxes with an e-folding throughput of 1/30 of
capacity and settles (95 %) within a 10 % SoC swing [assumption, Plett-style one-state
model; no fitted value is published for this cell].

Entropic coefficient: ``data/CLFP_Sony_US26650_entropy.csv`` (11 points, -0.49 mV/K at 0 %
to +0.1...+0.15 mV/K above 40 % SoC) [verified], interpolated onto the OCV grid.

Resistance (valid 10-40 °C, SoC 0-1, up to 1C):
    ``data/CLFP_Sony_US26650_Rint.csv`` gives R(SoC, T) for charge and discharge without
    saying which pulse length [verified]. The discharge value at 25 °C, 50 % SoC,
    47.83 mΩ x 3.0 Ah = 143.5 mΩ·Ah [computed], is taken as the total DCIR and split
    R0 = 40 % (57.4 mΩ·Ah) / R1 = 60 % (86.1 mΩ·Ah) with tau1 = 30 s, the PyBaMM ECM
    example recipe [assumption]. Cross-check: retired 35 Ah HEV LFP cells (PulseBat,
    Tao et al., Nat. Commun. 2024) give R_5s x Ah = 110 mΩ·Ah [computed in the notes].
    Ea = 15.6 kJ/mol: :func:`twin.chemistry.fit.fit_arrhenius` on the discharge resistance
    averaged over SoC 0.2-0.9 at 10, 25 and 40 °C (the 60 °C column repeats 40 °C and is
    left out) [computed].
    SoC shape: +5 % quadratic at the ends and +60 % at SoC 0 decaying with width 0.1
    [computed by eye against the 25 °C discharge column: +29 % at SoC 0-0.1 (the table
    repeats the 0.1 value at 0), +5 % at 0.2; above 0.3 the table scatters -13...+8 %
    around the 50 % value without a trend, and the factor stays within +5 %]. Not captured: the
    much larger rise at low SoC in the cold (2.8x at 10 °C, 0-10 % SoC), because the model
    multiplies a SoC factor by a temperature factor.

Coulombic efficiency: 1.0 (simses-lite) [verified].

Thermal, per rated Ah: mass 0.07 kg / 3.0 Ah = 0.0233 kg/Ah, cp = 1001 J/(kg·K),
h = 15 W/(m²·K) (simses-lite) [verified]; area 0.00637 m² (26 x 65 mm cylinder with both
ends) / 3.0 Ah = 0.00212 m²/Ah [computed].

Limits: 2.0-3.6 V, 1C charge, 6.6C discharge (Sony specification via simses-lite)
[verified]. Nominal voltage 3.27 V = mean of the OCV table [computed] (the specification
says 3.2 V).

Aging law: ``lfp_gr_250ah_prismatic`` (BLAST-Lite ``Lfp_Gr_250AhPrismatic``, a large-format
stationary LFP cell; valid 10-45 °C, charge up to 0.65C).
"""

from __future__ import annotations

import numpy as np

from twin.chemistry.base import CellChemistry, ValidityRange, load_table

__all__ = ["build"]

_OCV = "CLFP_Sony_US26650_OCV.csv"
_HYST = "CLFP_Sony_US26650_HystV.csv"
_ENTROPY = "CLFP_Sony_US26650_entropy.csv"


def build() -> CellChemistry:
    """Build the lfp parameter set (reads the Sony OCV, hysteresis and entropy tables).

    Returns:
        The validated, immutable parameter set.
    """
    ocv = load_table(_OCV)
    hyst = load_table(_HYST)
    entropy = load_table(_ENTROPY)
    soc = ocv["SOC"]
    return CellChemistry(
        name="lfp",
        family="LFP",
        description="LFP/graphite cell, measured Sony/Murata US26650FTC1 tables (3.0 Ah)",
        provenance=(
            "OCV, hysteresis, entropic coefficient and R(SoC, T): Sony/Murata US26650FTC1 tables from "
            "simses-lite (BSD-3, TUM EES; Sony specification and Naumann PhD thesis, TUM 2018). R x Ah: "
            "R_dis(25 C, 50 %) 47.83 mOhm x 3.0 Ah = 143.5 mOhm.Ah taken as total DCIR, split R0 40 % / "
            "R1 60 %, tau1 30 s (PyBaMM ECM example recipe, assumed). Ea 15.6 kJ/mol fitted to the table "
            "at 10/25/40 C (SoC 0.2-0.9). SoC shape fitted by eye to the 25 C column. Hysteresis read as "
            "half-width, rate gamma 30 assumed. Thermal: 0.07 kg, cp 1001, h 15 (simses-lite); area of a "
            "26650 can. Limits 2.0-3.6 V, 1C charge, 6.6C discharge (Sony). See twin/chemistry/lfp.py."
        ),
        v_min_v=2.0,
        v_max_v=3.6,
        v_nominal_v=3.27,
        soc_grid=soc,
        ocv_v=ocv["OCV"],
        hyst_v=np.interp(soc, hyst["SOC"], hyst["HystV"]),
        hyst_rate_per_as=30.0,
        entropic_v_per_k=np.interp(soc, entropy["SOC"], entropy["S"]),
        r0_ohm_ah=57.4e-3,
        r1_ohm_ah=86.1e-3,
        tau1_s=30.0,
        activation_energy_j_per_mol=15_600.0,
        r_soc_curvature=0.05,
        r_low_soc_gain=0.60,
        r_low_soc_width=0.10,
        coulombic_efficiency=1.0,
        mass_kg_per_ah=0.0233,
        cp_j_per_kg_k=1001.0,
        h_w_per_m2_k=15.0,
        area_m2_per_ah=0.00212,
        max_charge_c=1.0,
        max_discharge_c=6.6,
        validity=ValidityRange(temp_c=(10.0, 40.0), c_rate_max=1.0, soc=(0.0, 1.0)),
        aging_model="lfp_gr_250ah_prismatic",
    )
