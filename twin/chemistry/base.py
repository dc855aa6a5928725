"""The cell-type parameter set shared by the emulators and the twin, and its registry.

A :class:`CellChemistry` is one cell type as data: an OCV table, hysteresis and entropic
tables on the same SoC grid, a one-RC equivalent circuit normalised by capacity
(``R x Ah``) with an optional second (slow) RC pair, a temperature factor (Arrhenius, or
interpolated in a measured table), a mild U-shaped SoC factor, thermal
properties per Ah, current limits, the range the numbers are valid over, and the name of
the aging law that goes with it. Every number carries its provenance in ``provenance``
and in the docstring of the module that defines it (``nmc811.py``, ``nmc532.py``,
``lfp.py``, ``lmo.py``).

Conventions (written once, here, for the chemistry package):

- current is **positive on discharge**;
- SoC and SoH are fractions in [0, 1];
- resistances scale with ``1 / capacity_ah``, where ``capacity_ah`` is the cell's
  **rated (beginning-of-life) capacity**: resistance growth with age is the aging law's
  job, not a side effect of capacity fade;
- the ECM is ``v = ocv(soc) - h - i*R0 - v1 - v2`` with ``dv1/dt = (i*R1 - v1)/tau1``,
  ``dv2/dt = (i*R2 - v2)/tau2`` and ``R0``/``R1``/``R2`` from :meth:`CellChemistry.r0_ohm`,
  :meth:`CellChemistry.r1_ohm` and :meth:`CellChemistry.r2_ohm`. The second pair is the
  slow one (``tau2 > tau1``); ``R2 = 0`` (the default) leaves a one-RC model;
- every resistance is ``R x Ah / capacity_ah * soc_factor(soc) * temp_factor(temp_c)``.
  :meth:`CellChemistry.temp_factor` is Arrhenius in ``activation_energy_j_per_mol`` unless
  the chemistry gives a measured table (``temp_table_c``, ``temp_table_factor``); then
  ``ln(factor)`` is interpolated linearly in ``1/T`` between the table points (piecewise
  Arrhenius) and extrapolated with the end segments' slopes;
- hysteresis follows Plett's one-state model,
  ``dh/dt = -gamma*|i|/Q*(h - sign(i)*H(soc))``, with ``Q = 3600 * capacity_ah`` in A·s,
  ``gamma = hyst_rate_per_as`` and ``H = hysteresis_v(soc)``. ``h`` tends to ``+H`` on
  discharge and ``-H`` on charge, so it lowers the discharge voltage and raises the
  charge voltage. ``gamma`` is dimensionless: ``h`` relaxes with an e-folding charge
  throughput of ``Q/gamma``;
- heat generation follows Bernardi: ``q = i*(ocv - v) - i*T_K*entropic(soc)`` (W, ``i``
  positive on discharge, ``T_K`` in kelvin); the second term is the reversible
  (entropic) heat, which is released on discharge where dOCV/dT < 0. (SimSES writes
  ``+ S*T*i`` with charge-positive current, the same thing.)

Tables are read once per process from package data (``twin/chemistry/data``) through
:mod:`importlib.resources`; parameter sets are built on first use and cached.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from twin.errors import ChemistryError

__all__ = [
    "CHEMISTRIES",
    "CHEMISTRY_NAMES",
    "GAS_CONSTANT_J_PER_MOL_K",
    "REFERENCE_TEMP_C",
    "CellChemistry",
    "Family",
    "ValidityRange",
    "get_chemistry",
    "load_table",
]

FloatArray = npt.NDArray[np.float64]
Family = Literal["NMC", "LFP", "LMO"]

GAS_CONSTANT_J_PER_MOL_K = 8.314462618
"""Molar gas constant (CODATA 2018, exact), J/(mol·K)."""

REFERENCE_TEMP_C = 25.0
"""Temperature the resistances are given at, °C."""

CHEMISTRY_NAMES: tuple[str, ...] = ("nmc811", "nmc532", "lfp", "lmo")
"""Names of the registered cell types."""

_KELVIN_OFFSET = 273.15
_MID_SOC = 0.5
_POSITIVE_FIELDS = (
    "v_min_v",
    "hyst_rate_per_as",
    "r0_ohm_ah",
    "r1_ohm_ah",
    "tau1_s",
    "tau2_s",
    "activation_energy_j_per_mol",
    "r_low_soc_width",
    "coulombic_efficiency",
    "mass_kg_per_ah",
    "cp_j_per_kg_k",
    "h_w_per_m2_k",
    "area_m2_per_ah",
    "max_charge_c",
    "max_discharge_c",
)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_DATA_PACKAGE = "twin.chemistry"
_DATA_DIR = "data"


@dataclass(frozen=True, slots=True)
class ValidityRange:
    """Where a parameter set is backed by data. Outside it, results are extrapolations.

    Callers flag inputs outside this range in their output; they do not raise.

    Attributes:
        temp_c: lowest and highest cell temperature, °C.
        c_rate_max: largest |current| / rated capacity, 1/h.
        soc: lowest and highest state of charge, fractions.
    """

    temp_c: tuple[float, float]
    c_rate_max: float
    soc: tuple[float, float]

    def __post_init__(self) -> None:
        """Check the ranges are ordered and physical.

        Raises:
            ChemistryError: if a range is empty or out of bounds.
        """
        lo_t, hi_t = self.temp_c
        if not lo_t < hi_t:
            msg = f"validity temp_c must be (low, high), got {self.temp_c}"
            raise ChemistryError(msg)
        if not self.c_rate_max > 0.0:
            msg = f"validity c_rate_max must be positive, got {self.c_rate_max}"
            raise ChemistryError(msg)
        lo_s, hi_s = self.soc
        if not 0.0 <= lo_s < hi_s <= 1.0:
            msg = f"validity soc must satisfy 0 <= low < high <= 1, got {self.soc}"
            raise ChemistryError(msg)

    def contains(self, *, temp_c: npt.ArrayLike, c_rate: npt.ArrayLike, soc: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Return True where temperature, |C-rate| and SoC all lie inside the range.

        Args:
            temp_c: cell temperature, °C.
            c_rate: current over rated capacity, 1/h (sign ignored).
            soc: state of charge, fraction.

        Returns:
            A boolean array, broadcast over the three inputs.
        """
        t = np.asarray(temp_c, dtype=np.float64)
        c = np.abs(np.asarray(c_rate, dtype=np.float64))
        s = np.asarray(soc, dtype=np.float64)
        return np.asarray(
            (t >= self.temp_c[0])
            & (t <= self.temp_c[1])
            & (c <= self.c_rate_max)
            & (s >= self.soc[0])
            & (s <= self.soc[1])
        )


def _readonly(name: str, chemistry: str, values: npt.ArrayLike) -> FloatArray:
    arr = np.array(values, dtype=np.float64, copy=True)
    if arr.ndim != 1:
        msg = f"{chemistry}: {name} must be one-dimensional, got shape {arr.shape}"
        raise ChemistryError(msg)
    if not np.all(np.isfinite(arr)):
        msg = f"{chemistry}: {name} contains NaN or infinite values"
        raise ChemistryError(msg)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class CellChemistry:
    """One cell type: OCV, hysteresis, entropy, a one- or two-RC ECM per Ah, thermal data and limits.

    Instances are immutable, their arrays read-only, and they compare by identity (the
    registry holds one instance per name). Derive a variant with
    :func:`dataclasses.replace`, which re-runs the validation.

    The methods accept scalars or arrays, broadcast their arguments and return float64
    arrays (0-d for all-scalar input; wrap in ``float()`` to unwrap). They never mutate
    their inputs and contain no Python loops.

    Attributes:
        name: registry key, for example ``"lfp"``.
        family: cathode family.
        description: one line on what the cell type stands for.
        provenance: where every number came from, with citations.
        v_min_v: lower terminal-voltage limit, V.
        v_max_v: upper terminal-voltage limit, V.
        v_nominal_v: nominal voltage (energy per Ah at zero current), V.
        soc_grid: SoC grid of the tables, strictly increasing from 0 to 1.
        ocv_v: open-circuit voltage on ``soc_grid``, strictly increasing, V.
        hyst_v: hysteresis half-width ``H`` on ``soc_grid``, V (zeros except LFP).
        hyst_rate_per_as: Plett hysteresis rate ``gamma`` (dimensionless with the
            capacity in A·s; see the module docstring).
        entropic_v_per_k: entropic coefficient dOCV/dT on ``soc_grid``, V/K.
        r0_ohm_ah: ohmic resistance times rated capacity at 25 °C and 50 % SoC, Ω·Ah.
        r1_ohm_ah: (fast) RC-pair resistance times rated capacity at 25 °C and 50 % SoC, Ω·Ah.
        tau1_s: (fast) RC-pair time constant, s.
        activation_energy_j_per_mol: Arrhenius activation energy of all the resistances,
            J/mol (used by :meth:`temp_factor` when there is no temperature table).
        r_soc_curvature: quadratic part of the SoC factor, the fractional rise at SoC 0
            and 1 relative to 50 %.
        r_low_soc_gain: extra fractional rise at SoC 0 (exponential, below ~10 % SoC).
        r_low_soc_width: SoC e-folding width of that extra rise, fraction.
        coulombic_efficiency: charge out over charge in, fraction.
        mass_kg_per_ah: cell mass per rated Ah, kg/Ah.
        cp_j_per_kg_k: specific heat capacity, J/(kg·K).
        h_w_per_m2_k: convective heat-transfer coefficient to ambient, W/(m²·K).
        area_m2_per_ah: cooled surface area per rated Ah, m²/Ah.
        max_charge_c: largest continuous charge current over rated capacity, 1/h.
        max_discharge_c: largest continuous discharge current over rated capacity, 1/h.
        validity: where the numbers are backed by data.
        aging_model: name of the aging law in ``twin.chemistry.aging`` for this cell type.
        r2_ohm_ah: second (slow) RC-pair resistance times rated capacity at 25 °C and 50 %
            SoC, Ω·Ah; 0 (the default) for a one-RC model.
        tau2_s: second RC-pair time constant, s; must exceed ``tau1_s`` when ``r2_ohm_ah > 0``
            (the default 1 s is a placeholder, unused while ``r2_ohm_ah`` is 0).
        temp_table_c: temperatures of a measured resistance-temperature table, °C,
            strictly increasing and including 25 °C; empty (the default) for Arrhenius.
        temp_table_factor: ``R(T)/R(25 °C)`` at ``temp_table_c`` (1 at 25 °C), positive.
    """

    name: str
    family: Family
    description: str
    provenance: str
    v_min_v: float
    v_max_v: float
    v_nominal_v: float
    soc_grid: FloatArray
    ocv_v: FloatArray
    hyst_v: FloatArray
    hyst_rate_per_as: float
    entropic_v_per_k: FloatArray
    r0_ohm_ah: float
    r1_ohm_ah: float
    tau1_s: float
    activation_energy_j_per_mol: float
    r_soc_curvature: float
    r_low_soc_gain: float
    r_low_soc_width: float
    coulombic_efficiency: float
    mass_kg_per_ah: float
    cp_j_per_kg_k: float
    h_w_per_m2_k: float
    area_m2_per_ah: float
    max_charge_c: float
    max_discharge_c: float
    validity: ValidityRange
    aging_model: str
    r2_ohm_ah: float = 0.0
    tau2_s: float = 1.0
    temp_table_c: tuple[float, ...] = ()
    temp_table_factor: tuple[float, ...] = ()
    _docv_dsoc_v: FloatArray = field(init=False, repr=False)
    _temp_u: FloatArray = field(init=False, repr=False)
    _temp_log_f: FloatArray = field(init=False, repr=False)
    _soc_norm: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Validate the parameter set and freeze its arrays.

        Raises:
            ChemistryError: if a field is missing, non-physical or inconsistent (OCV not
                strictly increasing, table shapes that differ, non-positive resistances,
                an OCV outside the voltage limits, ...).
        """
        self._check_labels()
        self._freeze_and_check_tables()
        self._check_scalars()
        self._check_temp_table()
        self._check_voltages()
        slope = np.gradient(self.ocv_v, self.soc_grid)
        slope.flags.writeable = False
        object.__setattr__(self, "_docv_dsoc_v", slope)
        object.__setattr__(self, "_soc_norm", float(self._soc_shape(np.float64(_MID_SOC))))

    def _check_labels(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            msg = f"chemistry name must match {_NAME_RE.pattern}, got {self.name!r}"
            raise ChemistryError(msg)
        if self.family not in get_args(Family):
            msg = f"{self.name}: family must be one of {get_args(Family)}, got {self.family!r}"
            raise ChemistryError(msg)
        for text_field in ("description", "provenance", "aging_model"):
            value = getattr(self, text_field)
            if not isinstance(value, str) or not value.strip():
                msg = f"{self.name}: {text_field} must be a non-empty string"
                raise ChemistryError(msg)
        if not isinstance(self.validity, ValidityRange):
            msg = f"{self.name}: validity must be a ValidityRange"
            raise ChemistryError(msg)

    def _freeze_and_check_tables(self) -> None:
        tables = ("soc_grid", "ocv_v", "hyst_v", "entropic_v_per_k")
        for table in tables:
            object.__setattr__(self, table, _readonly(table, self.name, getattr(self, table)))
        shapes = {t: getattr(self, t).shape for t in tables}
        if len(set(shapes.values())) != 1:
            msg = f"{self.name}: tables must share one shape, got {shapes}"
            raise ChemistryError(msg)
        grid = self.soc_grid
        if grid.size < 2 or grid[0] != 0.0 or grid[-1] != 1.0 or np.any(np.diff(grid) <= 0.0):
            msg = f"{self.name}: soc_grid must increase strictly from 0 to 1"
            raise ChemistryError(msg)
        if np.any(np.diff(self.ocv_v) <= 0.0):
            bad = float(grid[int(np.argmin(np.diff(self.ocv_v)))])
            msg = f"{self.name}: ocv_v must increase strictly with SoC (first violation near SoC {bad:.3f})"
            raise ChemistryError(msg)
        if np.any(self.hyst_v < 0.0):
            msg = f"{self.name}: hyst_v is a half-width and must be >= 0"
            raise ChemistryError(msg)

    def _check_scalars(self) -> None:
        def finite_number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))

        for scalar in _POSITIVE_FIELDS:
            value = getattr(self, scalar)
            if not (finite_number(value) and value > 0.0):
                msg = f"{self.name}: {scalar} must be a positive finite number, got {value!r}"
                raise ChemistryError(msg)
        for scalar in ("r_soc_curvature", "r_low_soc_gain"):
            value = getattr(self, scalar)
            if not (finite_number(value) and value >= 0.0):
                msg = f"{self.name}: {scalar} must be a finite number >= 0, got {value!r}"
                raise ChemistryError(msg)
        if self.coulombic_efficiency > 1.0:
            msg = f"{self.name}: coulombic_efficiency must be <= 1, got {self.coulombic_efficiency}"
            raise ChemistryError(msg)
        if not (finite_number(self.r2_ohm_ah) and self.r2_ohm_ah >= 0.0):
            msg = f"{self.name}: r2_ohm_ah must be a finite number >= 0, got {self.r2_ohm_ah!r}"
            raise ChemistryError(msg)
        if self.r2_ohm_ah > 0.0 and not self.tau2_s > self.tau1_s:
            msg = f"{self.name}: the second RC pair is the slow one: need tau2_s > tau1_s, got {self.tau2_s}"
            raise ChemistryError(msg)

    def _check_temp_table(self) -> None:
        try:
            temps = np.array(self.temp_table_c, dtype=np.float64)
            factors = np.array(self.temp_table_factor, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            msg = f"{self.name}: temp_table_c and temp_table_factor must hold numbers"
            raise ChemistryError(msg) from exc
        if temps.ndim != 1 or temps.shape != factors.shape:
            msg = f"{self.name}: temp_table_c and temp_table_factor must be 1-D and of equal length"
            raise ChemistryError(msg)
        # Any sequence is accepted; keep plain tuples of floats (hashable, and safe to test for emptiness).
        object.__setattr__(self, "temp_table_c", tuple(float(x) for x in temps))
        object.__setattr__(self, "temp_table_factor", tuple(float(x) for x in factors))
        if temps.size:
            if temps.size < 2 or not (np.all(np.isfinite(temps)) and np.all(np.diff(temps) > 0.0)):
                msg = f"{self.name}: temp_table_c needs at least two strictly increasing finite temperatures"
                raise ChemistryError(msg)
            if not (np.all(np.isfinite(factors)) and np.all(factors > 0.0)):
                msg = f"{self.name}: temp_table_factor must be positive and finite"
                raise ChemistryError(msg)
            at_ref = np.flatnonzero(temps == REFERENCE_TEMP_C)
            if at_ref.size != 1 or factors[at_ref[0]] != 1.0:
                msg = f"{self.name}: the temperature table must hold the factor 1 at {REFERENCE_TEMP_C} °C"
                raise ChemistryError(msg)
        # u = 1/T - 1/T_ref increases as T falls: store the table in increasing u.
        u = (1.0 / (temps + _KELVIN_OFFSET) - 1.0 / (REFERENCE_TEMP_C + _KELVIN_OFFSET))[::-1].copy()
        log_f = np.log(factors)[::-1].copy()
        u.flags.writeable = False
        log_f.flags.writeable = False
        object.__setattr__(self, "_temp_u", u)
        object.__setattr__(self, "_temp_log_f", log_f)

    def _check_voltages(self) -> None:
        if not self.v_min_v < self.v_nominal_v < self.v_max_v:
            msg = (
                f"{self.name}: need v_min_v < v_nominal_v < v_max_v, "
                f"got {self.v_min_v}, {self.v_nominal_v}, {self.v_max_v}"
            )
            raise ChemistryError(msg)
        tol = 1e-6
        if self.ocv_v[0] < self.v_min_v - tol or self.ocv_v[-1] > self.v_max_v + tol:
            msg = (
                f"{self.name}: OCV table [{self.ocv_v[0]:.4f}, {self.ocv_v[-1]:.4f}] V lies outside "
                f"the voltage limits [{self.v_min_v}, {self.v_max_v}] V"
            )
            raise ChemistryError(msg)

    def __repr__(self) -> str:
        """Return a one-line summary (the tables are left out)."""
        pair2 = f"r2={self.r2_ohm_ah * 1e3:.1f} mOhm.Ah, tau2={self.tau2_s:g} s, " if self.r2_ohm_ah > 0.0 else ""
        if self.temp_table_c:
            table = zip(self.temp_table_c, self.temp_table_factor, strict=True)
            temperature = f"R(T)/R(25 C)=[{', '.join(f'{f:g} at {t:g} C' for t, f in table)}]"
        else:
            temperature = f"Ea={self.activation_energy_j_per_mol / 1e3:.1f} kJ/mol"
        return (
            f"CellChemistry(name={self.name!r}, family={self.family!r}, "
            f"ocv={self.ocv_v[0]:.3f}-{self.ocv_v[-1]:.3f} V on {self.soc_grid.size} points, "
            f"r0={self.r0_ohm_ah * 1e3:.1f} mOhm.Ah, r1={self.r1_ohm_ah * 1e3:.1f} mOhm.Ah, "
            f"tau1={self.tau1_s:g} s, {pair2}{temperature}, aging_model={self.aging_model!r})"
        )

    # -- open-circuit voltage -------------------------------------------------------

    def ocv(self, soc: npt.ArrayLike) -> FloatArray:
        """Return the open-circuit voltage at ``soc`` (clipped to [0, 1]), V.

        Linear interpolation in the table.

        Args:
            soc: state of charge, fraction; scalar or array.

        Returns:
            OCV with the shape of ``soc``, V.

        Examples:
            >>> import numpy as np
            >>> nmc = get_chemistry("nmc811")
            >>> np.round(nmc.ocv([0.0, 0.5, 1.0]), 3)
            array([2.5  , 3.751, 4.2  ])
            >>> round(float(nmc.ocv(1.3)), 3)  # clipped to SoC 1
            4.2
        """
        s = np.clip(np.asarray(soc, dtype=np.float64), 0.0, 1.0)
        return np.asarray(np.interp(s, self.soc_grid, self.ocv_v), dtype=np.float64)

    def docv_dsoc(self, soc: npt.ArrayLike) -> FloatArray:
        """Return the OCV slope dOCV/dSoC at ``soc`` (clipped to [0, 1]), V per unit SoC.

        The slope of the table (second-order central differences) interpolated linearly.

        Args:
            soc: state of charge, fraction.

        Returns:
            The slope with the shape of ``soc``, V.
        """
        s = np.clip(np.asarray(soc, dtype=np.float64), 0.0, 1.0)
        return np.asarray(np.interp(s, self.soc_grid, self._docv_dsoc_v), dtype=np.float64)

    def soc_from_ocv(self, v: npt.ArrayLike) -> FloatArray:
        """Invert the OCV table: the SoC whose OCV is ``v``, clipped to [0, 1].

        Args:
            v: open-circuit voltage, V.

        Returns:
            SoC with the shape of ``v``, fraction. Voltages below (above) the table give 0 (1).
        """
        volts = np.asarray(v, dtype=np.float64)
        return np.asarray(np.interp(volts, self.ocv_v, self.soc_grid), dtype=np.float64)

    def hysteresis_v(self, soc: npt.ArrayLike) -> FloatArray:
        """Return the hysteresis half-width ``H(soc)``, V (zero except for LFP)."""
        s = np.clip(np.asarray(soc, dtype=np.float64), 0.0, 1.0)
        return np.asarray(np.interp(s, self.soc_grid, self.hyst_v), dtype=np.float64)

    def entropic(self, soc: npt.ArrayLike) -> FloatArray:
        """Return the entropic coefficient dOCV/dT at ``soc``, V/K."""
        s = np.clip(np.asarray(soc, dtype=np.float64), 0.0, 1.0)
        return np.asarray(np.interp(s, self.soc_grid, self.entropic_v_per_k), dtype=np.float64)

    # -- resistance -----------------------------------------------------------------

    def arrhenius(self, temp_c: npt.ArrayLike) -> FloatArray:
        """Return the resistance factor ``R(T)/R(25 °C) = exp(Ea/R_gas*(1/T - 1/T_ref))``.

        Args:
            temp_c: cell temperature, °C.

        Returns:
            The factor with the shape of ``temp_c`` (> 1 below 25 °C).
        """
        t_k = np.asarray(temp_c, dtype=np.float64) + _KELVIN_OFFSET
        t_ref_k = REFERENCE_TEMP_C + _KELVIN_OFFSET
        exponent = self.activation_energy_j_per_mol / GAS_CONSTANT_J_PER_MOL_K * (1.0 / t_k - 1.0 / t_ref_k)
        return np.asarray(np.exp(exponent), dtype=np.float64)

    def temp_factor(self, temp_c: npt.ArrayLike) -> FloatArray:
        """Return the resistance factor ``R(T)/R(25 °C)`` that every resistance is scaled by.

        Without a temperature table this is :meth:`arrhenius`. With one, ``ln(factor)`` is
        interpolated linearly in ``u = 1/T - 1/T_ref`` (``T`` in kelvin) between the table
        points, i.e. Arrhenius with a different activation energy on each interval, and
        extrapolated with the slope of the nearest end interval.

        Args:
            temp_c: cell temperature, °C.

        Returns:
            The factor with the shape of ``temp_c`` (1 at 25 °C).

        Examples:
            >>> lmo = get_chemistry("lmo")
            >>> [round(float(lmo.temp_factor(t)), 3) for t in (10.0, 25.0, 40.0)]
            [1.649, 1.0, 0.968]
        """
        if not self.temp_table_c:
            return self.arrhenius(temp_c)
        t_k = np.asarray(temp_c, dtype=np.float64) + _KELVIN_OFFSET
        u = 1.0 / t_k - 1.0 / (REFERENCE_TEMP_C + _KELVIN_OFFSET)
        knots, log_f = self._temp_u, self._temp_log_f
        inner = np.interp(u, knots, log_f)
        low_slope = (log_f[1] - log_f[0]) / (knots[1] - knots[0])
        high_slope = (log_f[-1] - log_f[-2]) / (knots[-1] - knots[-2])
        log_factor = np.where(
            u < knots[0],
            log_f[0] + low_slope * (u - knots[0]),
            np.where(u > knots[-1], log_f[-1] + high_slope * (u - knots[-1]), inner),
        )
        return np.asarray(np.exp(log_factor), dtype=np.float64)

    def temp_factor_hinges(self) -> tuple[float, float, FloatArray, FloatArray]:
        """Return :meth:`temp_factor` as a sum of hinges, for vectorised evaluation per pack.

        ``ln(temp_factor) = constant + slope*u + sum_j change_j*max(u - knot_j, 0)`` with
        ``u = 1/T - 1/T_ref`` (kelvin); exact for both the Arrhenius and the table form.

        Returns:
            ``(constant, slope, knots, changes)``: the constant (0 for Arrhenius); the slope
            below the first knot, K; the interior knots in ``u``, 1/K (empty for Arrhenius or
            a two-point table); the change of slope at each knot, K.
        """
        if not self.temp_table_c:
            empty = np.zeros(0)
            return 0.0, self.activation_energy_j_per_mol / GAS_CONSTANT_J_PER_MOL_K, empty, empty.copy()
        knots, log_f = self._temp_u, self._temp_log_f
        slopes = np.diff(log_f) / np.diff(knots)
        constant = float(log_f[0] - slopes[0] * knots[0])
        return constant, float(slopes[0]), knots[1:-1].copy(), np.diff(slopes)

    def _soc_shape(self, s: FloatArray | np.float64) -> FloatArray:
        return np.asarray(
            1.0 + self.r_soc_curvature * (2.0 * s - 1.0) ** 2 + self.r_low_soc_gain * np.exp(-s / self.r_low_soc_width),
            dtype=np.float64,
        )

    def soc_factor(self, soc: npt.ArrayLike) -> FloatArray:
        """Return the resistance factor ``R(soc)/R(50 %)`` (1 at 50 % SoC).

        ``f(s) = 1 + c*(2s - 1)**2 + g*exp(-s/w)``, normalised to ``f(0.5) = 1``, with
        ``c = r_soc_curvature``, ``g = r_low_soc_gain`` and ``w = r_low_soc_width``: a
        mild U-shape plus a steeper rise below about 10 % SoC.

        Args:
            soc: state of charge, fraction (clipped to [0, 1]).

        Returns:
            The factor with the shape of ``soc``.
        """
        s = np.clip(np.asarray(soc, dtype=np.float64), 0.0, 1.0)
        return np.asarray(self._soc_shape(s) / self._soc_norm, dtype=np.float64)

    def r0_ohm(self, capacity_ah: npt.ArrayLike, soc: npt.ArrayLike, temp_c: npt.ArrayLike) -> FloatArray:
        """Return the ohmic resistance of a cell, Ω.

        ``R0 = r0_ohm_ah / capacity_ah * soc_factor(soc) * temp_factor(temp_c)``.

        Args:
            capacity_ah: rated (beginning-of-life) capacity of the cell, Ah.
            soc: state of charge, fraction.
            temp_c: cell temperature, °C.

        Returns:
            R0 broadcast over the three arguments, Ω.
        """
        cap = np.asarray(capacity_ah, dtype=np.float64)
        return np.asarray(self.r0_ohm_ah / cap * self.soc_factor(soc) * self.temp_factor(temp_c), dtype=np.float64)

    def r1_ohm(self, capacity_ah: npt.ArrayLike, soc: npt.ArrayLike, temp_c: npt.ArrayLike) -> FloatArray:
        """Return the (fast) RC-pair resistance of a cell, Ω (same scaling as :meth:`r0_ohm`).

        Args:
            capacity_ah: rated (beginning-of-life) capacity of the cell, Ah.
            soc: state of charge, fraction.
            temp_c: cell temperature, °C.

        Returns:
            R1 broadcast over the three arguments, Ω.
        """
        cap = np.asarray(capacity_ah, dtype=np.float64)
        return np.asarray(self.r1_ohm_ah / cap * self.soc_factor(soc) * self.temp_factor(temp_c), dtype=np.float64)

    def r2_ohm(self, capacity_ah: npt.ArrayLike, soc: npt.ArrayLike, temp_c: npt.ArrayLike) -> FloatArray:
        """Return the second (slow) RC-pair resistance of a cell, Ω (same scaling as :meth:`r0_ohm`).

        Args:
            capacity_ah: rated (beginning-of-life) capacity of the cell, Ah.
            soc: state of charge, fraction.
            temp_c: cell temperature, °C.

        Returns:
            R2 broadcast over the three arguments, Ω (zeros for a one-RC chemistry).
        """
        cap = np.asarray(capacity_ah, dtype=np.float64)
        return np.asarray(self.r2_ohm_ah / cap * self.soc_factor(soc) * self.temp_factor(temp_c), dtype=np.float64)

    def dcir_ohm(
        self, capacity_ah: npt.ArrayLike, soc: npt.ArrayLike, temp_c: npt.ArrayLike, pulse_s: npt.ArrayLike
    ) -> FloatArray:
        """Return the model's DC resistance after a constant-current pulse of ``pulse_s``, Ω.

        ``R0 + R1*(1 - exp(-pulse_s/tau1)) + R2*(1 - exp(-pulse_s/tau2))``, the quantity
        pulse tests report as "R(1 s)", "R(10 s)" and so on.

        Args:
            capacity_ah: rated capacity, Ah.
            soc: state of charge, fraction.
            temp_c: cell temperature, °C.
            pulse_s: pulse length, s.

        Returns:
            The DC resistance broadcast over the arguments, Ω.
        """
        t = np.asarray(pulse_s, dtype=np.float64)
        return np.asarray(
            self.r0_ohm(capacity_ah, soc, temp_c)
            + self.r1_ohm(capacity_ah, soc, temp_c) * (1.0 - np.exp(-t / self.tau1_s))
            + self.r2_ohm(capacity_ah, soc, temp_c) * (1.0 - np.exp(-t / self.tau2_s)),
            dtype=np.float64,
        )

    # -- thermal --------------------------------------------------------------------

    def heat_capacity_j_per_k(self, capacity_ah: npt.ArrayLike) -> FloatArray:
        """Return the lumped heat capacity ``m*cp`` of a cell, J/K."""
        cap = np.asarray(capacity_ah, dtype=np.float64)
        return np.asarray(cap * self.mass_kg_per_ah * self.cp_j_per_kg_k, dtype=np.float64)

    def conductance_w_per_k(self, capacity_ah: npt.ArrayLike) -> FloatArray:
        """Return the cell-to-ambient heat conductance ``h*A`` of a cell, W/K."""
        cap = np.asarray(capacity_ah, dtype=np.float64)
        return np.asarray(cap * self.area_m2_per_ah * self.h_w_per_m2_k, dtype=np.float64)


# -- package data ---------------------------------------------------------------------


@functools.cache
def load_table(filename: str) -> Mapping[str, FloatArray]:
    """Read one CSV table from ``twin/chemistry/data`` (once per process).

    Args:
        filename: file name inside the data folder, for example ``"ocv_Chen2020.csv"``.

    Returns:
        A read-only mapping from column name to a read-only float64 array; empty cells
        are NaN.

    Raises:
        ChemistryError: if the file is missing or holds a non-numeric cell.
    """
    resource = resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR, filename)
    try:
        text = resource.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as exc:
        msg = f"chemistry table {filename!r} is missing from the package data"
        raise ChemistryError(msg) from exc
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], [r for r in rows[1:] if r]
    columns: dict[str, FloatArray] = {}
    for k, column in enumerate(header):
        try:
            values = np.array([float(r[k]) if k < len(r) and r[k].strip() else np.nan for r in body], dtype=np.float64)
        except ValueError as exc:
            msg = f"chemistry table {filename!r}: non-numeric value in column {column!r}"
            raise ChemistryError(msg) from exc
        values.flags.writeable = False
        columns[column.strip()] = values
    return MappingProxyType(columns)


# -- registry -------------------------------------------------------------------------


@functools.cache
def _build(name: str) -> CellChemistry:
    # Imported here because each cell-type module imports this one.
    from twin.chemistry import lfp, lmo, nmc532, nmc811

    builders = {"nmc811": nmc811.build, "nmc532": nmc532.build, "lfp": lfp.build, "lmo": lmo.build}
    chemistry = builders[name]()
    if chemistry.name != name:
        msg = f"builder for {name!r} returned a chemistry named {chemistry.name!r}"
        raise ChemistryError(msg)
    return chemistry


def _unknown(name: object) -> ChemistryError:
    text = str(name)
    matches = difflib.get_close_matches(text.strip().lower(), CHEMISTRY_NAMES, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
    return ChemistryError(f"unknown cell chemistry {text!r}{hint} (known: {', '.join(CHEMISTRY_NAMES)})")


def get_chemistry(name: str) -> CellChemistry:
    """Return the registered parameter set called ``name``.

    Args:
        name: one of ``"nmc811"``, ``"nmc532"``, ``"lfp"``, ``"lmo"`` (exact spelling).

    Returns:
        The shared, immutable parameter set (built and cached on first use).

    Raises:
        ChemistryError: for an unknown name, with the closest known names as suggestions.

    Examples:
        >>> lfp = get_chemistry("lfp")
        >>> lfp.family, lfp.aging_model
        ('LFP', 'lfp_gr_250ah_prismatic')
        >>> get_chemistry("LFP")
        Traceback (most recent call last):
        ...
        twin.errors.ChemistryError: unknown cell chemistry 'LFP'; did you mean 'lfp'? (known: nmc811, nmc532, lfp, lmo)
    """
    if name not in CHEMISTRY_NAMES:
        raise _unknown(name)
    return _build(name)


class _Registry(Mapping[str, CellChemistry]):
    """Read-only name -> chemistry mapping whose values are built on first access."""

    __slots__ = ()

    def __getitem__(self, key: str) -> CellChemistry:
        if key not in CHEMISTRY_NAMES:
            raise KeyError(key)
        return _build(key)

    def __iter__(self) -> Iterator[str]:
        return iter(CHEMISTRY_NAMES)

    def __len__(self) -> int:
        return len(CHEMISTRY_NAMES)

    def __contains__(self, key: object) -> bool:
        return key in CHEMISTRY_NAMES

    def __repr__(self) -> str:
        return f"CHEMISTRIES({', '.join(CHEMISTRY_NAMES)})"


CHEMISTRIES: Mapping[str, CellChemistry] = _Registry()
"""All registered cell types by name (read-only; values are built on first access)."""
