"""The state mirror: every pack's latest readings, metadata and availability, and the site's aggregates.

Pure and vectorised: :meth:`TwinCore.ingest` takes the decoded frames of one micro-batch
(see :mod:`twin.pipeline`) and updates per-pack numpy arrays indexed by pack; nothing here
does I/O or reads a clock (``now_ms`` is passed in, event time in replay, wall time live).

Data-quality rules, per pack (counted in :attr:`TwinCore.counters`):

* **duplicate**: a (pack, seq) already seen within the late window is dropped (a broker
  redelivery, or a device repeating itself); it changes nothing.
* **late**: a sample older than the site's watermark (the newest event time seen) minus
  ``late_window_s`` is counted; it still reaches InfluxDB (its point time is its own event
  time) but does not move the mirror back in time.
* **clock skew**: a sample stamped more than ``max_clock_skew_s`` after ``now_ms`` is
  refused (reason ``clock_skew``): it would make a pack look fresh forever.
* **stale**: a pack with no telemetry for ``stale_after_s`` is offline, as is a pack whose
  gateway's retained status (or last will) says so.
* **cardinality cap**: at most ``max_packs`` distinct packs; telemetry of further packs is
  refused (reason ``cardinality_cap``), so a flood of random ids cannot blow up InfluxDB.

Estimates: the mirror feeds the accepted telemetry and the metadata to
:class:`twin.estimation.SiteEstimation` (the SoC filter and the energy model, grown as packs
appear); :meth:`TwinCore.pack_frame` and :meth:`TwinCore.site_frame` report its SoC, energy
to the reserve floor, runtime and ride-through, with their bands and quality flags. The
BMS-reported SoC and SoH are reported beside them (``soc_bms``, ``soh_bms``), never mixed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import polars as pl
from numpy.typing import NDArray

from twin import contract as c
from twin.config import Settings
from twin.estimation import QUALITY_FLAGS, EstimationOptions, PackEstimates, SiteEstimation
from twin.estimators.energy import SiteOutlook
from twin.estimators.health import HealthOptions
from twin.pipeline import Decoded, decode_batch

__all__ = ["CoreOptions", "IngestResult", "TwinCore"]

F64 = NDArray[np.float64]
B = NDArray[np.bool_]

_TELEMETRY_VALUES: Final = (
    "voltage_v",
    "current_a",
    "temp_min_c",
    "temp_max_c",
    "temp_avg_c",
    "cell_v_min_v",
    "cell_v_max_v",
    "soc_bms",
    "soh_bms",
)
#: pack_meta columns kept in the mirror, and their key there (the meta's temperature limit is
#: not the measured ``temp_max_c``).
_META_VALUES: Final = {
    "rated_capacity_ah": "rated_capacity_ah",
    "rated_energy_kwh": "rated_energy_kwh",
    "voltage_min_v": "voltage_min_v",
    "voltage_max_v": "voltage_max_v",
    "current_max_discharge_a": "current_max_discharge_a",
    "current_max_charge_a": "current_max_charge_a",
    "temp_max_c": "temp_limit_c",
}
_SITE_FLOATS: Final = (
    "load_w",
    "solar_w",
    "grid_w",
    "battery_w",
    "soc",
    "soc_p5",
    "soc_p95",
    "energy_to_floor_kwh",
    "energy_to_floor_kwh_p5",
    "energy_to_floor_kwh_p95",
    "max_discharge_w",
    "runtime_s_p5",
    "runtime_s_p50",
    "runtime_s_p95",
    "ridethrough_s_p5",
    "ridethrough_s_p50",
    "ridethrough_s_p95",
)
_REJECT_SCHEMA: Final = {
    "msg": pl.Int64,
    "topic": pl.String,
    "reason": pl.String,
    "detail": pl.String,
    "payload_excerpt": pl.String,
}


@dataclass(frozen=True, slots=True)
class CoreOptions:
    """Data-quality rules and aggregation options (from :class:`twin.config.Settings`)."""

    site: str
    stale_after_s: float = 30.0
    late_window_s: float = 10.0
    max_clock_skew_s: float = 300.0
    max_packs: int = 5000
    reserve_floor_soc: float = 0.10
    estimation: EstimationOptions | None = None  # default: EstimationOptions(reserve_floor_soc=...)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, site: str | None = None, aging_clock_scale: float = 1.0
    ) -> CoreOptions:
        """The core's options from the service settings (live and replay use this one mapping).

        Args:
            settings: the settings.
            site: the site (default: the settings').
            aging_clock_scale: how much faster than real time the packs age (an emulated run
                with ``aging_speedup``; 1 for a real site).
        """
        e = settings.estimation
        health = HealthOptions(
            eol_soh_new=e.eol_soh_new, eol_soh_second_life=e.eol_soh_second_life, aging_clock_scale=aging_clock_scale
        )
        return cls(
            estimation=EstimationOptions(reserve_floor_soc=e.reserve_floor_soc, health=health),
            site=site or settings.site,
            stale_after_s=settings.ingest.stale_after_s,
            late_window_s=settings.ingest.late_window_s,
            max_clock_skew_s=settings.ingest.max_clock_skew_s,
            max_packs=settings.ingest.max_packs,
            reserve_floor_soc=settings.estimation.reserve_floor_soc,
        )


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one batch did: the rows that reached the mirror, and further rejects."""

    telemetry: pl.DataFrame  # accepted telemetry rows with chemistry and life tags joined
    rejects: pl.DataFrame  # rows refused here (clock skew, cardinality cap), same columns as Decoded.rejects
    duplicates: int
    late: int


@dataclass
class _Packs:
    """Per-pack arrays, grown as packs appear (rarely, never per message)."""

    ids: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    values: dict[str, F64] = field(
        default_factory=lambda: {name: np.zeros(0) for name in (*_TELEMETRY_VALUES, *_META_VALUES.values())}
    )
    last_ts_ms: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    last_seq: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    contactor_closed: B = field(default_factory=lambda: np.zeros(0, dtype=bool))
    fault_bits: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    status_online: B = field(default_factory=lambda: np.zeros(0, dtype=bool))
    has_meta: B = field(default_factory=lambda: np.zeros(0, dtype=bool))
    # Highest seq accepted per pack (ever): rows above it cannot be duplicates (ingest's fast path).
    seq_high: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    chemistry: list[str | None] = field(default_factory=list)
    life: list[str | None] = field(default_factory=list)

    def grow(self, new: list[str]) -> None:
        n0 = len(self.ids)
        for i, pack in enumerate(new):
            self.index[pack] = n0 + i
        self.ids.extend(new)
        k = len(new)
        for name in (*_TELEMETRY_VALUES, *_META_VALUES.values()):
            self.values[name] = np.concatenate([self.values[name], np.full(k, np.nan)])
        self.last_ts_ms = np.concatenate([self.last_ts_ms, np.zeros(k, dtype=np.int64)])
        self.last_seq = np.concatenate([self.last_seq, np.full(k, -1, dtype=np.int64)])
        self.contactor_closed = np.concatenate([self.contactor_closed, np.ones(k, dtype=bool)])
        self.fault_bits = np.concatenate([self.fault_bits, np.zeros(k, dtype=np.int64)])
        self.status_online = np.concatenate([self.status_online, np.ones(k, dtype=bool)])
        self.has_meta = np.concatenate([self.has_meta, np.zeros(k, dtype=bool)])
        self.seq_high = np.concatenate([self.seq_high, np.full(k, _NO_SEQ, dtype=np.int64)])
        self.chemistry.extend([None] * k)
        self.life.extend([None] * k)


class TwinCore:
    """The twin's mirror of the site, updated batch by batch.

    Args:
        options: data-quality rules and aggregation options.

    Examples:
        >>> from twin.pipeline import decode_batch
        >>> core = TwinCore(CoreOptions(site="demo"))
        >>> payload = (b'{"schema":"pack_telemetry/1","pack":"P1","ts_ms":1767225600000,"seq":0,'
        ...     b'"voltage_v":380.0,"current_a":10.0,"temp_min_c":24.0,"temp_max_c":26.0,"temp_avg_c":25.0,'
        ...     b'"cell_v_min_v":3.9,"cell_v_max_v":3.95,"cell_v_min_idx":1,"cell_v_max_idx":2,'
        ...     b'"soc_bms":0.6,"soh_bms":0.9,"contactor_closed":true}')
        >>> result = core.ingest(decode_batch(["microgrid/demo/packs/P1/telemetry"], [payload], site="demo"),
        ...                      now_ms=1767225600500)
        >>> core.pack_frame(now_ms=1767225601000)["online"].to_list()
        [True]
    """

    def __init__(self, options: CoreOptions) -> None:
        self.options = options
        self.packs = _Packs()
        self.watermark_ms = 0
        self.site_row: dict[str, object] | None = None
        # (pack, seq, ts_ms) of the rows accepted within the late window, as the pieces each batch
        # added and the newest piece time; trimmed to ts_ms >= _recent_from when read (_recent()).
        self._recent_parts: list[tuple[pl.DataFrame, int]] = []
        self._recent_from: int | None = None
        self._lookup_frame = pl.DataFrame(schema={"pack": pl.String, "idx": pl.Int64})
        self.counters: dict[str, int] = {"duplicate": 0, "late": 0, "clock_skew": 0, "cardinality_cap": 0}
        self.estimation = SiteEstimation(
            options.estimation or EstimationOptions(reserve_floor_soc=options.reserve_floor_soc)
        )
        self._version = 0  # bumped by every ingest: the views below are cached per (now, version)
        self._views_key: tuple[int, int] | None = None
        self._views_value: _Views | None = None
        self._estimates_key: tuple[int, int] | None = None
        self._estimates_value: PackEstimates | None = None
        self._rows = np.zeros(0, dtype=np.int64)  # core pack index of each estimated pack
        self._rows_ids: tuple[str, ...] = ()

    # ------------------------------------------------------------------ ingest

    def _register(self, packs: pl.Series, idx: NDArray[np.int64] | None = None) -> list[str]:
        """Register unseen packs up to the cap; return those refused.

        ``idx`` is :meth:`_indices` of ``packs`` when the caller has it already.
        """
        idx = self._indices(packs) if idx is None else idx
        if bool(np.all(idx >= 0)):
            return []
        seen = set(self.packs.index)
        fresh = packs.filter(pl.Series(idx < 0)).unique(maintain_order=True).to_list()
        unseen = [p for p in fresh if p not in seen]  # a null id is never in the index: kept, as before
        room = max(self.options.max_packs - len(self.packs.ids), 0)
        if unseen:
            self.packs.grow(unseen[:room])
        return unseen[room:]

    def _indices(self, packs: pl.Series) -> NDArray[np.int64]:
        """Each pack's index in the mirror (-1: not registered)."""
        if self._lookup_frame.height != len(self.packs.ids):  # the pack set grew (rarely)
            self._lookup_frame = pl.DataFrame(
                {"pack": self.packs.ids, "idx": np.arange(len(self.packs.ids), dtype=np.int64)},
                schema={"pack": pl.String, "idx": pl.Int64},
            )
        joined = packs.to_frame("pack").join(self._lookup_frame, on="pack", how="left", maintain_order="left")
        out: NDArray[np.int64] = joined.get_column("idx").fill_null(-1).to_numpy()
        return out

    def _recent(self) -> pl.DataFrame:
        """The (pack, seq, ts_ms) of the rows accepted within the late window (for the duplicate rule)."""
        parts = [part for part, _ in self._recent_parts]
        if not parts:
            return pl.DataFrame(schema={"pack": pl.String, "seq": pl.Int64, "ts_ms": pl.Int64})
        recent = pl.concat(parts) if len(parts) > 1 else parts[0]
        return recent.filter(pl.col("ts_ms") >= self._recent_from)

    def _remember(self, tele: pl.DataFrame, keep_from: int) -> None:
        """Add accepted rows to the late window's memory and drop pieces entirely before ``keep_from``.

        ``keep_from`` never decreases (the watermark only moves forward), so trimming at read
        time keeps exactly the rows that trimming at every batch would keep.
        """
        newest = tele.get_column("ts_ms").max()
        self._recent_parts.append((tele.select("pack", "seq", "ts_ms"), -1 if newest is None else int(newest)))  # type: ignore[arg-type]
        self._recent_parts = [(part, top) for part, top in self._recent_parts if top >= keep_from]
        self._recent_from = keep_from

    def _no_duplicates(self, idx: NDArray[np.int64], seq: NDArray[np.int64]) -> bool:
        """True when no (pack, seq) of the batch repeats within it or what came before (vectorised).

        Sufficient, not necessary: each pack's seq strictly rises through the batch and starts
        above every seq it has had accepted. Anything else (a redelivery, a device that
        restarted its count) is settled exactly by :meth:`_drop_duplicates`.
        """
        order = np.argsort(idx, kind="stable")
        p, q = idx[order], seq[order]
        same = p[1:] == p[:-1]
        if not bool(np.all((q[1:] > q[:-1]) | ~same)):
            return False
        first = np.concatenate([[True], ~same])
        return bool(np.all(q[first] > self.packs.seq_high[p[first]]))

    def _drop_duplicates(self, tele: pl.DataFrame) -> pl.DataFrame:
        """Drop rows whose (pack, seq) came before, in the batch or within the late window."""
        tele = tele.unique(subset=["pack", "seq"], keep="first", maintain_order=True)
        return tele.join(self._recent().select("pack", "seq"), on=["pack", "seq"], how="anti", maintain_order="left")

    def ingest(self, decoded: Decoded, *, now_ms: int) -> IngestResult:
        """Update the mirror with one decoded batch.

        Args:
            decoded: the batch, from :func:`twin.pipeline.decode_batch`.
            now_ms: the time now (wall clock live; event time in replay), for the skew rule.

        Returns:
            The telemetry rows that were accepted (tagged with chemistry and life), extra
            rejects, and the duplicate and late counts.
        """
        rejects: list[pl.DataFrame] = []
        self._version += 1
        watermark_before = self.watermark_ms  # "late" is relative to what came before this batch
        self._apply_meta(decoded.meta)
        self._apply_status(decoded.status)
        self._apply_site(decoded.site)

        tele = decoded.telemetry
        skew_limit = now_ms + int(self.options.max_clock_skew_s * 1000)
        newest = tele.get_column("ts_ms").max()
        if newest is not None and newest > skew_limit:  # type: ignore[operator]
            skewed = tele.filter(pl.col("ts_ms") > skew_limit)
            self.counters["clock_skew"] += skewed.height
            rejects.append(
                _reject(skewed, "clock_skew", f"timestamp more than {self.options.max_clock_skew_s:g} s ahead")
            )
            tele = tele.filter(pl.col("ts_ms") <= skew_limit)
        idx = self._indices(tele.get_column("pack"))
        refused = self._register(tele.get_column("pack"), idx) if tele.height else []
        if refused:
            capped = tele.filter(pl.col("pack").is_in(refused))
            self.counters["cardinality_cap"] += capped.height
            rejects.append(_reject(capped, "cardinality_cap", f"more than {self.options.max_packs} packs"))
            tele = tele.filter(~pl.col("pack").is_in(refused))
        if not bool(np.all(idx >= 0)):  # packs were registered or refused: look the rest up again
            idx = self._indices(tele.get_column("pack"))

        # Duplicates: within the batch, and against what was seen within the late window.
        before = tele.height
        complete = tele.select(pl.col("pack", "seq", "ts_ms").null_count()).row(0) == (0, 0, 0)
        if tele.height and not (complete and self._no_duplicates(idx, tele.get_column("seq").to_numpy())):
            tele = self._drop_duplicates(tele)
            idx = self._indices(tele.get_column("pack"))
        duplicates = before - tele.height
        self.counters["duplicate"] += duplicates

        late = 0
        if tele.height:
            horizon = watermark_before - int(self.options.late_window_s * 1000)
            ts = tele.get_column("ts_ms")
            late = int((ts < horizon).sum())
            self.counters["late"] += late
            self.watermark_ms = max(self.watermark_ms, int(ts.max()))  # type: ignore[arg-type]
            self._remember(tele, self.watermark_ms - int(self.options.late_window_s * 1000))
            accepted = idx >= 0
            np.maximum.at(
                self.packs.seq_high, idx[accepted], tele.get_column("seq").fill_null(_NO_SEQ).to_numpy()[accepted]
            )
            self._apply_telemetry(tele, idx)
            self.estimation.update(tele)
        return IngestResult(
            telemetry=self._tagged(tele, idx),
            rejects=pl.concat(rejects) if rejects else pl.DataFrame(schema=_REJECT_SCHEMA),
            duplicates=duplicates,
            late=late,
        )

    def _tagged(self, tele: pl.DataFrame, idx: NDArray[np.int64]) -> pl.DataFrame:
        """The rows with their pack's chemistry and life tags (null for a pack without metadata)."""
        tags = pl.DataFrame(
            {"pack": self.packs.ids, "chemistry": self.packs.chemistry, "life": self.packs.life},
            schema={"pack": pl.String, "chemistry": pl.String, "life": pl.String},
        )
        if not bool(np.all(idx >= 0)):  # a pack that is not registered (a null id): join, as before
            return tele.join(tags, on="pack", how="left", maintain_order="left")
        rows = pl.Series(idx)
        return tele.with_columns(tags.get_column("chemistry").gather(rows), tags.get_column("life").gather(rows))

    @staticmethod
    def _newest_in_order(tele: pl.DataFrame, idx: NDArray[np.int64]) -> tuple[NDArray[np.int64], pl.DataFrame] | None:
        """Each pack's newest row when every pack's times strictly rise through the batch (else None).

        Vectorised: a stable sort by pack index (rows keep their batch order within a pack),
        and each pack's last row. With ties or disorder in time, null times or unknown packs
        the caller takes the general way.
        """
        ts = tele.get_column("ts_ms")
        if ts.null_count() or not bool(np.all(idx >= 0)):
            return None
        order = np.argsort(idx, kind="stable")
        p, t = idx[order], ts.to_numpy()[order]
        step = p[1:] != p[:-1]
        if not bool(np.all((t[1:] > t[:-1]) | step)):
            return None
        ends = np.flatnonzero(np.append(step, True))  # each pack's last row
        return p[ends], tele[order[ends]]

    def _apply_telemetry(self, tele: pl.DataFrame, idx: NDArray[np.int64]) -> None:
        """Move each pack's mirror to its newest row of the batch, if newer than what it holds."""
        newest = self._newest_in_order(tele, idx)
        if newest is not None:
            idx, latest = newest
        else:
            latest = tele.sort("ts_ms").group_by("pack", maintain_order=True).last()
            idx = self._indices(latest.get_column("pack"))
            known = idx >= 0
            idx, latest = idx[known], latest.filter(pl.Series(known))
        newer = latest.get_column("ts_ms").to_numpy() > self.packs.last_ts_ms[idx]
        idx, rows_new = idx[newer], latest.filter(pl.Series(newer))
        packs = self.packs
        for name in _TELEMETRY_VALUES:  # a fixed handful of columns, each updated for all packs at once
            packs.values[name][idx] = rows_new[name].to_numpy()
        packs.last_ts_ms[idx] = rows_new["ts_ms"].to_numpy()
        packs.last_seq[idx] = rows_new["seq"].to_numpy()
        packs.contactor_closed[idx] = rows_new["contactor_closed"].to_numpy()
        packs.fault_bits[idx] = rows_new["fault_bits"].to_numpy()

    def _apply_meta(self, meta: pl.DataFrame) -> None:
        if meta.height == 0:
            return
        meta = meta.group_by("pack", maintain_order=True).last()
        self._register(meta["pack"])
        known = meta.filter(pl.col("pack").is_in(self.packs.ids))
        idx = self._indices(known["pack"])
        for column, key in _META_VALUES.items():
            self.packs.values[key][idx] = known[column].cast(pl.Float64).to_numpy()
        self.packs.has_meta[idx] = True
        for i, chem, life in zip(idx, known["chemistry"], known["life"], strict=True):  # per meta message, rare
            self.packs.chemistry[i] = chem
            self.packs.life[i] = life
        self.estimation.add_meta(known)

    def _apply_status(self, status: pl.DataFrame) -> None:
        if status.height == 0:
            return
        status = status.group_by("pack", maintain_order=True).last()
        self._register(status["pack"])
        known = status.filter(pl.col("pack").is_in(self.packs.ids))
        idx = self._indices(known["pack"])
        self.packs.status_online[idx] = (known["state"] == "online").to_numpy()

    def _apply_site(self, site: pl.DataFrame) -> None:
        if site.height == 0:
            return
        row = site.sort("ts_ms").row(-1, named=True)
        if self.site_row is None or int(row["ts_ms"]) >= int(self.site_row["ts_ms"]):  # type: ignore[call-overload]
            self.site_row = row
        self.watermark_ms = max(self.watermark_ms, int(row["ts_ms"]))

    # ------------------------------------------------------------------ views

    def online(self, now_ms: int) -> B:
        """Which packs are online: gateway status online and telemetry fresher than ``stale_after_s``."""
        p = self.packs
        fresh = (now_ms - p.last_ts_ms) <= self.options.stale_after_s * 1000
        return p.status_online & fresh & (p.last_ts_ms > 0)

    def available(self, now_ms: int) -> B:
        """Which packs can discharge now: online, contactor closed, no BMS fault, metadata known."""
        p = self.packs
        out: B = self.online(now_ms) & p.contactor_closed & (p.fault_bits == 0) & p.has_meta
        return out

    def _estimates(self, now_ms: int) -> tuple[PackEstimates | None, NDArray[np.int64]]:
        """The per-pack estimates at ``now_ms`` (cached per (now, ingest)) and each one's core pack index."""
        key = (now_ms, self._version)
        if self._estimates_key != key:
            est = self.estimation.packs(now_ms=now_ms)
            if est is not None and self._rows_ids is not est.pack_ids:  # the pack set changed (rarely)
                self._rows = np.array([self.packs.index[k] for k in est.pack_ids], dtype=np.int64)
                self._rows_ids = est.pack_ids
            self._estimates_key, self._estimates_value = key, est
        est = self._estimates_value
        return est, (self._rows if est is not None else np.zeros(0, dtype=np.int64))

    def site_signature(self, now_ms: int) -> tuple[int, int, float]:
        """Packs online, packs excluded and the site's SoC: what decides an early state publish.

        The same SoC as :meth:`site_frame`'s, without the runtime simulation, so it is cheap
        enough to check after every batch.
        """
        online = self.online(now_ms)
        available = self.available(now_ms)
        est, rows = self._estimates(now_ms)
        soc = self.estimation.site_soc(est, available[rows]) if est is not None else None
        return int(online.sum()), int((online & ~available).sum()), soc or 0.0

    def _views(self, now_ms: int) -> _Views:
        """The estimates at ``now_ms``, computed once per (now, ingest) and shared by both frames."""
        key = (now_ms, self._version)
        if self._views_key == key and self._views_value is not None:
            return self._views_value
        p = self.packs
        est, rows = self._estimates(now_ms)
        outlook: SiteOutlook | None = None
        if est is not None:
            site = self.site_row or {}
            v = p.values
            outlook = self.estimation.outlook(
                est,
                temp_c=v["temp_avg_c"][rows],
                current_a=v["current_a"][rows],
                available=self.available(now_ms)[rows],
                battery_w=_finite_or_none(site.get("battery_w")),
                load_w=_finite_or_none(site.get("load_w")),
            )
        views = _Views(estimates=est, rows=rows, outlook=outlook)
        self._views_key, self._views_value = key, views
        return views

    def pack_frame(self, now_ms: int, *, extended: bool = False) -> pl.DataFrame:
        """Every pack's state in the contract's TwinPackState columns (plus chemistry and life tags).

        Args:
            now_ms: the time now (staleness).
            extended: also return the estimator's internals (``soc_mean``, ``soc_min_cell``,
                ``current_offset_a``) for the offline replay's ``estimates.parquet``.
        """
        p = self.packs
        v = p.values
        n = len(p.ids)
        online = self.online(now_ms)
        available = self.available(now_ms)
        views = self._views(now_ms)
        est, rows, outlook = views.estimates, views.rows, views.outlook
        columns = (
            "soc",
            "soc_std",
            "soc_mean",
            "soc_min_cell",
            "current_offset_a",
            "capacity_ah",
            "capacity_std_ah",
            "rated_ah",
            "soh",
            "soh_std",
            "resistance_ohm",
            "resistance_growth",
            "rul_days_p5",
            "rul_days_p50",
            "rul_days_p95",
            "rul_efc_p50",
        )
        values = {name: np.full(n, np.nan) for name in (*columns, "e50", "e5", "e95")}
        bits = np.full(n, _NO_META_BIT, dtype=np.int64)
        knee = np.zeros(n, dtype=np.bool_)
        knee_onset = np.full(n, -1, dtype=np.int64)
        if est is not None and outlook is not None:
            for name in columns:
                values[name][rows] = getattr(est, name)
            knee[rows] = est.knee
            knee_onset[rows] = est.knee_onset_ms
            values["e50"][rows] = outlook.pack_energy_kwh
            values["e5"][rows] = outlook.pack_energy_kwh_p5
            values["e95"][rows] = outlook.pack_energy_kwh_p95
            bits[rows] = est.flags
        bits |= np.where(online, 0, _OFFLINE_BIT)
        data: dict[str, object] = {
            "pack": p.ids,
            "chemistry": p.chemistry,
            "life": p.life,
            "ts_ms": np.maximum(p.last_ts_ms, 0),
            "online": online,
            "available": available,
            "soc": values["soc"],
            "soc_std": values["soc_std"],
            "soc_bms": v["soc_bms"],
            "energy_to_floor_kwh": values["e50"],
            "energy_to_floor_kwh_p5": values["e5"],
            "energy_to_floor_kwh_p95": values["e95"],
            "capacity_ah": values["capacity_ah"],
            "capacity_ah_std": values["capacity_std_ah"],
            "soh": values["soh"],
            "soh_std": values["soh_std"],
            "soh_bms": v["soh_bms"],
            "resistance_ohm": values["resistance_ohm"],
            "resistance_growth": values["resistance_growth"],
            "rul_days_p5": values["rul_days_p5"],
            "rul_days_p50": values["rul_days_p50"],
            "rul_days_p95": values["rul_days_p95"],
            "rul_efc_p50": values["rul_efc_p50"],
            "knee": knee,
            "knee_onset_ms": pl.Series(knee_onset).replace(-1, None),
            "quality": bits,
        }
        if extended:
            data.update({name: values[name] for name in ("soc_mean", "soc_min_cell", "current_offset_a")})
        floats = [k for k, col in data.items() if isinstance(col, np.ndarray) and col.dtype == np.float64]
        return pl.DataFrame(data, schema_overrides={"chemistry": pl.String, "life": pl.String}).with_columns(
            *[pl.when(pl.col(k).is_finite()).then(pl.col(k)).alias(k) for k in floats],  # NaN, inf: unknown
            _quality_names(pl.col("quality")),
        )

    def site_frame(self, now_ms: int) -> pl.DataFrame:
        """The site's state, one row in the contract's TwinState columns."""
        p = self.packs
        v = p.values
        online = self.online(now_ms)
        available = self.available(now_ms)
        max_dis = float(np.where(available, np.nan_to_num(v["current_max_discharge_a"] * v["voltage_v"]), 0.0).sum())
        site = self.site_row or {}
        out = self._views(now_ms).outlook
        quality: list[str] = []
        estimates: dict[str, float | None] = dict.fromkeys(_SITE_ESTIMATES)
        if out is None or not np.isfinite(out.energy_kwh):
            quality.append("no_estimate")
        else:
            horizon = self.estimation.options.outlook.horizon_s
            for name in _SITE_ESTIMATES:
                value = getattr(out, name)
                if value is not None and not np.isfinite(value):
                    quality.append(f"{name.split('_s_')[0]}_beyond_horizon")
                    value = horizon
                estimates[name] = None if value is None else float(value)
        estimates = {_SITE_RENAMES.get(k, k): val for k, val in estimates.items()}
        return pl.DataFrame(
            {
                "site": [self.options.site],
                "ts_ms": [max(self.watermark_ms, 0)],
                "packs_total": [len(p.ids)],
                "packs_online": [int(online.sum())],
                "packs_offline": [int((~online).sum())],
                "packs_excluded": [int((online & ~available).sum())],
                "load_w": [site.get("load_w")],
                "solar_w": [site.get("solar_w")],
                "grid_w": [site.get("grid_w")],
                "battery_w": [site.get("battery_w")],
                **{k: [val] for k, val in estimates.items()},
                "max_discharge_w": [max_dis],
                "quality": [sorted(set(quality))],
            },
            schema_overrides={**dict.fromkeys(_SITE_FLOATS, pl.Float64), "quality": pl.List(pl.String)},
        )


@dataclass(frozen=True, slots=True)
class _Views:
    estimates: PackEstimates | None
    rows: NDArray[np.int64]  # core pack index of each estimated pack
    outlook: SiteOutlook | None


_SITE_ESTIMATES: Final = (
    "soc",
    "soc_p5",
    "soc_p95",
    "energy_kwh",
    "energy_kwh_p5",
    "energy_kwh_p95",
    "runtime_s_p5",
    "runtime_s_p50",
    "runtime_s_p95",
    "ridethrough_s_p5",
    "ridethrough_s_p50",
    "ridethrough_s_p95",
)
_SITE_RENAMES: Final = {
    "energy_kwh": "energy_to_floor_kwh",
    "energy_kwh_p5": "energy_to_floor_kwh_p5",
    "energy_kwh_p95": "energy_to_floor_kwh_p95",
}


_NO_SEQ: Final = np.iinfo(np.int64).min  # seq_high of a pack with nothing accepted yet
_NO_META_BIT: Final = 1 << 40
_OFFLINE_BIT: Final = 1 << 41
_QUALITY_NAMES: Final = (*QUALITY_FLAGS, (_NO_META_BIT, "no_meta"), (_OFFLINE_BIT, "offline"))


def _quality_names(bits: pl.Expr) -> pl.Expr:
    """The list of quality names whose bit is set, in publishing order (for all packs at once)."""
    names = [pl.when((bits & bit) != 0).then(pl.lit(name)) for bit, name in _QUALITY_NAMES]
    return pl.concat_list(names).list.drop_nulls().alias("quality")


def _finite_or_none(value: object) -> float | None:
    if value is None:
        return None
    out = float(value)  # type: ignore[arg-type]
    return out if np.isfinite(out) else None


def _reject(frame: pl.DataFrame, reason: str, detail: str) -> pl.DataFrame:
    return frame.select(
        pl.col("msg"),
        pl.lit("").alias("topic"),
        pl.lit(reason).alias("reason"),
        pl.lit(detail).alias("detail"),
        pl.lit("").alias("payload_excerpt"),
    )


def warm_up_kernels() -> float:
    """Compile the estimators' kernels (or load them from numba's cache); return the seconds it took.

    Two packs of two chemistries, a few seconds of telemetry and one site reading go through
    a throwaway core, as the live service's batches do, so the kernels are ready before the
    first batch: after an install compiling them takes 10-20 s, which would otherwise stall
    the worker in the middle of a stream (with the cache in place, a fraction of a second).
    """
    started = time.perf_counter()
    site, t0 = "warm-up", 1_767_225_600_000
    core = TwinCore(CoreOptions(site=site))
    messages: list[tuple[str, bytes]] = []
    for k, (chem, cells, ah) in enumerate((("nmc811", 96, 60.0), ("lfp", 120, 100.0))):
        pack = f"W{k}"
        meta = c.PackMeta(
            pack=pack,
            ts_ms=t0,
            chemistry=chem,
            life="second_life",
            oem="warm-up",
            rated_capacity_ah=ah,
            rated_energy_kwh=ah * cells * 3.6e-3,
            series_cells=cells,
            parallel_cells=1,
            voltage_min_v=2.5 * cells,
            voltage_max_v=4.2 * cells,
            current_max_discharge_a=2.0 * ah,
            current_max_charge_a=ah,
            commissioned_ms=t0 - 86_400_000,
            intake_soh=0.8,
        )
        messages.append((c.topic(c.TopicKind.PACK_META, site, pack), c.encode(meta)))
        v_cell = 3.7 if chem == "nmc811" else 3.3
        for s in range(5):
            sample = c.PackTelemetry(
                pack=pack,
                ts_ms=t0 + 1000 * s,
                seq=s,
                voltage_v=v_cell * cells,
                current_a=10.0,
                temp_min_c=24.0,
                temp_max_c=26.0,
                temp_avg_c=25.0,
                cell_v_min_v=v_cell - 0.01,
                cell_v_max_v=v_cell + 0.01,
                cell_v_min_idx=0,
                cell_v_max_idx=1,
                soc_bms=0.5,
                soh_bms=0.8,
                contactor_closed=True,
                fault_bits=0,
            )
            messages.append((c.topic(c.TopicKind.PACK_TELEMETRY, site, pack), c.encode(sample)))
    reading = c.SiteTelemetry(
        site=site, ts_ms=t0, seq=0, load_w=1e5, solar_w=0.0, grid_w=0.0, battery_w=5e4, ambient_c=25.0
    )
    messages.append((c.topic(c.TopicKind.SITE_TELEMETRY, site), c.encode(reading)))
    decoded = decode_batch([t for t, _ in messages], [p for _, p in messages], site=site)
    now_ms = t0 + 5000
    core.ingest(decoded, now_ms=now_ms)
    core.pack_frame(now_ms)
    core.site_frame(now_ms)
    return time.perf_counter() - started
