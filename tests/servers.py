"""Real Mosquitto and InfluxDB servers for tests and benchmarks.

Each server binds to 127.0.0.1 on a free port, keeps its state in a folder it is given,
and is stopped by whoever started it (``stop()`` ends only its own process). A missing
binary is an error that says how to install it: the tests never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Influxd", "Mosquitto", "ServerError", "free_port", "require_binary"]

_INSTALL_HINT = {
    "mosquitto": "apt-get install mosquitto mosquitto-clients (Debian) or brew install mosquitto",
    "mosquitto_pub": "apt-get install mosquitto-clients",
    "mosquitto_sub": "apt-get install mosquitto-clients",
    "influxd": "apt-get install influxdb (Debian 12 ships 1.6.7) or install InfluxDB 1.x from influxdata.com",
}


class ServerError(RuntimeError):
    """A test server is missing or failed to start."""


def require_binary(name: str) -> str:
    """Return the path of a server binary, or fail with how to install it."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if found is None:
        hint = _INSTALL_HINT.get(name, f"install {name}")
        msg = f"{name} is not installed; `make test` installs it, or by hand: {hint}"
        raise ServerError(msg)
    return found


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            msg = f"server exited with {proc.returncode}; log {log}:\n{log.read_text(errors='replace')[-2000:]}"
            raise ServerError(msg)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    msg = f"server did not listen on 127.0.0.1:{port} within {timeout_s} s; log {log}"
    raise ServerError(msg)


@dataclass
class _Server:
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def _spawn(self, argv: list[str]) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        finally:
            log.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the server process (e.g. SIGSTOP to make it hang)."""
        if self.proc is not None:
            os.kill(self.proc.pid, signum)

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Mosquitto(_Server):
    """A Mosquitto broker on 127.0.0.1 with persistence in ``workdir``.

    Args:
        workdir: state, config and log folder.
        extra_conf: extra lines for mosquitto.conf (ACLs, passwords, limits).
        max_queued_messages: per-client queue bound; large by default so tests measure the twin.
        max_inflight_messages: QoS 1/2 messages in flight to one MQTT 3.1.1 client; an MQTT 5
            client's Receive Maximum replaces it for that client (mosquitto 2.0).
        sys_interval: seconds between ``$SYS`` updates (None: the broker's default, 10 s).
        autosave_on_changes: save the persistence file after ``autosave_interval`` changes
            instead of seconds (here: after every change).
        log_types: what the broker logs (``all`` includes ACL denials, logged at debug level).
        extra_ports: further listener ports (given in ``extra_conf``) to wait for at start.

    ``start()`` may be called again after ``stop()``: the same port, configuration and
    persistence folder (a broker restart).
    """

    extra_conf: str = ""
    max_queued_messages: int = 1_000_000
    max_inflight_messages: int = 1000
    sys_interval: int | None = None
    autosave_on_changes: bool = False
    log_types: tuple[str, ...] = ("error", "warning", "notice")
    extra_ports: tuple[int, ...] = ()

    @property
    def url(self) -> str:
        """The broker's ``mqtt://`` URL."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        """Write the config and start the broker; return when it listens."""
        binary = require_binary("mosquitto")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.workdir / "mosquitto.conf"
        anonymous = "" if "allow_anonymous" in self.extra_conf else "allow_anonymous true\n"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # As root, mosquitto would drop to the `mosquitto` user and fail to save its
            # persistence file in our root-owned folder: keep the user we run as.
            f"{'user root' + chr(10) if os.geteuid() == 0 else ''}"
            f"{anonymous}"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            f"{'autosave_on_changes true' + chr(10) if self.autosave_on_changes else ''}"
            f"max_queued_messages {self.max_queued_messages}\n"
            f"max_inflight_messages {self.max_inflight_messages}\n"
            f"{f'sys_interval {self.sys_interval}' + chr(10) if self.sys_interval is not None else ''}"
            "log_dest stderr\n" + "".join(f"log_type {t}\n" for t in self.log_types) + f"{self.extra_conf}\n"
        )
        self._spawn([binary, "-c", str(conf)])
        assert self.proc is not None
        for port in (self.port, *self.extra_ports):
            _wait_port(port, self.proc, self.log_path, timeout_s)
        return self


@dataclass
class Influxd(_Server):
    """An InfluxDB 1.x server on 127.0.0.1 with its data in ``workdir``."""

    auth_enabled: bool = False
    rpc_port: int = 0

    @property
    def url(self) -> str:
        """The server's HTTP URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Influxd:
        """Write the config and start influxd; return when it answers /ping."""
        binary = require_binary("influxd")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.rpc_port = self.rpc_port or free_port()
        conf = self.workdir / "influxdb.conf"
        conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{self.rpc_port}"\n'
            "[meta]\n"
            f'  dir = "{self.workdir}/meta"\n'
            "[data]\n"
            f'  dir = "{self.workdir}/data"\n'
            f'  wal-dir = "{self.workdir}/wal"\n'
            '  index-version = "inmem"\n'
            "  query-log-enabled = false\n"
            "  trace-logging-enabled = false\n"
            "[monitor]\n"
            "  store-enabled = false\n"
            "[http]\n"
            f'  bind-address = "127.0.0.1:{self.port}"\n'
            f"  auth-enabled = {'true' if self.auth_enabled else 'false'}\n"
            "  log-enabled = false\n"
            "[logging]\n"
            '  level = "warn"\n'
            "[continuous_queries]\n"
            "  enabled = false\n"
        )
        self._spawn([binary, "-config", str(conf)])
        assert self.proc is not None
        _wait_port(self.port, self.proc, self.log_path, timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/ping", timeout=1) as resp,
            ):
                if resp.status == 204:
                    return self
            time.sleep(0.1)
        msg = f"influxd did not answer /ping within {timeout_s} s; log {self.log_path}"
        raise ServerError(msg)

    def query(self, q: str, *, db: str | None = None, auth: tuple[str, str] | None = None) -> dict[str, Any]:
        """Run an InfluxQL query over HTTP and return the decoded JSON answer."""
        params = {"q": q, "epoch": "ms"}
        if db:
            params["db"] = db
        req = urllib.request.Request(f"{self.url}/query", data=urllib.parse.urlencode(params).encode(), method="POST")
        if auth is not None:
            import base64

            req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            result: dict[str, Any] = json.load(resp)
            return result

    def write(self, db: str, lines: str, *, precision: str = "ms") -> int:
        """Write line protocol to ``/write``; return the HTTP status."""
        url = f"{self.url}/write?" + urllib.parse.urlencode({"db": db, "precision": precision})
        req = urllib.request.Request(url, data=lines.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
