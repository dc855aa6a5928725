"""The emulated packs' true time to end of life: their own aging laws run forward under the recent duty.

"How long until this pack's SoH falls to the end-of-life threshold?" is answered the way the
emulated world would find out: each pack's true aging state (its law, its rate scalar, its
knee, :class:`emulators.aging.FleetAging`) is advanced forward under the duty it has seen
recently, repeated, until its true SoH crosses the threshold. This is the truth a RUL
forecast is scored against (``eol_truth.parquet``).

The duty (:class:`Duty`) is the recent window's stressor statistics per pack, taken from the
run's truth table (true usable SoC, true temperature and current, true capacity), in the
emulator's own chunk convention: temperature, SoC occupancy and C-rates are time averages over
the window, the depth of discharge is the mean of the per-chunk depths (``aging_every_s``
chunks, as :meth:`FleetAging.stressors` sees them), and the throughput is the window's EFC per
day, EFC counted against the present usable capacity as :class:`FleetAging` counts it.

Forward simulation: steps of a growing length (``step_fraction`` of the pack's law age, at
least ``min_step_days``), each step one scaled copy of the duty: the laws' rates depend on the
averages, and their states advance by BLAST-Lite's incremental rules, which are exact in the
limit of small steps; the knee is exact at any step. The crossing is interpolated linearly
within the step. Repeating the averaged window rather than its chunk sequence ignores the
within-window spread of temperature and DoD in the non-linear rates (about 1 % for a daily
±5 K swing at 37 kJ/mol; see :func:`true_time_to_eol` and its test).

Time and throughput are in the run's own units: days of scenario time and real EFC; the
run's ``aging_speedup`` multiplies both as the laws see them, exactly as during the run, so
with a speedup the time to end of life is in days *of that accelerated run*.

How the emulate command writes it (after the run folder is closed, with ``--truth``)::

    from emulators.eol import write_eol_truth
    write_eol_truth(emulation, out)         # reads out/truth.parquet, writes out/eol_truth.parquet
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import polars as pl
from numpy.typing import NDArray

from emulators.aging import FleetAging
from twin.chemistry.aging import Stressors, stressors_from_series

if TYPE_CHECKING:
    from emulators.run import Emulation

__all__ = [
    "DEFAULT_EOL_SOH",
    "Duty",
    "EolResult",
    "duty_from_truth",
    "eol_truth_frame",
    "true_time_to_eol",
    "write_eol_truth",
]

F64 = NDArray[np.float64]

#: End-of-life SoH thresholds by pack life (issue 6): a second-life pack at 60 %, a new one at 70 %.
DEFAULT_EOL_SOH: Final = {"second_life": 0.6, "new": 0.7}
_MS_PER_DAY: Final = 86_400_000.0


@dataclass(frozen=True)
class Duty:
    """One day of a pack's recent duty, as the aging laws see it (arrays, one value per pack).

    Attributes:
        temp_k: time-averaged cell temperature, K.
        soc_mean: time-averaged usable SoC, fraction.
        dod: mean depth of discharge of a chunk of ``chunk_s``, fraction.
        c_rate_mean: time-averaged |I|/Q, rest included, 1/h.
        c_rate_charge_mean: mean |I|/Q while charging, 1/h.
        c_rate_discharge_mean: mean |I|/Q while discharging, 1/h.
        efc_per_day: equivalent full cycles per day (real, not sped up).
        soc_occupancy: (n_packs, 51) share (``twin.chemistry.aging.SOC_GRID`` nodes) of time near each SoC node.
        window_days: days of the run the statistics come from.
    """

    temp_k: F64
    soc_mean: F64
    dod: F64
    c_rate_mean: F64
    c_rate_charge_mean: F64
    c_rate_discharge_mean: F64
    efc_per_day: F64
    soc_occupancy: F64
    window_days: float

    def stressors(self, days: F64, speedup: float) -> Stressors:
        """Return the stressors of ``days`` (per pack) of this duty, as the laws see them.

        Args:
            days: length of the step per pack, days of scenario time.
            speedup: the run's aging speedup (multiplies time and throughput).

        Returns:
            The stressors.
        """
        return Stressors(
            dt_days=days * speedup,
            temp_k=self.temp_k,
            soc_mean=self.soc_mean,
            dod=self.dod,
            c_rate_mean=self.c_rate_mean,
            c_rate_charge_mean=self.c_rate_charge_mean,
            c_rate_discharge_mean=self.c_rate_discharge_mean,
            efc=self.efc_per_day * days * speedup,
            soc_occupancy=self.soc_occupancy,
        )

    def take(self, idx: NDArray[np.intp]) -> Duty:
        """Return the duty of the packs ``idx``."""
        return Duty(
            temp_k=self.temp_k[idx],
            soc_mean=self.soc_mean[idx],
            dod=self.dod[idx],
            c_rate_mean=self.c_rate_mean[idx],
            c_rate_charge_mean=self.c_rate_charge_mean[idx],
            c_rate_discharge_mean=self.c_rate_discharge_mean[idx],
            efc_per_day=self.efc_per_day[idx],
            soc_occupancy=self.soc_occupancy[idx],
            window_days=self.window_days,
        )


def duty_from_truth(
    truth: pl.DataFrame, pack_ids: tuple[str, ...], *, window_days: float = 7.0, chunk_s: float = 3600.0
) -> Duty:
    """Summarise the last ``window_days`` of a run's truth table as one day of duty per pack.

    Args:
        truth: the run's truth rows (``ts_ms``, ``pack``, ``soc``, ``temp_c``, ``current_a``,
            ``capacity_ah``), every pack at every sample time.
        pack_ids: the packs, in the order of the result.
        window_days: how much of the end of the run to summarise, days (all of it if shorter).
        chunk_s: the aging chunk the depth of discharge is taken over, s (the run's ``aging_every_s``).

    Returns:
        The duty.

    Raises:
        ValueError: a pack without truth rows, or fewer than two sample times in the window.
    """
    end = int(truth.get_column("ts_ms").max())  # type: ignore[arg-type]
    start = end - round(window_days * _MS_PER_DAY)
    rows = truth.filter(pl.col("ts_ms") >= start).select("ts_ms", "pack", "soc", "temp_c", "current_a", "capacity_ah")
    missing = set(pack_ids) - set(rows.get_column("pack").unique().to_list())
    if missing:
        msg = f"no truth rows for {len(missing)} pack(s), e.g. {sorted(missing)[0]!r}"
        raise ValueError(msg)

    def grid(column: str) -> F64:
        wide = rows.pivot(on="pack", index="ts_ms", values=column).sort("ts_ms")
        return np.asarray(wide.select(list(pack_ids)).to_numpy(), dtype=np.float64)

    times = np.sort(rows.get_column("ts_ms").unique().to_numpy()).astype(np.float64) / 1000.0
    if times.size < 2:
        msg = "the truth window holds fewer than two sample times"
        raise ValueError(msg)
    soc, current, temp, cap = grid("soc"), grid("current_a"), grid("temp_c"), grid("capacity_ah")
    capacity = np.nanmean(cap, axis=0)
    s = stressors_from_series(times, soc, current, capacity, temp)
    # Depth of discharge per aging chunk, as FleetAging sees it, averaged over the window.
    chunk = np.floor((times - times[0]) / chunk_s).astype(np.int64)
    n_chunks = int(chunk.max()) + 1
    lo = np.full((n_chunks, soc.shape[1]), np.inf)
    hi = np.full((n_chunks, soc.shape[1]), -np.inf)
    np.minimum.at(lo, chunk, soc)
    np.maximum.at(hi, chunk, soc)
    span = np.bincount(chunk, minlength=n_chunks).astype(np.float64)
    dod = np.clip(hi - lo, 0.0, 1.0)
    dod_mean = (dod * span[:, None]).sum(axis=0) / span.sum()
    days = float(s.dt_days[0])
    return Duty(
        temp_k=np.asarray(s.temp_k),
        soc_mean=np.asarray(s.soc_mean),
        dod=dod_mean,
        c_rate_mean=np.asarray(s.c_rate_mean),
        c_rate_charge_mean=np.asarray(s.c_rate_charge_mean),
        c_rate_discharge_mean=np.asarray(s.c_rate_discharge_mean),
        efc_per_day=np.asarray(s.efc) / max(days, 1e-12),
        soc_occupancy=np.asarray(s.soc_occupancy),
        window_days=days,
    )


@dataclass(frozen=True)
class EolResult:
    """Time to end of life per pack (inf: not within the horizon; 0: already there).

    Attributes:
        days: days of scenario time until the SoH crosses the threshold.
        efc: equivalent full cycles (real) until then.
        soh_at_start: the true SoH the forecast started from.
    """

    days: F64
    efc: F64
    soh_at_start: F64


def true_time_to_eol(
    aging: FleetAging,
    duty: Duty,
    eol_soh: F64,
    *,
    soh_now: F64,
    horizon_days: float = 36_500.0,
    step_fraction: float = 0.01,
    min_step_days: float = 1.0 / 24.0,
) -> EolResult:
    """Run every pack's true aging law forward under ``duty`` until its SoH crosses ``eol_soh``.

    The true SoH follows the law's relative capacity: ``soh(t) = soh_now * q(t) / q_now``, as
    the emulator ages its cells (:meth:`FleetAging.apply`). The states in ``aging`` are not
    changed.

    Args:
        aging: the run's aging (laws, present states, scalars, knees, speedup).
        duty: one day of recent duty per pack, in the fleet's pack order.
        eol_soh: end-of-life threshold per pack, fraction of rated capacity.
        soh_now: the true SoH per pack now (usable capacity over rated).
        horizon_days: give up after this many days of scenario time (result inf).
        step_fraction: step length as a share of the pack's law age (days as the law sees them).
        min_step_days: shortest step, days of scenario time.

    Returns:
        Days and EFC to end of life per pack.
    """
    n = aging.fleet.n_packs
    speedup = max(aging.speedup, 1e-12)
    eol = np.broadcast_to(np.asarray(eol_soh, dtype=np.float64), (n,))
    soh0 = np.asarray(soh_now, dtype=np.float64)
    days_out = np.full(n, np.inf)
    efc_out = np.full(n, np.inf)
    already = soh0 <= eol
    days_out[already] = 0.0
    efc_out[already] = 0.0
    for k, law in aging.laws.items():
        idx = np.flatnonzero(aging.fleet.params.chem_index == k)  # the law's packs, as FleetAging groups them
        state = aging.states[k]
        scalar = aging.fleet.aging_scalar[idx]
        d = duty.take(idx)
        q_now = np.maximum(state.q, 1e-9)
        soh = soh0[idx].copy()
        target = eol[idx]
        elapsed = np.zeros(idx.size)
        efc = np.zeros(idx.size)
        open_ = ~already[idx]
        while np.any(open_):
            step = np.maximum(step_fraction * state.t_days / speedup, min_step_days)
            step = np.minimum(step, horizon_days - elapsed)
            step = np.where(open_, step, 0.0)
            new = law.step(state, d.stressors(step, speedup), scalar=scalar, knee=aging.knee)
            soh_new = soh0[idx] * new.q / q_now
            crossed = open_ & (soh_new <= target)
            frac = np.clip((soh - target) / np.maximum(soh - soh_new, 1e-15), 0.0, 1.0)
            hit = np.flatnonzero(crossed)
            days_out[idx[hit]] = elapsed[hit] + frac[hit] * step[hit]
            efc_out[idx[hit]] = efc[hit] + frac[hit] * step[hit] * d.efc_per_day[hit]
            elapsed += step
            efc += step * d.efc_per_day
            soh = soh_new
            state = new
            open_ = open_ & ~crossed & (elapsed < horizon_days - 1e-9)
    return EolResult(days=days_out, efc=efc_out, soh_at_start=soh0.copy())


def _eol_thresholds(meta: pl.DataFrame, pack_ids: tuple[str, ...], eol_soh: Mapping[str, float] | None) -> F64:
    life = dict(zip(meta.get_column("pack").to_list(), meta.get_column("life").to_list(), strict=True))
    return np.array(
        [(eol_soh or {}).get(p, DEFAULT_EOL_SOH.get(str(life.get(p)), DEFAULT_EOL_SOH["new"])) for p in pack_ids],
        dtype=np.float64,
    )


def eol_truth_frame(
    emulation: Emulation,
    truth: pl.DataFrame,
    *,
    eol_soh: Mapping[str, float] | None = None,
    window_days: float = 7.0,
) -> pl.DataFrame:
    """Return the true time to end of life of every pack at the end of a run.

    Args:
        emulation: the emulation, at the end of its run.
        truth: its truth table (``truth.parquet``).
        eol_soh: end-of-life SoH per pack id; by default 0.6 for second-life packs and 0.7
            for new ones (:data:`DEFAULT_EOL_SOH`, from the meta's ``life``).
        window_days: the recent duty is the last this many days of the run.

    Returns:
        One row per pack: ``pack``, ``ts_ms`` (the run's last truth time), ``eol_soh``,
        ``days_to_eol``, ``efc_to_eol`` (inf: beyond 100 years), ``soh``, ``aging_speedup``,
        and ``knee`` (the pack was drawn with a knee, whose onset may lie after the run: the
        evaluation scores RUL with and without those packs, since a knee yet to begin leaves
        no trace in the telemetry).
    """
    fleet = emulation.fleet
    ids = fleet.pack_ids
    duty = duty_from_truth(truth, ids, window_days=window_days, chunk_s=emulation.options.aging_every_s)
    soh_now = emulation.bank.pack_capacity_ah() / fleet.params.rated_group_ah
    eol = _eol_thresholds(fleet.meta, ids, eol_soh)
    result = true_time_to_eol(emulation.aging, duty, eol, soh_now=soh_now)
    end = int(truth.get_column("ts_ms").max())  # type: ignore[arg-type]
    return pl.DataFrame(
        {
            "pack": list(ids),
            "ts_ms": np.full(len(ids), end, dtype=np.int64),
            "eol_soh": eol,
            "days_to_eol": result.days,
            "efc_to_eol": result.efc,
            "soh": result.soh_at_start,
            "aging_speedup": np.full(len(ids), emulation.options.aging_speedup),
            "knee": np.asarray(fleet.knee, dtype=np.bool_),
        }
    )


def write_eol_truth(
    emulation: Emulation,
    run_dir: Path,
    *,
    eol_soh: Mapping[str, float] | None = None,
    window_days: float = 7.0,
) -> Path:
    """Write ``eol_truth.parquet`` into a run folder written with its truth tables.

    Call it once the run is over and the folder closed (it reads ``truth.parquet``).

    Args:
        emulation: the emulation, at the end of its run.
        run_dir: the run folder.
        eol_soh: end-of-life SoH per pack id (default: 0.6 second life, 0.7 new).
        window_days: the recent duty is the last this many days of the run.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: the folder has no ``truth.parquet`` (run without ``--truth``).
    """
    source = Path(run_dir) / "truth.parquet"
    if not source.exists():
        msg = f"{source} not found: the end-of-life truth needs a run with its truth tables (--truth)"
        raise FileNotFoundError(msg)
    frame = eol_truth_frame(emulation, pl.read_parquet(source), eol_soh=eol_soh, window_days=window_days)
    out = Path(run_dir) / "eol_truth.parquet"
    frame.write_parquet(out)
    return out
