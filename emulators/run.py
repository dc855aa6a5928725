"""Run an emulation: the site's inputs, the dispatch, the packs' physics, their sensors, faults and aging.

One loop over time steps drives everything; within a step every pack and cell is updated
by numpy at once. The loop hands its output to a sink chunk by chunk (frames in the
contract's columns): :class:`~emulators.output.RunWriter` for files, the MQTT publisher for a
live site. What is produced depends only on the scenario, the seed and the options, never
on the chunk size, the sink or the wall clock, so the same seed gives the same messages
at any speed.

Random streams: the fleet, the site's inputs, the sensors' persistent errors, the per-step
sensor noise and the faults each draw from their own child of the scenario's seed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
from numpy.typing import NDArray

from emulators.aging import FleetAging
from emulators.fleet import Fleet, build_fleet, with_intake
from emulators.pack import PackBank, StepResult
from emulators.scenario import (
    ContactorOpen,
    GatewayOffline,
    PackSelector,
    Scenario,
    SensorOffset,
    SensorStuck,
    TelemetryDropout,
    ThermalRunawayPrecursor,
    WeakCell,
)
from emulators.sensors import FAULT_BITS, BmsModel, SensorModel
from emulators.site import SiteTrace, battery_request_w, dispatch, grid_power_w, site_trace
from emulators.truth import time_to_floor_s

__all__ = ["Chunk", "Emulation", "EmulationOptions", "Sink"]

F64 = NDArray[np.float64]
B = NDArray[np.bool_]

_HOT_SPOT_K_PER_W: Final = 0.02  # how far the hottest sensor reads above the mean per watt of a local fault


@dataclass(frozen=True, slots=True)
class EmulationOptions:
    """How to run a scenario.

    Attributes:
        duration_s: simulated time.
        dt_s: physics time step (telemetry is sampled at the scenario's cadence, a multiple of it).
        cell_level: model every cell group, or two groups per string (faster).
        chunk_s: simulated time handed to the sink at once.
        truth_every_s: cadence of the per-pack truth table.
        site_truth_every_s: cadence of the site's forward-simulated runtime and ride-through.
        aging_every_s: how often the aging laws advance the packs.
        aging_speedup: multiplies the aging rates (to see months of fade in a short run).
        truth: produce the truth tables at all.
    """

    duration_s: float
    dt_s: float = 1.0
    cell_level: bool = True
    chunk_s: float = 600.0
    truth_every_s: float = 10.0
    site_truth_every_s: float = 900.0
    aging_every_s: float = 3600.0
    aging_speedup: float = 1.0
    truth: bool = True

    def __post_init__(self) -> None:
        """Check the options against each other."""
        if self.duration_s <= 0 or self.dt_s <= 0:
            msg = "duration and time step must be positive"
            raise ValueError(msg)
        for name in ("chunk_s", "truth_every_s", "site_truth_every_s", "aging_every_s"):
            if getattr(self, name) < self.dt_s:
                msg = f"{name} must be at least the time step dt_s"
                raise ValueError(msg)


@dataclass(slots=True)
class Chunk:
    """Frames produced by one chunk of simulated time (columns as in :mod:`emulators.output`)."""

    telemetry: pl.DataFrame
    cells: pl.DataFrame
    site: pl.DataFrame
    status: pl.DataFrame
    truth: pl.DataFrame | None = None
    site_truth: pl.DataFrame | None = None
    end_ms: int = 0


class Sink(Protocol):
    """Where an emulation's output goes."""

    def meta(self, packs: pl.DataFrame, status: pl.DataFrame) -> None:
        """Receive the packs' metadata and their first status, before any telemetry."""

    def chunk(self, chunk: Chunk) -> None:
        """Receive one chunk of output."""


@dataclass
class _FaultWindow:
    kind: str
    packs: NDArray[np.int64]
    start: int
    end: int
    spec: object
    state: dict[str, F64] = field(default_factory=dict)


class Emulation:
    """A scenario, drawn and ready to run.

    Args:
        scenario: the validated scenario (scale it first with ``Scenario.scaled``).
        options: run options.

    Examples:
        >>> from emulators.scenario import load_scenario
        >>> emu = Emulation(load_scenario("small"), EmulationOptions(duration_s=60, chunk_s=60, truth=False))
        >>> chunks = list(emu.chunks())
        >>> chunks[0].telemetry.height == 60 * emu.fleet.n_packs
        True
    """

    def __init__(self, scenario: Scenario, options: EmulationOptions) -> None:
        self.scenario = scenario
        self.options = options
        root = np.random.default_rng(scenario.seed)
        rng_fleet, rng_site, rng_sensors, self._rng_noise, rng_faults = root.spawn(5)
        self.fleet: Fleet = build_fleet(scenario, rng_fleet, cell_level=options.cell_level)
        self.trace: SiteTrace = site_trace(scenario, horizon_s=options.duration_s, dt_s=options.dt_s, rng=rng_site)
        n = self.fleet.n_packs
        self.bank = PackBank(self.fleet.params, temp_c=np.full(n, float(self.trace.ambient_c[0])))
        self._settle_temperature()
        self.sensors = SensorModel.draw(scenario.sensors, n, rng_sensors)
        self.bms = BmsModel.start(
            self.bank.pack_soc(), self.fleet.params.rated_group_ah, self.fleet.bms_soh, scenario.sensors, rng_sensors
        )
        self._faults = self._resolve_faults(rng_faults)
        self._rng_faults = rng_faults
        self.aging = FleetAging(self.fleet, self.bank, speedup=options.aging_speedup, rng=self._rng_noise)
        # The intake test measured the string's capacity (its weakest cells) at commissioning,
        # before the site's aging so far: what a full capacity test at intake reports.
        usable_now = self.bank.pack_capacity_ah() / self.fleet.params.rated_group_ah
        test_error = self.fleet.meta["intake_soh"].fill_null(0.0).to_numpy() - self.fleet.soh0
        self.fleet = with_intake(self.fleet, usable_now * self.aging.intake_ratio + np.clip(test_error, 0.0, None))
        self.seq = np.zeros(n, dtype=np.int64)
        self.cell_seq = np.zeros(n, dtype=np.int64)
        self.site_seq = 0
        self.online = np.ones(n, dtype=bool)
        self.steps_done = 0

    # ------------------------------------------------------------------ set-up

    def _settle_temperature(self) -> None:
        """Start each pack at its container's temperature rather than the ambient."""
        env = self._container_temp(
            np.full(self.fleet.n_packs, float(self.trace.ambient_c[0])), np.zeros(self.fleet.n_packs)
        )
        self.bank.temp_c[:] = env

    def _container_temp(self, ambient_c: F64, heat_w: F64) -> F64:
        """Container air temperature per pack: HVAC holds it between the setpoints within its capacity."""
        c = self.scenario.container
        ua = max(c.envelope_ua_w_per_k_per_pack, 1e-6)
        free = ambient_c + heat_w / ua  # no HVAC
        cool_needed = ua * (free - c.cooling_setpoint_c)
        heat_needed = ua * (c.heating_setpoint_c - free)
        too_hot = c.cooling_setpoint_c + np.maximum(cool_needed - c.cooling_capacity_w_per_pack, 0.0) / ua
        too_cold = c.heating_setpoint_c - np.maximum(heat_needed - c.heating_capacity_w_per_pack, 0.0) / ua
        out: F64 = np.where(free > c.cooling_setpoint_c, too_hot, np.where(free < c.heating_setpoint_c, too_cold, free))
        return out

    def _select(self, selector: PackSelector, rng: np.random.Generator) -> NDArray[np.int64]:
        groups = [g.name for g in self.scenario.pack_groups if g.count > 0]
        gi = self.fleet.group_index
        if selector.group is not None:
            members = np.flatnonzero(gi == groups.index(selector.group))
            if selector.index is not None:
                return members[[min(selector.index, members.size - 1)]].astype(np.int64)
        else:
            members = np.arange(self.fleet.n_packs)
        count = min(selector.count, members.size)
        return np.sort(rng.choice(members, size=count, replace=False)).astype(np.int64)

    def _resolve_faults(self, rng: np.random.Generator) -> list[_FaultWindow]:
        dt = self.options.dt_s
        total = round(self.options.duration_s / dt)
        out = []
        for fault in self.scenario.faults:
            start = round(fault.start_s / dt)
            end = total + 1 if fault.duration_s is None else start + round(fault.duration_s / dt)
            out.append(
                _FaultWindow(kind=fault.kind, packs=self._select(fault.target, rng), start=start, end=end, spec=fault)
            )
        return out

    def _active(self, step: int) -> list[_FaultWindow]:
        return [f for f in self._faults if f.start <= step < f.end]

    def chunks(self, *, progress: Callable[[int], None] | None = None) -> Iterator[Chunk]:
        """Run the emulation, yielding one :class:`Chunk` per ``chunk_s`` of simulated time.

        Args:
            progress: called with the number of steps done after each chunk.
        """
        opt = self.options
        dt = opt.dt_s
        total = round(opt.duration_s / dt)
        per_chunk = max(1, round(opt.chunk_s / dt))
        tele_every = max(1, round(self.scenario.telemetry.pack_telemetry_s / dt))
        cell_every = max(1, round(self.scenario.telemetry.cells_s / dt))
        truth_every = max(1, round(opt.truth_every_s / dt))
        site_truth_every = max(1, round(opt.site_truth_every_s / dt))
        aging_every = max(1, round(opt.aging_every_s / dt))
        for first in range(0, total, per_chunk):
            steps = range(first, min(first + per_chunk, total))
            yield self._run_chunk(steps, tele_every, cell_every, truth_every, site_truth_every, aging_every)
            if progress is not None:
                progress(steps.stop)

    def _run_chunk(
        self,
        steps: range,
        tele_every: int,
        cell_every: int,
        truth_every: int,
        site_truth_every: int,
        aging_every: int,
    ) -> Chunk:
        fleet, bank, trace, sc = self.fleet, self.bank, self.trace, self.scenario
        n = fleet.n_packs
        dt = self.options.dt_s
        rng = self._rng_noise
        floor = sc.dispatch.reserve_floor_soc
        target = sc.dispatch.target_soc
        v_nom = fleet.params.derived("v_nom")
        tele = _TelemetryRows(sum(1 for step in steps if step % tele_every == 0), n)
        cells_rows: list[_CellSample] = []
        site_rows: list[tuple[int, int, float, float, float, float, float]] = []
        site_steps: list[tuple[int, float]] = []  # (step, battery_w) of each site row, for the grid balance
        at = np.arange(steps.start, steps.stop)
        request_below, request_above = (
            battery_request_w(
                trace.load_w[at],
                trace.solar_w[at],
                np.full(at.size, soc),
                policy=sc.dispatch,
                grid=sc.grid,
                grid_available=trace.grid_available[at],
            )
            for soc in (-np.inf, np.inf)
        )
        status_rows: list[tuple[str, str, int]] = []
        truth_rows: list[pl.DataFrame] = []
        site_truth_rows: list[tuple[int, float, float, float, float, float, int]] = []
        for step in steps:
            ts = int(trace.times_ms[step])
            active = self._active(step)
            bank.contactor_closed[:] = True
            bank.extra_heat_w[:] = 0.0
            offline = np.zeros(n, dtype=bool)
            for f in active:
                spec = f.spec  # `type(...) is`: the specs are final pydantic models, and isinstance is slow on them
                if type(spec) is ContactorOpen:
                    bank.contactor_closed[f.packs] = False
                elif type(spec) is GatewayOffline:
                    offline[f.packs] = True
                elif type(spec) is ThermalRunawayPrecursor:
                    elapsed = (step - f.start) * dt
                    bank.extra_heat_w[f.packs] = spec.self_heat_w * np.exp(min(elapsed / 1800.0, 5.0))
                elif type(spec) is WeakCell and "applied" not in f.state:
                    for p in f.packs:  # a handful of packs, once
                        cell = spec.cell_index
                        if cell is None:
                            cell = int(rng.integers(fleet.params.series[p]))
                        col = min(cell, bank.capacity_ah.shape[1] - 1) if self.options.cell_level else 0
                        bank.set_cell(
                            int(p),
                            col,
                            capacity_factor=spec.capacity_factor,
                            resistance_factor=spec.resistance_factor,
                            top_balanced=step == 0,  # present from the start: weak all along
                        )
                    f.state["applied"] = np.ones(1)
            changed = offline != ~self.online
            if changed.any():
                for p in np.flatnonzero(changed):
                    status_rows.append((fleet.pack_ids[p], "offline" if offline[p] else "online", ts))
                self.online = ~offline

            # Site balance and dispatch.
            q_low, q_high = bank.string_charge_ah()
            usable = q_low + q_high
            energy_wh = np.clip(q_low - floor * usable, 0.0, None) * v_nom
            headroom_wh = np.clip(target * usable - q_low, 0.0, None) * v_nom
            site_soc = float(q_low.sum() / max(usable.sum(), 1e-9))
            load, solar = float(trace.load_w[step]), float(trace.solar_w[step])
            # The policy's request with and without grid charging, for the chunk at once (elementwise).
            request = float((request_below if site_soc < sc.dispatch.target_soc else request_above)[step - steps.start])
            p_dis, p_chg = bank.power_limits_w()
            excluded = offline | ~bank.contactor_closed
            plan = dispatch(
                request,
                discharge_energy_wh=energy_wh,
                charge_headroom_wh=headroom_wh,
                max_discharge_w=p_dis,
                max_charge_w=p_chg,
                excluded=excluded,
                dt_s=dt,
            )
            env = self._container_temp(np.full(n, float(trace.ambient_c[step])), bank.extra_heat_w)
            result = bank.step(plan.pack_power_w, env, dt_s=dt)
            battery_w = float((result.current_a * result.voltage_v).sum())

            # Sensors, every telemetry period.
            measured_i = self.sensors.current(result.current_a, rng)
            v_max_cell = fleet.params.derived("v_max")
            v_min_cell = fleet.params.derived("v_min")
            self.bms.update(
                measured_i,
                dt,
                at_top=(result.cell_v_max_v >= v_max_cell - 0.005) & (result.current_a <= 0),
                at_bottom=(result.cell_v_min_v <= v_min_cell + 0.005) & (result.current_a >= 0),
            )
            if step % tele_every == 0:
                self._sample_telemetry(tele, ts, result, measured_i, env, offline, active, rng)
                site_rows.append(
                    (
                        ts,
                        self.site_seq,
                        round(load + rng.normal(0.0, 0.002 * load), 1),
                        round(solar, 1),
                        0.0,  # grid power, filled in below for all rows at once
                        round(battery_w, 1),
                        round(float(trace.ambient_c[step]), 2),
                    )
                )
                site_steps.append((step, battery_w))
                self.site_seq += 1
            if step % cell_every == 0:
                cells_rows.append(self._sample_cells(ts, offline, active, rng))
            if self.options.truth and step % truth_every == 0:
                truth_rows.append(self._truth(ts, result, excluded))
            if self.options.truth and step % site_truth_every == 0:
                ambient_env = env
                runtime = time_to_floor_s(bank, battery_w, floor_soc=floor, env_temp_c=ambient_env, excluded=excluded)
                ride = time_to_floor_s(bank, load, floor_soc=floor, env_temp_c=ambient_env, excluded=excluded)
                e_floor = float(bank.energy_to_floor_wh(floor)[~excluded].sum() / 1000.0)
                site_truth_rows.append((ts, e_floor, battery_w, load, runtime, ride, int((~excluded).sum())))
            self.aging.accumulate(bank.pack_soc(), result.current_a, result.temp_c, dt)
            self.steps_done = step + 1
            if self.steps_done % aging_every == 0:
                self.aging.apply()
        if site_steps:
            # The grid closes the balance; elementwise, so one call for the chunk gives what
            # one call per row would.
            at = np.array([s for s, _ in site_steps])
            grid_w = grid_power_w(
                trace.load_w[at],
                trace.solar_w[at],
                np.array([b for _, b in site_steps]),
                grid=sc.grid,
                available=trace.grid_available[at],
            ).grid_w
            site_rows = [(*row[:4], round(float(g), 1), *row[5:]) for row, g in zip(site_rows, grid_w, strict=True)]
        return Chunk(
            telemetry=self._tele_frame(tele),
            cells=self._cells_frame(cells_rows),
            site=pl.DataFrame(
                site_rows,
                schema=["ts_ms", "seq", "load_w", "solar_w", "grid_w", "battery_w", "ambient_c"],
                orient="row",
            ).with_columns(pl.lit(sc.site).alias("site")),
            status=pl.DataFrame(status_rows, schema=["pack", "state", "ts_ms"], orient="row"),
            truth=pl.concat(truth_rows) if truth_rows else None,
            site_truth=pl.DataFrame(
                site_truth_rows,
                schema=[
                    "ts_ms",
                    "energy_to_floor_kwh",
                    "battery_w",
                    "load_w",
                    "runtime_s",
                    "ridethrough_s",
                    "packs_available",
                ],
                orient="row",
            )
            if site_truth_rows
            else None,
            end_ms=int(trace.times_ms[steps.stop - 1]),
        )

    def _sample_telemetry(
        self,
        out: _TelemetryRows,
        ts: int,
        result: StepResult,
        measured_i: F64,
        env: F64,
        offline: B,
        active: list[_FaultWindow],
        rng: np.random.Generator,
    ) -> None:
        """Add one telemetry sample of every pack to ``out`` (every pack, and which are not lost)."""
        fleet, sensors = self.fleet, self.sensors
        n = fleet.n_packs
        v = sensors.pack_voltage(result.voltage_v, rng)
        i = measured_i
        rise = result.heat_w / np.maximum(fleet.params.derived("ua_w_per_k"), 1e-9)
        temps = sensors.temperatures(result.temp_c, rise, rng)
        temps[:, -1] += self.bank.extra_heat_w * _HOT_SPOT_K_PER_W
        # Reductions over the few sensors of each pack, along contiguous rows of the transpose.
        by_sensor = np.ascontiguousarray(temps.T)
        t_min = np.minimum.reduce(by_sensor, axis=0)
        t_max = np.maximum.reduce(by_sensor, axis=0)
        t_avg = np.round(np.add.reduce(by_sensor, axis=0) / by_sensor.shape[0], 2)
        cmin = sensors.cell_voltage(result.cell_v_min_v, rng)
        cmax = sensors.cell_voltage(result.cell_v_max_v, rng)
        if self.options.cell_level:
            imin, imax = result.cell_v_min_idx, result.cell_v_max_idx
        else:
            weak = fleet.cell_position[:, 0]
            imin = np.where(result.cell_v_min_idx == 0, weak, (weak + 1) % fleet.params.series)
            imax = np.where(result.cell_v_max_idx == 0, weak, (weak + 1) % fleet.params.series)
        keep = ~offline
        bits = np.zeros(n, dtype=np.int64)
        bits |= np.where(t_max > 55.0, FAULT_BITS["over_temperature"], 0)
        bits |= np.where(~self.bank.contactor_closed, FAULT_BITS["contactor_open"], 0)
        for f in active:
            spec = f.spec
            if type(spec) is TelemetryDropout:
                lost = rng.random(f.packs.size) < spec.loss_fraction
                keep[f.packs[lost]] = False
            elif type(spec) is SensorStuck or type(spec) is SensorOffset:
                target = {"pack_voltage_v": v, "current_a": i, "temp_c": t_max, "cell_voltage_v": cmin}[spec.signal]
                if type(spec) is SensorOffset:
                    target[f.packs] += spec.offset
                else:
                    held = f.state.setdefault(spec.signal, target[f.packs].copy())
                    target[f.packs] = held
                    if spec.signal == "temp_c":
                        t_min[f.packs] = np.minimum(t_min[f.packs], held)
                        t_avg[f.packs] = held
        # Every sample advances the gateway's sequence number, lost or not, so gaps show losses.
        row = out.next_row(ts)
        d = out.data
        d["keep"][row] = keep
        d["seq"][row] = self.seq
        self.seq += 1
        d["voltage_v"][row] = v
        d["current_a"][row] = i
        d["temp_min_c"][row] = t_min
        d["temp_max_c"][row] = t_max
        d["temp_avg_c"][row] = t_avg
        np.round(cmin, 4, out=d["cell_v_min_v"][row])
        np.round(cmax, 4, out=d["cell_v_max_v"][row])
        d["cell_v_min_idx"][row] = imin
        d["cell_v_max_idx"][row] = imax
        np.round(self.bms.soc, 4, out=d["soc_bms"][row])
        np.round(self.bms.soh_reported, 4, out=d["soh_bms"][row])
        d["contactor_closed"][row] = self.bank.contactor_closed
        d["fault_bits"][row] = bits
        self._last_temps = temps

    def _tele_frame(self, tele: _TelemetryRows) -> pl.DataFrame:
        """Build the chunk's telemetry frame, one row per pack and sample, less the lost rows."""
        if tele.rows == 0:
            return pl.DataFrame(schema=_TELE_SCHEMA)
        n, samples = self.fleet.n_packs, tele.rows
        keep = tele.data["keep"][:samples].reshape(-1)
        rows = None if keep.all() else np.flatnonzero(keep)

        def column(name: str) -> NDArray[np.generic]:
            data = tele.data[name][:samples].reshape(-1)
            return data if rows is None else data[rows]

        pack_index = np.tile(np.arange(n), samples)
        ts = np.repeat(tele.ts_ms[:samples], n)
        data = {
            "pack": _pack_series(self.fleet.pack_ids).gather(pack_index if rows is None else pack_index[rows]),
            "ts_ms": ts if rows is None else ts[rows],
            **{k: column(k) for k in _TELE_COLUMNS[2:]},
        }
        frame = pl.DataFrame(data)
        return frame.with_columns(pl.col(c).round(3) for c in ("voltage_v", "current_a", "temp_min_c", "temp_max_c"))

    def _sample_cells(self, ts: int, offline: B, active: list[_FaultWindow], rng: np.random.Generator) -> _CellSample:
        """Measure every cell of every pack; return the rows of the packs not lost, for :meth:`_cells_frame`."""
        fleet, bank = self.fleet, self.bank
        n = fleet.n_packs
        series = fleet.params.series
        s_max = int(series.max())
        # Two work arrays, reused: the true and the measured cell voltages.
        work = getattr(self, "_cell_work", None)
        if work is None or work[0].shape != (n, s_max):
            work = self._cell_work = (np.empty((n, s_max)), np.empty((n, s_max)))
        if self.options.cell_level:
            volts = bank.cell_voltages(out=work[0])
        else:
            group = bank.cell_voltages()
            volts = np.repeat(group[:, 1:2], s_max, axis=1)
            volts[np.arange(n), fleet.cell_position[:, 0]] = group[:, 0]
            volts[np.arange(s_max)[None, :] >= series[:, None]] = np.nan
        measured = self.sensors.cell_voltage(volts, rng, out=work[1])
        np.round(measured, 4, out=measured)
        keep = ~offline
        for f in active:
            if type(f.spec) is TelemetryDropout:
                keep[f.packs[rng.random(f.packs.size) < f.spec.loss_fraction]] = False
        temps = getattr(self, "_last_temps", None)
        if temps is None:
            temps = np.repeat(bank.temp_c[:, None], 6, axis=1)
        idx = np.flatnonzero(keep)
        seq = self.cell_seq[idx].copy()
        self.cell_seq += 1
        # Each pack's list holds its first ``series`` values, row after row.
        valid = np.arange(measured.shape[1])[None, :] < series[:, None]
        valid[~keep] = False
        return _CellSample(ts, idx, seq, measured[valid], series[idx], np.round(temps[idx], 2))

    def _cells_frame(self, samples: list[_CellSample]) -> pl.DataFrame:
        """The chunk's cell-voltage frame, built once from its samples (rows in sample order)."""
        if not samples:
            return pl.DataFrame(schema=_CELLS_SCHEMA)
        idx = np.concatenate([c.packs for c in samples])
        temps = np.concatenate([c.temps_c for c in samples])
        return pl.DataFrame(
            {
                "pack": _pack_series(self.fleet.pack_ids).gather(idx),
                "ts_ms": np.concatenate([np.full(c.packs.size, c.ts_ms, dtype=np.int64) for c in samples]),
                "seq": np.concatenate([c.seq for c in samples]),
                "cell_voltages_v": _list_series([(c.volts, c.counts) for c in samples]),
                "temps_c": _list_series([(temps.reshape(-1), np.full(idx.size, temps.shape[1]))]),
            }
        )

    def _truth(self, ts: int, result: object, excluded: B) -> pl.DataFrame:
        from emulators.pack import StepResult

        assert isinstance(result, StepResult)
        bank, fleet = self.bank, self.fleet
        floor = self.scenario.dispatch.reserve_floor_soc
        cap = bank.pack_capacity_ah()
        n = fleet.n_packs
        return pl.DataFrame(
            {
                "ts_ms": np.full(n, ts, dtype=np.int64),
                "pack": list(fleet.pack_ids),
                "soc": bank.pack_soc(),
                "soc_cell_mean": (np.clip(bank.soc, 0, 1) * fleet.params.weight).sum(axis=1) / fleet.params.series,
                "capacity_ah": cap,
                "soh": cap / fleet.params.rated_group_ah,
                "r0_ohm": bank.resistance_ohm(),
                "r0_ohm_25c": bank.resistance_ohm_at(25.0, 0.5),
                "temp_c": result.temp_c,
                "current_a": result.current_a,
                "voltage_v": result.voltage_v,
                "energy_to_floor_kwh": bank.energy_to_floor_wh(floor) / 1000.0,
                "available": ~excluded,
            }
        )

    def status_frame(self) -> pl.DataFrame:
        """Every pack online at the start (the retained status each gateway publishes first)."""
        ts = int(self.trace.times_ms[0])
        return pl.DataFrame(
            {
                "pack": list(self.fleet.pack_ids),
                "state": ["online"] * self.fleet.n_packs,
                "ts_ms": [ts] * self.fleet.n_packs,
            }
        )

    def run(self, sink: Sink, *, progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """Run to the end into ``sink``; return timing figures."""
        started = time.perf_counter()
        sink.meta(self.fleet.meta, self.status_frame())
        for chunk in self.chunks(progress=progress):
            sink.chunk(chunk)
        wall = time.perf_counter() - started
        steps = self.steps_done
        return {
            "wall_s": wall,
            "steps": float(steps),
            "pack_steps_per_s": steps * self.fleet.n_packs / max(wall, 1e-9),
            "realtime_factor": steps * self.options.dt_s / max(wall, 1e-9),
        }


@dataclass(frozen=True, slots=True)
class _CellSample:
    """One cell-voltage sample: the packs not lost, their sequence numbers, voltages and temperatures."""

    ts_ms: int
    packs: NDArray[np.intp]
    seq: NDArray[np.int64]
    volts: F64  # every kept pack's ``counts`` values, pack after pack
    counts: NDArray[np.int64]
    temps_c: F64  # (kept packs, sensors)


class _TelemetryRows:
    """A chunk's telemetry samples as ``(samples, packs)`` arrays, filled one sample at a time."""

    def __init__(self, samples: int, n_packs: int) -> None:
        shape = (samples, n_packs)
        self.ts_ms = np.empty(samples, dtype=np.int64)
        self.data: dict[str, NDArray[np.generic]] = {
            "keep": np.empty(shape, dtype=bool),
            **{k: np.empty(shape, dtype=_TELE_DTYPES[k]) for k in _TELE_COLUMNS[2:]},
        }
        self.rows = 0

    def next_row(self, ts_ms: int) -> int:
        """Start the next sample at ``ts_ms``; return its row."""
        row = self.rows
        self.ts_ms[row] = ts_ms
        self.rows += 1
        return row


@functools.lru_cache(maxsize=4)
def _pack_series(pack_ids: tuple[str, ...]) -> pl.Series:
    """The pack ids as a polars column to gather rows from."""
    return pl.Series("pack", pack_ids, dtype=pl.String)


def _list_series(pieces: list[tuple[F64, NDArray[np.int64]]]) -> pl.Series:
    """A ``List(Float64)`` column: per piece ``(values, counts)``, row *k* holds the next ``counts[k]`` values.

    Each piece becomes one Arrow chunk, so the values are not copied into one buffer.
    """
    chunks = []
    for values, counts in pieces:
        offsets = np.zeros(counts.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        chunks.append(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float64())))
    out = pl.from_arrow(pa.chunked_array(chunks, type=pa.large_list(pa.float64())))
    assert isinstance(out, pl.Series)
    return out


_TELE_COLUMNS: Final = (
    "pack",
    "ts_ms",
    "seq",
    "voltage_v",
    "current_a",
    "temp_min_c",
    "temp_max_c",
    "temp_avg_c",
    "cell_v_min_v",
    "cell_v_max_v",
    "cell_v_min_idx",
    "cell_v_max_idx",
    "soc_bms",
    "soh_bms",
    "contactor_closed",
    "fault_bits",
)
_TELE_SCHEMA: Final = {
    "pack": pl.String,
    "ts_ms": pl.Int64,
    "seq": pl.Int64,
    **dict.fromkeys(_TELE_COLUMNS[3:10], pl.Float64),
    "cell_v_min_idx": pl.Int64,
    "cell_v_max_idx": pl.Int64,
    "soc_bms": pl.Float64,
    "soh_bms": pl.Float64,
    "contactor_closed": pl.Boolean,
    "fault_bits": pl.Int64,
}
_TELE_DTYPES: Final = {
    k: np.int64 if v == pl.Int64 else np.bool_ if v == pl.Boolean else np.float64 for k, v in _TELE_SCHEMA.items()
}
_CELLS_SCHEMA: Final[dict[str, pl.DataType | type[pl.DataType]]] = {
    "pack": pl.String,
    "ts_ms": pl.Int64,
    "seq": pl.Int64,
    "cell_voltages_v": pl.List(pl.Float64),
    "temps_c": pl.List(pl.Float64),
}
