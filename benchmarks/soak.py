"""Soak: the nevada site in real time for an hour, with faults injected at random (L4, and F1-F8 again).

Everything runs on 127.0.0.1 under a temporary folder: a Mosquitto (persistence on,
``sys_interval 1``), an InfluxDB 1.x, and ``mgtwin serve`` as its own process (so its memory
is its own). The feed is the nevada mix recorded once from the emulator (805 packs, one
telemetry message per pack per second, cells every 10 s, the site meter; about 886 msg/s),
replayed in real time in laps: each lap adds the lap's length to every ``seq`` and stamps
``ts_ms`` with the wall clock, so every (pack, seq) is new. The publisher is a paho client
with a persistent session (QoS 1): what it publishes while the broker is down is sent when it
is back, and a message counts as published once the broker acknowledged it.

Faults, one at a time, at random intervals (``--fault-every`` seconds on average; every kind
once in random order, then again), each held for a bounded time, then given up to
``--recovery`` seconds to recover (``/healthz`` ok and a point published after the fault
stored: the path is FIFO, so the backlog went through):

* ``influx_down``: SIGTERM influxd, restart it on the same data after 5-30 s (F1);
* ``influx_hang``: SIGSTOP influxd for 5-20 s, then SIGCONT (F2);
* ``broker_restart``: SIGTERM Mosquitto, restart it after 1-5 s on the same port and
  persistence file (F7);
* ``broker_freeze``: SIGSTOP Mosquitto for 2-3 keepalives (10 s here), then SIGCONT (F8);
* ``twin_kill``: SIGKILL the twin, start it again after 0-3 s (F5);
* ``twin_term``: SIGTERM the twin (it must exit 0 within its deadline), start it again (F6).

Figures (printed as a table, and returned by :func:`main`):

* loss: per pack, the acknowledged seqs against ``count(distinct(seq))``, ``min`` and ``max``
  of ``pack_telemetry`` (zero loss: every acknowledged seq stored); duplicates visible:
  ``count(seq) - count(distinct(seq))`` (a message stored under two series);
* the broker's ``$SYS/broker/publish/messages/dropped`` delta;
* memory: the twin's RSS every 5 s; growth after warm-up, per twin process that ran long
  enough (a restart starts a new process: its RSS starts again), from the median of the first
  minute after warm-up to the median of the last minute; the pass mark is 10 %;
* every fault and its recovery time; the twin's CPU share.

Usage: ``python benchmarks/soak.py`` (one hour), ``--duration 10m`` for a short run, ``--seed``
for another fault sequence. ``benchmarks/run_all.py`` calls :func:`main` without arguments,
which runs 10 minutes (say so in its table) so that ``make bench`` stays bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, the project root is not on the path
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from benchmarks.ingest_throughput import Message, generate_workload, read_messages  # noqa: E402
from tests.servers import Influxd, Mosquitto, free_port  # noqa: E402

FAULTS: Final = ("influx_down", "influx_hang", "broker_restart", "broker_freeze", "twin_kill", "twin_term")
KEEPALIVE_S: Final = 5
_SEQ: Final = re.compile(rb'"seq":(\d+)')
_TS: Final = re.compile(rb'"ts_ms":(\d{13})')
_PACK: Final = re.compile(rb'"pack":"([A-Za-z0-9_-]+)"')


def parse_duration(text: str) -> float:
    """``1h``, ``10m``, ``90s`` or seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


# --------------------------------------------------------------------------- the feed


@dataclass
class Lap:
    """One recorded stretch of the nevada mix, by second."""

    seconds: list[list[Message]]
    length_s: int


def record(folder: Path, seconds: int) -> tuple[list[Message], Lap, int]:
    """Record the mix once; return the retained meta and status, the lap, and the number of packs."""
    work = generate_workload(folder, messages=1, realtime_s=float(seconds))
    meta = read_messages(work.meta)
    mix = read_messages(work.realtime)
    stamps = [int(m.group(1)) for m in (_TS.search(x.payload) for x in mix) if m]
    t0 = min(stamps)
    by_second: list[list[Message]] = [[] for _ in range(seconds)]
    for message in mix:
        found = _TS.search(message.payload)
        if found is None:
            continue
        k = (int(found.group(1)) - t0) // 1000
        if 0 <= k < seconds:
            by_second[k].append(message)
    return meta, Lap(by_second, seconds), work.packs


class Feed:
    """Replay laps in real time with paho (persistent session, QoS 1); record what the broker acknowledged."""

    def __init__(self, port: int, lap: Lap, duration_s: float) -> None:
        self.lap = lap
        self.duration_s = duration_s
        self.acked: dict[str, set[int]] = defaultdict(set)
        self.published = 0
        self.acks = 0
        self._pending: dict[int, tuple[str, int] | None] = {}
        self._early: set[int] = set()  # acknowledged before publish() returned its mid to us
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-feed", clean_session=False)
        self.client.max_inflight_messages_set(2000)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=KEEPALIVE_S * 2)
        self.client.loop_start()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-feed", daemon=True)

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        # paho calls this holding its own message lock: take ours only briefly, never call paho under it.
        with self._lock:
            self.acks += 1
            if mid not in self._pending:
                self._early.add(mid)
                return
            key = self._pending.pop(mid)
            if key is not None:
                self.acked[key[0]].add(key[1])

    def publish_now(self, messages: Sequence[Message]) -> None:
        """Publish (retained meta and status) and wait for the acknowledgements."""
        infos = [self.client.publish(m.topic, m.payload, qos=1, retain=m.retain) for m in messages]
        for info in infos:
            info.wait_for_publish(60)

    def _run(self) -> None:
        started = time.monotonic()
        second = 0
        while time.monotonic() - started < self.duration_s:
            lap, k = divmod(second, self.lap.length_s)
            now_ms = time.time_ns() // 1_000_000
            stamp = b"%013d" % now_ms
            offset = lap * self.lap.length_s
            for message in self.lap.seconds[k]:
                payload = _SEQ.sub(lambda m, o=offset: b'"seq":%d' % (int(m.group(1)) + o), message.payload)
                payload = _TS.sub(b'"ts_ms":' + stamp, payload, count=1)
                key = None
                if message.topic.endswith("/telemetry") and "/packs/" in message.topic:
                    pack = _PACK.search(payload)
                    seq = _SEQ.search(payload)
                    if pack and seq:
                        key = (pack.group(1).decode(), int(seq.group(1)))
                info = self.client.publish(message.topic, payload, qos=1)
                with self._lock:
                    self.published += 1
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                        if key is not None:
                            self.acked[key[0]].add(key[1])
                    else:
                        self._pending[info.mid] = key
            second += 1
            time.sleep(max(0.0, started + second - time.monotonic()))
        self.done.set()

    def settle(self, timeout_s: float) -> int:
        """Wait until every published message is acknowledged; return how many are not."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return 0
            time.sleep(0.5)
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------- the twin


class Twin:
    """``mgtwin serve`` in its own process, restartable; its RSS sampled by the soak."""

    def __init__(self, folder: Path, site: str, broker: Mosquitto, influx: Influxd, db: str) -> None:
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MGTWIN_")},
            "MGTWIN_SITE": site,
            "MGTWIN_MQTT__URL": broker.url,
            "MGTWIN_MQTT__KEEPALIVE_S": str(KEEPALIVE_S),
            "MGTWIN_MQTT__LOCK_DIR": str(folder / "locks"),
            "MGTWIN_INFLUX__URL": influx.url,
            "MGTWIN_INFLUX__DATABASE": db,
            "MGTWIN_INFLUX__TIMEOUT_S": "5",
            "MGTWIN_INFLUX__RETRY_MAX_S": "5",
            "MGTWIN_HEALTH__PORT": str(self.port),
        }
        self.log = folder / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.cpu_s = 0.0
        self.exits: list[int] = []

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twin.cli", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.incarnation += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"serve exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                raise RuntimeError(msg)
            with contextlib.suppress(OSError):
                self.health()
                return
            time.sleep(0.2)
        msg = "serve did not come up"
        raise RuntimeError(msg)

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=3) as resp:
                return dict(json.load(resp))
        except urllib.error.HTTPError as exc:
            return dict(json.load(exc))

    def _account(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(self.proc.pid).cpu_times()
                self.cpu_s += times.user + times.system

    def stop(self, sig: signal.Signals, timeout_s: float = 30) -> int:
        assert self.proc is not None
        self._account()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.exits.append(code)
        return code

    def rss(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.Error:
            return None


# --------------------------------------------------------------------------- faults


@dataclass
class FaultRecord:
    kind: str
    at_s: float
    held_s: float
    recovered_s: float | None
    note: str = ""


@dataclass
class Soak:
    folder: Path
    broker: Mosquitto
    influx: Influxd
    twin: Twin
    rng: random.Random
    recovery_s: float
    started: float = field(default_factory=time.monotonic)
    faults: list[FaultRecord] = field(default_factory=list)

    def recovered(self, timeout_s: float) -> float | None:
        """Seconds until /healthz is ok and InfluxDB holds telemetry stamped after the fault ended, or None.

        The path is FIFO, so a point published after the fault means the backlog went through.
        """
        t0 = time.monotonic()
        after_ms = time.time_ns() // 1_000_000 + 1000
        while time.monotonic() - t0 < timeout_s:
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                health = self.twin.health()
                answer = self.influx.query('SELECT last("seq") FROM "pack_telemetry"', db="soak")
                newest_ms = int(answer["results"][0]["series"][0]["values"][0][0])
                if health.get("status") == "ok" and newest_ms >= after_ms:
                    return time.monotonic() - t0
            time.sleep(0.25)
        return None

    def inject(self, kind: str) -> None:
        at = time.monotonic() - self.started
        held = 0.0
        note = ""
        if kind == "influx_down":
            held = self.rng.uniform(5, 30)
            self.influx.stop()
            time.sleep(held)
            self.influx.start()
        elif kind == "influx_hang":
            held = self.rng.uniform(5, 20)
            self.influx.signal(signal.SIGSTOP)
            time.sleep(held)
            self.influx.signal(signal.SIGCONT)
        elif kind == "broker_restart":
            held = self.rng.uniform(1, 5)
            self.broker.stop()
            time.sleep(held)
            self.broker.start()
        elif kind == "broker_freeze":
            held = 2.0 * KEEPALIVE_S
            self.broker.signal(signal.SIGSTOP)
            time.sleep(held)
            self.broker.signal(signal.SIGCONT)
        elif kind == "twin_kill":
            held = self.rng.uniform(0, 3)
            self.twin.stop(signal.SIGKILL)
            time.sleep(held)
            self.twin.start()
        elif kind == "twin_term":
            t0 = time.monotonic()
            code = self.twin.stop(signal.SIGTERM)
            held = time.monotonic() - t0
            note = f"exit {code}"
            self.twin.start()
        recovered = self.recovered(self.recovery_s)
        self.faults.append(FaultRecord(kind, at, held, recovered, note))
        outcome = f"recovered in {recovered:.1f} s" if recovered is not None else "NOT RECOVERED"
        print(f"  {at:7.0f} s  {kind:<15} held {held:5.1f} s  {outcome} {note}", flush=True)


# --------------------------------------------------------------------------- figures


def stored_per_pack(influx: Influxd, db: str) -> dict[str, tuple[int, int, int, int]]:
    """Per pack: count(seq), count(distinct(seq)), min(seq), max(seq) of pack_telemetry."""
    out = {}
    q = 'SELECT count("seq"), count(distinct("seq")), min("seq"), max("seq") FROM "pack_telemetry" GROUP BY "pack"'
    answer = influx.query(q, db=db)
    for series in answer["results"][0].get("series", []):
        _, n, distinct, low, high = series["values"][0]
        out[series["tags"]["pack"]] = (int(n), int(distinct), int(low), int(high))
    return out


def loss_and_duplicates(acked: dict[str, set[int]], stored: dict[str, tuple[int, int, int, int]]) -> tuple[int, int]:
    lost = duplicates = 0
    for pack, seqs in acked.items():
        n, distinct, low, high = stored.get(pack, (0, 0, -1, -1))
        contiguous = not seqs or max(seqs) - min(seqs) + 1 == len(seqs)
        if contiguous and seqs and (low, high) == (min(seqs), max(seqs)):
            lost += len(seqs) - distinct
        else:  # not the simple case: be pessimistic, count what is not certainly there
            lost += max(0, len(seqs) - distinct) + (0 if (low, high) == (min(seqs), max(seqs)) else 1)
        duplicates += n - distinct
    return lost, duplicates


def memory_growth(samples: list[tuple[float, int, int]], warmup_s: float) -> list[tuple[int, float, float, float]]:
    """Per twin process that ran long enough: (incarnation, minutes observed, start MB, growth %)."""
    out = []
    by_run: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for t, run, rss in samples:
        by_run[run].append((t, rss))
    for run, points in by_run.items():
        t_first = points[0][0]
        after = [(t, r) for t, r in points if t - t_first >= warmup_s]
        if not after or after[-1][0] - after[0][0] < 180:
            continue
        first = [r for t, r in after if t - after[0][0] < 60]
        last = [r for t, r in after if after[-1][0] - t < 60]
        start, end = statistics.median(first), statistics.median(last)
        out.append((run, (after[-1][0] - after[0][0]) / 60, start / 1e6, 100 * (end - start) / start))
    return out


class DropWatch:
    """The broker's $SYS dropped counter, followed across broker restarts."""

    def __init__(self, port: int) -> None:
        self.total = 0
        self._last: int | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-drops")
        self.client.reconnect_delay_set(1, 2)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_a: c.subscribe("$SYS/broker/publish/messages/dropped")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        value = int(msg.payload)
        if self._last is not None and value >= self._last:
            self.total += value - self._last
        elif self._last is not None:  # the broker restarted
            self.total += value
        self._last = value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------- main


def run(duration_s: float, *, seed: int, fault_every_s: float, warmup_s: float, recovery_s: float) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="mgtwin-soak-"))
    rng = random.Random(seed)
    print(
        f"soak: {duration_s / 60:.0f} min, faults every ~{fault_every_s:.0f} s (seed {seed}), in {folder}", flush=True
    )
    meta, lap, packs = record(folder, seconds=int(min(300, max(60, duration_s / 10))))
    print(f"  recorded a {lap.length_s} s lap of the nevada mix: {sum(map(len, lap.seconds)) / lap.length_s:.0f} msg/s")
    broker = Mosquitto(workdir=folder / "broker", sys_interval=1).start()
    influx = Influxd(workdir=folder / "influx").start()
    db = "soak"
    influx.query(f'CREATE DATABASE "{db}"')
    site = re.sub(r".*microgrid/([^/]+)/.*", r"\1", meta[0].topic)
    twin = Twin(folder, site, broker, influx, db)
    drops = DropWatch(broker.port)
    feed: Feed | None = None
    samples: list[tuple[float, int, int]] = []
    stop_sampling = threading.Event()
    try:
        twin.start()
        feed = Feed(broker.port, lap, duration_s)
        feed.publish_now(meta)
        soak = Soak(folder, broker, influx, twin, rng, recovery_s)

        def sample() -> None:
            while not stop_sampling.wait(5):
                rss = twin.rss()
                if rss is not None:
                    samples.append((time.monotonic() - soak.started, twin.incarnation, rss))

        sampler = threading.Thread(target=sample, name="soak-rss", daemon=True)
        sampler.start()
        feed.thread.start()
        next_fault = soak.started + warmup_s + rng.uniform(0.5, 1.5) * fault_every_s
        bag: list[str] = []  # every kind once, in random order, then again: a short run still sees each
        while not feed.done.is_set():
            if time.monotonic() >= next_fault and time.monotonic() - soak.started < duration_s - recovery_s:
                if not bag:
                    bag = rng.sample(FAULTS, len(FAULTS))
                soak.inject(bag.pop())
                next_fault = time.monotonic() + rng.uniform(0.5, 1.5) * fault_every_s
            time.sleep(0.5)
        unacked = feed.settle(120)
        deadline = time.monotonic() + 300
        expected = sum(len(s) for s in feed.acked.values())
        stored: dict[str, tuple[int, int, int, int]] = {}
        while time.monotonic() < deadline:
            stored = stored_per_pack(influx, db)
            if sum(d for _, d, _, _ in stored.values()) >= expected:
                break
            time.sleep(2)
        lost, duplicates = loss_and_duplicates(feed.acked, stored)
        stop_sampling.set()
        twin.stop(signal.SIGTERM)
        growth = memory_growth(samples, warmup_s)
        wall = time.monotonic() - soak.started
        figures: dict[str, Any] = {
            "duration_min": round(duration_s / 60, 1),
            "packs": packs,
            "published_msgs": feed.published,
            "rate_msg_s": round(feed.published / duration_s),
            "telemetry_acked": expected,
            "unacked_by_broker": unacked,
            "lost": lost,
            "duplicates_visible": duplicates,
            "broker_dropped": drops.total,
            "faults": len(soak.faults),
            "faults_recovered": sum(f.recovered_s is not None for f in soak.faults),
            "recovery_max_s": round(max((f.recovered_s or 0.0) for f in soak.faults), 1) if soak.faults else 0.0,
            "twin_exits_on_sigterm": [f.note for f in soak.faults if f.kind == "twin_term"],
            "twin_cpu_share": round(twin.cpu_s / wall, 3),
            "rss_growth_pct": {f"run {r} ({m:.0f} min from {mb:.0f} MB)": round(g, 1) for r, m, mb, g in growth},
        }
        ok = (
            lost == 0
            and duplicates == 0
            and unacked == 0
            and figures["faults_recovered"] == figures["faults"]
            and all(note == "exit 0" for note in figures["twin_exits_on_sigterm"])
            and all(g < 10 for *_, g in growth)
        )
        figures["pass"] = ok
        print_table(figures, soak.faults)
        return figures
    finally:
        stop_sampling.set()
        if feed is not None:
            feed.close()
        drops.close()
        if twin.proc is not None and twin.proc.poll() is None:
            twin.proc.kill()
            twin.proc.wait(10)
        broker.stop()
        influx.stop()


def print_table(figures: dict[str, Any], faults: list[FaultRecord]) -> None:
    print("\nfaults:")
    print(f"  {'at s':>7}  {'fault':<15} {'held s':>6}  {'recovered s':>11}  note")
    for f in faults:
        rec = f"{f.recovered_s:.1f}" if f.recovered_s is not None else "NO"
        print(f"  {f.at_s:7.0f}  {f.kind:<15} {f.held_s:6.1f}  {rec:>11}  {f.note}")
    print("\nfigures:")
    for key, value in figures.items():
        if isinstance(value, dict):
            for k, v in value.items():
                print(f"  {key}: {k:<34} {v}")
        else:
            print(f"  {key:<40} {value}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the soak; without arguments (``run_all.py``) 10 minutes, from the command line one hour."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", default="1h" if argv is not None else "10m")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--fault-every", type=float, default=180.0, help="mean seconds between faults")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: 10 %% of the run, <= 5 min)")
    parser.add_argument("--recovery", type=float, default=120.0, help="seconds a fault may take to recover")
    args = parser.parse_args(list(argv or []))
    duration_s = parse_duration(args.duration)
    warmup_s = args.warmup if args.warmup is not None else min(300.0, 0.1 * duration_s)
    return run(duration_s, seed=args.seed, fault_every_s=args.fault_every, warmup_s=warmup_s, recovery_s=args.recovery)


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(0 if result["pass"] else 1)
