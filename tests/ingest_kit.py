"""Helpers of the fault, bad-input and security tests: telemetry, a paced publisher, the oracles.

The oracles of INGEST_NOTES ("Tests the project must pass"):

* the published set S = {(pack, seq)} (:class:`Feed` records what the broker acknowledged);
* the stored set W from InfluxDB's ``pack_telemetry``, over every series (:func:`stored_rows`):
  "no loss" is W ⊇ S, "no duplicate visible" is that no (pack, seq) appears twice
  (a re-delivered message written under other tags would show as a second point);
* the service's own counters (:meth:`twin.app.Service.metrics`) and ``/healthz``.

Nothing here sleeps as an assertion: :func:`wait_until` polls with a deadline.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import Influxd, Mosquitto, free_port
from twin import contract as c
from twin.app import Service
from twin.config import Settings

T = TypeVar("T")

_TEMPLATE = (
    '{{"schema":"pack_telemetry/1","pack":"{pack}","ts_ms":{ts},"seq":{seq},"voltage_v":{v:.3f},'
    '"current_a":{i:.2f},"temp_min_c":24.0,"temp_max_c":26.5,"temp_avg_c":25.1,"cell_v_min_v":3.861,'
    '"cell_v_max_v":3.874,"cell_v_min_idx":4,"cell_v_max_idx":7,"soc_bms":0.62,"soh_bms":0.93,'
    '"contactor_closed":true,"fault_bits":0}}'
)


def now_ms() -> int:
    """Return the wall clock in ms (the twin refuses telemetry stamped far ahead of it)."""
    return time.time_ns() // 1_000_000


def telemetry(site: str, pack: str, seq: int, ts_ms: int, *, voltage_v: float | None = None) -> tuple[str, bytes]:
    """Return the topic and a valid ``pack_telemetry`` payload."""
    v = 370.0 + (seq % 50) * 0.1 if voltage_v is None else voltage_v
    payload = _TEMPLATE.format(pack=pack, ts=ts_ms, seq=seq, v=v, i=10.0 + seq % 7).encode()
    return c.topic(c.TopicKind.PACK_TELEMETRY, site, pack), payload


def fleet(site: str, packs: int, steps: int, *, start_ms: int | None = None, first_seq: int = 0) -> list[Message]:
    """Telemetry of ``packs`` packs for ``steps`` seconds, step-major (every pack once per second).

    Sample ``seq`` is stamped ``start_ms + seq * 1000``. The default start puts the last sample
    at about now (none ahead of the twin's clock); tests that call this more than once pass
    one ``start_ms`` so that no two samples of a pack share a timestamp.
    """
    start = now_ms() - (first_seq + steps) * 1000 if start_ms is None else start_ms
    out = []
    for k in range(first_seq, first_seq + steps):
        for p in range(packs):
            pack = f"P{p:04d}"
            topic, payload = telemetry(site, pack, k, start + k * 1000)
            out.append(Message(topic, payload, pack, k))
    return out


@dataclass(frozen=True, slots=True)
class Message:
    """One message to publish; ``pack``/``seq`` are set for valid telemetry (the oracle's key)."""

    topic: str
    payload: bytes
    pack: str | None = None
    seq: int | None = None
    retain: bool = False


def wait_until(predicate: Callable[[], T], timeout_s: float, interval_s: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy or the deadline passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    return value


# --------------------------------------------------------------------------- publishing


def mqtt_client(
    port: int,
    client_id: str,
    *,
    protocol: int = mqtt.MQTTv311,
    username: str | None = None,
    password: str | None = None,
    clean: bool = True,
) -> mqtt.Client:
    """A paho client (VERSION2 callbacks), not yet connected."""
    kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
    if protocol != mqtt.MQTTv5:
        kwargs["clean_session"] = clean
    client = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
    client.max_inflight_messages_set(1000)
    if username is not None:
        client.username_pw_set(username, password)
    return client


@dataclass
class Feed:
    """Publish messages at QoS 1 from a background thread, optionally paced; record what the broker acked.

    Args:
        broker_port: the broker.
        messages: what to publish, in order.
        rate_per_s: messages per second (None: as fast as the broker acknowledges).
    """

    broker_port: int
    messages: Sequence[Message]
    rate_per_s: float | None = None
    username: str | None = None
    password: str | None = None
    acked: set[tuple[str, int]] = field(default_factory=set)
    published: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Feed:
        """Start publishing in the background."""
        self._thread = threading.Thread(target=self._run, name="feed", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float = 120) -> Feed:
        """Wait until every message is acknowledged by the broker; re-raise a failure."""
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the feed did not finish"
        if self.error is not None:
            raise self.error
        return self

    def _run(self) -> None:
        try:
            publish(
                self.broker_port,
                self.messages,
                rate_per_s=self.rate_per_s,
                on_acked=self._acked,
                username=self.username,
                password=self.password,
            )
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.done.set()

    def _acked(self, m: Message) -> None:
        self.published += 1
        if m.pack is not None and m.seq is not None:
            self.acked.add((m.pack, m.seq))


def publish(
    broker_port: int,
    messages: Sequence[Message],
    *,
    rate_per_s: float | None = None,
    on_acked: Callable[[Message], None] | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout_s: float = 120,
) -> None:
    """Publish at QoS 1 and wait for every PUBACK (optionally paced)."""
    client = mqtt_client(broker_port, f"pub-{os.getpid()}-{time.monotonic_ns()}", username=username, password=password)
    client.connect("127.0.0.1", broker_port)
    client.loop_start()
    try:
        infos = []
        started = time.monotonic()
        for i, m in enumerate(messages):
            infos.append((m, client.publish(m.topic, m.payload, qos=1, retain=m.retain)))
            if rate_per_s and i % 20 == 0:
                time.sleep(max(0.0, started + i / rate_per_s - time.monotonic()))
        deadline = time.monotonic() + timeout_s
        for m, info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), f"the broker did not acknowledge {m.topic}"
            if on_acked is not None:
                on_acked(m)
    finally:
        client.disconnect()
        client.loop_stop()


def keys(messages: Sequence[Message]) -> set[tuple[str, int]]:
    """The oracle's keys of the valid telemetry among ``messages``."""
    return {(m.pack, m.seq) for m in messages if m.pack is not None and m.seq is not None}


# --------------------------------------------------------------------------- InfluxDB


def stored_rows(influx: Influxd, db: str, *, auth: tuple[str, str] | None = None) -> list[tuple[str, int]]:
    """Every (pack, seq) point of ``pack_telemetry``, over every series (duplicates kept)."""
    answer = influx.query('SELECT "seq", "pack" FROM "pack_telemetry"', db=db, auth=auth)
    result = answer["results"][0]
    assert "error" not in result, result
    rows: list[tuple[str, int]] = []
    for series in result.get("series", []):
        columns = series["columns"]
        i_seq, i_pack = columns.index("seq"), columns.index("pack")
        rows.extend((str(v[i_pack]), int(v[i_seq])) for v in series["values"])
    return rows


def count_points(influx: Influxd, db: str, measurement: str = "pack_telemetry", field_name: str = "seq") -> int:
    """``count(field)`` over a measurement."""
    answer = influx.query(f'SELECT count("{field_name}") FROM "{measurement}"', db=db)
    series = answer["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def assert_no_loss_no_duplicates(influx: Influxd, db: str, expected: set[tuple[str, int]], timeout_s: float) -> float:
    """Wait until every expected (pack, seq) is stored; assert none is missing or doubled; return the wait."""
    started = time.monotonic()
    rows: list[tuple[str, int]] = []

    def complete() -> bool:
        nonlocal rows
        rows = stored_rows(influx, db)
        return expected <= set(rows)

    wait_until(complete, timeout_s, interval_s=0.25)
    waited = time.monotonic() - started
    missing = expected - set(rows)
    assert not missing, f"{len(missing)} of {len(expected)} messages lost, e.g. {sorted(missing)[:5]}"
    doubled = len(rows) - len(set(rows))
    assert doubled == 0, f"{doubled} duplicate points visible"
    return waited


# --------------------------------------------------------------------------- the service


def settings_for(
    site: str,
    broker: Mosquitto | str,
    lock_dir: Path,
    *,
    influx_url: str | None = None,
    database: str | None = None,
    **sections: dict[str, Any],
) -> Settings:
    """Settings of an in-process service for a test (health on a free loopback port, fast publishing)."""
    url = broker.url if isinstance(broker, Mosquitto) else broker
    mqtt_section = {"url": url, "lock_dir": lock_dir, "reconnect_min_s": 1.0, "reconnect_max_s": 4.0}
    mqtt_section.update(sections.pop("mqtt", {}))
    influx_section: dict[str, Any] = {"url": influx_url, "retry_max_s": 2.0, "timeout_s": 3.0}
    if database is not None:
        influx_section["database"] = database
    influx_section.update(sections.pop("influx", {}))
    publish_section = {"interval_s": 1.0, **sections.pop("publish", {})}
    ingest_section = {"batch_max_age_s": 0.1, **sections.pop("ingest", {})}
    return Settings(
        site=site,
        mqtt=mqtt_section,
        influx=influx_section,
        health={"port": 0},
        publish=publish_section,
        ingest=ingest_section,
        **sections,
    )


@contextmanager
def running(service: Service) -> Iterator[Service]:
    """Start a service in this process; stop it gracefully (then forced) at the end."""
    service.start()
    try:
        yield service
    finally:
        service.request_stop()
        if not service.wait(15):
            service.request_stop()
            service.wait(10)
        service.close()


def healthz(port: int) -> dict[str, Any]:
    """GET /healthz (a 503 when degraded still carries the details)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as resp:
            return dict(json.load(resp))
    except urllib.error.HTTPError as exc:
        return dict(json.load(exc))


def metrics_text(port: int) -> str:
    """GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str) -> float | None:
    """One value of a Prometheus text exposition (``name`` with its labels), or None."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


class ServeProcess:
    """``python -m twin.cli serve`` in its own process (for SIGKILL and SIGTERM), settings from the environment."""

    def __init__(self, workdir: Path, site: str, env: dict[str, str], *, name: str = "serve") -> None:
        self.health_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.upper().startswith("MGTWIN_")},
            "MGTWIN_SITE": site,
            "MGTWIN_HEALTH__PORT": str(self.health_port),
            "MGTWIN_INFLUX__RETRY_MAX_S": "2",
            "MGTWIN_INFLUX__TIMEOUT_S": "3",
            "MGTWIN_PUBLISH__INTERVAL_S": "1",
            "MGTWIN_INGEST__BATCH_MAX_AGE_S": "0.1",
            "MGTWIN_MQTT__LOCK_DIR": str(workdir / "locks"),
            "MGTWIN_MQTT__RECONNECT_MIN_S": "1",
            "MGTWIN_MQTT__RECONNECT_MAX_S": "4",
            **env,
        }
        self.log = workdir / f"{name}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> ServeProcess:
        """Start the process without waiting for it to come up."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twin.cli", "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def start(self, timeout_s: float = 30) -> ServeProcess:
        """Start and wait until /healthz answers."""
        self.spawn()
        assert self.proc is not None

        def up() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, self.log.read_text()
            try:
                healthz(self.health_port)
            except OSError:
                return False
            return True

        assert wait_until(up, timeout_s, 0.1), f"serve did not come up: {self.log.read_text()}"
        return self

    def health(self) -> dict[str, Any]:
        """/healthz."""
        return healthz(self.health_port)

    def metrics(self) -> str:
        """/metrics."""
        return metrics_text(self.health_port)

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal to our own process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL our process if it still runs (cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        """Everything the process printed."""
        return self.log.read_text(errors="replace")


@contextmanager
def serve_processes() -> Iterator[list[ServeProcess]]:
    """Collect serve processes started by a test; SIGKILL any still running at the end."""
    started: list[ServeProcess] = []
    try:
        yield started
    finally:
        for s in started:
            s.kill()


def random_packs(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct random valid pack ids."""
    out: set[str] = set()
    while len(out) < n:
        out.add("R" + "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", k=10)))
    return sorted(out)
