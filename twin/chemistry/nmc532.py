"""nmc532: an older NMC/graphite EV cell (Bolt/Kona era), the typical second-life NMC pack.

Tags as in ``BATTERY_NOTES.md``: [verified] read in the source, [computed] derived here or
in the notes from the data, [assumption] an engineering choice.

OCV (valid 2.8-4.2 V, 25 °C):
    PyBaMM ``Mohtat2020`` parameter set (NMC532 | graphite, University of Michigan 5 Ah
    pouch; Mohtat et al., J. Electrochem. Soc. 167 110561, 2020; PyBaMM BSD-3).
    Full-cell table ``data/ocv_Mohtat2020.csv`` (101 points), SoC linear in
    stoichiometry between x0 = 0.0015/x100 = 0.8334 (graphite) and y100 = 0.0335/y0 =
    0.8909 (NMC), generated with PyBaMM 26.10.1.1 [computed].

Hysteresis: none (zeros) [assumption]; ``hyst_rate_per_as`` = 30, unused while ``H = 0``.
Entropic coefficient: zeros [assumption: no verified table for this cell].

Resistance (valid 10-40 °C, SoC 0.05-0.95, up to 1C):
    From the field-aged (5-6 years, SoH_C 92.8-95.2 %) Hyundai Kona packs with LG E63B
    63 Ah NMC pouch cells, 98s3p (Fischer et al., eTransportation 2026,
    doi:10.1016/j.etran.2026.100636) [verified]: pack R_DC at 1 s / 10 s / 30 s =
    56-59 / 65-69 / 77-81 mΩ. Per cell, R x Ah = R_pack x 3/98 x 63 Ah, so the midpoints
    give 110.9 / 129.2 / 152.4 mΩ·Ah [computed]. One RC pair through the three points
    gives tau1 = 24.7 s, R1 = 62.5 mΩ·Ah and R0 = 108.4 mΩ·Ah [computed]; removing the
    connectors and HVD (2.9-4.3 % of pack R_Ohm, i.e. about 2.8 mΩ·Ah) leaves
    R0 = 105.6 mΩ·Ah. Cross-check: logical-cell R_DC,10s of 0.95 mΩ (2p) and
    0.67-0.69 mΩ (3p) is 120-130 mΩ·Ah per cell [verified]. These are
    beginning-of-second-life values; further growth is the aging law's job.
    Ea = 20 kJ/mol (PyBaMM ECM example) [assumption: no temperature data for this cell].
    SoC shape as nmc811: +20 % quadratic at the ends (PyBaMM ECM example) plus +30 % at
    SoC 0, width 0.04 [assumption].

Coulombic efficiency: 1.0 [assumption, as simses-lite's NMC cells].

Thermal, per rated Ah:
    mass 0.0140 kg/Ah: LG E63B, 882 g / 63 Ah [verified]. cp = 1000 J/(kg·K) and
    h = 15 W/(m²·K): Samsung 94 Ah in simses-lite [verified]. Area 7.45e-4 m²/Ah from the
    Samsung 94 Ah geometry [computed] (no verified pouch dimensions).

Limits: 2.8-4.2 V (Mohtat2020 window) [verified]; 1C charge, 2C discharge [assumption: a
derated second-life pack]. Nominal voltage 3.76 V = mean of the OCV table [computed].

Aging law: ``nmc622_gr_denso50ah`` (BLAST-Lite ``Nmc622_Gr_DENSO50Ah``, a large-format EV
NMC cell; Smith et al., JES 168 100530, 2021).
"""

from __future__ import annotations

import numpy as np

from twin.chemistry.base import CellChemistry, ValidityRange, load_table

__all__ = ["build"]

_TABLE = "ocv_Mohtat2020.csv"


def build() -> CellChemistry:
    """Build the nmc532 parameter set (reads ``data/ocv_Mohtat2020.csv``).

    Returns:
        The validated, immutable parameter set.
    """
    table = load_table(_TABLE)
    soc = table["soc"]
    zeros = np.zeros_like(soc)
    return CellChemistry(
        name="nmc532",
        family="NMC",
        description="Older NMC/graphite EV cell (Bolt/Kona era), typical of second-life NMC packs",
        provenance=(
            "OCV: PyBaMM Mohtat2020 (NMC532|graphite, UMich 5 Ah pouch; BSD-3), full-cell table from "
            "PyBaMM 26.10.1.1. R x Ah: Hyundai Kona LG E63B packs, field-aged 5-6 y (Fischer et al., "
            "eTransportation 2026, doi:10.1016/j.etran.2026.100636): pack R_DC 1/10/30 s scaled to one cell "
            "(x 3/98 x 63 Ah) and fitted with one RC pair (R0 105.6 after removing connectors, R1 62.5 "
            "mOhm.Ah, tau1 24.7 s). Ea 20 kJ/mol and the SoC shape from the PyBaMM ECM example "
            "(assumed for this cell). Thermal: LG E63B mass per Ah; cp, h and area per Ah from Samsung "
            "94 Ah (simses-lite). Limits: Mohtat2020 window 2.8-4.2 V; 1C/2C assumed for a second-life "
            "pack. No hysteresis or entropic data. See twin/chemistry/nmc532.py."
        ),
        v_min_v=2.8,
        v_max_v=4.2,
        v_nominal_v=3.76,
        soc_grid=soc,
        ocv_v=table["ocv_V"],
        hyst_v=zeros,
        hyst_rate_per_as=30.0,
        entropic_v_per_k=zeros,
        r0_ohm_ah=105.6e-3,
        r1_ohm_ah=62.5e-3,
        tau1_s=24.7,
        activation_energy_j_per_mol=20_000.0,
        r_soc_curvature=0.20,
        r_low_soc_gain=0.30,
        r_low_soc_width=0.04,
        coulombic_efficiency=1.0,
        mass_kg_per_ah=0.0140,
        cp_j_per_kg_k=1000.0,
        h_w_per_m2_k=15.0,
        area_m2_per_ah=7.45e-4,
        max_charge_c=1.0,
        max_discharge_c=2.0,
        validity=ValidityRange(temp_c=(10.0, 40.0), c_rate_max=1.0, soc=(0.05, 0.95)),
        aging_model="nmc622_gr_denso50ah",
    )
