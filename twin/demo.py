"""The zero-set-up demo: an embedded broker, the emulated Nevada site, the twin, a live terminal view.

``mgtwin demo`` needs no services. In one process it starts:

1. an MQTT broker (amqtt, MQTT 3.1.1) on a free loopback port, unless a broker URL is given;
2. the twin (:class:`twin.app.Service`, exactly as ``mgtwin serve`` runs it), subscribed to it,
   writing InfluxDB when a URL is given;
3. the emulator (:class:`emulators.run.Emulation`), publishing the site live per the contract
   at ``speed`` times real time, and recording the same run into a run folder with the
   emulator's truth (so ``mgtwin replay`` and ``mgtwin evaluate`` can score it afterwards);
4. a watcher subscribed to the twin's own outputs (``twin/state``, ``twin/packs/+``,
   ``twin/alerts``), which is what the terminal view shows: the view is a client of the twin
   like any SCADA system, not a peek into its memory.

Time: the emulator stamps its messages with simulated time (the scenario's start onwards),
and the twin is given a clock that runs at the same speed from the same start
(:class:`twin.clock.ReplayClock`), so staleness, lateness and clock-skew rules see the
simulated site as a live one. Their windows are widened by a couple of wall-clock seconds,
since at 60x a 30 s staleness window is half a second of wall time.

Throughput (measured on the project's 2-core machine, everything in one Python process):
amqtt relays about 3.9k QoS 1 messages/s between one publisher and one subscriber when nothing
else runs. With the emulator's physics, the per-pack gateways and the twin (writing InfluxDB)
sharing the interpreter, 24 packs at 60x (about 1.6k msg/s) run with the emulator on time and the
twin's lag under a second of wall time; 36 packs (about 2.4k msg/s) already let the queue and the
lag grow (3.5 s). The Nevada site sends 1.1 messages per pack and simulated second (805 packs at
60x would be 53k msg/s), so the demo scales it down to :data:`DEFAULT_PACKS` packs, same mix of
chemistries and lives, load and solar scaled with it; ``packs`` and ``speed`` trade one for the
other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import polars as pl
from paho.mqtt.enums import CallbackAPIVersion

from emulators.live import FolderSink, MqttSink, run_info
from emulators.run import Chunk, Emulation, EmulationOptions
from emulators.scenario import Scenario, load_scenario
from twin import contract as c
from twin.app import Service
from twin.clock import ReplayClock
from twin.config import Settings, load_settings
from twin.errors import BrokerError, DatabaseError, PayloadError, TwinError

__all__ = [
    "DEFAULT_DURATION_S",
    "DEFAULT_PACKS",
    "DEFAULT_SPEED",
    "Demo",
    "DemoError",
    "DemoOptions",
    "DemoSnapshot",
    "DemoSummary",
    "EmbeddedBroker",
    "TeeSink",
    "TwinWatcher",
    "progress_line",
    "render_view",
]

log = logging.getLogger(__name__)

DEFAULT_SPEED: Final = 60.0
"""Simulated seconds per wall-clock second."""
DEFAULT_PACKS: Final = 24
"""Packs of the scaled-down Nevada site: 24 x 1.1 msg/s x 60 = about 1.6k msg/s (see the module docstring)."""
DEFAULT_DURATION_S: Final = 180.0
"""Wall-clock duration of a demo run."""

_BROKER_START_TIMEOUT_S: Final = 10.0
_DRAIN_TIMEOUT_S: Final = 15.0
_RATE_WINDOW_S: Final = 5.0


class DemoError(TwinError):
    """The demo cannot run as asked: a bad option, an occupied run folder, a broker that fails to start."""


# --------------------------------------------------------------------------- the embedded broker


class EmbeddedBroker:
    """An amqtt broker on loopback, in its own thread and event loop.

    Anonymous clients are accepted: the broker listens on 127.0.0.1 only and lives as long
    as the demo. amqtt speaks MQTT 3.1.1 (it refuses MQTT 5 connections).

    Args:
        host: the address to bind (loopback by default).
        port: the port; 0 picks a free one.

    Examples:
        >>> with EmbeddedBroker() as broker:
        ...     broker.url.startswith("mqtt://127.0.0.1:")
        True
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        """The broker's ``mqtt://`` URL."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start the broker and return when it listens.

        Raises:
            BrokerError: amqtt could not start (for example, the port is taken).
        """
        from amqtt.broker import Broker

        # amqtt logs every connection at INFO and the shutdown at WARNING: keep the terminal quiet.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only the anonymous-auth plugin: no packet logging and no $SYS publishing (they cost throughput).
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        async def boot() -> None:
            broker = Broker(config, loop=loop)
            await broker.start()
            self._broker = broker

        def run() -> None:
            asyncio.set_event_loop(loop)
            # A client that vanishes mid-handshake ends in an unretrieved task exception: log it, do not print it.
            loop.set_exception_handler(lambda _loop, ctx: log.debug("embedded broker: %s", ctx.get("message")))
            try:
                loop.run_until_complete(boot())
            except BaseException as exc:  # handed to the starting thread, which raises it
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="mgtwin-demo-broker", daemon=True)
        self._thread.start()
        if not started.wait(_BROKER_START_TIMEOUT_S) or failure:
            why = f"{type(failure[0]).__name__}: {failure[0]}" if failure else "timeout"
            msg = f"the embedded MQTT broker could not start on {self.host}:{self.port}: {why}"
            raise BrokerError(msg)
        if self.port == 0:
            servers = self._broker._servers  # amqtt keeps the listening sockets there
            self.port = int(servers["default"].instance.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        """Shut the broker down and end its thread."""
        loop, broker, self._broker = self._loop, self._broker, None
        if loop is None or self._thread is None:
            return
        if broker is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=10)
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> EmbeddedBroker:
        """Start the broker."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop the broker."""
        self.stop()


# --------------------------------------------------------------------------- sinks


class _Stopped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the emulator's loop to end a run early."""


class TeeSink:
    """Hand an emulation's output to several sinks, and end the run when ``stop`` is set.

    Args:
        sinks: the sinks, each with ``meta``, ``chunk`` and ``close``.
        stop: checked before every chunk; when set, the run ends with the chunks so far.
        on_chunk: called after each chunk with its end time (ms).
    """

    def __init__(
        self,
        sinks: list[FolderSink | MqttSink],
        *,
        stop: threading.Event | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        self.sinks = sinks
        self.stop = stop or threading.Event()
        self.on_chunk = on_chunk

    def meta(self, packs: pl.DataFrame, status: pl.DataFrame) -> None:
        """Pass the packs' metadata and first status to every sink."""
        for sink in self.sinks:
            sink.meta(packs, status)

    def chunk(self, chunk: Chunk) -> None:
        """Pass one chunk to every sink (the recording first, so it never lags what was published)."""
        if self.stop.is_set():
            raise _Stopped
        for sink in self.sinks:
            sink.chunk(chunk)
        if self.on_chunk is not None:
            self.on_chunk(chunk.end_ms or int(chunk.telemetry["ts_ms"].max() or 0))  # type: ignore[arg-type]

    def close(self, info: dict[str, Any]) -> None:
        """Close every sink, even if one fails; re-raise the first failure."""
        errors: list[BaseException] = []
        for sink in self.sinks:
            try:
                sink.close(info)
            except Exception as exc:  # one failing sink must not keep the others open
                errors.append(exc)
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------- the watcher


@dataclass(frozen=True, slots=True)
class DemoSnapshot:
    """What the terminal view shows at one moment (an immutable copy)."""

    site: str
    state: dict[str, Any] | None
    weakest: list[dict[str, Any]]
    alerts: list[dict[str, Any]]
    packs_seen: int
    sim_ms: int | None
    wall_s: float
    duration_s: float
    speed: float
    received: int
    accepted: int
    rejected: int
    ingest_rate: float
    published: int
    publish_rate: float
    behind_s: float
    lag_ms: float
    queue_depth: int
    influx: str | None


class TwinWatcher:
    """Subscribe to the twin's outputs and keep the latest of each.

    Args:
        url: the broker.
        site: the site.
        client_id: the client id (clean session: nothing is kept at the broker).
    """

    def __init__(self, url: str, site: str, *, client_id: str) -> None:
        parts = urlsplit(url)
        self.site = site
        self._lock = threading.Lock()
        self.state: dict[str, Any] | None = None
        self.states: list[dict[str, Any]] = []
        self.packs: dict[str, dict[str, Any]] = {}
        self.alerts: dict[str, dict[str, Any]] = {}
        self.invalid = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 1883
        self.connected = threading.Event()

    def start(self) -> None:
        """Connect and subscribe.

        Raises:
            BrokerError: the broker cannot be reached.
        """
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            msg = f"cannot connect to the MQTT broker at {self._host}:{self._port}: {exc}"
            raise BrokerError(msg) from exc
        self._client.loop_start()
        if not self.connected.wait(10):
            self.stop()
            msg = f"the MQTT broker at {self._host}:{self._port} did not accept the demo's watcher"
            raise BrokerError(msg)

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            return
        kinds = (c.TopicKind.TWIN_STATE, c.TopicKind.TWIN_PACK, c.TopicKind.TWIN_ALERTS)
        client.subscribe([(c.subscription(kind, self.site), 0) for kind in kinds])
        self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:  # never raise in a paho callback (it would kill the network thread)
            message = c.decode(bytes(msg.payload))
            data = message.model_dump(mode="json", by_alias=False)
            with self._lock:
                if isinstance(message, c.TwinState):
                    self.state = data
                    self.states.append(data)
                elif isinstance(message, c.TwinPackState):
                    self.packs[message.pack] = data
                elif isinstance(message, c.Alert):
                    if message.state == "raised":
                        self.alerts[message.alert_id] = data
                    else:
                        self.alerts.pop(message.alert_id, None)
        except (PayloadError, ValueError):
            with self._lock:
                self.invalid += 1

    def latest(self, weakest: int = 5) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]], int]:
        """Return the latest site state, the weakest packs, the active alerts and the packs seen."""
        with self._lock:
            state = dict(self.state) if self.state else None
            packs = [dict(p) for p in self.packs.values()]
            alerts = sorted((dict(a) for a in self.alerts.values()), key=lambda a: -int(a["ts_ms"]))
        return state, _weakest(packs, weakest), alerts, len(packs)


def _health_of(pack: dict[str, Any]) -> float:
    """A pack's SoH for ranking: the twin's estimate, else the BMS's figure, else 1."""
    for key in ("soh", "soh_bms"):
        value = pack.get(key)
        if isinstance(value, int | float):
            return float(value)
    return 1.0


def _weakest(packs: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` packs with the lowest SoH (offline packs first among equals)."""
    return sorted(packs, key=lambda p: (_health_of(p), bool(p.get("online")), str(p.get("pack"))))[:n]


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """How to run the demo.

    Attributes:
        scenario: packaged scenario name or TOML path.
        packs: scale the site down to this many packs (``None``: the scenario's own count).
        speed: simulated seconds per wall-clock second.
        duration_s: wall-clock duration; the run also ends when the emulation does.
        out: the run folder (must not exist, or be empty).
        mqtt_url: an external broker; ``None`` starts the embedded one.
        influx_url: write InfluxDB here (credentials from ``MGTWIN_INFLUX__*``); ``None``: no InfluxDB.
        influx_db: the database (1.x) or bucket (2.x).
        seed: override the scenario's seed.
        pack_level: two cell groups per string instead of every cell (faster physics).
        publish_interval_s: how often the twin publishes its state (wall clock).
        site: rename the site (topic root), e.g. to share a broker with other sites.
    """

    scenario: str = "nevada"
    packs: int | None = DEFAULT_PACKS
    speed: float = DEFAULT_SPEED
    duration_s: float = DEFAULT_DURATION_S
    out: Path | None = None
    mqtt_url: str | None = None
    influx_url: str | None = None
    influx_db: str | None = None
    seed: int | None = None
    pack_level: bool = False
    publish_interval_s: float = 1.0
    site: str | None = None

    def __post_init__(self) -> None:
        """Check the ranges."""
        if not self.speed > 0 or not self.duration_s > 0 or not self.publish_interval_s > 0:
            msg = "speed, duration and publish interval must be positive"
            raise DemoError(msg)
        if self.packs is not None and self.packs < 1:
            msg = "packs must be at least 1"
            raise DemoError(msg)


@dataclass
class DemoSummary:
    """What a demo run did."""

    run_dir: Path
    site: str
    packs: int
    speed: float
    wall_s: float
    simulated_s: float
    ended_by: str
    broker: str
    influx: str | None
    published: int
    received: int
    accepted: int
    rejected: int
    duplicates: int
    written_points: int
    states_seen: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    final_state: dict[str, Any] | None = None
    start_ms: int = 0
    end_ms: int = 0

    def lines(self) -> list[str]:
        """The summary as plain lines (the CLI prints them, tests read them)."""
        out = [
            f"demo ended ({self.ended_by}) after {self.wall_s:.1f} s: {self.simulated_s / 3600:.2f} h of site "
            f"{self.site} simulated at {self.speed:g}x with {self.packs} packs",
            f"messages: {self.published} published, {self.received} received by the twin, "
            f"{self.accepted} accepted, {self.rejected} rejected, {self.duplicates} duplicates",
        ]
        if self.rejects_by_reason:
            out.append("rejects by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(self.rejects_by_reason.items())))
        s = self.final_state
        if s:
            out.append(
                f"final state at {_iso(int(s['ts_ms']))}: SoC {_pct(s.get('soc'))}, "
                f"energy to floor {_num(s.get('energy_to_floor_kwh'), 'kWh')}, "
                f"packs online {s.get('packs_online')}/{s.get('packs_total')}"
            )
        if self.influx:
            out.append(
                f"InfluxDB {self.influx}: {self.written_points} points written, "
                f"from {_iso(self.start_ms)} to {_iso(self.end_ms)}"
            )
        out.append(f"run folder: {self.run_dir}")
        out.append(f"score it: mgtwin replay {self.run_dir} && mgtwin evaluate {self.run_dir}")
        return out


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _pct(value: object) -> str:
    return f"{float(value):.1%}" if isinstance(value, int | float) else "-"


def _num(value: object, unit: str, scale: float = 1.0, digits: int = 0) -> str:
    return f"{float(value) / scale:,.{digits}f} {unit}" if isinstance(value, int | float) else "-"


def _hours(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    minutes = round(float(value) / 60)
    return f"{minutes // 60}h{minutes % 60:02d}"


class _Rate:
    """A message rate over the last few seconds, from a growing counter."""

    def __init__(self) -> None:
        self._points: deque[tuple[float, int]] = deque()

    def update(self, count: int, now: float) -> float:
        self._points.append((now, count))
        while len(self._points) > 2 and now - self._points[0][0] > _RATE_WINDOW_S:
            self._points.popleft()
        t0, n0 = self._points[0]
        return (count - n0) / (now - t0) if now > t0 else 0.0


class Demo:
    """One demo run: broker, twin, emulator, watcher; :meth:`run` drives it to the end.

    Args:
        options: what to run.
    """

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.scenario = self._scenario(options)
        self.run_dir = options.out or Path("runs") / f"demo-{datetime.now(tz=UTC).strftime('%Y%m%d-%H%M%S')}"
        if self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
            msg = f"the run folder {self.run_dir} exists and is not empty; give another with --out"
            raise DemoError(msg)
        sim_s = options.duration_s * options.speed
        self.emulation = Emulation(
            self.scenario,
            EmulationOptions(
                duration_s=sim_s,
                dt_s=1.0,
                cell_level=not options.pack_level,
                chunk_s=max(1.0, min(10.0, options.speed / 6)),
                truth=True,
            ),
        )
        self.stop_event = threading.Event()
        self.broker: EmbeddedBroker | None = None
        self.service: Service | None = None
        self.watcher: TwinWatcher | None = None
        self.mqtt_sink: MqttSink | None = None
        self.sink: TeeSink | None = None
        self.clock = ReplayClock(options.speed)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ended_by = "duration"
        self._sim_ms: int | None = None
        self._started_s = 0.0
        self._ingest_rate = _Rate()
        self._publish_rate = _Rate()
        self._log_handler: logging.Handler | None = None

    @staticmethod
    def _scenario(options: DemoOptions) -> Scenario:
        scenario = load_scenario(options.scenario)
        if options.packs is not None and options.packs < scenario.pack_count:
            scenario = scenario.scaled(options.packs)
        update: dict[str, Any] = {}
        if options.seed is not None:
            update["seed"] = options.seed
        if options.site is not None:
            update["site"] = options.site
        return scenario.model_copy(update=update) if update else scenario

    @property
    def site(self) -> str:
        """The site's identifier."""
        return self.scenario.site

    def settings(self, mqtt_url: str) -> Settings:
        """The twin's settings: the environment's, with the demo's broker, site and time windows.

        The data-quality windows are in simulated seconds; each gets a few wall-clock seconds of
        slack (times the speed) so that processing delays are not taken for stale packs.
        """
        o = self.options
        return load_settings(
            None,
            site=self.site,
            mqtt={"url": mqtt_url, "protocol": "3.1.1", "client_id": f"mgtwin-demo-{self.site}"},
            influx={"url": o.influx_url, "database": o.influx_db},
            health={"port": 0},
            publish={"interval_s": o.publish_interval_s},
            ingest={
                "stale_after_s": 30.0 + 3.0 * o.speed,
                "late_window_s": 10.0 + 2.0 * o.speed,
                "max_clock_skew_s": 300.0 + 5.0 * o.speed,
            },
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the broker, the twin, the watcher and the emulator.

        Raises:
            BrokerError: the broker cannot be started or reached.
            DatabaseError: InfluxDB cannot be reached.
        """
        o = self.options
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.FileHandler(self.run_dir / "demo.log", encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("twin").addHandler(self._log_handler)
        logging.getLogger("twin").setLevel(logging.INFO)
        try:
            url = o.mqtt_url
            if url is None:
                self.broker = EmbeddedBroker().start()
                url = self.broker.url
            self.broker_url = url
            settings = self.settings(url)
            self._check_influx(settings)
            self.service = Service(settings, clock=self.clock)
            self.clock.anchor(int(self.emulation.trace.times_ms[0]))
            self.service.start()
            self.watcher = TwinWatcher(url, self.site, client_id=f"mgtwin-demo-view-{self.site}")
            self.watcher.start()
            self.mqtt_sink = MqttSink(
                url, self.site, list(self.emulation.fleet.pack_ids), speed=o.speed, client_prefix=f"demo-{self.site}"
            )
            self.sink = TeeSink(
                [FolderSink(self.run_dir, truth=True), self.mqtt_sink], stop=self.stop_event, on_chunk=self._chunk_done
            )
        except BaseException:
            self.close()
            raise
        self._started_s = time.monotonic()
        self._thread = threading.Thread(target=self._emulate, name="mgtwin-demo-emulator", daemon=True)
        self._thread.start()

    def _check_influx(self, settings: Settings) -> None:
        if settings.influx.url is None:
            return
        from twin.io.influx import V1Writer, make_writer

        writer = make_writer(settings.influx)
        try:
            if isinstance(writer, V1Writer):
                if not writer.ping():
                    msg = f"InfluxDB at {settings.influx.url} does not answer /ping"
                    raise DatabaseError(msg)
                writer.create_database()
        finally:
            writer.close()

    def _chunk_done(self, end_ms: int) -> None:
        self._sim_ms = end_ms

    def _emulate(self) -> None:
        assert self.sink is not None
        # The emulator's pacing and the twin's clock start together: the clock was anchored at the
        # scenario's start, and the publisher paces from its first sample one step later.
        self.clock.anchor(int(self.emulation.trace.times_ms[0]))
        try:
            self.emulation.run(self.sink)
            self._ended_by = "end of the emulation"
        except _Stopped:
            pass
        except BaseException as exc:  # reported by run() in the main thread
            self._error = exc
            self._ended_by = "error"

    @property
    def running(self) -> bool:
        """Whether the emulator is still publishing."""
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> DemoSnapshot:
        """Return what the terminal view shows now."""
        now = time.monotonic()
        state, weakest, alerts, seen = self.watcher.latest() if self.watcher else (None, [], [], 0)
        stats = self.service.stats if self.service else None
        counts = stats.counts if stats else {}
        received = int(counts.get("received", 0))
        published = self.mqtt_sink.published if self.mqtt_sink else 0
        return DemoSnapshot(
            site=self.site,
            state=state,
            weakest=weakest,
            alerts=alerts,
            packs_seen=seen,
            sim_ms=self._sim_ms,
            wall_s=now - self._started_s if self._started_s else 0.0,
            duration_s=self.options.duration_s,
            speed=self.options.speed,
            received=received,
            accepted=int(counts.get("accepted", 0)),
            rejected=int(counts.get("invalid", 0)),
            ingest_rate=self._ingest_rate.update(received, now),
            published=published,
            publish_rate=self._publish_rate.update(published, now),
            behind_s=self.mqtt_sink.behind_s if self.mqtt_sink else 0.0,
            lag_ms=stats.lag_ms if stats else 0.0,
            queue_depth=self.service.link.queue.qsize() if self.service else 0,
            influx=self.options.influx_url,
        )

    def run(self, on_tick: Callable[[DemoSnapshot], None] | None = None, *, tick_s: float = 0.5) -> DemoSummary:
        """Start, run until the duration is over (or the emulation ends, or Ctrl-C), stop, summarise.

        Args:
            on_tick: called about every ``tick_s`` seconds with a snapshot (the live view).
            tick_s: the view's refresh period.

        Returns:
            The summary.

        Raises:
            TwinError: a part could not start, or the emulator failed.
        """
        self.start()
        deadline = self._started_s + self.options.duration_s
        try:
            while self.running and time.monotonic() < deadline:
                if on_tick is not None:
                    on_tick(self.snapshot())
                time.sleep(min(tick_s, max(0.0, deadline - time.monotonic())))
        except KeyboardInterrupt:
            self._ended_by = "interrupted"
        finally:
            summary = self.finish()
        if self._error is not None:
            msg = f"the emulator failed: {type(self._error).__name__}: {self._error}"
            raise DemoError(msg) from self._error
        return summary

    def finish(self) -> DemoSummary:
        """Stop the emulator, let the twin process what was published, stop everything, summarise."""
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(30)
        wall_s = time.monotonic() - self._started_s if self._started_s else 0.0
        published = self.mqtt_sink.published if self.mqtt_sink else 0
        if self.sink is not None:
            extra = {"demo": {"speed": self.options.speed, "wall_s": round(wall_s, 3), "ended_by": self._ended_by}}
            try:
                self.sink.close(run_info(self.emulation, extra))
            except (OSError, TwinError) as exc:
                log.warning("closing the emulator's sinks: %s", exc)
            self.sink = None
        self._drain()
        if self.service is not None:
            # Stop the twin first: its last state is published and written before the summary reads it.
            self.service.request_stop()
            self.service.wait(15)
            time.sleep(0.3)
        try:
            return self._summary(wall_s, published)
        finally:
            self.close()

    def _drain(self) -> None:
        """Wait until the twin has taken everything the broker delivers (bounded)."""
        service = self.service
        if service is None:
            return
        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        last, still_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            received = int(service.stats.counts.get("received", 0))
            if received != last or service.link.queue.qsize():
                last, still_since = received, time.monotonic()
            elif time.monotonic() - still_since > 1.0:
                return
            time.sleep(0.1)

    def _summary(self, wall_s: float, published: int) -> DemoSummary:
        counts = self.service.stats.counts if self.service else {}
        invalid = dict(self.service.stats.invalid) if self.service else {}
        state = self.watcher.latest()[0] if self.watcher else None
        times = self.emulation.trace.times_ms
        start_ms = int(times[0])
        sim_ms = self._sim_ms or start_ms
        return DemoSummary(
            run_dir=self.run_dir,
            site=self.site,
            packs=self.emulation.fleet.n_packs,
            speed=self.options.speed,
            wall_s=wall_s,
            simulated_s=(sim_ms - start_ms) / 1000.0,
            ended_by=self._ended_by,
            broker=getattr(self, "broker_url", ""),
            influx=self.options.influx_url,
            published=published,
            received=int(counts.get("received", 0)),
            accepted=int(counts.get("accepted", 0)),
            rejected=int(counts.get("invalid", 0)),
            duplicates=int(counts.get("duplicates", 0)),
            written_points=int(counts.get("written_points", 0)),
            states_seen=len(self.watcher.states) if self.watcher else 0,
            rejects_by_reason={str(k): int(v) for k, v in invalid.items()},
            final_state=state,
            start_ms=start_ms,
            end_ms=sim_ms,
        )

    def close(self) -> None:
        """Stop whatever was started, in reverse order (idempotent)."""
        self.stop_event.set()
        if self.mqtt_sink is not None and self.sink is not None:
            with contextlib.suppress(Exception):
                self.mqtt_sink.close({})
        self.sink = None
        service, self.service = self.service, None
        if service is not None:
            if not service.stop_event.is_set():
                service.request_stop()
            service.wait(15)
            with contextlib.suppress(Exception):
                service.close()
            if service.writer is not None:
                service.writer.close()
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                watcher.stop()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self._log_handler is not None:
            logging.getLogger("twin").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


# --------------------------------------------------------------------------- the view


def render_view(snap: DemoSnapshot) -> Any:
    """Render a snapshot as a rich renderable: site power, SoC and energy, runtime, weakest packs, alerts, ingest."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    s = snap.state or {}
    when = _iso(snap.sim_ms) if snap.sim_ms else "-"
    head = (
        f"[bold]{snap.site}[/]  simulated {when} at {snap.speed:g}x   "
        f"wall {snap.wall_s:5.0f}/{snap.duration_s:.0f} s   packs online "
        f"{s.get('packs_online', '-')}/{s.get('packs_total', '-')}  offline {s.get('packs_offline', '-')}  "
        f"excluded {s.get('packs_excluded', '-')}"
    )
    site = Table.grid(padding=(0, 2))
    site.add_column(style="dim")
    site.add_column(justify="right")
    site.add_column(style="dim")
    site.add_column(justify="right")
    site.add_row(
        "data-centre load",
        _num(s.get("load_w"), "kW", 1000),
        "SoC (P5-P95)",
        f"{_pct(s.get('soc'))} ({_pct(s.get('soc_p5'))}-{_pct(s.get('soc_p95'))})",
    )
    site.add_row(
        "solar",
        _num(s.get("solar_w"), "kW", 1000),
        "energy to floor",
        f"{_num(s.get('energy_to_floor_kwh'), 'kWh')} "
        f"({_num(s.get('energy_to_floor_kwh_p5'), '').strip()}-{_num(s.get('energy_to_floor_kwh_p95'), 'kWh')})",
    )
    site.add_row(
        "grid (import +)",
        _num(s.get("grid_w"), "kW", 1000),
        "runtime P5/P50/P95",
        " / ".join(_hours(s.get(f"runtime_s_{p}")) for p in ("p5", "p50", "p95")),
    )
    site.add_row(
        "battery (discharge +)",
        _num(s.get("battery_w"), "kW", 1000),
        "ride-through P5/P50/P95",
        " / ".join(_hours(s.get(f"ridethrough_s_{p}")) for p in ("p5", "p50", "p95")),
    )

    weak = Table("pack", "online", "SoC", "SoC (BMS)", "SoH", "SoH (BMS)", "energy to floor", box=None, pad_edge=False)
    for p in snap.weakest:
        weak.add_row(
            str(p.get("pack")),
            "yes" if p.get("online") else "[red]no[/]",
            _pct(p.get("soc")),
            _pct(p.get("soc_bms")),
            _pct(p.get("soh")),
            _pct(p.get("soh_bms")),
            _num(p.get("energy_to_floor_kwh"), "kWh", digits=1),
        )
    alerts = Table("severity", "kind", "pack", "message", box=None, pad_edge=False)
    for a in snap.alerts[:5]:
        colour = {"critical": "red", "warning": "yellow"}.get(str(a.get("severity")), "white")
        alerts.add_row(
            f"[{colour}]{a.get('severity')}[/]",
            str(a.get("kind")),
            str(a.get("pack") or "-"),
            str(a.get("message"))[:60],
        )
    ingest = (
        f"emulator {snap.published:,} msgs ({snap.publish_rate:,.0f}/s, behind {snap.behind_s:.1f} s)   "
        f"twin {snap.received:,} received ({snap.ingest_rate:,.0f}/s), {snap.accepted:,} accepted, "
        f"{snap.rejected} rejected, queue {snap.queue_depth}, lag {snap.lag_ms / 1000 / snap.speed:.1f} s wall"
        + (f"   InfluxDB {snap.influx}" if snap.influx else "")
    )
    return Group(
        Panel(site, title=head, title_align="left"),
        Panel(weak, title=f"five weakest packs (by SoH) of {snap.packs_seen}", title_align="left"),
        Panel(
            alerts if snap.alerts else "[green]no active alerts[/]",
            title=f"active alerts: {len(snap.alerts)}",
            title_align="left",
        ),
        Panel(ingest, title="ingest", title_align="left"),
    )


def progress_line(snap: DemoSnapshot) -> str:
    """One plain line for a terminal that is not interactive (logs, CI)."""
    s = snap.state or {}
    return (
        f"[{snap.wall_s:5.0f} s] sim {(_iso(snap.sim_ms) if snap.sim_ms else '-')}  SoC {_pct(s.get('soc'))}  "
        f"energy {_num(s.get('energy_to_floor_kwh'), 'kWh')}  online {s.get('packs_online', '-')}/"
        f"{s.get('packs_total', '-')}  twin {snap.received:,} msgs ({snap.ingest_rate:,.0f}/s)  "
        f"alerts {len(snap.alerts)}"
    )
