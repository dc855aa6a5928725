"""Cell chemistries shared by the emulators and the twin: parameters with provenance.

One module per cell type (``nmc811``, ``nmc532``, ``lfp``, ``lmo``) builds a frozen
:class:`CellChemistry` from the tables in ``twin/chemistry/data`` (package data, with their
licences and citations in ``data/LICENSES.md`` and ``data/README.md``).
:mod:`twin.chemistry.fit` holds the identification routines the LMO numbers come from.

Current is positive on discharge; SoC and SoH are fractions.

Examples:
    >>> from twin.chemistry import get_chemistry
    >>> lmo = get_chemistry("lmo")
    >>> round(float(lmo.r0_ohm(33.1, 0.5, 25.0)) * 1e3, 2)  # mΩ
    1.56
"""

from __future__ import annotations

from twin.chemistry.base import (
    CHEMISTRIES,
    CHEMISTRY_NAMES,
    GAS_CONSTANT_J_PER_MOL_K,
    REFERENCE_TEMP_C,
    CellChemistry,
    Family,
    ValidityRange,
    get_chemistry,
    load_table,
)
from twin.chemistry.fit import (
    ArrheniusFit,
    EcmFit,
    EcmSummary,
    OcvFromCycle,
    TwoRcFit,
    fit_arrhenius,
    fit_ecm_from_hppc,
    fit_rc_pairs_to_record,
    ocv_from_slow_cycle,
)

__all__ = [
    "CHEMISTRIES",
    "CHEMISTRY_NAMES",
    "GAS_CONSTANT_J_PER_MOL_K",
    "REFERENCE_TEMP_C",
    "ArrheniusFit",
    "CellChemistry",
    "EcmFit",
    "EcmSummary",
    "Family",
    "OcvFromCycle",
    "TwoRcFit",
    "ValidityRange",
    "fit_arrhenius",
    "fit_ecm_from_hppc",
    "fit_rc_pairs_to_record",
    "get_chemistry",
    "load_table",
    "ocv_from_slow_cycle",
]
