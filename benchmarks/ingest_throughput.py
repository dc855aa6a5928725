"""Ingest throughput, side by side: raw ceiling, tutorial baseline and ``mgtwin serve`` (L1/L3, P0/P1/P4).

Everything runs in one go against one Mosquitto and one InfluxDB 1.x started here on
127.0.0.1 (``tests.servers``), each pipeline into a fresh database, on the same recorded
messages. Ratios are against figures measured in the same run (the machine is noisy).

Workload (generated once into files under the work folder, then replayed byte for byte):

* ``throughput.txt``: ``--messages`` contract ``pack_telemetry`` messages (about 330 B) of
  the nevada scenario (805 packs, one message per pack per emulated second, step-major), one
  ``topic payload`` line each;
* ``realtime.txt``: ``--realtime-s`` seconds of the nevada mix: 805 telemetry + 80.5 cells
  (about 730 B) + 1 site message per second, in time order;
* ``meta.txt``: the packs' retained ``meta`` and ``status`` messages (published once, so the
  twin knows each pack's chemistry and life).

Replay. ``mosquitto_pub -l`` sends every line to one topic, and the contract needs one topic
per pack (the twin refuses a payload whose pack is not its topic's), so the messages are
replayed by a small MQTT 3.1.1 publisher on a raw socket (:class:`RawPublisher`, QoS 1, up to
20,000 messages in flight, PUBACKs counted by a reader thread). It sends pre-built PUBLISH
packets and only patches two fixed-width fields per message: the packet id and the 13
digits of ``ts_ms``, set to the wall clock at the moment of sending (per slab of at most 500
messages, strictly increasing between slabs so no pack ever gets two equal timestamps).
Unpaced it sends as fast as the broker takes it; paced it sends a slab every 10 ms. It costs
far less CPU than a paho publisher, so the pipelines, not the feeder, are measured. A
``mosquitto_pub -l`` to ``mosquitto_sub`` run on one topic (≤ 60k lines per process) is
reported beside it as a cross-check of the broker ceiling.

Pipelines:

* **P0a** ``mosquitto_sub -q 1 -C N``: rate = N / (last receipt - first publish); latency
  from each payload's ``ts_ms`` to its ``%U`` receipt time.
* **P0b** InfluxDB ``/write`` of the same points, rendered beforehand with ``twin.points`` (the
  exact bytes the twin writes: ``pack_telemetry``, 4 tags, 14 fields, one point per message)
  in 5,000-line bodies, POSTed with ``http.client`` on keep-alive connections, one and two in
  parallel; the better rate counts.
* **P1** the tutorial baseline: its own Python process, paho ``on_message`` -> ``json.loads`` ->
  one f-string line -> one synchronous POST per message (urllib3 keep-alive pool; ``requests``
  is not installed and would only be slower). Fed the first ``--baseline-messages``
  messages, unpaced; latency is measured inside it (POST returned - ``ts_ms``).
* **P4** ``mgtwin serve`` as a subprocess (default settings: batches of 5,000 messages or
  0.25 s, acks after the write), unpaced: rate = N / (last point written - first publish).
* **P4 nevada real time**: the same service fed the nevada mix paced at its real rate
  (about 886 msg/s) for ``--realtime-s`` seconds: CPU share and latency at the design load.

Measurements:

* *Loss*: the published (pack, seq) set against the one read back from InfluxDB (exact set
  comparison, per pipeline that writes); for P0a the count received.
* *Dropped*: the delta of the broker's ``$SYS/broker/publish/messages/dropped`` (``sys_interval
  1``) over each pipeline, followed by one subscriber for the whole run (:class:`DropWatch`).
* *CPU s*: user + system time of the consuming process (``/proc/<pid>/stat``, or ``wait4``
  rusage for processes that exit): mosquitto_sub, the P1 process, the serve process.
* *Latency* (P4): publish stamp (``ts_ms``, the wall clock when the message was sent) to the
  time the point is queryable in InfluxDB. A poller (:class:`Frontier`) asks InfluxDB every
  50 ms ``count(seq)`` and ``last(seq)`` of pack_telemetry stamped at or after the newest
  stamp it saw before. The path is FIFO (one publisher connection, one subscriber session,
  one worker writing its batches in order) and the stamps do not decrease in publish order,
  so the visible set is a prefix of the publish order and its length is the number of
  messages stamped before that bound plus the count. Message k is visible by the first poll
  whose prefix exceeds k; its latency is that answer's arrival time minus its stamp. The
  queries only touch what was written since the previous poll, so they stay cheap. The poll
  interval adds up to 50 ms (25 ms on average). The service's ``mgtwin_written_points_total``
  is not used: it counts one point too many per rendered body (see the report). Under
  unpaced load latency is queueing, so the < 1 s goal is judged at the nevada rate.
* *Setup*: before each serve run the packs' retained meta and status are published and the
  run waits until /metrics shows every pack (so the telemetry gets its chemistry and life tags).
  After it, the service's persistent session is discarded, so the next pipeline's messages
  do not pile up for it.
* *Other load*: the box is shared, so every run also records how many cores processes outside
  this benchmark kept busy meanwhile (:class:`LoadMeter`). P0, P1 and P4 run ``--repeats``
  times, interleaved; the row shown is the median-rate run among those with other load below
  0.15 cores (among all runs when none was that quiet), and its note lists every run.

Goals (the issue): P4 >= 10 x P1; P4 >= 40 % of the ceiling = min(P0a, P0b / points per
message); zero loss and zero broker drops at QoS 1; under a quarter of a core at the nevada
rate; p99 publish-to-InfluxDB under 1 s at the nevada rate.

``--profile`` then runs P4 twice more under :data:`PROFILE_ENTRY` (a ``python -c`` wrapper of
``mgtwin serve`` that changes nothing in ``twin``): phase timers (wall and thread CPU) around
the worker's steps and the paho callback, each thread's CPU and run-queue wait
(/proc/self/task/*/schedstat), then cProfile of the worker and network threads.

Usage: ``.venv/bin/python benchmarks/ingest_throughput.py [--messages N] [--baseline-messages N]
[--realtime-s S] [--repeats R] [--profile] [--keep]``. ``MGTWIN_*`` variables in the
environment reach the service. About 2.5 minutes with the defaults on a quiet 2-core box (30 s more
with ``--profile``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl

ROOT: Final = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, the project root is not on the path
    sys.path.insert(0, str(ROOT))

from emulators.publisher import encode_rows  # noqa: E402
from emulators.run import Emulation, EmulationOptions  # noqa: E402
from emulators.scenario import load_scenario  # noqa: E402
from tests.servers import Influxd, Mosquitto, free_port, require_binary  # noqa: E402
from twin import contract as c  # noqa: E402
from twin.pipeline import decode_batch  # noqa: E402
from twin.points import PACK_TELEMETRY, render  # noqa: E402

DEFAULT_MESSAGES: Final = 100_000
DEFAULT_BASELINE_MESSAGES: Final = 4_000
DEFAULT_REALTIME_S: Final = 40.0
DEFAULT_REPEATS: Final = 5
QUIET_CORES: Final = 0.15  # other processes busier than this spoil a run
WARMUP_S: Final = 5.0  # of the real-time run, left out of the CPU share
POLL_S: Final = 0.05
CHUNK_LINES: Final = 5000
WINDOW: Final = 20_000  # PUBLISH packets in flight (packet ids wrap at 65,535)
SLAB: Final = 500  # at most this many messages share one ts_ms; < 805 packs, so never twice one pack
TS_KEY: Final = b'"ts_ms":'
DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

GOAL_VS_BASELINE: Final = 10.0
GOAL_VS_CEILING: Final = 0.40
GOAL_CPU_SHARE: Final = 0.25
GOAL_P99_MS: Final = 1000.0


# --------------------------------------------------------------------------- workload


@dataclass
class Message:
    """One recorded message."""

    topic: str
    payload: bytes
    retain: bool = False


def _line(m: Message) -> bytes:
    return f"{'R' if m.retain else '-'} {m.topic} ".encode() + m.payload + b"\n"


def write_messages(path: Path, messages: Sequence[Message]) -> None:
    """Write messages as ``flag topic payload`` lines (payloads are one-line JSON)."""
    with path.open("wb") as fh:
        fh.writelines(_line(m) for m in messages)


def read_messages(path: Path) -> list[Message]:
    """Read what :func:`write_messages` wrote."""
    out = []
    with path.open("rb") as fh:
        for raw in fh:
            flag, topic, payload = raw.rstrip(b"\n").split(b" ", 2)
            out.append(Message(topic.decode(), payload, flag == b"R"))
    return out


@dataclass
class Workload:
    """The files of one benchmark run."""

    site: str
    packs: int
    meta: Path
    throughput: Path
    realtime: Path


def generate_workload(folder: Path, *, messages: int, realtime_s: float) -> Workload:
    """Emulate the nevada site and record the three message files."""
    sc = load_scenario("nevada").model_copy(update={"faults": ()})
    site = sc.site
    emu = Emulation(sc, EmulationOptions(duration_s=1.0, truth=False, cell_level=False))
    packs = emu.fleet.meta.height
    steps = max(-(-messages // packs), int(realtime_s))
    emu = Emulation(sc, EmulationOptions(duration_s=float(steps), chunk_s=float(steps), truth=False, cell_level=False))
    meta = [
        Message(c.topic(c.TopicKind.PACK_META, site, p), b, True)
        for p, b in zip(emu.fleet.meta["pack"], encode_rows(emu.fleet.meta, c.PackMeta), strict=True)
    ]
    status = emu.status_frame()
    meta += [
        Message(c.topic(c.TopicKind.PACK_STATUS, site, p), b, True)
        for p, b in zip(status["pack"], encode_rows(status, c.PackStatus), strict=True)
    ]
    chunk = next(iter(emu.chunks()))
    tele = chunk.telemetry.sort("ts_ms", "pack")
    tele_msgs = [
        (ts, 0, Message(c.topic(c.TopicKind.PACK_TELEMETRY, site, p), b))
        for p, ts, b in zip(tele["pack"], tele["ts_ms"], encode_rows(tele, c.PackTelemetry), strict=True)
    ]
    cells = chunk.cells.sort("ts_ms", "pack")
    cell_msgs = [
        (ts, 1, Message(c.topic(c.TopicKind.PACK_CELLS, site, p), b))
        for p, ts, b in zip(cells["pack"], cells["ts_ms"], encode_rows(cells, c.PackCells), strict=True)
    ]
    site_frame = chunk.site.with_columns(pl.lit(site).alias("site"))
    site_msgs = [
        (ts, 2, Message(c.topic(c.TopicKind.SITE_TELEMETRY, site), b))
        for ts, b in zip(site_frame["ts_ms"], encode_rows(site_frame, c.SiteTelemetry), strict=True)
    ]
    t0 = int(tele["ts_ms"].min())  # type: ignore[arg-type]
    horizon = t0 + int(realtime_s * 1000)
    mix = sorted((x for x in tele_msgs + cell_msgs + site_msgs if x[0] < horizon), key=lambda x: (x[0], x[1]))
    work = Workload(site, packs, folder / "meta.txt", folder / "throughput.txt", folder / "realtime.txt")
    write_messages(work.meta, meta)
    write_messages(work.throughput, [m for _, _, m in tele_msgs[:messages]])
    write_messages(work.realtime, [m for _, _, m in mix])
    return work


def telemetry_keys(messages: Sequence[Message]) -> set[tuple[str, int]]:
    """The (pack, seq) of every telemetry message."""
    keys = set()
    for m in messages:
        if m.topic.endswith("/telemetry") and "/packs/" in m.topic:
            d = json.loads(m.payload)
            keys.add((d["pack"], int(d["seq"])))
    return keys


# --------------------------------------------------------------------------- replay


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def _publish_packet(m: Message) -> tuple[bytes, int, int]:
    """A QoS 1 PUBLISH packet, the offset of its packet id and of its ``ts_ms`` digits (-1: none)."""
    topic = m.topic.encode()
    head = bytes([0x32 | (1 if m.retain else 0)]) + _varint(2 + len(topic) + 2 + len(m.payload))
    mid_at = len(head) + 2 + len(topic)
    packet = head + len(topic).to_bytes(2, "big") + topic + b"\0\0" + m.payload
    k = m.payload.find(TS_KEY)
    ts_at = -1
    if k >= 0:
        ts_at = mid_at + 2 + k + len(TS_KEY)
        if not packet[ts_at : ts_at + 13].isdigit() or packet[ts_at + 13 : ts_at + 14].isdigit():
            msg = f"ts_ms is not 13 digits in {m.payload[:120]!r}"
            raise ValueError(msg)
    return packet, mid_at, ts_at


@dataclass
class Sent:
    """What a replay sent: each message's ``ts_ms`` and the wall time of the first and last slab."""

    ts_ms: np.ndarray
    first_ms: int
    last_ms: int


class RawPublisher:
    """A minimal MQTT 3.1.1 QoS 1 publisher on a raw socket (see the module docstring).

    Args:
        port: the broker's port on 127.0.0.1.
        client_id: the client id (clean session).
    """

    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        body = b"\0\x04MQTT\x04\x02\0\0" + len(cid).to_bytes(2, "big") + cid  # clean session, no keepalive
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            msg = f"broker refused the publisher: {connack!r}"
            raise RuntimeError(msg)
        self.sock.settimeout(None)
        self.acked = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="puback-reader", daemon=True)
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                msg = "broker closed the connection"
                raise RuntimeError(msg)
            data += more
        return data

    def _read(self) -> None:
        buf = bytearray()
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += data
            i, acks = 0, 0
            while len(buf) - i >= 2:
                j, length, mult = i + 1, 0, 1
                while j < len(buf):
                    length += (buf[j] & 127) * mult
                    mult *= 128
                    j += 1
                    if buf[j - 1] < 128:
                        break
                else:
                    break
                if j + length > len(buf) or buf[j - 1] >= 128:
                    break
                if buf[i] >> 4 == 4:  # PUBACK
                    acks += 1
                i = j + length
            del buf[:i]
            if acks:
                with self._cond:
                    self.acked += acks
                    self._cond.notify_all()

    def publish(self, messages: Sequence[Message], *, rate_per_s: float | None = None, patch_ts: bool = True) -> Sent:
        """Send every message at QoS 1 and wait for all PUBACKs.

        Args:
            messages: what to send, in order.
            rate_per_s: pace to this rate (a slab every 10 ms); None sends as fast as possible.
            patch_ts: overwrite each payload's ``ts_ms`` with the wall clock at sending.

        Returns:
            The ``ts_ms`` each message carried and the wall times of the first and last slab.
        """
        built = [_publish_packet(m) for m in messages]
        blob = bytearray(b"".join(p for p, _, _ in built))
        starts = np.zeros(len(built) + 1, dtype=np.int64)
        np.cumsum([len(p) for p, _, _ in built], out=starts[1:])
        mid_at = [s + a for s, (_, a, _) in zip(starts.tolist(), built, strict=False)]
        ts_at = [s + t if t >= 0 else -1 for s, (_, _, t) in zip(starts.tolist(), built, strict=False)]
        ts_out = np.zeros(len(built), dtype=np.int64)
        view = memoryview(blob)
        slab = SLAB if rate_per_s is None else max(1, min(SLAB, round(rate_per_s / 100)))
        base = self.acked
        prev_ts = 0
        t0 = time.monotonic()
        first_ms = last_ms = 0
        for a in range(0, len(built), slab):
            b = min(a + slab, len(built))
            if rate_per_s is not None:
                due = t0 + a / rate_per_s
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            with self._cond:
                while a - (self.acked - base) > WINDOW:
                    self._cond.wait(1.0)
            now_ms = max(time.time_ns() // 1_000_000, prev_ts + 1)
            prev_ts = now_ms
            stamp = str(now_ms).encode()
            for k in range(a, b):
                mid = k % 65535 + 1
                blob[mid_at[k]] = mid >> 8
                blob[mid_at[k] + 1] = mid & 0xFF
                if patch_ts and ts_at[k] >= 0:
                    blob[ts_at[k] : ts_at[k] + 13] = stamp
            ts_out[a:b] = now_ms
            first_ms = first_ms or now_ms
            last_ms = now_ms
            self.sock.sendall(view[starts[a] : starts[b]])
        if not patch_ts:
            ts_out[:] = [json.loads(m.payload).get("ts_ms", 0) if TS_KEY in m.payload else 0 for m in messages]
        deadline = time.monotonic() + 120
        with self._cond:
            while self.acked - base < len(built) and time.monotonic() < deadline:
                self._cond.wait(0.5)
        if self.acked - base < len(built):
            msg = f"only {self.acked - base} of {len(built)} PUBACKs within 120 s"
            raise RuntimeError(msg)
        return Sent(ts_out, first_ms, last_ms)

    def close(self) -> None:
        """Send DISCONNECT and close."""
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)


def forget_session(broker: Mosquitto, client_id: str) -> None:
    """Discard a client's persistent session (connect with its id and a clean session).

    Otherwise the broker keeps queueing, for the stopped service, what the next pipeline
    publishes on the same topics, and the next service run would start with that backlog.
    """
    RawPublisher(broker.port, client_id).close()


def replay(
    broker: Mosquitto, messages: Sequence[Message], *, rate_per_s: float | None = None, patch_ts: bool = True
) -> Sent:
    """Publish through a fresh :class:`RawPublisher` connection."""
    pub = RawPublisher(broker.port, f"replay-{time.monotonic_ns()}")
    try:
        return pub.publish(messages, rate_per_s=rate_per_s, patch_ts=patch_ts)
    finally:
        pub.close()


# --------------------------------------------------------------------------- probes


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class LoadMeter:
    """How many cores processes outside this benchmark kept busy over a window (the box is shared).

    Busy time of the whole machine (/proc/stat) minus the CPU time of this process, its reaped
    children and its live descendants (broker, influxd, the service, the clients).
    """

    def __init__(self) -> None:
        self._start = self._snap()

    @staticmethod
    def _snap() -> tuple[float, float, float]:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        parents: dict[int, int] = {}
        used: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
            used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        me = os.getpid()
        for pid, cpu in used.items():
            parent = parents.get(pid, 0)
            while parent > 1 and parent != me:
                parent = parents.get(parent, 0)
            if parent == me:
                own += cpu
        return time.monotonic(), busy, own

    def foreign_cores(self) -> float:
        """Cores busy with other processes since construction."""
        t1, busy1, own1 = self._snap()
        t0, busy0, own0 = self._start
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-6))


def reap(proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    """Wait for a child to exit; return its user + system CPU seconds (wait4 rusage)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return float(usage.ru_utime + usage.ru_stime)
        time.sleep(0.02)
    proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    msg = f"{proc.args!r} did not finish within {timeout_s:.0f} s"
    raise TimeoutError(msg)


class DropWatch:
    """Follow the broker's dropped-messages counter from its start.

    ``$SYS`` figures are retained but published with a 60 s message expiry, and only when they
    change: a subscriber that arrives a minute after the last change gets nothing. So one
    ``mosquitto_sub`` follows the topic for the whole benchmark, from the broker's first
    publication, and the latest value it printed is the counter.
    """

    def __init__(self, broker: Mosquitto, folder: Path) -> None:
        self.path = folder / "dropped.txt"
        with self.path.open("wb") as out:
            self.proc = subprocess.Popen(
                [require_binary("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(broker.port), "-t", DROPPED_TOPIC],
                stdout=out,
            )
        deadline = time.monotonic() + 5
        while self.value() is None and time.monotonic() < deadline:
            time.sleep(0.1)

    def value(self) -> int | None:
        """The latest value seen (None: none yet)."""
        lines = self.path.read_bytes().split()
        return int(lines[-1]) if lines else None

    def delta(self, before: int | None) -> int | None:
        """The change since ``before``, once the $SYS figures have been refreshed (``sys_interval 1``)."""
        time.sleep(1.2)
        now = self.value()
        return None if now is None or before is None else now - before

    def stop(self) -> None:
        """End the subscriber."""
        self.proc.terminate()
        self.proc.wait(5)


def count(influx: Influxd, db: str, measurement: str, field_name: str) -> int:
    """``SELECT count(field)`` of a measurement (0 when empty)."""
    series = influx.query(f'SELECT count("{field_name}") FROM "{measurement}"', db=db)["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


def stored_telemetry(influx: Influxd, db: str) -> set[tuple[str, int]]:
    """The (pack, seq) of every pack_telemetry point."""
    answer = influx.query("SELECT seq FROM pack_telemetry GROUP BY pack", db=db)
    keys: set[tuple[str, int]] = set()
    for s in answer["results"][0].get("series", []):
        keys.update((s["tags"]["pack"], int(v[1])) for v in s["values"])
    return keys


def percentiles(values: np.ndarray) -> tuple[float, float]:
    """p50 and p99 in ms (NaN when empty)."""
    if values.size == 0:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One pipeline's figures."""

    name: str
    messages: int
    seconds: float
    points_per_message: float = 1.0
    loss: int | None = 0
    dropped: int | None = 0
    cpu_s: float | None = None
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    foreign_cores: float = float("nan")  # other processes' load on the box during the run

    @property
    def rate(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Bench:
    """The servers and files every pipeline shares."""

    broker: Mosquitto
    influx: Influxd
    drops: DropWatch
    work: Workload
    folder: Path


# --------------------------------------------------------------------------- P0


def run_p0a(b: Bench, messages: list[Message]) -> Result:
    """mosquitto_sub at QoS 1 receiving the replayed telemetry."""
    n = len(messages)
    out_path = b.folder / "p0a.out"
    before = b.drops.value()
    with out_path.open("wb") as out:
        sub = subprocess.Popen(
            [
                require_binary("mosquitto_sub"),
                "-h",
                "127.0.0.1",
                "-p",
                str(b.broker.port),
                "-q",
                "1",
                "-C",
                str(n),
                "-i",
                f"p0a-{os.getpid()}",
                "-t",
                c.subscription(c.TopicKind.PACK_TELEMETRY, b.work.site),
                "-F",
                "%U %p",
            ],
            stdout=out,
        )
    time.sleep(1.0)  # let it connect and subscribe
    sent = replay(b.broker, messages)
    cpu = reap(sub, 120)
    received_s, ts_ms = [], []
    ts_rx = re.compile(rb'"ts_ms":(\d{13})')
    with out_path.open("rb") as fh:
        for line in fh:
            stamp, _, payload = line.partition(b" ")
            received_s.append(float(stamp))
            hit = ts_rx.search(payload)
            ts_ms.append(int(hit.group(1)) if hit else 0)
    got = len(received_s)
    lat = np.array(received_s) * 1000 - np.array(ts_ms)
    p50, p99 = percentiles(lat)
    seconds = max(received_s) - sent.first_ms / 1000 if received_s else float("nan")
    return Result(
        "P0a mosquitto_sub",
        got,
        seconds,
        loss=n - got,
        dropped=b.drops.delta(before),
        cpu_s=cpu,
        p50_ms=p50,
        p99_ms=p99,
        note="raw socket replay",
    )


def run_p0a_tool(b: Bench, messages: list[Message]) -> Result:
    """Cross-check: ``mosquitto_pub -l -q 1`` into ``mosquitto_sub -q 1`` on one topic (≤ 60k lines)."""
    payloads = [m.payload for m in messages[:60_000]]
    n = len(payloads)
    src = b.folder / "p0a_tool.jsonl"
    src.write_bytes(b"\n".join(payloads) + b"\n")
    topic = "bench/p0a/tool"
    before = b.drops.value()
    sub = subprocess.Popen(
        [
            require_binary("mosquitto_sub"),
            "-h",
            "127.0.0.1",
            "-p",
            str(b.broker.port),
            "-q",
            "1",
            "-C",
            str(n),
            "-t",
            topic,
            "-F",
            "%U",
        ],
        stdout=subprocess.PIPE,
    )
    time.sleep(1.0)
    started = time.time()
    with src.open("rb") as fh:
        pub = subprocess.run(
            [
                require_binary("mosquitto_pub"),
                "-h",
                "127.0.0.1",
                "-p",
                str(b.broker.port),
                "-q",
                "1",
                "-l",
                "-t",
                topic,
            ],
            stdin=fh,
            check=False,
            timeout=120,
        )
    try:
        out, _ = sub.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        sub.kill()
        out, _ = sub.communicate()
    stamps = [float(x) for x in out.split()]
    seconds = (max(stamps) - started) if stamps else float("nan")
    return Result(
        "P0a' mosquitto_pub -l",
        len(stamps),
        seconds,
        loss=n - len(stamps),
        dropped=b.drops.delta(before),
        note=f"one topic; pub rc {pub.returncode}",
    )


def _post_chunks(url: str, db: str, chunks: Sequence[bytes]) -> None:
    parts = url.split("//", 1)[1]
    host, port = parts.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for body in chunks:
            conn.request("POST", f"/write?db={db}&precision=ms", body=body)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 204:
                msg = f"/write answered {resp.status}"
                raise RuntimeError(msg)
    finally:
        conn.close()


def render_points(work: Workload, messages: list[Message], meta: list[Message]) -> list[bytes]:
    """The exact line protocol the twin writes for these messages (with their recorded ts_ms)."""
    decoded = decode_batch([m.topic for m in messages], [m.payload for m in messages], site=work.site)
    meta_dec = decode_batch([m.topic for m in meta], [m.payload for m in meta], site=work.site)
    tags = meta_dec.meta.select("pack", "chemistry", "life")
    frame = decoded.telemetry.join(tags, on="pack", how="left", maintain_order="left")
    lines = render(frame, PACK_TELEMETRY, extra_tags={"site": work.site}).body.split(b"\n")
    return [b"\n".join(lines[i : i + CHUNK_LINES]) for i in range(0, len(lines), CHUNK_LINES)]


def run_p0b(influx: Influxd, chunks: list[bytes], points: int, rep: int = 0) -> tuple[Result, Result]:
    """Bulk /write of pre-rendered 5,000-line bodies, on one and on two connections."""
    results = []
    for conns in (1, 2):
        db = f"p0b_{conns}_{rep}"
        influx.query(f'CREATE DATABASE "{db}"')
        cpu0 = cpu_s(influx.proc.pid) if influx.proc else 0.0
        started = time.perf_counter()
        threads = [threading.Thread(target=_post_chunks, args=(influx.url, db, chunks[i::conns])) for i in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        cpu1 = cpu_s(influx.proc.pid) if influx.proc else 0.0
        stored = count(influx, db, "pack_telemetry", "seq")
        results.append(
            Result(
                f"P0b /write x{conns}",
                points,
                seconds,
                loss=points - stored,
                dropped=None,
                cpu_s=cpu1 - cpu0,
                note="CPU s: influxd",
            )
        )
    return results[0], results[1]


# --------------------------------------------------------------------------- P1

P1_SCRIPT: Final = r"""
import json, sys, time
import paho.mqtt.client as mqtt
import urllib3
from paho.mqtt.enums import CallbackAPIVersion

port, topic, url, db, site, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
http = urllib3.PoolManager(maxsize=1)
write_url = f"{url}/write?db={db}&precision=ms"
done_ms, ts_ms, errors = [], [], [0]


def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    return repr(v)


def on_message(client, userdata, msg):
    d = json.loads(msg.payload)
    fields = ",".join(f"{k}={value(v)}" for k, v in d.items() if k not in ("schema", "pack", "ts_ms"))
    line = f"pack_telemetry,pack={d['pack']},site={site} {fields} {d['ts_ms']}"
    r = http.request("POST", write_url, body=line.encode())
    if r.status != 204:
        errors[0] += 1
    done_ms.append(time.time_ns() // 1_000_000)
    ts_ms.append(d["ts_ms"])
    if len(done_ms) >= n:
        client.disconnect()


def on_subscribe(client, userdata, mid, reason_codes, properties):
    print("ready", flush=True)


client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tutorial-baseline")
client.on_message = on_message
client.on_subscribe = on_subscribe
client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
client.connect("127.0.0.1", port)
client.loop_forever()
print(json.dumps({"done_ms": done_ms, "ts_ms": ts_ms, "errors": errors[0]}), flush=True)
"""


def run_p1(b: Bench, messages: list[Message], rep: int = 0) -> Result:
    """The tutorial baseline in its own process."""
    n = len(messages)
    db = f"p1_tutorial_{rep}"
    b.influx.query(f'CREATE DATABASE "{db}"')
    before = b.drops.value()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            P1_SCRIPT,
            str(b.broker.port),
            c.subscription(c.TopicKind.PACK_TELEMETRY, b.work.site),
            b.influx.url,
            db,
            b.work.site,
            str(n),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    if ready.strip() != b"ready":
        proc.kill()
        msg = f"the baseline did not start: {ready!r} {proc.stderr.read() if proc.stderr else b''!r}"
        raise RuntimeError(msg)
    sent = replay(b.broker, messages)
    deadline = time.monotonic() + 60 + n / 200
    result_holder: list[bytes] = []
    reader = threading.Thread(target=lambda: result_holder.append(proc.stdout.read() if proc.stdout else b""))
    reader.start()
    cpu = reap(proc, max(1.0, deadline - time.monotonic()))
    reader.join(10)
    out_line = result_holder[0] if result_holder else b""
    data = json.loads(out_line)
    done = np.array(data["done_ms"], dtype=np.int64)
    lat = done - np.array(data["ts_ms"], dtype=np.int64)
    p50, p99 = percentiles(lat)
    stored = stored_telemetry(b.influx, db)
    loss = len(telemetry_keys(messages) - stored)
    seconds = (int(done.max()) - sent.first_ms) / 1000
    return Result(
        "P1 tutorial (paho+POST/msg)",
        len(done),
        seconds,
        loss=loss,
        dropped=b.drops.delta(before),
        cpu_s=cpu,
        p50_ms=p50,
        p99_ms=p99,
        note=f"errors {data['errors']}; latency under backlog",
    )


# --------------------------------------------------------------------------- P4


class Frontier:
    """Poll InfluxDB for how far into the publish order pack_telemetry is visible (see the module docstring).

    Every ``POLL_S`` it asks ``count(seq)`` and ``last(seq)`` of the points stamped at or after
    ``since`` (the newest visible stamp of the previous poll), and records the answer with the
    time the answer arrived and, optionally, the CPU seconds of a process. The queries only
    touch what was written since the previous poll, so they stay cheap as the data grows.
    """

    def __init__(self, influx: Influxd, db: str, since_ms: int, pid: int | None = None) -> None:
        self.influx, self.db, self.pid = influx, db, pid
        self.since_ms = since_ms
        self.samples: list[tuple[int, int, int, float]] = []  # answered at ms, since ms, count, cpu s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="frontier", daemon=True)

    def start(self) -> Frontier:
        """Start polling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            since = self.since_ms
            q = (
                f"SELECT count(seq) FROM pack_telemetry WHERE time >= {since}ms; "
                f"SELECT last(seq) FROM pack_telemetry WHERE time >= {since}ms"
            )
            with contextlib.suppress(OSError, ValueError, KeyError):
                answer = self.influx.query(q, db=self.db)["results"]
                now_ms = time.time_ns() // 1_000_000
                cpu = cpu_s(self.pid) if self.pid else 0.0
                n = answer[0]["series"][0]["values"][0][1] if answer[0].get("series") else 0
                self.samples.append((now_ms, since, int(n), cpu))
                if answer[1].get("series"):
                    self.since_ms = int(answer[1]["series"][0]["values"][0][0])
            self._stop.wait(POLL_S)

    def visible(self, ts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Poll times and, at each, how many messages (in publish order, stamps ``ts_ms``) were visible."""
        t = np.array([s[0] for s in self.samples], dtype=np.int64)
        since = np.array([s[1] for s in self.samples], dtype=np.int64)
        n = np.array([s[2] for s in self.samples], dtype=np.int64)
        prefix = np.searchsorted(ts_ms, since, side="left") + n
        return t, np.maximum.accumulate(prefix) if prefix.size else prefix

    def wait_for(self, ts_ms: np.ndarray, timeout_s: float) -> bool:
        """Wait until every message is visible (give up when nothing moves for 20 s)."""
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            _, prefix = self.visible(ts_ms)
            now = int(prefix[-1]) if prefix.size else 0
            if now >= ts_ms.size:
                return True
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > 20:
                return False
            time.sleep(POLL_S)
        return False

    def latencies(self, ts_ms: np.ndarray) -> tuple[np.ndarray, int]:
        """Per-message latency in ms (publish stamp to first poll that saw it) and the time the last one was seen."""
        t, prefix = self.visible(ts_ms)
        idx = np.searchsorted(prefix, np.arange(1, ts_ms.size + 1), side="left")
        ok = idx < t.size
        done = int(t[idx[-1]]) if ok.size and ok[-1] else int(t[-1])
        return (t[idx[ok]] - ts_ms[ok]).astype(np.float64), done

    def cpu_between(self, start_ms: int, end_ms: int) -> tuple[float, float]:
        """CPU seconds used and wall seconds elapsed between the samples nearest two times."""
        t = np.array([s[0] for s in self.samples], dtype=np.int64)
        cpu = np.array([s[3] for s in self.samples])
        i0 = min(int(np.searchsorted(t, start_ms)), t.size - 1)
        i1 = max(int(np.searchsorted(t, end_ms, side="right")) - 1, i0)
        return float(cpu[i1] - cpu[i0]), float(t[i1] - t[i0]) / 1000


class Serve:
    """``mgtwin serve`` in its own process."""

    def __init__(self, broker: Mosquitto, influx: Influxd, db: str, site: str, log: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "MGTWIN_SITE": site,
            "MGTWIN_MQTT__URL": broker.url,
            "MGTWIN_INFLUX__URL": influx.url,
            "MGTWIN_INFLUX__DATABASE": db,
            "MGTWIN_HEALTH__PORT": str(self.port),
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The service's process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, argv: Sequence[str] | None = None) -> Serve:
        """Start the service (``argv`` defaults to ``python -m twin.cli serve``) and wait until it is connected."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                list(argv or [sys.executable, "-m", "twin.cli", "serve"]),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"serve exited: {self.log.read_text()[-2000:]}"
                raise RuntimeError(msg)
            with contextlib.suppress(OSError, ValueError):
                if self.metrics().get("mgtwin_mqtt_connected") == 1.0:
                    return self
            time.sleep(0.1)
        msg = f"serve did not come up: {self.log.read_text()[-2000:]}"
        raise RuntimeError(msg)

    def metrics(self) -> dict[str, float]:
        """The /metrics figures by name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def _prepare_serve(b: Bench, db: str, setup: list[Message], name: str, argv: Sequence[str] | None = None) -> Serve:
    """Start serve on a fresh database, give it the packs' retained meta and status, wait until it has digested them.

    Digested: the estimators know every pack (``mgtwin_packs_estimated``), which includes
    placing them on their aging curves (about 2 s for nevada), the service's start-up.
    """
    b.influx.query(f'CREATE DATABASE "{db}"')
    serve = Serve(b.broker, b.influx, db, b.work.site, b.folder / f"serve-{name}.log").start(argv)
    replay(b.broker, setup, patch_ts=False)
    deadline = time.monotonic() + 30
    while serve.metrics().get("mgtwin_packs_estimated", 0) < b.work.packs and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # a worker error right after start (see the report) sleeps the worker 0.5 s
    return serve


def _telemetry_stamps(messages: Sequence[Message], sent: Sent) -> np.ndarray:
    mask = np.array([m.topic.endswith("/telemetry") and "/packs/" in m.topic for m in messages])
    return np.asarray(sent.ts_ms[mask], dtype=np.int64)


def run_p4(
    b: Bench, messages: list[Message], setup: list[Message], argv: Sequence[str] | None = None, rep: int = 0
) -> Result:
    """``mgtwin serve`` fed as fast as the broker takes it."""
    n = len(messages)
    db = f"p4_serve_{rep}"
    serve = _prepare_serve(b, db, setup, f"max{rep}", argv)
    try:
        errors0 = serve.metrics().get("mgtwin_worker_errors_total", 0.0)
        before = b.drops.value()
        start_ms = time.time_ns() // 1_000_000
        frontier = Frontier(b.influx, db, start_ms, serve.pid).start()
        cpu0 = cpu_s(serve.pid)
        sent = replay(b.broker, messages)
        stamps = _telemetry_stamps(messages, sent)
        frontier.wait_for(stamps, 60 + n / 500)
        frontier.stop()
        lat, done_ms = frontier.latencies(stamps)
        serve_cpu, _ = frontier.cpu_between(start_ms, done_ms)
        p50, p99 = percentiles(lat)
        loss = len(telemetry_keys(messages) - stored_telemetry(b.influx, db))
        m = serve.metrics()
        result = Result(
            "P4 mgtwin serve",
            n - loss,
            (done_ms - sent.first_ms) / 1000,
            loss=loss,
            dropped=b.drops.delta(before),
            cpu_s=serve_cpu or cpu_s(serve.pid) - cpu0,
            p50_ms=p50,
            p99_ms=p99,
            note="latency under backlog",
            extra={
                "written_points_total": m.get("mgtwin_written_points_total", 0.0),
                "received_total": m.get("mgtwin_received_total", 0.0),
                "worker_errors": m.get("mgtwin_worker_errors_total", 0.0) - errors0,
            },
        )
    finally:
        rc = serve.stop()
        forget_session(b.broker, f"mgtwin-{b.work.site}")
    result.note += f"; exit {rc}; /metrics written_points_total {result.extra['written_points_total']:,.0f}"
    result.note += f"; worker errors {result.extra['worker_errors']:.0f}"
    return result


def run_realtime(b: Bench, messages: list[Message], setup: list[Message], seconds: float) -> Result:
    """``mgtwin serve`` fed the nevada mix at its real rate."""
    n = len(messages)
    rate = n / seconds
    db = "p4_realtime"
    serve = _prepare_serve(b, db, setup, "realtime")
    try:
        errors0 = serve.metrics().get("mgtwin_worker_errors_total", 0.0)
        before = b.drops.value()
        start_ms = time.time_ns() // 1_000_000
        frontier = Frontier(b.influx, db, start_ms, serve.pid).start()
        sent = replay(b.broker, messages, rate_per_s=rate)
        stamps = _telemetry_stamps(messages, sent)
        frontier.wait_for(stamps, 60)
        time.sleep(1.0)  # cells and site points of the last batch
        frontier.stop()
        lat, done_ms = frontier.latencies(stamps)
        p50, p99 = percentiles(lat)
        used, wall = frontier.cpu_between(sent.first_ms + int(WARMUP_S * 1000), sent.last_ms)
        share = used / wall if wall > 0 else float("nan")
        total_cpu, _ = frontier.cpu_between(sent.first_ms, done_ms)
        loss = len(telemetry_keys(messages) - stored_telemetry(b.influx, db))
        cells = sum(1 for m in messages if m.topic.endswith("/cells"))
        cell_loss = cells - count(b.influx, db, "pack_cells", "seq")
        m = serve.metrics()
        result = Result(
            "P4 serve, nevada real time",
            n,
            (done_ms - sent.first_ms) / 1000,
            loss=loss + cell_loss,
            dropped=b.drops.delta(before),
            cpu_s=total_cpu,
            p50_ms=p50,
            p99_ms=p99,
            note=f"paced {rate:.0f} msg/s; CPU {100 * share:.1f} % of a core over {wall:.0f} s; latency of telemetry",
            extra={
                "cpu share": share,
                "rate": rate,
                "cpu window s": wall,
                "worker_errors": m.get("mgtwin_worker_errors_total", 0.0) - errors0,
            },
        )
    finally:
        rc = serve.stop()
        forget_session(b.broker, f"mgtwin-{b.work.site}")
    result.note += f"; exit {rc}"
    return result


# --------------------------------------------------------------------------- profiling

PROFILE_ENTRY: Final = r'''
"""`mgtwin serve` with phase timers, per-thread CPU and run-queue waits, and optionally cProfile."""
import atexit, cProfile, json, os, sys, threading, time
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import twin.app as app

out, use_cprofile = Path(sys.argv[1]), sys.argv[2] == "1"
phase, calls, tids, seen = defaultdict(float), defaultdict(int), {}, {}


def timed(owner, name, label):
    orig = getattr(owner, name)

    def wrapper(*a, **k):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return orig(*a, **k)
        finally:
            phase[label] += time.perf_counter() - t
            phase[label + " [thread CPU]"] += time.thread_time() - c
            calls[label] += 1

    setattr(owner, name, wrapper)


for owner, name, label in [
    (app, "decode_batch", "worker: decode_batch"), (app.TwinCore, "ingest", "worker: TwinCore.ingest"),
    (app.Service, "_render_batch", "worker: render"), (app.Service, "_write", "worker: write (POST)"),
    (app.MqttLink, "ack", "worker: ack"), (app.MqttLink, "take", "worker: take (wait + get)"),
    (app.Service, "_maybe_publish_state", "worker: publish state"), (app.Service, "process", "worker: process"),
    (app.MqttLink, "_on_message", "network: on_message"),
]:
    timed(owner, name, label)


def traced(fn, name):
    def run(*a, **k):
        tids[threading.get_native_id()] = name
        if not use_cprofile:
            return fn(*a, **k)
        prof = cProfile.Profile()
        prof.enable()
        try:
            return fn(*a, **k)
        finally:
            prof.disable()
            prof.dump_stats(str(out / f"{name}.prof"))
    return run


app.Service._run = traced(app.Service._run, "worker")
mqtt.Client._thread_main = traced(mqtt.Client._thread_main, "network")


def sample():
    while True:
        for tid in os.listdir("/proc/self/task"):
            try:
                cpu_ns, wait_ns, _ = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()
            except (OSError, ValueError):
                continue
            seen[int(tid)] = (int(cpu_ns) / 1e9, int(wait_ns) / 1e9)
        time.sleep(0.2)


threading.Thread(target=sample, daemon=True).start()


def dump():
    threads = defaultdict(lambda: [0.0, 0.0])
    for tid, (cpu, wait) in seen.items():
        name = tids.get(tid) or ("main" if tid == os.getpid() else "other (polars pool, health)")
        threads[name][0] += cpu
        threads[name][1] += wait
    (out / "phases.json").write_text(json.dumps({"phase_s": phase, "calls": calls, "threads": threads}, indent=1))


atexit.register(dump)
from twin.cli import main

sys.argv = ["mgtwin", "serve"]
main()
'''


def run_profiled(b: Bench, messages: list[Message], setup: list[Message], *, cprofile: bool) -> dict[str, Any]:
    """Run P4 once under :data:`PROFILE_ENTRY`; print and return where the service's time went."""
    out = b.folder / ("profile-cprofile" if cprofile else "profile")
    out.mkdir(exist_ok=True)
    argv = [sys.executable, "-c", PROFILE_ENTRY, str(out), "1" if cprofile else "0"]
    result = run_p4(b, messages, setup, argv=argv, rep=90 + int(cprofile))
    data = json.loads((out / "phases.json").read_text())
    label = "with cProfile (slower)" if cprofile else "phase timers only"
    print(f"\nprofile of P4, {label}: {result.rate:,.0f} msg/s over {result.seconds:.2f} s ({out})")
    print(f"  {'phase':<40} {'wall s':>7} {'thread CPU s':>12} {'calls':>8}")
    for name, wall in sorted(data["phase_s"].items()):
        if not name.endswith("[thread CPU]"):
            cpu = data["phase_s"].get(name + " [thread CPU]", 0.0)
            print(f"  {name:<40} {wall:7.2f} {cpu:12.2f} {data['calls'].get(name, 0):8,}")
    print(f"  {'thread':<40} {'CPU s':>7} {'run-queue wait s':>16}")
    for name, (cpu, wait) in sorted(data["threads"].items()):
        print(f"  {name:<40} {cpu:7.2f} {wait:16.2f}")
    if cprofile:
        import pstats

        for name in ("worker", "network"):
            path = out / f"{name}.prof"
            if path.exists():
                print(f"\n  cProfile, {name} thread, top 15 by cumulative time:")
                pstats.Stats(str(path), stream=sys.stdout).sort_stats("cumulative").print_stats(15)
    return {"profile msg/s": round(result.rate, 1), **{f"profile {k}": round(v, 3) for k, v in data["phase_s"].items()}}


# --------------------------------------------------------------------------- report


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores are busy over ``seconds`` (from /proc/stat): anything else running skews the figures."""

    def snap() -> tuple[int, int]:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values[:8]), idle

    total0, idle0 = snap()
    time.sleep(seconds)
    total1, idle1 = snap()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(rows: Sequence[Result], baseline: float, ceiling: float) -> None:
    """Print the side-by-side table."""
    head: tuple[str, ...] = ("pipeline", "messages", "seconds", "msg/s", "points/s", "loss", "dropped", "CPU s")
    head += ("p50 ms", "p99 ms", "vs P1", "vs ceiling", "other load")
    body = [
        (
            r.name,
            _fmt(r.messages),
            _fmt(r.seconds, ".2f"),
            _fmt(r.rate),
            _fmt(r.rate * r.points_per_message),
            _fmt(r.loss),
            _fmt(r.dropped),
            _fmt(r.cpu_s, ".2f"),
            _fmt(r.p50_ms),
            _fmt(r.p99_ms),
            _fmt(r.rate / baseline, ".1f") + "x",
            _fmt(100 * r.rate / ceiling, ".0f") + " %",
            _fmt(r.foreign_cores, ".2f"),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths), *body]:
        print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths, strict=True))))
    for r in rows:
        if r.note:
            print(f"  {r.name}: {r.note}")


def median_run(results: Sequence[Result]) -> Result:
    """The median-rate run among the quiet ones (other load < QUIET_CORES), or among all if none was quiet.

    Its note gets every run's rate and the load other processes put on the box meanwhile.
    """
    quiet = [r for r in results if r.foreign_cores < QUIET_CORES] or list(results)
    ordered = sorted(quiet, key=lambda r: r.rate)
    mid = ordered[(len(ordered) - 1) // 2]
    if len(results) > 1:
        rates = ", ".join(f"{r.rate:,.0f} ({r.foreign_cores:.2f})" for r in results)
        which = "quiet runs" if len(quiet) < len(results) else "runs"
        mid.note = f"median of {len(ordered)} {which}; msg/s (other load, cores) of all runs: {rates}; " + mid.note
        mid.loss = max((r.loss or 0) for r in results)  # loss and drops of any run count
        mid.dropped = None if any(r.dropped is None for r in results) else max(r.dropped or 0 for r in results)
    return mid


def report(rows: Sequence[Result], figures: dict[str, Any]) -> dict[str, Any]:
    """Print the table and the goals; add the figures to ``figures`` and return it."""
    by = {r.name: r for r in rows}
    p0a, p0b1, p0b2 = by["P0a mosquitto_sub"], by["P0b /write x1"], by["P0b /write x2"]
    p1, p4, rt = by["P1 tutorial (paho+POST/msg)"], by["P4 mgtwin serve"], by["P4 serve, nevada real time"]
    p0b = max(p0b1.rate, p0b2.rate)
    ceiling = min(p0a.rate, p0b / p4.points_per_message)
    print()
    print_table(rows, p1.rate, ceiling)
    share = rt.extra["cpu share"]
    goals = [
        (
            f"P4 >= {GOAL_VS_BASELINE:g} x P1",
            p4.rate >= GOAL_VS_BASELINE * p1.rate,
            f"{p4.rate:,.0f} vs {p1.rate:,.0f} msg/s = {p4.rate / p1.rate:.1f}x",
        ),
        (
            f"P4 >= {100 * GOAL_VS_CEILING:.0f} % of ceiling",
            p4.rate >= GOAL_VS_CEILING * ceiling,
            f"{p4.rate:,.0f} vs ceiling {ceiling:,.0f} msg/s = {100 * p4.rate / ceiling:.0f} %",
        ),
        (
            "zero loss at QoS 1",
            p4.loss == 0 and rt.loss == 0 and p4.dropped == 0 and rt.dropped == 0,
            f"loss {p4.loss} + {rt.loss}, dropped {p4.dropped} + {rt.dropped} (every P4 run)",
        ),
        (
            f"CPU at nevada rate < {100 * GOAL_CPU_SHARE:.0f} % of a core",
            share < GOAL_CPU_SHARE,
            f"{100 * share:.1f} % at {rt.extra['rate']:.0f} msg/s",
        ),
        (
            f"p99 ts -> InfluxDB < {GOAL_P99_MS:g} ms (nevada rate)",
            rt.p99_ms < GOAL_P99_MS,
            f"p50 {rt.p50_ms:.0f} ms, p99 {rt.p99_ms:.0f} ms",
        ),
    ]
    print(f"\nceiling = min(P0a {p0a.rate:,.0f} msg/s, P0b {p0b:,.0f} points/s / {p4.points_per_message:g} point/msg)")
    print("goals:")
    for name, ok, detail in goals:
        print(f"  {'PASS' if ok else 'MISS'}  {name}: {detail}")
    for r in rows:
        figures[f"{r.name} msg/s"] = round(r.rate, 1)
        figures[f"{r.name} loss"] = r.loss
        if not np.isnan(r.p99_ms):
            figures[f"{r.name} p99 ms"] = round(r.p99_ms, 1)
    figures.update(
        {
            "ceiling msg/s": round(ceiling, 1),
            "P4 / P1": round(p4.rate / p1.rate, 2),
            "P4 / ceiling": round(p4.rate / ceiling, 3),
            "P4 dropped": p4.dropped,
            "realtime cpu share": round(share, 4),
            "realtime p50 ms": round(rt.p50_ms, 1),
            "goals passed": f"{sum(ok for _, ok, _ in goals)}/{len(goals)}",
        }
    )
    figures.update({f"goal: {name}": "PASS" if ok else "MISS" for name, ok, _ in goals})
    return figures


def measure(
    bench: Bench,
    tele: list[Message],
    mix: list[Message],
    meta: list[Message],
    chunks: list[bytes],
    *,
    baseline_messages: int,
    realtime_s: float,
    repeats: int,
) -> list[Result]:
    """Run P0a, P0b, P1 and P4 ``repeats`` times, interleaved, then the real-time run; one row per pipeline."""
    runs: dict[str, list[Result]] = {}
    influx = bench.influx

    def add(result: Result | tuple[Result, ...]) -> None:
        for r in result if isinstance(result, tuple) else (result,):
            runs.setdefault(r.name, []).append(r)

    for rep in range(repeats):
        steps: list[tuple[str, Callable[[], Result | tuple[Result, ...]]]] = [
            ("P0a", lambda: run_p0a(bench, tele)),
            ("P0b", lambda: run_p0b(influx, chunks, len(tele), rep)),  # noqa: B023 - called at once
            ("P1", lambda: run_p1(bench, tele[:baseline_messages], rep)),  # noqa: B023
            ("P4", lambda: run_p4(bench, tele, meta, rep=rep)),  # noqa: B023
        ]
        if rep == 0:
            steps.insert(1, ("P0a'", lambda: run_p0a_tool(bench, tele)))
        for step, fn in steps:
            t = time.perf_counter()
            meter = LoadMeter()
            out = fn()
            foreign = meter.foreign_cores()
            for r in out if isinstance(out, tuple) else (out,):
                r.foreign_cores = foreign
            add(out)
            print(f"  run {rep + 1}/{repeats} {step}: {time.perf_counter() - t:.1f} s, other load {foreign:.2f} cores")
    t = time.perf_counter()
    meter = LoadMeter()
    realtime = run_realtime(bench, mix, meta, realtime_s)
    realtime.foreign_cores = meter.foreign_cores()
    add(realtime)
    print(f"  P4 real time: {time.perf_counter() - t:.1f} s, other load {realtime.foreign_cores:.2f} cores")
    return [median_run(results) for results in runs.values()]


def run(
    *,
    messages: int,
    baseline_messages: int,
    realtime_s: float,
    repeats: int = 3,
    profile: bool = False,
    keep: bool = False,
) -> dict[str, Any]:
    """Run every pipeline (the fast ones ``repeats`` times, interleaved) and return the figures."""
    load = busy_cores()
    print(f"background load before starting: {load:.2f} of {os.cpu_count()} cores busy")
    if load > QUIET_CORES:
        print("  WARNING: something else is using the CPU; every figure below is depressed by it")
    folder = Path(tempfile.mkdtemp(prefix="mgtwin-ingest-bench-"))
    broker = Mosquitto(workdir=folder / "mosquitto", extra_conf="sys_interval 1")
    influx = Influxd(workdir=folder / "influxd")
    drops: DropWatch | None = None
    figures: dict[str, Any] = {"background load cores": round(load, 2)}
    try:
        t = time.perf_counter()
        work = generate_workload(folder, messages=messages, realtime_s=realtime_s)
        tele, mix, meta = read_messages(work.throughput), read_messages(work.realtime), read_messages(work.meta)
        chunks = render_points(work, tele, meta)
        size = sum(len(m.payload) for m in tele) / len(tele)
        print(
            f"workload: {len(tele):,} telemetry messages (mean {size:.0f} B), {len(mix):,} real-time messages over "
            f"{realtime_s:g} s, {work.packs} packs; {time.perf_counter() - t:.1f} s"
        )
        broker.start()
        drops = DropWatch(broker, folder)
        influx.start()
        bench = Bench(broker, influx, drops, work, folder)

        rows = measure(
            bench, tele, mix, meta, chunks, baseline_messages=baseline_messages, realtime_s=realtime_s, repeats=repeats
        )
        if profile:
            figures.update(run_profiled(bench, tele, meta, cprofile=False))
            run_profiled(bench, tele, meta, cprofile=True)
    finally:
        if drops is not None:
            drops.stop()
        broker.stop()
        influx.stop()
        if keep or profile:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return report(rows, figures)


def main(argv: Sequence[str] = ()) -> dict[str, Any]:
    """Parse the arguments (none: the defaults), run, print the table and goals; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help="telemetry messages for P0 and P4")
    parser.add_argument("--baseline-messages", type=int, default=DEFAULT_BASELINE_MESSAGES, help="messages for P1")
    parser.add_argument("--realtime-s", type=float, default=DEFAULT_REALTIME_S, help="seconds at the nevada rate")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="runs of P0, P1 and P4 (median)")
    parser.add_argument("--profile", action="store_true", help="then profile P4 (phase timers, then cProfile)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, files)")
    args = parser.parse_args(list(argv))
    return run(
        messages=args.messages,
        baseline_messages=min(args.baseline_messages, args.messages),
        realtime_s=args.realtime_s,
        repeats=max(1, args.repeats),
        profile=args.profile,
        keep=args.keep,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
