"""nmc811: a new large-format NMC811/NCMA pouch cell, standing in for a GM Ultium cell.

The Ultium cell is a large pouch NCMA cell of about 100 Ah with Ni ≈ 85 %; no public OCV
table or ECM for it exists, so this set combines the closest public data. Tags as in
``BATTERY_NOTES.md``: [verified] read in the source, [computed] derived here or in the
notes from the data, [assumption] an engineering choice.

OCV (valid 2.5-4.2 V, 25 °C):
    PyBaMM ``Chen2020`` parameter set (LG M50 21700, NMC811 | graphite-SiOx, 5 Ah; Chen et
    al., J. Electrochem. Soc. 167 080534, 2020; PyBaMM BSD-3). Full-cell table
    ``data/ocv_Chen2020.csv`` (101 points), SoC linear in electrode stoichiometry between
    x0 = 0.0263/x100 = 0.9106 (graphite) and y100 = 0.2638/y0 = 0.8540 (NMC), generated
    with PyBaMM 26.10.1.1 [computed]. Same cathode family as Ultium's NCMA; a stand-in.

Hysteresis: none (zeros) [assumption: NMC hysteresis is a few mV, below the model's other
errors]. ``hyst_rate_per_as`` = 30, unused while ``H = 0``.

Entropic coefficient: zeros. PyBaMM Chen2020 sets the OCP entropic change to 0
[verified]; reversible heat is neglected for this cell type.

Resistance (valid 10-40 °C, SoC 0.05-0.95, up to 2C):
    Total DCIR x Ah = 90 mΩ·Ah at 25 °C, 50 % SoC [assumption: the middle of the band
    77 mΩ·Ah (Samsung 94 Ah NMC, constant R_i = 0.819 mΩ; simses-lite, Collath et al.,
    J. Energy Storage 87 (2024) 111508) [verified] to 100 mΩ·Ah (PyBaMM
    ``ecm/example_set.py``: 100 Ah cell, DCIR 1 mΩ) [verified]]. Split R0 = 40 %
    (36 mΩ·Ah) and R1 = 60 % (54 mΩ·Ah) with tau1 = 30 s, the PyBaMM ECM example recipe
    [verified]. Ea = 20 kJ/mol, the PyBaMM ECM example DCIR value [verified] (the
    20-35 kJ/mol band in the notes; Chen2020 exchange currents use 35 kJ/mol graphite and
    17.8 kJ/mol NMC).
    SoC shape: quadratic +20 % at SoC 0 and 1 (PyBaMM recipe: 1.0 -> 1.2 mΩ) [verified]
    plus an extra +30 % at SoC 0 decaying with width 0.04 (steeper below 10 % SoC)
    [assumption, in line with the Leaf HPPC data where R(30 s) rises ~57 % at 6 % SoC].

Coulombic efficiency: 1.0 (simses-lite Samsung 94 Ah) [verified].

Thermal, per rated Ah:
    mass 0.0140 kg/Ah: LG E63B pouch, 882 g for 63 Ah (Fischer et al., eTransportation
    2026, doi:10.1016/j.etran.2026.100636) [verified]; a pouch NCMA cell has a similar
    specific energy [assumption]. cp = 1000 J/(kg·K) and h = 15 W/(m²·K): Samsung 94 Ah in
    simses-lite [verified]. Area 7.45e-4 m²/Ah: Samsung 94 Ah prismatic
    125 x 45 x 173 mm, 0.0701 m² over 94 Ah [computed]; the only verified large-format
    geometry (a pouch has more area per Ah, so this is conservative for cooling).

Limits: 2.5-4.2 V (Chen2020 window) [verified]; 2C charge and discharge (Samsung 94 Ah)
[verified]. Nominal voltage 3.72 V = mean of the OCV table over SoC [computed].

Aging law: ``nmc811_grsi_lgm50`` (BLAST-Lite ``Nmc811_GrSi_LGM50``, the same LG M50 cell
as the OCV).
"""

from __future__ import annotations

import numpy as np

from twin.chemistry.base import CellChemistry, ValidityRange, load_table

__all__ = ["build"]

_TABLE = "ocv_Chen2020.csv"


def build() -> CellChemistry:
    """Build the nmc811 parameter set (reads ``data/ocv_Chen2020.csv``).

    Returns:
        The validated, immutable parameter set.
    """
    table = load_table(_TABLE)
    soc = table["soc"]
    zeros = np.zeros_like(soc)
    return CellChemistry(
        name="nmc811",
        family="NMC",
        description="New large-format NMC811/NCMA pouch cell (GM Ultium-like, ~100 Ah class)",
        provenance=(
            "OCV: PyBaMM Chen2020 (LG M50 NMC811|Gr-SiOx; Chen et al., JES 167 080534, 2020; BSD-3), "
            "full-cell table from PyBaMM 26.10.1.1. R x Ah: 90 mOhm.Ah total DCIR, middle of "
            "77 (Samsung 94 Ah, Collath et al., J. Energy Storage 87 (2024) 111508, via simses-lite) "
            "to 100 (PyBaMM ecm/example_set.py); split R0 40 % / R1 60 %, tau1 30 s, Ea 20 kJ/mol and "
            "+20 % quadratic SoC rise from the PyBaMM ECM example; +30 % extra at SoC 0 (width 0.04) "
            "assumed. Thermal: LG E63B mass per Ah (Fischer et al., eTransportation 2026), cp and h from "
            "Samsung 94 Ah (simses-lite), area per Ah from Samsung 94 Ah geometry. Limits: Chen2020 "
            "window 2.5-4.2 V, 2C (Samsung 94 Ah). No hysteresis; entropic change 0 as in Chen2020. "
            "See twin/chemistry/nmc811.py."
        ),
        v_min_v=2.5,
        v_max_v=4.2,
        v_nominal_v=3.72,
        soc_grid=soc,
        ocv_v=table["ocv_V"],
        hyst_v=zeros,
        hyst_rate_per_as=30.0,
        entropic_v_per_k=zeros,
        r0_ohm_ah=36.0e-3,
        r1_ohm_ah=54.0e-3,
        tau1_s=30.0,
        activation_energy_j_per_mol=20_000.0,
        r_soc_curvature=0.20,
        r_low_soc_gain=0.30,
        r_low_soc_width=0.04,
        coulombic_efficiency=1.0,
        mass_kg_per_ah=0.0140,
        cp_j_per_kg_k=1000.0,
        h_w_per_m2_k=15.0,
        area_m2_per_ah=7.45e-4,
        max_charge_c=2.0,
        max_discharge_c=2.0,
        validity=ValidityRange(temp_c=(10.0, 40.0), c_rate_max=2.0, soc=(0.05, 0.95)),
        aging_model="nmc811_grsi_lgm50",
    )
