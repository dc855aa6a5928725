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

Resistance (valid 10-40 °C, SoC 0.05-1, up to 1C): ``R0`` and two RC pairs, a fast and a
slow one, all scaled by one SoC shape and one measured temperature table.
    R0 = 51.8 mΩ·Ah: :func:`twin.chemistry.fit.fit_ecm_from_hppc` on
    ``NissanLeaf-cell-Low-Current-HPPC-25C-2.csv`` from the rest after the full charge: ten
    30 A, 30 s discharge pulses. The median over the pulses with SoC 0.3-0.7
    (:data:`ECM_SOC_BAND`), times the rated 33.1 Ah (:data:`RATED_CAPACITY_AH`), rounded to
    0.1 mΩ·Ah [computed]: R0 = 1.566 mΩ. Per pulse at 25 °C: R0 1.53-1.77 mΩ; the 40-s
    relaxations after the pulses see one pair of R1 0.59-1.00 mΩ, tau1 16-22 s (median
    0.62 mΩ = 20.5 mΩ·Ah, 17 s), as in the notes.
    R1 = 42.5 mΩ·Ah, tau1 = 34.1 s; R2 = 38.1 mΩ·Ah, tau2 = 404.4 s [computed]:
    :func:`twin.chemistry.fit.fit_rc_pairs_to_record` on the whole 25 °C HPPC record from the
    rest after the full charge: the model's terminal voltage (this OCV table, the shipped R0
    and SoC shape, SoC coulomb-counted over the 29.98 Ah C/15 window) fitted to the measured
    one, time-weighted over the samples with SoC >= 0.1 (:data:`RC_FIT_SOC_MIN`), with the
    OCV corrected by an offset and a slope in charge within each pulse-to-pulse block
    (:meth:`twin.chemistry.fit.EcmFit.block_labels`), so that the pairs come from the
    transients (pulses, 10 A steps and their relaxations) and not from the few-mV errors of
    the OCV table; rounded to 0.1 mΩ·Ah and 0.1 s. RMSE 1.6 mV. Without the block correction
    the same fit is dominated by the OCV table (RMSE 3.9 mV, nearly flat in tau2 from 80 s to
    1000 s) and lands on 18.3 mΩ·Ah / 15.7 s + 45.8 mΩ·Ah / 140 s; the single pair shipped
    before (63 mΩ·Ah, 90 s) came from that kind of fit. The measured 1C-3C discharges show an
    apparent DC resistance of 1.8 mΩ at 1 s, 2.9 mΩ at 30 s, 3.5 mΩ at 300 s and about 4 mΩ
    after 1000 s; the model's DC resistance at 25 °C and mid SoC after 1 s / 10 s / 30 s /
    300 s / steady state is 1.60 / 1.92 / 2.40 / 3.45 / 4.00 mΩ (HPPC pulses: R(10 s)
    1.83-2.30, R(30 s) 2.47-3.97 mΩ; the one-pair set gave 1.59 / 1.77 / 2.10 / 3.40 / 3.47).
    Temperature: the table ``R(T)/R(25 °C)`` = 1.649 / 1 / 0.968 at 10 / 25 / 40 °C
    (:data:`TEMP_TABLE_C`), the ratios of the mid-SoC R0 medians of the three HPPC files
    (2.582, 1.566, 1.516 mΩ), rounded to 0.001 [computed]; :meth:`CellChemistry.temp_factor`
    interpolates ``ln R`` linearly in ``1/T`` between them (23.4 kJ/mol below 25 °C, 1.7
    kJ/mol above) and extrapolates with the end intervals. The cell is not Arrhenius over
    10-40 °C: one activation energy for all three (``fit_arrhenius``, 13.3 kJ/mol, kept in
    ``activation_energy_j_per_mol`` for reference only) is ~19 % low at 10 °C and ~17 % low
    at 40 °C. The table scales all three resistances, although the same block-corrected fit
    on the 10 and 40 °C records finds the RC pairs more temperature-dependent than R0 (R1
    x1.72 and x0.83, R2 x1.77 and x0.50 against R0 x1.65 and x0.97). The cell's own high-rate
    discharges, which heat it to 34-44 °C, do not show that drop: a table of the total DC
    resistance instead (1.706 / 1 / 0.789) raises the 2C voltage RMSE of
    ``tests/test_emulator_validation.py`` from 9.7 to 17.3 mV, and Arrhenius at 13.3 kJ/mol
    to 18.7 mV.
    SoC shape: +10 % quadratic at the ends and +30 % at SoC 0, width 0.03 [computed by eye:
    measured R0 is +6...+13 % at SoC 0.06 and 1.0; R1 +16 % and R(30 s) +57 % at SoC 0.06].
    Not modelled: a rate-dependent (transport) loss. At 3C (92 A) the cell's apparent
    resistance keeps rising through the discharge (5.6 mΩ at SoC 0.1, against 4.4 mΩ at 1C
    and 2C), and it delivers 28.7 Ah to 3.0 V against 30.3 Ah at 1C. That is beyond the HPPC
    currents (30 A for 30 s, 10 A for 18 min), so nothing here can identify it, and the
    emulated 3C discharge sags too little (voltage RMSE 57 mV).

Hysteresis: zero [assumption: no usable data; LMO hysteresis is small]. ``hyst_rate_per_as``
= 30, unused while ``H = 0``.

Entropic coefficient: +0.09 mV/K at every SoC (:data:`ENTROPIC_MV_PER_K`) [computed, rough]:
the change of the 1-hour rest voltages between the 25 °C and the 40 °C HPPC records, placed
by Ah from full charge, divided by 15 K, averaged over the nine rests with SoC >= 0.05
(:data:`ENTROPIC_SOC_MIN`) and rounded to 0.01 mV/K. In the last 20 minutes of those rests
the voltage moves by 0-1 mV, so they are near equilibrium; the 10 -> 25 °C interval gives
+0.07 mV/K on average. Point by point the values scatter by +-0.2 mV/K (a 1 mV resolution over
15 K is 0.07 mV/K) and the two intervals agree only loosely, so only the mean is used. Positive
dU/dT makes the reversible heat a cooling on discharge, about 7 % of the Joule heat at 3C.

Coulombic efficiency: 1.0 [assumption: the C/15 discharge over the following charge
throughput is 1.002-1.007, within the cycler's current accuracy, so not measurable here].

Thermal, per rated Ah: mass 799 g / 33.1 Ah = 0.0241 kg/Ah; area of the 290 x 216 x 7.1 mm
laminate, 0.1325 m² / 33.1 Ah = 0.00400 m²/Ah [verified dimensions, ORNL README;
computed ratios]. cp = 1000 J/(kg·K) [assumption, as simses-lite's cells].
h = 10 W/(m²·K) [computed, rough: a lumped model fitted to the ORNL 1C/2C/3C thermocouple
logs (cell in still air) gives 9-12 W/(m²·K) with cp = 1000; natural convection on the
vertical laminate plus radiation also give about 10]. Not settled: after those discharges the
thermocouples cool with a time constant of 900-1010 s, against m·cp/(h·A) = 602 s here, and
a lumped model driven by the measured heat (I·(OCV - V)) over-predicts the 3C peak rise
(23.6 K against 17.1 K) unless m·cp is about 1.9 times the cell's; the test rig probably
adds heat capacity (``tests/test_emulator_validation.py`` compares the peak rises).

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
    "ENTROPIC_MV_PER_K",
    "ENTROPIC_SOC_MIN",
    "OCV_TABLE",
    "RATED_CAPACITY_AH",
    "RC_FIT_SOC_MIN",
    "TAU_ROUND_DECIMALS",
    "TEMP_TABLE_C",
    "TEMP_TABLE_DECIMALS",
    "build",
]

RATED_CAPACITY_AH = 33.1
"""Rated capacity of the 2013 Leaf cell (ORNL README), Ah; the R x Ah normaliser."""

ECM_SOC_BAND = (0.3, 0.7)
"""SoC band whose HPPC pulses give the 50 % SoC values (median)."""

ECM_ROUND_OHM_AH_DECIMALS = 4
"""R x Ah values are shipped rounded to this many decimals in Ω·Ah (0.1 mΩ·Ah)."""

TAU_ROUND_DECIMALS = 1
"""tau1 and tau2 are shipped rounded to this many decimals in s."""

RC_FIT_SOC_MIN = 0.1
"""Samples below this SoC are left out of the whole-record RC fit (the OCV table and the
resistance shape are least sure there)."""

TEMP_TABLE_DECIMALS = 3
"""The temperature-table factors are shipped rounded to this many decimals."""

ENTROPIC_MV_PER_K = 0.09
"""Entropic coefficient dOCV/dT at every SoC, mV/K (25 -> 40 °C HPPC rest voltages)."""

ENTROPIC_SOC_MIN = 0.05
"""Rests below this SoC are left out of the entropic mean (the OCV is too steep there)."""

EA_ROUND_J_PER_MOL = 100.0
"""Ea is shipped rounded to a multiple of this, J/mol (0.1 kJ/mol)."""

TEMP_TABLE_C = (10.0, 25.0, 40.0)
"""Temperatures of the three HPPC records the resistance-temperature table comes from, °C."""

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
    entropic = np.full_like(soc, ENTROPIC_MV_PER_K * 1e-3)
    return CellChemistry(
        name="lmo",
        family="LMO",
        description="First-generation Nissan Leaf cell (2013, LMO/LNO | graphite, 33.1 Ah), second life",
        provenance=(
            "All electrical numbers identified from ORNL 2013 Nissan Leaf cell data (Wiggins, Allu, Wang, "
            "doi:10.5281/zenodo.2580327, MIT). OCV: mean of five C/15 discharge/charge pairs (first "
            "block of NissanLeaf-cell-Cycling-10C-24C-40C.csv, taken as 24 C) through "
            "twin.chemistry.fit.ocv_from_slow_cycle. R0: fit_ecm_from_hppc on the 25 C HPPC "
            "file, median over SoC 0.3-0.7, x 33.1 Ah. R1, tau1 (fast) and R2, tau2 (slow): "
            "fit_rc_pairs_to_record on the whole 25 C HPPC record with a per-block OCV correction "
            "(the 40-s pulse relaxations alone give 20.5 mOhm.Ah, 17 s). Temperature: table of the "
            "R0 medians at 10/25/40 C relative to 25 C (1.649/1/0.968), piecewise Arrhenius; "
            "fit_arrhenius over all three gives 13.3 kJ/mol (10-25 C alone 23.4), kept for reference. "
            "No rate-dependent (transport) loss: the 3C discharges show one the HPPC tests cannot "
            "identify. Entropic coefficient +0.09 mV/K: mean change of the 1-h HPPC rest voltages "
            "from 25 to 40 C (rough). Thermal: ORNL mass and dimensions, cp "
            "assumed 1000, h ~10 from the ORNL 1C-3C thermocouple logs. Limits: ORNL 3.0-4.2 V and 3C "
            "discharge, 1C charge assumed. No hysteresis data. See twin/chemistry/lmo.py."
        ),
        v_min_v=3.0,
        v_max_v=4.2,
        v_nominal_v=3.89,
        soc_grid=soc,
        ocv_v=table["ocv_V"],
        hyst_v=zeros,
        hyst_rate_per_as=30.0,
        entropic_v_per_k=entropic,
        r0_ohm_ah=0.0518,
        r1_ohm_ah=0.0425,
        tau1_s=34.1,
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
        r2_ohm_ah=0.0381,
        tau2_s=404.4,
        temp_table_c=TEMP_TABLE_C,
        temp_table_factor=(1.649, 1.0, 0.968),
    )
