"""The docker compose stack, checked without a Docker engine.

The compose file, .env.example, the Dockerfile and the provisioning files must agree with each
other and with the twin: every variable the compose file interpolates is defined in
.env.example, every MGTWIN_* variable given to the twin is one it reads (and the twin loads its
settings from exactly that environment), every setting the twin reads is documented in
.env.example, provisioning paths exist, images are pinned, ports are bound to loopback. The
broker's configuration, password script and ACL are run for real with the local Mosquitto.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from emulators.scenario import load_scenario
from tests.servers import free_port, require_binary
from twin.config import env_names, load_settings
from twin.dashboards import DATASOURCE_UID, build_dashboards

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DEPLOY = ROOT / "deploy"

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")
_VERSION_TAG = re.compile(r"^[a-z0-9./_-]+:\d+\.\d+\.\d+(-[a-z0-9.]+)*$")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def env_example() -> dict[str, str]:
    """The variables .env.example sets (uncommented lines only)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against ``env`` ($$ is a literal $)."""

    def one(match: re.Match[str]) -> str:
        whole = match.group(0)
        name = match.group(1)
        if name in env and env[name] != "":
            return env[name]
        if ":-" in whole:
            return whole.split(":-", 1)[1][:-1]
        msg = f"{name} is not set"
        raise AssertionError(msg)

    return _VAR_RE.sub(one, text.replace("$$", "\x00")).replace("\x00", "$")


def service_env(name: str) -> dict[str, str]:
    raw = compose()["services"][name].get("environment", {})
    env = env_example()
    return {k: interpolate(str(v), env) for k, v in raw.items()}


def test_every_interpolated_variable_is_in_env_example() -> None:
    used = set(_VAR_RE.findall(COMPOSE.read_text()))
    defined = env_example()
    with_default = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-", COMPOSE.read_text()))
    missing = sorted(used - set(defined) - with_default)
    assert not missing, f".env.example does not define {missing}"
    assert {"SITE", "INFLUX_TOKEN", "GRAFANA_ADMIN_PASSWORD", "MQTT_TWIN_PASSWORD"} <= used
    # Secrets have no default in the compose file: a missing one stops `docker compose up`.
    text = COMPOSE.read_text()
    for secret in ("INFLUX_TOKEN", "INFLUX_ADMIN_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "MQTT_TWIN_PASSWORD"):
        assert f"${{{secret}:-" not in text
        assert f"${{{secret}:?" in text


def test_the_twin_reads_its_settings_from_the_compose_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = service_env("twin")
    known = env_names()
    unknown = sorted(k for k in env if k.startswith("MGTWIN_") and k not in known)
    assert not unknown, f"the twin does not read {unknown}"
    for key in [k for k in os.environ if k.upper().startswith("MGTWIN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    example = env_example()
    assert settings.site == example["SITE"] == load_scenario("nevada").site
    assert settings.mqtt.url == "mqtt://mosquitto:1883"
    assert settings.mqtt.username == "mgtwin"
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == example["MQTT_TWIN_PASSWORD"]
    assert (settings.influx.url, settings.influx.api) == ("http://influxdb:8086", "v2")
    assert settings.influx.token is not None
    assert settings.influx.token.get_secret_value() == example["INFLUX_TOKEN"]
    assert settings.influx.org == example["INFLUX_ORG"]
    assert settings.influx.bucket == example["INFLUX_BUCKET"]
    # The health check asks the port the twin serves /healthz on.
    check = " ".join(compose()["services"]["twin"]["healthcheck"]["test"])
    assert f":{settings.health.port}/healthz" in check


def test_every_setting_the_twin_reads_is_documented_in_env_example() -> None:
    text = ENV_EXAMPLE.read_text()
    undocumented = sorted(name for name in env_names() if not re.search(rf"^#? ?{name}=", text, re.MULTILINE))
    assert not undocumented, f"document {undocumented} in .env.example"


def test_the_emulator_gets_the_credentials_emulate_reads() -> None:
    env = service_env("emulator")
    cli = (ROOT / "twin" / "cli.py").read_text()
    for name in ("MGTWIN_EMULATOR_USERNAME", "MGTWIN_EMULATOR_PASSWORD"):
        assert f'"{name}"' in cli
        assert name in env
    # Its user name is its site, which the broker's ACL patterns confine to that site's topics.
    assert env["MGTWIN_EMULATOR_USERNAME"] == env_example()["SITE"]
    # No twin setting leaks into the emulator (and no emulator variable into the twin: it would refuse it).
    assert not [k for k in env if k.startswith("MGTWIN_") and not k.startswith("MGTWIN_EMULATOR_")]
    assert not [k for k in service_env("twin") if k.startswith("MGTWIN_EMULATOR_")]


def test_images_are_pinned_ports_loopback_health_checks_restart_volumes() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"mosquitto", "influxdb", "grafana", "twin", "emulator"}
    defaults = env_example()
    assert defaults["BIND_ADDRESS"] == "127.0.0.1"
    named = set(data.get("volumes") or {})
    used_named: set[str] = set()
    for name, svc in services.items():
        image = svc["image"]
        assert _VERSION_TAG.match(image), f"{name}: image {image!r} is not pinned to a full version"
        assert "latest" not in image
        assert svc.get("restart") == "unless-stopped", name
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port} is not bound to loopback"
            assert interpolate(port, defaults).startswith("127.0.0.1:")
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                used_named.add(source)
    assert used_named == named, "every named volume is declared and used"
    assert services["twin"]["command"] == ["mgtwin", "serve"]
    assert services["twin"]["build"] == "."
    assert services["emulator"]["image"] == services["twin"]["image"]


def test_grafana_provisioning_is_consistent() -> None:
    svc = compose()["services"]["grafana"]
    env = service_env("grafana")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == env_example()["GRAFANA_ADMIN_PASSWORD"]
    mounts = dict(v.split(":")[:2] for v in svc["volumes"])
    provisioning = ROOT / next(s for s, t in mounts.items() if t == "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "influxdb.yaml").read_text())["datasources"]
    assert len(datasources) == 1
    ds = datasources[0]
    assert (ds["uid"], ds["type"], ds["jsonData"]["version"]) == (DATASOURCE_UID, "influxdb", "InfluxQL")
    assert ds["jsonData"]["httpHeaderName1"] == "Authorization"
    assert ds["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUX_TOKEN}"
    # Every ${VAR} of the provisioning files comes from Grafana's environment (no secret in the file).
    text = (provisioning / "datasources" / "influxdb.yaml").read_text()
    resolved = interpolate(text, env)
    assert env_example()["INFLUX_TOKEN"] in resolved
    assert yaml.safe_load(resolved)["datasources"][0]["url"] == "http://influxdb:8086"
    # The 1.x variant authenticates with a user and password, from the environment too.
    v1 = yaml.safe_load((DEPLOY / "grafana" / "influxdb-1x-datasource.yaml").read_text())["datasources"][0]
    assert (v1["uid"], v1["user"], v1["secureJsonData"]["password"]) == (
        DATASOURCE_UID,
        "${INFLUX_USER}",
        "${INFLUX_PASSWORD}",
    )
    # The dashboard provider reads the folder where ./dashboards is mounted, which holds every dashboard.
    provider = yaml.safe_load((provisioning / "dashboards" / "microgrid.yaml").read_text())["providers"][0]
    assert mounts["./dashboards"] == provider["options"]["path"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(provider["options"]["path"] + "/")
    assert sorted(p.name for p in (ROOT / "dashboards").glob("*.json")) == sorted(build_dashboards())


def test_dockerfile_is_pinned_unprivileged_and_carries_the_emulator_script() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1))
    assert re.search(r"^USER\s+(?!root)\w+", text, re.MULTILINE)
    assert "COPY deploy/emulator" in text
    command = compose()["services"]["emulator"]["command"]
    assert command[-1] == "/opt/mgtwin/deploy/emulator/run.sh"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored
    assert ".venv" in ignored


def test_the_live_emulator_starts_now_at_real_time() -> None:
    """The compose emulator stamps the present (`--start now`, tested in test_cli) and runs at 1x."""
    run_sh = (DEPLOY / "emulator" / "run.sh").read_text()
    assert "mgtwin emulate --scenario" in run_sh
    assert "--start now" in run_sh
    assert "--speed 1" in run_sh
    assert "--mqtt" in run_sh


# --------------------------------------------------------------------------- the broker, for real


class _Client:
    """A paho client that records CONNACK, SUBACK, PUBACK reason codes and messages (MQTT 5)."""

    def __init__(self, port: int, user: str | None, password: str | None) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"acl-{user}-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        self.connack: list[Any] = []
        self.subacks: dict[int, list[Any]] = {}
        self.pubacks: dict[int, Any] = {}
        self.messages: list[str] = []
        self.event = threading.Event()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: (self.connack.append(rc), self.event.set())
        self.client.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.__setitem__(mid, list(rcs))
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc)
        self.client.on_message = lambda _c, _u, m: self.messages.append(m.topic)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.event.wait(5)

    @property
    def accepted(self) -> bool:
        return bool(self.connack) and not self.connack[0].is_failure

    def subscribe(self, topic: str) -> list[Any]:
        _, mid = self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + 5
        while mid not in self.subacks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.subacks[mid]

    def publish(self, topic: str) -> Any:
        info = self.client.publish(topic, b"{}", qos=1)
        deadline = time.monotonic() + 5
        while info.mid not in self.pubacks and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_broker_refuses_anonymous_and_confines_each_user(tmp_path: Path) -> None:
    require_binary("mosquitto")
    require_binary("mosquitto_passwd")
    port = free_port()
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    conf = conf.replace("listener 1883\n", f"listener {port} 127.0.0.1\n")
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/").replace(
        "/mosquitto/config/acl", str(DEPLOY / "mosquitto" / "acl")
    )
    conf = conf.replace("log_dest stdout", f"log_dest file {tmp_path}/mosquitto.log")
    if os.geteuid() == 0:
        conf += "user root\n"  # as root mosquitto would switch to its own user, who cannot write tmp_path
    (tmp_path / "mosquitto.conf").write_text(conf)
    env = {
        **os.environ,
        "PATH": f"/usr/sbin:/usr/bin:/bin:{os.environ.get('PATH', '')}",
        "SITE": "siteA",
        "MQTT_TWIN_PASSWORD": "twin-secret",
        "MQTT_EMULATOR_PASSWORD": "emu-secret",
        "MOSQUITTO_PASSWORD_FILE": str(tmp_path / "passwd"),
        "MOSQUITTO_CONF": str(tmp_path / "mosquitto.conf"),
    }
    proc = subprocess.Popen(["/bin/sh", str(DEPLOY / "mosquitto" / "entrypoint.sh")], env=env)
    clients: list[_Client] = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert proc.poll() is None, (
                (tmp_path / "mosquitto.log").read_text() if (tmp_path / "mosquitto.log").exists() else ""
            )
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        assert "twin-secret" not in (tmp_path / "passwd").read_text()  # hashed

        anonymous = _Client(port, None, None)
        clients.append(anonymous)
        assert not anonymous.accepted
        wrong = _Client(port, "mgtwin", "not-the-password")
        clients.append(wrong)
        assert not wrong.accepted

        twin = _Client(port, "mgtwin", "twin-secret")
        emulator = _Client(port, "siteA", "emu-secret")
        clients += [twin, emulator]
        assert twin.accepted
        assert emulator.accepted
        not_authorized = 0x87
        # Mosquitto grants any subscription and filters each message on delivery by the ACL.
        assert twin.subscribe("microgrid/#")[0].value < 0x80
        assert emulator.subscribe("microgrid/#")[0].value < 0x80
        # The emulator writes its own site's telemetry, and the twin receives it.
        assert emulator.publish("microgrid/siteA/packs/P1/telemetry").value < 0x80
        assert emulator.publish("microgrid/siteA/site/telemetry").value < 0x80
        # ...but not another site's, nor the twin's topics.
        assert emulator.publish("microgrid/siteB/packs/P1/telemetry").value == not_authorized
        assert emulator.publish("microgrid/siteA/twin/state").value == not_authorized
        # The twin writes its own topics, never telemetry.
        assert twin.publish("microgrid/siteA/twin/state").value < 0x80
        assert twin.publish("microgrid/siteA/packs/P2/telemetry").value == not_authorized
        time.sleep(0.5)
        # The twin read exactly the telemetry the emulator was allowed to write (not its own
        # topics); the emulator read nothing at all.
        assert sorted(twin.messages) == ["microgrid/siteA/packs/P1/telemetry", "microgrid/siteA/site/telemetry"]
        assert emulator.messages == []
        # The compose health check's command works with these credentials.
        check = compose()["services"]["mosquitto"]["healthcheck"]["test"][1]
        check = check.replace("$$", "$").replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {port}")
        result = subprocess.run(
            ["/bin/sh", "-c", check], env=env, capture_output=True, text=True, timeout=20, check=False
        )
        assert result.returncode == 0, result.stderr
        assert shlex.split(check)[0] == "mosquitto_sub"
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(10)
