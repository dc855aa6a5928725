"""Replay nevada onto MQTT as fast as the broker takes it, and offline into InfluxDB, beside the raw ceilings.

A nevada run (805 packs, 1 s telemetry, cells every 10 s, the site meter every second) is
emulated first in a child process (not timed), for ``--minutes`` of event time (a day is
``--minutes 1440``: 70 million telemetry messages, about an hour of replay on this box).
One Mosquitto and one InfluxDB 1.x are started here on 127.0.0.1 (``tests.servers``); then:

* **P0a broker ceiling** and **P0b InfluxDB ceiling**: issue 3's raw measurements
  (``benchmarks/ingest_throughput.py``) on the run's first ``--ceiling-messages`` telemetry
  messages, run here on the same servers: a raw-socket QoS 1 publisher into ``mosquitto_sub
  -q 1`` (messages/s, end to end), and pre-rendered ``pack_telemetry`` line protocol POSTed
  to ``/write`` in 5,000-line bodies on one and on two connections (points/s);
* **replay -> MQTT**: :func:`twin.publish_replay.publish_run` with ``speed=None`` (as fast as
  the broker acknowledges), QoS 1 over ``--connections`` paho connections, every message of
  the run (meta, status, telemetry, cells, site) encoded per the contract, into one
  ``mosquitto_sub -q 1`` subscribed to the site's ``#``: messages/s = messages received over
  (last receipt - start of publishing); the subscriber's count and the broker's dropped
  counter are checked;
* **replay -> InfluxDB**: :func:`twin.replay.replay_run` over the run (60 s windows) with the
  :class:`twin.publish_replay.InfluxSink` writing what the live service writes (telemetry,
  site meter, pack and site state every window, cells): points/s = points written over the
  whole wall time (the twin's core included), and pack-samples/s.

Usage: ``.venv/bin/python benchmarks/replay_mqtt_speed.py [--minutes 10] [--connections 4]
[--ceiling-messages 100000] [--keep]``. About two minutes with the defaults on a quiet 2-core box.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import polars as pl

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, the project root is not on the path
    sys.path.insert(0, str(ROOT))

from benchmarks.ingest_throughput import (  # noqa: E402
    Bench,
    DropWatch,
    Message,
    Result,
    Workload,
    cpu_s,
    reap,
    render_points,
    run_p0a,
    run_p0b,
)
from tests.servers import Influxd, Mosquitto, require_binary  # noqa: E402
from twin import contract as c  # noqa: E402
from twin.config import MqttSettings  # noqa: E402
from twin.io.influx import V1Writer  # noqa: E402
from twin.publish_replay import InfluxSink, PublishOptions, publish_run  # noqa: E402
from twin.replay import ReplayOptions, open_run, replay_run  # noqa: E402

DEFAULT_MINUTES: Final = 10.0
DEFAULT_CEILING_MESSAGES: Final = 100_000


def _emulate(out: Path, minutes: float) -> None:
    cmd = [sys.executable, "-m", "twin.cli", "emulate", "--scenario", "nevada", "--duration", f"{minutes:g}m"]
    cmd += ["--pack-level", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)


def _ceiling_messages(run_dir: Path, n: int) -> tuple[list[Message], list[Message]]:
    """The run's first ``n`` telemetry messages in time order, and the packs' retained meta."""
    run = open_run(run_dir)
    tele = pl.read_parquet(run_dir / "telemetry.parquet", n_rows=n).sort("ts_ms", "pack")
    payloads = c.encode_frame(tele, c.PackTelemetry)
    topics = [c.topic(c.TopicKind.PACK_TELEMETRY, run.site, p) for p in tele["pack"]]
    meta = [
        Message(c.topic(c.TopicKind.PACK_META, run.site, p), b, True)
        for p, b in zip(run.meta["pack"], c.encode_frame(run.meta, c.PackMeta), strict=True)
    ]
    return [Message(t, b) for t, b in zip(topics, payloads, strict=True)], meta


def _replay_to_mqtt(broker: Mosquitto, drops: DropWatch, run_dir: Path, connections: int, folder: Path) -> Result:
    run = open_run(run_dir)
    expected = run.meta.height + run.status.height + run.telemetry_rows + run.site_rows.height
    expected += pl.scan_parquet(run_dir / "cells.parquet").select(pl.len()).collect().item()
    out_path = folder / "replay_sub.out"
    before = drops.value()
    with out_path.open("wb") as out:
        sub = subprocess.Popen(
            [
                require_binary("mosquitto_sub"),
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-C",
                str(expected),
                "-i",
                f"replay-bench-{os.getpid()}",
                "-t",
                f"{c.TOPIC_ROOT}/{run.site}/#",
                "-F",
                "%U",
            ],
            stdout=out,
        )
    time.sleep(1.0)  # let it connect and subscribe
    settings = MqttSettings(url=broker.url, protocol="3.1.1")
    started = time.time()
    cpu0 = time.process_time()
    stats = publish_run(run, settings, options=PublishOptions(speed=None, connections=connections))
    publisher_cpu = time.process_time() - cpu0
    sub_cpu = reap(sub, 300)
    stamps = [float(x) for x in out_path.read_bytes().split()]
    seconds = (max(stamps) - started) if stamps else float("nan")
    return Result(
        f"replay -> MQTT ({connections} conn.)",
        len(stamps),
        seconds,
        loss=stats.total - len(stamps),
        dropped=drops.delta(before),
        cpu_s=publisher_cpu,
        note=f"published {stats.total:,} in {stats.wall_s:.1f} s; CPU s: publisher (mosquitto_sub {sub_cpu:.1f})",
    )


def _replay_to_influx(influx: Influxd, run_dir: Path) -> tuple[Result, dict[str, int]]:
    run = open_run(run_dir)
    db = "replay_bench"
    influx.query(f'CREATE DATABASE "{db}"')
    writer = V1Writer(influx.url, db)
    sink = InfluxSink(writer, run.site)
    influx_cpu0 = cpu_s(influx.proc.pid) if influx.proc else 0.0
    started = time.perf_counter()
    cpu0 = time.process_time()
    try:
        result = replay_run(run, options=ReplayOptions(every_s=60.0), on_window=sink.on_window)
        sink.write_cells(run)
        sink.flush()
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    influx_cpu = (cpu_s(influx.proc.pid) if influx.proc else 0.0) - influx_cpu0
    points = sum(sink.points.values())
    stored = influx.query("SELECT count(voltage_v) FROM pack_telemetry", db=db)["results"][0]["series"][0]
    loss = run.telemetry_rows - int(stored["values"][0][1])
    rows = int(result.info["telemetry_rows"])
    res = Result(
        "replay -> InfluxDB (offline)",
        rows,
        seconds,
        points_per_message=points / max(rows, 1),
        loss=loss,
        dropped=None,
        cpu_s=cpu,
        note=f"CPU s: replay (influxd {influx_cpu:.1f}); {sink.rejected_writes} writes rejected",
    )
    return res, dict(sink.points)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(*, minutes: float, connections: int, ceiling_messages: int, keep: bool) -> dict[str, Any]:
    """Run the benchmark and print its table; return the figures."""
    folder = Path(tempfile.mkdtemp(prefix="mgtwin-replay-mqtt-"))
    broker = Mosquitto(workdir=folder / "mosquitto", extra_conf="sys_interval 1")
    influx = Influxd(workdir=folder / "influxd")
    figures: dict[str, Any] = {}
    try:
        run_dir = folder / "nevada"
        t = time.perf_counter()
        _emulate(run_dir, minutes)
        print(f"emulated {minutes:g} min of nevada in {time.perf_counter() - t:.0f} s (not timed)", flush=True)
        broker.start()
        influx.start()
        drops = DropWatch(broker, folder)
        tele, meta = _ceiling_messages(run_dir, ceiling_messages)
        site = open_run(run_dir).site
        work = Workload(site, len(meta), folder / "meta.txt", folder / "throughput.txt", folder / "realtime.txt")
        bench = Bench(broker, influx, drops, work, folder)
        p0a = run_p0a(bench, tele)
        p0b1, p0b2 = run_p0b(influx, render_points(work, tele, meta), len(tele))
        p0b = max(p0b1, p0b2, key=lambda r: r.rate)
        mqtt = _replay_to_mqtt(broker, drops, run_dir, connections, folder)
        into_influx, by_measurement = _replay_to_influx(influx, run_dir)
        drops.stop()

        points_rate = into_influx.rate * into_influx.points_per_message
        header = ("pipeline", "messages", "s", "msg/s", "points/s", "of ceiling", "loss", "dropped", "CPU s", "note")
        rows: list[tuple[str, ...]] = [header]
        for r, pts, ceiling in (
            (p0a, float("nan"), float("nan")),
            (p0b1, p0b1.rate, float("nan")),
            (p0b2, p0b2.rate, float("nan")),
            (mqtt, float("nan"), mqtt.rate / p0a.rate),
            (into_influx, points_rate, points_rate / p0b.rate),
        ):
            rows.append(
                (
                    r.name,
                    f"{r.messages:,}",
                    f"{r.seconds:.1f}",
                    f"{r.rate:,.0f}" if r is not p0b1 and r is not p0b2 else "-",
                    "-" if math.isnan(pts) else f"{pts:,.0f}",
                    "-" if math.isnan(ceiling) else f"{ceiling:.0%}",
                    "-" if r.loss is None else f"{r.loss:,}",
                    "-" if r.dropped is None else f"{r.dropped:,}",
                    "-" if r.cpu_s is None else f"{r.cpu_s:.1f}",
                    r.note,
                )
            )
        print()
        print(_table(rows))
        day_msgs = 805 * 86_400 * (1 + 0.1) + 86_400
        print()
        print(
            f"points written offline: {', '.join(f'{k} {v:,}' for k, v in sorted(by_measurement.items()))}; "
            f"pack-samples/s offline {into_influx.rate:,.0f}"
        )
        print(
            f"a day of nevada (~{day_msgs / 1e6:.0f} M messages) at these rates: onto MQTT "
            f"{day_msgs / mqtt.rate / 60:.0f} min, offline into InfluxDB {805 * 86_400 / into_influx.rate / 60:.0f} min"
        )
        figures = {
            "p0a_msgs_per_s": p0a.rate,
            "p0b_points_per_s": p0b.rate,
            "replay_mqtt_msgs_per_s": mqtt.rate,
            "replay_mqtt_loss": mqtt.loss,
            "replay_mqtt_dropped": mqtt.dropped,
            "replay_influx_rows_per_s": into_influx.rate,
            "replay_influx_points_per_s": points_rate,
            "replay_influx_loss": into_influx.loss,
        }
    finally:
        broker.stop()
        influx.stop()
        if keep:
            print(f"work folder kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return figures


def main(argv: Sequence[str] = ()) -> dict[str, Any]:
    """Parse the arguments (none: the defaults), run, print the table; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="event time of nevada to replay")
    parser.add_argument("--connections", type=int, default=4, help="MQTT connections of the replay publisher")
    parser.add_argument("--ceiling-messages", type=int, default=DEFAULT_CEILING_MESSAGES, help="messages for P0a/P0b")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(list(argv))
    return run(
        minutes=args.minutes, connections=args.connections, ceiling_messages=args.ceiling_messages, keep=args.keep
    )


if __name__ == "__main__":
    main(sys.argv[1:])
