"""The estimators of a live site, grown as packs announce themselves: what :class:`twin.state.TwinCore` asks.

The estimators (:mod:`twin.estimators`) work on a fixed set of packs; a live site's packs
appear one retained ``meta`` message at a time. :class:`SiteEstimation` keeps them in step:
when metadata for unseen packs arrive (rarely, never per telemetry message) it rebuilds the
estimators for the larger set and carries every known pack's state over unchanged, so a pack
that joins late does not disturb the others.

Telemetry of a pack without metadata cannot be estimated (its chemistry is unknown): those
rows are counted (``no_meta``) and still reach InfluxDB through the mirror.

Pure: no I/O, no clock. The service (:mod:`twin.app`) and the offline replay
(:mod:`twin.replay`) feed it through the same :class:`~twin.state.TwinCore`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import polars as pl
from numpy.typing import NDArray

from twin.estimators.base import group_time_order
from twin.estimators.capacity import CapacityOptions, CapacityState, CapacityTracker
from twin.estimators.energy import EnergyPacks, OutlookOptions, SiteOutlook, site_outlook, site_soc_weights
from twin.estimators.health import HealthOptions, HealthState, HealthTracker, prior_soh
from twin.estimators.resistance import ResistanceOptions, ResistanceState, ResistanceTracker
from twin.estimators.soc import PackInfo, SocEstimator, SocFlag, SocOptions, SocState

__all__ = [
    "EstimationOptions",
    "EstimationSnapshot",
    "PackEstimates",
    "SiteEstimation",
    "expected_soh",
    "filter_soh_prior",
]

F64 = NDArray[np.float64]
B = NDArray[np.bool_]

#: Meta columns the estimators read (the contract's pack_meta names).
META_COLUMNS: Final = (
    "pack",
    "chemistry",
    "rated_capacity_ah",
    "series_cells",
    "intake_soh",
    "voltage_min_v",
    "current_max_discharge_a",
)


@dataclass(frozen=True, slots=True)
class EstimationOptions:
    """Options of the site's estimators (from :class:`twin.config.EstimationSettings`)."""

    reserve_floor_soc: float = 0.10
    soc: SocOptions = field(default_factory=SocOptions)
    outlook: OutlookOptions = field(default_factory=OutlookOptions)
    capacity: CapacityOptions = field(default_factory=CapacityOptions)
    resistance: ResistanceOptions = field(default_factory=ResistanceOptions)
    health: HealthOptions = field(default_factory=HealthOptions)
    #: Relative standard deviation of the capacity prior besides the fade since commissioning
    #: (whose spread the aging law's unknown rate scalar gives, :func:`expected_soh`): a new
    #: pack's delivered capacity holds to a couple of per cent; a second-life pack's intake
    #: figure carries the test's error and the cells' spread.
    capacity_prior_rel_std_new: float = 0.02
    capacity_prior_rel_std_second_life: float = 0.03
    #: Relative error of a converged capacity estimate that its own standard deviation does not
    #: show (the SoC filter's ΔSoC scale; 1-2 % on the emulated sites over days), for the bands.
    capacity_model_rel_std: float = 0.015
    #: SoC prior of a pack that has just appeared (None: 50 %, or centred on its first reading
    #: where that reading leaves the SoC open, as on LFP's plateau), and its standard deviation.
    soc0: float | None = None
    soc0_std: float = 0.3
    #: Event-time grid of the capacity checkpoints, s (fixed, so batches do not matter).
    checkpoint_every_s: float = 60.0


@dataclass(frozen=True, slots=True, eq=False)
class PackEstimates:
    """Per-pack SoC estimates in the estimators' pack order (see :attr:`SiteEstimation.pack_ids`)."""

    pack_ids: tuple[str, ...]
    soc: F64  # usable SoC of the string (what it can deliver), fraction
    soc_std: F64
    soc_std_shared: F64  # the part of soc_std the chemistry's OCV table can cause (common to its packs)
    soc_mean: F64  # mean SoC of the cell groups
    soc_min_cell: F64
    current_offset_a: F64
    capacity_ah: F64  # usable capacity of the string (weakest-cell limited), Ah
    capacity_std_ah: F64
    rated_ah: F64
    soh: F64  # the health tracker's SoH: the capacity estimates smoothed by the aging law
    soh_std: F64
    resistance_ohm: F64  # pack resistance normalised to 25 °C and 50 % SoC
    resistance_growth: F64
    rul_days_p5: F64
    rul_days_p50: F64
    rul_days_p95: F64
    rul_efc_p50: F64
    knee: B
    knee_onset_ms: NDArray[np.int64]  # -1: none
    flags: NDArray[np.int64]  # SocFlag bits per pack (named by :data:`QUALITY_FLAGS`)


@dataclass(frozen=True, slots=True, eq=False)
class EstimationSnapshot:
    """Everything :class:`SiteEstimation` holds (see :meth:`SiteEstimation.snapshot`)."""

    meta: pl.DataFrame
    full_meta: pl.DataFrame
    soc: SocState | None
    capacity: CapacityState | None
    resistance: ResistanceState | None
    health: HealthState | None
    last_temp: F64
    checkpoint_soc: F64
    checkpoint_ah: F64
    checkpoint_ms: int | None
    ah: F64
    last_ts: NDArray[np.int64]
    last_i: F64
    next_checkpoint_ms: int | None
    counters: dict[str, int]


class SiteEstimation:
    """The SoC filter and the energy model for every pack with metadata, grown as packs appear.

    Args:
        options: estimator options.
    """

    def __init__(self, options: EstimationOptions = EstimationOptions()) -> None:
        self.options = options
        self.meta = pl.DataFrame(schema=_META_SCHEMA)
        self.soc: SocEstimator | None = None
        self.energy: EnergyPacks | None = None
        self.capacity: CapacityTracker | None = None
        self.resistance: ResistanceTracker | None = None
        self.health: HealthTracker | None = None
        self.full_meta = pl.DataFrame()  # the meta rows as received (every contract column), in pack order
        self._last_temp = np.zeros(0)
        self._checkpoint_soc = np.zeros(0)  # SoC at the last checkpoint: the resistance's SoC factor until the next
        self._checkpoint_ah = np.zeros(0)
        self._checkpoint_ms: int | None = None
        self.counters: dict[str, int] = {"no_meta": 0, "capacity_checkpoints": 0}
        # Coulomb count per pack (measured current held over each interval), A·h, and the
        # last sample it reached; the next capacity checkpoint on the event-time grid.
        self._ah = np.zeros(0)
        self._last_ts = np.zeros(0, dtype=np.int64)
        self._last_i = np.zeros(0)
        self._next_checkpoint_ms: int | None = None

    @property
    def pack_ids(self) -> tuple[str, ...]:
        """The estimated packs, in the order of the estimators' arrays."""
        return self.soc.pack_ids if self.soc is not None else ()

    # ------------------------------------------------------------------ inputs

    def add_meta(self, meta: pl.DataFrame) -> None:
        """Take pack metadata (contract pack_meta rows); rebuild the estimators if anything changed.

        A pack already known keeps its filter state; a changed rated capacity or chemistry
        changes its parameters from now on.
        """
        if meta.height == 0:
            return
        rows = (
            meta.select(
                [pl.col(c).cast(t) if c in meta.columns else pl.lit(None, t).alias(c) for c, t in _META_SCHEMA.items()]
            )
            .group_by("pack", maintain_order=True)
            .last()
        )
        merged = pl.concat([self.meta.join(rows.select("pack"), on="pack", how="anti"), rows])
        # Known packs keep their position; new ones go after them.
        order = {p: i for i, p in enumerate(self.meta["pack"].to_list())}
        merged = (
            merged.with_columns(
                pl.col("pack").replace_strict(order, default=len(order), return_dtype=pl.Int64).alias("_o"),
                pl.int_range(pl.len()).alias("_n"),
            )
            .sort("_o", "_n")
            .drop("_o", "_n")
        )
        full = meta.drop("msg", strict=False).group_by("pack", maintain_order=True).last()
        if self.full_meta.height:
            full = pl.concat(
                [self.full_meta.join(full.select("pack"), on="pack", how="anti"), full], how="diagonal_relaxed"
            )
        if merged.equals(self.meta):
            return
        self.full_meta = merged.select("pack").join(full, on="pack", how="left", maintain_order="left")
        self._rebuild(merged)

    def _rebuild(self, meta: pl.DataFrame) -> None:
        o = self.options
        full = self.full_meta if self.full_meta.height == meta.height else meta
        aged, aged_std = expected_soh(full, o)
        info = PackInfo.from_meta(meta, soc0=o.soc0, soc0_std=o.soc0_std, soh_prior=aged)
        soc = SocEstimator(info, options=o.soc)
        if self.soc is not None:
            soc.restore(_carry_over(self.soc.snapshot(), soc.snapshot()))
        self.soc = soc
        rated = meta.get_column("rated_capacity_ah").to_numpy()
        capacity = {p: rated[i] * aged[p] for i, p in enumerate(meta.get_column("pack").to_list())}  # per new meta
        self.energy = EnergyPacks.from_meta(meta, capacity_ah=capacity, capacity_rel_std=o.soc.capacity_error)
        prior = np.asarray(self.energy.capacity_ah, dtype=np.float64)
        n_old = self._ah.size
        keep = np.arange(n_old, dtype=np.intp)  # known packs keep their rows (see add_meta)
        new = (meta.get_column("life") == "new").fill_null(value=False).to_numpy()
        base = np.where(new, o.capacity_prior_rel_std_new, o.capacity_prior_rel_std_second_life)
        fade_rel = np.array([aged_std[p] / aged[p] for p in meta.get_column("pack").to_list()])  # once per meta
        rel = np.hypot(base, fade_rel)
        if self.capacity is None:
            self.capacity = CapacityTracker(prior, o.capacity, rel)
        else:
            self.capacity = self.capacity.grown(prior, keep, keep, rel)
        self.resistance = (
            ResistanceTracker(info, o.resistance) if self.resistance is None else self.resistance.grown(info)
        )
        self.health = HealthTracker(full, o.health) if self.health is None else self.health.grown(full)
        self.health.prepare()  # the costly placement on the aging curves now, not at the first batch
        grow = prior.size - n_old
        self._ah = np.concatenate([self._ah, np.zeros(grow)])
        self._last_ts = np.concatenate([self._last_ts, np.full(grow, -1, dtype=np.int64)])
        self._last_i = np.concatenate([self._last_i, np.zeros(grow)])
        self._last_temp = np.concatenate([self._last_temp, np.full(grow, np.nan)])
        self._checkpoint_soc = np.concatenate([self._checkpoint_soc, np.full(grow, 0.5)])
        self._checkpoint_ah = np.concatenate([self._checkpoint_ah, np.zeros(grow)])
        self.meta = meta

    def update(self, telemetry: pl.DataFrame) -> None:
        """Fold accepted telemetry rows (any packs, any order) into the estimators."""
        if telemetry.height == 0:
            return
        if self.soc is None:
            self.counters["no_meta"] += telemetry.height
            return
        known = telemetry.get_column("pack").is_in(self.meta.get_column("pack").implode())
        unknown = int((~known).sum())
        if unknown:
            self.counters["no_meta"] += unknown
            telemetry = telemetry.filter(known)
        if telemetry.height == 0:
            return
        grid = round(self.options.checkpoint_every_s * 1000)
        ts = telemetry.get_column("ts_ms")
        if self._next_checkpoint_ms is None:
            self._next_checkpoint_ms = (int(ts.min()) // grid + 1) * grid  # type: ignore[arg-type]
        newest = int(ts.max())  # type: ignore[arg-type]
        # Checkpoints crossed by this batch: the rows up to each go in first (one pass per
        # grid time crossed, not per row), so the checkpoints do not depend on the batching.
        # A checkpoint waits for a row newer than its grid time: the rows stamped exactly at it
        # may still be split across batches.
        while self._next_checkpoint_ms < newest:
            at = self._next_checkpoint_ms
            head = telemetry.filter(pl.col("ts_ms") <= at)
            telemetry = telemetry.filter(pl.col("ts_ms") > at)
            self._fold(head)
            self._checkpoint(at)
            following = int(telemetry.get_column("ts_ms").min()) if telemetry.height else at + grid  # type: ignore[arg-type]
            self._next_checkpoint_ms = max(at + grid, (following - 1) // grid * grid)
        self._fold(telemetry)

    def _fold(self, rows: pl.DataFrame) -> None:
        """Feed rows to the SoC filter and the coulomb count."""
        if rows.height == 0:
            return
        assert self.soc is not None
        assert self.resistance is not None
        self.soc.update(rows)
        self.resistance.update(rows, soc=self._checkpoint_soc)
        # Coulomb count: per pack, in time order, the previous sample's current over each
        # interval (as the filter holds it); rows not newer than the pack's last are skipped.
        # Of rows of one pack at the same time, the first counts (a stable sort keeps their
        # order); a row without a time is never newer.
        index = pl.DataFrame({"pack": self.meta.get_column("pack"), "_p": np.arange(self.meta.height)})
        frame = rows.select("pack", "ts_ms", "current_a", "temp_avg_c").join(
            index, on="pack", how="inner", maintain_order="left"
        )
        if frame.get_column("ts_ms").null_count():
            frame = frame.filter(pl.col("ts_ms").is_not_null())
        p_all, t_all = frame.get_column("_p").to_numpy(), frame.get_column("ts_ms").to_numpy()
        order = group_time_order(p_all, t_all)
        p, t = p_all[order], t_all[order]
        once = np.ones(p.size, dtype=np.bool_)
        once[1:] = (p[1:] != p[:-1]) | (t[1:] != t[:-1])
        order, p, t = order[once], p[once], t[once]
        i = frame.get_column("current_a").to_numpy().astype(np.float64)[order]
        temp = frame.get_column("temp_avg_c").to_numpy().astype(np.float64)[order]
        newer = t > self._last_ts[p]
        p, t, i, temp = p[newer], t[newer], i[newer], temp[newer]
        if p.size == 0:
            return
        first = np.ones(p.size, dtype=np.bool_)
        first[1:] = p[1:] != p[:-1]
        prev_t = np.where(first, self._last_ts[p], np.roll(t, 1))
        prev_i = np.where(first, self._last_i[p], np.roll(i, 1))
        started = prev_t >= 0
        held = np.where(np.isfinite(prev_i), prev_i, 0.0)
        dah = np.where(started, held * (t - prev_t) / 3_600_000.0, 0.0)
        np.add.at(self._ah, p, dah)
        last = np.flatnonzero(np.append(p[1:] != p[:-1], True))
        self._last_ts[p[last]] = t[last]
        finite_i = np.where(np.isfinite(i), i, self._last_i[p])
        self._last_i[p[last]] = finite_i[last]
        finite_t = np.where(np.isfinite(temp), temp, self._last_temp[p])
        self._last_temp[p[last]] = finite_t[last]

    def _checkpoint(self, at_ms: int) -> None:
        assert self.soc is not None
        assert self.capacity is not None
        e = self.soc.estimate(now_ms=at_ms)
        grid = round(self.options.checkpoint_every_s * 1000)
        fresh = (self._last_ts > at_ms - grid) & (self._last_ts <= at_ms)
        self.capacity.checkpoint(
            ts_ms=at_ms,
            soc=np.asarray(e.soc_usable, dtype=np.float64),
            soc_std=np.asarray(e.soc_std, dtype=np.float64),
            ah=self._ah,
            current_offset_a=np.asarray(e.current_offset_a, dtype=np.float64),
            valid=fresh,
        )
        assert self.health is not None
        assert self.resistance is not None
        cap = self.capacity.estimate()
        prev_ms = self._checkpoint_ms if self._checkpoint_ms is not None else at_ms - grid
        hours = max(at_ms - prev_ms, 1) / 3_600_000.0
        soc_now = np.asarray(e.soc_usable, dtype=np.float64)
        known = np.isfinite(soc_now) & np.isfinite(self._last_temp)
        self.health.checkpoint(
            ts_ms=at_ms,
            soc=np.where(known, soc_now, 0.5),
            temp_c=np.where(known, self._last_temp, 25.0),
            current_a=(self._ah - self._checkpoint_ah) / hours,
            capacity_ah=np.where(cap.pairs > 0, cap.capacity_ah, np.nan),  # the prior alone is not data
            capacity_std_ah=cap.capacity_std_ah,
            valid=fresh & known,
            resistance_ohm_25c=np.asarray(self.resistance.estimate().resistance_ohm_25c, dtype=np.float64),
        )
        self._checkpoint_soc = np.where(fresh & np.isfinite(soc_now), soc_now, self._checkpoint_soc)
        self._checkpoint_ah = self._ah.copy()
        self._checkpoint_ms = at_ms
        self.counters["capacity_checkpoints"] += 1

    # ------------------------------------------------------------------ outputs

    def snapshot(self) -> EstimationSnapshot:
        """Return the whole estimation state (immutable: arrays are copied), to resume exactly here."""
        return EstimationSnapshot(
            meta=self.meta.clone(),
            full_meta=self.full_meta.clone(),
            soc=self.soc.snapshot() if self.soc is not None else None,
            capacity=self.capacity.snapshot() if self.capacity is not None else None,
            resistance=self.resistance.snapshot() if self.resistance is not None else None,
            health=self.health.snapshot() if self.health is not None else None,
            last_temp=self._last_temp.copy(),
            checkpoint_soc=self._checkpoint_soc.copy(),
            checkpoint_ah=self._checkpoint_ah.copy(),
            checkpoint_ms=self._checkpoint_ms,
            ah=self._ah.copy(),
            last_ts=self._last_ts.copy(),
            last_i=self._last_i.copy(),
            next_checkpoint_ms=self._next_checkpoint_ms,
            counters=dict(self.counters),
        )

    def restore(self, snap: EstimationSnapshot) -> None:
        """Resume from :meth:`snapshot` (of an estimation with the same options)."""
        self.meta = pl.DataFrame(schema=_META_SCHEMA)
        self.soc = self.energy = self.capacity = self.resistance = self.health = None
        self._ah, self._last_ts, self._last_i = np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0)
        self._last_temp, self._checkpoint_soc, self._checkpoint_ah = np.zeros(0), np.zeros(0), np.zeros(0)
        self.full_meta = snap.full_meta.clone()
        if snap.meta.height:
            self._rebuild(snap.meta)
            assert self.soc is not None
            assert self.capacity is not None
            if snap.soc is not None:
                self.soc.restore(snap.soc)
            if snap.capacity is not None:
                self.capacity.restore(snap.capacity)
            if snap.resistance is not None and self.resistance is not None:
                self.resistance.restore(snap.resistance)
            if snap.health is not None and self.health is not None:
                self.health.restore(snap.health)
        self._ah, self._last_ts, self._last_i = snap.ah.copy(), snap.last_ts.copy(), snap.last_i.copy()
        self._next_checkpoint_ms = snap.next_checkpoint_ms
        self._last_temp = snap.last_temp.copy()
        self._checkpoint_soc = snap.checkpoint_soc.copy()
        self._checkpoint_ah = snap.checkpoint_ah.copy()
        self._checkpoint_ms = snap.checkpoint_ms
        self.counters = dict(snap.counters)

    def packs(self, *, now_ms: int) -> PackEstimates | None:
        """Every estimated pack's SoC, or None before the first metadata."""
        if self.soc is None:
            return None
        e = self.soc.estimate(now_ms=now_ms)
        assert self.capacity is not None
        assert self.energy is not None
        assert self.resistance is not None
        assert self.health is not None
        cap = self.capacity.estimate()
        res = self.resistance.estimate()
        health = self.health.estimate()
        rated = np.asarray(self.energy.rated_group_ah, dtype=np.float64)
        learnt = np.asarray(health.soh, dtype=np.float64)
        return PackEstimates(
            pack_ids=e.pack_ids,
            soc=np.asarray(e.soc_usable, dtype=np.float64),
            soc_std=np.asarray(e.soc_usable_std, dtype=np.float64),
            soc_std_shared=np.asarray(e.soc_usable_std_shared, dtype=np.float64),
            soc_mean=np.asarray(e.soc, dtype=np.float64),
            soc_min_cell=np.asarray(e.soc_min_cell, dtype=np.float64),
            current_offset_a=np.asarray(e.current_offset_a, dtype=np.float64),
            capacity_ah=cap.capacity_ah,
            capacity_std_ah=cap.capacity_std_ah,
            rated_ah=rated,
            soh=np.where(np.isfinite(learnt), learnt, cap.capacity_ah / rated),
            soh_std=np.where(
                np.isfinite(learnt), np.asarray(health.soh_std, dtype=np.float64), cap.capacity_std_ah / rated
            ),
            resistance_ohm=np.asarray(res.resistance_ohm_25c, dtype=np.float64),
            resistance_growth=np.asarray(res.growth, dtype=np.float64),
            rul_days_p5=np.asarray(health.rul_days_p5, dtype=np.float64),
            rul_days_p50=np.asarray(health.rul_days_p50, dtype=np.float64),
            rul_days_p95=np.asarray(health.rul_days_p95, dtype=np.float64),
            rul_efc_p50=np.asarray(health.rul_efc_p50, dtype=np.float64),
            knee=np.asarray(health.knee, dtype=np.bool_),
            knee_onset_ms=np.asarray(health.knee_onset_ms, dtype=np.int64),
            flags=np.asarray(e.flags, dtype=np.int64),
        )

    def site_soc(self, packs: PackEstimates, available: B) -> float | None:
        """The site's SoC (the outlook's P50) without the forward simulation: for cheap change checks."""
        assert self.energy is not None
        use = available & np.isfinite(packs.soc)
        weight = site_soc_weights(self.energy, use, packs.capacity_ah)
        total = float(weight.sum())
        if total <= 0.0:
            return None
        return float((np.where(use, np.clip(packs.soc, 0.0, 1.0), 0.0) * weight).sum() / total)

    def outlook(
        self,
        packs: PackEstimates,
        *,
        temp_c: F64,
        current_a: F64,
        available: B,
        battery_w: float | None,
        load_w: float | None,
    ) -> SiteOutlook:
        """Energy to the floor, runtime and ride-through (arrays in :attr:`pack_ids` order)."""
        assert self.energy is not None
        o = self.options
        outlook_options = dataclasses.replace(o.outlook, floor_soc=o.reserve_floor_soc)
        temp = np.where(np.isfinite(temp_c), temp_c, 25.0)
        current = np.where(np.isfinite(current_a), current_a, 0.0)
        soc = np.where(np.isfinite(packs.soc), packs.soc, 0.0)
        energy = dataclasses.replace(
            self.energy,
            capacity_ah=packs.capacity_ah,
            # The tracker's std is its noise alone; the SoC filter's scale errors bias it a little.
            capacity_rel_std=np.clip(
                np.hypot(packs.capacity_std_ah / packs.capacity_ah, o.capacity_model_rel_std), 0.0, 1.0
            ),
        )
        return site_outlook(
            energy,
            soc=soc,
            soc_std=packs.soc_std,
            soc_std_shared=packs.soc_std_shared,
            temp_c=temp,
            current_a=current,
            available=available & np.isfinite(packs.soc),
            battery_w=battery_w,
            load_w=load_w,
            options=outlook_options,
        )


_META_SCHEMA: Final = {
    "pack": pl.String,
    "chemistry": pl.String,
    "life": pl.String,
    "rated_capacity_ah": pl.Float64,
    "series_cells": pl.Int64,
    "intake_soh": pl.Float64,
    "voltage_min_v": pl.Float64,
    "current_max_discharge_a": pl.Float64,
    "ts_ms": pl.Int64,
    "commissioned_ms": pl.Int64,
}
QUALITY_FLAGS: Final[tuple[tuple[int, str], ...]] = tuple(
    (int(f.value), str(f.name).lower()) for f in SocFlag if f.value
)
"""Each SoC quality bit and its published name, in publishing order."""


def filter_soh_prior(meta: pl.DataFrame, options: EstimationOptions | None = None) -> dict[str, float]:
    """The SoH prior the twin gives its SoC filter: :func:`expected_soh`'s.

    For code that runs the SoC filter alone (tests, notebooks) as the twin runs it:
    ``SocEstimator.from_meta(meta, soh_prior=filter_soh_prior(meta))``. The prior is the
    string's usable capacity; the filter itself scales it to its mean cell by the usable share
    its extreme-cell trackers find (a fixed expected weakest-cell shortfall in the prior was
    tried before: better over days, worse in the first hours on the LFP plateau).
    """
    return expected_soh(meta, options or EstimationOptions())[0]


def expected_soh(meta: pl.DataFrame, options: EstimationOptions) -> tuple[dict[str, float], dict[str, float]]:
    """Each pack's SoH prior: its intake SoH (1 for a new pack) less the fade expected since commissioning.

    A second-life pack's intake test was exact the day it was made, but the pack has aged on
    site since (``commissioned_ms`` to the metadata's ``ts_ms``). The chemistry's own aging law
    (:mod:`twin.chemistry.aging`, BLAST-Lite), placed on its curve by the pack's first life
    and run over its site life, estimates by how much, averaged over the law's unknown rate
    scalar (:func:`twin.estimators.health.prior_soh`, the health tracker's own prior). The
    capacity estimator then corrects it from the pack's own data.

    Returns:
        SoH prior by pack id, and its standard deviation from the rate scalar (SoH points).
    """
    at_ms = int(meta.get_column("ts_ms").max()) if meta.height else 0  # type: ignore[arg-type]
    return prior_soh(meta, at_ms, options.health)


def _carry_over(old: SocState, fresh: SocState) -> SocState:
    """Return ``fresh`` (the prior of the larger pack set) with the known packs' state from ``old``."""
    where = {p: i for i, p in enumerate(fresh.pack_ids)}
    dst = np.array([where[p] for p in old.pack_ids if p in where], dtype=np.intp)
    src = np.array([i for i, p in enumerate(old.pack_ids) if p in where], dtype=np.intp)
    changes: dict[str, object] = {}
    for name, _, _ in SocState._ARRAYS:
        arr = np.array(getattr(fresh, name), copy=True)
        arr[dst] = np.asarray(getattr(old, name))[src]
        changes[name] = arr
    changes["n_ignored"] = old.n_ignored
    changes["watermark_ms"] = old.watermark_ms
    return dataclasses.replace(fresh, **changes)  # type: ignore[arg-type]
