"""Publish an emulation on MQTT per the contract: one gateway connection per pack.

Each pack has its own MQTT connection, as each pack's BMS gateway would on a real site,
with ``packs/{pack}/status`` = offline as its last will. The site meter has one more. All
connections are served from the caller's thread with ``select`` (paho's external-loop
API), so hundreds of gateways need no thread each.

Payloads are encoded a whole step at a time with polars (``struct.json_encode``), in the
contract's field names and order.
"""

from __future__ import annotations

import contextlib
import selectors
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from twin import contract as c
from twin.contract import encode_frame as encode_rows
from twin.errors import BrokerError

__all__ = ["Credentials", "GatewayPool", "encode_rows"]

_CONNECT_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Credentials:
    """Username and password for the broker (from the environment, never the command line)."""

    username: str
    password: str | None = None


class GatewayPool:
    """One MQTT connection per gateway, served together from the caller's thread.

    Args:
        url: ``mqtt://host:port`` of the broker.
        site: the site identifier.
        packs: the pack identifiers; each gets a gateway whose last will marks it offline.
        client_prefix: prefix of the client ids (``{prefix}-{pack}``, ``{prefix}-site``).
        credentials: optional username and password.
        protocol: MQTT protocol version (``"5"`` or ``"3.1.1"``).

    Raises:
        BrokerError: the broker cannot be reached or refuses a connection.
    """

    def __init__(
        self,
        url: str,
        site: str,
        packs: Sequence[str],
        *,
        client_prefix: str = "emu",
        credentials: Credentials | None = None,
        protocol: str = "3.1.1",
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            msg = f"{url!r} is not an mqtt://HOST:PORT URL"
            raise BrokerError(msg)
        self.site = site
        self.packs = list(packs)
        self._selector = selectors.DefaultSelector()
        self._clients: list[mqtt.Client] = []
        self._connected: set[int] = set()
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        host, port = parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        ids = [*self.packs, "site"]
        for i, gateway in enumerate(ids):
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_prefix}-{gateway}", protocol=proto)
            client.max_inflight_messages_set(200)
            if credentials is not None:
                client.username_pw_set(credentials.username, credentials.password)
            if parts.scheme == "mqtts":
                client.tls_set()
            if gateway != "site":
                will = c.encode(c.PackStatus(pack=gateway, state="offline"))
                client.will_set(c.topic(c.TopicKind.PACK_STATUS, site, gateway), will, qos=1, retain=True)
            client.on_connect = self._on_connect(i)
            client.on_socket_register_write = lambda cl, _u, sock: self._want(cl, sock, write=True)
            client.on_socket_unregister_write = lambda cl, _u, sock: self._want(cl, sock, write=False)
            try:
                client.connect(host, port, keepalive=60)
            except OSError as exc:
                self.close()
                msg = f"cannot connect to the broker at {host}:{port}: {exc}"
                raise BrokerError(msg) from exc
            self._clients.append(client)
            sock = client.socket()
            if sock is not None:
                # CONNECT may still be waiting to be written: register for writing too.
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
                self._selector.register(sock, events, client)
        self._wait_connected()
        self.site_client = self._clients[-1]

    def _on_connect(self, index: int):  # type: ignore[no-untyped-def]
        def callback(_c: mqtt.Client, _u: object, _f: object, reason: object, _p: object = None) -> None:
            if not getattr(reason, "is_failure", False):
                self._connected.add(index)

        return callback

    def _want(self, client: mqtt.Client, sock: object, *, write: bool) -> None:
        try:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
            self._selector.modify(sock, events, client)  # type: ignore[arg-type]
        except (KeyError, ValueError):
            pass

    def _wait_connected(self) -> None:
        deadline = time.monotonic() + _CONNECT_TIMEOUT_S
        while len(self._connected) < len(self._clients):
            if time.monotonic() > deadline:
                self.close()
                msg = f"only {len(self._connected)} of {len(self._clients)} gateways connected (refused or unreachable)"
                raise BrokerError(msg)
            self.service(0.05)

    def service(self, timeout_s: float = 0.0) -> None:
        """Serve every connection's socket once (reads, writes, keepalive), waiting up to ``timeout_s``."""
        for key, events in self._selector.select(timeout_s):
            client: mqtt.Client = key.data
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE:
                client.loop_write()
        for client in self._clients:
            client.loop_misc()

    def serve_until(self, deadline: float) -> None:
        """Serve the connections until ``time.monotonic()`` reaches ``deadline``."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.service(min(left, 0.05))

    def publish_packs(
        self, kind: c.TopicKind, indices: Sequence[int], payloads: Sequence[bytes], *, retain: bool = False
    ) -> None:
        """Publish one payload per pack (``indices`` into ``packs``) on that pack's own connection."""
        site = self.site
        for i, payload in zip(indices, payloads, strict=True):
            pack = self.packs[i]
            self._clients[i].publish(c.topic(kind, site, pack), payload, qos=1, retain=retain)

    def publish_site(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish on the site gateway's connection."""
        self.site_client.publish(topic, payload, qos=1, retain=retain)

    def pending(self) -> int:
        """Number of QoS 1 messages not yet acknowledged by the broker."""
        return sum(len(cl._out_messages) for cl in self._clients)

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Serve until every QoS 1 message is acknowledged; return whether that happened in time."""
        deadline = time.monotonic() + timeout_s
        while self.pending() and time.monotonic() < deadline:
            self.service(0.05)
        return self.pending() == 0

    def go_offline(self, indices: Sequence[int]) -> None:
        """Drop the given gateways' connections without a DISCONNECT, so the broker sends their wills."""
        for i in indices:
            sock = self._clients[i].socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                sock.close()

    def close(self) -> None:
        """Disconnect every gateway cleanly (no last will is sent)."""
        for client in self._clients:
            try:
                client.disconnect()
                client.loop_write()
            except (OSError, ValueError):
                pass
        self._selector.close()
