"""Record a site's MQTT traffic into a run folder (``mgtwin record``), for replay.

The recording is the emulator's run folder (:mod:`emulators.output`) without the truth
tables, with every table rolled into Parquet parts, so that a crash loses at most the part
being written::

    run.json                    kind "recording", site, broker, client id, times, row counts, rejects
    packs/part-000001.parquet   pack_meta rows (the retained meta, again after each reconnect)
    status/part-000001.parquet  pack_status rows (retained status and the gateways' last wills)
    telemetry/part-000001.parquet, cells/..., site/...   the contract's telemetry tables
    rejects/part-000001.parquet messages that break the contract: topic, reason, detail, excerpt

Columns and types are the contract's (as :func:`twin.pipeline.decode_batch` gives them), so
:func:`twin.replay.open_run` reads a recording like an emulator's run folder. A part is
written as ``.part-NNNNNN.parquet.tmp`` and renamed when closed (after an ``fsync``), every
``roll_s`` seconds: readers never see a part being written, and one cut short by a full disk
is skipped with a warning.

Delivery: the recorder is a subscriber of the twin's own kind (:class:`twin.io.mqtt.MqttLink`:
QoS 1, a fixed client id, a persistent session, manual acknowledgements; MQTT 5 with a
session expiry, or 3.1.1 with a clean-session flag of false). A message is acknowledged only
once the part holding it is closed and on disk, so a crash or a broker restart loses
nothing that the broker kept: what was not acknowledged is delivered again to the restarted
(or reconnected) recorder. Messages received before a reconnect are not acknowledged after
it (their packet ids belong to the old connection); the broker sends them again, so a
recording may hold a message twice, which replay drops as the live twin does (same pack and
sequence number). Under MQTT 3.1.1 the broker's ``max_inflight_messages`` caps how many
messages can wait for their acknowledgement, hence the throughput (that many per roll); under
MQTT 5 (the default) the recorder's Receive Maximum does, and a part is closed early when
``max_unacked`` messages wait. After a stop the broker keeps the session, and queues the site's
messages for it, for ``mqtt.session_expiry_s`` (7 days by default): a recorder restarted with
the same client id continues where it stopped.

A last will carries no time; the recorder stamps it with the newest event time it has
recorded, so that it replays in its place. The recorder sets no last will of its own (the
twin's ``twin/status`` belongs to ``mgtwin serve``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import polars as pl
import pyarrow.parquet as pq

from twin import __version__
from twin import contract as c
from twin.config import Settings
from twin.errors import BrokerError
from twin.io.mqtt import Inbound, MqttLink
from twin.pipeline import decode_batch, output_schema

__all__ = ["RECORD_TABLES", "RecordOptions", "RecordStats", "Recorder"]

log = logging.getLogger(__name__)

#: The recorded tables and their contract models (``rejects`` has its own schema).
RECORD_TABLES: Final[dict[str, type[c.Message]]] = {
    "packs": c.PackMeta,
    "status": c.PackStatus,
    "telemetry": c.PackTelemetry,
    "cells": c.PackCells,
    "site": c.SiteTelemetry,
}
_DECODED: Final = {"packs": "meta", "status": "status", "telemetry": "telemetry", "cells": "cells", "site": "site"}
REJECTS_SCHEMA: Final = pl.Schema(
    {
        "received_ms": pl.Int64(),
        "topic": pl.String(),
        "reason": pl.String(),
        "detail": pl.String(),
        "payload_excerpt": pl.String(),
    }
)
_PART_RE: Final = re.compile(r"part-(\d+)\.parquet$")


@dataclass(frozen=True, slots=True)
class RecordOptions:
    """How to record.

    Attributes:
        roll_s: close the parts (and acknowledge their messages) this often, s.
        max_unacked: close them early when this many messages wait for their acknowledgement.
        batch_max_messages: messages decoded at a time.
        batch_max_age_s: longest wait for a batch to fill, s.
    """

    roll_s: float = 2.0
    max_unacked: int = 20_000
    batch_max_messages: int = 5000
    batch_max_age_s: float = 0.25

    def __post_init__(self) -> None:
        """Check the options.

        Raises:
            ValueError: a bound that is not positive.
        """
        if not (
            self.roll_s > 0 and self.max_unacked >= 1 and self.batch_max_messages >= 1 and self.batch_max_age_s > 0
        ):
            msg = f"bad record options {self}: every bound must be positive"
            raise ValueError(msg)


@dataclass
class RecordStats:
    """What a recording holds so far."""

    messages: int = 0
    rows: Counter[str] = field(default_factory=Counter)
    rejects: Counter[str] = field(default_factory=Counter)
    packs: set[str] = field(default_factory=set)
    parts: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    acked: int = 0
    not_acked_after_reconnect: int = 0
    started_s: float = field(default_factory=time.monotonic)

    def span_s(self) -> float:
        """Return the event time the recording covers, s."""
        if self.first_ms is None or self.last_ms is None:
            return 0.0
        return (self.last_ms - self.first_ms) / 1000.0


class _Parts:
    """One table's rolled parts: the part being written, closed and renamed on :meth:`close`."""

    def __init__(self, folder: Path, schema: pl.Schema) -> None:
        self.folder = folder
        self.schema = schema
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self.rows = 0

    def write(self, frame: pl.DataFrame, number: int) -> None:
        if frame.height == 0:
            return
        arrow = frame.select([pl.col(k).cast(v) for k, v in self.schema.items()]).to_arrow()
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._final = self.folder / f"part-{number:06d}.parquet"
            self._tmp = self.folder / f".part-{number:06d}.parquet.tmp"
            self._writer = pq.ParquetWriter(self._tmp, arrow.schema, compression="zstd")
        self._writer.write_table(arrow)
        self.rows += frame.height

    def close(self) -> bool:
        """Close the open part, make it durable and visible; return whether there was one."""
        if self._writer is None:
            return False
        assert self._tmp is not None
        assert self._final is not None
        self._writer.close()
        with self._tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        self._tmp.replace(self._final)
        with contextlib.suppress(OSError):  # make the rename durable too (not every filesystem allows it)
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._writer = self._tmp = self._final = None
        return True


def _next_part_number(out: Path) -> int:
    """Return the number after the highest part of any table (a restarted recorder continues)."""
    numbers = [
        int(m.group(1))
        for table in (*RECORD_TABLES, "rejects")
        if (out / table).is_dir()
        for p in (out / table).iterdir()
        if (m := _PART_RE.search(p.name))
    ]
    return max(numbers, default=0) + 1


class Recorder:
    """Subscribe to one site's contract topics and write them into a rolled run folder.

    Args:
        settings: the broker's URL, credentials, protocol and session options (``settings.mqtt``).
        out: the run folder (created; a recording already there is continued).
        site: the site to record.
        client_id: the fixed client id the broker keeps the session under.
        options: roll interval and bounds.
        link: the MQTT link (tests inject one); by default one from the settings.
        clock_ms: the wall clock, for ``run.json`` and the rejects' receipt time.
    """

    def __init__(
        self,
        settings: Settings,
        out: Path,
        *,
        site: str,
        client_id: str | None = None,
        options: RecordOptions = RecordOptions(),
        link: MqttLink | None = None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.out = out
        self.site = site
        self.client_id = client_id or f"mgtwin-record-{site}"
        self.options = options
        self.clock_ms = clock_ms
        self.link = link or MqttLink(
            settings.mqtt,
            site=site,
            client_id=self.client_id,
            queue_max=settings.ingest.queue_max_messages,
            version=__version__,
        )
        # MqttLink announces the twin's status as its last will; a recorder is not the twin.
        self.link.client.will_clear()
        out.mkdir(parents=True, exist_ok=True)
        self.stats = RecordStats()
        self._parts = {table: _Parts(out / table, _schema(model)) for table, model in RECORD_TABLES.items()}
        self._parts["rejects"] = _Parts(out / "rejects", REJECTS_SCHEMA)
        self._number = _next_part_number(out)
        self._pending: list[tuple[int, list[Inbound]]] = []
        self._unacked = 0
        self._last_roll_s = time.monotonic()
        self._started_ms = clock_ms()
        self._previous = self._read_previous()

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 15.0) -> None:
        """Connect, and return once the broker has acknowledged the subscriptions.

        Raises:
            BrokerError: the broker cannot be reached, refuses the connection or the subscriptions.
        """
        subscribed = threading.Event()
        # MqttLink subscribes on every connect; the acknowledgement tells when recording begins.
        self.link.client.on_subscribe = lambda *_args: subscribed.set()
        self.link.start()
        if not subscribed.wait(timeout_s):
            self.link.stop(publish_offline=False)
            msg = f"the MQTT broker did not acknowledge the subscriptions of site {self.site} within {timeout_s:g} s"
            raise BrokerError(msg)
        self._write_info(stopped=False)
        log.info("recording site %s into %s as %s", self.site, self.out, self.client_id)

    def run(
        self,
        stop: threading.Event,
        *,
        duration_s: float | None = None,
        progress: Callable[[RecordStats], None] | None = None,
    ) -> RecordStats:
        """Record until ``stop`` is set (or ``duration_s`` has passed); then close the last parts.

        Returns:
            The recording's figures.
        """
        deadline = None if duration_s is None else time.monotonic() + duration_s
        shown = 0.0
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            batch = self.link.take(self.options.batch_max_messages, self.options.batch_max_age_s, stop)
            if batch:
                self.process(batch)
            now = time.monotonic()
            if now - self._last_roll_s >= self.options.roll_s or self._unacked >= self.options.max_unacked:
                self.roll()
            if progress is not None and now - shown >= 0.5:
                shown = now
                progress(self.stats)
        # What is still queued was not written and is not acknowledged: the broker keeps it.
        self.roll()
        if progress is not None:
            progress(self.stats)
        return self.stats

    def close(self) -> None:
        """Close the parts (acknowledging what they hold), write ``run.json`` and disconnect."""
        self.roll()
        self._write_info(stopped=True)
        self.link.stop(publish_offline=False)

    # ------------------------------------------------------------------ work

    def process(self, batch: list[Inbound]) -> None:
        """Decode one batch and append it to the open parts (acknowledged at the next roll)."""
        generation = self.link.counters["connects"]
        decoded = decode_batch([m.topic for m in batch], [m.payload for m in batch], site=self.site)
        stats = self.stats
        stats.messages += len(batch)
        event_times = [
            int(x)
            for f in (decoded.telemetry, decoded.cells, decoded.site)
            if f.height
            for x in (f["ts_ms"].min(), f["ts_ms"].max())
            if isinstance(x, int)
        ]
        if event_times:
            lo, hi = min(event_times), max(event_times)
            stats.first_ms = lo if stats.first_ms is None else min(stats.first_ms, lo)
            stats.last_ms = hi if stats.last_ms is None else max(stats.last_ms, hi)
        for table, kind in _DECODED.items():
            frame: pl.DataFrame = getattr(decoded, kind).drop("msg")
            if table == "status" and frame.height and stats.last_ms is not None:
                frame = frame.with_columns(pl.col("ts_ms").fill_null(stats.last_ms))
            if frame.height:
                self._parts[table].write(frame, self._number)
                stats.rows[table] += frame.height
                if "pack" in frame.columns and table in ("telemetry", "packs"):
                    stats.packs.update(frame["pack"].unique().to_list())
        if decoded.rejects.height:
            rejects = decoded.rejects.drop("msg").with_columns(pl.lit(self.clock_ms(), pl.Int64).alias("received_ms"))
            self._parts["rejects"].write(rejects, self._number)
            for reason, n in rejects["reason"].value_counts().iter_rows():
                stats.rejects[str(reason)] += int(n)
        self._pending.append((generation, batch))
        self._unacked += len(batch)

    def roll(self) -> None:
        """Close every open part, then acknowledge the messages they hold and update ``run.json``."""
        self._last_roll_s = time.monotonic()
        closed = [parts.close() for parts in self._parts.values()]
        if any(closed):
            self.stats.parts += 1
            self._number += 1
        generation = self.link.counters["connects"]
        for gen, batch in self._pending:
            if gen == generation:
                self.link.ack(batch)
                self.stats.acked += len(batch)
            else:  # received on an earlier connection: the broker sends it again
                self.stats.not_acked_after_reconnect += len(batch)
        self._pending.clear()
        self._unacked = 0
        if any(closed):
            self._write_info(stopped=False)

    # ------------------------------------------------------------------ run.json

    def _read_previous(self) -> dict[str, Any]:
        path = self.out / "run.json"
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _write_info(self, *, stopped: bool) -> None:
        s = self.stats
        previous_rows = self._previous.get("rows", {}) if self._previous.get("site") == self.site else {}
        rows = {t: int(previous_rows.get(t, 0)) + s.rows[t] for t in (*RECORD_TABLES, "rejects")}
        rows["rejects"] = int(previous_rows.get("rejects", 0)) + sum(s.rejects.values())
        versions: dict[str, str | None] = {"python": platform.python_version()}
        for dist in ("microgrid-twin", "polars", "paho-mqtt"):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[dist] = None
        info = {
            "kind": "recording",
            "site": self.site,
            "broker": self.settings.mqtt.url,
            "protocol": self.settings.mqtt.protocol,
            "client_id": self.client_id,
            "started_ms": self._previous.get("started_ms", self._started_ms),
            "stopped_ms": self.clock_ms() if stopped else None,
            "roll_s": self.options.roll_s,
            "start_ms": _earliest(self._previous.get("start_ms"), s.first_ms),
            "end_ms": s.last_ms if s.last_ms is not None else self._previous.get("end_ms"),
            "rows": rows,
            "rejects": dict(s.rejects),
            "messages": int(self._previous.get("messages", 0)) + s.messages,
            "reconnects": max(0, self.link.counters["connects"] - 1),
            "contract_version": c.CONTRACT_VERSION,
            "versions": versions,
        }
        tmp = self.out / ".run.json.tmp"
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(self.out / "run.json")


def _schema(model: type[c.Message]) -> pl.Schema:
    return pl.Schema({k: v for k, v in output_schema(model).items() if k != "msg"})


def _earliest(a: object, b: int | None) -> int | None:
    known = [int(x) for x in (a, b) if isinstance(x, int)]
    return min(known) if known else None
