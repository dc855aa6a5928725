"""Wiring of the live service: MQTT in, the core, InfluxDB and MQTT out, health, signals, shutdown.

Threads: paho's network thread (enqueues only), one worker (everything else, in order),
and the health endpoint. The worker loops:

1. take a micro-batch from the bounded queue (by count and by age);
2. decode and validate it in bulk (:func:`twin.pipeline.decode_batch`) and update the
   mirror (:class:`twin.state.TwinCore`);
3. render the batch's points (:mod:`twin.points`) and write them to InfluxDB, retrying
   5xx, 429 and timeouts with capped, jittered backoff for as long as it takes; a 4xx
   other than 429 is dead-lettered, not retried;
4. acknowledge the batch's messages, in order, only now: while InfluxDB is down nothing
   is acknowledged, so the broker holds the backlog (its queue is the durable buffer);
5. dead-letter refused messages on ``twin/deadletter`` with their reason, and every
   ``publish.interval_s`` publish the site and pack state (retained, with an expiry) and
   write the state and the service's own health counters to InfluxDB.

SIGTERM or SIGINT: stop taking messages, finish the batch in hand (write, acknowledge)
within the deadline, publish ``offline``, exit 0. A second signal exits at once; what was
not written is not acknowledged, so the broker redelivers it to the next start.

Ingest guards besides the core's (:mod:`twin.state`): cell snapshots and site telemetry obey
the same clock-skew rule as pack telemetry, and cell snapshots of a pack the core does not
know (no telemetry, meta or status yet: ``unknown_pack``, or ``cardinality_cap`` once the cap
is reached) are refused, so random pack ids on ``cells`` cannot create series without bound;
a telemetry sample that takes the (pack, ts_ms) of another sample with a
different ``seq`` is refused as ``ts_collision`` (it would overwrite that point). A batch
whose processing raises is dead-lettered (``internal_error``) and acknowledged, so one
poison batch cannot stall the stream; the error is counted and alerted.

Service alerts on ``twin/alerts`` (kinds ``influx_unavailable``, ``broker_dropped``,
``session_taken_over``, ``cardinality_cap``, ``ingest_errors``): raised when the condition
appears (a counter grows), cleared after ``_SERVICE_ALERT_CLEAR_S`` without it.

A single-instance lock (:class:`twin.io.mqtt.SessionLock`) is taken before connecting: a
second copy with the same client id on the same broker refuses to start.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Final

import numpy as np
import polars as pl

from twin import __version__
from twin import contract as c
from twin.alerts import AlertEngine, AlertOptions, alerts_frame
from twin.clock import Clock, SystemClock
from twin.config import Settings
from twin.io.health import HealthServer
from twin.io.influx import RetryPolicy, WriteOutcome, Writer, make_writer, write_with_retry
from twin.io.mqtt import Inbound, MqttLink, SessionLock
from twin.pipeline import REJECTS_SCHEMA, Decoded, decode_batch
from twin.points import MEASUREMENTS, render
from twin.state import CoreOptions, IngestResult, TwinCore, warm_up_kernels

__all__ = ["Service", "ServiceStats"]

log = logging.getLogger(__name__)

SHUTDOWN_DEADLINE_S: Final = 10.0
_DEADLETTER_SAMPLE: Final = 200  # at most this many dead-letter messages per batch are published
_SERVICE_ALERT_CLEAR_S: Final = 60.0  # a counter-driven service alert clears after this long without growth
_WRITE_SLOW_S: Final = 5.0  # a write in progress for longer makes /healthz degraded (a hung InfluxDB, F2)
# Service alerts: kind -> (severity, what the counter or condition means).
_SERVICE_ALERTS: Final[dict[str, tuple[str, str]]] = {
    "influx_unavailable": ("critical", "InfluxDB does not take writes; the broker holds the backlog"),
    "broker_dropped": ("critical", "the broker dropped messages: a client queue reached max_queued_messages"),
    "session_taken_over": (
        "critical",
        "the MQTT connection flaps or was taken over: another client with the twin's client id?",
    ),
    "cardinality_cap": ("warning", "telemetry of packs beyond ingest.max_packs was refused"),
    "ingest_errors": ("warning", "errors in the MQTT callback or the ingest worker"),
}
_DTYPES: Final[dict[type, pl.DataType]] = {float: pl.Float64(), int: pl.Int64(), bool: pl.Boolean(), str: pl.String()}


@dataclass
class ServiceStats:
    """The service's own counters (exported on /metrics and to InfluxDB's twin_health)."""

    counts: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)
    lag_ms: float = 0.0
    influx_ok: bool = True
    influx_error: str | None = None
    last_write_s: float = 0.0
    last_retry_delay_s: float = 0.0
    batches: int = 0


class Service:
    """The twin service (``mgtwin serve``).

    Args:
        settings: validated settings.
        clock: the wall clock (injected; tests use a manual one).
        writer: the InfluxDB writer; by default from the settings (None when no URL is set).
        link: the MQTT link; by default from the settings.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        writer: Writer | None = None,
        link: MqttLink | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.site = settings.site
        self.core = TwinCore(CoreOptions.from_settings(settings))
        # Alerts (issue 6): raised and cleared per batch, in event time (twin.alerts).
        self.alerts = AlertEngine(AlertOptions.from_settings(settings)) if settings.alerts.enabled else None
        self.writer = writer if writer is not None else (make_writer(settings.influx) if settings.influx.url else None)
        self.link = link or MqttLink(
            settings.mqtt,
            site=settings.site,
            client_id=settings.client_id,
            queue_max=settings.ingest.queue_max_messages,
            version=__version__,
        )
        self.stats = ServiceStats()
        self.stop_event = threading.Event()
        self._force = threading.Event()
        self._retry = RetryPolicy(max_s=settings.influx.retry_max_s)
        self._last_publish_s = 0.0
        self._pack_signature = np.zeros(0)
        self._last_site: tuple[int, int, float] | None = None
        self.health: HealthServer | None = None
        self._worker: threading.Thread | None = None
        self._stopping_since: float | None = None
        self.lock = SessionLock(settings.client_id, f"{self.link.host}:{self.link.port}", folder=settings.mqtt.lock_dir)
        self._in_hand: list[Inbound] | None = None  # the batch being processed, until acknowledged
        self._write_started_s: float | None = None
        self._recent_ts = pl.DataFrame(schema={"pack": pl.String, "ts_ms": pl.Int64, "seq": pl.Int64})
        self.service_alerts: dict[str, c.Alert] = {}  # active service alerts by kind
        self._alert_marks: dict[str, tuple[float, float]] = {}  # kind -> (last value, when it last grew)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Take the single-instance lock, ready the kernels, connect to the broker, start the worker and health.

        Raises:
            BrokerError: another copy holds the lock, or the broker cannot be reached.
        """
        h = self.settings.health
        self.lock.acquire()
        # Before the first message: after an install the kernels take 10-20 s to compile, and
        # the broker holds the site's messages meanwhile rather than the worker stalling mid-stream.
        took = warm_up_kernels()
        if took > 2.0:
            log.info("compiled the estimators' kernels in %.0f s (once per install: numba caches them)", took)
        self.health = HealthServer(h.host, h.port, health=self.healthz, metrics=self.metrics)
        self.health.start()
        self.link.start()
        self.link.publish_status("online", self.clock.now_ms())
        self._worker = threading.Thread(target=self._run, name="mgtwin-worker", daemon=True)
        self._worker.start()
        log.info("serving site %s (health on %s:%d)", self.site, h.host, self.health.port)

    def request_stop(self) -> None:
        """Ask for a graceful stop (the first SIGTERM); a second call forces it."""
        if self.stop_event.is_set():
            self._force.set()
        self._stopping_since = self._stopping_since or time.monotonic()
        self.stop_event.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the worker to finish; return whether it did."""
        if self._worker is None:
            return True
        self._worker.join(timeout_s)
        return not self._worker.is_alive()

    def close(self) -> None:
        """Publish offline, disconnect, stop the health endpoint, close the writer, release the lock."""
        self.link.stop(publish_offline=True)
        if self.health is not None:
            self.health.stop()
        if self.writer is not None:
            self.writer.close()
        self.lock.release()

    def install_signal_handlers(self) -> None:
        """Route SIGTERM and SIGINT to :meth:`request_stop`."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping (again to force)", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        ingest = self.settings.ingest
        while not self.stop_event.is_set():
            try:
                batch = self.link.take(ingest.batch_max_messages, ingest.batch_max_age_s, self.stop_event)
                if batch:
                    self.process(batch)
                self._maybe_publish_state()
                self._check_service_alerts()
            except Exception:  # the worker must not die silently: log, count, go on
                log.exception("error in the worker loop")
                self.stats.counts["worker_errors"] += 1
                self._abandon_in_hand()
                time.sleep(0.5)
        # Graceful stop: what is queued was not acknowledged; the broker redelivers it.
        self._publish_state(force=True)

    def _should_give_up(self) -> bool:
        if self._force.is_set():
            return True
        if self._stopping_since is None:
            return False
        return time.monotonic() - self._stopping_since > SHUTDOWN_DEADLINE_S

    def process(self, batch: list[Inbound]) -> bool:
        """Process one micro-batch end to end; return whether it was acknowledged."""
        stats = self.stats
        stats.batches += 1
        stats.counts["received"] += len(batch)
        self._in_hand = batch  # until acknowledged; abandoned (dead-lettered, acked) if this raises
        decoded = decode_batch([m.topic for m in batch], [m.payload for m in batch], site=self.site)
        now_ms = self.clock.now_ms()
        result = self.core.ingest(decoded, now_ms=now_ms)
        rejects = pl.concat([decoded.rejects, result.rejects]) if result.rejects.height else decoded.rejects
        stats.counts["accepted"] += decoded.accepted() - result.rejects.height
        decoded, result, guarded = self._guard(decoded, result, now_ms)
        if guarded.height:
            rejects = pl.concat([rejects, guarded])
            stats.counts["accepted"] -= guarded.height
        stats.counts["duplicates"] += result.duplicates
        stats.counts["late"] += result.late
        if result.telemetry.height:
            stats.lag_ms = float(now_ms - int(result.telemetry["ts_ms"].max()))  # type: ignore[arg-type]

        bodies = self._render_batch(result.telemetry, decoded)
        # --- alerts (issue 6): evaluated after the mirror, written with the batch, published once written.
        alerts: list[c.Alert] = []
        if self.alerts is not None:
            alerts = self.alerts.update(
                result.telemetry, core=self.core, now_ms=now_ms, site=decoded.site, status=decoded.status
            )
            if alerts:
                bodies.append(self._render(alerts_frame(alerts).drop("site"), "alerts"))
        # --- end of alerts
        outcome = self._write(bodies)
        if outcome is not None and outcome.status == "retry":
            log.warning(
                "stopping with %d messages not written and %d queued; the broker will redeliver them",
                len(batch),
                self.link.queue.qsize(),
            )
            stats.counts["unwritten_at_stop"] += len(batch)
            self._in_hand = None
            return False
        if outcome is not None and outcome.status == "rejected":
            if not outcome.partial:  # a partial write kept the valid points; only the refused ones count
                stats.counts["deadlettered"] += len(batch) - rejects.height
            self._deadletter_batch(batch, outcome)
        if rejects.height:
            self._deadletter(batch, rejects)
        self.link.ack(batch)
        self._in_hand = None
        self._publish_alerts(alerts)
        return True

    def _publish_alerts(self, alerts: list[c.Alert]) -> None:
        """Publish each raised or cleared alert on ``twin/alerts`` (QoS 1, not retained) and count it."""
        topic = c.topic(c.TopicKind.TWIN_ALERTS, self.site)
        for alert in alerts:  # transitions are rare
            self.link.publish(topic, c.encode(alert))
            self.stats.counts[f"alerts_{alert.state}"] += 1

    # ------------------------------------------------------------------ ingest guards

    def _guard(self, decoded: Decoded, result: IngestResult, now_ms: int) -> tuple[Decoded, IngestResult, pl.DataFrame]:
        """Apply the rules the core leaves to the service; return the filtered batch and the new rejects."""
        rejects: list[pl.DataFrame] = []
        skew_limit = now_ms + int(self.settings.ingest.max_clock_skew_s * 1000)
        skew_detail = f"timestamp more than {self.settings.ingest.max_clock_skew_s:g} s ahead"
        cells, site = decoded.cells, decoded.site
        if cells.height:
            skewed = pl.col("ts_ms") > skew_limit
            unknown = ~pl.col("pack").is_in(list(self.core.packs.ids))
            rejects.append(_rejects(cells.filter(skewed), "clock_skew", skew_detail))
            # A pack is known once its telemetry, meta or status came (within the cap); cell
            # snapshots alone never create a pack, so random ids on `cells` cannot add series.
            full = len(self.core.packs.ids) >= self.settings.ingest.max_packs
            reason, detail = (
                ("cardinality_cap", f"more than {self.settings.ingest.max_packs} packs")
                if full
                else ("unknown_pack", "no telemetry, meta or status of this pack yet")
            )
            rejects.append(_rejects(cells.filter(~skewed & unknown), reason, detail))
            cells = cells.filter(~skewed & ~unknown)
        if site.height:
            rejects.append(_rejects(site.filter(pl.col("ts_ms") > skew_limit), "clock_skew", skew_detail))
            site = site.filter(pl.col("ts_ms") <= skew_limit)
        telemetry, collided = self._ts_collisions(result.telemetry)
        rejects.append(collided)
        refused = pl.concat([r for r in rejects if r.height]) if any(r.height for r in rejects) else _NO_REJECTS
        if refused.height:
            for reason in ("clock_skew", "cardinality_cap"):
                self.core.counters[reason] += int((refused["reason"] == reason).sum())
            decoded = dataclasses.replace(decoded, cells=cells, site=site)
            result = dataclasses.replace(result, telemetry=telemetry)
        return decoded, result, refused

    def _ts_collisions(self, tele: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Split off samples whose (pack, ts_ms) another seq already holds, in the batch or recently (B5)."""
        if tele.height == 0:
            return tele, _NO_REJECTS
        keys = tele.select("msg", "pack", "ts_ms", "seq")
        first = keys.unique(subset=["pack", "ts_ms"], keep="first", maintain_order=True)
        in_batch = keys.join(first.select("msg"), on="msg", how="anti")
        earlier = first.join(self._recent_ts, on=["pack", "ts_ms"], how="inner").filter(
            pl.col("seq") != pl.col("seq_right")
        )
        collided = pl.concat([in_batch, earlier.select(keys.columns)])
        if collided.height:
            tele = tele.join(collided.select("msg"), on="msg", how="anti", maintain_order="left")
        keep_from = self.core.watermark_ms - int(self.settings.ingest.late_window_s * 1000)
        self._recent_ts = pl.concat([self._recent_ts, tele.select("pack", "ts_ms", "seq")]).filter(
            pl.col("ts_ms") >= keep_from
        )
        self.stats.counts["ts_collisions"] += collided.height
        detail = "another sample of this pack with a different seq has this timestamp"
        return tele, _rejects(collided, "ts_collision", detail)

    def _abandon_in_hand(self) -> None:
        """Dead-letter and acknowledge the batch whose processing raised, so it cannot stall the stream."""
        batch, self._in_hand = self._in_hand, None
        if not batch:
            return
        self.stats.counts["deadlettered"] += len(batch)
        self.stats.invalid["internal_error"] += len(batch)
        letter = c.DeadLetter(
            topic=f"{len(batch)} messages from {batch[0].topic}"[:1024],
            reason="internal_error",
            detail="processing the batch raised; see the service log",
            payload_excerpt=batch[0].payload[:200].decode(errors="replace"),
            received_ms=self.clock.now_ms(),
        )
        try:
            self.link.publish(c.topic(c.TopicKind.TWIN_DEADLETTER, self.site), c.encode(letter))
        finally:
            self.link.ack(batch)

    # ------------------------------------------------------------------ service alerts

    def _check_service_alerts(self) -> None:
        """Raise or clear the service's own alerts (see the module docstring)."""
        link = self.link.counters
        now = time.monotonic()
        growing = {
            "broker_dropped": link["broker_dropped"],
            "session_taken_over": link["session_taken_over"] + link["flapping"],
            "cardinality_cap": self.core.counters["cardinality_cap"],
            "ingest_errors": link["callback_errors"] + link["queue_overflow"] + self.stats.counts["worker_errors"],
        }
        for kind, value in growing.items():
            last, since = self._alert_marks.get(kind, (0.0, -1e9))
            if value > last:
                self._alert_marks[kind] = (float(value), now)
                self._service_alert(kind, raised=True, value=float(value))
            elif now - since >= _SERVICE_ALERT_CLEAR_S:
                self._service_alert(kind, raised=False, value=float(value))
        self._service_alert("influx_unavailable", raised=not self.stats.influx_ok, value=None)

    def _service_alert(self, kind: str, *, raised: bool, value: float | None) -> None:
        active = kind in self.service_alerts
        if raised == active:
            return
        severity, meaning = _SERVICE_ALERTS[kind]
        now_ms = self.clock.now_ms()
        first = self.service_alerts.pop(kind) if active else None
        alert = c.Alert(
            site=self.site,
            ts_ms=now_ms,
            alert_id=first.alert_id if first is not None else f"{kind}-{now_ms}"[:64],
            kind=kind,
            severity=severity,  # type: ignore[arg-type]
            state="raised" if raised else "cleared",
            value=value,
            message=(meaning if raised else f"cleared: {meaning}")[:512],
        )
        if raised:
            self.service_alerts[kind] = alert
            log.error("alert raised: %s (%s)", kind, meaning)
        else:
            log.info("alert cleared: %s", kind)
        self._publish_alerts([alert])

    def _render_batch(self, telemetry: pl.DataFrame, decoded: Any) -> list[bytes]:
        parts = [
            (telemetry, "pack_telemetry"),
            (decoded.cells, "pack_cells"),
            (decoded.site.drop("site"), "site_state"),
        ]
        return [self._render(frame, name) for frame, name in parts if frame.height]

    def _render(self, frame: pl.DataFrame, measurement: str) -> bytes:
        """Render a frame; declared fields the frame does not carry are unknown (null), never 0."""
        spec = MEASUREMENTS[measurement]
        missing = [
            pl.lit(None, dtype=_DTYPES[f.dtype]).alias(f.column or f.field)
            for f in spec.fields
            if (f.column or f.field) not in frame.columns and not f.per_element
        ]
        missing += [pl.lit(None, dtype=pl.String).alias(t) for t in spec.tags if t != "site" and t not in frame.columns]
        if missing:
            frame = frame.with_columns(missing)
        rendered = render(frame, spec, extra_tags={"site": self.site})
        self.stats.counts["dropped_fields"] += rendered.dropped_fields
        return rendered.body

    def _write(self, bodies: list[bytes]) -> WriteOutcome | None:
        if self.writer is None or not bodies:
            return None
        body = b"".join(b if b.endswith(b"\n") else b + b"\n" for b in bodies)

        def on_retry(outcome: WriteOutcome, delay: float) -> None:
            self.stats.counts["write_retries"] += 1
            if self.stats.influx_ok:
                log.warning("InfluxDB write failed (%s); retrying with backoff", outcome.message or outcome.http_status)
            self.stats.influx_ok = False
            self.stats.influx_error = outcome.message or str(outcome.http_status)
            self.stats.last_retry_delay_s = delay
            self._check_service_alerts()  # the worker loop does not run while the batch is retried

        self._write_started_s = time.monotonic()
        try:
            outcome = write_with_retry(
                self.writer,
                body,
                policy=self._retry,
                should_stop=self._should_give_up,
                sleep=self._sleep,
                on_retry=on_retry,
            )
        finally:
            self._write_started_s = None
        if outcome.status == "ok":
            if not self.stats.influx_ok:
                log.info("InfluxDB writes recovered")
            self.stats.influx_ok = True
            self.stats.influx_error = None
            self.stats.last_write_s = time.monotonic()
            self.stats.counts["written_points"] += body.count(b"\n")
        elif outcome.status == "rejected":
            log.error("InfluxDB rejected a batch (%s): dead-lettered", outcome.message)
            lines = body.count(b"\n")
            refused = min(outcome.rejected_points, lines) if outcome.rejected_points is not None else lines
            self.stats.counts["influx_rejected_points"] += refused
            self.stats.counts["written_points"] += lines - refused
        return outcome

    def _sleep(self, seconds: float) -> None:
        """Wait between retries; a forced stop (second signal) ends the wait at once."""
        self._force.wait(seconds)

    def _deadletter(self, batch: list[Inbound], rejects: pl.DataFrame) -> None:
        counts = rejects["reason"].value_counts()
        for reason, n in counts.iter_rows():
            self.stats.invalid[str(reason)] += int(n)
        self.stats.counts["invalid"] += rejects.height
        topic = c.topic(c.TopicKind.TWIN_DEADLETTER, self.site)
        now = self.clock.now_ms()
        for row in rejects.head(_DEADLETTER_SAMPLE).iter_rows(named=True):  # rejects are rare; bounded per batch
            msg_index = int(row["msg"])
            source = batch[msg_index] if 0 <= msg_index < len(batch) else None
            letter = c.DeadLetter(
                topic=(row["topic"] or (source.topic if source else ""))[:1024],
                reason=row["reason"],
                detail=str(row["detail"])[:1024],
                payload_excerpt=(
                    row["payload_excerpt"] or (source.payload[:200].decode(errors="replace") if source else "")
                )[:512],
                received_ms=now,
            )
            self.link.publish(topic, c.encode(letter))
        self.stats.counts["deadlettered"] += rejects.height

    def _deadletter_batch(self, batch: list[Inbound], outcome: WriteOutcome) -> None:
        topic = c.topic(c.TopicKind.TWIN_DEADLETTER, self.site)
        letter = c.DeadLetter(
            topic=f"{len(batch)} messages from {batch[0].topic}"[:1024] if batch else "",
            reason="influx_rejected",
            detail=f"HTTP {outcome.http_status}: {outcome.message}"[:1024],
            payload_excerpt="",
            received_ms=self.clock.now_ms(),
        )
        refused = (outcome.rejected_points or 0) if outcome.partial else len(batch)
        self.stats.invalid["influx_rejected"] += refused
        if outcome.partial:
            self.stats.counts["deadlettered"] += refused
        self.link.publish(topic, c.encode(letter))

    # ------------------------------------------------------------------ outputs

    def _maybe_publish_state(self) -> None:
        """Publish every interval, or at once when the site's state moved beyond the threshold."""
        due = time.monotonic() - self._last_publish_s >= self.settings.publish.interval_s
        if due or self._site_changed():
            self._publish_state(force=False)

    def _site_changed(self) -> bool:
        if self._last_site is None or not self.core.packs.ids:
            return False
        online, excluded, soc = self.core.site_signature(self.clock.now_ms())
        last_online, last_excluded, last_soc = self._last_site
        return (
            online != last_online
            or excluded != last_excluded
            or abs(soc - last_soc) >= self.settings.publish.change_threshold
        )

    def _publish_state(self, *, force: bool) -> None:
        """Publish the site and pack state on MQTT and write state and health to InfluxDB."""
        self._last_publish_s = time.monotonic()
        now_ms = self.clock.now_ms()
        if self.core.watermark_ms <= 0:
            return  # no telemetry yet (meta and status alone carry no event time to stamp a state with)
        site = self.core.site_frame(now_ms)
        packs = self.core.pack_frame(now_ms)
        if self.alerts is not None:  # issue 6: the per-pack anomaly score from the alert engine
            scores = pl.Series("anomaly_score", self.alerts.anomaly_scores(packs["pack"].to_list()))
            packs = packs.with_columns(scores.fill_nan(None))
        self._last_site = self.core.site_signature(now_ms)
        expiry = self.settings.publish.expiry_s
        self.link.publish(
            c.topic(c.TopicKind.TWIN_STATE, self.site),
            c.encode_frame(site, c.TwinState)[0],
            retain=True,
            expiry_s=expiry,
        )
        # Packs whose state did not move beyond the threshold since they were last published are
        # skipped (their retained message still holds); chosen for all packs at once.
        signature = packs["soc"].fill_null(0.0).to_numpy() + np.where(packs["online"].to_numpy(), 100.0, 0.0)
        last = np.full(signature.size, -1e9)
        known = min(self._pack_signature.size, signature.size)
        last[:known] = self._pack_signature[:known]
        changed = np.abs(signature - last) >= self.settings.publish.change_threshold
        if force:
            changed[:] = True
        self._pack_signature = np.where(changed, signature, last)
        chosen = packs.filter(pl.Series(changed))
        for pack, payload in zip(chosen["pack"], c.encode_frame(chosen, c.TwinPackState), strict=True):
            self.link.publish(c.topic(c.TopicKind.TWIN_PACK, self.site, pack), payload, retain=True, expiry_s=expiry)
        if self.writer is not None:
            health = self._health_frame(now_ms)
            bodies = [
                self._render(site.drop("site"), "site_state"),
                self._render(packs.filter(pl.col("ts_ms") > 0), "pack_state"),
                self._render(health, "twin_health"),
            ]
            outcome = self.writer.write(b"".join(b if b.endswith(b"\n") else b + b"\n" for b in bodies if b))
            if outcome.status != "ok":
                self.stats.counts["state_write_failures"] += 1

    def _health_frame(self, now_ms: int) -> pl.DataFrame:
        """The service's counters as one twin_health row (declared fields first, then the rest)."""
        s = self.stats
        data: dict[str, list[float]] = {
            "received": [float(s.counts["received"])],
            "accepted": [float(s.counts["accepted"])],
            "duplicates": [float(s.counts["duplicates"])],
            "late": [float(s.counts["late"])],
            "written_points": [float(s.counts["written_points"])],
            "write_retries": [float(s.counts["write_retries"])],
            "deadlettered": [float(s.counts["deadlettered"])],
            "acked": [float(self.link.counters["acked"])],
            "queue_depth": [float(self.link.queue.qsize())],
            "lag_ms": [s.lag_ms],
        }
        for reason, n in s.invalid.items():
            data[f"invalid_{reason}"] = [float(n)]
        for key, value in self.link.counters.items():
            data[f"mqtt_{key}"] = [float(value)]
        return pl.DataFrame({"ts_ms": [now_ms], **data})

    # ------------------------------------------------------------------ health

    def metrics(self) -> Mapping[str, float]:
        """Counters and gauges for /metrics and the twin_health measurement."""
        s = self.stats
        out: dict[str, float] = {f"{k}_total": float(v) for k, v in s.counts.items()}
        for reason, n in s.invalid.items():
            out[f'invalid_total{{reason="{reason}"}}'] = float(n)
        for k, v in self.link.counters.items():
            out[f"mqtt_{k}_total"] = float(v)
        for k, v in self.core.counters.items():
            out[f"quality_{k}_total"] = float(v)
        out["queue_depth"] = float(self.link.queue.qsize())
        out["queue_capacity"] = float(self.link.queue.maxsize)
        out["lag_ms"] = s.lag_ms
        out["influx_ok"] = 1.0 if s.influx_ok else 0.0
        out["mqtt_connected"] = 1.0 if self.link.connected.is_set() else 0.0
        out["packs"] = float(len(self.core.packs.ids))
        out["packs_estimated"] = float(self.core.estimation.meta.height)  # set once their metadata is digested
        out["write_in_progress_s"] = self._write_age_s()
        out["retry_delay_s"] = s.last_retry_delay_s
        if self.link.broker_dropped_abs is not None:
            out["broker_dropped_messages"] = float(self.link.broker_dropped_abs)  # the broker's own counter
        for kind in _SERVICE_ALERTS:
            out[f'alert_active{{kind="{kind}"}}'] = 1.0 if kind in self.service_alerts else 0.0
        return out

    def _write_age_s(self) -> float:
        started = self._write_started_s
        return 0.0 if started is None else max(0.0, time.monotonic() - started)

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        """Healthy when connected to the broker, InfluxDB accepts writes, and the queue is not near full."""
        s = self.stats
        depth = self.link.queue.qsize()
        write_age = self._write_age_s()
        influx_ok = s.influx_ok and write_age < min(_WRITE_SLOW_S, self.settings.influx.timeout_s)
        ok = self.link.connected.is_set() and influx_ok and depth < 0.9 * self.link.queue.maxsize
        return ok, {
            "mqtt_connected": self.link.connected.is_set(),
            "influx_ok": influx_ok,
            "influx_error": s.influx_error or (f"a write has taken {write_age:.0f} s" if not influx_ok else None),
            "alerts": sorted(self.service_alerts),
            "queue_depth": depth,
            "lag_ms": s.lag_ms,
            "packs": len(self.core.packs.ids),
            "stopping": self.stop_event.is_set(),
        }


_NO_REJECTS: Final = pl.DataFrame(schema=REJECTS_SCHEMA)


def _rejects(frame: pl.DataFrame, reason: str, detail: str) -> pl.DataFrame:
    """Rows of a kind frame as rejects (the topic and excerpt come from the message at dead-letter time)."""
    return frame.select(
        pl.col("msg"),
        pl.lit("").alias("topic"),
        pl.lit(reason).alias("reason"),
        pl.lit(detail).alias("detail"),
        pl.lit("").alias("payload_excerpt"),
    )
