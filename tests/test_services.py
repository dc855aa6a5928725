"""The real broker and database the integration tests rely on, exercised through the contract."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import Influxd, Mosquitto, ServerError, require_binary
from tests.test_contract import SAMPLES
from twin import contract as c

pytestmark = pytest.mark.integration


@contextmanager
def _client(broker: Mosquitto, client_id: str) -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port, keepalive=30)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def _collect(broker: Mosquitto, client_id: str, subscription: str) -> tuple[mqtt.Client, queue.Queue[mqtt.MQTTMessage]]:
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = queue.Queue[int]()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: inbox.put(msg)
    client.on_subscribe = lambda _c, _u, mid, _rc, _p: subscribed.put(mid)
    client.connect("127.0.0.1", broker.port, keepalive=30)
    client.loop_start()
    client.subscribe(subscription, qos=1)
    subscribed.get(timeout=5)
    return client, inbox


def test_contract_messages_cross_the_real_broker(mosquitto: Mosquitto, unique_site: str) -> None:
    sub, inbox = _collect(mosquitto, f"{unique_site}-sub", f"microgrid/{unique_site}/#")
    try:
        sent: dict[str, c.Message] = {}
        with _client(mosquitto, f"{unique_site}-pub") as pub:
            for name, message in SAMPLES.items():
                pack = getattr(message, "pack", None)
                kind = {
                    "pack_meta": c.TopicKind.PACK_META,
                    "pack_telemetry": c.TopicKind.PACK_TELEMETRY,
                    "pack_cells": c.TopicKind.PACK_CELLS,
                    "pack_status": c.TopicKind.PACK_STATUS,
                    "site_telemetry": c.TopicKind.SITE_TELEMETRY,
                    "twin_state": c.TopicKind.TWIN_STATE,
                    "twin_pack_state": c.TopicKind.TWIN_PACK,
                    "alert": c.TopicKind.TWIN_ALERTS,
                    "twin_status": c.TopicKind.TWIN_STATUS,
                    "deadletter": c.TopicKind.TWIN_DEADLETTER,
                }[name]
                topic = c.topic(kind, unique_site, pack if "{pack}" in kind.value else None)
                pub.publish(topic, c.encode(message), qos=1).wait_for_publish(5)
                sent[topic] = message
        received: dict[str, c.Message] = {}
        deadline = time.monotonic() + 10
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            parsed = c.parse_topic(msg.topic)
            assert parsed.site == unique_site
            received[msg.topic] = c.decode(msg.payload, c.model_for_topic(parsed.kind))
        assert received == sent
    finally:
        sub.disconnect()
        sub.loop_stop()


def test_retained_meta_reaches_a_late_subscriber(mosquitto: Mosquitto, unique_site: str) -> None:
    meta = SAMPLES["pack_meta"]
    topic = c.topic(c.TopicKind.PACK_META, unique_site, "P0001")
    with _client(mosquitto, f"{unique_site}-pub") as pub:
        pub.publish(topic, c.encode(meta), qos=1, retain=True).wait_for_publish(5)
    sub, inbox = _collect(mosquitto, f"{unique_site}-late", c.subscription(c.TopicKind.PACK_META, unique_site))
    try:
        msg = inbox.get(timeout=5)
        assert msg.retain
        assert c.decode(msg.payload, c.PackMeta) == meta
    finally:
        sub.disconnect()
        sub.loop_stop()


def _line(t: c.PackTelemetry, site: str) -> str:
    return (
        f"pack_telemetry,life=second_life,pack={t.pack},site={site} "
        f"voltage_v={t.voltage_v},current_a={t.current_a},soc_bms={t.soc_bms},seq={t.seq}i {t.ts_ms}"
    )


def test_write_and_read_back_from_the_real_influxdb(influxd: Influxd, influx_db: str) -> None:
    base = SAMPLES["pack_telemetry"]
    assert isinstance(base, c.PackTelemetry)
    rows = [
        base.model_copy(update={"seq": i, "ts_ms": base.ts_ms + 1000 * i, "current_a": 10.0 + i}) for i in range(50)
    ]
    body = "\n".join(_line(r, "nevada") for r in rows)
    assert influxd.write(influx_db, body) == 204
    answer = influxd.query(
        "SELECT count(voltage_v), sum(current_a) FROM pack_telemetry WHERE pack='P0001'", db=influx_db
    )
    count, total = answer["results"][0]["series"][0]["values"][0][1:]
    assert count == 50
    assert total == pytest.approx(sum(10.0 + i for i in range(50)))
    # Point time is event time: writing the same points again overwrites instead of doubling.
    assert influxd.write(influx_db, body) == 204
    again = influxd.query("SELECT count(voltage_v) FROM pack_telemetry", db=influx_db)
    assert again["results"][0]["series"][0]["values"][0][1] == 50
    first = influxd.query("SELECT voltage_v, seq FROM pack_telemetry ORDER BY time ASC LIMIT 1", db=influx_db)
    ts_ms, voltage, seq = first["results"][0]["series"][0]["values"][0]
    assert (ts_ms, voltage, seq) == (base.ts_ms, base.voltage_v, 0)


def test_influxdb_rejects_a_bad_line_with_400(influxd: Influxd, influx_db: str) -> None:
    assert influxd.write(influx_db, "pack_telemetry,pack=P1 voltage_v=NaN 1767225600000") == 400


def test_missing_binary_says_how_to_install() -> None:
    with pytest.raises(ServerError, match="not installed"):
        require_binary("mosquitto-does-not-exist")
    assert require_binary("mosquitto")
    assert require_binary("influxd")


def test_the_broker_persists_its_state(mosquitto: Mosquitto, unique_site: str) -> None:
    with _client(mosquitto, f"{unique_site}-pub") as pub:
        pub.publish(f"microgrid/{unique_site}/persist", b"x", qos=1, retain=True).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while not (mosquitto.workdir / "mosquitto.db").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (mosquitto.workdir / "mosquitto.db").exists()
    assert "Permission denied" not in mosquitto.log_path.read_text()
