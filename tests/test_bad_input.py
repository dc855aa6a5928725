"""Bad input refused (INGEST_NOTES 4.3, B1-B7): never a crash or a stall, each counted by reason and dead-lettered.

Coverage (the whole map is in tests/test_faults.py):

* B1-B5, B7 through the real stack: ``test_bad_input_through_the_real_stack``;
* B1 throughput of valid traffic: ``test_one_bad_message_does_not_slow_its_batch``;
* B2, B3 property-based on the service's output: ``test_no_input_breaks_the_line_protocol``;
* B4 at the broker and at the twin: ``test_b4_oversize_refused_by_the_broker_and_by_the_twin``;
* B6: ``test_b6_cardinality_bomb_is_capped``.
"""

from __future__ import annotations

import json
import queue
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.ingest_kit import (
    Feed,
    Message,
    assert_no_loss_no_duplicates,
    fleet,
    keys,
    mqtt_client,
    now_ms,
    random_packs,
    running,
    settings_for,
    stored_rows,
    telemetry,
    wait_until,
)
from tests.servers import Influxd, Mosquitto
from twin import contract as c
from twin.app import Service
from twin.config import Settings
from twin.io.influx import WriteOutcome
from twin.io.mqtt import Inbound, MqttLink
from twin.points import MEASUREMENTS

ROOT = Path(__file__).resolve().parent.parent
IDENTIFIER = re.compile(c.IDENTIFIER_PATTERN)


# --------------------------------------------------------------------------- helpers


class MemoryWriter:
    """A writer that keeps every body (and answers 204)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def write(self, body: bytes) -> WriteOutcome:
        self.bodies.append(body)
        return WriteOutcome("ok", http_status=204)

    def close(self) -> None:
        return

    def lines(self) -> list[str]:
        return [line for body in self.bodies for line in body.decode().split("\n") if line]


class OfflineLink(MqttLink):
    """An MQTT link that never connects: keeps what would be published and counts acks."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.mqtt, site=settings.site, client_id="offline", queue_max=10)
        self.sent: list[tuple[str, bytes]] = []

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, expiry_s: int | None = None
    ) -> mqtt.MQTTMessageInfo | None:
        del retain, expiry_s
        self.sent.append((topic, payload))
        return None

    def ack(self, messages: Any) -> None:
        self.counters["acked"] += len(messages)


def offline_service(site: str, tmp_path: Path, **sections: dict[str, Any]) -> tuple[Service, MemoryWriter]:
    """A service fed by hand through ``process`` (no broker, no database)."""
    settings = settings_for(site, "mqtt://127.0.0.1:1", tmp_path, **sections)
    writer = MemoryWriter()
    return Service(settings, writer=writer, link=OfflineLink(settings)), writer


def inbound(messages: list[tuple[str, bytes]]) -> list[Inbound]:
    return [Inbound(t, p, mid=i + 1, qos=1, received_s=0.0) for i, (t, p) in enumerate(messages)]


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, str], int]:
    """Parse one line of line protocol strictly (escapes included); raise ValueError if malformed."""

    def take(text: str, i: int, stops: str, *, quoted: bool = False) -> tuple[str, int]:
        out = []
        in_quotes = False
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text):
                out.append(text[i : i + 2])
                i += 2
                continue
            if quoted and ch == '"':
                in_quotes = not in_quotes
            elif ch in stops and not in_quotes:
                break
            out.append(ch)
            i += 1
        if in_quotes:
            msg = f"unterminated string in {line!r}"
            raise ValueError(msg)
        return "".join(out), i

    measurement, i = take(line, 0, ", ")
    tags: dict[str, str] = {}
    while i < len(line) and line[i] == ",":
        pair, i = take(line, i + 1, ", ")
        key, eq, value = pair.partition("=")
        if not eq or not key or not value or "=" in value.replace("\\=", ""):
            msg = f"bad tag {pair!r} in {line!r}"
            raise ValueError(msg)
        tags[key] = value
    if i >= len(line) or line[i] != " ":
        msg = f"no fields in {line!r}"
        raise ValueError(msg)
    field_text, i = take(line, i + 1, " ", quoted=True)
    fields: dict[str, str] = {}
    for part in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', field_text):
        key, eq, value = part.partition("=")
        ok = re.fullmatch(r'-?\d+i|-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[tTfF]|true|false|TRUE|FALSE|".*"', value, re.S)
        if not eq or not key or ok is None:
            msg = f"bad field {part!r} in {line!r}"
            raise ValueError(msg)
        fields[key] = value
    rest = line[i + 1 :]
    if not re.fullmatch(r"-?\d+", rest):
        msg = f"bad timestamp {rest!r} in {line!r}"
        raise ValueError(msg)
    return measurement, tags, fields, int(rest)


# --------------------------------------------------------------------------- through the real stack


def _bad_messages(site: str, base_ms: int) -> list[tuple[Message, str]]:
    """One message per kind of bad input, with the reason it must be refused for."""
    tele = c.topic(c.TopicKind.PACK_TELEMETRY, site, "P0001")
    good = telemetry(site, "P0001", 9000, base_ms)[1]
    data = json.loads(good)

    def with_(**changes: Any) -> bytes:
        return json.dumps({**data, **changes}).encode()

    def without(key: str) -> bytes:
        return json.dumps({k: v for k, v in data.items() if k != key}).encode()

    root = f"microgrid/{site}"
    cases: list[tuple[str, bytes, str]] = [
        # B1
        (tele, good[: len(good) // 2], "not_json"),
        (tele, b"", "not_json"),
        (tele, bytes(random.Random(1).randrange(256) for _ in range(300)), "not_json"),
        (tele, b"{not json", "not_json"),
        (tele, b"[1, 2, 3]", "not_object"),
        # B2
        (tele, with_(voltage_v="370.1"), "wrong_type"),
        (tele, without("current_a"), "missing_field"),
        (tele, with_(firmware="1.2"), "extra_field"),
        (tele, re.sub(rb'"current_a":[-0-9.]+', b'"current_a":NaN', good), "not_finite"),
        (tele, re.sub(rb'"current_a":[-0-9.]+', b'"current_a":-Infinity', good), "not_finite"),
        # B3: identifiers that would break line protocol, deep or odd topics. (Control characters
        # in a topic never reach the twin: Mosquitto disconnects the publisher; the property test
        # below feeds them to the service directly.)
        (f"{root}/packs/P1 x=1,evil=2/telemetry", good, "bad_identifier"),
        (f'{root}/packs/P"1/telemetry', good, "bad_identifier"),
        (f"{root}/packs/P0001/telemetry/a/b/c/d/e/f/g", good, "not_delivered"),  # no subscription matches
        (tele, with_(pack="P0001,evil=1"), "bad_identifier"),
        (tele, with_(pack="P0002"), "pack_mismatch"),
        # B4 (the twin's own limit; the broker's is B4's own test)
        (tele, good[:-1] + b',"pad":"' + b"x" * (c.MAX_PAYLOAD_BYTES + 10) + b'"}', "oversize"),
        # B5: timestamps far ahead, in seconds, in nanoseconds, and a taken (pack, ts_ms)
        (tele, with_(ts_ms=now_ms() + 86_400_000, seq=9001), "clock_skew"),
        (tele, with_(ts_ms=base_ms // 1000, seq=9002), "out_of_range"),
        (tele, with_(ts_ms=base_ms * 1_000_000, seq=9003), "out_of_range"),
        (tele, with_(seq=9004), "ts_collision"),
    ]
    return [(Message(t, p), reason) for t, p, reason in cases]


def test_bad_input_through_the_real_stack(
    mosquitto: Mosquitto, influxd: Influxd, influx_db: str, tmp_path: Path, unique_site: str
) -> None:
    """B1-B5, B7: every bad message refused with its reason, dead-lettered and acked; valid traffic untouched.

    Out-of-order samples are accepted (and written at their own time); the same message sent
    100 times more (B7) is written once and counted as 100 duplicates, and a copy with other
    values does not change what is stored.
    """
    site = unique_site
    base = now_ms() - 200_000
    valid = fleet(site, packs=4, steps=60, start_ms=base)
    rng = random.Random(7)
    shuffled = valid[:120] + rng.sample(valid[120:], len(valid) - 120)  # the second half out of order
    first = Message(*telemetry(site, "P0001", 9000, base + 10_500), pack="P0001", seq=9000)
    bad = _bad_messages(site, base + 10_500)
    replay = [first] * 100 + [Message(*telemetry(site, "P0001", 9000, base + 10_500, voltage_v=1.0))]
    stream: list[Message] = [*shuffled[:60], first]
    for k, (message, _) in enumerate(bad):  # each bad message between valid ones
        stream += [message, *shuffled[60 + 3 * k : 63 + 3 * k]]
    stream += shuffled[60 + 3 * len(bad) : 120] + replay + shuffled[120:]
    assert keys(stream) == keys(valid) | {("P0001", 9000)}
    expected_reasons = Counter(reason for _, reason in bad if reason != "not_delivered")
    delivered = len(stream) - sum(reason == "not_delivered" for _, reason in bad)

    letters: queue.Queue[bytes] = queue.Queue()
    watcher = mqtt_client(mosquitto.port, f"dl-{site}"[:60])
    watcher.on_message = lambda _c, _u, m: letters.put(bytes(m.payload))
    subscribed = threading.Event()
    watcher.on_subscribe = lambda *_a: subscribed.set()
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.loop_start()
    watcher.subscribe(c.topic(c.TopicKind.TWIN_DEADLETTER, site), qos=1)
    assert subscribed.wait(5)
    try:
        settings = settings_for(site, mosquitto, tmp_path, influx_url=influxd.url, database=influx_db)
        with running(Service(settings)) as service:
            Feed(mosquitto.port, stream).start().join()
            assert_no_loss_no_duplicates(influxd, influx_db, keys(valid) | {("P0001", 9000)}, timeout_s=20)
            assert wait_until(lambda: service.link.counters["acked"] == delivered, 10)  # nothing stalls
            metrics = service.metrics()
            got = Counter(
                {
                    k[len('invalid_total{reason="') : -2]: int(v)
                    for k, v in metrics.items()
                    if k.startswith("invalid_total{")
                }
            )
            assert got == expected_reasons
            assert metrics["duplicates_total"] == 101  # 100 copies and the copy with other values
            assert metrics.get("influx_rejected_points_total", 0) == 0  # never a 400 for a batch
            reasons: list[str] = []
            while len(reasons) < expected_reasons.total():
                reasons.append(json.loads(letters.get(timeout=10))["reason"])
            assert Counter(reasons) == expected_reasons
        # Only the valid points exist: no line or series was injected, and the replay changed nothing.
        assert sorted(set(stored_rows(influxd, influx_db))) == sorted(keys(valid) | {("P0001", 9000)})
        answer = influxd.query('SHOW SERIES FROM "pack_telemetry"', db=influx_db)
        series = [v[0] for v in answer["results"][0]["series"][0]["values"]]
        assert len(series) == 4, series
        value = influxd.query("SELECT voltage_v FROM pack_telemetry WHERE pack = 'P0001' AND seq = 9000", db=influx_db)[
            "results"
        ][0]["series"][0]["values"]
        assert value[0][1] == pytest.approx(370.0)  # the first copy's value, not the later copy's 1.0
        measurements = influxd.query("SHOW MEASUREMENTS", db=influx_db)["results"][0]["series"][0]["values"]
        assert {m[0] for m in measurements} <= set(MEASUREMENTS)
    finally:
        watcher.disconnect()
        watcher.loop_stop()


# --------------------------------------------------------------------------- B1: throughput


def _valid_batch(site: str, n: int, seq0: int) -> list[tuple[str, bytes]]:
    base = now_ms() - 500_000
    return [telemetry(site, f"P{k % 50:04d}", seq0 + k // 50, base + (seq0 + k // 50) * 1000) for k in range(n)]


def _best_time(service: Service, batches: list[list[Inbound]]) -> float:
    best = float("inf")
    for batch in batches:
        started = time.perf_counter()
        assert service.process(batch)
        best = min(best, time.perf_counter() - started)
    return best


def test_one_bad_message_does_not_slow_its_batch(tmp_path: Path) -> None:
    """B1: a batch of 2,000 valid messages with one bad message of each kind costs at most 1.5 x a clean one.

    Each bad message is refused on its own (no retry of the batch, no per-message fallback for
    the good ones); the best of 4 runs is compared, since the machine is shared.
    """
    site = "speed"
    service, writer = offline_service(site, tmp_path)
    bad = [m.topic for m, _ in _bad_messages(site, now_ms() - 400_000)]
    bad_payloads = [m.payload for m, _ in _bad_messages(site, now_ms() - 400_000)]
    clean, dirty = [], []
    for run in range(4):
        clean.append(inbound(_valid_batch(site, 2000, seq0=run * 100)))
        mixed = _valid_batch(site, 2000, seq0=run * 100 + 50)
        for k, (t, p) in enumerate(zip(bad, bad_payloads, strict=True)):
            mixed.insert(k * 90, (t, p))
        dirty.append(inbound(mixed))
    _best_time(service, [inbound(_valid_batch(site, 2000, seq0=10_000))])  # warm up
    t_clean = _best_time(service, clean)
    t_dirty = _best_time(service, dirty)
    assert t_dirty <= 1.5 * t_clean + 0.02, (t_clean, t_dirty)
    assert service.stats.counts["invalid"] >= 4 * (len(bad) - 2)  # the rest became duplicates or collisions
    assert writer.lines()


# --------------------------------------------------------------------------- B2, B3: property-based


_NASTY = " ,=\"'\n\\+#/é\x00\t{}"
nasty_text = st.text(alphabet=st.sampled_from(list(_NASTY) + list("AZaz09_-")), min_size=0, max_size=12)
identifiers = st.from_regex(r"\A[A-Za-z0-9_-]{1,12}\Z")


@st.composite
def hostile_messages(draw: st.DrawFn, site: str) -> tuple[str, bytes, bool]:
    """A telemetry message with hostile identifiers, odd values or topic levels; and whether it is valid."""
    pack = draw(identifiers | nasty_text)
    topic_pack = draw(st.just(pack) | identifiers | nasty_text)
    extra = draw(st.lists(nasty_text.filter(lambda s: "/" not in s), max_size=3))
    topic = "/".join(["microgrid", site, "packs", topic_pack, "telemetry", *extra])
    data = json.loads(telemetry(site, "X", draw(st.integers(0, 10**6)), now_ms() - 1000)[1])
    data["pack"] = pack
    key = draw(st.sampled_from(["voltage_v", "current_a", "temp_max_c", "soc_bms", "seq"]))
    value = draw(
        st.sampled_from(["keep", "NaN", "Infinity", "-Infinity", "1e999", '"3.7"', "true", "null", "[]", "{}"])
    )
    payload = json.dumps(data)
    if value != "keep":
        payload = json.dumps({**data, key: "@@"}).replace('"@@"', value)
    valid = (
        value == "keep" and bool(IDENTIFIER.fullmatch(pack)) and topic_pack == pack and not extra and "\n" not in pack
    )
    return topic, payload.encode(), valid


def _injected(pack: str) -> tuple[str, bytes, bool]:
    payload = json.loads(telemetry("hostile", "X", 1, now_ms() - 1000)[1])
    return f"microgrid/hostile/packs/{pack}/telemetry", json.dumps({**payload, "pack": pack}).encode(), False


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(hostile_messages("hostile"), min_size=1, max_size=20))
@example(batch=[_injected("P1 voltage_v=0,x=1"), _injected("P1\n"), _injected('P1",evil="1'), _injected("P1\\")])
def test_no_input_breaks_the_line_protocol(batch: list[tuple[str, bytes, bool]], tmp_path: Path) -> None:
    """B2, B3: whatever arrives, every line written is well-formed line protocol with declared names only.

    The pack tag is always a contract identifier (the allowlist refuses the rest), so no input
    can add a line, a tag or a field; NaN and infinities never reach a body (a 400 for the
    whole batch); every message is either written or refused with a reason.
    """
    service, writer = offline_service("hostile", tmp_path)
    assert service.process(inbound([(t, p) for t, p, _ in batch]))
    counts = service.stats.counts
    valid = [p for _, p, ok in batch if ok]
    unique_valid = {(json.loads(p)["pack"], json.loads(p)["seq"]) for p in valid}
    lines = writer.lines()
    telemetry_lines = 0
    for line in lines:
        measurement, tags, fields, _ = parse_line(line)
        assert measurement in MEASUREMENTS, line
        spec = MEASUREMENTS[measurement]
        assert set(tags) <= set(spec.tags), line
        if "pack" in tags:
            assert IDENTIFIER.fullmatch(tags["pack"]), line
        assert all(v.lower() not in ("nan", "inf", "-inf", "+inf") for v in fields.values()), line
        telemetry_lines += measurement == "pack_telemetry"
    # Same (pack, seq) twice in a batch is one point; same (pack, ts_ms) with another seq is refused.
    assert telemetry_lines <= len(unique_valid)
    assert telemetry_lines + counts["invalid"] + counts["duplicates"] == len(batch)
    assert service.link.counters["acked"] == len(batch)


# --------------------------------------------------------------------------- B4


def test_b4_oversize_refused_by_the_broker_and_by_the_twin(
    influxd: Influxd, influx_db: str, tmp_path: Path, unique_site: str
) -> None:
    """B4: above the shipped broker's ``message_size_limit`` the broker drops the message (logged, never
    delivered); between the twin's limit and the broker's the twin refuses it (``oversize``), counted.

    (To an MQTT 5 publisher Mosquitto 2.0.11 answers PUBACK 0x95, a code MQTT 5 does not allow in a
    PUBACK, and paho 2.2 disconnects with "protocol error"; the publisher here speaks 3.1.1.)
    """
    shipped = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    found = re.search(r"^message_size_limit (\d+)$", shipped, re.MULTILINE)
    assert found, "the shipped mosquitto.conf bounds the message size"
    limit = int(found.group(1))
    assert limit > c.MAX_PAYLOAD_BYTES
    broker = Mosquitto(
        workdir=tmp_path / "broker", extra_conf=f"message_size_limit {limit}", log_types=("all",)
    ).start()
    try:
        settings = settings_for(unique_site, broker, tmp_path, influx_url=influxd.url, database=influx_db)
        topic, good = telemetry(unique_site, "P0001", 1, now_ms() - 1000)
        too_big_for_twin = good[:-1] + b',"pad":"' + b"x" * (c.MAX_PAYLOAD_BYTES + 100) + b'"}'
        too_big_for_broker = good[:-1] + b',"pad":"' + b"x" * (limit + 100) + b'"}'
        with running(Service(settings)) as service:
            Feed(broker.port, [Message(topic, too_big_for_broker), Message(topic, too_big_for_twin)]).start().join()
            Feed(broker.port, [Message(topic, good)]).start().join()
            assert wait_until(lambda: stored_rows(influxd, influx_db) == [("P0001", 1)], 10)
            assert wait_until(lambda: service.stats.invalid["oversize"] == 1, 10)
            assert service.stats.counts["received"] == 2  # the biggest never came
            assert service.link.counters["oversize"] == 1  # kept only up to the limit in the queue
        assert "Dropped too large PUBLISH" in broker.log_path.read_text()
    finally:
        broker.stop()


# --------------------------------------------------------------------------- B6


def test_b6_cardinality_bomb_is_capped(
    mosquitto: Mosquitto, influxd: Influxd, influx_db: str, tmp_path: Path, unique_site: str
) -> None:
    """B6: 300 random pack ids on telemetry and cells, cap 20: at most 20 series, refusals counted, alert."""
    cap = 20
    rng = random.Random(6)
    packs = random_packs(300, rng)
    base = now_ms() - 10_000
    flood = []
    for k, pack in enumerate(packs):
        topic, payload = telemetry(unique_site, pack, 1, base + k)
        flood.append(Message(topic, payload, pack, 1))
        cells = c.PackCells(pack=pack, ts_ms=base + k, seq=1, cell_voltages_v=[3.9, 3.91], temps_c=[25.0])
        flood.append(Message(c.topic(c.TopicKind.PACK_CELLS, unique_site, pack), c.encode(cells)))
    settings = settings_for(
        unique_site, mosquitto, tmp_path, influx_url=influxd.url, database=influx_db, ingest={"max_packs": cap}
    )
    with running(Service(settings)) as service:
        Feed(mosquitto.port, flood).start().join()
        assert wait_until(lambda: service.link.counters["acked"] == len(flood), 15)
        assert wait_until(lambda: len(stored_rows(influxd, influx_db)) == cap, 10)
        metrics = service.metrics()
        assert metrics['invalid_total{reason="cardinality_cap"}'] == 2 * (300 - cap)
        assert metrics["packs"] == cap
        assert wait_until(lambda: service.metrics()['alert_active{kind="cardinality_cap"}'] == 1.0, 5)
    for measurement in ("pack_telemetry", "pack_cells"):
        answer = influxd.query(f'SHOW SERIES FROM "{measurement}"', db=influx_db)
        assert len(answer["results"][0]["series"][0]["values"]) == cap
