"""lmo: first-generation Nissan Leaf cell (2013, LiMn2O4 + LiNiO2 | graphite, 33.1 Ah laminate).

The second-life chemistry of the early Leaf packs. Every electrical number here is
identified from the ORNL test data of one such cell: G. Wiggins, S. Allu, H. Wang,
*Battery cell data from a 2013 Nissan Leaf*, Oak Ridge National Laboratory,
doi:10.5281/zenodo.2580327 (MIT licence; copies in ``tests/data/nissan_leaf/``). The cell had
already been used (the HPPC tests deliver about 31.2 Ah to 3.0 V at 10 A), so its numbers
describe a cell early in its second life. Tags as in ``BATTERY_NOTES.md``: [verified] read
in the source, [computed] derived from the data, [assumption] an engineering choice.

OCV (valid SoC 0-1 of the C/15 window, about 24 °C): ``data/ocv_NissanLeaf2013_LMO_C15_24C.csv``
[computed]. From ``NissanLeaf-cell-Cycling-10C-24C-40C.csv``: the five complete C/15
(2.17 A) discharge-then-charge pairs of the first temperature block (file segments 2/4,
6/8, 10/12, 14/16, 18/20 as numbered by ``steps()`` in ``tests/leaf_data.py``), each passed through
:func:`twin.chemistry.fit.ocv_from_slow_cycle` on a 0.01 SoC grid and averaged. Each
branch is referenced to its own coulomb count (discharge: SoC 1 at the start, 0 at the
3.0 V cut-off). The file has no temperature column; the first block is taken to be 24 °C
because it comes first, before the two 48-hour soaks (flag ``P``), and the block after the
first soak shows more polarisation and less capacity, as 10 °C would [assumption].
The cycling record carries an apparent series resistance of about 0.12 Ω (a 0.24 V jump
when the 2.17 A current starts or stops, against 1.6 mΩ in the HPPC files), probably the
voltage sensed through the current leads; the function removes it from both branches, so
the table is unaffected, but the C/15 window ends at an OCV of 3.25 V, not 3.0 V
(SoC 0 here = 3.25 V OCV; ~30.0 Ah between the 4.2 V CV end and that point).
Cross-check: the 1-hour rest voltages of the 25 °C HPPC test, placed by Ah from full,
agree within 18 mV from SoC 0.1 to 1 [computed, see ``tests/test_chemistry.py``].

Resistance (valid 10-40 °C, SoC 0.05-1, up to 1C):
    :func:`twin.chemistry.fit.fit_ecm_from_hppc` on ``NissanLeaf-cell-Low-Current-HPPC-25C-2.csv``
    from the rest after the full charge: ten 30 A, 30 s discharge pulses. The medians over
    the pulses with SoC 0.3-0.7 (:data:`ECM_SOC_BAND`), times the rated 33.1 Ah
    (:data:`RATED_CAPACITY_AH`), rounded to 0.1 mΩ·Ah [computed]: R0 = 1.566 mΩ -> 51.8 mΩ·Ah.
    Per pulse at 25 °C: R0 1.53-1.77 mΩ, R1 0.59-1.00 mΩ, tau1 16-22 s, as in the notes.
    R1 = 63 mΩ·Ah (1.90 mΩ), tau1 = 90 s [computed]: the one RC pair is identified on the whole
    25 °C HPPC record instead, from the rest after the full charge: the least-squares fit of
    the model's terminal voltage (this OCV table, R0 and SoC shape, 25 °C, SoC coulomb-counted
    over the 29.98 Ah C/15 window) to the measured one, time-weighted over the samples with
    SoC >= 0.1, on a grid of 1 mΩ·Ah and 5 s; RMSE 4.0 mV. The 40-s relaxations after the
    pulses only see a fast pair (0.62 mΩ, 17 s, the values shipped before): with it the same
    record fits to 7.2 mV, and the emulator's constant-current 1C/2C/3C discharges sag about
    half as far as the cell's and heat about half as much (measured apparent DC resistance
    1.8 mΩ at 1 s, 2.9 mΩ at 30 s, 3.5 mΩ at 300 s, about 4 mΩ after 1000 s; see
    ``tests/test_emulator_validation.py``). One pair cannot hold both time scales; the slow
    one matters for the emulated duty (hours at under 0.2C with 40 s load dips). At 25 °C and
    mid SoC the model's DC resistance after 10 s / 30 s / 300 s / steady state goes from
    1.84 / 2.08 / 2.18 / 2.18 mΩ to 1.77 / 2.10 / 3.40 / 3.47 mΩ (HPPC pulses: R(10 s)
    1.83-2.30, R(30 s) 2.47-3.97 mΩ).
    Ea = 13.3 kJ/mol: :func:`twin.chemistry.fit.fit_arrhenius` on the mid-SoC R0 medians at
    10, 25 and 40 °C (2.58, 1.57, 1.52 mΩ), rounded to 0.1 kJ/mol [computed]. The data are
    not Arrhenius over this range: 10 -> 25 °C alone gives 23.4 kJ/mol (the notes' "about
    24") but 25 -> 40 °C only ~2 kJ/mol, so the fitted factor is ~19 % low at 10 °C and ~17 %
    low at 40 °C.
    SoC shape: +10 % quadratic at the ends and +30 % at SoC 0, width 0.03 [computed by eye:
    measured R0 is +6...+13 % at SoC 0.06 and 1.0; R1 +16 % and R(30 s) +57 % at SoC 0.06].

Hysteresis and entropic coefficient: zeros [assumption: no usable data; LMO hysteresis is
small, and the 1-hour HPPC rests at 10/25/40 °C are too far from equilibrium to give dU/dT].
``hyst_rate_per_as`` = 30, unused while ``H = 0``.

Coulombic efficiency: 1.0 [assumption: the C/15 discharge over the following charge
throughput is 1.002-1.007, within the cycler's current accuracy, so not measurable here].

Thermal, per rated Ah: mass 799 g / 33.1 Ah = 0.0241 kg/Ah; area of the 290 x 216 x 7.1 mm
laminate, 0.1325 m² / 33.1 Ah = 0.00400 m²/Ah [verified dimensions, ORNL README;
computed ratios]. cp = 1000 J/(kg·K) [assumption, as simses-lite's cells].
h = 10 W/(m²·K) [computed, rough: a lumped model fitted to the ORNL 1C/2C/3C thermocouple
logs (cell in still air) gives 9-12 W/(m²·K) with cp = 1000; the emulator validation
should refine it].

Limits: 3.0-4.2 V (the ORNL test limits) [verified]; 3C discharge (tested by ORNL)
[verified]; 1C charge [assumption for a second-life pack]. Nominal voltage 3.89 V = mean of
the OCV table [computed] (ORNL quote an average discharge voltage of 3.8 V).

Aging law: ``lmo_gr_nissanleaf66ah_2ndlife`` (BLAST-Lite ``Lmo_Gr_NissanLeaf66Ah_2ndLife``,
Braco et al., J. Energy Storage 2020, doi:10.1016/j.est.2020.101695).
"""

from __future__ import annotations

import numpy as np

from twin.chemistry.base import CellChemistry, ValidityRange, load_table

__all__ = [
    "EA_ROUND_J_PER_MOL",
    "ECM_ROUND_OHM_AH_DECIMALS",
    "ECM_SOC_BAND",
    "OCV_TABLE",
    "RATED_CAPACITY_AH",
    "TAU_ROUND_DECIMALS",
    "build",
]

RATED_CAPACITY_AH = 33.1
"""Rated capacity of the 2013 Leaf cell (ORNL README), Ah; the R x Ah normaliser."""

ECM_SOC_BAND = (0.3, 0.7)
"""SoC band whose HPPC pulses give the 50 % SoC values (median)."""

ECM_ROUND_OHM_AH_DECIMALS = 4
"""R x Ah values are shipped rounded to this many decimals in Ω·Ah (0.1 mΩ·Ah)."""

TAU_ROUND_DECIMALS = 1
"""tau1 is shipped rounded to this many decimals in s."""

EA_ROUND_J_PER_MOL = 100.0
"""Ea is shipped rounded to a multiple of this, J/mol (0.1 kJ/mol)."""

OCV_TABLE = "ocv_NissanLeaf2013_LMO_C15_24C.csv"
"""The derived OCV table in ``twin/chemistry/data``."""


def build() -> CellChemistry:
    """Build the lmo parameter set (reads the derived Leaf OCV table).

    Returns:
        The validated, immutable parameter set.
    """
    table = load_table(OCV_TABLE)
    soc = table["soc"]
    zeros = np.zeros_like(soc)
    return CellChemistry(
        name="lmo",
        family="LMO",
        description="First-generation Nissan Leaf cell (2013, LMO/LNO | graphite, 33.1 Ah), second life",
        provenance=(
            "All electrical numbers identified from ORNL 2013 Nissan Leaf cell data (Wiggins, Allu, Wang, "
            "doi:10.5281/zenodo.2580327, MIT). OCV: mean of five C/15 discharge/charge pairs (first "
            "block of NissanLeaf-cell-Cycling-10C-24C-40C.csv, taken as 24 C) through "
            "twin.chemistry.fit.ocv_from_slow_cycle. R0: fit_ecm_from_hppc on the 25 C HPPC "
            "file, median over SoC 0.3-0.7, x 33.1 Ah. R1, tau1: least-squares fit of the one-RC model "
            "to the whole 25 C HPPC record (the slow polarisation of long discharges; the 40-s "
            "relaxations alone give 20.5 mOhm.Ah, 17 s). Ea: fit_arrhenius on the R0 medians at "
            "10/25/40 C (13.3 kJ/mol; 10-25 C alone gives 23.4). Thermal: ORNL mass and dimensions, cp "
            "assumed 1000, h ~10 from the ORNL 1C-3C thermocouple logs. Limits: ORNL 3.0-4.2 V and 3C "
            "discharge, 1C charge assumed. No hysteresis or entropic data. See twin/chemistry/lmo.py."
        ),
        v_min_v=3.0,
        v_max_v=4.2,
        v_nominal_v=3.89,
        soc_grid=soc,
        ocv_v=table["ocv_V"],
        hyst_v=zeros,
        hyst_rate_per_as=30.0,
        entropic_v_per_k=zeros,
        r0_ohm_ah=0.0518,
        r1_ohm_ah=0.0630,
        tau1_s=90.0,
        activation_energy_j_per_mol=13_300.0,
        r_soc_curvature=0.10,
        r_low_soc_gain=0.30,
        r_low_soc_width=0.03,
        coulombic_efficiency=1.0,
        mass_kg_per_ah=0.0241,
        cp_j_per_kg_k=1000.0,
        h_w_per_m2_k=10.0,
        area_m2_per_ah=0.00400,
        max_charge_c=1.0,
        max_discharge_c=3.0,
        validity=ValidityRange(temp_c=(10.0, 40.0), c_rate_max=1.0, soc=(0.05, 1.0)),
        aging_model="lmo_gr_nissanleaf66ah_2ndlife",
    )
