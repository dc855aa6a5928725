"""`mgtwin serve` against a real Mosquitto and a real InfluxDB: exactly once, crashes, outages, bad input."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import polars as pl
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from emulators.publisher import encode_rows
from emulators.run import Emulation, EmulationOptions
from emulators.scenario import load_scenario
from tests.servers import Influxd, Mosquitto, free_port
from twin import contract as c

pytestmark = pytest.mark.integration


@dataclass
class Messages:
    """A recorded emulation as (topic, payload) pairs, with the valid telemetry keys."""

    items: list[tuple[str, bytes, bool]]  # topic, payload, retain
    telemetry_keys: set[tuple[str, int]]  # (pack, ts_ms)
    cells: int
    site_rows: int


def emulated_messages(site: str, duration_s: float, *, packs: int = 6) -> Messages:
    """Messages of a `small` emulation, in publishing order (meta and status first)."""
    sc = load_scenario("small").scaled(packs).model_copy(update={"site": site, "faults": ()})
    emu = Emulation(sc, EmulationOptions(duration_s=duration_s, chunk_s=duration_s, truth=False))
    items: list[tuple[str, bytes, bool]] = []
    for pack, payload in zip(emu.fleet.meta["pack"], encode_rows(emu.fleet.meta, c.PackMeta), strict=True):
        items.append((c.topic(c.TopicKind.PACK_META, site, pack), payload, True))
    status = emu.status_frame()
    for pack, payload in zip(status["pack"], encode_rows(status, c.PackStatus), strict=True):
        items.append((c.topic(c.TopicKind.PACK_STATUS, site, pack), payload, True))
    chunk = next(iter(emu.chunks()))
    tele = chunk.telemetry.sort("ts_ms", "pack")
    for pack, payload in zip(tele["pack"], encode_rows(tele, c.PackTelemetry), strict=True):
        items.append((c.topic(c.TopicKind.PACK_TELEMETRY, site, pack), payload, False))
    for pack, payload in zip(chunk.cells["pack"], encode_rows(chunk.cells, c.PackCells), strict=True):
        items.append((c.topic(c.TopicKind.PACK_CELLS, site, pack), payload, False))
    site_frame = chunk.site.with_columns(pl.lit(site).alias("site"))
    for payload in encode_rows(site_frame, c.SiteTelemetry):
        items.append((c.topic(c.TopicKind.SITE_TELEMETRY, site), payload, False))
    keys = set(zip(tele["pack"].to_list(), tele["ts_ms"].to_list(), strict=True))
    return Messages(items=items, telemetry_keys=keys, cells=chunk.cells.height, site_rows=site_frame.height)


def publish(broker: Mosquitto, items: list[tuple[str, bytes, bool]], *, rate_per_s: float | None = None) -> None:
    """Publish at QoS 1 and wait for every PUBACK (optionally paced)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        infos = []
        started = time.monotonic()
        for i, (topic, payload, retain) in enumerate(items):
            infos.append(client.publish(topic, payload, qos=1, retain=retain))
            if rate_per_s and i % 100 == 0:
                due = started + i / rate_per_s
                time.sleep(max(0.0, due - time.monotonic()))
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


class ServeProcess:
    """`mgtwin serve` in its own process, as an operator runs it."""

    def __init__(self, broker: Mosquitto, influx: Influxd, db: str, site: str, workdir: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "MGTWIN_SITE": site,
            "MGTWIN_MQTT__URL": broker.url,
            "MGTWIN_INFLUX__URL": influx.url,
            "MGTWIN_INFLUX__DATABASE": db,
            "MGTWIN_HEALTH__PORT": str(self.port),
            "MGTWIN_INFLUX__RETRY_MAX_S": "2",
            "MGTWIN_PUBLISH__INTERVAL_S": "1",
        }
        self.log = workdir / f"serve-{site}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twin.cli", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.1)
        msg = f"serve did not come up: {self.log.read_text()}"
        raise AssertionError(msg)

    def health(self) -> dict[str, object]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                return dict(json.load(resp))
        except urllib.error.HTTPError as exc:  # 503 when degraded still carries the details
            return dict(json.load(exc))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as resp:
            return resp.read().decode()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for s in started:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def count_telemetry(influx: Influxd, db: str) -> int:
    answer = influx.query("SELECT count(voltage_v) FROM pack_telemetry", db=db)
    series = answer["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def wait_for_count(influx: Influxd, db: str, expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    n = -1
    while time.monotonic() < deadline:
        n = count_telemetry(influx, db)
        if n >= expected:
            time.sleep(1.0)  # anything beyond would show as an excess
            return count_telemetry(influx, db)
        time.sleep(0.25)
    return n


def stored_keys(influx: Influxd, db: str) -> set[tuple[str, int]]:
    answer = influx.query("SELECT voltage_v FROM pack_telemetry GROUP BY pack", db=db)
    keys = set()
    for s in answer["results"][0].get("series", []):
        pack = s["tags"]["pack"]
        keys.update((pack, int(v[0])) for v in s["values"])
    return keys


BAD = [
    ("packs/P1/telemetry", b"{not json", "not_json"),
    ("packs/P1/telemetry", b"", "not_json"),
    ("packs/P1/telemetry", b'{"schema":"pack_telemetry/1","pack":"P1","voltage_v":NaN}', "not_finite"),
    ("packs/P1/telemetry", b'{"schema":"pack_telemetry/9"}', "wrong_version"),
    ("packs/bad,id=1/telemetry", b"{}", "bad_identifier"),
    ("packs/P1/telemetry", b"\x00\xff" * 40, "not_json"),
]


def test_every_valid_message_once_and_every_invalid_one_dead_lettered(
    mosquitto: Mosquitto,
    influxd: Influxd,
    influx_db: str,
    unique_site: str,
    tmp_path: Path,
    serve_factory: list[ServeProcess],
) -> None:
    messages = emulated_messages(unique_site, 120)
    letters: queue.Queue[bytes] = queue.Queue()
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dl-{unique_site}")
    watcher.on_message = lambda _c, _u, m: letters.put(m.payload)
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.loop_start()
    watcher.subscribe(c.topic(c.TopicKind.TWIN_DEADLETTER, unique_site), qos=1)
    try:
        serve = ServeProcess(mosquitto, influxd, influx_db, unique_site, tmp_path).start()
        serve_factory.append(serve)
        bad = [(f"microgrid/{unique_site}/{t}", p, False) for t, p, _ in BAD]
        items = messages.items[: len(messages.items) // 2] + bad + messages.items[len(messages.items) // 2 :]
        publish(mosquitto, items)
        n = wait_for_count(influxd, influx_db, len(messages.telemetry_keys), 60)
        assert n == len(messages.telemetry_keys)
        assert stored_keys(influxd, influx_db) == messages.telemetry_keys
        # Cells and site telemetry arrive too.
        cells = influxd.query("SELECT count(cell_v_000) FROM pack_cells", db=influx_db)["results"][0]["series"][0]
        assert cells["values"][0][1] == messages.cells
        reasons = []
        deadline = time.monotonic() + 10
        while len(reasons) < len(BAD) and time.monotonic() < deadline:
            try:
                reasons.append(json.loads(letters.get(timeout=0.5))["reason"])
            except queue.Empty:
                continue
        assert sorted(reasons) == sorted(r for _, _, r in BAD)
        metrics = serve.metrics()
        assert 'mgtwin_invalid_total{reason="not_json"} 3' in metrics
        written = len(messages.telemetry_keys) + messages.cells + messages.site_rows
        assert f"mgtwin_written_points_total {written}\n" in metrics
        health = serve.health()
        assert health["status"] == "ok"
        assert serve.stop() == 0
    finally:
        watcher.disconnect()
        watcher.loop_stop()


def test_killed_mid_stream_and_restarted_loses_and_doubles_nothing(
    mosquitto: Mosquitto,
    influxd: Influxd,
    influx_db: str,
    unique_site: str,
    tmp_path: Path,
    serve_factory: list[ServeProcess],
) -> None:
    messages = emulated_messages(unique_site, 300, packs=8)
    serve = ServeProcess(mosquitto, influxd, influx_db, unique_site, tmp_path).start()
    serve_factory.append(serve)
    publisher = subprocess.Popen  # noqa: F841 - publishing happens in this process, paced
    import threading

    done = threading.Event()

    def feed() -> None:
        publish(mosquitto, messages.items, rate_per_s=1500)
        done.set()

    thread = threading.Thread(target=feed)
    thread.start()
    time.sleep(1.0)
    assert serve.stop(signal.SIGKILL) == -signal.SIGKILL
    partial = count_telemetry(influxd, influx_db)
    assert 0 < partial < len(messages.telemetry_keys)
    time.sleep(1.0)
    again = ServeProcess(mosquitto, influxd, influx_db, unique_site, tmp_path).start()
    serve_factory.append(again)
    thread.join(60)
    assert done.is_set()
    n = wait_for_count(influxd, influx_db, len(messages.telemetry_keys), 60)
    assert n == len(messages.telemetry_keys)
    assert stored_keys(influxd, influx_db) == messages.telemetry_keys
    assert again.stop() == 0


def test_influxdb_down_for_30_s_loses_nothing(
    mosquitto: Mosquitto, tmp_path: Path, unique_site: str, serve_factory: list[ServeProcess]
) -> None:
    influx = Influxd(workdir=tmp_path / "influx").start()
    try:
        db = "outage"
        influx.query(f'CREATE DATABASE "{db}"')
        messages = emulated_messages(unique_site, 240, packs=8)
        serve = ServeProcess(mosquitto, influx, db, unique_site, tmp_path).start()
        serve_factory.append(serve)
        third = len(messages.items) // 3
        publish(mosquitto, messages.items[:third])
        time.sleep(2.0)
        influx.stop()
        publish(mosquitto, messages.items[third : 2 * third])
        deadline = time.monotonic() + 15
        while serve.health()["status"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert serve.health()["status"] == "degraded"  # within 15 s of the outage
        time.sleep(28.0)
        influx.start()
        publish(mosquitto, messages.items[2 * third :])
        n = wait_for_count(influx, db, len(messages.telemetry_keys), 90)
        assert n == len(messages.telemetry_keys)
        assert stored_keys(influx, db) == messages.telemetry_keys
        assert "mgtwin_write_retries_total" in serve.metrics()
        assert serve.stop() == 0
    finally:
        influx.stop()


def _retained(broker: Mosquitto, topic: str, timeout_s: float = 5.0) -> list[tuple[str, bytes]]:
    """What a new subscriber gets for ``topic`` (retained messages)."""
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ret-{time.monotonic_ns()}")
    client.on_message = lambda _c, _u, m: inbox.put(m)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    got = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                m = inbox.get(timeout=0.3)
            except queue.Empty:
                if got:
                    break
                continue
            got.append((m.topic, bytes(m.payload)))
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def test_state_is_published_retained_and_status_tells_the_truth(
    mosquitto: Mosquitto,
    influxd: Influxd,
    influx_db: str,
    unique_site: str,
    tmp_path: Path,
    serve_factory: list[ServeProcess],
) -> None:
    messages = emulated_messages(unique_site, 30, packs=4)
    serve = ServeProcess(mosquitto, influxd, influx_db, unique_site, tmp_path).start()
    serve_factory.append(serve)
    status_topic = c.topic(c.TopicKind.TWIN_STATUS, unique_site)
    assert json.loads(_retained(mosquitto, status_topic)[0][1])["state"] == "online"
    publish(mosquitto, messages.items)
    wait_for_count(influxd, influx_db, len(messages.telemetry_keys), 30)
    time.sleep(2.5)  # at least one publishing interval (1 s in these tests)
    state = c.decode(_retained(mosquitto, c.topic(c.TopicKind.TWIN_STATE, unique_site))[0][1], c.TwinState)
    assert isinstance(state, c.TwinState)
    assert state.packs_total == 4
    assert state.site == unique_site
    assert state.ts_ms == max(ts for _, ts in messages.telemetry_keys)
    packs = _retained(mosquitto, f"microgrid/{unique_site}/twin/packs/+")
    assert len(packs) == 4
    for _, payload in packs:
        assert isinstance(c.decode(payload, c.TwinPackState), c.TwinPackState)
    # The site and pack state reach InfluxDB too.
    answer = influxd.query("SELECT last(packs_total) FROM site_state", db=influx_db)
    assert answer["results"][0]["series"][0]["values"][0][1] == 4
    assert serve.stop(signal.SIGTERM) == 0
    assert json.loads(_retained(mosquitto, status_topic)[0][1])["state"] == "offline"
    # A crash: the broker publishes the last will.
    again = ServeProcess(mosquitto, influxd, influx_db, unique_site, tmp_path).start()
    serve_factory.append(again)
    assert json.loads(_retained(mosquitto, status_topic)[0][1])["state"] == "online"
    again.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    state_now = "online"
    while state_now == "online" and time.monotonic() < deadline:
        state_now = json.loads(_retained(mosquitto, status_topic)[0][1])["state"]
    assert state_now == "offline"
