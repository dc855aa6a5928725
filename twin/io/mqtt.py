"""The MQTT boundary: the twin's one connection, for ingest (manual acks) and for its outputs.

Delivery (at least once, end to end):

* QoS 1, a fixed client id, and a persistent session: MQTT 3.1.1 with
  ``clean_session=False``, or MQTT 5 with ``clean_start=False`` *and* a Session Expiry
  Interval > 0 (without it the broker deletes the session at disconnect: paho#877).
* ``manual_ack=True``: a message is acknowledged only when the caller says so, after what
  it produced is durably written or dead-lettered. Unacknowledged messages are redelivered
  by the broker after a reconnect or a restart.
* The paho callback only enqueues into a bounded queue; no exception escapes a callback
  (an exception there kills paho's network thread: paho#365, #704). Under MQTT 5 the
  client announces a Receive Maximum no larger than the queue, so the broker never sends
  more unacknowledged messages than the queue holds.
* Reconnects: paho's capped exponential backoff, from a randomised first delay so that
  many instances do not reconnect in lockstep; subscriptions are renewed on every connect.

Errors are translated into :class:`twin.errors.BrokerError`.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from twin import contract as c
from twin.config import MqttSettings
from twin.errors import BrokerError

__all__ = ["Inbound", "MqttLink", "ingest_subscriptions"]

log = logging.getLogger(__name__)

_QUEUE_PUT_TIMEOUT_S: Final = 5.0
_CONNECT_TIMEOUT_S: Final = 15.0


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message, waiting to be processed and acknowledged."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_s: float


def ingest_subscriptions(site: str) -> list[str]:
    """The topic filters the twin subscribes to for one site."""
    kinds = (
        c.TopicKind.PACK_META,
        c.TopicKind.PACK_STATUS,
        c.TopicKind.PACK_TELEMETRY,
        c.TopicKind.PACK_CELLS,
        c.TopicKind.SITE_TELEMETRY,
    )
    return [c.subscription(kind, site) for kind in kinds]


class MqttLink:
    """The twin's MQTT connection.

    Args:
        settings: broker URL, credentials, TLS, session options.
        site: the site to subscribe to.
        client_id: the fixed client id (the broker keeps the session under it).
        queue_max: bound of the inbound queue.
        version: the twin's version, announced in its status.
        subscribe: subscribe to the site's telemetry (False for a publish-only link).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        site: str,
        client_id: str,
        queue_max: int,
        version: str = "",
        subscribe: bool = True,
    ) -> None:
        parts = urlsplit(settings.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.settings = settings
        self.site = site
        self.version = version
        self.v5 = settings.protocol == "5"
        self.queue: queue.Queue[Inbound] = queue.Queue(maxsize=queue_max)
        self._subscribe = subscribe
        self.connected = threading.Event()
        self.counters: dict[str, int] = {
            "received": 0,
            "callback_errors": 0,
            "queue_overflow": 0,
            "connects": 0,
            "disconnects": 0,
            "acked": 0,
            "published": 0,
        }
        self.last_error: str | None = None
        self.session_present = False
        self.on_message_hook: Callable[[Inbound], None] | None = None  # tests inject faults here
        protocol = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol, "manual_ack": True}
        if not self.v5:
            kwargs["clean_session"] = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        first = settings.reconnect_min_s * random.uniform(0.5, 1.5)
        self.client.reconnect_delay_set(
            min_delay=max(1, round(first)), max_delay=max(1, round(settings.reconnect_max_s))
        )
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else None
            self.client.username_pw_set(settings.username, password)
        if parts.scheme == "mqtts" or settings.tls_ca_file:
            self.client.tls_set(
                ca_certs=str(settings.tls_ca_file) if settings.tls_ca_file else None,
                certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
                keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            self.client.tls_insecure_set(False)
        status_topic = c.topic(c.TopicKind.TWIN_STATUS, site)
        will = c.encode(c.TwinStatus(state="offline", version=version))
        self.client.will_set(status_topic, will, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # ------------------------------------------------------------------ callbacks (never raise)

    def _on_connect(self, client: mqtt.Client, _u: object, flags: Any, reason: Any, _p: object) -> None:
        try:
            if getattr(reason, "is_failure", False):
                self.last_error = f"connection refused: {reason}"
                log.error("MQTT broker refused the connection: %s", reason)
                return
            self.counters["connects"] += 1
            self.session_present = bool(getattr(flags, "session_present", False))
            if self._subscribe:
                client.subscribe([(t, 1) for t in ingest_subscriptions(self.site)])
            log.info(
                "MQTT connected to %s:%d (session %s)",
                self.host,
                self.port,
                "resumed" if self.session_present else "new",
            )
            self.connected.set()
        except Exception as exc:
            self.counters["callback_errors"] += 1
            self.last_error = repr(exc)

    def _on_disconnect(self, _c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        try:
            if self.connected.is_set():
                log.warning("MQTT connection lost (%s); reconnecting", reason)
            self.connected.clear()
            self.counters["disconnects"] += 1
        except Exception:
            self.counters["callback_errors"] += 1

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            item = Inbound(
                topic=msg.topic, payload=bytes(msg.payload), mid=msg.mid, qos=msg.qos, received_s=time.monotonic()
            )
            if self.on_message_hook is not None:
                self.on_message_hook(item)
            try:
                self.queue.put(item, timeout=_QUEUE_PUT_TIMEOUT_S)
            except queue.Full:
                # Not acknowledged, so the broker redelivers it after the next reconnect.
                self.counters["queue_overflow"] += 1
                return
            self.counters["received"] += 1
        except Exception as exc:
            self.counters["callback_errors"] += 1
            self.last_error = repr(exc)
            if msg.qos > 0:
                # Nothing was queued: acknowledge, or the message would block the session forever.
                self.client.ack(msg.mid, msg.qos)

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, wait: bool = True) -> None:
        """Connect and start the network thread.

        Raises:
            BrokerError: the broker cannot be reached or refuses us within the timeout.
        """
        props = None
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = int(self.settings.session_expiry_s)
            props.ReceiveMaximum = max(1, min(65535, self.queue.maxsize))
            kwargs = {"clean_start": False, "properties": props}
        try:
            self.client.connect(self.host, self.port, keepalive=self.settings.keepalive_s, **kwargs)
        except (OSError, ssl.SSLError) as exc:
            msg = f"cannot connect to the MQTT broker at {self.host}:{self.port}: {exc}"
            raise BrokerError(msg) from exc
        self.client.loop_start()
        if wait and not self.connected.wait(_CONNECT_TIMEOUT_S):
            self.stop(publish_offline=False)
            why = self.last_error or "timeout"
            msg = f"the MQTT broker at {self.host}:{self.port} did not accept the connection: {why}"
            raise BrokerError(msg)

    def stop(self, *, publish_offline: bool = True) -> None:
        """Publish the offline status (retained), disconnect cleanly and stop the network thread."""
        if publish_offline and self.connected.is_set():
            info = self.publish_status("offline")
            if info is not None:
                info.wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ ingest

    def take(self, max_messages: int, max_age_s: float, stop: threading.Event) -> list[Inbound]:
        """Collect a micro-batch: up to ``max_messages``, or what arrived within ``max_age_s`` of the first."""
        batch: list[Inbound] = []
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return batch
        batch.append(first)
        deadline = time.monotonic() + max_age_s
        while len(batch) < max_messages and not stop.is_set():
            try:
                batch.append(self.queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(self.queue.get(timeout=min(left, 0.05)))
            except queue.Empty:
                continue
        return batch

    def ack(self, messages: Sequence[Inbound]) -> None:
        """Acknowledge messages, in the order they were received (MQTT 4.6)."""
        for m in messages:  # one PUBACK per message is what the protocol needs
            if m.qos > 0:
                rc = self.client.ack(m.mid, m.qos)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self.counters["acked"] += 1

    # ------------------------------------------------------------------ outputs

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, expiry_s: int | None = None
    ) -> mqtt.MQTTMessageInfo | None:
        """Publish at QoS 1 (with a message expiry under MQTT 5)."""
        props = None
        if self.v5 and expiry_s:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = int(expiry_s)
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.counters["published"] += 1
            return info
        return None

    def publish_status(self, state: str, ts_ms: int | None = None) -> mqtt.MQTTMessageInfo | None:
        """Publish the twin's retained online/offline status."""
        payload = c.encode(c.TwinStatus(state=state, ts_ms=ts_ms, version=self.version))  # type: ignore[arg-type]
        return self.publish(c.topic(c.TopicKind.TWIN_STATUS, self.site), payload, retain=True)
