"""Sinks of an emulation: a run folder on disk, or a live site on MQTT.

:class:`FolderSink` writes the run folder of :mod:`emulators.output`. :class:`MqttSink`
publishes per the contract through one gateway connection per pack, paced so that
simulated time runs ``speed`` times faster than the wall clock; the messages themselves
do not depend on the speed.
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from emulators.output import RunWriter
from emulators.publisher import Credentials, GatewayPool, encode_rows
from emulators.run import Chunk, Emulation
from twin import contract as c

__all__ = ["FolderSink", "MqttSink", "run_info"]


def run_info(emulation: Emulation, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``run.json`` document: scenario, seed, options and versions, for reproducing a run."""
    versions: dict[str, str | None] = {}
    for dist in ("microgrid-twin", "numpy", "polars", "pydantic", "paho-mqtt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    opt = emulation.options
    return {
        "kind": "emulation",
        "site": emulation.scenario.site,
        "seed": emulation.scenario.seed,
        "start_ms": int(emulation.trace.times_ms[0]),
        "scenario": emulation.scenario.model_dump(mode="json"),
        "options": {k: getattr(opt, k) for k in opt.__slots__},
        "packs": emulation.fleet.n_packs,
        "contract_version": c.CONTRACT_VERSION,
        "versions": {"python": platform.python_version(), **versions},
        **(extra or {}),
    }


class FolderSink:
    """Write an emulation into a run folder."""

    def __init__(self, out: Path, *, truth: bool = True) -> None:
        tables = ("packs", "status", "telemetry", "cells", "site") + (("truth", "site_truth") if truth else ())
        self.writer = RunWriter(out, tables)

    def meta(self, packs: pl.DataFrame, status: pl.DataFrame) -> None:
        """Write the packs' metadata and first status."""
        self.writer.write("packs", packs)
        self.writer.write("status", status)

    def chunk(self, chunk: Chunk) -> None:
        """Append one chunk."""
        w = self.writer
        w.write("telemetry", chunk.telemetry)
        w.write("cells", chunk.cells)
        w.write("site", chunk.site)
        w.write("status", chunk.status)
        if chunk.truth is not None and "truth" in w.rows:
            w.write("truth", chunk.truth)
        if chunk.site_truth is not None and "site_truth" in w.rows:
            w.write("site_truth", chunk.site_truth)

    def close(self, info: dict[str, Any]) -> None:
        """Close the tables and write ``run.json`` with the row counts."""
        self.writer.close()
        self.writer.write_json("run.json", {**info, "rows": self.writer.rows})


class MqttSink:
    """Publish an emulation live, paced at ``speed`` times real time.

    Args:
        url: broker URL.
        site: site identifier (topic root).
        packs: pack identifiers, in the emulation's order.
        speed: simulated seconds per wall-clock second.
        truth: also publish the truth topics (for evaluation; the twin never subscribes).
        credentials: optional broker credentials.
        protocol: MQTT version, "3.1.1" or "5".
    """

    def __init__(
        self,
        url: str,
        site: str,
        packs: list[str],
        *,
        speed: float,
        truth: bool = False,
        credentials: Credentials | None = None,
        protocol: str = "3.1.1",
        client_prefix: str = "emu",
    ) -> None:
        self.pool = GatewayPool(
            url, site, packs, credentials=credentials, protocol=protocol, client_prefix=client_prefix
        )
        self.site = site
        self.speed = speed
        self.truth = truth
        self.index = {p: i for i, p in enumerate(packs)}
        self._t0_ms: int | None = None
        self._wall0 = 0.0
        self.published = 0
        self.behind_s = 0.0

    def _pace(self, ts_ms: int) -> None:
        if self._t0_ms is None:
            self._t0_ms, self._wall0 = ts_ms, time.monotonic()
        due = self._wall0 + (ts_ms - self._t0_ms) / 1000.0 / self.speed
        self.behind_s = max(0.0, time.monotonic() - due)
        self.pool.serve_until(due)

    def meta(self, packs: pl.DataFrame, status: pl.DataFrame) -> None:
        """Publish every pack's retained meta and online status."""
        idx = [self.index[p] for p in packs["pack"]]
        self.pool.publish_packs(c.TopicKind.PACK_META, idx, encode_rows(packs, c.PackMeta), retain=True)
        self._status(status)
        self.published += 2 * packs.height

    def _status(self, status: pl.DataFrame) -> None:
        if status.height == 0:
            return
        idx = [self.index[p] for p in status["pack"]]
        self.pool.publish_packs(c.TopicKind.PACK_STATUS, idx, encode_rows(status, c.PackStatus), retain=True)

    def chunk(self, chunk: Chunk) -> None:
        """Publish one chunk, step by step, at the wall-clock time each step is due."""
        frames = {
            "telemetry": chunk.telemetry.with_columns(pl.lit(0).alias("_k")),
            "cells": chunk.cells.with_columns(pl.lit(1).alias("_k")),
        }
        times = sorted(
            set(chunk.telemetry["ts_ms"].to_list())
            | set(chunk.site["ts_ms"].to_list())
            | set(chunk.status["ts_ms"].to_list())
        )
        tele_by = chunk.telemetry.partition_by("ts_ms", as_dict=True) if chunk.telemetry.height else {}
        cells_by = chunk.cells.partition_by("ts_ms", as_dict=True) if chunk.cells.height else {}
        status_by = chunk.status.partition_by("ts_ms", as_dict=True) if chunk.status.height else {}
        truth_by = chunk.truth.partition_by("ts_ms", as_dict=True) if (self.truth and chunk.truth is not None) else {}
        site_rows = {int(r["ts_ms"]): r for r in chunk.site.iter_rows(named=True)}
        site_topic = c.topic(c.TopicKind.SITE_TELEMETRY, self.site)
        del frames
        for ts in times:
            self._pace(ts)
            key = (ts,)
            if key in status_by:
                self._status(status_by[key])
            if key in tele_by:
                frame = tele_by[key]
                self.pool.publish_packs(
                    c.TopicKind.PACK_TELEMETRY,
                    [self.index[p] for p in frame["pack"]],
                    encode_rows(frame, c.PackTelemetry),
                )
                self.published += frame.height
            if key in cells_by:
                frame = cells_by[key]
                self.pool.publish_packs(
                    c.TopicKind.PACK_CELLS, [self.index[p] for p in frame["pack"]], encode_rows(frame, c.PackCells)
                )
                self.published += frame.height
            if ts in site_rows:
                row = site_rows[ts]
                msg = c.SiteTelemetry.model_validate({**row, "schema": "site_telemetry/1"})
                self.pool.publish_site(site_topic, c.encode(msg))
                self.published += 1
            if key in truth_by:
                self._publish_truth(truth_by[key])
        if self.truth and chunk.site_truth is not None:
            for row in chunk.site_truth.iter_rows(named=True):
                payload = json.dumps(
                    {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
                )
                self.pool.publish_site(c.topic(c.TopicKind.TRUTH_SITE, self.site), payload.encode())

    def _publish_truth(self, frame: pl.DataFrame) -> None:
        payloads = [s.encode() for s in frame.select(pl.struct(pl.all()).struct.json_encode())[:, 0].to_list()]
        idx = [self.index[p] for p in frame["pack"]]
        self.pool.publish_packs(c.TopicKind.TRUTH_PACK, idx, payloads)

    def close(self, info: dict[str, Any]) -> None:
        """Wait for the broker to acknowledge everything, then disconnect (no last wills)."""
        del info
        self.pool.drain()
        self.pool.close()
