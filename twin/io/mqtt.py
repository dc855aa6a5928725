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
  Messages are acknowledged only on the connection that delivered them: after a reconnect
  the broker redelivers what was not acknowledged (with its original packet id when the
  session resumed; a packet id of a lost session may name a different message now).
* One copy per client id: :class:`SessionLock` (a lock file per client id and broker) makes
  a second copy on the same host refuse to start. A copy elsewhere that takes the session
  over closes our connection: Mosquitto 2.0.11 just closes it (newer brokers send an MQTT 5
  DISCONNECT "session taken over", counted as ``session_taken_over``), paho reconnects
  within a second and takes the session back, and the two copies kick each other forever.
  So a connection lost three times within twice ``takeover_backoff_s`` counts as
  ``flapping``, is logged, and the next reconnect waits ``takeover_backoff_s``: with the
  default 60 s a copy reconnects at most about three times a minute. A single loss (a
  broker restart, a half-open link) reconnects with the usual backoff.
* Broker drops: the broker's ``$SYS/broker/publish/messages/dropped`` (messages it threw
  away because a client's queue was full, INGEST_NOTES finding 3) is followed and exported.
* A payload larger than the contract's limit is kept only up to that limit plus one byte,
  so the pipeline refuses it as ``oversize`` and the queue's memory stays bounded.

Errors are translated into :class:`twin.errors.BrokerError`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import random
import re
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from twin import contract as c
from twin.config import MqttSettings
from twin.errors import BrokerError

__all__ = ["BROKER_DROPPED_TOPIC", "Inbound", "MqttLink", "SessionLock", "ingest_subscriptions"]

log = logging.getLogger(__name__)

_QUEUE_PUT_TIMEOUT_S: Final = 5.0
_CONNECT_TIMEOUT_S: Final = 15.0
_SESSION_TAKEN_OVER: Final = 0x8E  # MQTT 5 DISCONNECT reason code
_FLAPS: Final = 3  # connection losses within 2 x takeover_backoff_s that count as flapping
#: The broker's count of messages it dropped because a client's queue was full (Mosquitto).
BROKER_DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message, waiting to be processed and acknowledged."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_s: float
    generation: int = 0  # which connection delivered it (MqttLink.counters["connects"] then)


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


def _tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """A client TLS context: the broker's certificate verified (chain and host name), TLS 1.2 at least.

    Raises:
        BrokerError: a CA, certificate or key file cannot be read.
    """
    try:
        context = ssl.create_default_context(cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None)
        if settings.tls_cert_file:
            context.load_cert_chain(
                str(settings.tls_cert_file), str(settings.tls_key_file) if settings.tls_key_file else None
            )
    except (OSError, ssl.SSLError) as exc:
        msg = f"cannot load the MQTT TLS files: {exc}"
        raise BrokerError(msg) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _default_lock_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "mgtwin"
    return Path(tempfile.gettempdir()) / f"mgtwin-{os.getuid()}"


class SessionLock:
    """A single-instance lock: one holder per MQTT client id and broker on this host.

    The broker keeps one session per client id; a second copy of the twin with the same id
    would take that session over (and the first would take it back, and so on). The lock is
    an exclusive ``flock`` on ``<folder>/<client id>@<host>_<port>.lock``, released by the
    kernel when the holder exits, however it exits (no stale lock after a crash). The file
    holds the holder's pid, for the error message.

    Args:
        client_id: the MQTT client id.
        broker: ``host:port`` of the broker.
        folder: where lock files live; default ``$XDG_RUNTIME_DIR/mgtwin`` or
            ``mgtwin-<uid>`` in the temporary folder.
    """

    def __init__(self, client_id: str, broker: str, folder: Path | None = None) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{client_id}@{broker}")[:200]
        self.path = (folder or _default_lock_dir()) / f"{safe}.lock"
        self.client_id = client_id
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            BrokerError: another process holds it (its pid is named), or the folder is not writable.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle = self.path.open("a+", encoding="utf-8")
        except OSError as exc:
            msg = f"cannot create the single-instance lock {self.path}: {exc.strerror}"
            raise BrokerError(msg) from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            msg = (
                f"another mgtwin serve (pid {holder}) already runs with MQTT client id {self.client_id!r} "
                f"on this broker (lock {self.path}); a second copy would steal its session"
            )
            raise BrokerError(msg) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Release the lock (idempotent)."""
        handle, self._file = self._file, None
        if handle is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


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
        self.client_id = client_id
        self.queue: queue.Queue[Inbound] = queue.Queue(maxsize=queue_max)
        self._subscribe = subscribe
        self.connected = threading.Event()
        self._answered = threading.Event()  # the broker answered a CONNECT (accepted or refused)
        self.counters: dict[str, int] = {
            "received": 0,
            "callback_errors": 0,
            "queue_overflow": 0,
            "connects": 0,
            "disconnects": 0,
            "acked": 0,
            "ack_stale": 0,
            "published": 0,
            "connect_failures": 0,
            "session_taken_over": 0,
            "flapping": 0,
            "oversize": 0,
            "broker_dropped": 0,
        }
        #: The broker's own dropped-messages counter, as last read from $SYS (None until read).
        self.broker_dropped_abs: int | None = None
        self._broker_dropped_base: int | None = None
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
        self._delays = (max(1, round(first)), max(1, round(settings.reconnect_max_s)))
        self.client.reconnect_delay_set(min_delay=self._delays[0], max_delay=self._delays[1])
        self._backed_off = False
        self._losses: deque[float] = deque()
        self._stopping = False
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else None
            self.client.username_pw_set(settings.username, password)
        if parts.scheme == "mqtts" or settings.tls_ca_file:
            self.client.tls_set_context(_tls_context(settings))
        status_topic = c.topic(c.TopicKind.TWIN_STATUS, site)
        will = c.encode(c.TwinStatus(state="offline", version=version))
        self.client.will_set(status_topic, will, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_connect_fail = self._on_connect_fail

    # ------------------------------------------------------------------ callbacks (never raise)

    def _on_connect(self, client: mqtt.Client, _u: object, flags: Any, reason: Any, _p: object) -> None:
        try:
            if getattr(reason, "is_failure", False):
                self.last_error = f"connection refused: {reason}"
                self._answered.set()
                log.error("MQTT broker refused the connection: %s", reason)
                return
            self.counters["connects"] += 1
            self.session_present = bool(getattr(flags, "session_present", False))
            if self._backed_off:  # back to the usual backoff
                self._backed_off = False
                client.reconnect_delay_set(min_delay=self._delays[0], max_delay=self._delays[1])
            if self._subscribe:
                client.subscribe([(t, 1) for t in ingest_subscriptions(self.site)])
                if self.settings.broker_stats:
                    client.subscribe(BROKER_DROPPED_TOPIC, 0)
            log.info(
                "MQTT connected to %s:%d (session %s)",
                self.host,
                self.port,
                "resumed" if self.session_present else "new",
            )
            self.connected.set()
            self._answered.set()
        except Exception as exc:
            self.counters["callback_errors"] += 1
            self.last_error = repr(exc)

    def _on_disconnect(self, client: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        try:
            was_connected = self.connected.is_set()
            self.connected.clear()
            self.counters["disconnects"] += 1
            if self._stopping:
                return
            if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
                self.counters["session_taken_over"] += 1
                self.last_error = "session taken over by another client with the same id"
                log.error("MQTT session taken over by another client with id %r", self.client_id)
            elif was_connected:
                log.warning("MQTT connection lost (%s); reconnecting", reason)
            if was_connected:
                self._on_loss(client)
        except Exception:
            self.counters["callback_errors"] += 1

    def _on_loss(self, client: mqtt.Client) -> None:
        """Slow down when the connection flaps (another copy taking the session, see the module docstring)."""
        now = time.monotonic()
        backoff = max(1, round(self.settings.takeover_backoff_s))
        self._losses.append(now)
        while self._losses and now - self._losses[0] > 2 * backoff:
            self._losses.popleft()
        if len(self._losses) >= _FLAPS:
            self._losses.clear()
            self.counters["flapping"] += 1
            self.last_error = "the connection flaps: another client with the same id taking the session?"
            log.error(
                "MQTT connection to %s:%d lost %d times within %d s: another client with id %r taking the "
                "session? Next reconnect in %d s",
                self.host,
                self.port,
                _FLAPS,
                2 * backoff,
                self.client_id,
                backoff,
            )
            self._backed_off = True
            client.reconnect_delay_set(min_delay=backoff, max_delay=max(backoff, self._delays[1]))

    def _on_connect_fail(self, _c: mqtt.Client, _u: object) -> None:
        self.counters["connect_failures"] += 1

    def _on_broker_stats(self, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != BROKER_DROPPED_TOPIC:
            return
        value = int(bytes(msg.payload).strip() or b"0")
        if self._broker_dropped_base is None or value < (self.broker_dropped_abs or 0):
            # The first reading, or the broker restarted (its counters start again from 0).
            self._broker_dropped_base = value - self.counters["broker_dropped"]
        self.broker_dropped_abs = value
        self.counters["broker_dropped"] = value - self._broker_dropped_base

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic.startswith("$SYS/"):
                self._on_broker_stats(msg)
                return
            payload = bytes(msg.payload)
            if len(payload) > c.MAX_PAYLOAD_BYTES:
                self.counters["oversize"] += 1
                payload = payload[: c.MAX_PAYLOAD_BYTES + 1]  # still refused as oversize; memory bounded
            item = Inbound(
                topic=msg.topic,
                payload=payload,
                mid=msg.mid,
                qos=msg.qos,
                received_s=time.monotonic(),
                generation=self.counters["connects"],
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
            # Nothing was queued: acknowledge, or the message would block the session forever.
            if msg.qos > 0 and self.client.ack(msg.mid, msg.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.counters["acked"] += 1

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
        if wait and not (self._answered.wait(_CONNECT_TIMEOUT_S) and self.connected.wait(0.5)):
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
        self._stopping = True
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
        """Acknowledge messages, in the order they were received (MQTT 4.6).

        A message delivered on an earlier connection is not acknowledged: the broker has
        redelivered it on this one (it is then processed again, as a duplicate), and its
        packet id may now name another message.
        """
        generation = self.counters["connects"]
        for m in messages:  # one PUBACK per message is what the protocol needs
            if m.qos > 0:
                if m.generation != generation:
                    self.counters["ack_stale"] += 1
                    continue
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
