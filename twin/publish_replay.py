"""Where a replay goes besides Parquet: onto MQTT as a live site, or into InfluxDB as the live twin writes.

**Onto MQTT** (:func:`publish_run`, ``mgtwin replay SOURCE --to-mqtt URL --speed X``): the
source is re-published per the contract, so that a live ``mgtwin serve``, Grafana and any
subscriber see a live site. First every pack's ``meta`` (retained), then the status, telemetry,
cells and site messages in event-time order (status, telemetry, cells, site within one
instant, as the emulator publishes them), each at the wall-clock time its event time is due
with the original pacing scaled by ``speed`` (``None``: as fast as the broker acknowledges).
Payloads are the contract's JSON (:func:`twin.contract.encode_frame`); the timestamps are the
source's (shift the source to move them). Messages go at QoS 1 over a few connections, each
pack always on the same one (so a pack's messages stay in order), served from the calling
thread; at most ``window`` messages wait for their PUBACK. The replay's connections have no
last will: the recorded status messages, last wills included, are replayed as data.

**Into InfluxDB** (:class:`InfluxSink`, ``mgtwin replay SOURCE --influx URL``): hooked into
:func:`twin.replay.replay_run`, it writes after every window what the live service writes
(:mod:`twin.app`): the accepted telemetry (``pack_telemetry``, tagged with chemistry and life),
the site meter (``site_state``), the pack and site estimates (``pack_state``, ``site_state``)
stamped at their event time, and, from the source, every ``pack_cells`` row. Point times are
event times, so a second replay of the same source overwrites the same points (idempotent).
The service's own ``twin_health`` counters are not written: a replay is not the service.
"""

from __future__ import annotations

import contextlib
import selectors
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import polars as pl
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from twin import contract as c
from twin.alerts import AlertEngine, alerts_frame
from twin.config import MqttSettings
from twin.errors import BrokerError, DatabaseError
from twin.io.influx import RetryPolicy, Writer, write_with_retry
from twin.points import MEASUREMENTS, render
from twin.replay import ReplayError, ReplayWindow, RunFolder
from twin.sources import cells_batches

__all__ = ["InfluxSink", "PublishOptions", "PublishStats", "publish_run", "render_like_service"]

_DTYPES: Final[dict[type, pl.DataType]] = {float: pl.Float64(), int: pl.Int64(), bool: pl.Boolean(), str: pl.String()}
_KIND_ORDER: Final = {"status": 0, "telemetry": 1, "cells": 2, "site": 3}
_CONNECT_TIMEOUT_S: Final = 15.0


# --------------------------------------------------------------------------- rendering


def render_like_service(frame: pl.DataFrame, measurement: str, site: str) -> tuple[bytes, int]:
    """Render a frame as the live service does (:meth:`twin.app.Service._render`); return the body and its lines.

    Declared fields and tags the frame does not carry are unknown (null), never 0.
    """
    spec = MEASUREMENTS[measurement]
    missing = [
        pl.lit(None, dtype=_DTYPES[f.dtype]).alias(f.column or f.field)
        for f in spec.fields
        if (f.column or f.field) not in frame.columns and not f.per_element
    ]
    missing += [pl.lit(None, dtype=pl.String).alias(t) for t in spec.tags if t != "site" and t not in frame.columns]
    if missing:
        frame = frame.with_columns(missing)
    rendered = render(frame, spec, extra_tags={"site": site})
    return rendered.body, rendered.lines


# --------------------------------------------------------------------------- InfluxDB


@dataclass
class InfluxSink:
    """Write a replay into InfluxDB as the live service would (see the module docstring).

    Args:
        writer: the InfluxDB writer (:func:`twin.io.influx.make_writer`).
        site: the site tag.
        batch_lines: points per write.
        policy: retries of 5xx, 429 and network errors; give it a ``deadline_s`` so that an
            InfluxDB that stays down ends the replay instead of stalling it.
        alerts: the alert engine, when alerts are enabled (as the service runs it: fed after
            each ingest; its transitions go to ``alerts``, its anomaly scores to ``pack_state``).
    """

    writer: Writer
    site: str
    batch_lines: int = 5000
    alerts: AlertEngine | None = None
    policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(deadline_s=120.0))
    points: Counter[str] = field(default_factory=Counter)
    rejected_writes: int = 0
    retries: int = 0
    last_error: str = ""
    _bodies: list[bytes] = field(default_factory=list)
    _lines: int = 0

    def on_window(self, window: ReplayWindow) -> None:
        """Write one window: telemetry, site meter, alerts, then the pack and site state at the window's end."""
        core, decoded = window.core, window.decoded
        self.add(window.ingested.telemetry, "pack_telemetry")
        self.add(decoded.site.drop("site"), "site_state")
        packs = core.pack_frame(window.now_ms)
        if self.alerts is not None:
            changed = self.alerts.update(
                window.ingested.telemetry, core=core, now_ms=window.now_ms, site=decoded.site, status=decoded.status
            )
            if changed:
                self.add(alerts_frame(changed).drop("site"), "alerts")
            scores = pl.Series("anomaly_score", self.alerts.anomaly_scores(packs["pack"].to_list()))
            packs = packs.with_columns(scores.fill_nan(None))
        self.add(core.site_frame(window.now_ms).drop("site"), "site_state")
        self.add(packs.filter(pl.col("ts_ms") > 0), "pack_state")

    def write_cells(self, run: RunFolder, rows: int = 200_000, progress: Callable[[int], None] | None = None) -> None:
        """Write the source's cells table as ``pack_cells`` points."""
        done = 0
        for batch in cells_batches(run, rows):
            self.add(batch, "pack_cells")
            done += batch.height
            if progress is not None:
                progress(done)

    def add(self, frame: pl.DataFrame, measurement: str) -> None:
        """Render a frame and queue it, ``batch_lines`` rows at a time; write when a batch is full.

        Bodies stay small (InfluxDB 1.x refuses bodies above ``max-body-size``, 25 MB by
        default, and a cells row renders to a few kilobytes).
        """
        for part in frame.iter_slices(self.batch_lines):
            body, lines = render_like_service(part, measurement, self.site)
            if not lines:
                continue
            self.points[measurement] += lines
            self._bodies.append(body)
            self._lines += lines
            if self._lines >= self.batch_lines:
                self.flush()

    def flush(self) -> None:
        """Write what is queued.

        Raises:
            DatabaseError: InfluxDB kept failing until the policy's deadline.
        """
        if not self._bodies:
            return
        body = b"".join(self._bodies)
        self._bodies.clear()
        self._lines = 0

        def on_retry(_outcome: object, _delay: float) -> None:
            self.retries += 1

        outcome = write_with_retry(self.writer, body, policy=self.policy, on_retry=on_retry)
        if outcome.status == "retry":
            msg = f"InfluxDB did not take the replay's points ({outcome.message or outcome.http_status}); stopped"
            raise DatabaseError(msg)
        if outcome.status == "rejected":
            self.rejected_writes += 1
            self.last_error = outcome.message


# --------------------------------------------------------------------------- MQTT


@dataclass(frozen=True, slots=True)
class PublishOptions:
    """How to publish a replay onto MQTT.

    Attributes:
        speed: event seconds per wall-clock second; ``None`` publishes as fast as the broker
            acknowledges.
        connections: MQTT connections (a pack always uses the same one).
        window: QoS 1 messages waiting for their PUBACK, over all connections.
        client_prefix: client ids are ``{prefix}-{i}`` (clean sessions).
        batch_rows: source rows read at a time.
    """

    speed: float | None = None
    connections: int = 4
    window: int = 20_000
    client_prefix: str = "mgtwin-replay"
    batch_rows: int = 50_000

    def __post_init__(self) -> None:
        """Check the options.

        Raises:
            ValueError: a speed, connection count or window that is not positive.
        """
        if self.speed is not None and not self.speed > 0:
            msg = f"speed must be positive (or None: as fast as possible), got {self.speed}"
            raise ValueError(msg)
        if self.connections < 1 or self.window < 1 or self.batch_rows < 1:
            msg = f"bad publish options {self}"
            raise ValueError(msg)


@dataclass
class PublishStats:
    """What a replay onto MQTT published."""

    messages: Counter[str] = field(default_factory=Counter)
    packs: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    wall_s: float = 0.0
    behind_s: float = 0.0  # the most a paced message was late

    @property
    def total(self) -> int:
        """Return every message published."""
        return sum(self.messages.values())


class _Pool:
    """A few paho connections served from the caller's thread with ``select`` (paho's external-loop API)."""

    def __init__(self, settings: MqttSettings, count: int, prefix: str) -> None:
        parts = urlsplit(settings.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            msg = f"{settings.url!r} is not an mqtt://HOST:PORT URL"
            raise BrokerError(msg)
        host, port = parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.v5 = settings.protocol == "5"
        self._selector = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self._connected: set[int] = set()
        self.sent = 0
        self.acked = 0
        self.refused: str | None = None
        for i in range(count):
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"{prefix}-{i}",
                protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            )
            # No paho in-flight cap: the window below bounds what waits for a PUBACK. (With a cap,
            # paho scans every pending message on each PUBACK: quadratic at a large window.)
            client.max_inflight_messages_set(0)
            client.max_queued_messages_set(0)
            if settings.username:
                password = settings.password.get_secret_value() if settings.password else None
                client.username_pw_set(settings.username, password)
            if parts.scheme == "mqtts" or settings.tls_ca_file:
                client.tls_set(
                    ca_certs=str(settings.tls_ca_file) if settings.tls_ca_file else None,
                    certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
                    keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            client.on_connect = self._on_connect(i)
            client.on_publish = self._on_publish
            client.on_socket_register_write = lambda cl, _u, sock: self._want(cl, sock, write=True)
            client.on_socket_unregister_write = lambda cl, _u, sock: self._want(cl, sock, write=False)
            kwargs: dict[str, Any] = {}
            if self.v5:
                kwargs = {"clean_start": True}
            try:
                client.connect(host, port, keepalive=settings.keepalive_s, **kwargs)
            except (OSError, ssl.SSLError) as exc:
                self.close()
                msg = f"cannot connect to the MQTT broker at {host}:{port}: {exc}"
                raise BrokerError(msg) from exc
            self.clients.append(client)
            sock = client.socket()
            if sock is not None:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
                self._selector.register(sock, events, client)
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        while len(self._connected) < count:
            if self.refused is not None or time.monotonic() > deadline:
                self.close()
                msg = f"the MQTT broker at {host}:{port} did not accept the replay: {self.refused or 'timeout'}"
                raise BrokerError(msg)
            self.service(0.05)

    def _on_connect(self, index: int) -> Callable[..., None]:
        def callback(_c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object = None) -> None:
            if getattr(reason, "is_failure", False):
                self.refused = str(reason)
            else:
                self._connected.add(index)

        return callback

    def _on_publish(self, _c: mqtt.Client, _u: object, _mid: int, _rc: object = None, _p: object = None) -> None:
        self.acked += 1

    def _want(self, client: mqtt.Client, sock: Any, *, write: bool) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0), client)

    def service(self, timeout_s: float = 0.0) -> None:
        """Serve every socket once (reads, writes, keepalive), waiting up to ``timeout_s``."""
        for key, events in self._selector.select(timeout_s):
            client: mqtt.Client = key.data
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE:
                client.loop_write()
        for client in self.clients:
            if client.loop_misc() == MQTTErrorCode.MQTT_ERR_NO_CONN:
                msg = "the MQTT broker closed the replay's connection"
                raise BrokerError(msg)

    def publish(self, index: int, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish at QoS 1 on connection ``index``."""
        info = self.clients[index].publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            msg = f"publishing on {topic} failed: {mqtt.error_string(info.rc)}"
            raise BrokerError(msg)
        self.sent += 1

    def wait_window(self, window: int) -> None:
        """Serve until fewer than ``window`` messages wait for their PUBACK."""
        while self.sent - self.acked >= window:
            self.service(0.05)

    def serve_until(self, deadline: float) -> None:
        """Serve the sockets until ``time.monotonic()`` reaches ``deadline``."""
        while (left := deadline - time.monotonic()) > 0:
            self.service(min(left, 0.05))

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Serve until every message is acknowledged; return whether that happened in time."""
        deadline = time.monotonic() + timeout_s
        while self.sent > self.acked and time.monotonic() < deadline:
            self.service(0.05)
        return self.sent <= self.acked

    def close(self) -> None:
        """Disconnect cleanly."""
        for client in self.clients:
            with contextlib.suppress(OSError, ValueError):
                client.disconnect()
                client.loop_write()
        self._selector.close()


def _encoded(frame: pl.DataFrame, kind: str, model: type[c.Message], site: str, connections: int) -> pl.DataFrame:
    """The messages of one kind: time, order, topic, payload, retain flag and connection."""
    if frame.height == 0:
        return pl.DataFrame(
            schema={
                "ts_ms": pl.Int64,
                "_k": pl.Int64,
                "topic": pl.String,
                "retain": pl.Boolean,
                "conn": pl.Int64,
                "payload": pl.Binary,
            }
        )
    root = f"{c.TOPIC_ROOT}/{site}/"
    if kind == "site":
        topic = pl.lit(root + c.TopicKind.SITE_TELEMETRY.value)
        conn = pl.lit(0, pl.Int64)
    else:
        leaf = {"telemetry": "telemetry", "cells": "cells", "status": "status", "meta": "meta"}[kind]
        topic = pl.concat_str([pl.lit(root + "packs/"), pl.col("pack"), pl.lit("/" + leaf)])
        conn = (pl.col("pack").hash(seed=7) % connections).cast(pl.Int64)
    payloads = pl.Series("payload", c.encode_frame(frame, model), dtype=pl.Binary)
    return frame.select(
        pl.col("ts_ms").cast(pl.Int64),
        pl.lit(_KIND_ORDER.get(kind, -1), pl.Int64).alias("_k"),
        topic.alias("topic"),
        pl.lit(kind in ("meta", "status")).alias("retain"),
        conn.alias("conn"),
    ).with_columns(payloads)


def _messages(run: RunFolder, site: str, options: PublishOptions) -> Iterator[pl.DataFrame]:
    """Yield the source's messages in event-time order, a slice at a time (telemetry drives the slices)."""
    n = options.connections
    small = pl.concat(
        [
            _encoded(run.status.filter(pl.col("ts_ms").is_not_null()), "status", c.PackStatus, site, n),
            _encoded(run.site_rows.with_columns(pl.lit(site).alias("site")), "site", c.SiteTelemetry, site, n),
        ]
    ).sort("ts_ms", "_k", maintain_order=True)
    cells_iter = cells_batches(run, options.batch_rows)
    cells = _encoded(pl.DataFrame(schema=small.schema), "cells", c.PackCells, site, n).clear()
    cells_done = False
    for batch in run.telemetry_batches(options.batch_rows):
        if batch.height == 0:
            continue
        cut = batch["ts_ms"].max()
        assert isinstance(cut, int)
        while not cells_done and (cells.height == 0 or int(cells["ts_ms"].max()) <= cut):  # type: ignore[arg-type]
            more = next(cells_iter, None)
            if more is None:
                cells_done = True
            elif more.height:
                cells = pl.concat([cells, _encoded(more, "cells", c.PackCells, site, n)])
        due_cells, cells = cells.filter(pl.col("ts_ms") <= cut), cells.filter(pl.col("ts_ms") > cut)
        due_small, small = small.filter(pl.col("ts_ms") <= cut), small.filter(pl.col("ts_ms") > cut)
        _check_required(batch)
        tele = _encoded(batch, "telemetry", c.PackTelemetry, site, n)
        yield pl.concat([due_small, tele, due_cells]).sort("ts_ms", "_k", maintain_order=True)
    for more in cells_iter:
        if more.height:
            cells = pl.concat([cells, _encoded(more, "cells", c.PackCells, site, n)])
    rest = pl.concat([small, cells]).sort("ts_ms", "_k", maintain_order=True)
    if rest.height:
        yield rest


def publish_run(
    run: RunFolder,
    settings: MqttSettings,
    *,
    options: PublishOptions = PublishOptions(),
    progress: Callable[[int], None] | None = None,
) -> PublishStats:
    """Publish a source onto MQTT per the contract, paced (see the module docstring).

    Args:
        run: the source (its ``site`` is the topic root).
        settings: the broker URL, credentials, TLS and protocol.
        options: speed, connections, window.
        progress: called now and then with the number of telemetry messages published so far.

    Returns:
        What was published.

    Raises:
        BrokerError: the broker cannot be reached, refuses the replay, or drops it.
        ReplayError: the source lacks fields the contract requires (an external log without
            the BMS's SoC, say); replay it offline instead.
    """
    site = run.site
    stats = PublishStats()
    pool = _Pool(settings, options.connections, options.client_prefix)
    started = time.monotonic()
    try:
        meta = _encoded(run.meta, "meta", c.PackMeta, site, options.connections)
        for topic, payload, conn in zip(meta["topic"], meta["payload"], meta["conn"], strict=True):
            pool.publish(conn, topic, payload, retain=True)
        stats.messages["meta"] += meta.height
        stats.packs = run.meta.height
        kinds = {v: k for k, v in _KIND_ORDER.items()}
        wall0: float | None = None
        ts0 = 0
        current = None
        done = 0  # telemetry messages, for progress
        for frame in _messages(run, site, options):
            ts_list = frame["ts_ms"].to_list()
            counts = frame["_k"].value_counts()
            for k, n in counts.iter_rows():
                stats.messages[kinds[int(k)]] += int(n)
            lo, hi = ts_list[0], max(ts_list)
            stats.first_ms = lo if stats.first_ms is None else min(stats.first_ms, lo)
            stats.last_ms = hi if stats.last_ms is None else max(stats.last_ms, hi)
            for ts, topic, payload, retain, conn, kind in zip(
                ts_list, frame["topic"], frame["payload"], frame["retain"], frame["conn"], frame["_k"], strict=True
            ):
                if options.speed is not None and ts != current:
                    current = ts
                    if wall0 is None:
                        wall0, ts0 = time.monotonic(), ts
                    due = wall0 + (ts - ts0) / 1000.0 / options.speed
                    stats.behind_s = max(stats.behind_s, time.monotonic() - due)
                    pool.serve_until(due)
                pool.publish(conn, topic, payload, retain=retain)
                if pool.sent - pool.acked >= options.window:
                    pool.wait_window(options.window // 2)
                if kind == 1:
                    done += 1
                    if progress is not None and done % 5000 == 0:
                        progress(done)
            pool.service(0.0)
        if not pool.drain():
            msg = f"the broker acknowledged {pool.acked} of {pool.sent} messages within 60 s"
            raise BrokerError(msg)
        if progress is not None:
            progress(done)
    finally:
        pool.close()
    stats.wall_s = time.monotonic() - started
    return stats


_REQUIRED: Final = tuple(k for k, f in c.PackTelemetry.model_fields.items() if f.is_required())


def _check_required(batch: pl.DataFrame) -> None:
    """Refuse telemetry the contract would reject for a missing field (an external log without the BMS's SoC)."""
    lacking = [k for k in _REQUIRED if k in batch.columns and batch.get_column(k).null_count()]
    if lacking:
        msg = (
            f"the source's telemetry lacks {', '.join(lacking)}, which the contract requires on MQTT "
            "(a live twin would refuse every message): map them with --map, or replay offline (--out, --influx)"
        )
        raise ReplayError(msg)
