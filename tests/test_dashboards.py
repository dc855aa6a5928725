"""Grafana dashboards: their JSON, every query against an InfluxDB the twin filled, and the push to Grafana.

The integration tests run the real twin (:class:`twin.app.Service`) on the real Mosquitto and
InfluxDB of the session, feed it an emulated site, then run every query of every panel the
way Grafana would. Panels whose fields the twin writes today must return data; those reading a
field the twin does not write yet (computed from twin.points and what InfluxDB holds, never
listed by hand) are reported as waiting. The overview's site SoC and energy must equal what
the twin itself published on ``twin/state`` at the same event time.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import polars as pl
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from emulators.publisher import encode_rows
from emulators.run import Emulation, EmulationOptions
from emulators.scenario import load_scenario
from tests.servers import Influxd, Mosquitto, free_port
from twin import contract as c
from twin.app import Service
from twin.cli import app
from twin.clock import ManualClock
from twin.config import load_settings
from twin.dashboards import (
    DATASOURCE,
    DATASOURCE_UID,
    FOLDER_UID,
    InfluxCredentials,
    build_dashboards,
    check_dashboards,
    iter_queries,
    query_refs,
    render_query,
    write_dashboards,
)
from twin.points import MEASUREMENTS

ROOT = Path(__file__).resolve().parent.parent
_names = itertools.count()


# --------------------------------------------------------------------------- the JSON, structurally


def test_dashboard_files_are_the_built_ones() -> None:
    assert write_dashboards(ROOT / "dashboards", check=True) == []
    for name, board in build_dashboards().items():
        assert json.loads((ROOT / "dashboards" / name).read_text()) == board


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return list(board["panels"])


def test_every_panel_is_complete_and_reads_only_declared_fields() -> None:
    boards = build_dashboards()
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    used: set[str] = set()
    for name, board in boards.items():
        ids = [p["id"] for p in _panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        cells: set[tuple[int, int]] = set()
        for panel in _panels(board):
            where = f"{name} panel {panel['id']} ({panel['title']})"
            assert panel["datasource"] == DATASOURCE, where
            pos = panel["gridPos"]
            assert {"h", "w", "x", "y"} <= set(pos), where
            assert pos["w"] > 0, where
            assert pos["h"] > 0, where
            assert pos["x"] + pos["w"] <= 24, where
            grid = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not (grid & cells), f"{where} overlaps another panel"
            cells |= grid
            assert panel["fieldConfig"]["defaults"]["unit"], f"{where} has no unit"
            assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"], where
            assert panel["description"], where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, where
                assert target["rawQuery"] is True, where
                assert target["resultFormat"] in ("time_series", "table"), where
                assert "$timeFilter" in target["query"], f"{where}: the query ignores the time range"
                assert '"site" =~ /^$site$/' in target["query"], f"{where}: the query ignores $site"
            # A band's upper series is filled down to a series the query really returns.
            aliases = {a for t in panel["targets"] for a in _aliases(t["query"])}
            by_tag = any(t["alias"].startswith("$tag_") for t in panel["targets"])  # series named by tag values
            for override in panel["fieldConfig"]["overrides"]:
                assert by_tag or override["matcher"]["options"] in aliases | {"Time", "severity"}, where
                for prop in override["properties"]:
                    if prop["id"] == "custom.fillBelowTo":
                        assert prop["value"] in aliases, where
        for q in iter_queries(board):
            refs, unknown = query_refs(q.query)
            assert not unknown, f"{name} {q.title}: {unknown} are not declared in twin.points"
            used |= {m for m, _ in refs}
        assert [v["datasource"] for v in board["templating"]["list"]] == [DATASOURCE] * len(board["templating"]["list"])
    assert used == set(MEASUREMENTS), "every measurement the twin writes is on a dashboard"


def _aliases(query: str) -> set[str]:
    import re

    return set(re.findall(r'AS "([^"]+)"', query))


def test_the_overview_shows_what_the_issue_asks_for() -> None:
    board = build_dashboards()["site-overview.json"]
    fields = set().union(*(query_refs(q.query)[0] for q in iter_queries(board)))
    wanted = {
        ("site_state", f)
        for f in (
            "battery_w", "load_w", "solar_w", "grid_w", "soc", "soc_p5", "soc_p95",
            "energy_to_floor_kwh", "energy_to_floor_kwh_p5", "energy_to_floor_kwh_p95",
            "runtime_s_p5", "runtime_s_p50", "runtime_s_p95", "ridethrough_s_p5", "ridethrough_s_p50",
            "ridethrough_s_p95", "packs_online", "packs_offline", "packs_excluded",
        )
    }  # fmt: skip
    assert wanted <= fields
    assert ("alerts", "state") in fields
    health = build_dashboards()["twin-health.json"]
    health_fields = set().union(*(query_refs(q.query)[0] for q in iter_queries(health)))
    assert {
        ("twin_health", f) for f in ("received", "lag_ms", "queue_depth", "write_retries", "invalid_*")
    } <= health_fields


def test_query_refs_reports_a_field_the_twin_does_not_declare() -> None:
    refs, unknown = query_refs('SELECT mean("soc") AS "a", mean("socc") FROM "site_state" WHERE $timeFilter')
    assert refs == {("site_state", "soc")}
    assert unknown == {"socc"}
    _, unknown = query_refs('SELECT last("x") FROM "no_such_measurement"')
    assert "no_such_measurement" in unknown


def test_render_query_substitutes_macros_and_variables_like_grafana() -> None:
    text = render_query(
        'SELECT mean("soc") FROM "site_state" WHERE "site" =~ /^$site$/ AND "pack" = \'${pack}\' AND $timeFilter '
        "GROUP BY time($__interval) -- $__interval_ms $__from $__to",
        from_ms=1_000_000,
        to_ms=1_000_000 + 24 * 3_600_000,
        variables={"site": "nevada", "pack": "P-1"},
    )
    assert '"site" =~ /^nevada$/' in text
    assert "\"pack\" = 'P-1'" in text
    assert "time >= 1000000ms and time <= 87400000ms" in text
    assert "GROUP BY time(120s)" in text  # 24 h over 1000 points, rounded up like Grafana
    assert "-- 120000 1000000 87400000" in text
    with pytest.raises(Exception, match="no value for the template variable"):
        render_query('SELECT 1 FROM "x" WHERE "pack" = \'$pack\'', from_ms=0, to_ms=1, variables={})


# --------------------------------------------------------------------------- a twin-populated InfluxDB


@dataclass
class Populated:
    """An InfluxDB database the twin filled, and what the twin published meanwhile."""

    influx: Influxd
    database: str
    site: str
    states: list[dict[str, Any]]
    published: int


def _chunk_items(site: str, emu: Emulation, first: bool, chunk: Any) -> list[tuple[str, bytes, bool]]:
    items: list[tuple[str, bytes, bool]] = []
    if first:
        for pack, payload in zip(emu.fleet.meta["pack"], encode_rows(emu.fleet.meta, c.PackMeta), strict=True):
            items.append((c.topic(c.TopicKind.PACK_META, site, pack), payload, True))
        status = emu.status_frame()
        for pack, payload in zip(status["pack"], encode_rows(status, c.PackStatus), strict=True):
            items.append((c.topic(c.TopicKind.PACK_STATUS, site, pack), payload, True))
    tele = chunk.telemetry.sort("ts_ms", "pack")
    for pack, payload in zip(tele["pack"], encode_rows(tele, c.PackTelemetry), strict=True):
        items.append((c.topic(c.TopicKind.PACK_TELEMETRY, site, pack), payload, False))
    for pack, payload in zip(chunk.cells["pack"], encode_rows(chunk.cells, c.PackCells), strict=True):
        items.append((c.topic(c.TopicKind.PACK_CELLS, site, pack), payload, False))
    for payload in encode_rows(chunk.site.with_columns(pl.lit(site).alias("site")), c.SiteTelemetry):
        items.append((c.topic(c.TopicKind.SITE_TELEMETRY, site), payload, False))
    return items


def _publish(client: mqtt.Client, items: list[tuple[str, bytes, bool]]) -> None:
    infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in items]
    for info in infos:
        info.wait_for_publish(30)
        assert info.is_published()


@pytest.fixture(scope="module")
def populated(mosquitto: Mosquitto, influxd: Influxd) -> Iterator[Populated]:
    """Ten minutes of a small site (8 packs), through the real twin into a fresh database."""
    site = f"dash{os.getpid()}_{next(_names)}"
    db = site
    influxd.query(f'CREATE DATABASE "{db}"')
    scenario = load_scenario("small").scaled(8).model_copy(update={"site": site, "faults": ()})
    emu = Emulation(scenario, EmulationOptions(duration_s=600, chunk_s=60, truth=False))
    clock = ManualClock(int(emu.trace.times_ms[0]))
    settings = load_settings(
        None,
        site=site,
        mqtt={"url": mosquitto.url, "client_id": f"mgtwin-{site}"},
        influx={"url": influxd.url, "database": db},
        health={"port": 0},
        publish={"interval_s": 0.2},
    )
    service = Service(settings, clock=clock)
    states: queue.Queue[bytes] = queue.Queue()
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{site}")
    watcher.on_message = lambda _c, _u, m: states.put(bytes(m.payload))
    watcher.connect("127.0.0.1", mosquitto.port)
    watcher.loop_start()
    watcher.subscribe(c.topic(c.TopicKind.TWIN_STATE, site), qos=1)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{site}")
    publisher.max_inflight_messages_set(1000)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    service.start()
    published = 0
    decoded: list[dict[str, Any]] = []
    try:
        for i, chunk in enumerate(emu.chunks()):
            items = _chunk_items(site, emu, i == 0, chunk)
            if i == 4:  # a few refused messages, so that invalid_{reason} counters exist
                items += [(f"microgrid/{site}/packs/P1/telemetry", b"{not json", False)] * 3
            _publish(publisher, items)
            published += len(items)
            deadline = time.monotonic() + 30
            while service.stats.counts["received"] < published and time.monotonic() < deadline:
                time.sleep(0.02)
            clock.t_ms = int(chunk.end_ms or chunk.telemetry["ts_ms"].max()) + 1000  # type: ignore[arg-type]
            # Wait for the state at this watermark to be published (and so written: both happen in one step).
            watermark = service.core.watermark_ms
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    state = c.decode(states.get(timeout=0.2)).model_dump(mode="json")
                except queue.Empty:
                    continue
                decoded.append(state)
                if int(state["ts_ms"]) >= watermark:
                    break
        service.request_stop()
        assert service.wait(20)
        time.sleep(0.5)  # the final, forced publish reaches the watcher
        while not states.empty():
            decoded.append(c.decode(states.get()).model_dump(mode="json"))
        yield Populated(influx=influxd, database=db, site=site, states=decoded, published=published)
    finally:
        service.close()
        if service.writer is not None:
            service.writer.close()  # Service.close leaves its InfluxDB connection pool to its owner
        for client in (watcher, publisher):
            client.disconnect()
            client.loop_stop()


@pytest.mark.integration
def test_every_panel_returns_data_for_the_fields_the_twin_writes(populated: Populated) -> None:
    report = check_dashboards(populated.influx.url, populated.database, variables={"site": populated.site})
    assert report.variables["site"] == populated.site
    assert report.variables["pack"].startswith(("ultium", "bolt", "leaf", "lfp"))  # resolved by the variable's query
    written = report.written
    assert ("site_state", "soc") in written  # the database really is the twin's
    expected, waiting = [], []
    for check in report.checks:
        assert check.status != "error", (
            f"{check.query.dashboard} {check.query.title}: {check.message}\n{check.rendered}"
        )
        refs, _ = query_refs(check.query.query)
        ready = all(
            (m, f) in written if not f.endswith("*") else any(w[0] == m and w[1].startswith(f[:-1]) for w in written)
            for m, f in refs
        )
        (expected if ready else waiting).append(check)
    for check in expected:
        where = f"{check.query.dashboard} / {check.query.title} [{check.query.ref_id}]"
        assert check.status == "ok", f"{where}: {check.status} {check.message}\n{check.rendered}"
        assert check.values > 0
    for check in waiting:
        assert check.missing, "a waiting panel names the fields it waits for"
        assert check.status in ("waiting", "ok")  # ok when it shows other fields beside the missing one
    assert len(expected) >= 30
    # What waits, for the record (pytest -rP shows it): fields declared in twin.points, not written yet.
    sys.stdout.write(
        "panels waiting for fields the twin does not write yet:\n"
        + "".join(
            f"  {c.query.dashboard} / {c.query.title}: {', '.join(f'{m}.{f}' for m, f in c.missing)}\n" for c in waiting
        )
    )


def _panel_query(board: str, title: str) -> str:
    panel = next(p for p in build_dashboards()[board]["panels"] if p["title"] == title)
    return str(panel["targets"][0]["query"])


@pytest.mark.integration
def test_overview_soc_and_energy_equal_the_twins_published_state(populated: Populated) -> None:
    last_by_ts: dict[int, dict[str, Any]] = {}
    for state in populated.states:
        last_by_ts[int(state["ts_ms"])] = state  # a later publish at the same event time overwrites the point
    assert len(last_by_ts) >= 5, "the twin published its state at several event times"
    soc_query = _panel_query("site-overview.json", "Site SoC")
    energy_query = _panel_query("site-overview.json", "Energy to the reserve floor")
    compared = 0
    for ts, state in sorted(last_by_ts.items())[-5:]:
        for query, key in ((soc_query, "soc"), (energy_query, "energy_to_floor_kwh")):
            text = render_query(query, from_ms=ts - 3_600_000, to_ms=ts, variables={"site": populated.site})
            series = populated.influx.query(text, db=populated.database)["results"][0]["series"]
            point_ts, value = series[0]["values"][0]
            assert point_ts == ts, f"the panel's latest point is the state's own event time ({key})"
            assert state[key] is not None
            assert value == pytest.approx(state[key], rel=1e-12, abs=1e-12), f"{key} at {ts}"
            compared += 1
    assert compared == 10


@pytest.mark.integration
def test_check_command_reports_each_panel_and_fails_only_on_real_problems(populated: Populated) -> None:
    runner = CliRunner()
    args = ["dashboards", "check", "--influx", populated.influx.url, "--influx-db", populated.database]
    args += ["--site", populated.site]
    result = runner.invoke(app, [*args, "--json"], env={"INFLUX_TOKEN": ""})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    statuses = {c["status"] for c in doc["checks"]}
    assert "ok" in statuses
    assert not statuses & {"error", "no data"}
    waiting = [c for c in doc["checks"] if c["status"] == "waiting"]
    assert all(c["missing"] for c in waiting)
    strict = runner.invoke(app, [*args, "--strict"])
    assert strict.exit_code == (1 if waiting else 0)
    table = runner.invoke(app, args)
    assert table.exit_code == 0
    assert "waiting for fields not written yet" in table.output
    # A range with no data at all: every panel whose fields exist now reports "no data", and the check fails.
    empty = runner.invoke(app, [*args, "--from", "2001-01-01T00:00:00Z", "--to", "2001-01-01T01:00:00Z", "--json"])
    assert empty.exit_code == 1
    assert {c["status"] for c in json.loads(empty.output)["checks"] if c["title"] == "Site SoC"} == {"no data"}


def _main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from twin.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_unreachable_influxdb_and_grafana_are_one_line_errors() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = _main("dashboards", "check", "--influx", dead)
    assert proc.returncode == 2
    assert "cannot reach InfluxDB" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _main("dashboards", "push", "--grafana", dead, env={"GRAFANA_TOKEN": "t"})
    assert proc.returncode == 2
    assert "cannot reach Grafana" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- push, against a fake Grafana


class _FakeGrafana(BaseHTTPRequestHandler):
    """Grafana's HTTP API as far as `dashboards push` uses it; records every request."""

    calls: list[tuple[str, str, dict[str, str], Any]]
    state: dict[str, bool]

    def log_message(self, *_args: object) -> None:
        """Keep the test output quiet."""

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.calls.append((self.command, self.path, dict(self.headers), body))
        route = (self.command, self.path)
        if route == ("GET", "/api/frontend/settings"):
            self._reply(200, {"buildInfo": {"version": "11.4.0"}})
        elif route == ("GET", f"/api/datasources/uid/{DATASOURCE_UID}"):
            if self.state.get("datasource"):
                self._reply(200, {"uid": DATASOURCE_UID, "id": 1})
            else:
                self._reply(404, {"message": "Data source not found"})
        elif route == ("POST", "/api/datasources"):
            self.state["datasource"] = True
            self._reply(200, {"id": 1, "message": "Datasource added"})
        elif route == ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}"):
            self._reply(200, {"message": "Datasource updated"})
        elif route == ("GET", f"/api/folders/{FOLDER_UID}"):
            if self.state.get("folder"):
                self._reply(200, {"uid": FOLDER_UID, "title": "Microgrid twin"})
            else:
                self._reply(404, {"message": "folder not found"})
        elif route == ("POST", "/api/folders"):
            self.state["folder"] = True
            self._reply(200, {"uid": FOLDER_UID, "title": body["title"]})
        elif route == ("POST", "/api/dashboards/db"):
            self._reply(200, {"status": "success", "uid": body["dashboard"]["uid"], "version": 1})
        else:
            self._reply(500, {"message": f"unexpected {route}"})

    do_GET = do_POST = do_PUT = _handle  # noqa: N815 - http.server's method names


def test_push_uploads_the_datasource_the_folder_and_every_dashboard() -> None:
    """A unit test of the requests `dashboards push` builds (grafana-client against a recording fake Grafana).

    Grafana is not installed here; the fake answers the few API routes the push uses, as
    Grafana 11 does, and the test checks what was sent: the datasource with its token header,
    the folder, each dashboard with overwrite into the folder, and the service-account token.
    """
    handler = type("Handler", (_FakeGrafana,), {"calls": [], "state": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {"GRAFANA_TOKEN": "glsa_secret", "INFLUX_TOKEN": "influx-secret", "INFLUX_USER": "", "GRAFANA_USER": ""}
    runner = CliRunner()
    try:
        first = runner.invoke(
            app, ["dashboards", "push", "--grafana", url, "--influx-url", "http://influxdb:8086"], env=env
        )
        assert first.exit_code == 0, first.output
        assert "secret" not in first.output
        calls = list(handler.calls)
        assert all(h.get("Authorization") == "Bearer glsa_secret" for _, _, h, _ in calls)
        posted = [(m, p) for m, p, _, _ in calls if m != "GET"]
        assert posted == [("POST", "/api/datasources"), ("POST", "/api/folders")] + [
            ("POST", "/api/dashboards/db")
        ] * len(build_dashboards())
        datasource = next(b for m, p, _, b in calls if (m, p) == ("POST", "/api/datasources"))
        assert datasource["uid"] == DATASOURCE_UID
        assert datasource["type"] == "influxdb"
        assert datasource["url"] == "http://influxdb:8086"
        assert datasource["jsonData"]["dbName"] == "microgrid"
        assert datasource["jsonData"]["version"] == "InfluxQL"
        assert datasource["jsonData"]["httpHeaderName1"] == "Authorization"
        assert datasource["secureJsonData"]["httpHeaderValue1"] == "Token influx-secret"
        boards = [b for m, p, _, b in calls if (m, p) == ("POST", "/api/dashboards/db")]
        assert sorted(b["dashboard"]["uid"] for b in boards) == sorted(d["uid"] for d in build_dashboards().values())
        for body in boards:
            assert body["folderUid"] == FOLDER_UID
            assert body["overwrite"] is True
            assert "id" not in body["dashboard"]
        # Again: the datasource is updated in place, the folder is kept.
        handler.calls.clear()
        second = runner.invoke(app, ["dashboards", "push", "--grafana", url], env=env)
        assert second.exit_code == 0, second.output
        changed = [(m, p) for m, p, _, _ in handler.calls if m != "GET"]
        assert changed[0] == ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}")
        assert ("POST", "/api/folders") not in changed
        # With a 1.x user and password instead of a token, the datasource carries those.
        handler.calls.clear()
        basic = {**env, "INFLUX_TOKEN": "", "INFLUX_USER": "grafana", "INFLUX_PASSWORD": "pw"}
        third = runner.invoke(app, ["dashboards", "push", "--grafana", url], env=basic)
        assert third.exit_code == 0, third.output
        update = next(b for m, _, _, b in handler.calls if m == "PUT")
        assert update["user"] == "grafana"
        assert update["secureJsonData"] == {"password": "pw"}
        assert "httpHeaderName1" not in update["jsonData"]
    finally:
        server.shutdown()
        server.server_close()


def test_influx_credentials_prefer_the_token() -> None:
    assert InfluxCredentials(token="t", username="u").header() == {"Authorization": "Token t"}
    assert InfluxCredentials(username="u", password="p").header() == {"Authorization": "Basic dTpw"}
    assert InfluxCredentials().header() == {}


def test_help_explains_the_commands() -> None:
    runner = CliRunner()
    check = runner.invoke(app, ["dashboards", "check", "--help"], env={"COLUMNS": "200"})
    assert check.exit_code == 0
    for word in ("$timeFilter", "waiting", "--influx", "--strict", "no data"):
        assert word in check.output
    push = runner.invoke(app, ["dashboards", "push", "--help"], env={"COLUMNS": "200"})
    assert push.exit_code == 0
    for word in ("GRAFANA_TOKEN", "INFLUX_TOKEN", "--grafana", "datasource"):
        assert word in push.output
