"""Nobody let in (INGEST_NOTES 4.4, S1-S7), against a real Mosquitto and a real InfluxDB configured for it.

The secured stack (one per module, under a temporary folder, stopped at the end):

* Mosquitto with the compose stack's ACL (``deploy/mosquitto/acl``), a password file made with
  ``mosquitto_passwd``, no anonymous access, a plain listener (passwords) and the TLS listener
  of ``deploy/mosquitto/tls.conf.example`` (TLS 1.2+, client certificates, CN as user name),
  plus a TLS listener with an expired server certificate. Certificates are made here with
  ``openssl`` (a CA, a rogue CA, the twin's and the emulator's client certificates, an
  expired one); no private key lives in the repository.
* InfluxDB 1.6 with ``auth-enabled``: an admin, the twin's user with WRITE on its database
  only, and a Grafana user with READ only.

Every listener binds to 127.0.0.1. Secrets are random per run and checked against every log.
"""

from __future__ import annotations

import gc
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
import yaml

from tests.ingest_kit import (
    Feed,
    ServeProcess,
    fleet,
    keys,
    metrics_text,
    mqtt_client,
    running,
    serve_processes,
    settings_for,
    wait_until,
)
from tests.servers import Influxd, Mosquitto, free_port, require_binary
from twin.app import Service
from twin.demo import EmbeddedBroker
from twin.errors import BrokerError

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LOOPBACK = {"127.0.0.1", "::1"}


# --------------------------------------------------------------------------- certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _stamp(when: datetime) -> str:
    return when.strftime("%Y%m%d%H%M%SZ")


@dataclass
class Pki:
    """Throw-away certificates in a temporary folder."""

    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name

    def make_ca(self, name: str) -> None:
        ca = self.folder / name
        ca.mkdir()
        (ca / "index.txt").write_text("")
        (ca / "serial").write_text("1000\n")
        (ca / "new").mkdir()
        (ca / "ca.cnf").write_text(
            "[ca]\ndefault_ca = this\n[this]\n"
            f"database = {ca}/index.txt\nnew_certs_dir = {ca}/new\nserial = {ca}/serial\n"
            "default_md = sha256\npolicy = any\ncopy_extensions = copy\nunique_subject = no\n"
            "[any]\ncommonName = supplied\n"
        )
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "3", "-subj", f"/CN={name}", cwd=ca,
        )  # fmt: skip

    def issue(self, ca: str, name: str, cn: str, *, server: bool = False, expired: bool = False) -> None:
        """Issue ``name.crt``/``name.key`` signed by ``ca``, valid now (or expired last year)."""
        now = datetime.now(tz=UTC)
        start, end = (
            (now - timedelta(days=400), now - timedelta(days=300))
            if expired
            else (now - timedelta(days=1), now + timedelta(days=2))
        )
        ext = self.folder / f"{name}.ext"
        ext.write_text("subjectAltName = IP:127.0.0.1\n" if server else "extendedKeyUsage = clientAuth\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=self.folder,
        )  # fmt: skip
        _openssl(
            "ca", "-batch", "-notext", "-config", f"{ca}/ca.cnf", "-cert", f"{ca}/ca.crt", "-keyfile",
            f"{ca}/ca.key", "-in", f"{name}.csr", "-out", f"{name}.crt", "-extfile", str(ext),
            "-startdate", _stamp(start), "-enddate", _stamp(end), cwd=self.folder,
        )  # fmt: skip


# --------------------------------------------------------------------------- the secured stack


@dataclass
class Stack:
    """The secured broker and database of this module, and the secrets they use."""

    folder: Path
    pki: Pki
    broker: Mosquitto
    influx: Influxd
    site: str
    tls_port: int
    expired_tls_port: int
    twin_password: str
    emulator_password: str
    influx_admin: tuple[str, str]
    influx_password: str  # the twin's InfluxDB user ("ingest"), WRITE only
    grafana_password: str
    db: str = "secured"

    @property
    def secrets(self) -> list[str]:
        return [
            self.twin_password,
            self.emulator_password,
            self.influx_admin[1],
            self.influx_password,
            self.grafana_password,
        ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_binary("mosquitto_passwd")
    folder = tmp_path_factory.mktemp("secured")
    pki = Pki(folder / "pki")
    pki.folder.mkdir()
    pki.make_ca("ca")
    pki.make_ca("rogue")
    pki.path("ca.crt").write_bytes(pki.path("ca/ca.crt").read_bytes())  # where tls.conf.example looks
    pki.issue("ca", "server", "127.0.0.1", server=True)
    pki.issue("ca", "expired-server", "127.0.0.1", server=True, expired=True)
    site = f"sec{os.getpid()}"
    pki.issue("ca", "twin", "mgtwin")
    pki.issue("ca", "emulator", site)
    pki.issue("rogue", "rogue-twin", "mgtwin")
    pki.issue("ca", "expired-twin", "mgtwin", expired=True)

    twin_password, emulator_password = f"mq-tw-{secrets.token_hex(8)}", f"mq-em-{secrets.token_hex(8)}"
    passwd = folder / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "mgtwin", twin_password], check=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), site, emulator_password], check=True, timeout=30)
    tls_port, expired_tls_port = free_port(), free_port()
    tls = (DEPLOY / "mosquitto" / "tls.conf.example").read_text()
    tls = tls.replace("listener 8883", f"listener {tls_port} 127.0.0.1").replace("/mosquitto/certs/", f"{pki.folder}/")
    expired = (
        tls.replace(f"listener {tls_port} ", f"listener {expired_tls_port} ")
        .replace("server.crt", "expired-server.crt")
        .replace("server.key", "expired-server.key")
    )
    broker = Mosquitto(
        workdir=folder / "broker",
        extra_conf=(
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            f"acl_file {DEPLOY / 'mosquitto' / 'acl'}\n"
            f"{tls}\n{expired}\n"
        ),
        log_types=("all",),
        extra_ports=(tls_port, expired_tls_port),
    ).start()
    influx = Influxd(workdir=folder / "influx", auth_enabled=True).start()
    admin = ("admin", f"ix-ad-{secrets.token_hex(8)}")
    influx_password, grafana_password = f"ix-in-{secrets.token_hex(8)}", f"ix-gr-{secrets.token_hex(8)}"
    influx.query(f"CREATE USER admin WITH PASSWORD '{admin[1]}' WITH ALL PRIVILEGES")
    for q in (
        'CREATE DATABASE "secured"',
        f"CREATE USER ingest WITH PASSWORD '{influx_password}'",
        'GRANT WRITE ON "secured" TO ingest',
        f"CREATE USER grafana WITH PASSWORD '{grafana_password}'",
        'GRANT READ ON "secured" TO grafana',
    ):
        assert "error" not in str(influx.query(q, auth=admin))
    try:
        yield Stack(
            folder, pki, broker, influx, site, tls_port, expired_tls_port, twin_password, emulator_password,
            admin, influx_password, grafana_password,
        )  # fmt: skip
    finally:
        broker.stop()
        influx.stop()


class Probe:
    """An MQTT 5 client that records CONNACK, SUBACK and PUBACK reason codes and what it receives."""

    def __init__(
        self,
        port: int,
        *,
        user: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.client = mqtt_client(
            port, f"probe-{time.monotonic_ns()}", protocol=mqtt.MQTTv5, username=user, password=password
        )
        if tls is not None:
            self.client.tls_set_context(tls)
        self.connack: list[int] = []
        self.subacks: dict[int, list[int]] = {}
        self.pubacks: dict[int, int] = {}
        self.messages: list[str] = []
        self.error: BaseException | None = None
        done = threading.Event()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: (self.connack.append(rc.value), done.set())
        self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.__setitem__(mid, [r.value for r in rcs])
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc.value)
        self.client.on_message = lambda _c, _u, m: self.messages.append(m.topic)
        self.client.on_disconnect = lambda *_a: done.set()
        try:
            self.client.connect("127.0.0.1", port)
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
            return
        self.client.loop_start()
        done.wait(5)

    @property
    def accepted(self) -> bool:
        return bool(self.connack) and self.connack[0] == 0 and self.error is None

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.client.subscribe(topic, qos=1)
        assert wait_until(lambda: mid in self.subacks, 5)
        return self.subacks[mid]

    def publish(self, topic: str) -> int:
        info = self.client.publish(topic, b"{}", qos=1)
        assert wait_until(lambda: info.mid in self.pubacks, 5)
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _client_tls(stack: Stack, cert: str | None, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(stack.pki.path("ca/ca.crt")))
    if cert is not None:
        context.load_cert_chain(str(stack.pki.path(f"{cert}.crt")), str(stack.pki.path(f"{cert}.key")))
    if maximum is not None:
        with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = maximum
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1: the broker must refuse
    return context


def _handshake(port: int, context: ssl.SSLContext) -> str:
    """Open a TLS connection and send an MQTT CONNECT; return what happened."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04test")
            answer = tls.recv(4)
            return "connack" if answer[:1] == b"\x20" else f"closed {answer!r}"
    except (OSError, ssl.SSLError) as exc:
        return f"refused: {exc}"


NOT_AUTHORIZED = 0x87
BAD_USER_OR_PASSWORD = 0x86


# --------------------------------------------------------------------------- S1, S2


def test_s1_anonymous_and_wrong_passwords_are_refused(stack: Stack) -> None:
    """S1: no anonymous client on any listener; a wrong password is refused."""
    probes = [
        Probe(stack.broker.port),
        Probe(stack.broker.port, user="mgtwin", password="not-the-password"),
        Probe(stack.broker.port, user="nobody", password="x"),
        Probe(stack.tls_port, tls=_client_tls(stack, None)),  # TLS without a client certificate
    ]
    try:
        assert not any(p.accepted for p in probes)
        assert probes[0].connack
        assert probes[0].connack[0] in (NOT_AUTHORIZED, BAD_USER_OR_PASSWORD)
        assert probes[1].connack == [BAD_USER_OR_PASSWORD] or probes[1].connack == [NOT_AUTHORIZED]
        good = Probe(stack.broker.port, user="mgtwin", password=stack.twin_password)
        probes.append(good)
        assert good.accepted
    finally:
        for p in probes:
            p.close()


def test_s2_the_acl_confines_each_user_and_the_twin_works(stack: Stack, tmp_path: Path) -> None:
    """S2: an emulator writes only its own site's telemetry and reads nothing (not even with ``#``); the
    twin's user reads telemetry and writes only the twin's topics; denials are logged; the twin ingests.
    """
    emulator = Probe(stack.broker.port, user=stack.site, password=stack.emulator_password)
    twin_user = Probe(stack.broker.port, user="mgtwin", password=stack.twin_password)
    try:
        assert emulator.accepted
        assert twin_user.accepted
        assert emulator.subscribe("#")[0] < 0x80  # Mosquitto grants it and filters every delivery by the ACL
        assert twin_user.subscribe(f"microgrid/{stack.site}/#")[0] < 0x80
        assert emulator.publish(f"microgrid/{stack.site}/packs/P1/telemetry") < 0x80
        assert emulator.publish("microgrid/other_site/packs/P1/telemetry") == NOT_AUTHORIZED
        assert emulator.publish(f"microgrid/{stack.site}/twin/state") == NOT_AUTHORIZED
        assert emulator.publish("$SYS/broker/fake") == NOT_AUTHORIZED
        assert twin_user.publish(f"microgrid/{stack.site}/packs/P2/telemetry") == NOT_AUTHORIZED
        assert twin_user.publish(f"microgrid/{stack.site}/twin/state") < 0x80
        assert wait_until(lambda: len(twin_user.messages) >= 1, 5)
        time.sleep(0.5)  # let any wrongly allowed delivery arrive (the assertions are on what came)
        assert twin_user.messages == [f"microgrid/{stack.site}/packs/P1/telemetry"]
        assert emulator.messages == []  # subscribed to '#', received nothing
        assert re.search(
            r"Denied PUBLISH from \S+ .*microgrid/other_site/packs/P1/telemetry", stack.broker.log_path.read_text()
        )
    finally:
        emulator.close()
        twin_user.close()
    # The twin itself, with its user and password: ingests what the emulator publishes.
    settings = settings_for(
        stack.site,
        stack.broker,
        tmp_path,
        influx_url=stack.influx.url,
        database=stack.db,
        mqtt={"username": "mgtwin", "password": stack.twin_password},
        influx={"username": "ingest", "password": stack.influx_password},
    )
    messages = fleet(stack.site, packs=3, steps=10, start_ms=_start_ms(0))
    with running(Service(settings)) as service:
        Feed(stack.broker.port, messages, username=stack.site, password=stack.emulator_password).start().join()
        _stored(stack, keys(messages))
        assert service.link.counters["callback_errors"] == 0
        # The ACL lets the twin read the broker's $SYS drop counter.
        assert wait_until(lambda: service.link.broker_dropped_abs is not None, 12)


def _start_ms(block: int) -> int:
    """Distinct time ranges for the tests that write to the shared secured database."""
    base = (time.time_ns() // 1_000_000 // 3_600_000) * 3_600_000 - 3_600_000
    return base + block * 600_000


def _stored(stack: Stack, expected: set[tuple[str, int]]) -> None:
    auth = stack.influx_admin

    def rows() -> set[tuple[str, int]]:
        answer = stack.influx.query('SELECT "seq", "pack" FROM "pack_telemetry"', db=stack.db, auth=auth)
        out = set()
        for series in answer["results"][0].get("series", []):
            cols = series["columns"]
            out |= {(v[cols.index("pack")], int(v[cols.index("seq")])) for v in series["values"]}
        return out

    assert wait_until(lambda: expected <= rows(), 20, 0.25), sorted(expected - rows())[:5]


# --------------------------------------------------------------------------- S3


def test_s3_tls_refuses_plain_untrusted_expired_and_old_tls_and_the_twin_works(stack: Stack, tmp_path: Path) -> None:
    """S3: on the TLS listener, plain TCP, a rogue CA's or an expired client certificate, and TLS 1.1 are
    refused; the twin refuses a broker with an expired certificate; with its certificate (CN=mgtwin)
    and TLS 1.2+ it connects, and the ACL applies to it by its certificate's name.
    """
    # Plain MQTT to the TLS port: no CONNACK.
    with socket.create_connection(("127.0.0.1", stack.tls_port), timeout=5) as raw:
        raw.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04test")
        raw.settimeout(5)
        try:
            answer = raw.recv(4)
        except OSError:
            answer = b""
        assert answer[:1] != b"\x20"
    assert _handshake(stack.tls_port, _client_tls(stack, "twin")) == "connack"
    for cert in ("rogue-twin", "expired-twin"):
        assert _handshake(stack.tls_port, _client_tls(stack, cert)) != "connack", cert
    old = _handshake(stack.tls_port, _client_tls(stack, "twin", maximum=ssl.TLSVersion.TLSv1_1))
    assert old.startswith("refused"), old
    assert _handshake(stack.tls_port, _client_tls(stack, "twin", maximum=ssl.TLSVersion.TLSv1_2)) == "connack"

    tls = {
        "tls_ca_file": stack.pki.path("ca/ca.crt"),
        "tls_cert_file": stack.pki.path("twin.crt"),
        "tls_key_file": stack.pki.path("twin.key"),
    }
    # The twin verifies the broker: an expired server certificate is refused.
    refused = Service(settings_for(stack.site, f"mqtts://127.0.0.1:{stack.expired_tls_port}", tmp_path / "x", mqtt=tls))
    with warnings.catch_warnings():
        # paho 2.2 leaves the socket of a failed TLS handshake to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(BrokerError, match="expired"):
            refused.start()
        gc.collect()
    refused.close()
    settings = settings_for(
        stack.site,
        f"mqtts://127.0.0.1:{stack.tls_port}",
        tmp_path,
        influx_url=stack.influx.url,
        database=stack.db,
        mqtt=tls,
        influx={"username": "ingest", "password": stack.influx_password},
    )
    messages = fleet(stack.site, packs=3, steps=10, start_ms=_start_ms(1))
    assert settings.mqtt.username is None  # no password on this listener: the certificate is the login
    with running(Service(settings)) as service:
        assert service.link.connected.is_set()
        Feed(stack.broker.port, messages, username=stack.site, password=stack.emulator_password).start().join()
        # Stored: the ACL let the certificate's CN (mgtwin) read the site's telemetry.
        _stored(stack, keys(messages))


# --------------------------------------------------------------------------- S4, S6


def test_s4_s6_influxdb_least_privilege_and_no_secret_in_any_log(
    stack: Stack, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """S4: unauthenticated writes 401; the twin's user cannot DROP DATABASE or read (403), Grafana's cannot
    write (403); the twin writes with Basic auth as that user. S6: the passwords, passed through the
    environment and a secret file, appear in no log, metric, health answer or command line.
    """
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    def call(path: str, body: bytes, auth: tuple[str, str] | None) -> int:
        req = urllib.request.Request(stack.influx.url + path, data=body, method="POST")
        if auth is not None:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    line = b"pack_telemetry,pack=X,site=s seq=1i 1700000000000"
    ingest = ("ingest", stack.influx_password)
    assert call("/write?db=secured&precision=ms", line, None) == 401
    assert call("/query", urllib.parse.urlencode({"q": 'DROP DATABASE "secured"'}).encode(), ingest) == 403
    assert call("/query", urllib.parse.urlencode({"q": "SHOW MEASUREMENTS", "db": "secured"}).encode(), ingest) == 403
    assert call("/write?db=secured&precision=ms", line, ("grafana", stack.grafana_password)) == 403
    assert call("/write?db=secured&precision=ms", line, ("ingest", "wrong")) == 401

    secret_file = tmp_path / "influx-password"
    secret_file.write_text(stack.influx_password + "\n")
    secret_file.chmod(0o600)
    env = {
        "MGTWIN_MQTT__URL": stack.broker.url,
        "MGTWIN_MQTT__USERNAME": "mgtwin",
        "MGTWIN_MQTT__PASSWORD": stack.twin_password,
        "MGTWIN_INFLUX__URL": stack.influx.url,
        "MGTWIN_INFLUX__DATABASE": stack.db,
        "MGTWIN_INFLUX__USERNAME": "ingest",
        "MGTWIN_INFLUX__PASSWORD_FILE": str(secret_file),
    }
    messages = fleet(stack.site, packs=3, steps=10, start_ms=_start_ms(2))
    texts: list[str] = []
    with serve_processes() as procs:
        serve = ServeProcess(tmp_path, stack.site, env).start()
        procs.append(serve)
        assert serve.proc is not None
        texts.append(Path(f"/proc/{serve.proc.pid}/cmdline").read_bytes().decode(errors="replace"))
        Feed(stack.broker.port, messages, username=stack.site, password=stack.emulator_password).start().join()
        _stored(stack, keys(messages))
        texts += [serve.metrics(), str(serve.health())]
        serve.signal(signal_term())
        assert serve.wait(30) == 0
        texts.append(serve.output())
        # A wrong MQTT password: a clear error, exit 2, and the password is not in it.
        wrong = ServeProcess(tmp_path, stack.site, {**env, "MGTWIN_MQTT__PASSWORD": stack.twin_password + "-wrong"})
        procs.append(wrong.spawn())
        assert wrong.wait(40) == 2
        out = wrong.output()
        assert "did not accept the connection" in out
        assert stack.twin_password not in out
        texts.append(out)
    # Every log of this run: the servers', the twin's, and what pytest captured.
    texts += [p.read_text(errors="replace") for p in stack.folder.rglob("*.log")]
    texts += [p.read_text(errors="replace") for p in tmp_path.rglob("*.log")]
    captured = capfd.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    assert len(texts) > 6
    for secret in stack.secrets:
        leaks = [t[max(0, t.find(secret) - 80) : t.find(secret) + 40] for t in texts if secret in t]
        assert not leaks, leaks
    payload = messages[0].payload.decode()
    assert not any(payload in t for t in texts)  # no full payload at INFO either


def signal_term() -> Any:
    import signal

    return signal.SIGTERM


# --------------------------------------------------------------------------- S5


def test_s5_grafana_and_the_repository_hold_no_secret() -> None:
    """S5 (lint, no runtime): Grafana's admin password and the datasource token come from the
    environment, anonymous access is off, the datasource is not editable, every published port
    binds 127.0.0.1 by default; no private key or real password file is in the repository.
    """
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]*\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/influxdb.yaml").read_text())
    for source in datasource["datasources"]:
        assert source["editable"] is False
        secure = source.get("secureJsonData", {})
        assert secure
        assert all(re.search(r"\$\{[A-Z_]+\}", str(v)) for v in secure.values())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    # No private key, password file or token in the repository (generated material lives in tmp dirs).
    skip = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "node_modules"}
    offenders = []
    for path in ROOT.rglob("*"):
        if not path.is_file() or skip & set(path.relative_to(ROOT).parts) or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="ignore")
        if "PRIVATE KEY-----" in text and "BEGIN" in text and path.suffix != ".py":
            offenders.append(str(path))
        if re.search(r"^[A-Za-z0-9_-]+:\$7\$", text, re.MULTILINE) and path.name != "passwd.example":
            offenders.append(str(path))
    assert not offenders, offenders


# --------------------------------------------------------------------------- S7


def _listening(pid: int) -> list[tuple[str, int]]:
    return [
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.Process(pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]


def _embedded_broker() -> EmbeddedBroker:
    """The demo's broker with its defaults; its free port may be taken by someone else before it binds."""
    for attempt in range(3):
        try:
            return EmbeddedBroker().start()
        except BrokerError:
            if attempt == 2:
                raise
    raise AssertionError


def test_s7_every_listener_binds_loopback(stack: Stack, tmp_path: Path) -> None:
    """S7: every socket the test stack and the twin listen on is on 127.0.0.1 or ::1.

    The broker (plain and TLS listeners), influxd (HTTP and RPC), ``mgtwin serve``'s health
    endpoint, the in-process service's, and the demo's embedded broker, each with its defaults.
    """
    assert stack.broker.proc is not None
    assert stack.influx.proc is not None
    seen = {"mosquitto": _listening(stack.broker.proc.pid), "influxd": _listening(stack.influx.proc.pid)}
    assert len(seen["mosquitto"]) >= 3
    assert len(seen["influxd"]) >= 2
    env = {
        "MGTWIN_MQTT__URL": stack.broker.url,
        "MGTWIN_MQTT__USERNAME": "mgtwin",
        "MGTWIN_MQTT__PASSWORD": stack.twin_password,
    }
    with serve_processes() as procs:
        serve = ServeProcess(tmp_path, stack.site, env).start()
        procs.append(serve)
        assert serve.proc is not None
        seen["serve"] = _listening(serve.proc.pid)
        assert (metrics_text(serve.health_port) or "").startswith("#")
        serve.signal(signal_term())
        serve.wait(30)
    settings = settings_for(
        stack.site, stack.broker, tmp_path / "inproc", mqtt={"username": "mgtwin", "password": stack.twin_password}
    )
    before = set(_listening(os.getpid()))
    demo = _embedded_broker()
    try:
        with running(Service(settings)) as service:
            assert service.health is not None
            seen["in-process"] = [s for s in _listening(os.getpid()) if s not in before]
            assert service.health.port in {port for _, port in seen["in-process"]}
            assert demo.port in {port for _, port in seen["in-process"]}
    finally:
        demo.stop()
    for name, sockets in seen.items():
        assert sockets, name
        wide = [s for s in sockets if s[0] not in LOOPBACK]
        assert not wide, (name, wide)
