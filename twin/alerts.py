"""Alerts: thresholds with hysteresis and duration, cell imbalance, offline packs, model residuals, energy balance.

:class:`AlertEngine` is pure (no I/O, no clock) and vectorised over packs. The service
(:mod:`twin.app`) and the offline replay (:func:`alerts_from_run`) feed it the same way:
after :meth:`twin.state.TwinCore.ingest`, :meth:`AlertEngine.update` takes the batch's
accepted telemetry and site rows with the core, and returns the alerts that were raised or
cleared (:class:`twin.contract.Alert`).

**Event time, on a fixed grid.** Rows are folded per pack as they come (per-pack aggregates
of the rows between two grid times: last values, mean power and temperature, sequence
gaps, when each signal last changed); conditions are evaluated for every pack and every
kind at once, with numpy, at the grid times ``k * evaluate_every_s`` of event time, up to
the newest event time seen less a small settling allowance (``settle_s``, for rows of
other packs still in flight). So the alerts do not depend on how the telemetry was cut
into batches; the grid is absolute, hence the same live and in replay. Python runs per
alert only when one changes state, which is rare.

**Hysteresis and duration**, per (pack, kind): a kind's condition must hold on every grid
time for its minimum duration before the alert is raised; once raised, its clear condition
(the value back beyond the threshold *minus the hysteresis*) must hold for its clear
duration before it is cleared. Missing data (an offline pack's threshold checks) holds the
state: an alert is never cleared for want of data, nor raised. Each alert is therefore
raised once and cleared once, with one ``alert_id`` for both.

Alert kinds (``value`` and ``threshold`` units in brackets):

====================  ========  ==========================================================================
kind                  severity  raised when
====================  ========  ==========================================================================
cell_overvoltage      critical  ``cell_v_max_v`` above the chemistry's threshold (V); names the cell
cell_undervoltage     critical  ``cell_v_min_v`` below the chemistry's threshold (V); names the cell
over_temperature      critical  ``temp_max_c`` above the chemistry's threshold (°C)
temperature_rise      warning   ``temp_max_c`` rising faster than the threshold over ``rise_window_s`` (°C/min)
over_current          warning   current beyond ``current_limit_factor`` times the pack's limit (A)
cell_imbalance        warning   the extreme cell (lowest or highest) farther from the pack's mean cell
                                voltage (``voltage_v / series``) than the chemistry's threshold (V);
                                names that cell (the whole spread is used while the series count is unknown)
pack_offline          warning   the gateway says offline, or no telemetry for ``stale_after_s``;
                                ``value`` is the share of the site's rated energy the pack takes away
contactor_open        warning   the pack reports its contactor open (unavailable); ``value`` as above
telemetry_loss        warning   the share of telemetry lost (gaps in ``seq``) above the threshold
sensor_stuck          warning   a reading (pack voltage, current, temperature, extreme cell voltages)
                                unchanged for ``stuck_after_s`` while the pack reports (s)
model_residual        warning   the pack voltage against the SoC filter's model (below) beyond
                                ``voltage_residual_v`` per cell, sustained (V per cell)
thermal_residual      critical  the pack temperature above what its peers and its own history predict
                                (below) by ``thermal_residual_c``, sustained (°C)
energy_balance        warning   site level: the sum of the online packs' power against the site
                                meter's ``battery_w`` off by more than ``max(energy_balance_min_w,
                                energy_balance_fraction * |battery_w|)`` beyond its learnt offset (W);
                                the pack whose power share stepped with it is named when it is clear
====================  ========  ==========================================================================

Residuals and the anomaly score:

* **Voltage** (``model_residual``): the measured mean cell voltage (``voltage_v / series``)
  against the SoC filter's model at its own state, ``OCV(soc) + H(soc) hyst - r_scale (R0 i +
  v_rc1 + v_rc2) - R_series i`` (:mod:`twin.estimators.soc`), read from the filter's public
  state and parameters after each batch, smoothed by an EWMA in event time (``residual_tau_s``).
  The filter corrects itself on every sample, so what remains is what its model cannot
  explain: a pack-voltage sensor offset or a step, a cell that sags beyond any resistance.
  A persistent offset is absorbed into the filter's SoC within the better part of an hour
  (measured: a +4 V offset on a 96-cell pack raised after 5 min, cleared after 40), and its
  removal is a step of its own. This residual is read once per batch (the filter's state
  after it), so unlike the rest it may move slightly with the batching.
* **Thermal** (``thermal_residual``): ``temp_avg_c`` and ``temp_max_c`` (the hot spot), each
  minus the median of the online packs of the same chemistry (they share the weather and
  the dispatch), smoothed (``thermal_smooth_tau_s``), less the pack's own long-run offset (an
  EWMA over ``thermal_baseline_tau_s``, which learns ten times slower while the residual is
  large, so a fault is not learnt away); the larger of the two. A soft internal short heats
  a pack that its current does not explain; where the container's cooling holds the mean
  down, the sensor nearest the short still sees it.
* The per-pack **anomaly score** (:meth:`AlertEngine.anomaly_scores`, the ``anomaly_score``
  field of ``pack_state``) is the largest of the voltage and thermal residuals and the cell
  imbalance, each over its alert threshold: 0 is normal, 1 is where an alert is raised.

What each injected fault of the emulator (:mod:`emulators.scenario`) should raise (checked
by ``tests/test_alerts.py`` on a reduced nevada run with every kind):

===========================  ===========================================================
fault kind                   alert kinds that detect it
===========================  ===========================================================
weak_cell                    cell_imbalance (names the cell); cell_under/overvoltage, model_residual
sensor_offset                energy_balance (current), model_residual (pack voltage),
                             cell_imbalance (cell voltage), thermal_residual (temperature)
sensor_stuck                 sensor_stuck; thermal_residual, model_residual (the frozen reading drifts
                             away from its peers or the model)
telemetry_dropout            telemetry_loss; pack_offline when the loss is total
gateway_offline              pack_offline
contactor_open               contactor_open
thermal_runaway_precursor    thermal_residual; temperature_rise, over_temperature later
===========================  ===========================================================

(:data:`FAULT_ALERT_KINDS`, used by :func:`twin.evaluate.alert_scores`.)

Examples:
    >>> engine = AlertEngine(AlertOptions(site="demo"))
    >>> engine.active().height
    0
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

import numpy as np
import polars as pl
from numpy.typing import NDArray

from twin import contract as c
from twin.chemistry import get_chemistry
from twin.config import AlertSettings, Settings
from twin.estimators.base import group_time_order
from twin.replay import ReplayOptions, ReplayWindow, RunFolder, replay_run
from twin.state import CoreOptions, TwinCore

__all__ = [
    "FAULT_ALERT_KINDS",
    "PACK_KINDS",
    "SITE_KINDS",
    "AlertEngine",
    "AlertOptions",
    "AlertSnapshot",
    "ChemistryThresholds",
    "KindSpec",
    "alerts_frame",
    "alerts_from_run",
]

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
B = NDArray[np.bool_]
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True, slots=True)
class ChemistryThresholds:
    """Alert thresholds of one chemistry (see :class:`twin.config.ChemistryAlertSettings`)."""

    cell_overvoltage_v: float = 4.20
    cell_undervoltage_v: float = 3.00
    cell_voltage_hysteresis_v: float = 0.05
    over_temperature_c: float = 50.0
    temperature_hysteresis_c: float = 3.0
    temperature_rise_c_per_min: float = 1.0
    current_limit_factor: float = 1.05
    imbalance_v: float = 0.08
    imbalance_hysteresis_v: float = 0.02


def _thresholds_of(settings: AlertSettings) -> dict[str, ChemistryThresholds]:
    return {name: ChemistryThresholds(**s.model_dump()) for name, s in settings.chemistry.items()}


@dataclass(frozen=True, slots=True)
class AlertOptions:
    """Options of the alert engine (from :class:`twin.config.AlertSettings`; times in event-time seconds).

    Attributes:
        site: the site identifier the alerts carry.
        evaluate_every_s: the grid on which conditions are evaluated.
        min_duration_s: how long a threshold condition must hold before its alert is raised.
        clear_duration_s: how long the clear condition must hold before it is cleared.
        thresholds: per chemistry name, and ``"default"`` for any other.
        stale_after_s: a pack without telemetry for this long is offline (the ingest's rule).
        stuck_after_s: a reading unchanged for this long is stuck.
        telemetry_loss_fraction: share of lost telemetry that raises ``telemetry_loss``.
        thermal_residual_c: the thermal residual that raises ``thermal_residual``.
        voltage_residual_v: the voltage residual per cell that raises ``model_residual``.
        energy_balance_fraction: energy-balance threshold as a share of the meter's power.
        energy_balance_min_w: ... and at least this many watts.
        rise_window_s: the window of the temperature rise rate.
        warmup_s: data a pack (or the site) needs before its residuals are judged.
        settle_s: grid times are evaluated this long after the newest event time seen.
        residual_tau_s: EWMA time constant of the voltage residual and the energy balance.
        thermal_baseline_tau_s: time constant of a pack's learnt thermal offset.
        thermal_smooth_tau_s: EWMA time constant of the temperatures against the peers.
        balance_baseline_tau_s: time constant of the learnt energy-balance offset.
        loss_tau_s: EWMA time constant of the telemetry loss share.
    """

    site: str
    evaluate_every_s: float = 10.0
    min_duration_s: float = 30.0
    clear_duration_s: float = 60.0
    thresholds: Mapping[str, ChemistryThresholds] = field(default_factory=lambda: _thresholds_of(AlertSettings()))
    stale_after_s: float = 30.0
    stuck_after_s: float = 300.0
    telemetry_loss_fraction: float = 0.2
    thermal_residual_c: float = 2.0
    voltage_residual_v: float = 0.02
    energy_balance_fraction: float = 0.002
    energy_balance_min_w: float = 500.0
    rise_window_s: float = 300.0
    warmup_s: float = 600.0
    settle_s: float = 2.0
    residual_tau_s: float = 300.0
    thermal_baseline_tau_s: float = 7200.0
    thermal_smooth_tau_s: float = 120.0
    balance_baseline_tau_s: float = 6 * 3600.0
    loss_tau_s: float = 60.0

    def __post_init__(self) -> None:
        """Check the options.

        Raises:
            ValueError: a non-positive grid, a rise window shorter than two grid steps, or no default thresholds.
        """
        if not self.evaluate_every_s > 0:
            msg = f"evaluate_every_s must be positive, got {self.evaluate_every_s}"
            raise ValueError(msg)
        if self.rise_window_s < 2 * self.evaluate_every_s:
            msg = "rise_window_s must be at least two evaluation steps"
            raise ValueError(msg)
        if "default" not in self.thresholds:
            msg = "thresholds need a 'default' entry"
            raise ValueError(msg)

    @classmethod
    def from_settings(cls, settings: Settings, *, site: str | None = None) -> AlertOptions:
        """The engine's options from the service settings (live and replay use this one mapping)."""
        a = settings.alerts
        return cls(
            site=site or settings.site,
            evaluate_every_s=a.evaluate_every_s,
            min_duration_s=a.min_duration_s,
            clear_duration_s=a.clear_duration_s,
            thresholds=_thresholds_of(a),
            stale_after_s=settings.ingest.stale_after_s,
            stuck_after_s=a.stuck_after_s,
            telemetry_loss_fraction=a.telemetry_loss_fraction,
            thermal_residual_c=a.thermal_residual_c,
            voltage_residual_v=a.voltage_residual_v,
            energy_balance_fraction=a.energy_balance_fraction,
            energy_balance_min_w=a.energy_balance_min_w,
        )


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One alert kind: severity and durations (``None``: the options' threshold durations)."""

    name: str
    severity: Severity
    min_duration_s: float | None
    clear_duration_s: float | None
    description: str


PACK_KINDS: Final = (
    KindSpec("cell_overvoltage", "critical", None, None, "a cell above the chemistry's voltage threshold"),
    KindSpec("cell_undervoltage", "critical", None, None, "a cell below the chemistry's voltage threshold"),
    KindSpec("over_temperature", "critical", None, None, "the hottest sensor above the threshold"),
    KindSpec("temperature_rise", "warning", 60.0, 120.0, "the hottest sensor rising fast"),
    KindSpec("over_current", "warning", 10.0, None, "current beyond the pack's limit"),
    # A weak cell shows only in part of a cycle (under load, away from full): the imbalance
    # clears after a day below the clear level, not at every rest (no flapping).
    KindSpec("cell_imbalance", "warning", 60.0, 86_400.0, "cell voltages spread beyond the threshold"),
    KindSpec("pack_offline", "warning", 0.0, 30.0, "the pack is offline or its telemetry stale"),
    KindSpec("contactor_open", "warning", 10.0, 30.0, "the pack's contactor is open: it cannot deliver"),
    KindSpec("telemetry_loss", "warning", 60.0, 120.0, "telemetry messages are being lost"),
    KindSpec("sensor_stuck", "warning", 0.0, 60.0, "a reading has not changed for too long"),
    KindSpec("model_residual", "warning", 120.0, 300.0, "pack voltage against the model's prediction"),
    KindSpec("thermal_residual", "critical", 60.0, 300.0, "pack temperature against its peers and its history"),
)
SITE_KINDS: Final = (KindSpec("energy_balance", "warning", 60.0, 300.0, "the packs' power against the site meter"),)
#: Which alert kinds detect each kind of fault the emulator injects (the module docstring's table).
FAULT_ALERT_KINDS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "weak_cell": frozenset({"cell_imbalance", "cell_undervoltage", "cell_overvoltage", "model_residual"}),
        "sensor_offset": frozenset(
            {"energy_balance", "model_residual", "cell_imbalance", "cell_undervoltage", "thermal_residual"}
        ),
        "sensor_stuck": frozenset({"sensor_stuck", "thermal_residual", "model_residual"}),
        "telemetry_dropout": frozenset({"telemetry_loss", "pack_offline"}),
        "gateway_offline": frozenset({"pack_offline"}),
        "contactor_open": frozenset({"contactor_open"}),
        "thermal_runaway_precursor": frozenset({"thermal_residual", "temperature_rise", "over_temperature"}),
    }
)
#: Readings watched for ``sensor_stuck`` (both temperatures together count as one reading).
_STUCK: Final = ("voltage_v", "current_a", "temp_avg_c", "temp_max_c", "cell_v_min_v", "cell_v_max_v")
#: The columns of the stuck-for matrix evaluated per pack (both temperatures count as one reading).
_STUCK_NAMES: Final = ("pack voltage", "current", "temperature", "lowest cell voltage", "highest cell voltage")
_LAST: Final = (
    "voltage_v",
    "current_a",
    "temp_max_c",
    "temp_avg_c",
    "cell_v_min_v",
    "cell_v_max_v",
)
_MIN_PEERS: Final = 3


def _ewma_alpha(dt_s: float | F64, tau_s: float) -> Any:
    return 1.0 - np.exp(-np.asarray(dt_s, dtype=np.float64) / tau_s)


# --------------------------------------------------------------------------- state


#: What a new pack's state starts at (NaN for the rest).
_FILL: Final[dict[str, float | int | bool]] = {
    "last_ts": 0,
    "first_ts": 0,
    "seq_last": -1,
    "cell_min_idx": -1,
    "cell_max_idx": -1,
    "contactor": True,
    "status_online": True,
    "loss": 0.0,
    "stuck_since": 0,
    "resid_ts": -1,
    "active": False,
    "pending": -1,
}


@dataclass
class _Packs:
    """Per-pack state, indexed like ``TwinCore.packs.ids`` (grown as packs appear)."""

    last_ts: I64
    first_ts: I64
    seq_last: I64
    values: F64  # (P, len(_LAST)) last readings
    cell_min_idx: I64
    cell_max_idx: I64
    contactor: B
    power_w: F64  # mean power over the last interval with rows
    status_online: B  # the gateway's last word (online until it says otherwise)
    loss: F64  # EWMA of the share of telemetry lost
    stuck_value: F64  # (P, len(_STUCK)) last value of each watched reading
    stuck_since: I64  # (P, len(_STUCK)) when it last changed, ms
    ring: F64  # (P, R) mean temp_max_c per grid step, for the rise rate
    thermal_fast: F64  # (P, 2) mean and hottest sensor against the peers, smoothed
    thermal_base: F64  # (P, 2) their learnt offsets
    thermal_z: F64
    resid_ewma: F64
    resid_ts: I64
    voltage_z: F64
    p_fast: F64
    p_slow: F64
    active: B  # (P, K)
    pending: I64  # (P, K) since when the pending condition holds, -1 for none

    @classmethod
    def empty(cls, ring: int) -> _Packs:
        k = len(PACK_KINDS)
        return cls(
            last_ts=np.zeros(0, np.int64),
            first_ts=np.zeros(0, np.int64),
            seq_last=np.zeros(0, np.int64),
            values=np.zeros((0, len(_LAST))),
            cell_min_idx=np.zeros(0, np.int64),
            cell_max_idx=np.zeros(0, np.int64),
            contactor=np.zeros(0, bool),
            power_w=np.zeros(0),
            status_online=np.zeros(0, bool),
            loss=np.zeros(0),
            stuck_value=np.zeros((0, len(_STUCK))),
            stuck_since=np.zeros((0, len(_STUCK)), np.int64),
            ring=np.zeros((0, ring)),
            thermal_fast=np.zeros((0, 2)),
            thermal_base=np.zeros((0, 2)),
            thermal_z=np.zeros(0),
            resid_ewma=np.zeros(0),
            resid_ts=np.zeros(0, np.int64),
            voltage_z=np.zeros(0),
            p_fast=np.zeros(0),
            p_slow=np.zeros(0),
            active=np.zeros((0, k), bool),
            pending=np.zeros((0, k), np.int64),
        )

    def grow(self, k: int) -> None:
        for f in dataclasses.fields(self):
            arr = getattr(self, f.name)
            fill = _FILL.get(f.name, np.nan)
            extra = np.full((k, *arr.shape[1:]), fill, dtype=arr.dtype)
            setattr(self, f.name, np.concatenate([arr, extra]))

    def copy(self) -> _Packs:
        return _Packs(**{f.name: getattr(self, f.name).copy() for f in dataclasses.fields(self)})


@dataclass
class _Site:
    """The site's energy balance and its alert machine."""

    e_fast: float = math.nan
    m_fast: float = math.nan
    e_base: float = math.nan
    first_ts: int = 0
    active: B = field(default_factory=lambda: np.zeros((1, len(SITE_KINDS)), bool))
    pending: I64 = field(default_factory=lambda: np.full((1, len(SITE_KINDS)), -1, np.int64))

    def copy(self) -> _Site:
        return dataclasses.replace(self, active=self.active.copy(), pending=self.pending.copy())


@dataclass(frozen=True, slots=True)
class _Active:
    alert_id: str
    raised_ms: int
    pack: str | None
    cell: int | None
    value: float | None
    threshold: float | None
    message: str


@dataclass(frozen=True, slots=True, eq=False)
class AlertSnapshot:
    """The engine's whole state, copied (restore it into an engine with the same options)."""

    pack_ids: tuple[str, ...]
    packs: _Packs
    site: _Site
    active: tuple[tuple[tuple[int, int], _Active], ...]
    pending_rows: pl.DataFrame
    pending_site: pl.DataFrame
    pending_status: pl.DataFrame
    next_tick_ms: int | None
    watermark_ms: int
    counters: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class _StepRows:
    """One grid step's rows: per-pack aggregates (with ``_i``), row and late counts, the meter.

    The aggregates are numpy arrays, each what ``to_numpy()`` of the step's column gives.
    """

    agg: Mapping[str, NDArray[Any]]
    rows: int
    late: int
    meter_w: float | None


@dataclass(frozen=True, slots=True)
class _Steps:
    """The aggregates of consecutive grid steps (:meth:`AlertEngine._steps`), sliced per step."""

    agg: pl.DataFrame  # sorted by _tick
    columns: Mapping[str, NDArray[Any] | None]  # agg's columns as numpy (None: read per step, see numpy_columns)
    agg_ticks: NDArray[np.int64]
    ticks: NDArray[np.int64]  # the steps with rows, ascending
    rows: NDArray[np.int64]
    late: NDArray[np.int64]
    meter: dict[int, float | None]

    @staticmethod
    def numpy_columns(agg: pl.DataFrame) -> dict[str, NDArray[Any] | None]:
        """The columns as numpy once, where a slice of them is what the step's own ``to_numpy()`` gives.

        A float column's nulls are NaN either way; an integer or boolean column with nulls
        converts differently with and without them, so it is read per step.
        """
        return {
            name: None if s.dtype != pl.Float64 and s.null_count() else s.to_numpy()
            for name, s in zip(agg.columns, agg.get_columns(), strict=True)
        }

    def rows_at(self, tick: int) -> int:
        """Rows of the step at ``tick``."""
        k = int(np.searchsorted(self.ticks, tick))
        return int(self.rows[k]) if k < self.ticks.size and self.ticks[k] == tick else 0

    def at(self, tick: int) -> _StepRows:
        """The step at ``tick`` (empty without rows)."""
        a, b = (int(x) for x in np.searchsorted(self.agg_ticks, [tick, tick + 1]))
        k = int(np.searchsorted(self.ticks, tick))
        has = k < self.ticks.size and self.ticks[k] == tick
        columns = {
            name: self.agg.get_column(name).slice(a, b - a).to_numpy() if whole is None else whole[a:b]
            for name, whole in self.columns.items()
        }
        return _StepRows(
            agg=columns,
            rows=int(self.rows[k]) if has else 0,
            late=int(self.late[k]) if has else 0,
            meter_w=self.meter.get(tick),
        )

    def next_rows_tick(self, tick: int, pending: pl.DataFrame, tick_ms: int) -> int | None:
        """The first grid time after ``tick`` with rows (in these steps, else in ``pending``), or None."""
        k = int(np.searchsorted(self.ticks, tick, side="right"))
        if k < self.ticks.size:
            return int(self.ticks[k])
        if pending.height:
            return -(-int(pending["ts_ms"].min()) // tick_ms) * tick_ms  # type: ignore[arg-type]
        return None


@dataclass(frozen=True, slots=True)
class _Tick:
    """What one grid step's rows bring, beyond the per-pack state."""

    temp_avg: F64  # mean temp_avg_c over the step, NaN without rows
    power: F64  # mean power over the step, NaN without rows
    meter_w: float | None  # mean battery_w of the site rows of the step


@dataclass(frozen=True, slots=True)
class _PerPack:
    """Per-pack constants derived from the core's metadata (rebuilt when it changes)."""

    key: tuple[Any, ...]
    chemistry: tuple[str, ...]
    over_v: F64
    under_v: F64
    v_hyst: F64
    over_t: F64
    t_hyst: F64
    rise: F64
    current_factor: F64
    imbalance_v: F64
    imbalance_hyst: F64
    series: F64
    energy_kwh: F64


# --------------------------------------------------------------------------- the engine


class AlertEngine:
    """Raise and clear alerts from telemetry, vectorised over packs (see the module docstring).

    Args:
        options: thresholds, durations and residual settings.

    Examples:
        >>> import polars as pl
        >>> from twin.pipeline import decode_batch
        >>> from twin.state import CoreOptions, TwinCore
        >>> core = TwinCore(CoreOptions(site="demo"))
        >>> engine = AlertEngine(AlertOptions(site="demo", min_duration_s=0.0))
        >>> def row(ts_ms: int, seq: int, v_max: float) -> bytes:
        ...     return (f'{{"schema":"pack_telemetry/1","pack":"P1","ts_ms":{ts_ms},"seq":{seq},'
        ...         f'"voltage_v":380.0,"current_a":10.0,"temp_min_c":24.0,"temp_max_c":26.0,"temp_avg_c":25.0,'
        ...         f'"cell_v_min_v":3.9,"cell_v_max_v":{v_max},"cell_v_min_idx":1,"cell_v_max_idx":7,'
        ...         f'"soc_bms":0.6,"soh_bms":0.9,"contactor_closed":true}}').encode()
        >>> t0 = 1_767_225_600_000
        >>> raised = []
        >>> for k in range(30):
        ...     batch = decode_batch(["microgrid/demo/packs/P1/telemetry"], [row(t0 + 1000 * k, k, 4.3)], site="demo")
        ...     result = core.ingest(batch, now_ms=t0 + 1000 * k)
        ...     raised += engine.update(result.telemetry, core=core, now_ms=t0 + 1000 * k)
        >>> [(a.kind, a.state, a.pack, a.cell, a.value) for a in raised]
        [('cell_overvoltage', 'raised', 'P1', 7, 4.3)]
    """

    def __init__(self, options: AlertOptions) -> None:
        self.options = options
        self._tick_ms = round(options.evaluate_every_s * 1000)
        self._ring_n = round(options.rise_window_s / options.evaluate_every_s) + 1
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._lookup = pl.DataFrame(schema={"pack": pl.String, "_i": pl.Int64})
        self._packs = _Packs.empty(self._ring_n)
        self._site = _Site()
        self._active: dict[tuple[int, int], _Active] = {}
        self._pending = pl.DataFrame(schema=_ROW_SCHEMA)
        self._pending_site = pl.DataFrame(schema={"ts_ms": pl.Int64, "battery_w": pl.Float64})
        self._pending_status = pl.DataFrame(schema=_STATUS_SCHEMA)
        self._next_tick: int | None = None
        self._last_rows_tick = 0
        self._watermark = 0
        self._per_pack: _PerPack | None = None
        self._soc_rows: tuple[tuple[str, ...], NDArray[np.intp], tuple[tuple[str, NDArray[np.bool_]], ...]] | None = (
            None
        )
        self.counters: dict[str, int] = {"raised": 0, "cleared": 0, "late_rows": 0, "ticks": 0}
        self._pack_durations = self._durations(PACK_KINDS)

    # ------------------------------------------------------------------ inputs

    def update(
        self,
        telemetry: pl.DataFrame,
        *,
        core: TwinCore,
        now_ms: int,
        site: pl.DataFrame | None = None,
        status: pl.DataFrame | None = None,
    ) -> list[c.Alert]:
        """Fold one batch and evaluate the grid times it completes.

        Args:
            telemetry: the batch's accepted PackTelemetry rows (``IngestResult.telemetry``), any order.
            core: the mirror, already updated with this batch (metadata, the SoC filter).
            now_ms: the time now (wall clock live, the window's end in replay): no grid time
                beyond it is evaluated.
            site: the batch's SiteTelemetry rows (``Decoded.site``), for the energy balance.
            status: the batch's PackStatus rows (``Decoded.status``): each applies from its
                ``ts_ms`` on (a last will, without one, from the next grid time).

        Returns:
            The alerts raised or cleared, in event-time order.
        """
        self._sync(core)
        if telemetry.height:
            rows = telemetry.select([pl.col(k).cast(t) for k, t in _ROW_SCHEMA.items()])
            self._pending = pl.concat([self._pending, rows]) if self._pending.height else rows
            self._watermark = max(self._watermark, int(rows["ts_ms"].max()))  # type: ignore[arg-type]
        if site is not None and site.height:
            srows = site.select(pl.col("ts_ms").cast(pl.Int64), pl.col("battery_w").cast(pl.Float64))
            self._pending_site = pl.concat([self._pending_site, srows]) if self._pending_site.height else srows
            self._watermark = max(self._watermark, int(srows["ts_ms"].max()))  # type: ignore[arg-type]
        if status is not None and status.height:
            st = status.select(
                pl.col("pack").cast(pl.String), pl.col("state").cast(pl.String), pl.col("ts_ms").cast(pl.Int64)
            )
            self._pending_status = pl.concat([self._pending_status, st]) if self._pending_status.height else st
        if self._next_tick is None:
            if self._pending.height == 0:
                # No telemetry yet: keep only the site rows the first grid step can use.
                horizon = self._watermark - 2 * self._tick_ms
                self._pending_site = self._pending_site.filter(pl.col("ts_ms") > horizon)
                return []
            first = int(self._pending["ts_ms"].min())  # type: ignore[arg-type]
            self._next_tick = -(-first // self._tick_ms) * self._tick_ms
        limit = min(now_ms, self._watermark - round(self.options.settle_s * 1000))
        out: list[c.Alert] = []
        per_pack = self._constants(core)
        steps = self._steps(limit) if self._next_tick <= limit else None
        while steps is not None and self._next_tick <= limit:
            tick = self._next_tick
            self._apply_status(tick)
            step = self._fold(steps.at(tick), tick)
            out += self._evaluate(tick, step, core, per_pack)
            self.counters["ticks"] += 1
            self._next_tick = tick + self._tick_ms
            if steps.rows_at(tick):
                self._last_rows_tick = tick
            else:
                # A gap in the data: step on until every pack is stale, then skip to the data.
                following = steps.next_rows_tick(tick, self._pending, self._tick_ms)
                stale = self._next_tick > self._stale_horizon(self._last_rows_tick)
                if following is not None and stale and following > self._next_tick:
                    self._next_tick = following
        self._voltage_residuals(core)
        return out

    def _apply_status(self, tick: int) -> None:
        """Apply the gateway statuses stamped up to ``tick`` (and last wills, unstamped) in time order."""
        if self._pending_status.height == 0:
            return
        due = pl.col("ts_ms").is_null() | (pl.col("ts_ms") <= tick)
        rows = self._pending_status.filter(due)
        if rows.height == 0:
            return
        self._pending_status = self._pending_status.filter(~due)
        last = (
            rows.with_columns(pl.col("ts_ms").fill_null(tick))
            .sort("ts_ms", maintain_order=True)
            .group_by("pack", maintain_order=True)
            .last()
            .join(self._lookup, on="pack", how="inner")
        )
        self._packs.status_online[last["_i"].to_numpy()] = (last["state"] == "online").to_numpy()

    def _stale_horizon(self, tick: int) -> int:
        """The first grid time at which every pack seen is surely stale (for skipping a data gap)."""
        stale_ms = round(self.options.stale_after_s * 1000) + self._tick_ms
        return -(-(tick + stale_ms) // self._tick_ms) * self._tick_ms

    def _sync(self, core: TwinCore) -> None:
        """Grow the per-pack state to the core's packs (append-only, in the core's order)."""
        ids = core.packs.ids
        if len(ids) == len(self._ids):
            return
        new = ids[len(self._ids) :]
        for i, pack in enumerate(new):
            self._index[pack] = len(self._ids) + i
        self._ids.extend(new)
        self._packs.grow(len(new))
        self._lookup = pl.DataFrame(
            {"pack": self._ids, "_i": np.arange(len(self._ids), dtype=np.int64)},
            schema={"pack": pl.String, "_i": pl.Int64},
        )

    def _constants(self, core: TwinCore) -> _PerPack:
        """Per-pack thresholds and metadata, rebuilt only when the core's metadata changed."""
        p = core.packs
        chem = tuple(ch or "default" for ch in p.chemistry)
        meta = core.estimation.meta
        key = (len(p.ids), chem, meta.height, int(p.has_meta.sum()))
        if self._per_pack is not None and self._per_pack.key == key:
            return self._per_pack
        th = self.options.thresholds
        rows = [th.get(ch, th["default"]) for ch in chem]  # per pack, only when the metadata changed

        def col(name: str) -> F64:
            return np.array([getattr(r, name) for r in rows], dtype=np.float64).reshape(len(rows))

        series = np.full(len(p.ids), np.nan)
        if meta.height:
            known = meta.select("pack", "series_cells").join(self._lookup, on="pack", how="inner")
            series[known["_i"].to_numpy()] = known["series_cells"].cast(pl.Float64).to_numpy()
        self._per_pack = _PerPack(
            key=key,
            chemistry=chem,
            over_v=col("cell_overvoltage_v"),
            under_v=col("cell_undervoltage_v"),
            v_hyst=col("cell_voltage_hysteresis_v"),
            over_t=col("over_temperature_c"),
            t_hyst=col("temperature_hysteresis_c"),
            rise=col("temperature_rise_c_per_min"),
            current_factor=col("current_limit_factor"),
            imbalance_v=col("imbalance_v"),
            imbalance_hyst=col("imbalance_hysteresis_v"),
            series=series,
            energy_kwh=np.asarray(p.values["rated_energy_kwh"], dtype=np.float64).copy(),
        )
        return self._per_pack

    # ------------------------------------------------------------------ folding

    def _steps(self, limit: int) -> _Steps:
        """Cut the pending rows due by ``limit`` into grid steps, aggregated in one pass.

        A row belongs to the first grid time at or after its ``ts_ms`` (a late row, older than
        the next grid time, to the next grid time); the per-pack aggregates of every step are
        one group-by over (step, pack), so the per-step loop only slices arrays.
        """
        t_ms = self._tick_ms
        first = self._next_tick
        assert first is not None
        last = first + (limit - first) // t_ms * t_ms
        step_of = pl.max_horizontal(((pl.col("ts_ms") + t_ms - 1) // t_ms) * t_ms, pl.lit(first, pl.Int64))
        due = self._pending.filter(pl.col("ts_ms") <= last).with_columns(step_of.alias("_tick"))
        self._pending = self._pending.filter(pl.col("ts_ms") > last)
        site = self._pending_site.filter(pl.col("ts_ms") <= last).with_columns(step_of.alias("_tick"))
        self._pending_site = self._pending_site.filter(pl.col("ts_ms") > last)
        # One integer key per (step, pack); each group is summed in row order, as a step's rows alone.
        width = self._lookup.height + 1
        keyed = due.join(self._lookup, on="pack", how="inner", maintain_order="left")
        key = (keyed.get_column("_tick").to_numpy() - first) // t_ms * width + keyed.get_column("_i").to_numpy()
        agg = _aggregate(keyed, key)
        tick_of = due["_tick"].to_numpy()
        ticks, where, rows = np.unique(tick_of, return_inverse=True, return_counts=True)
        late = np.bincount(where, weights=due["ts_ms"].to_numpy() <= tick_of - t_ms, minlength=ticks.size)
        meter: dict[int, float | None] = {}
        if site.height:
            means = (
                site.sort("_tick", maintain_order=True)
                .group_by("_tick", maintain_order=True)
                .agg(pl.col("battery_w").mean())
            )
            meter = {int(t): (None if m is None else float(m)) for t, m in means.iter_rows()}  # per step
        return _Steps(
            agg=agg,
            columns=_Steps.numpy_columns(agg),
            agg_ticks=agg["_tick"].to_numpy(),
            ticks=ticks.astype(np.int64),
            rows=rows.astype(np.int64),
            late=late.astype(np.int64),
            meter=meter,
        )

    def _fold(self, step: _StepRows, tick: int) -> _Tick:
        """Fold the (aggregated) rows of one grid step into the per-pack state."""
        s = self._packs
        n = len(self._ids)
        slot = (tick // self._tick_ms) % self._ring_n
        s.ring[:, slot] = np.nan
        temp_avg = np.full(n, np.nan)
        power = np.full(n, np.nan)
        agg = step.agg
        if step.rows:
            self.counters["late_rows"] += step.late
            i = agg["_i"]
            ts = agg["ts"]
            last_before = s.last_ts[i].copy()
            newer = ts > s.last_ts[i]
            # Sequence gaps: within the step, and since the pack's last row (a reset counts none).
            seq_min, seq_max = agg["seq_min"], agg["seq_max"]
            count = agg["n"]
            prev = s.seq_last[i]
            gap = np.where((prev >= 0) & (seq_min > prev), seq_min - prev - 1, 0)
            within = np.maximum(seq_max - seq_min + 1 - count, 0)
            lost = (gap + within).astype(np.float64)
            a_loss = float(_ewma_alpha(self._tick_ms / 1000.0, self.options.loss_tau_s))
            s.loss[i] += a_loss * (lost / (lost + count) - s.loss[i])
            s.seq_last[i] = np.where(newer, agg["seq_last"], s.seq_last[i])
            # Last readings, from rows newer than what the pack had.
            j = i[newer]
            for k, name in enumerate(_LAST):
                s.values[j, k] = agg[name][newer]
            s.cell_min_idx[j] = agg["cell_v_min_idx"][newer]
            s.cell_max_idx[j] = agg["cell_v_max_idx"][newer]
            s.contactor[j] = agg["contactor_closed"][newer]
            s.first_ts[i] = np.where(s.first_ts[i] > 0, s.first_ts[i], agg["ts_first"])
            s.last_ts[j] = ts[newer]
            # When each watched reading last changed (the first row is compared with the state).
            first_ts = agg["ts_first"]
            # Time without data is not time stuck: after a gap, every reading counts as new.
            resumed = (first_ts - last_before) > round(self.options.stale_after_s * 1000)
            for k, name in enumerate(_STUCK):
                first = agg[f"{name}__first"]
                changed_in = agg[f"{name}__chg"]
                before = s.stuck_value[i, k]
                moved = ~(first == before) | resumed
                since = np.where(moved, first_ts, s.stuck_since[i, k])
                since = np.where(np.isfinite(changed_in), changed_in, since).astype(np.int64)
                s.stuck_since[i, k] = np.maximum(s.stuck_since[i, k], since)
                s.stuck_value[j, k] = agg[f"{name}__last"][newer]
            s.ring[i, slot] = agg["temp_max_mean"]
            temp_avg[i] = agg["temp_avg_mean"]
            power[i] = agg["power_mean"]
            s.power_w[i] = power[i]
        meter = step.meter_w if step.meter_w is not None and math.isfinite(step.meter_w) else None
        return _Tick(temp_avg=temp_avg, power=power, meter_w=meter)

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, tick: int, step: _Tick, core: TwinCore, k: _PerPack) -> list[c.Alert]:
        o = self.options
        s = self._packs
        n = len(self._ids)
        if n == 0:
            return []
        dt_s = self._tick_ms / 1000.0
        seen = s.last_ts > 0
        fresh = seen & (tick - s.last_ts <= round(o.stale_after_s * 1000))
        status = s.status_online
        online = status & fresh
        warm = seen & (tick - s.first_ts >= round(o.warmup_s * 1000))
        v = {name: s.values[:, j] for j, name in enumerate(_LAST)}
        limits_dis = core.packs.values["current_max_discharge_a"][:n]
        limits_chg = core.packs.values["current_max_charge_a"][:n]

        # Thermal residual: the mean and the hottest sensor against the median of the online
        # peers of the same chemistry, smoothed, less the pack's own learnt offset.
        slot = (tick // self._tick_ms) % self._ring_n
        temps = np.column_stack([step.temp_avg, s.ring[:, slot]])
        ref = np.full((n, 2), np.nan)
        chem = np.array(k.chemistry, dtype=object)
        for name in set(k.chemistry):  # a handful of chemistries
            members = chem == name
            for j in range(2):
                peers = members & online & np.isfinite(temps[:, j])
                if int(peers.sum()) >= _MIN_PEERS:
                    ref[members, j] = float(np.median(temps[peers, j]))
        d = temps - ref
        ok_d = np.isfinite(d)
        fast, base = s.thermal_fast, s.thermal_base
        start = np.isnan(fast) & ok_d
        fast[start] = d[start]
        fast[ok_d] += float(_ewma_alpha(dt_s, o.thermal_smooth_tau_s)) * (d[ok_d] - fast[ok_d])
        start = np.isnan(base) & ok_d
        base[start] = fast[start]
        residual = fast - base
        near = np.abs(residual) < 0.5 * o.thermal_residual_c
        alpha = np.where(
            near,
            _ewma_alpha(dt_s, o.thermal_baseline_tau_s),
            _ewma_alpha(dt_s, 10.0 * o.thermal_baseline_tau_s),
        )
        base[ok_d] += alpha[ok_d] * residual[ok_d]
        any_d = ok_d.any(axis=1)
        worst = np.max(np.where(ok_d, residual, -np.inf), axis=1)
        s.thermal_z[any_d] = worst[any_d] / o.thermal_residual_c
        s.thermal_z[~online] = np.nan

        # Temperature rise over the ring's window.
        oldest = s.ring[:, (slot + 1) % self._ring_n]
        rise = (s.ring[:, slot] - oldest) / ((self._ring_n - 1) * dt_s / 60.0)

        # Current against the pack's limits (charge is negative).
        current = v["current_a"]
        limit = np.where(current >= 0, limits_dis, limits_chg)
        ratio = np.abs(current) / limit

        # Imbalance: the extreme cell farther from the pack's mean cell voltage, by how far (the
        # whole spread when the series count is unknown); it names the cell.
        deviation, low_side = _imbalance(s.values, k.series)
        outlier = np.where(low_side, s.cell_min_idx, s.cell_max_idx)

        stuck_for = tick - s.stuck_since
        stuck_temp = np.minimum(stuck_for[:, 2], stuck_for[:, 3])
        stuck_current = np.where(s.contactor & (np.abs(current) > 0.5), stuck_for[:, 1], 0)
        stuck = np.column_stack([stuck_for[:, 0], stuck_current, stuck_temp, stuck_for[:, 4], stuck_for[:, 5]])
        stuck_worst = stuck.max(axis=1) / 1000.0
        stuck_limit = o.stuck_after_s

        offline = (~status) | (seen & ~fresh)
        contactor_open = ~s.contactor
        lost_share = self._lost_share(k)

        def cond(
            value: F64, raise_: B, clear: B, valid: B, threshold: F64 | float, cell: I64 | None = None
        ) -> tuple[F64, B, B, B, F64, I64]:
            return (
                np.asarray(value, dtype=np.float64),
                np.asarray(raise_, dtype=bool),
                np.asarray(clear, dtype=bool),
                np.asarray(valid, dtype=bool),
                np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n,)),
                np.full(n, -1, np.int64) if cell is None else cell,
            )

        with np.errstate(invalid="ignore"):
            conds = [
                cond(
                    v["cell_v_max_v"],
                    v["cell_v_max_v"] > k.over_v,
                    v["cell_v_max_v"] < k.over_v - k.v_hyst,
                    fresh & np.isfinite(v["cell_v_max_v"]),
                    k.over_v,
                    s.cell_max_idx,
                ),
                cond(
                    v["cell_v_min_v"],
                    v["cell_v_min_v"] < k.under_v,
                    v["cell_v_min_v"] > k.under_v + k.v_hyst,
                    fresh & np.isfinite(v["cell_v_min_v"]),
                    k.under_v,
                    s.cell_min_idx,
                ),
                cond(
                    v["temp_max_c"],
                    v["temp_max_c"] > k.over_t,
                    v["temp_max_c"] < k.over_t - k.t_hyst,
                    fresh & np.isfinite(v["temp_max_c"]),
                    k.over_t,
                ),
                cond(rise, rise > k.rise, rise < 0.5 * k.rise, fresh & np.isfinite(rise), k.rise),
                cond(
                    current,
                    ratio > k.current_factor,
                    ratio < k.current_factor - 0.05,
                    fresh & np.isfinite(ratio),
                    k.current_factor * limit,
                ),
                cond(
                    deviation,
                    deviation > k.imbalance_v,
                    deviation < k.imbalance_v - k.imbalance_hyst,
                    fresh & np.isfinite(deviation),
                    k.imbalance_v,
                    outlier,
                ),
                cond(lost_share, offline, ~offline, seen | ~status, np.nan),
                cond(lost_share, contactor_open, ~contactor_open, fresh, np.nan),
                cond(
                    s.loss,
                    s.loss > o.telemetry_loss_fraction,
                    s.loss < 0.25 * o.telemetry_loss_fraction,
                    fresh,
                    o.telemetry_loss_fraction,
                ),
                cond(
                    stuck_worst,
                    stuck_worst >= stuck_limit,
                    stuck_worst < 0.5 * stuck_limit,
                    fresh & seen,
                    stuck_limit,
                ),
                cond(
                    np.abs(s.voltage_z) * o.voltage_residual_v,
                    np.abs(s.voltage_z) > 1.0,
                    np.abs(s.voltage_z) < 0.5,
                    online & warm & np.isfinite(s.voltage_z),
                    o.voltage_residual_v,
                ),
                cond(
                    s.thermal_z * o.thermal_residual_c,
                    s.thermal_z > 1.0,
                    s.thermal_z < 0.5,
                    online & warm & np.isfinite(s.thermal_z),
                    o.thermal_residual_c,
                ),
            ]
        value = np.column_stack([x[0] for x in conds])
        raise_c = np.column_stack([x[1] for x in conds])
        clear_c = np.column_stack([x[2] for x in conds])
        valid = np.column_stack([x[3] for x in conds])
        threshold = np.column_stack([x[4] for x in conds])
        cells = np.column_stack([x[5] for x in conds])
        fired = _machine(s.active, s.pending, raise_c, clear_c, valid, tick, self._pack_durations)
        out = [
            self._transition(tick, int(p), int(q), float(value[p, q]), float(threshold[p, q]), int(cells[p, q]), extra)
            for p, q in zip(*np.nonzero(fired), strict=True)
            for extra in [self._detail(int(p), int(q), stuck, online, k)]
        ]
        out += self._energy_balance(tick, step, online, fresh)
        return out

    def _durations(self, kinds: Sequence[KindSpec]) -> tuple[I64, I64]:
        o = self.options
        mins = [o.min_duration_s if k.min_duration_s is None else k.min_duration_s for k in kinds]
        clears = [o.clear_duration_s if k.clear_duration_s is None else k.clear_duration_s for k in kinds]
        return (np.round(np.array(mins) * 1000).astype(np.int64), np.round(np.array(clears) * 1000).astype(np.int64))

    @staticmethod
    def _lost_share(k: _PerPack) -> F64:
        """Each pack's share of the site's rated energy (what its absence costs the site)."""
        energy = np.nan_to_num(k.energy_kwh)
        total = float(energy.sum())
        share: F64 = energy / total if total > 0 else np.zeros_like(energy)
        return share

    def _detail(self, p: int, q: int, stuck: I64, online: B, k: _PerPack) -> str:
        """Words for one transition (Python, per alert that changes state)."""
        kind = PACK_KINDS[q].name
        if kind == "sensor_stuck":
            worst = int(np.argmax(stuck[p]))
            return f" ({_STUCK_NAMES[worst]})"
        if kind in ("pack_offline", "contactor_open"):
            energy = float(np.nan_to_num(k.energy_kwh[p]))
            out = ~online | ~self._packs.contactor
            lost = float(np.nan_to_num(k.energy_kwh)[out].sum())
            total = float(np.nan_to_num(k.energy_kwh).sum())
            share = lost / total if total > 0 else 0.0
            return f" ({energy:.1f} kWh rated); {int(out.sum())} packs unavailable, {share:.1%} of the site's energy"
        return ""

    def _transition(self, tick: int, p: int, q: int, value: float, threshold: float, cell: int, detail: str) -> c.Alert:
        spec = PACK_KINDS[q]
        pack = self._ids[p]
        key = (p, q)
        if self._packs.active[p, q]:  # just raised
            alert_id = _alert_id(self.options.site, spec.name, pack, tick)
            cell_out = cell if 0 <= cell <= 999 and spec.name in _CELL_KINDS else None
            message = _message(spec.name, "raised", pack, cell_out, value, threshold) + detail
            rec = _Active(alert_id, tick, pack, cell_out, _finite(value), _finite(threshold), message[:512])
            self._active[key] = rec
            self.counters["raised"] += 1
            state: Literal["raised", "cleared"] = "raised"
        else:
            rec = self._active.pop(key)
            cell_out = rec.cell
            message = _message(spec.name, "cleared", pack, cell_out, value, threshold) + detail
            self.counters["cleared"] += 1
            state = "cleared"
        return c.Alert(
            site=self.options.site,
            ts_ms=tick,
            alert_id=rec.alert_id,
            kind=spec.name,
            severity=spec.severity,
            state=state,
            pack=pack,
            cell=cell_out,
            value=_finite(value),
            threshold=_finite(threshold),
            message=message[:512],
        )

    def _energy_balance(self, tick: int, step: _Tick, online: B, fresh: B) -> list[c.Alert]:
        """The site's energy balance: the online packs' power against the meter, beyond its learnt offset."""
        o = self.options
        s, site = self._packs, self._site
        if step.meter_w is None:
            return []
        dt_s = self._tick_ms / 1000.0
        power = np.where(np.isfinite(step.power), step.power, np.where(fresh, s.power_w, np.nan))
        use = online & np.isfinite(power)
        if not use.any():
            return []  # no pack to weigh the meter against
        residual = float(power[use].sum()) - step.meter_w
        a_fast = float(_ewma_alpha(dt_s, o.residual_tau_s))
        if math.isnan(site.e_fast):
            site.e_fast, site.m_fast, site.first_ts = residual, step.meter_w, tick
        else:
            site.e_fast += a_fast * (residual - site.e_fast)
            site.m_fast += a_fast * (step.meter_w - site.m_fast)
        # Per-pack power, fast and slow, to name the pack whose share stepped with the balance.
        engaged = bool(site.active[0, 0] or site.pending[0, 0] >= 0)
        init = use & np.isnan(s.p_fast)
        s.p_fast[init] = power[init]
        s.p_slow[init] = power[init]
        upd = use & ~init
        s.p_fast[upd] += a_fast * (power[upd] - s.p_fast[upd])
        if not engaged:
            a_slow = float(_ewma_alpha(dt_s, 12.0 * o.residual_tau_s))
            s.p_slow[upd] += a_slow * (power[upd] - s.p_slow[upd])
        if tick - site.first_ts < round(o.warmup_s * 1000):
            return []
        if math.isnan(site.e_base):
            site.e_base = site.e_fast
        threshold = max(o.energy_balance_min_w, o.energy_balance_fraction * abs(site.m_fast))
        deviation = site.e_fast - site.e_base
        if not engaged and abs(deviation) < 0.5 * threshold:
            site.e_base += float(_ewma_alpha(dt_s, o.balance_baseline_tau_s)) * (site.e_fast - site.e_base)
        raise_c = np.array([[abs(deviation) > threshold]])
        clear_c = np.array([[abs(deviation) < 0.5 * threshold]])
        fired = _machine(
            site.active, site.pending, raise_c, clear_c, np.ones((1, 1), bool), tick, self._durations(SITE_KINDS)
        )
        if not fired[0, 0]:
            return []
        key = (-1, 0)
        spec = SITE_KINDS[0]
        if site.active[0, 0]:
            suspect = self._suspect(deviation, use)
            alert_id = _alert_id(o.site, spec.name, suspect or "site", tick)
            who = f"; the pack whose power stepped with it: {suspect}" if suspect else ""
            message = (
                f"the packs' power differs from the site meter by {deviation:+.0f} W beyond its usual offset "
                f"(threshold {threshold:.0f} W){who}"
            )
            rec = _Active(alert_id, tick, suspect, None, _finite(deviation), threshold, message)
            self._active[key] = rec
            self.counters["raised"] += 1
            state: Literal["raised", "cleared"] = "raised"
        else:
            rec = self._active.pop(key)
            message = f"the packs' power agrees with the site meter again ({deviation:+.0f} W)"
            self.counters["cleared"] += 1
            state = "cleared"
        return [
            c.Alert(
                site=o.site,
                ts_ms=tick,
                alert_id=rec.alert_id,
                kind=spec.name,
                severity=spec.severity,
                state=state,
                pack=rec.pack,
                value=_finite(deviation),
                threshold=_finite(threshold),
                message=message[:512],
            )
        ]

    def _suspect(self, deviation: float, use: B) -> str | None:
        """The pack whose power moved away from its usual share by most of the deviation, if one clearly did."""
        s = self._packs
        ok = use & np.isfinite(s.p_fast) & np.isfinite(s.p_slow)
        if int(ok.sum()) < 2:
            return None
        slow_total = float(s.p_slow[ok].sum())
        if abs(slow_total) < 1.0:
            return None
        share = s.p_slow / slow_total
        fast_total = float(s.p_fast[ok].sum()) - deviation  # what the meter says the packs delivered
        delta = np.where(ok, (s.p_fast - share * fast_total) * math.copysign(1.0, deviation), -np.inf)
        order = np.argsort(delta)[::-1]
        best, second = float(delta[order[0]]), float(delta[order[1]])
        if best >= 0.5 * abs(deviation) and best >= 2.0 * max(second, 0.0):
            return self._ids[int(order[0])]
        return None

    def _voltage_residuals(self, core: TwinCore) -> None:
        """Measured mean cell voltage against the SoC filter's model at its own state, smoothed (per batch)."""
        est = core.estimation.soc
        if est is None:
            return
        state = est.snapshot()
        params = est.params
        ids = state.pack_ids
        if self._soc_rows is None or self._soc_rows[0] != ids:
            rows = np.array([self._index.get(p, -1) for p in ids], dtype=np.intp)  # when the packs change
            chem = np.array(params.packs.chemistry, dtype=object)
            masks = tuple((ch.name, chem == ch.name) for ch in params.chemistries)
            self._soc_rows = (ids, rows, masks)
        _, rows, masks = self._soc_rows
        known = rows >= 0
        x = state.x
        soc = np.clip(x[:, 0], 0.0, 1.0)
        ocv = np.zeros(len(ids))
        amp = np.zeros(len(ids))
        r_soc = np.ones(len(ids))
        t_factor = np.ones(len(ids))
        for name, mask in masks:  # a handful of chemistries
            ch = get_chemistry(name)
            ocv[mask] = ch.ocv(soc[mask])
            amp[mask] = ch.hysteresis_v(soc[mask])
            r_soc[mask] = ch.soc_factor(soc[mask])
            t_factor[mask] = ch.temp_factor(state.last_temp_c[mask])
        i_true = state.last_current_a - x[:, 4]
        r0 = params.r0_ref_ohm * r_soc * t_factor
        predicted = (
            ocv + amp * x[:, 3] - x[:, 5] * (r0 * i_true + x[:, 1] + x[:, 2]) - params.r_series_cell_ohm * i_true
        )
        core_rows = np.where(known, rows, 0)
        measured = core.packs.values["voltage_v"][core_rows] * params.inv_series
        same = known & (core.packs.last_ts_ms[core_rows] == state.last_ts_ms)
        s = self._packs
        ts = state.last_ts_ms
        residual = measured - predicted
        new = same & (ts > s.resid_ts[core_rows]) & np.isfinite(residual)
        r = core_rows[new]
        dt = np.where(s.resid_ts[r] > 0, (ts[new] - s.resid_ts[r]) / 1000.0, self.options.residual_tau_s)
        alpha = _ewma_alpha(dt, self.options.residual_tau_s)
        prev = s.resid_ewma[r]
        s.resid_ewma[r] = np.where(np.isnan(prev), residual[new], prev + alpha * (residual[new] - prev))
        s.resid_ts[r] = ts[new]
        s.voltage_z[r] = s.resid_ewma[r] / self.options.voltage_residual_v

    # ------------------------------------------------------------------ outputs

    def anomaly_scores(self, pack_ids: Sequence[str]) -> F64:
        """Every pack's anomaly score: the largest residual over its alert threshold (NaN when unknown).

        The score is the largest of the voltage residual, the thermal residual and the cell
        imbalance, each divided by the threshold that raises its alert: about 0 for a normal
        pack, 1 where an alert is raised.

        Args:
            pack_ids: the packs, in the order wanted (unknown packs get NaN).

        Returns:
            One float per pack.
        """
        s = self._packs
        idx = np.array([self._index.get(p, -1) for p in pack_ids], dtype=np.intp)  # per pack, publish cadence
        ok = idx >= 0
        out = np.full(len(pack_ids), np.nan)
        if not ok.any() or self._per_pack is None or self._per_pack.imbalance_v.size < len(self._ids):
            return out
        i = idx[ok]
        deviation, _ = _imbalance(s.values[i], self._per_pack.series[i])
        parts = np.column_stack(
            [
                np.abs(s.voltage_z[i]),
                np.maximum(s.thermal_z[i], 0.0),
                deviation / self._per_pack.imbalance_v[i],
            ]
        )
        with np.errstate(invalid="ignore"):
            score = np.where(
                np.isfinite(parts).any(axis=1), np.nanmax(np.where(np.isfinite(parts), parts, -np.inf), axis=1), np.nan
            )
        out[ok] = score
        return out

    def active(self) -> pl.DataFrame:
        """The alerts raised and not yet cleared, oldest first."""
        recs = sorted(
            ((key, rec) for key, rec in self._active.items()),
            key=lambda item: (item[1].raised_ms, item[0]),
        )
        kinds = [PACK_KINDS[q].name if p >= 0 else SITE_KINDS[q].name for (p, q), _ in recs]
        sev = [PACK_KINDS[q].severity if p >= 0 else SITE_KINDS[q].severity for (p, q), _ in recs]
        return pl.DataFrame(
            {
                "alert_id": [r.alert_id for _, r in recs],
                "kind": kinds,
                "severity": sev,
                "pack": [r.pack for _, r in recs],
                "cell": [r.cell for _, r in recs],
                "value": [r.value for _, r in recs],
                "threshold": [r.threshold for _, r in recs],
                "raised_ms": [r.raised_ms for _, r in recs],
                "message": [r.message for _, r in recs],
            },
            schema=_ACTIVE_SCHEMA,
        )

    def snapshot(self) -> AlertSnapshot:
        """Return a copy of the whole state (safe to keep: later updates do not change it)."""
        return AlertSnapshot(
            pack_ids=tuple(self._ids),
            packs=self._packs.copy(),
            site=self._site.copy(),
            active=tuple(self._active.items()),
            pending_rows=self._pending.clone(),
            pending_site=self._pending_site.clone(),
            pending_status=self._pending_status.clone(),
            next_tick_ms=self._next_tick,
            watermark_ms=self._watermark,
            counters=tuple(self.counters.items()),
        )

    def restore(self, snapshot: AlertSnapshot) -> None:
        """Continue from a snapshot (taken from an engine with the same options)."""
        self._ids = list(snapshot.pack_ids)
        self._index = {p: i for i, p in enumerate(self._ids)}
        self._lookup = pl.DataFrame(
            {"pack": self._ids, "_i": np.arange(len(self._ids), dtype=np.int64)},
            schema={"pack": pl.String, "_i": pl.Int64},
        )
        self._packs = snapshot.packs.copy()
        self._site = snapshot.site.copy()
        self._active = dict(snapshot.active)
        self._pending = snapshot.pending_rows.clone()
        self._pending_site = snapshot.pending_site.clone()
        self._pending_status = snapshot.pending_status.clone()
        self._next_tick = snapshot.next_tick_ms
        self._watermark = snapshot.watermark_ms
        self.counters = dict(snapshot.counters)
        self._per_pack = None
        self._soc_rows = None


# --------------------------------------------------------------------------- helpers

_ROW_SCHEMA: Final = {
    "pack": pl.String,
    "ts_ms": pl.Int64,
    "seq": pl.Int64,
    **dict.fromkeys(_LAST, pl.Float64),
    "cell_v_min_idx": pl.Int64,
    "cell_v_max_idx": pl.Int64,
    "contactor_closed": pl.Boolean,
}
_ACTIVE_SCHEMA: Final = {
    "alert_id": pl.String,
    "kind": pl.String,
    "severity": pl.String,
    "pack": pl.String,
    "cell": pl.Int64,
    "value": pl.Float64,
    "threshold": pl.Float64,
    "raised_ms": pl.Int64,
    "message": pl.String,
}
_STATUS_SCHEMA: Final = {"pack": pl.String, "state": pl.String, "ts_ms": pl.Int64}
_CELL_KINDS: Final = frozenset({"cell_overvoltage", "cell_undervoltage", "cell_imbalance"})


#: Output columns of :func:`_aggregate`, in order, with their types.
_AGG_SCHEMA: Final = {
    "_key": pl.Int64,
    "_tick": pl.Int64,
    "_i": pl.Int64,
    "n": pl.Int64,
    "ts_first": pl.Int64,
    "ts": pl.Int64,
    "seq_min": pl.Int64,
    "seq_max": pl.Int64,
    "seq_last": pl.Int64,
    **dict.fromkeys(_LAST, pl.Float64),
    "cell_v_min_idx": pl.Int64,
    "cell_v_max_idx": pl.Int64,
    "contactor_closed": pl.Boolean,
    "power_mean": pl.Float64,
    "temp_max_mean": pl.Float64,
    "temp_avg_mean": pl.Float64,
    **{f"{name}__first": pl.Float64 for name in _STUCK},
    **{f"{name}__last": pl.Float64 for name in _STUCK},
    **{f"{name}__chg": pl.Float64 for name in _STUCK},
}
#: Groups at least this long are summed by polars itself (pairwise in blocks of 128, not in row order).
#: Row order below it is what polars 2.1 does (tests/test_speed_equivalence.py checks it against
#: the installed polars: a release that sums otherwise fails that test, not the alerts).
_PAIRWISE_MIN: Final = 128
_NullMask = B | None


def _values(frame: pl.DataFrame, name: str) -> tuple[NDArray[Any], _NullMask]:
    """A column's values (nulls filled) and where it is null (None without nulls)."""
    s = frame.get_column(name)
    if s.null_count() == 0:
        return s.to_numpy(), None
    filled = s.fill_null(value=False) if s.dtype == pl.Boolean else s.fill_null(0)
    return filled.to_numpy(), s.is_null().to_numpy()


def _group_mean(x: F64, null: _NullMask, starts: I64, counts: I64) -> tuple[F64, B]:
    """Each group's mean as polars' group-by gives it, and where it is null (no value in the group).

    Polars adds a group of fewer than 128 rows in row order from 0.0, skipping nulls (a NaN
    propagates), and divides by the number of values; a group of one row is its value. The
    sum runs over the position in the group, for every group at once; the rare longer groups
    are left to polars (it sums them pairwise).
    """
    valid = np.ones(x.size, dtype=np.bool_) if null is None else ~null
    v = x if null is None else np.where(valid, x, 0.0)
    total = np.zeros(starts.size)
    short = counts < _PAIRWISE_MIN
    for j in range(int(counts[short].max(initial=0))):  # over the position in a group: about 10 rows
        at = short & (counts > j)
        total[at] += v[starts[at] + j]
    n_valid = np.add.reduceat(valid, starts) if starts.size else np.zeros(0, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean: F64 = total / n_valid
    one = counts == 1
    mean[one] = x[starts[one]]
    for g in np.flatnonzero(~short).tolist():  # groups of 128 rows and more: rare
        a, b = int(starts[g]), int(starts[g] + counts[g])
        part = pl.Series(x[a:b])
        if null is not None:
            part = part.scatter(np.flatnonzero(null[a:b]), None)
        m = part.mean()
        mean[g] = math.nan if m is None else float(m)  # type: ignore[arg-type]
    return mean, n_valid == 0


def _aggregate(rows: pl.DataFrame, key: I64) -> pl.DataFrame:
    """Per (step, pack) ``key``: count, sequence span, last readings, means, last change of each reading.

    The rows are sorted by key and time, stably (rows of one pack at the same time keep their
    arrival order), and each group is read at its boundaries with numpy. The result is what
    ``rows.sort(key, "ts_ms", maintain_order=True).group_by(key, maintain_order=True).agg(...)``
    gives (``tests/test_speed_equivalence.py`` holds that polars reference), with polars'
    rules: ``last`` is the last row's value even if null; means skip nulls (a NaN
    propagates) and add in row order; min and max skip nulls; a reading changed where it
    differs from the row before in its group, both not null (NaN equals NaN).

    Args:
        rows: the rows (``_ROW_SCHEMA`` with ``_tick`` and ``_i``), ``ts_ms`` not null.
        key: the group of each row (non-negative).

    Returns:
        One row per key, ascending, with the columns of ``_AGG_SCHEMA``.
    """
    if rows.height == 0:
        return pl.DataFrame(schema=_AGG_SCHEMA)
    ts_raw = rows.get_column("ts_ms").to_numpy()
    order = group_time_order(key, ts_raw)
    k = key[order]
    ts = ts_raw[order]
    bounds = np.flatnonzero(k[1:] != k[:-1]) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    ends = np.concatenate([bounds, [k.size]]).astype(np.int64) - 1
    counts = ends - starts + 1
    same = k[1:] == k[:-1]
    out: dict[str, tuple[NDArray[Any], _NullMask]] = {
        "_key": (k[starts], None),
        "_tick": (rows.get_column("_tick").to_numpy()[order][starts], None),
        "_i": (rows.get_column("_i").to_numpy()[order][starts], None),
        "n": (counts, None),
        "ts_first": (ts[starts], None),
        "ts": (ts[ends], None),
    }
    sorted_cols: dict[str, tuple[NDArray[Any], _NullMask]] = {}
    for name in ("seq", *_LAST, "cell_v_min_idx", "cell_v_max_idx", "contactor_closed"):
        values, null = _values(rows, name)
        sorted_cols[name] = (values[order], None if null is None else null[order])
    seq, seq_null = sorted_cols["seq"]
    if seq_null is None:
        out["seq_min"] = (np.minimum.reduceat(seq, starts), None)
        out["seq_max"] = (np.maximum.reduceat(seq, starts), None)
    else:
        none = np.add.reduceat(~seq_null, starts) == 0
        big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        out["seq_min"] = (np.minimum.reduceat(np.where(seq_null, big, seq), starts), none)
        out["seq_max"] = (np.maximum.reduceat(np.where(seq_null, small, seq), starts), none)
    for name in ("seq", *_LAST, "cell_v_min_idx", "cell_v_max_idx", "contactor_closed"):
        values, null = sorted_cols[name]
        out["seq_last" if name == "seq" else name] = (values[ends], None if null is None else null[ends])
    v, v_null = sorted_cols["voltage_v"]
    i, i_null = sorted_cols["current_a"]
    p_null = v_null if i_null is None else (i_null if v_null is None else v_null | i_null)
    out["power_mean"] = _group_mean(v * i, p_null, starts, counts)
    out["temp_max_mean"] = _group_mean(*sorted_cols["temp_max_c"], starts, counts)
    out["temp_avg_mean"] = _group_mean(*sorted_cols["temp_avg_c"], starts, counts)
    for name in _STUCK:
        values, null = sorted_cols[name]
        out[f"{name}__first"] = (values[starts], None if null is None else null[starts])
    for name in _STUCK:
        values, null = sorted_cols[name]
        out[f"{name}__last"] = (values[ends], None if null is None else null[ends])
    no_change = np.iinfo(np.int64).min
    for name in _STUCK:
        values, null = sorted_cols[name]
        moved = (values[1:] != values[:-1]) & ~(np.isnan(values[1:]) & np.isnan(values[:-1])) & same
        if null is not None:
            moved &= ~(null[1:] | null[:-1])
        changed_ts = np.where(np.concatenate([[False], moved]), ts, no_change)
        last_change = np.maximum.reduceat(changed_ts, starts)
        out[f"{name}__chg"] = (last_change.astype(np.float64), last_change == no_change)
    columns = []
    for name, dtype in _AGG_SCHEMA.items():
        values, null = out[name]
        series = pl.Series(name, values, dtype=dtype)
        if null is not None and bool(null.any()):
            series = series.scatter(np.flatnonzero(null), None)
        columns.append(series)
    return pl.DataFrame(columns)


def _imbalance(values: F64, series: F64) -> tuple[F64, B]:
    """The extreme cell's deviation from the mean cell voltage, and whether it is the lowest cell.

    The mean is ``voltage_v / series``; without a series count the deviation is the spread.
    """
    v_max = values[:, _LAST.index("cell_v_max_v")]
    v_min = values[:, _LAST.index("cell_v_min_v")]
    mean = values[:, _LAST.index("voltage_v")] / series
    low, high = mean - v_min, v_max - mean
    low_side: B = ~(high > low)
    deviation: F64 = np.where(np.isfinite(mean), np.maximum(low, high), v_max - v_min)
    return deviation, low_side


def _machine(active: B, pending: I64, raise_c: B, clear_c: B, valid: B, tick: int, durations: tuple[I64, I64]) -> B:
    """Step the hysteresis machine of every (pack, kind) at once; return where an alert changed state.

    A condition (raise while inactive, clear while active) must hold on every evaluation for
    the kind's duration; invalid data holds the state and restarts the count.
    """
    min_ms, clear_ms = durations
    want = np.where(active, clear_c, raise_c) & valid
    pending[...] = np.where(want, np.where(pending < 0, tick, pending), -1)
    need = np.where(active, clear_ms[None, :], min_ms[None, :])
    fired: B = want & (tick - pending >= need)
    active[fired] = ~active[fired]
    pending[fired] = -1
    return fired


def _alert_id(site: str, kind: str, pack: str, ts_ms: int) -> str:
    digest = hashlib.blake2b(f"{site}|{kind}|{pack}|{ts_ms}".encode(), digest_size=6).hexdigest()
    return f"{kind}-{digest}"


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


_UNITS: Final = {
    "cell_overvoltage": ("V", 3),
    "cell_undervoltage": ("V", 3),
    "over_temperature": ("°C", 1),
    "temperature_rise": ("°C/min", 2),
    "over_current": ("A", 1),
    "cell_imbalance": ("V", 3),
    "telemetry_loss": ("share", 2),
    "sensor_stuck": ("s", 0),
    "model_residual": ("V/cell", 3),
    "thermal_residual": ("°C", 1),
}


def _message(kind: str, state: str, pack: str, cell: int | None, value: float, threshold: float) -> str:
    where = f"{pack}" + (f" cell {cell}" if cell is not None else "")
    if kind == "pack_offline":
        head = f"{pack} is offline" if state == "raised" else f"{pack} is back online"
        return f"{head}: {value:.1%} of the site's rated energy" if math.isfinite(value) else head
    if kind == "contactor_open":
        head = f"{pack}: contactor open" if state == "raised" else f"{pack}: contactor closed again"
        return f"{head}: {value:.1%} of the site's rated energy" if math.isfinite(value) else head
    unit, digits = _UNITS.get(kind, ("", 3))
    verb = "raised" if state == "raised" else "cleared"
    shown = f"{value:.{digits}f} {unit} (threshold {threshold:.{digits}f} {unit})"
    return f"{kind.replace('_', ' ')} {verb} on {where}: {shown}"


def alerts_frame(alerts: Sequence[c.Alert]) -> pl.DataFrame:
    """The alerts as a frame with the contract's Alert columns (without ``schema``), for InfluxDB and Parquet."""
    schema = {k: v for k, v in c.polars_schema(c.Alert).items() if k != "schema"}
    rows = [a.model_dump(exclude={"schema_"}) for a in alerts]  # per alert: transitions are rare
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


# --------------------------------------------------------------------------- offline


def alerts_from_run(
    run_dir: Path,
    *,
    options: AlertOptions | None = None,
    core_options: CoreOptions | None = None,
    every_s: float = 60.0,
    batch_rows: int = 1 << 20,
    engine: AlertEngine | None = None,
) -> pl.DataFrame:
    """Replay a run folder through a fresh :class:`TwinCore` and :class:`AlertEngine`; return every transition.

    Windows as in :func:`twin.replay.replay_run`: window ``k`` holds the rows stamped in
    ``(start + (k-1) every, start + k every]``, fed with that window's status and site rows,
    and ``now`` is the window's end. The alerts do not depend on ``every_s`` (grid evaluation).

    Args:
        run_dir: a run folder (``mgtwin emulate --out``, ``mgtwin record``).
        options: the engine's options (default: ``AlertOptions(site=run.site)``).
        core_options: the core's options (default: ``CoreOptions(site=run.site)``).
        every_s: window length, event-time seconds.
        batch_rows: telemetry rows read at a time.
        engine: a fresh engine to use instead (to read its anomaly scores or active alerts after).

    Returns:
        One row per raised or cleared alert, with the contract's Alert columns, in event-time order.
    """
    run = RunFolder.open(run_dir)
    engine = engine or AlertEngine(options or AlertOptions(site=run.site))
    alerts: list[c.Alert] = []

    def on_window(window: ReplayWindow) -> None:
        alerts.extend(
            engine.update(
                window.ingested.telemetry,
                core=window.core,
                now_ms=window.now_ms,
                site=window.decoded.site,
                status=window.decoded.status,
            )
        )

    replay_run(
        run,
        core_options=core_options or CoreOptions(site=run.site),
        options=ReplayOptions(every_s=every_s, batch_rows=batch_rows),
        on_window=on_window,
    )
    return alerts_frame(alerts)
