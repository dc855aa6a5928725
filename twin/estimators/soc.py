"""Pack state of charge by an extended Kalman filter, for every pack of the site at once.

Each pack is treated as one equivalent cell group (pack voltage over the series count) with
the equivalent circuit of its chemistry (:mod:`twin.chemistry`: ``R0`` and one or two RC
pairs), and six states::

    x = [soc, v_rc1_v, v_rc2_v, hyst, current_offset_a, r_scale]

* ``soc``: mean SoC of the pack's cell groups, fraction;
* ``v_rc1_v``: voltage across the fast RC pair (``R1``, ``tau1``) of a cell group, per unit
  of ``r_scale``, V;
* ``v_rc2_v``: voltage across the slow RC pair (``R2``, ``tau2``), per unit of ``r_scale``, V. For a chemistry
  without one (``r2_ohm_ah = 0``: every one but lmo today) ``R2`` is zero and so are this
  state's prior variance and process noise: it stays exactly at zero, uncorrelated with
  the others, and the filter is the one-RC filter;
* ``hyst``: Plett's normalised one-state hysteresis in [-1, 1] (it tends to -1 on discharge
  and +1 on charge; its amplitude ``H(soc)`` is zero except for LFP);
* ``current_offset_a``: the current sensor's offset, A (the sensor reads true + offset),
  a random walk;
* ``r_scale``: the pack's resistance over the chemistry's at its rated capacity (aging and
  pack-to-pack spread multiply ``R0``, ``R1`` and ``R2`` alike), a slow random walk. Its
  prior is ``1 + EMPIRICAL_R_PER_FADE * (1 - SoH prior)`` (:mod:`twin.chemistry.aging`:
  fade brings resistance with it) with a relative spread :attr:`SocOptions.resistance_error`;
  the changing current (load steps, checkpoints) tells it apart from SoC.

Between samples ``k-1`` and ``k`` (``dt`` from the samples' own timestamps; the current of
sample ``k-1`` is held, as a BMS samples at the start of an interval), with ``i = i_meas -
offset``, positive on discharge, and ``Q`` the capacity prior in A·s::

    soc'    = soc - eta(i) * i * dt * u / Q                  eta = coulombic efficiency on charge
    v_rc1'  = a1 * v_rc1 + (1 - a1) * R1 * i                 a1 = exp(-dt / tau1)
    v_rc2'  = a2 * v_rc2 + (1 - a2) * R2 * i                 a2 = exp(-dt / tau2)
    hyst'   = f * hyst - (1 - f) * sign(i)                   f = exp(-gamma * |i| * dt / Q)
    offset' = offset

``Q`` is the *string's* usable capacity (what an intake test or the capacity estimate
measures), which the weakest cell limits; the mean cell counted here holds ``Q / u``, ``u``
being the usable share ``held + room`` of the extreme cells' states below (1 until cell
voltages set them apart). Counting the mean cell with ``Q`` itself moved it too fast by the
weakest cell's shortfall, by 4 % on second-life LFP packs where the plateau's voltage hardly
corrects it, and the capacity estimate learnt that back as a 5 % lower capacity.

and the measurement of sample ``k`` is the mean cell voltage::

    voltage_v / series = OCV(soc) + H(soc) * hyst - r_scale * (R0 * i + v_rc1 + v_rc2) - R_series * i

with ``i = i_meas - offset``. ``R0``, ``R1`` and ``R2`` are the chemistry's ``R x Ah`` over
the *rated* group capacity, times its SoC shape and its temperature factor
(:meth:`~twin.chemistry.CellChemistry.temp_factor`: Arrhenius, or piecewise Arrhenius in a
measured table, evaluated per pack from its hinge form) at the sample's ``temp_avg_c``,
exactly as :meth:`~twin.chemistry.CellChemistry.r0_ohm` and its siblings compute them;
``R0`` also carries the connector share of the pack, and ``R_series`` is any extra series
resistance given in :class:`PackInfo` (per cell group).

How the filter is tuned, and what it says about itself:

* Process noise on ``soc`` grows with charge throughput (the capacity prior is uncertain,
  :attr:`SocOptions.capacity_error`) and with the current sensor's noise. On the flat LFP
  plateau the voltage carries little information, so ``soc_std`` grows there: the filter is
  coulomb counting and says so (flag ``lfp_plateau``, and ``uncertain`` once ``soc_std``
  exceeds :attr:`SocOptions.uncertain_soc_std`).
* Model errors are biases, not white noise: the OCV table's error and the resistance
  model's relative error once the scale is estimated (:attr:`SocOptions.resistance_model_error`:
  its SoC shape and temperature factor, the temperature sensor; it adds
  ``(error * r_scale * (R0 * i + v_rc1 + v_rc2))**2``). Treated as white, thousands of samples on the plateau would
  "average them away" and make the filter overconfident. Their variance is therefore
  multiplied by the number of samples that pass before they decorrelate, after
  :attr:`SocOptions.ocv_error_corr_soc` of SoC travel or :attr:`SocOptions.ocv_error_corr_s`
  of time, whichever comes first: the voltage brings information per unit of time or of
  SoC swept, not per sample, and voltage under heavy current counts for less.
* ``OCV(soc)`` enters the update by statistical linearisation over the SoC prior (3-point
  Gauss-Hermite: mean, secant slope and the residual as extra measurement variance) instead
  of the tangent. With a wide prior on a curved OCV (LFP's plateau between steep ends) the
  tangent makes the first updates jump into the wrong region and collapse the covariance
  there; once the prior is narrow the two agree.
* The SoC prior of a pack the twin has never seen is centred on its first reading where
  that reading leaves the SoC open (the LFP plateau, the hysteresis state unknown): there a
  fixed centre would decide where the estimate settles among the (SoC, hysteresis) pairs
  that explain the voltage. Elsewhere the reading pins the SoC within minutes from any
  centre (:func:`twin.estimators._soc_filter._centre_prior`; :attr:`PackInfo.soc0` NaN, the default).

Two small Kalman filters per pack follow the weakest (lowest-voltage) and the strongest
(highest-voltage) cell group from ``cell_v_min_v`` and ``cell_v_max_v``, three states each::

    c = [d, rate, dr]      d' = d + rate * dsoc          (dsoc: the mean's coulomb-counted change)

* ``d``: the cell's SoC minus ``soc`` (``<= 0`` for the weakest, ``>= 0`` for the strongest);
* ``rate``: how much faster than the mean its SoC moves, ``Q_mean / Q_cell - 1``: a cell of
  less capacity drifts away from the mean as the string is cycled (a weak group with 75 %
  of the capacity has rate 1/3), and ``d`` follows it between voltage readings;
* ``dr``: its resistance over the mean cell's, less one (a weak group is often also a
  high-resistance one, whose voltage sags under load by more than its SoC says).

Each is updated from the difference ``cell_v - voltage_v / series``, which cancels the
shared hysteresis (its amplitude varies little between the cells of a string), current
offset and most of the drop::

    cell_v - voltage_v / series = OCV(soc + d) - OCV(soc) - m * dr + (connector + series drop)

with ``m = r_scale * (R0_cells * i + v_rc1 + v_rc2)`` the mean cell's own drop; the mean SoC's
error enters as extra, slowly varying noise in proportion to the difference of the two OCV
slopes (large for a cell on a steep end of LFP's curve while the mean is on the plateau).
``rate`` and ``dr`` are random walks (another cell may take over as the extreme one).

The outputs ``soc_min_cell = soc + d_min`` and ``soc_max_cell = soc + d_max`` give the
string's usable SoC: a series string is empty when its first cell is empty and full when its
first cell is full, so with each cell's capacity ``Q_mean / (1 + rate)``::

    held = min(soc_min_cell / (1 + rate_min), soc_max_cell / (1 + rate_max))
    room = min((1 - soc_min_cell) / (1 + rate_min), (1 - soc_max_cell) / (1 + rate_max))
    soc_usable = held / (held + room)

(``soc_min / (soc_min + 1 - soc_max)`` when the extreme cells have the mean's capacity; at the
top of a charge the weakest cell, level with the others by then, is the first full). The
twin publishes ``soc_usable`` with ``soc_usable_std``: the mean's variance and each extreme
cell's (its offset's, its rate's and their covariance) carried through this formula to first
order (the filters are separate, so taken as independent). The usable swing is narrower than
the mean cell's, so the mean's error counts for about ``1 / (held + room)`` of itself (exactly
1 where one cell sets both ends); an extreme
cell whose rate has not been seen (a pack at rest since the start) leaves several % open.
On the emulated 4 h nevada site, whose cells are the twin's OCV tables, the error over this
std is 0.18 (LMO 0.41): conservative, as the std budgets for a table 3 mV off and the rates'
prior (0.15) is wider than the emulated cells' spread; over 24 draws of it with the tables
3 mV off (``mgtwin bands``) it is 1.0. ``soc_usable_std_shared`` is the part an error of the chemistry's OCV table,
common to its packs, can cause: the mean's error up to ``ocv_error_v`` over the OCV slope at
its SoC (all of it on LFP's plateau, a fraction on a steep curve whose prior is still wide);
the extreme cells' offsets are read through the same table, so a table error reaches them
too, which this ignores.

Data handling in :meth:`SocEstimator.update` (per pack, in event time):

* rows are sorted by ``(pack, ts_ms)`` within a batch; a row whose ``(pack, ts_ms)`` is
  already in the batch or is the pack's last processed sample is a **duplicate**: ignored
  and counted; a row older than the pack's last processed sample is **late**: ignored and
  counted (only the last sample is remembered across batches, so an exact repeat of an
  older row is counted as late). So the final state does not depend on how a time-ordered
  recording is cut into batches, nor on how the rows of one batch are ordered;
* an interval longer than :attr:`SocOptions.max_gap_s` is a **gap**: it is propagated with the
  last current and with extra variance for the unknown current;
* a NaN or implausible voltage skips the measurement update (counted as skipped), and so
  does a NaN current (the voltage cannot be corrected for its drop); for the propagation a
  NaN current or temperature is replaced by the pack's last finite value;
* rows of packs not in :class:`PackInfo` are ignored and counted;
* the BMS's own ``soc_bms`` is never read.

The batch is reshaped to ``(k, pack)`` arrays, the *k*-th new sample of every pack side by
side, and the recursion runs compiled (:mod:`twin.estimators._soc_filter`, numba), one pass
over each pack's samples: there is no Python loop per pack or per row. Several chemistries
share one filter through tables sampled on one SoC grid and indexed by chemistry row.

References:
    Plett, G. L. (2004). Extended Kalman filtering for battery management systems of
    LiPB-based HEV battery packs. Part 1: Background. J. Power Sources 134, 252-261.
    Part 2: Modeling and identification. J. Power Sources 134, 262-276 (the one-state
    hysteresis model). Part 3: State and parameter estimation. J. Power Sources 134,
    277-292 (the EKF and its tuning).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Final, Self

import numpy as np
import polars as pl

from twin.chemistry import REFERENCE_TEMP_C, CellChemistry, get_chemistry
from twin.chemistry.aging import EMPIRICAL_R_PER_FADE
from twin.estimators import _soc_filter
from twin.estimators._soc_filter import (
    CD as _CD,
)
from twin.estimators._soc_filter import (
    CR as _CR,
)
from twin.estimators._soc_filter import (
    CX as _CX,
)
from twin.estimators._soc_filter import (
    DOCV as _DOCV,
)
from twin.estimators._soc_filter import (
    F64,
    GRID_POINTS,
    I64,
    IP,
    B,
)
from twin.estimators._soc_filter import (
    HY as _HY,
)
from twin.estimators._soc_filter import (
    MAX_RATE as _MAX_RATE,
)
from twin.estimators._soc_filter import (
    N_CELL as _N_CELL,
)
from twin.estimators._soc_filter import (
    N_COLS as _N_COLS,
)
from twin.estimators._soc_filter import (
    N_STATES as _N_STATES,
)
from twin.estimators._soc_filter import (
    NO_TS as _NO_TS,
)
from twin.estimators._soc_filter import (
    OFF as _OFF,
)
from twin.estimators._soc_filter import (
    RATE_SLACK as _RATE_SLACK,
)
from twin.estimators._soc_filter import (
    RS as _RS,
)
from twin.estimators._soc_filter import (
    SOC as _SOC,
)
from twin.estimators._soc_filter import (
    V1 as _V1,
)
from twin.estimators._soc_filter import (
    V2 as _V2,
)
from twin.estimators.base import (
    Estimator,
    EstimatorError,
    check_columns,
    check_names,
    check_non_negative,
    check_pack_ids,
    group_time_order,
    register,
    scattered,
)

__all__ = [
    "GRID_POINTS",
    "PackInfo",
    "SocEstimate",
    "SocEstimator",
    "SocFlag",
    "SocOptions",
    "SocParams",
    "SocSamples",
    "SocState",
    "initial_state",
    "samples_from_frame",
    "step",
]

_S_PER_H: Final = 3600.0
#: The least OCV slope (V per unit SoC) the table's share of the SoC error is read at.
_MIN_SLOPE_V: Final = 1e-3
#: The published usable SoC reads a rate on its side of zero once its standard deviation is below this.
_SETTLED_RATE_STD: Final = 0.05
_SPARSE_SLACK: Final = 4096  # grid cells a batch may waste before its packs are split by sample count
#: Columns :meth:`SocEstimator.update` needs; ``cell_v_min_v``/``cell_v_max_v`` are optional.
REQUIRED_COLUMNS: Final = ("pack", "ts_ms", "voltage_v", "current_a", "temp_avg_c")
OPTIONAL_COLUMNS: Final = ("cell_v_min_v", "cell_v_max_v")


class SocFlag(enum.IntFlag):
    """Quality flags of a pack's SoC estimate (a bitmask in :attr:`SocEstimate.flags`)."""

    NONE = 0
    STALE = 1
    """No sample for longer than :attr:`SocOptions.stale_after_s` (event time)."""
    OUT_OF_VALIDITY = 2
    """The last sample's temperature, C-rate or the SoC lies outside the chemistry's validity range."""
    UNCERTAIN = 4
    """The mean cell's ``soc_std`` exceeds :attr:`SocOptions.uncertain_soc_std`.

    The usable SoC's std (``soc_usable_std``, what the twin publishes) is not read: a pack at
    rest whose extreme cells' capacities are not yet known would be flagged for that alone.
    """
    LFP_PLATEAU = 8
    """The OCV is flat at this SoC (slope below :attr:`SocOptions.plateau_slope_v`): SoC is coulomb-counted."""
    NO_DATA = 16
    """No sample has been processed yet: the estimate is the prior."""


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def _frozen(values: Any, dtype: type[np.generic]) -> Any:
    arr = np.array(values, dtype=dtype, copy=True)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, slots=True, eq=False)
class PackInfo:
    """What the filter knows about each pack before any telemetry: per-pack arrays from the meta.

    Attributes:
        pack_ids: pack identifiers, unique.
        chemistry: chemistry name per pack (a :mod:`twin.chemistry` name).
        rated_group_ah: rated capacity of one cell group (cell Ah x parallel), Ah; the
            resistances scale with it.
        series: series cell groups per pack.
        capacity_ah: capacity prior of one cell group (rated x SoH prior, or a measured
            value), Ah; the coulomb counter divides by it.
        soc0: initial SoC prior, fraction; NaN: 50 %, centred on the pack's first reading
            instead where that reading leaves the SoC open (the LFP plateau; see
            :func:`twin.estimators._soc_filter._centre_prior`).
        soc0_std: standard deviation of the initial SoC prior, fraction.
        series_r_ohm: extra series resistance of the whole pack that the chemistry does not
            know (cabling, sense leads), Ω; 0 by default.
    """

    pack_ids: tuple[str, ...]
    chemistry: tuple[str, ...]
    rated_group_ah: F64
    series: I64
    capacity_ah: F64
    soc0: F64
    soc0_std: F64
    series_r_ohm: F64

    def __post_init__(self) -> None:
        """Freeze the arrays and check shapes and ranges.

        Raises:
            EstimatorError: on a shape mismatch, duplicated ids or a non-physical value.
            ChemistryError: for an unknown chemistry name.
        """
        n = check_pack_ids("PackInfo", self.pack_ids, self.chemistry)
        for name in set(self.chemistry):
            get_chemistry(name)
        for name, dtype in (
            ("rated_group_ah", np.float64),
            ("series", np.int64),
            ("capacity_ah", np.float64),
            ("soc0", np.float64),
            ("soc0_std", np.float64),
            ("series_r_ohm", np.float64),
        ):
            arr = _frozen(np.broadcast_to(np.asarray(getattr(self, name)), (n,)), dtype)
            object.__setattr__(self, name, arr)
        checks = (
            ("rated_group_ah", self.rated_group_ah > 0.0),
            ("series", self.series >= 1),
            ("capacity_ah", self.capacity_ah > 0.0),
            ("soc0", np.isnan(self.soc0) | ((self.soc0 >= 0.0) & (self.soc0 <= 1.0))),
            ("soc0_std", self.soc0_std > 0.0),
            ("series_r_ohm", self.series_r_ohm >= 0.0),
        )
        for name, ok in checks:
            if not bool(np.all(ok)):
                bad = int(np.flatnonzero(~ok)[0])
                msg = f"PackInfo {name} out of range for pack {self.pack_ids[bad]!r}: {getattr(self, name)[bad]}"
                raise EstimatorError(msg)

    @property
    def n_packs(self) -> int:
        """Number of packs."""
        return len(self.pack_ids)

    @classmethod
    def from_meta(
        cls,
        meta: pl.DataFrame,
        *,
        soh_prior: Mapping[str, float] | None = None,
        soc0: float | None = None,
        soc0_std: float = 0.3,
    ) -> PackInfo:
        """Build the pack info from pack_meta rows (the contract's columns).

        The capacity prior is ``rated_capacity_ah x SoH prior``, the SoH prior being, per
        pack, ``soh_prior[pack]`` if given, else the meta's ``intake_soh``, else 1.

        Args:
            meta: one row per pack with ``pack``, ``chemistry``, ``rated_capacity_ah``,
                ``series_cells`` and optionally ``intake_soh``.
            soh_prior: SoH priors by pack id (from a capacity estimate, say).
            soc0: initial SoC prior of every pack; None (the default): 50 %, centred on a
                pack's first reading where it leaves the SoC open (see :attr:`PackInfo.soc0`).
            soc0_std: its standard deviation.

        Returns:
            The pack info, in the order of the meta's rows.

        Raises:
            EstimatorError: if a column is missing or a value is out of range.
        """
        check_columns(meta, ("pack", "chemistry", "rated_capacity_ah", "series_cells"), estimator="PackInfo")
        ids = tuple(str(p) for p in meta.get_column("pack").to_list())
        rated = meta.get_column("rated_capacity_ah").cast(pl.Float64).to_numpy()
        intake = (
            meta.get_column("intake_soh").cast(pl.Float64).fill_null(1.0).to_numpy()
            if "intake_soh" in meta.columns
            else np.ones(len(ids))
        )
        given = soh_prior or {}
        soh = np.array([given.get(p, float(s)) for p, s in zip(ids, intake, strict=True)], dtype=np.float64)
        return cls(
            pack_ids=ids,
            chemistry=tuple(str(c) for c in meta.get_column("chemistry").to_list()),
            rated_group_ah=rated,
            series=meta.get_column("series_cells").cast(pl.Int64).to_numpy(),
            capacity_ah=rated * soh,
            soc0=np.full(len(ids), math.nan if soc0 is None else soc0),
            soc0_std=np.full(len(ids), soc0_std),
            series_r_ohm=np.zeros(len(ids)),
        )


@dataclass(frozen=True, slots=True)
class SocOptions:
    """Noise model and data-quality rules of the SoC filter (units in the names; defaults immutable).

    Sensor figures are what a typical pack BMS delivers (0.1 V pack resolution, a 0.2 A noisy
    current with a sub-ampere offset, 1-2 mV cell monitoring); model figures are engineering
    choices documented in the module docstring.

    Attributes:
        max_gap_s: an interval longer than this is a gap (extra variance for the unknown
            current), s.
        stale_after_s: a pack with no sample for this long (event time) is flagged stale, s.
        voltage_noise_v: pack voltage noise, V (pack).
        voltage_quantum_v: pack voltage resolution, V (pack).
        cell_voltage_noise_v: cell voltage noise, V.
        cell_voltage_quantum_v: cell voltage resolution, V.
        current_noise_a: current noise per sample, A.
        current_offset_sd_a: prior standard deviation of the current sensor's offset, A.
        current_offset_rw_a_per_sqrt_h: random walk of that offset, A per square-root hour.
        ocv_error_v: error of the OCV table per cell, V (a bias, see ``ocv_error_corr_s``).
        ocv_error_corr_s: correlation time of that error, s.
        ocv_error_corr_soc: correlation length of that error in SoC.
        resistance_error: prior relative standard deviation of the pack's resistance scale
            (aging and pack-to-pack spread around the prior from the SoH prior).
        resistance_model_error: relative error of the resistance model once the scale is
            estimated (its SoC shape and temperature factor, the temperature sensor).
        resistance_rw_per_sqrt_h: random walk of the resistance scale, per square-root hour
            (it also takes up what the temperature factor and the temperature sensor miss).
        capacity_error: relative error of the capacity prior, which makes SoC uncertainty grow
            with throughput.
        capacity_error_coherence: SoC swing over which the capacity error accumulates
            coherently (variance per step ``capacity_error**2 * |dsoc| * coherence``).
        soc_drift_per_sqrt_h: slow SoC random walk (self-discharge, unmodelled effects).
        gap_current_sd_c: standard deviation of the unknown current during a gap, C-rate.
        hyst_error: standard deviation of the hysteresis model error per unit relaxation.
        hyst0_std: prior standard deviation of the hysteresis state.
        v_rc0_std_v: prior standard deviation of each RC voltage, V (the slow pair's prior is
            zero for a chemistry without one).
        connector_share: connector, busbar and contactor resistance as a share of the cells'
            R0 (2.9-4.3 % on the Kona packs, BATTERY_NOTES 1.2).
        cell_offset0_std: prior standard deviation of the weakest/strongest cell's SoC offset.
        cell_offset_rw: random walk of those offsets per unit of SoC throughput (variance per
            step ``cell_offset_rw**2 * |dsoc|``). An offset moves mostly through its cell's
            rate; a loose walk (0.02 before) took up the drift the rate should
            explain, the rates stayed near zero and the usable-SoC swing came out 1-2 % short
            (30-day nevada-60: 0.01 takes the site energy MAPE from 2.0 % to 1.2 %).
        cell_rate0_std: prior standard deviation of the extreme cells' rate (how much faster
            than the mean their SoC moves: the mean capacity over theirs, less one).
        cell_rate_rw: random walk of those rates per unit of SoC throughput (variance per step
            ``cell_rate_rw**2 * |dsoc|``; another cell takes over as the extreme one).
        cell_r0_std: prior standard deviation of the extreme cells' resistance relative to the
            mean cell's, less one.
        cell_r_rw_per_sqrt_h: random walk of that excess resistance, per square-root hour.
        cell_resistance_spread: relative error of the extreme cells' voltage drop once their
            resistance is estimated (makes cell voltages under current count for less).
        cell_ocv_error_v: OCV shape difference between cells, V.
        uncertain_soc_std: above this ``soc_std`` the estimate is flagged uncertain.
        plateau_slope_v: below this OCV slope (V per unit SoC) the estimate is flagged as on
            the plateau.
    """

    max_gap_s: float = 60.0
    stale_after_s: float = 30.0
    voltage_noise_v: float = 0.1
    voltage_quantum_v: float = 0.1
    cell_voltage_noise_v: float = 0.002
    cell_voltage_quantum_v: float = 0.001
    current_noise_a: float = 0.2
    current_offset_sd_a: float = 0.5
    current_offset_rw_a_per_sqrt_h: float = 0.05
    ocv_error_v: float = 0.003
    ocv_error_corr_s: float = 600.0
    ocv_error_corr_soc: float = 0.02
    resistance_error: float = 0.3
    resistance_model_error: float = 0.1
    resistance_rw_per_sqrt_h: float = 0.15
    capacity_error: float = 0.03
    capacity_error_coherence: float = 0.1
    soc_drift_per_sqrt_h: float = 0.002
    gap_current_sd_c: float = 0.05
    hyst_error: float = 0.2
    hyst0_std: float = 0.5
    v_rc0_std_v: float = 0.01
    connector_share: float = 0.035
    cell_offset0_std: float = 0.05
    cell_offset_rw: float = 0.01
    cell_rate0_std: float = 0.15
    cell_rate_rw: float = 0.1
    cell_r0_std: float = 0.5
    cell_r_rw_per_sqrt_h: float = 0.05
    cell_resistance_spread: float = 0.1
    cell_ocv_error_v: float = 0.001
    uncertain_soc_std: float = 0.05
    plateau_slope_v: float = 0.2

    def __post_init__(self) -> None:
        """Check every option is a finite number >= 0 and the time options are positive.

        Raises:
            EstimatorError: for a negative, non-finite or zero-where-positive value.
        """
        check_non_negative(self)
        for name in (
            "max_gap_s",
            "stale_after_s",
            "ocv_error_corr_s",
            "ocv_error_corr_soc",
            "uncertain_soc_std",
            "v_rc0_std_v",
        ):
            if getattr(self, name) <= 0:
                msg = f"SocOptions.{name} must be positive"
                raise EstimatorError(msg)

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> SocOptions:
        """Build options from a mapping (a config section), rejecting unknown names.

        Args:
            values: option names and values; missing names keep their defaults.

        Returns:
            The validated options.

        Raises:
            EstimatorError: for an unknown name (with suggestions) or a bad value.

        Examples:
            >>> SocOptions.from_dict({"max_gap_s": 120.0}).max_gap_s
            120.0
            >>> SocOptions.from_dict({"max_gaps": 120.0})
            Traceback (most recent call last):
            ...
            twin.estimators.base.EstimatorError: unknown SocOptions field 'max_gaps'; did you mean 'max_gap_s'?
        """
        check_names(values, [f.name for f in fields(cls)], what="SocOptions field")
        return cls(**{k: float(v) for k, v in values.items()})


# ------------------------------------------------------------------------------------------------
# Parameters: the chemistry tables and per-pack constants
# ------------------------------------------------------------------------------------------------


def _tables(chemistries: Sequence[CellChemistry]) -> F64:
    """Stack every chemistry's OCV, slope, hysteresis, its slope and R SoC factor on one grid.

    Row ``c * GRID_POINTS + j`` holds chemistry ``c`` at SoC ``j / (GRID_POINTS - 1)``; each
    quantity has a value column and a step column (value at ``j + 1`` minus value at ``j``),
    so linear interpolation is ``value + step * frac`` after one row gather.
    """
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    blocks = []
    for c in chemistries:
        hyst = np.asarray(c.hysteresis_v(grid), dtype=np.float64)
        quantities = (
            np.asarray(c.ocv(grid), dtype=np.float64),
            np.asarray(c.docv_dsoc(grid), dtype=np.float64),
            hyst,
            np.gradient(hyst, grid),
            np.asarray(c.soc_factor(grid), dtype=np.float64),
        )
        block = np.empty((GRID_POINTS, _N_COLS))
        for q, values in enumerate(quantities):
            block[:, 2 * q] = values
            block[:, 2 * q + 1] = np.append(np.diff(values), 0.0)
        blocks.append(block)
    out: F64 = _frozen(np.concatenate(blocks), np.float64)
    return out


@dataclass(frozen=True, slots=True, eq=False)
class SocParams:
    """Everything :func:`step` needs besides the state: per-pack constants, tables, options.

    Built once from :class:`PackInfo` and :class:`SocOptions` by :meth:`build`.
    """

    packs: PackInfo
    options: SocOptions
    chemistries: tuple[CellChemistry, ...]
    table: F64  # (n_chem * GRID_POINTS, _N_COLS)
    row: IP  # (P,) first table row of the pack's chemistry
    inv_q_as: F64  # (P,) 1 / capacity prior in A·s
    eta: F64
    tau_s: F64
    tau2_s: F64
    gamma: F64
    r0_ref_ohm: F64  # (P,) per cell at 25 °C, 50 % SoC, incl. connector share
    r1_ref_ohm: F64
    r2_ref_ohm: F64  # (P,) zero for a one-RC chemistry
    r_scale0: F64  # (P,) prior of the resistance scale, from the SoH prior
    r_series_cell_ohm: F64
    # The chemistry's temperature factor, ln f = tf_const + tf_slope * u + sum_j
    # tf_changes[:, j] * max(u - tf_knots[:, j], 0) with u = 1/T - 1/T_ref
    # (CellChemistry.temp_factor_hinges), padded with zero changes to the site's most knots.
    tf_const: F64  # (P,)
    tf_slope: F64  # (P,) K
    tf_knots: F64  # (P, J) 1/K
    tf_changes: F64  # (P, J) K
    inv_series: F64
    v_low_v: F64  # plausible mean cell voltage window
    v_high_v: F64
    r_voltage_white: F64  # white part of the mean-cell-voltage variance, V²
    r_cell_white: F64  # white part of the cell-minus-mean variance, V²
    temp_lo_c: F64
    temp_hi_c: F64
    c_rate_max: F64
    soc_lo: F64
    soc_hi: F64
    rated_group_ah: F64
    pack_enum: pl.Enum
    inverse_ocv: _soc_filter.InverseOcv  # the chemistries' OCV tables for inversion
    consts: _soc_filter.Consts  # the options as the compiled filter reads them

    @classmethod
    def build(cls, packs: PackInfo, options: SocOptions) -> SocParams:
        """Derive the per-pack constants.

        Args:
            packs: the packs.
            options: the filter options.

        Returns:
            The parameters.
        """
        names = tuple(sorted(set(packs.chemistry)))
        chems = tuple(get_chemistry(n) for n in names)
        index = np.array([names.index(c) for c in packs.chemistry], dtype=np.intp)

        def per_pack(getter: Any) -> F64:
            out: F64 = np.array([getter(c) for c in chems], dtype=np.float64)[index]
            return out

        hinges = [c.temp_factor_hinges() for c in chems]
        n_knots = max(h[2].size for h in hinges)
        knots = np.zeros((len(chems), n_knots))
        changes = np.zeros((len(chems), n_knots))
        for k, (_, _, knot, change) in enumerate(hinges):
            knots[k, : knot.size] = knot
            changes[k, : change.size] = change

        rated = packs.rated_group_ah
        series = packs.series.astype(np.float64)
        o = options
        r_voltage_white = (o.voltage_noise_v**2 + o.voltage_quantum_v**2 / 12.0) / series**2
        # cell_v - voltage_v / series: both readings' noise (a one-cell pack reads itself twice).
        cell_white = o.cell_voltage_noise_v**2 + o.cell_voltage_quantum_v**2 / 12.0
        r_cell_white = cell_white + np.where(packs.series > 1, r_voltage_white, 0.0)
        v_min = per_pack(lambda c: c.v_min_v)
        v_max = per_pack(lambda c: c.v_max_v)
        arrays: dict[str, Any] = {
            "row": (index * GRID_POINTS).astype(np.intp),
            "inv_q_as": 1.0 / (packs.capacity_ah * _S_PER_H),
            "eta": per_pack(lambda c: c.coulombic_efficiency),
            "tau_s": per_pack(lambda c: c.tau1_s),
            "tau2_s": per_pack(lambda c: c.tau2_s),
            "gamma": per_pack(lambda c: c.hyst_rate_per_as),
            "r0_ref_ohm": per_pack(lambda c: c.r0_ohm_ah) / rated * (1.0 + o.connector_share),
            "r1_ref_ohm": per_pack(lambda c: c.r1_ohm_ah) / rated,
            "r2_ref_ohm": per_pack(lambda c: c.r2_ohm_ah) / rated,
            # Resistance grows with fade (BATTERY_NOTES 3: about +30 % at 20 % fade).
            "r_scale0": 1.0 + EMPIRICAL_R_PER_FADE * np.clip(1.0 - packs.capacity_ah / rated, 0.0, 0.5),
            "r_series_cell_ohm": packs.series_r_ohm / series,
            "tf_const": np.array([h[0] for h in hinges], dtype=np.float64)[index],
            "tf_slope": np.array([h[1] for h in hinges], dtype=np.float64)[index],
            "tf_knots": knots[index],
            "tf_changes": changes[index],
            "inv_series": 1.0 / series,
            "v_low_v": v_min - 0.5,
            "v_high_v": v_max + 0.5,
            "r_voltage_white": r_voltage_white,
            "r_cell_white": r_cell_white,
            "temp_lo_c": per_pack(lambda c: c.validity.temp_c[0]),
            "temp_hi_c": per_pack(lambda c: c.validity.temp_c[1]),
            "c_rate_max": per_pack(lambda c: c.validity.c_rate_max),
            "soc_lo": per_pack(lambda c: c.validity.soc[0]),
            "soc_hi": per_pack(lambda c: c.validity.soc[1]),
            "rated_group_ah": rated,
        }
        frozen = {k: _frozen(v, np.intp if k == "row" else np.float64) for k, v in arrays.items()}
        return cls(
            packs=packs,
            options=options,
            chemistries=chems,
            table=_tables(chems),
            pack_enum=pl.Enum(list(packs.pack_ids)),
            inverse_ocv=_inverse_ocv(chems),
            consts=_consts(options),
            **frozen,
        )


def _inverse_ocv(chemistries: Sequence[CellChemistry]) -> _soc_filter.InverseOcv:
    """The chemistries' own OCV tables (what :meth:`CellChemistry.soc_from_ocv` interpolates), padded to one width."""
    width = max(c.ocv_v.size for c in chemistries)
    ocv = np.zeros((len(chemistries), width))
    soc = np.zeros((len(chemistries), width))
    for k, c in enumerate(chemistries):
        ocv[k, : c.ocv_v.size] = c.ocv_v
        soc[k, : c.soc_grid.size] = c.soc_grid
    size = np.array([c.ocv_v.size for c in chemistries], dtype=np.int64)
    return _soc_filter.InverseOcv(_frozen(ocv, np.float64), _frozen(soc, np.float64), _frozen(size, np.int64))


def _consts(o: SocOptions) -> _soc_filter.Consts:
    """The options turned into the variances the filter adds (per second, per unit, ...) and its limits."""
    values = {
        "soc_rw2_per_s": o.soc_drift_per_sqrt_h**2 / _S_PER_H,
        "offset_rw2_per_s": o.current_offset_rw_a_per_sqrt_h**2 / _S_PER_H,
        "r_rw2_per_s": o.resistance_rw_per_sqrt_h**2 / _S_PER_H,
        "capacity2": o.capacity_error**2 * o.capacity_error_coherence,
        "gap2_per_s2": (o.gap_current_sd_c / _S_PER_H) ** 2,
        "current2": o.current_noise_a**2,
        "resistance2": o.resistance_model_error**2,
        "spread2": o.cell_resistance_spread**2,
        "ocv2": o.ocv_error_v**2,
        "cell_ocv2": o.cell_ocv_error_v**2,
        "cell_rw2": o.cell_offset_rw**2,
        "cell_rate_rw2": o.cell_rate_rw**2,
        "cell_r_rw2_per_s": o.cell_r_rw_per_sqrt_h**2 / _S_PER_H,
        "hyst_error": o.hyst_error,
        "conn_frac": o.connector_share / (1.0 + o.connector_share),
        "max_gap_s": o.max_gap_s,
        "ocv_error_corr_s": o.ocv_error_corr_s,
        "ocv_error_corr_soc": o.ocv_error_corr_soc,
        "t_ref_k": REFERENCE_TEMP_C + 273.15,
    }
    # Floats, whatever the options were given as: an int would compile the kernel once more.
    return _soc_filter.Consts(**{k: float(v) for k, v in values.items()})


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class SocState:
    """The filter's state for every pack: immutable (read-only arrays), safe to keep as a snapshot.

    Attributes:
        pack_ids: the packs the rows belong to (checked on restore).
        x: ``(P, 6)`` state mean ``[soc, v_rc1_v, v_rc2_v, hyst, current_offset_a, r_scale]``.
        cov: ``(P, 6, 6)`` state covariance.
        cell_x: ``(P, 2, 3)`` the weakest (``[:, 0]``) and the strongest (``[:, 1]``) cell
            group: SoC minus ``soc``, rate (``d soc_cell / d soc - 1``) and resistance
            relative to the mean cell's, less one.
        cell_cov: ``(P, 2, 3, 3)`` their covariances (the offset's variance is at or above the
            prior's until cell voltages arrive).
        last_ts_ms: ``(P,)`` event time of the last processed sample, -1 before the first.
        last_current_a: ``(P,)`` last finite measured current, A (held over the next interval).
        last_temp_c: ``(P,)`` last finite temperature, °C.
        n_samples: ``(P,)`` samples processed.
        n_duplicate: ``(P,)`` rows ignored because their ``(pack, ts_ms)`` was already seen.
        n_late: ``(P,)`` rows ignored because they were older than the last processed sample.
        n_gap: ``(P,)`` intervals longer than ``max_gap_s``.
        n_skipped: ``(P,)`` samples whose voltage was NaN or implausible (no measurement update).
        n_ignored: rows ignored: unknown packs or no timestamp.
        watermark_ms: newest event time processed, -1 before the first.
    """

    pack_ids: tuple[str, ...]
    x: F64
    cov: F64
    cell_x: F64
    cell_cov: F64
    last_ts_ms: I64
    last_current_a: F64
    last_temp_c: F64
    n_samples: I64
    n_duplicate: I64
    n_late: I64
    n_gap: I64
    n_skipped: I64
    n_ignored: int
    watermark_ms: int

    _ARRAYS: ClassVar[tuple[tuple[str, tuple[int, ...], type[np.generic]], ...]] = (
        ("x", (_N_STATES,), np.float64),
        ("cov", (_N_STATES, _N_STATES), np.float64),
        ("cell_x", (2, _N_CELL), np.float64),
        ("cell_cov", (2, _N_CELL, _N_CELL), np.float64),
        ("last_ts_ms", (), np.int64),
        ("last_current_a", (), np.float64),
        ("last_temp_c", (), np.float64),
        ("n_samples", (), np.int64),
        ("n_duplicate", (), np.int64),
        ("n_late", (), np.int64),
        ("n_gap", (), np.int64),
        ("n_skipped", (), np.int64),
    )

    def __post_init__(self) -> None:
        """Freeze every array (copies are made only for arrays that are still writeable)."""
        for name, _, dtype in self._ARRAYS:
            arr = getattr(self, name)
            if not (isinstance(arr, np.ndarray) and arr.dtype == dtype and not arr.flags.writeable):
                object.__setattr__(self, name, _frozen(arr, dtype))

    @property
    def n_packs(self) -> int:
        """Number of packs."""
        return int(self.x.shape[0])

    def check_fits(self, pack_ids: tuple[str, ...]) -> None:
        """Raise unless this state belongs to ``pack_ids`` and every array has the documented shape.

        Raises:
            EstimatorError: for other packs or the first array of the wrong shape.
        """
        if self.pack_ids != pack_ids:
            msg = f"the state is for {len(self.pack_ids)} other packs, not these {len(pack_ids)}"
            raise EstimatorError(msg)
        n_packs = len(pack_ids)
        for name, tail, _ in self._ARRAYS:
            shape = getattr(self, name).shape
            if shape != (n_packs, *tail):
                msg = f"SocState.{name} has shape {shape}, expected {(n_packs, *tail)}"
                raise EstimatorError(msg)


def initial_state(params: SocParams) -> SocState:
    """Return the prior: every pack at its SoC prior, no RC voltages, no hysteresis, no offset.

    The resistance scale starts at its prior from the SoH prior, the extreme cells at the
    mean cell (no offset, the same rate and resistance).

    The slow RC voltage's prior variance is zero for packs whose chemistry has no slow pair.

    Args:
        params: the filter parameters.

    Returns:
        The state before any sample.
    """
    p = params.packs
    o = params.options
    n = p.n_packs
    x = np.zeros((n, _N_STATES))
    # A prior to be centred on the first reading waits at mid-range until that reading.
    x[:, _SOC] = np.where(np.isnan(p.soc0), 0.5, p.soc0)
    cov = np.zeros((n, _N_STATES, _N_STATES))
    cov[:, _SOC, _SOC] = p.soc0_std**2
    cov[:, _V1, _V1] = o.v_rc0_std_v**2
    cov[:, _V2, _V2] = np.where(params.r2_ref_ohm > 0.0, o.v_rc0_std_v**2, 0.0)
    cov[:, _HY, _HY] = o.hyst0_std**2
    cov[:, _OFF, _OFF] = o.current_offset_sd_a**2
    x[:, _RS] = params.r_scale0
    cov[:, _RS, _RS] = (o.resistance_error * params.r_scale0) ** 2
    cell_cov = np.zeros((n, 2, _N_CELL, _N_CELL))
    cell_cov[:, :, _CD, _CD] = o.cell_offset0_std**2
    cell_cov[:, :, _CR, _CR] = o.cell_rate0_std**2
    cell_cov[:, :, _CX, _CX] = o.cell_r0_std**2
    zeros = np.zeros(n, dtype=np.int64)
    return SocState(
        pack_ids=p.pack_ids,
        x=x,
        cov=cov,
        cell_x=np.zeros((n, 2, _N_CELL)),
        cell_cov=cell_cov,
        last_ts_ms=np.full(n, _NO_TS, dtype=np.int64),
        last_current_a=np.zeros(n),
        last_temp_c=np.full(n, REFERENCE_TEMP_C),
        n_samples=zeros,
        n_duplicate=zeros,
        n_late=zeros,
        n_gap=zeros,
        n_skipped=zeros,
        n_ignored=0,
        watermark_ms=_NO_TS,
    )


# ------------------------------------------------------------------------------------------------
# Batch -> (k, pack) arrays
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class SocSamples:
    """A batch reshaped for the filter: the *k*-th new sample of every active pack in row ``k``.

    Attributes:
        packs: ``(A,)`` indices of the packs with at least one new sample.
        mask: ``(K, A)`` True where pack ``packs[a]`` has a *k*-th new sample.
        ts_ms: ``(K, A)`` event times (undefined where ``mask`` is False).
        voltage_v: ``(K, A)`` pack voltage, V (NaN where missing).
        current_a: ``(K, A)`` measured current, A, positive on discharge.
        temp_c: ``(K, A)`` temperature (``temp_avg_c``), °C.
        cell_v_min_v: ``(K, A)`` lowest cell voltage, V.
        cell_v_max_v: ``(K, A)`` highest cell voltage, V.
        n_duplicate: ``(P,)`` duplicated rows found per pack.
        n_late: ``(P,)`` late rows found per pack.
        n_ignored: rows of unknown packs or without a timestamp.
    """

    packs: IP
    mask: B
    ts_ms: I64
    voltage_v: F64
    current_a: F64
    temp_c: F64
    cell_v_min_v: F64
    cell_v_max_v: F64
    n_duplicate: I64
    n_late: I64
    n_ignored: int


def samples_from_frame(batch: pl.DataFrame, params: SocParams, last_ts_ms: I64) -> tuple[SocSamples, ...]:
    """Reshape a telemetry batch into :class:`SocSamples`, dropping duplicates and late rows.

    Usually one grid. When the packs' sample counts differ so much that one ``(k, pack)``
    grid would be mostly empty (one pack's day of samples beside others' single rows), the
    packs are split into groups whose counts are within a factor of two, one grid each;
    packs are independent, so :func:`step` can take the groups in any order.

    Args:
        batch: rows with the contract's PackTelemetry columns (at least ``REQUIRED_COLUMNS``).
        params: the filter parameters (for the pack index).
        last_ts_ms: ``(P,)`` event time of each pack's last processed sample (-1: none).

    Returns:
        The samples, in event-time order per pack; the first carries the batch's counters.

    Raises:
        EstimatorError: if a required column is missing.
    """
    check_columns(batch, REQUIRED_COLUMNS, estimator="SocEstimator")
    n_packs = params.packs.n_packs
    nan = pl.lit(np.nan, dtype=pl.Float64)
    optional = [
        pl.col(c).cast(pl.Float64).fill_null(np.nan) if c in batch.columns else nan.alias(c) for c in OPTIONAL_COLUMNS
    ]
    frame = batch.select(
        pl.col("pack").cast(pl.String).cast(params.pack_enum, strict=False).to_physical().cast(pl.Int64).fill_null(-1),
        pl.col("ts_ms").cast(pl.Int64).fill_null(_NO_TS),
        *(pl.col(c).cast(pl.Float64).fill_null(np.nan) for c in REQUIRED_COLUMNS[2:]),
        *optional,
    )
    pidx = frame.get_column("pack").to_numpy()
    ts = frame.get_column("ts_ms").to_numpy()
    known = (pidx >= 0) & (ts >= 0)
    n_ignored = int(np.count_nonzero(~known))
    order = group_time_order(pidx, ts)
    order = order[known[order]]
    pidx, ts = pidx[order], ts[order]
    # Duplicates within the batch: the first row of each (pack, ts) in the batch's order wins.
    repeat = np.zeros(pidx.size, dtype=bool)
    repeat[1:] = (pidx[1:] == pidx[:-1]) & (ts[1:] == ts[:-1])
    last = last_ts_ms[pidx]
    seen = ts == last
    late = ts < last
    n_duplicate = np.bincount(pidx[repeat | seen], minlength=n_packs).astype(np.int64)
    n_late = np.bincount(pidx[late & ~repeat], minlength=n_packs).astype(np.int64)
    keep = ~(repeat | seen | late)
    order, pidx = order[keep], pidx[keep]
    counts = np.bincount(pidx, minlength=n_packs)
    active = np.flatnonzero(counts).astype(np.intp)
    k_max = int(counts.max()) if pidx.size else 0
    groups = [active]
    if k_max * active.size > 2 * pidx.size + _SPARSE_SLACK:
        octave = np.floor(np.log2(counts[active])).astype(np.int64)
        groups = [active[octave == o] for o in np.unique(octave)[::-1]]
    out = []
    for g, packs in enumerate(groups):
        member = np.zeros(n_packs, dtype=bool)
        member[packs] = True
        rows = member[pidx] if len(groups) > 1 else slice(None)
        grids = _grids(frame, order[rows], pidx[rows], packs, counts)
        zeros = np.zeros(n_packs, dtype=np.int64)
        out.append(
            SocSamples(
                packs=packs,
                **grids,
                n_duplicate=n_duplicate if g == 0 else zeros,
                n_late=n_late if g == 0 else zeros,
                n_ignored=n_ignored if g == 0 else 0,
            )
        )
    return tuple(out)


def _grids(frame: pl.DataFrame, order: IP, pidx: I64, packs: IP, counts: I64) -> dict[str, Any]:
    """Lay the rows ``order`` (sorted by pack, then time) of ``packs`` out as ``(k, pack)`` grids."""
    n_packs = counts.size
    local = np.zeros(n_packs, dtype=np.intp)
    local[packs] = np.arange(packs.size)
    first = np.zeros(n_packs, dtype=np.intp)  # position of each pack's first row within ``order``
    first[packs] = np.concatenate([[0], np.cumsum(counts[packs])[:-1]]) if packs.size else []
    rank = np.arange(pidx.size) - first[pidx]
    k_max = int(counts[packs].max()) if packs.size else 0
    shape = (k_max, packs.size)
    # The source row of every (k, pack) cell, -1 where a pack has fewer samples. Frames that
    # arrive in (ts, pack) order map onto the grid unchanged, and the gathers are sequential.
    src = np.full(k_max * packs.size, -1, dtype=np.intp)
    src[rank * packs.size + local[pidx]] = order
    filled = src >= 0
    complete = bool(filled.all())
    if not complete:
        src[~filled] = 0
    mask = filled.reshape(shape)
    identity = complete and src.size == frame.height and bool(np.all(src[1:] > src[:-1]))

    def grid(name: str) -> Any:
        values = frame.get_column(name).to_numpy()
        if identity:
            return values.reshape(shape)
        out = values[src].reshape(shape)
        if not complete and out.dtype.kind == "f":
            out[~mask] = np.nan
        return out

    return {
        "mask": mask,
        "ts_ms": grid("ts_ms"),
        "voltage_v": grid("voltage_v"),
        "current_a": grid("current_a"),
        "temp_c": grid("temp_avg_c"),
        "cell_v_min_v": grid("cell_v_min_v"),
        "cell_v_max_v": grid("cell_v_max_v"),
    }


# ------------------------------------------------------------------------------------------------
# The filter
# ------------------------------------------------------------------------------------------------


def _lookup(table: F64, row: IP, soc: F64) -> tuple[F64, F64]:
    """Gather the table rows around ``soc`` (clipped to [0, 1]); return them and the fraction."""
    s = np.clip(soc, 0.0, 1.0)
    s *= GRID_POINTS - 1
    k = s.astype(np.intp)
    np.minimum(k, GRID_POINTS - 2, out=k)
    frac: F64 = s - k
    k += row
    rows: F64 = table.take(k, axis=0)
    return rows, frac


def _col(rows: F64, frac: F64, c: int) -> F64:
    out: F64 = rows[:, c] + rows[:, c + 1] * frac
    return out


def step(state: SocState, samples: SocSamples, params: SocParams) -> SocState:
    """Run the filter over a reshaped batch and return the new state (pure: the inputs are not modified).

    The recursion runs compiled, one pass over each active pack's samples
    (:func:`twin.estimators._soc_filter.run`), on copies of the active packs' rows.

    Args:
        state: the state before the batch.
        samples: the batch, from :func:`samples_from_frame` on this state.
        params: the filter parameters.

    Returns:
        The state after the batch.
    """
    act = samples.packs
    if act.size == 0:
        return _with_counters(state, samples)
    x, cov, cell_x, cell_cov = state.x[act], state.cov[act], state.cell_x[act], state.cell_cov[act]
    last_ts, last_i, last_t = state.last_ts_ms[act], state.last_current_a[act], state.last_temp_c[act]
    # Packs whose SoC prior is still to be centred on their first valid reading.
    pending = np.isnan(params.packs.soc0[act]) & (state.n_samples[act] == state.n_skipped[act])
    counts = samples.mask.sum(axis=0, dtype=np.int64)
    out = np.zeros((act.size, 3), dtype=np.int64)
    grids = _soc_filter.Samples(
        *(_readonly(getattr(samples, f)) for f in _soc_filter.Samples._fields),
    )
    owner = {"soc0_std": params.packs}  # the rest are SocParams' own
    packs = _soc_filter.PackConsts(
        *(_readonly(getattr(owner.get(f, params), f)[act]) for f in _soc_filter.PackConsts._fields)
    )
    _soc_filter.run(
        x, cov, cell_x, cell_cov, last_ts, last_i, last_t, pending, counts, out,
        grids, packs, params.table, params.inverse_ocv, params.consts,
    )  # fmt: skip

    def put(old: Any, new: Any) -> Any:
        return scattered(old, act, new)

    return SocState(
        pack_ids=state.pack_ids,
        x=put(state.x, x),
        cov=put(state.cov, cov),
        cell_x=put(state.cell_x, cell_x),
        cell_cov=put(state.cell_cov, cell_cov),
        last_ts_ms=put(state.last_ts_ms, last_ts),
        last_current_a=put(state.last_current_a, last_i),
        last_temp_c=put(state.last_temp_c, last_t),
        n_samples=put(state.n_samples, state.n_samples[act] + out[:, 2]),
        n_duplicate=state.n_duplicate + samples.n_duplicate,
        n_late=state.n_late + samples.n_late,
        n_gap=put(state.n_gap, state.n_gap[act] + out[:, 0]),
        n_skipped=put(state.n_skipped, state.n_skipped[act] + out[:, 1]),
        n_ignored=state.n_ignored + samples.n_ignored,
        watermark_ms=max(state.watermark_ms, int(samples.ts_ms[samples.mask].max())),
    )


def _readonly(values: Any) -> Any:
    """A read-only view: the kernel is compiled for read-only inputs, whatever their origin."""
    view = values.view()
    view.flags.writeable = False
    return view


def _with_counters(state: SocState, samples: SocSamples) -> SocState:
    """The state with a sample-free batch's counters added."""
    return SocState(
        pack_ids=state.pack_ids,
        x=state.x,
        cov=state.cov,
        cell_x=state.cell_x,
        cell_cov=state.cell_cov,
        last_ts_ms=state.last_ts_ms,
        last_current_a=state.last_current_a,
        last_temp_c=state.last_temp_c,
        n_samples=state.n_samples,
        n_duplicate=state.n_duplicate + samples.n_duplicate,
        n_late=state.n_late + samples.n_late,
        n_gap=state.n_gap,
        n_skipped=state.n_skipped,
        n_ignored=state.n_ignored + samples.n_ignored,
        watermark_ms=state.watermark_ms,
    )


# ------------------------------------------------------------------------------------------------
# Estimate
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class SocEstimate:
    """Every pack's SoC estimate at its last processed sample (arrays in ``pack_ids`` order).

    Attributes:
        pack_ids: pack identifiers.
        ts_ms: event time of the last processed sample, -1 if none.
        soc: mean SoC of the pack's cell groups, fraction in [0, 1].
        soc_std: its standard deviation (from the filter's covariance), fraction.
        soc_min_cell: SoC of the weakest cell group, or NaN without ``cell_v_min_v`` data.
        soc_max_cell: SoC of the strongest cell group, or NaN without ``cell_v_max_v`` data.
        soc_usable: the string's usable SoC: the charge it still holds (its first cell to
            empty's) over that plus the room it has left (its first cell to fill's; module
            docstring); equal to ``soc`` without cell-voltage data.
        soc_usable_std: its standard deviation, fraction: the mean's and the extreme cells'
            offsets' and rates' carried through the usable SoC's formula to first order (the
            usable swing is narrower than the mean cell's, so the mean's error counts for more,
            except where one cell sets both ends).
        soc_usable_std_shared: the part of ``soc_usable_std`` an error of the chemistry's
            OCV table, common to its packs, can cause, fraction: the mean cell's SoC error up
            to ``ocv_error_v`` over the OCV slope at its SoC, through the usable SoC's formula
            (each pack's extreme cells are its own).
        current_offset_a: estimated current-sensor offset (the sensor reads true + offset), A.
        flags: :class:`SocFlag` bitmask per pack.
    """

    pack_ids: tuple[str, ...]
    ts_ms: I64
    soc: F64
    soc_std: F64
    soc_min_cell: F64
    soc_max_cell: F64
    soc_usable: F64
    soc_usable_std: F64
    soc_usable_std_shared: F64
    current_offset_a: F64
    flags: I64

    def flag_names(self, pack: str) -> tuple[str, ...]:
        """Return the names of the flags raised for ``pack`` (lower case, e.g. ``"lfp_plateau"``).

        Args:
            pack: a pack id.

        Returns:
            The flag names, in bit order.

        Raises:
            EstimatorError: for an unknown pack id.
        """
        try:
            i = self.pack_ids.index(pack)
        except ValueError as exc:
            msg = f"unknown pack {pack!r}"
            raise EstimatorError(msg) from exc
        value = int(self.flags[i])
        return tuple(str(f.name).lower() for f in SocFlag if f.value and value & f.value)

    def to_frame(self) -> pl.DataFrame:
        """Return the estimate as a frame, one row per pack (``flags`` as the integer bitmask)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pack_ids"}
        return pl.DataFrame({"pack": list(self.pack_ids), **data})


def _held_room(soc_min_cell: F64, soc_max_cell: F64, rate_min: F64, rate_max: F64) -> tuple[F64, F64, B, B]:
    """The string's charge and room, in units of the mean cell's capacity, and which cell sets each.

    Each extreme cell's capacity is the mean's over ``1 + its rate``; SoCs are clipped to [0, 1].
    The string is empty when the first of its cells is and full when the first is: ``held`` is
    the lesser of the two tracked cells' charges, ``room`` the lesser of their rooms. At the top
    of a charge the weakest cell, nearly level with the others by then but smaller, is full
    first: its room, not the fullest cell's, is the string's (the emulated second-life NMC packs
    read 1.1-1.4 % of usable SoC low at rest at 90 % with the fullest cell's room alone).

    Returns:
        held, room, whether the strongest cell sets ``held`` and whether the weakest sets ``room``.
    """
    s_min, s_max = np.clip(soc_min_cell, 0.0, 1.0), np.clip(soc_max_cell, 0.0, 1.0)
    k_min, k_max = 1.0 / (1.0 + rate_min), 1.0 / (1.0 + rate_max)
    held_min, held_max = s_min * k_min, s_max * k_max
    room_min, room_max = (1.0 - s_min) * k_min, (1.0 - s_max) * k_max
    held_by_max: B = held_max < held_min
    room_by_min: B = room_min < room_max
    return np.minimum(held_min, held_max), np.minimum(room_min, room_max), held_by_max, room_by_min


def _extreme_rates(rate: F64) -> tuple[F64, F64, B]:
    """The weakest and strongest cells' rates as the usable share reads them, and whether they make sense.

    ``rate``: ``(2, ...)``, the weakest cell's rate then the strongest's. The weakest cell is
    taken as one of less capacity than the mean (rate >= 0) and the strongest as one of more
    (rate <= 0), each within :data:`_MAX_RATE`: a settled tracker's rate across zero is its
    noise, and read as it is it shrank the usable swing (on a 2-day run at 30x aging the
    capacity came out 2 % high on the new NMC packs, whose cells differ by 1.5 %; SoH MAE 1.40
    points, 0.83 with the rates read on their side). ``plausible`` is False where a rate lies
    across zero by more than a little slack or beyond the bound: the coulomb count then leaves
    the share alone.
    """
    rate_min, rate_max = rate[0], rate[1]
    plausible: B = (
        (rate_min >= -_RATE_SLACK) & (rate_min <= _MAX_RATE) & (rate_max <= _RATE_SLACK) & (rate_max >= -_MAX_RATE)
    )
    return np.clip(rate_min, 0.0, _MAX_RATE), np.clip(rate_max, -_MAX_RATE, 0.0), plausible


def estimate_from_state(state: SocState, params: SocParams, *, now_ms: int | None = None) -> SocEstimate:
    """Compute the outputs and quality flags from a state (pure).

    Args:
        state: the filter state.
        params: the filter parameters.
        now_ms: reference time for staleness, ms; default: the newest event time processed.

    Returns:
        The estimate.
    """
    o = params.options
    soc_raw = state.x[:, _SOC]
    soc = np.clip(soc_raw, 0.0, 1.0)
    var = state.cov[:, _SOC, _SOC]
    soc_std = np.sqrt(np.maximum(var, 0.0))
    # The offsets' variances only grow until cell voltages arrive: at the prior's, no data yet.
    has_cells = state.cell_cov[:, :, _CD, _CD] < o.cell_offset0_std**2 * 0.999
    cx = state.cell_x
    s_min = np.where(has_cells[:, 0], np.clip(soc_raw + cx[:, 0, _CD], 0.0, 1.0), np.nan)
    s_max = np.where(has_cells[:, 1], np.clip(soc_raw + cx[:, 1, _CD], 0.0, 1.0), np.nan)
    # The string is empty when its first cell is, full when its first is (:func:`_held_room`):
    # usable SoC = the charge it still holds over that plus the room it has left, each cell's
    # capacity being the mean's over (1 + its rate).
    # Once a rate is known to within _SETTLED_RATE_STD it is read on its side of zero
    # (:func:`_extreme_rates`); before, as it is: clipping a noisy estimate would bias the first
    # hours' usable swing (nevada, Leaf packs, first two hours: 1.2 -> 1.9 %).
    raw = np.where(has_cells, cx[:, :, _CR], 0.0)
    sided_min, sided_max, _ = _extreme_rates(raw.T)
    settled = state.cell_cov[:, :, _CR, _CR] < _SETTLED_RATE_STD**2
    rate_min = np.where(settled[:, 0], sided_min, raw[:, 0])
    rate_max = np.where(settled[:, 1], sided_max, raw[:, 1])
    held, room, held_by_max, room_by_min = _held_room(
        np.where(np.isnan(s_min), soc, s_min), np.where(np.isnan(s_max), soc, s_max), rate_min, rate_max
    )
    denom = held + room
    ok = denom > 0.0
    d = np.where(ok, denom, 1.0)
    usable = np.where(ok, held / d, soc)
    # u = H / (H + R), H = s_a / (1 + rate_a) for the cell a that sets the charge, R = (1 - s_b)
    # / (1 + rate_b) for the cell b that sets the room (s_min and s_max = soc + their offsets):
    # the gradient times the (independent) variances. A cell moves u through its offset,
    # du/ds_c = ([c = a] R + [c = b] H) / (1 + rate_c) / d², and through its rate, du/drate_c =
    # ([c = b] - [c = a]) H R / (1 + rate_c) / d² (nothing when it sets both: u is then its own
    # SoC). A cell whose capacity is not yet known (a pack at rest since the start) leaves the
    # usable SoC open by that much (cold_lfp's NMC packs, six hours at rest: 1.2 % off with a
    # stated 0.18 % before the rates counted).
    a_min, b_max = ~held_by_max, ~room_by_min
    k_min, k_max = 1.0 / (1.0 + rate_min) / (d * d), 1.0 / (1.0 + rate_max) / (d * d)
    du_min = (np.where(a_min, room, 0.0) + np.where(room_by_min, held, 0.0)) * k_min
    du_max = (np.where(held_by_max, room, 0.0) + np.where(b_max, held, 0.0)) * k_max
    dr_min = (room_by_min.astype(np.float64) - a_min) * held * room * k_min
    dr_max = (b_max.astype(np.float64) - held_by_max) * held * room * k_max
    cc = state.cell_cov
    var_min = (
        du_min**2 * cc[:, 0, _CD, _CD] + 2.0 * du_min * dr_min * cc[:, 0, _CD, _CR] + dr_min**2 * cc[:, 0, _CR, _CR]
    )
    var_max = (
        du_max**2 * cc[:, 1, _CD, _CD] + 2.0 * du_max * dr_max * cc[:, 1, _CD, _CR] + dr_max**2 * cc[:, 1, _CR, _CR]
    )
    var_min = np.where(has_cells[:, 0], np.maximum(var_min, 0.0), 0.0)
    var_max = np.where(has_cells[:, 1], np.maximum(var_max, 0.0), 0.0)
    var_usable = (du_min + du_max) ** 2 * np.maximum(var, 0.0) + var_min + var_max
    usable_std = np.where(ok, np.sqrt(np.maximum(var_usable, 0.0)), soc_std)
    rows, frac = _lookup(params.table, params.row, soc_raw)
    slope = _col(rows, frac, _DOCV)
    # The part of the mean's error an error of the chemistry's OCV table causes: all of it
    # where the voltage set the SoC, at most the table's error over the OCV slope (LFP's
    # plateau: all; a steep NMC curve: 3 mV is 0.4 % of SoC, however wide the prior still is).
    from_table = np.minimum(soc_std, o.ocv_error_v / np.maximum(np.abs(slope), _MIN_SLOPE_V))
    shared_std = np.where(ok, (du_min + du_max) * from_table, from_table)
    started = state.last_ts_ms != _NO_TS
    ref = state.watermark_ms if now_ms is None else now_ms
    c_rate = np.abs(state.last_current_a) / params.rated_group_ah
    inside = (
        (state.last_temp_c >= params.temp_lo_c)
        & (state.last_temp_c <= params.temp_hi_c)
        & (c_rate <= params.c_rate_max)
        & (soc >= params.soc_lo)
        & (soc <= params.soc_hi)
    )
    flags = np.zeros(state.n_packs, dtype=np.int64)
    flags |= np.where(~started, int(SocFlag.NO_DATA), 0)
    flags |= np.where(started & (state.last_ts_ms < ref - o.stale_after_s * 1000.0), int(SocFlag.STALE), 0)
    flags |= np.where(started & ~inside, int(SocFlag.OUT_OF_VALIDITY), 0)
    flags |= np.where(soc_std > o.uncertain_soc_std, int(SocFlag.UNCERTAIN), 0)
    flags |= np.where(slope < o.plateau_slope_v, int(SocFlag.LFP_PLATEAU), 0)
    return SocEstimate(
        pack_ids=params.packs.pack_ids,
        ts_ms=_frozen(state.last_ts_ms, np.int64),
        soc=_frozen(soc, np.float64),
        soc_std=_frozen(soc_std, np.float64),
        soc_min_cell=_frozen(s_min, np.float64),
        soc_max_cell=_frozen(s_max, np.float64),
        soc_usable=_frozen(usable, np.float64),
        soc_usable_std=_frozen(usable_std, np.float64),
        soc_usable_std_shared=_frozen(shared_std, np.float64),
        current_offset_a=_frozen(state.x[:, _OFF], np.float64),
        flags=_frozen(flags, np.int64),
    )


# ------------------------------------------------------------------------------------------------
# The estimator
# ------------------------------------------------------------------------------------------------


@register
class SocEstimator(Estimator[SocState, SocEstimate]):
    """Track every pack's SoC with one extended Kalman filter per pack, run for all packs at once.

    The model, its tuning and how rows are handled (duplicates, late rows, gaps, NaN) are in
    the module docstring. The BMS's ``soc_bms`` is never used.

    Args:
        packs: the packs and their priors (see :meth:`PackInfo.from_meta`).
        options: noise model and data-quality rules.

    Examples:
        >>> import polars as pl
        >>> packs = PackInfo(
        ...     pack_ids=("p1",), chemistry=("nmc811",), rated_group_ah=[100.0], series=[96],
        ...     capacity_ah=[100.0], soc0=[0.5], soc0_std=[0.3], series_r_ohm=[0.0])
        >>> est = SocEstimator(packs)
        >>> est.estimate().flag_names("p1")
        ('uncertain', 'no_data')
        >>> minute_at_rest = pl.DataFrame({
        ...     "pack": ["p1"] * 60, "ts_ms": [1_767_225_600_000 + 1000 * k for k in range(60)],
        ...     "voltage_v": [388.3] * 60, "current_a": [0.0] * 60, "temp_avg_c": [25.0] * 60})
        >>> est.update(minute_at_rest)
        >>> e = est.estimate()
        >>> round(float(e.soc[0]), 3), round(float(e.soc_std[0]), 3), e.flag_names("p1")
        (0.804, 0.012, ())

    References:
        Plett, G. L. (2004). Extended Kalman filtering for battery management systems of
        LiPB-based HEV battery packs, Parts 1-3. J. Power Sources 134, 252-292.
    """

    input_columns: ClassVar[tuple[str, ...]] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

    def __init__(self, packs: PackInfo, *, options: SocOptions = SocOptions()) -> None:
        if not isinstance(packs, PackInfo):
            msg = f"packs must be a PackInfo, got {type(packs).__name__}"
            raise EstimatorError(msg)
        if not isinstance(options, SocOptions):
            msg = f"options must be a SocOptions (use SocOptions.from_dict for a mapping), got {type(options).__name__}"
            raise EstimatorError(msg)
        self.packs = packs
        self.options = options
        self._params = SocParams.build(packs, options)
        self._state = initial_state(self._params)

    @property
    def pack_ids(self) -> tuple[str, ...]:
        """The tracked packs, in the order of the estimate's arrays."""
        return self.packs.pack_ids

    @property
    def params(self) -> SocParams:
        """The derived filter parameters."""
        return self._params

    def update(self, batch: pl.DataFrame) -> None:
        """Fold a batch of PackTelemetry rows (any packs, any order) into the state.

        Args:
            batch: rows with at least ``pack``, ``ts_ms``, ``voltage_v``, ``current_a`` and
                ``temp_avg_c``; ``cell_v_min_v``/``cell_v_max_v`` are used when present.

        Raises:
            EstimatorError: if a required column is missing.
        """
        state = self._state
        for samples in samples_from_frame(batch, self._params, state.last_ts_ms):
            state = step(state, samples, self._params)
        self._state = state

    def estimate(self, *, now_ms: int | None = None) -> SocEstimate:
        """Return every pack's estimate.

        Args:
            now_ms: reference time for the ``stale`` flag, ms (default: the newest event time
                processed; the estimator never reads a clock).

        Returns:
            The estimate.
        """
        return estimate_from_state(self._state, self._params, now_ms=now_ms)

    def snapshot(self) -> SocState:
        """Return the current state (immutable)."""
        return self._state

    def restore(self, state: SocState) -> None:
        """Resume from a snapshot.

        Args:
            state: a state from :meth:`snapshot` of an estimator with the same packs.

        Raises:
            EstimatorError: if the state is not a :class:`SocState` for these packs.
        """
        if not isinstance(state, SocState):
            msg = f"cannot restore a {type(state).__name__} into a SocEstimator"
            raise EstimatorError(msg)
        state.check_fits(self.packs.pack_ids)
        self._state = state

    def clone(self) -> Self:
        """Return an estimator with the same packs and options and a fresh state."""
        return type(self)(self.packs, options=self.options)

    def counters(self) -> dict[str, int]:
        """Return the data-quality counters summed over packs."""
        s = self._state
        return {
            "samples": int(s.n_samples.sum()),
            "duplicate": int(s.n_duplicate.sum()),
            "late": int(s.n_late.sum()),
            "gap": int(s.n_gap.sum()),
            "skipped": int(s.n_skipped.sum()),
            "ignored": s.n_ignored,
        }

    @classmethod
    def from_meta(
        cls,
        meta: pl.DataFrame,
        *,
        options: SocOptions = SocOptions(),
        soh_prior: Mapping[str, float] | None = None,
        soc0: float | None = None,
        soc0_std: float = 0.3,
    ) -> Self:
        """Build the estimator for the packs of a pack_meta frame (see :meth:`PackInfo.from_meta`).

        Args:
            meta: one row per pack, the contract's pack_meta columns.
            options: noise model and data-quality rules.
            soh_prior: SoH priors by pack id (default: the meta's ``intake_soh``, else 1).
            soc0: initial SoC prior of every pack (None: 50 %, or the pack's first reading
                where it leaves the SoC open, see :attr:`PackInfo.soc0`).
            soc0_std: its standard deviation.

        Returns:
            The estimator.
        """
        packs = PackInfo.from_meta(meta, soh_prior=soh_prior, soc0=soc0, soc0_std=soc0_std)
        return cls(packs, options=options)

    def __repr__(self) -> str:
        """Return a one-line summary."""
        chems = ", ".join(sorted(set(self.packs.chemistry)))
        custom = {k: v for k, v in asdict(self.options).items() if v != getattr(_DEFAULT_OPTIONS, k)}
        return f"SocEstimator({self.packs.n_packs} packs: {chems}; options={custom or 'default'})"


_DEFAULT_OPTIONS: Final = SocOptions()
