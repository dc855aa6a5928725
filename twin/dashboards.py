"""Grafana dashboards for the twin: built from the declared points, checked against InfluxDB, pushed to Grafana.

The five dashboards (site overview, pack detail, fleet health, alerts, twin health) are built
here in Python and written to ``dashboards/*.json`` (``mgtwin dashboards write``), which
Grafana provisions from files. Every panel queries InfluxDB in InfluxQL (raw queries), which
InfluxDB 1.x answers natively and 2.x/3.x through the v1 compatibility API, and reads only
measurements and fields declared in :mod:`twin.points` (a test holds them to it).

Conventions of every query, which :func:`query_refs` relies on: identifiers in double
quotes, the site as ``"site" =~ /^$site$/``, the time range as ``$timeFilter`` and time
buckets as ``time($__interval)``, as Grafana writes them.

:func:`check_dashboards` runs each panel's query the way Grafana would (macros and template
variables substituted) and sorts the panels into ``ok``, ``no data`` (the fields are in
InfluxDB, yet nothing came back: a real problem), ``waiting`` (a field the panel needs was
never written to this database: a later twin version fills it) and ``error``.
:func:`push_dashboards` uploads the datasource and the dashboards through grafana-client, for
a Grafana that is not provisioned from files.

The datasource has the fixed uid :data:`DATASOURCE_UID`. Its secrets come from the
environment, never from a file in the repository: ``INFLUX_TOKEN`` (2.x/3.x, sent as
``Authorization: Token ...``) or ``INFLUX_USER`` and ``INFLUX_PASSWORD`` (1.x); Grafana's own
credentials from ``GRAFANA_TOKEN`` or ``GRAFANA_USER`` and ``GRAFANA_PASSWORD``.
"""

from __future__ import annotations

import base64
import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal

from twin.errors import DatabaseError, ServiceError, TwinError
from twin.points import MEASUREMENTS

__all__ = [
    "DASHBOARDS",
    "DATASOURCE",
    "DATASOURCE_UID",
    "FOLDER_UID",
    "CheckReport",
    "DashboardError",
    "GrafanaError",
    "InfluxCredentials",
    "InfluxQuery",
    "PanelCheck",
    "PushResult",
    "build_dashboards",
    "check_dashboards",
    "datasource_model",
    "iter_queries",
    "load_dashboards",
    "push_dashboards",
    "query_refs",
    "render_query",
    "write_dashboards",
]

DATASOURCE_UID: Final = "mgtwin-influxdb"
DATASOURCE: Final[dict[str, str]] = {"type": "influxdb", "uid": DATASOURCE_UID}
FOLDER_UID: Final = "mgtwin"
FOLDER_TITLE: Final = "Microgrid twin"
TAG: Final = "microgrid-twin"
SCHEMA_VERSION: Final = 39  # Grafana 11
MIN_INTERVAL_S: Final = 1.0  # the telemetry cadence: no bucket is finer than this
MAX_DATA_POINTS: Final = 1000

_SITE: Final = '"site" =~ /^$site$/'
_PACK: Final = '"pack" =~ /^$pack$/'

# Colours: the twin's estimate, the BMS's figure, measured values.
_TWIN: Final = "blue"
_BMS: Final = "orange"
_BAND: Final = "#8ab8ff"


class DashboardError(TwinError):
    """A dashboard file that cannot be read, or a check that cannot run."""


class GrafanaError(ServiceError):
    """Grafana cannot be reached or refused a request."""


# --------------------------------------------------------------------------- building blocks


class _Ids:
    """Panel ids, unique within a dashboard, and the layout cursor."""

    def __init__(self) -> None:
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def take(self) -> int:
        n = self.next_id
        self.next_id += 1
        return n


def _target(
    ref: str, query: str, *, fmt: Literal["time_series", "table"] = "time_series", alias: str = "$col"
) -> dict[str, Any]:
    return {
        "refId": ref,
        "datasource": dict(DATASOURCE),
        "rawQuery": True,
        "query": query,
        "resultFormat": fmt,
        "alias": alias,
    }


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": colour, "value": value} for value, colour in steps]}


_GREEN: Final = _thresholds((None, "green"))


def _fixed(colour: str) -> dict[str, str]:
    return {"mode": "fixed", "fixedColor": colour}


def _by_name(name: str, **props: Any) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key.replace("__", "."), "value": value} for key, value in props.items()],
    }


def _band_overrides(
    estimate: str = "estimate", lo: str = "P5", hi: str = "P95", colour: str = _TWIN
) -> list[dict[str, Any]]:
    """Overrides that draw ``lo``..``hi`` as a shaded band around ``estimate``."""
    hidden = {"legend": False, "tooltip": False, "viz": False}
    return [
        _by_name(estimate, color=_fixed(colour), custom__lineWidth=2),
        _by_name(hi, color=_fixed(_BAND), custom__lineWidth=0, custom__fillOpacity=25, custom__fillBelowTo=lo),
        _by_name(lo, color=_fixed(_BAND), custom__lineWidth=0, custom__hideFrom=hidden),
    ]


def _timeseries(
    ids: _Ids,
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str,
    description: str,
    w: int = 12,
    h: int = 8,
    overrides: list[dict[str, Any]] | None = None,
    thresholds: dict[str, Any] | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
    bars: bool = False,
    decimals: int | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "thresholds": thresholds or _GREEN,
        "custom": {
            "drawStyle": "bars" if bars else "line",
            "lineWidth": 1,
            "fillOpacity": 60 if bars else 0,
            "showPoints": "never",
            "spanNulls": 120_000,  # bridge gaps up to two minutes; a longer gap is an outage and shows
            "thresholdsStyle": {"mode": "line" if thresholds else "off"},
        },
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "id": ids.take(),
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "gridPos": ids.place(w, h),
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        "targets": targets,
    }


def _stat(
    ids: _Ids,
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str,
    description: str,
    w: int = 4,
    h: int = 5,
    kind: Literal["stat", "gauge"] = "stat",
    thresholds: dict[str, Any] | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
    decimals: int | None = None,
    overrides: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": thresholds or _GREEN}
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    if decimals is not None:
        defaults["decimals"] = decimals
    options: dict[str, Any] = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "auto",
    }
    if kind == "stat":
        options.update({"colorMode": "value", "graphMode": "area", "justifyMode": "auto", "textMode": "auto"})
    else:
        options.update({"showThresholdLabels": False, "showThresholdMarkers": True})
    return {
        "id": ids.take(),
        "type": kind,
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "gridPos": ids.place(w, h),
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options,
        "targets": targets,
    }


def _table(
    ids: _Ids,
    title: str,
    targets: list[dict[str, Any]],
    *,
    description: str,
    unit: str = "none",
    w: int = 24,
    h: int = 9,
    overrides: list[dict[str, Any]] | None = None,
    transformations: list[dict[str, Any]] | None = None,
    sort_by: str | None = None,
    descending: bool = False,
) -> dict[str, Any]:
    options: dict[str, Any] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    if sort_by:
        options["sortBy"] = [{"displayName": sort_by, "desc": descending}]
    return {
        "id": ids.take(),
        "type": "table",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "gridPos": ids.place(w, h),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "color": {"mode": "thresholds"},
                "thresholds": _GREEN,
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "filterable": True},
            },
            "overrides": overrides or [],
        },
        "options": options,
        "transformations": transformations or [],
        "targets": targets,
    }


def _chart(
    ids: _Ids,
    kind: Literal["barchart", "histogram", "bargauge"],
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str,
    description: str,
    w: int = 12,
    h: int = 8,
    options: dict[str, Any] | None = None,
    transformations: list[dict[str, Any]] | None = None,
    thresholds: dict[str, Any] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "thresholds" if thresholds else "palette-classic"},
        "thresholds": thresholds or _GREEN,
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "id": ids.take(),
        "type": kind,
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "gridPos": ids.place(w, h),
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options or {},
        "transformations": transformations or [],
        "targets": targets,
    }


def _variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": dict(DATASOURCE),
        "query": query,
        "definition": query,
        "refresh": 1,
        "sort": 1,
        "multi": False,
        "includeAll": False,
        "current": {},
        "options": [],
        "hide": 0,
    }


_SITE_VAR: Final = _variable("site", 'SHOW TAG VALUES FROM "site_state" WITH KEY = "site"', "site")
_PACK_VAR: Final = _variable("pack", f'SHOW TAG VALUES FROM "pack_telemetry" WITH KEY = "pack" WHERE {_SITE}', "pack")

_ALERT_ANNOTATION: Final[dict[str, Any]] = {
    "name": "alerts raised",
    "datasource": dict(DATASOURCE),
    "enable": True,
    "hide": False,
    "iconColor": "red",
    "query": f'SELECT "message", "kind", "pack" FROM "alerts" WHERE {_SITE} AND "state" = \'raised\' AND $timeFilter',
    "textColumn": "message",
    "tagsColumn": "kind,pack",
    "titleColumn": "kind",
}


def _dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[dict[str, Any]],
    variables: list[dict[str, Any]],
    *,
    time_from: str = "now-6h",
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "timezone": "browser",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "templating": {"list": variables},
        "annotations": {"list": [dict(_ALERT_ANNOTATION)]},
        "links": [
            {
                "title": "Microgrid twin",
                "type": "dashboards",
                "tags": [TAG],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "panels": panels,
    }


def _active_alerts(ids: _Ids, *, h: int = 8) -> dict[str, Any]:
    """The alerts whose latest state is ``raised``: one series per (kind, severity, pack), its last state."""
    query = (
        'SELECT last("state") AS "state", last("message") AS "message", last("value") AS "value", '
        'last("threshold") AS "threshold", last("cell") AS "cell" '
        f'FROM "alerts" WHERE {_SITE} AND $timeFilter GROUP BY "kind", "severity", "pack"'
    )
    severity = {
        "type": "value",
        "options": {
            "critical": {"color": "red", "index": 0, "text": "critical"},
            "warning": {"color": "orange", "index": 1, "text": "warning"},
            "info": {"color": "blue", "index": 2, "text": "info"},
        },
    }
    return _table(
        ids,
        "Active alerts",
        [_target("A", query, fmt="table")],
        description="Alerts whose latest state is raised (the last event of each kind, severity and pack).",
        h=h,
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "filterByValue",
                "options": {
                    "type": "include",
                    "match": "any",
                    "filters": [{"fieldName": "state", "config": {"id": "equal", "options": {"value": "raised"}}}],
                },
            },
        ],
        overrides=[
            _by_name("severity", mappings=[severity], custom__cellOptions={"type": "color-text"}),
            _by_name("Time", unit="dateTimeAsIso"),
        ],
        sort_by="Time",
        descending=True,
    )


# --------------------------------------------------------------------------- the dashboards


def _overview() -> dict[str, Any]:
    ids = _Ids()
    panels = [
        _stat(
            ids,
            "Site SoC",
            [_target("A", f'SELECT last("soc") AS "SoC" FROM "site_state" WHERE {_SITE} AND $timeFilter')],
            kind="gauge",
            unit="percentunit",
            min_value=0,
            max_value=1,
            decimals=1,
            thresholds=_thresholds((None, "red"), (0.15, "orange"), (0.3, "green")),
            description="The twin's capacity-weighted state of charge of the packs that can discharge now.",
        ),
        _stat(
            ids,
            "Energy to the reserve floor",
            [
                _target(
                    "A",
                    f'SELECT last("energy_to_floor_kwh") AS "energy" FROM "site_state" WHERE {_SITE} AND $timeFilter',
                )
            ],
            unit="kwatth",
            decimals=0,
            thresholds=_thresholds((None, "red"), (500, "orange"), (2000, "green")),
            description="Energy the available packs can deliver before the site reaches its reserve floor (P50).",
        ),
        _stat(
            ids,
            "Runtime at the present load",
            [
                _target(
                    "A",
                    'SELECT last("runtime_s_p5") AS "P5", last("runtime_s_p50") AS "P50", '
                    f'last("runtime_s_p95") AS "P95" FROM "site_state" WHERE {_SITE} AND $timeFilter',
                )
            ],
            unit="s",
            thresholds=_thresholds((None, "red"), (1800, "orange"), (7200, "green")),
            description="Time to the reserve floor at the present discharge, P5 / P50 / P95 (none while charging).",
        ),
        _stat(
            ids,
            "Ride-through of the data centre",
            [
                _target(
                    "A",
                    'SELECT last("ridethrough_s_p5") AS "P5", last("ridethrough_s_p50") AS "P50", '
                    f'last("ridethrough_s_p95") AS "P95" FROM "site_state" WHERE {_SITE} AND $timeFilter',
                )
            ],
            unit="s",
            thresholds=_thresholds((None, "red"), (1800, "orange"), (7200, "green")),
            description="How long the batteries alone carry the data centre without solar and grid, P5 / P50 / P95.",
        ),
        _stat(
            ids,
            "Packs",
            [
                _target(
                    "A",
                    'SELECT last("packs_online") AS "online", last("packs_offline") AS "offline", '
                    f'last("packs_excluded") AS "excluded" FROM "site_state" WHERE {_SITE} AND $timeFilter',
                )
            ],
            unit="short",
            decimals=0,
            w=8,
            overrides=[
                _by_name("online", color=_fixed("green")),
                _by_name("offline", color=_fixed("red")),
                _by_name("excluded", color=_fixed("orange")),
            ],
            description="Packs online; offline (gateway offline or stale); excluded (online, cannot discharge).",
        ),
        _timeseries(
            ids,
            "Site power",
            [
                _target(
                    "A",
                    'SELECT mean("battery_w") AS "battery", mean("load_w") AS "data-centre load", '
                    'mean("solar_w") AS "solar", mean("grid_w") AS "grid" '
                    f'FROM "site_state" WHERE {_SITE} AND $timeFilter GROUP BY time($__interval) fill(null)',
                )
            ],
            unit="watt",
            overrides=[
                _by_name("battery", color=_fixed("purple")),
                _by_name("data-centre load", color=_fixed("red")),
                _by_name("solar", color=_fixed("yellow")),
                _by_name("grid", color=_fixed("green")),
            ],
            description="Site meter: battery (discharge positive), data-centre load, solar and grid (import positive).",
        ),
        _timeseries(
            ids,
            "Site SoC with P5-P95",
            [
                _target(
                    "A",
                    'SELECT mean("soc") AS "estimate", mean("soc_p5") AS "P5", mean("soc_p95") AS "P95" '
                    f'FROM "site_state" WHERE {_SITE} AND $timeFilter GROUP BY time($__interval) fill(null)',
                )
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
            overrides=_band_overrides(),
            thresholds=_thresholds((None, "red"), (0.15, "transparent")),
            description="The twin's site SoC and its P5-P95 band.",
        ),
        _timeseries(
            ids,
            "Energy to the reserve floor with P5-P95",
            [
                _target(
                    "A",
                    'SELECT mean("energy_to_floor_kwh") AS "estimate", mean("energy_to_floor_kwh_p5") AS "P5", '
                    'mean("energy_to_floor_kwh_p95") AS "P95" '
                    f'FROM "site_state" WHERE {_SITE} AND $timeFilter GROUP BY time($__interval) fill(null)',
                )
            ],
            unit="kwatth",
            min_value=0,
            overrides=_band_overrides(),
            description="Energy the available packs can deliver before the reserve floor, with its P5-P95 band.",
        ),
        _timeseries(
            ids,
            "Runtime at the present load, P5-P50-P95",
            [
                _target(
                    "A",
                    'SELECT mean("runtime_s_p50") AS "estimate", mean("runtime_s_p5") AS "P5", '
                    'mean("runtime_s_p95") AS "P95" '
                    f'FROM "site_state" WHERE {_SITE} AND $timeFilter GROUP BY time($__interval) fill(null)',
                )
            ],
            unit="s",
            min_value=0,
            overrides=_band_overrides(),
            description="Time to the reserve floor at the present discharge (P50, with the P5-P95 band).",
        ),
        _timeseries(
            ids,
            "Ride-through, P5-P50-P95",
            [
                _target(
                    "A",
                    'SELECT mean("ridethrough_s_p50") AS "estimate", mean("ridethrough_s_p5") AS "P5", '
                    'mean("ridethrough_s_p95") AS "P95" '
                    f'FROM "site_state" WHERE {_SITE} AND $timeFilter GROUP BY time($__interval) fill(null)',
                )
            ],
            unit="s",
            min_value=0,
            overrides=_band_overrides(),
            description="How long the batteries alone carry the data-centre load (P50, with the P5-P95 band).",
        ),
        _timeseries(
            ids,
            "Packs online, offline, excluded",
            [
                _target(
                    "A",
                    'SELECT last("packs_online") AS "online", last("packs_offline") AS "offline", '
                    'last("packs_excluded") AS "excluded" '
                    f'FROM "site_state" WHERE {_SITE} AND $timeFilter GROUP BY time($__interval) fill(previous)',
                )
            ],
            unit="short",
            min_value=0,
            decimals=0,
            overrides=[
                _by_name("online", color=_fixed("green")),
                _by_name("offline", color=_fixed("red")),
                _by_name("excluded", color=_fixed("orange")),
            ],
            description="Pack availability over time.",
        ),
        _timeseries(
            ids,
            "Maximum discharge power",
            [
                _target(
                    "A",
                    'SELECT mean("max_discharge_w") AS "limit", mean("battery_w") AS "battery" '
                    f'FROM "site_state" WHERE {_SITE} AND $timeFilter GROUP BY time($__interval) fill(null)',
                )
            ],
            unit="watt",
            overrides=[_by_name("limit", color=_fixed("red"), custom__lineStyle={"fill": "dash", "dash": [10, 10]})],
            description="What the available packs can discharge together (their BMS limits) against the battery power.",
        ),
        _active_alerts(ids),
    ]
    return _dashboard(
        "mgtwin-overview",
        "Microgrid: site overview",
        "Site power, SoC and energy to the floor with bands, runtime and ride-through, pack availability, alerts.",
        panels,
        [dict(_SITE_VAR)],
    )


def _pack_detail() -> dict[str, Any]:
    ids = _Ids()
    where = f"{_SITE} AND {_PACK} AND $timeFilter"
    by_time = "GROUP BY time($__interval) fill(null)"
    panels = [
        _stat(
            ids,
            "SoC (twin / BMS)",
            [_target("A", f'SELECT last("soc") AS "twin", last("soc_bms") AS "BMS" FROM "pack_state" WHERE {where}')],
            unit="percentunit",
            decimals=1,
            w=6,
            overrides=[_by_name("twin", color=_fixed(_TWIN)), _by_name("BMS", color=_fixed(_BMS))],
            description="The twin's SoC estimate next to the BMS-reported SoC.",
        ),
        _stat(
            ids,
            "SoH (twin / BMS)",
            [_target("A", f'SELECT last("soh") AS "twin", last("soh_bms") AS "BMS" FROM "pack_state" WHERE {where}')],
            unit="percentunit",
            decimals=1,
            w=6,
            overrides=[_by_name("twin", color=_fixed(_TWIN)), _by_name("BMS", color=_fixed(_BMS))],
            description="The twin's passive SoH estimate next to the BMS-reported SoH.",
        ),
        _stat(
            ids,
            "Remaining useful life (P50)",
            [_target("A", f'SELECT last("rul_days_p50") AS "RUL" FROM "pack_state" WHERE {where}')],
            unit="d",
            decimals=0,
            w=6,
            thresholds=_thresholds((None, "red"), (180, "orange"), (365, "green")),
            description="Days until the pack reaches its end-of-life SoH, median estimate.",
        ),
        _stat(
            ids,
            "Energy to the floor",
            [_target("A", f'SELECT last("energy_to_floor_kwh") AS "energy" FROM "pack_state" WHERE {where}')],
            unit="kwatth",
            decimals=1,
            w=6,
            description="Energy this pack can deliver before the reserve floor.",
        ),
        _timeseries(
            ids,
            "SoC: estimated (P5-P95) against the BMS",
            [
                _target(
                    "A",
                    'SELECT mean("soc") AS "estimate", mean("soc") - 1.645 * mean("soc_std") AS "P5", '
                    'mean("soc") + 1.645 * mean("soc_std") AS "P95", mean("soc_bms") AS "BMS" '
                    f'FROM "pack_state" WHERE {where} {by_time}',
                )
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
            overrides=[
                *_band_overrides(),
                _by_name("BMS", color=_fixed(_BMS), custom__lineStyle={"fill": "dash", "dash": [10, 10]}),
            ],
            description=(
                "The twin's SoC with its P5-P95 band (±1.645σ, as the site's bands), "
                "and the SoC the BMS reports (second-life BMSs drift)."
            ),
        ),
        _timeseries(
            ids,
            "Measured: voltage and current",
            [
                _target(
                    "A",
                    'SELECT mean("voltage_v") AS "voltage", mean("current_a") AS "current" '
                    f'FROM "pack_telemetry" WHERE {where} {by_time}',
                )
            ],
            unit="volt",
            overrides=[_by_name("current", unit="amp", custom__axisPlacement="right", color=_fixed("purple"))],
            description="Pack voltage and current as the BMS measures them (current positive on discharge).",
        ),
        _timeseries(
            ids,
            "SoH: estimated (±2σ) against the BMS",
            [
                _target(
                    "A",
                    'SELECT mean("soh") AS "estimate", mean("soh") - 2 * mean("soh_std") AS "P5", '
                    'mean("soh") + 2 * mean("soh_std") AS "P95", mean("soh_bms") AS "BMS" '
                    f'FROM "pack_state" WHERE {where} {by_time}',
                )
            ],
            unit="percentunit",
            overrides=[
                *_band_overrides(),
                _by_name("BMS", color=_fixed(_BMS), custom__lineStyle={"fill": "dash", "dash": [10, 10]}),
            ],
            description="Passive SoH from ordinary operation, with ±2σ, against the BMS-reported SoH.",
        ),
        _timeseries(
            ids,
            "Cell voltage spread",
            [
                _target(
                    "A",
                    'SELECT max("cell_v_max_v") AS "highest cell", min("cell_v_min_v") AS "lowest cell", '
                    'max("cell_v_max_v") - min("cell_v_min_v") AS "spread" '
                    f'FROM "pack_telemetry" WHERE {where} {by_time}',
                )
            ],
            unit="volt",
            decimals=3,
            overrides=[
                _by_name(
                    "spread",
                    unit="volt",
                    custom__axisPlacement="right",
                    color=_fixed("red"),
                    thresholds=_thresholds((None, "green"), (0.05, "orange"), (0.1, "red")),
                )
            ],
            description="Highest and lowest cell-group voltage and their spread (imbalance, a weak cell).",
        ),
        _timeseries(
            ids,
            "Temperatures",
            [
                _target(
                    "A",
                    'SELECT max("temp_max_c") AS "max", mean("temp_avg_c") AS "mean", min("temp_min_c") AS "min" '
                    f'FROM "pack_telemetry" WHERE {where} {by_time}',
                )
            ],
            unit="celsius",
            thresholds=_thresholds((None, "transparent"), (45, "orange"), (55, "red")),
            overrides=[
                _by_name("max", color=_fixed("red")),
                _by_name("mean", color=_fixed("orange")),
                _by_name("min", color=_fixed("blue")),
            ],
            description="Hottest, mean and coldest temperature sensor of the pack.",
        ),
        _timeseries(
            ids,
            "Resistance",
            [
                _target(
                    "A",
                    'SELECT mean("resistance_ohm") AS "resistance", mean("resistance_growth") AS "growth" '
                    f'FROM "pack_state" WHERE {where} {by_time}',
                )
            ],
            unit="ohm",
            decimals=4,
            overrides=[_by_name("growth", unit="percentunit", custom__axisPlacement="right", color=_fixed("orange"))],
            description="The twin's estimate of the pack's internal resistance, and its growth since commissioning.",
        ),
        _timeseries(
            ids,
            "Anomaly score",
            [_target("A", f'SELECT max("anomaly_score") AS "anomaly" FROM "pack_state" WHERE {where} {by_time}')],
            unit="none",
            min_value=0,
            thresholds=_thresholds((None, "transparent"), (3, "orange"), (5, "red")),
            description="Model-against-measurement residual score: above 3 worth a look, above 5 an anomaly.",
        ),
        _timeseries(
            ids,
            "Capacity (±2σ)",
            [
                _target(
                    "A",
                    'SELECT mean("capacity_ah") AS "estimate", '
                    'mean("capacity_ah") - 2 * mean("capacity_ah_std") AS "P5", '
                    'mean("capacity_ah") + 2 * mean("capacity_ah_std") AS "P95" '
                    f'FROM "pack_state" WHERE {where} {by_time}',
                )
            ],
            unit="suffix: Ah",
            overrides=_band_overrides(),
            description="The twin's estimate of the pack's capacity with ±2σ.",
        ),
        _chart(
            ids,
            "bargauge",
            "Cell voltages (latest)",
            [_target("A", f'SELECT last(/^cell_v_/) FROM "pack_cells" WHERE {where}', alias="$col")],
            unit="volt",
            w=24,
            h=7,
            min_value=2.5,
            max_value=4.3,
            thresholds=_thresholds((None, "red"), (3.0, "orange"), (3.3, "green"), (4.15, "orange"), (4.2, "red")),
            options={
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "orientation": "vertical",
                "displayMode": "basic",
                "showUnfilled": True,
                "valueMode": "hidden",
            },
            description="Every series cell group's voltage at the latest cell report.",
        ),
    ]
    return _dashboard(
        "mgtwin-pack",
        "Microgrid: pack detail",
        "One pack: measured and estimated, BMS against twin SoC and SoH, cells, temperatures, resistance, anomalies.",
        panels,
        [dict(_SITE_VAR), dict(_PACK_VAR)],
    )


def _distribution_query(field: str, measurement: str, by: str) -> str:
    return (
        f'SELECT percentile("{field}", 5) AS "P5", median("{field}") AS "median", percentile("{field}", 95) AS "P95", '
        f'count("{field}") AS "packs" FROM (SELECT last("{field}") AS "{field}" FROM "{measurement}" '
        f'WHERE {_SITE} AND $timeFilter GROUP BY "pack", "{by}") GROUP BY "{by}"'
    )


def _fleet() -> dict[str, Any]:
    ids = _Ids()
    where = f"{_SITE} AND $timeFilter"
    dist_options = {
        "orientation": "horizontal",
        "xField": "",
        "showValue": "auto",
        "stacking": "none",
        "groupWidth": 0.7,
        "barWidth": 0.9,
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "none"},
    }
    packs_axis = [_by_name("packs", unit="short", custom__hideFrom={"legend": False, "tooltip": False, "viz": True})]

    def dist(title: str, field: str, measurement: str, by: str, unit: str, description: str) -> dict[str, Any]:
        return _chart(
            ids,
            "barchart",
            title,
            [_target("A", _distribution_query(field, measurement, by), fmt="table")],
            unit=unit,
            w=8,
            options={**dist_options, "xField": by},
            transformations=[
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {"excludeByName": {"Time": True}}},
            ],
            overrides=packs_axis,
            description=description,
        )

    panels = [
        dist(
            "SoH by chemistry (twin)",
            "soh",
            "pack_state",
            "chemistry",
            "percentunit",
            "P5, median and P95 of the packs' latest SoH estimate, by chemistry.",
        ),
        dist(
            "SoH by life (twin)",
            "soh",
            "pack_state",
            "life",
            "percentunit",
            "P5, median and P95 of the packs' latest SoH estimate, new against second-life.",
        ),
        dist(
            "SoH by chemistry (BMS)",
            "soh_bms",
            "pack_telemetry",
            "chemistry",
            "percentunit",
            "The same distribution of the SoH the packs' BMSs report, for comparison.",
        ),
        dist(
            "Resistance by chemistry",
            "resistance_ohm",
            "pack_state",
            "chemistry",
            "ohm",
            "P5, median and P95 of the packs' latest resistance estimate, by chemistry.",
        ),
        dist(
            "Resistance by life",
            "resistance_ohm",
            "pack_state",
            "life",
            "ohm",
            "P5, median and P95 of the packs' latest resistance estimate, new against second-life.",
        ),
        dist(
            "SoH by life (BMS)",
            "soh_bms",
            "pack_telemetry",
            "life",
            "percentunit",
            "The SoH the BMSs report, new against second-life.",
        ),
        _chart(
            ids,
            "histogram",
            "SoH histogram (twin and BMS)",
            [
                _target(
                    "A", f'SELECT last("soh") AS "twin" FROM "pack_state" WHERE {where} GROUP BY "pack"', alias="twin"
                ),
                _target(
                    "B",
                    f'SELECT last("soh_bms") AS "BMS" FROM "pack_telemetry" WHERE {where} GROUP BY "pack"',
                    alias="BMS",
                ),
            ],
            unit="percentunit",
            options={
                "bucketCount": 20,
                "combine": False,
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            },
            transformations=[{"id": "seriesToColumns", "options": {}}],
            description="How the packs' SoH is spread, the twin's estimate against the BMS's figure.",
        ),
        _stat(
            ids,
            "Packs past the knee",
            [
                _target(
                    "A",
                    # knee_onset_ms is written only for a pack past its knee: no data means none.
                    'SELECT count("onset") AS "packs" FROM (SELECT last("knee_onset_ms") AS "onset" FROM "pack_state" '
                    f'WHERE {where} GROUP BY "pack")',
                )
            ],
            unit="short",
            decimals=0,
            w=12,
            h=8,
            thresholds=_thresholds((None, "green"), (1, "orange"), (10, "red")),
            description="Packs whose capacity fade has passed its knee (accelerating, nonlinear aging).",
        ),
        _table(
            ids,
            "Remaining useful life: ranking",
            [
                _target(
                    "A",
                    'SELECT last("rul_days_p50") AS "RUL P50", last("rul_days_p5") AS "RUL P5", '
                    'last("rul_days_p95") AS "RUL P95", last("soh") AS "SoH", last("knee") AS "knee" '
                    f'FROM "pack_state" WHERE {where} GROUP BY "pack", "chemistry", "life"',
                    fmt="table",
                )
            ],
            unit="d",
            w=12,
            h=10,
            transformations=[
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {"excludeByName": {"Time": True}}},
                {"id": "sortBy", "options": {"sort": [{"field": "RUL P50", "desc": False}]}},
                {"id": "limit", "options": {"limitField": 25}},
            ],
            overrides=[
                _by_name("SoH", unit="percentunit"),
                _by_name("knee", unit="bool_yes_no"),
                _by_name(
                    "RUL P50",
                    custom__cellOptions={"type": "color-background"},
                    thresholds=_thresholds((None, "red"), (180, "orange"), (365, "green")),
                ),
            ],
            sort_by="RUL P50",
            description="The 25 packs with the shortest median remaining useful life, with the P5-P95 band.",
        ),
        _table(
            ids,
            "Knees",
            [
                _target(
                    "A",
                    'SELECT last("knee") AS "knee", last("knee_onset_ms") AS "knee onset", last("soh") AS "SoH", '
                    f'last("rul_days_p50") AS "RUL P50" FROM "pack_state" WHERE {where} '
                    'GROUP BY "pack", "chemistry", "life"',
                    fmt="table",
                )
            ],
            w=12,
            h=10,
            transformations=[
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {"excludeByName": {"Time": True}}},
                {
                    "id": "filterByValue",
                    "options": {
                        "type": "include",
                        "match": "any",
                        "filters": [{"fieldName": "knee", "config": {"id": "equal", "options": {"value": True}}}],
                    },
                },
            ],
            overrides=[
                _by_name("knee onset", unit="dateTimeAsIso"),
                _by_name("SoH", unit="percentunit"),
                _by_name("RUL P50", unit="d"),
                _by_name("knee", unit="bool_yes_no"),
            ],
            description="Packs past the knee of their fade curve and when it began.",
        ),
        _table(
            ids,
            "Second-life passport",
            [
                _target(
                    "A",
                    'SELECT last("soh") AS "SoH", last("soh_std") AS "SoH σ", last("soh_bms") AS "SoH (BMS)", '
                    'last("capacity_ah") AS "capacity", last("resistance_ohm") AS "resistance", '
                    'last("resistance_growth") AS "R growth", last("rul_days_p50") AS "RUL P50", '
                    'last("knee") AS "knee", last("anomaly_score") AS "anomaly" '
                    f'FROM "pack_state" WHERE {_SITE} AND "life" = \'second_life\' AND $timeFilter '
                    'GROUP BY "pack", "chemistry"',
                    fmt="table",
                )
            ],
            w=24,
            h=12,
            transformations=[
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {"excludeByName": {"Time": True}}},
            ],
            overrides=[
                _by_name("SoH", unit="percentunit", decimals=1),
                _by_name("SoH σ", unit="percentunit", decimals=1),
                _by_name("SoH (BMS)", unit="percentunit", decimals=1),
                _by_name("capacity", unit="suffix: Ah", decimals=1),
                _by_name("resistance", unit="ohm", decimals=4),
                _by_name("R growth", unit="percentunit", decimals=1),
                _by_name("RUL P50", unit="d", decimals=0),
                _by_name("knee", unit="bool_yes_no"),
                _by_name(
                    "anomaly",
                    unit="none",
                    decimals=2,
                    custom__cellOptions={"type": "color-text"},
                    thresholds=_thresholds((None, "green"), (3, "orange"), (5, "red")),
                ),
            ],
            sort_by="SoH",
            description="Every second-life pack: SoH (twin, σ, BMS), capacity, resistance, growth, RUL, knee, anomaly.",
        ),
    ]
    return _dashboard(
        "mgtwin-fleet",
        "Microgrid: fleet health",
        "SoH and resistance distributions by chemistry and life, RUL ranking, knees, the second-life passport.",
        panels,
        [dict(_SITE_VAR)],
        time_from="now-24h",
    )


def _alerts() -> dict[str, Any]:
    ids = _Ids()
    where = f"{_SITE} AND $timeFilter"
    panels = [
        _stat(
            ids,
            "Alerts raised, by severity",
            [
                _target(
                    "A",
                    f'SELECT count("state") AS "raised" FROM "alerts" WHERE {where} AND "state" = \'raised\' '
                    'GROUP BY "severity"',
                    alias="$tag_severity",
                )
            ],
            unit="short",
            decimals=0,
            w=8,
            h=8,
            overrides=[
                _by_name("critical", color=_fixed("red")),
                _by_name("warning", color=_fixed("orange")),
                _by_name("info", color=_fixed("blue")),
            ],
            description="How many alerts were raised in the time range, by severity.",
        ),
        _timeseries(
            ids,
            "Alerts raised over time, by kind",
            [
                _target(
                    "A",
                    f'SELECT count("state") AS "raised" FROM "alerts" WHERE {where} AND "state" = \'raised\' '
                    'GROUP BY time($__interval), "kind" fill(none)',
                    alias="$tag_kind",
                )
            ],
            unit="short",
            bars=True,
            w=16,
            description="Alerts raised per time bucket, by kind.",
        ),
        _active_alerts(ids, h=9),
        _table(
            ids,
            "Alert history",
            [
                _target(
                    "A",
                    'SELECT "state", "message", "value", "threshold", "cell", "alert_id" '
                    f'FROM "alerts" WHERE {where} GROUP BY "kind", "severity", "pack"',
                    fmt="table",
                )
            ],
            h=12,
            transformations=[{"id": "merge", "options": {}}],
            overrides=[_by_name("Time", unit="dateTimeAsIso")],
            sort_by="Time",
            descending=True,
            description="Every alert raised and cleared in the time range, newest first.",
        ),
    ]
    return _dashboard(
        "mgtwin-alerts",
        "Microgrid: alerts",
        "Alert history and the active list; the same alerts are annotations on the other dashboards.",
        panels,
        [dict(_SITE_VAR)],
        time_from="now-24h",
    )


def _health() -> dict[str, Any]:
    ids = _Ids()
    where = f"{_SITE} AND $timeFilter"
    by_time = "GROUP BY time($__interval) fill(null)"

    def rate(field: str, alias: str) -> str:
        return f'non_negative_derivative(max("{field}"), 1s) AS "{alias}"'

    panels = [
        _timeseries(
            ids,
            "Ingest rate",
            [
                _target(
                    "A",
                    f"SELECT {rate('received', 'received')}, {rate('accepted', 'accepted')}, "
                    f"{rate('acked', 'acknowledged')} "
                    f'FROM "twin_health" WHERE {where} {by_time}',
                )
            ],
            unit="suffix: msg/s",
            min_value=0,
            description="MQTT messages per second: received, valid, acknowledged (after InfluxDB had them).",
        ),
        _timeseries(
            ids,
            "Points written",
            [_target("A", f'SELECT {rate("written_points", "points")} FROM "twin_health" WHERE {where} {by_time}')],
            unit="suffix: points/s",
            min_value=0,
            description="Points InfluxDB acknowledged per second.",
        ),
        _timeseries(
            ids,
            "Lag",
            [_target("A", f'SELECT max("lag_ms") AS "lag" FROM "twin_health" WHERE {where} {by_time}')],
            unit="ms",
            min_value=0,
            thresholds=_thresholds((None, "transparent"), (2000, "red")),
            description="Event time to write acknowledgement of the newest telemetry (the bar: p99 under 2 s).",
        ),
        _timeseries(
            ids,
            "Queue depth",
            [_target("A", f'SELECT max("queue_depth") AS "queue" FROM "twin_health" WHERE {where} {by_time}')],
            unit="short",
            min_value=0,
            description="Messages received and waiting to be processed; a growing queue means the twin falls behind.",
        ),
        _timeseries(
            ids,
            "Invalid messages by reason",
            [
                _target(
                    "A",
                    f'SELECT non_negative_difference(max(/^invalid_/)) FROM "twin_health" WHERE {where} {by_time}',
                    alias="$col",
                )
            ],
            unit="short",
            bars=True,
            min_value=0,
            description="Messages refused and dead-lettered, per time bucket, by reason (invalid_not_json, ...).",
        ),
        _timeseries(
            ids,
            "Write retries, dead letters, duplicates, late",
            [
                _target(
                    "A",
                    'SELECT non_negative_difference(max("write_retries")) AS "write retries", '
                    'non_negative_difference(max("deadlettered")) AS "dead-lettered", '
                    'non_negative_difference(max("duplicates")) AS "duplicates", '
                    'non_negative_difference(max("late")) AS "late" '
                    f'FROM "twin_health" WHERE {where} {by_time}',
                )
            ],
            unit="short",
            bars=True,
            min_value=0,
            description="Write retries, dead-lettered messages, duplicates and late samples, per time bucket.",
        ),
        _stat(
            ids,
            "Totals since start",
            [
                _target(
                    "A",
                    'SELECT last("received") AS "received", last("accepted") AS "accepted", '
                    'last("written_points") AS "points written", last("write_retries") AS "write retries", '
                    f'last("deadlettered") AS "dead-lettered" FROM "twin_health" WHERE {where}',
                )
            ],
            unit="short",
            w=24,
            description="The service's counters since it started.",
        ),
    ]
    return _dashboard(
        "mgtwin-health",
        "Microgrid: twin health",
        "The twin service itself: ingest rate, lag, queue depth, invalid messages by reason, write retries.",
        panels,
        [dict(_SITE_VAR)],
        time_from="now-1h",
    )


DASHBOARDS: Final[Mapping[str, Callable[[], dict[str, Any]]]] = {
    "site-overview.json": _overview,
    "pack-detail.json": _pack_detail,
    "fleet-health.json": _fleet,
    "alerts.json": _alerts,
    "twin-health.json": _health,
}


def build_dashboards() -> dict[str, dict[str, Any]]:
    """Return every dashboard, by file name."""
    return {name: build() for name, build in DASHBOARDS.items()}


def dashboard_text(dashboard: Mapping[str, Any]) -> str:
    """Return a dashboard as the JSON text written to ``dashboards/`` (stable, diff-friendly)."""
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def write_dashboards(out: Path, *, check: bool = False) -> list[str]:
    """Write the dashboards into ``out``, or with ``check`` return the files that are stale or missing.

    Returns:
        The file names written (or, with ``check``, those that differ from what would be written).
    """
    texts = {name: dashboard_text(board) for name, board in build_dashboards().items()}
    if check:
        return [n for n, t in texts.items() if not (out / n).is_file() or (out / n).read_text(encoding="utf-8") != t]
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
    return list(texts)


def load_dashboards(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """Return the dashboards from JSON files in ``folder``, or the built-in ones.

    Raises:
        DashboardError: the folder has no dashboard, or a file is not a dashboard.
    """
    if folder is None:
        return build_dashboards()
    files = sorted(folder.glob("*.json"))
    if not files:
        msg = f"no dashboard (*.json) in {folder}"
        raise DashboardError(msg)
    out: dict[str, dict[str, Any]] = {}
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"cannot read dashboard {path}: {exc}"
            raise DashboardError(msg) from exc
        if not isinstance(data, dict) or "panels" not in data or "uid" not in data:
            msg = f"{path} is not a Grafana dashboard (no uid or panels)"
            raise DashboardError(msg)
        out[path.name] = data
    return out


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True, slots=True)
class InfluxQuery:
    """One query of a dashboard: a panel's target, an annotation or a template variable.

    Attributes:
        dashboard: the dashboard's uid.
        panel_id: the panel id (0 for annotations and variables).
        title: the panel's title, or ``annotation: NAME`` / ``variable: NAME``.
        ref_id: the target's refId.
        query: the raw InfluxQL, with Grafana's macros.
        kind: ``panel``, ``annotation`` or ``variable``.
    """

    dashboard: str
    panel_id: int
    title: str
    ref_id: str
    query: str
    kind: Literal["panel", "annotation", "variable"] = "panel"


def iter_queries(dashboard: Mapping[str, Any]) -> list[InfluxQuery]:
    """Return every query of a dashboard: panel targets (rows included), annotations, variables."""
    uid = str(dashboard.get("uid", ""))
    out: list[InfluxQuery] = []

    def panels(items: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("query"):
                out.append(
                    InfluxQuery(
                        uid,
                        int(panel.get("id", 0)),
                        str(panel.get("title", "")),
                        str(target.get("refId", "")),
                        str(target["query"]),
                    )
                )
    for ann in dashboard.get("annotations", {}).get("list", []):
        if ann.get("query"):
            out.append(InfluxQuery(uid, 0, f"annotation: {ann.get('name')}", "", str(ann["query"]), "annotation"))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query" and isinstance(var.get("query"), str):
            out.append(InfluxQuery(uid, 0, f"variable: {var.get('name')}", "", str(var["query"]), "variable"))
    return out


_FROM_RE: Final = re.compile(r'\bFROM\s+"([A-Za-z_][A-Za-z0-9_]*)"', re.IGNORECASE)
_QUOTED_RE: Final = re.compile(r'"([^"]+)"')
_ALIAS_RE: Final = re.compile(r'\bAS\s+"([^"]+)"', re.IGNORECASE)
_REGEX_FIELD_RE: Final = re.compile(r"\(\s*/\^?([A-Za-z0-9_]+)/\s*\)")


def _declared_fields(measurement: str) -> set[str]:
    spec = MEASUREMENTS[measurement]
    return {d.field for d in spec.fields}


def query_refs(query: str) -> tuple[set[tuple[str, str]], set[str]]:
    """Return the (measurement, field) pairs a query reads, and the identifiers it quotes that are none of those.

    A field is a double-quoted identifier declared for one of the measurements named in a
    ``FROM "..."``; a regex field selector such as ``last(/^cell_v_/)`` stands for the
    per-element or open fields with that prefix (``cell_v_{index:03d}``, ``invalid_{reason}``),
    written as ``(measurement, "cell_v_*")``. Tags, aliases (``AS "..."``) and measurement
    names are known identifiers; anything else is returned as unknown (a typo, or a field
    the twin does not declare).

    Examples:
        >>> refs, unknown = query_refs('SELECT mean("soc") AS "x" FROM "site_state" WHERE "site" =~ /^$site$/')
        >>> sorted(refs), sorted(unknown)
        ([('site_state', 'soc')], [])
    """
    measurements = list(_FROM_RE.findall(query))
    refs: set[tuple[str, str]] = set()
    unknown: set[str] = set()
    aliases = set(_ALIAS_RE.findall(query))
    known_measurements = [m for m in measurements if m in MEASUREMENTS]
    unknown.update(m for m in measurements if m not in MEASUREMENTS)
    tags = {t for m in known_measurements for t in MEASUREMENTS[m].tags}
    for name in _QUOTED_RE.findall(query):
        owners = [m for m in known_measurements if name in _declared_fields(m)]
        if owners:
            refs.update((m, name) for m in owners)
        elif name not in tags and name not in aliases and name not in measurements:
            unknown.add(name)
    for prefix in _REGEX_FIELD_RE.findall(query):
        for m in known_measurements:
            spec = MEASUREMENTS[m]
            templated = [d.field for d in spec.fields if d.per_element and d.field.startswith(prefix)]
            if templated or spec.open_fields:
                refs.add((m, prefix + "*"))
            else:
                unknown.add(f"/{prefix}/")
    return refs, unknown


_NICE_INTERVALS_S: Final = (
    1,
    2,
    5,
    10,
    15,
    20,
    30,
    60,
    120,
    300,
    600,
    900,
    1200,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    604800,
)


def grafana_interval_s(
    from_ms: int, to_ms: int, *, max_points: int = MAX_DATA_POINTS, min_s: float = MIN_INTERVAL_S
) -> int:
    """Return ``$__interval`` in seconds as Grafana picks it: the range over the points, rounded up to a nice step.

    Examples:
        >>> grafana_interval_s(0, 3_600_000)
        5
        >>> grafana_interval_s(0, 24 * 3_600_000)
        120
    """
    raw = max(min_s, (to_ms - from_ms) / 1000.0 / max_points)
    return next((s for s in _NICE_INTERVALS_S if s >= raw), _NICE_INTERVALS_S[-1])


def render_query(query: str, *, from_ms: int, to_ms: int, variables: Mapping[str, str]) -> str:
    """Substitute Grafana's macros and template variables the way Grafana does before sending a query.

    ``$timeFilter`` becomes ``time >= FROMms and time <= TOms``; ``$__interval`` (and
    ``$interval``) the bucket from :func:`grafana_interval_s`; ``$__interval_ms``, ``$__from``,
    ``$__to`` the numbers; ``$name``, ``${name}`` and ``[[name]]`` the variables' values.

    Raises:
        DashboardError: a ``$variable`` left without a value.
    """
    interval = grafana_interval_s(from_ms, to_ms)
    text = query.replace("$timeFilter", f"time >= {from_ms}ms and time <= {to_ms}ms")
    text = text.replace("$__interval_ms", str(interval * 1000)).replace("$__interval", f"{interval}s")
    text = text.replace("$interval", f"{interval}s")
    text = text.replace("$__from", str(from_ms)).replace("$__to", str(to_ms))
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        text = text.replace("${" + name + "}", value).replace(f"[[{name}]]", value)
        text = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", value.replace("\\", "\\\\"), text)
    left = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text)
    if left:
        msg = f"no value for the template variable(s) {sorted(set(left))} in: {query}"
        raise DashboardError(msg)
    return text


# --------------------------------------------------------------------------- InfluxDB (read side)


@dataclass(frozen=True, slots=True)
class InfluxCredentials:
    """How the dashboards' datasource authenticates: a token (2.x/3.x) or a user and password (1.x)."""

    token: str | None = None
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> InfluxCredentials:
        """Read ``INFLUX_TOKEN``, or ``INFLUX_USER`` and ``INFLUX_PASSWORD``."""
        return cls(
            token=environ.get("INFLUX_TOKEN") or None,
            username=environ.get("INFLUX_USER") or None,
            password=environ.get("INFLUX_PASSWORD") or None,
        )

    def header(self) -> dict[str, str]:
        """The ``Authorization`` header, if any."""
        if self.token:
            return {"Authorization": f"Token {self.token}"}
        if self.username:
            raw = f"{self.username}:{self.password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}


class _InfluxReader:
    """Run InfluxQL through ``/query`` (1.x, and the v1 compatibility API of 2.x/3.x)."""

    def __init__(self, url: str, database: str, credentials: InfluxCredentials, timeout_s: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            msg = f"InfluxDB URL {url!r} must be http(s)://HOST:PORT, without credentials"
            raise DatabaseError(msg)
        self.base = url.rstrip("/")
        self.database = database
        self.credentials = credentials
        self.timeout_s = timeout_s

    def query(self, q: str) -> dict[str, Any]:
        """Run one query; return the decoded answer.

        Raises:
            DatabaseError: the server cannot be reached, refuses the credentials, or does not answer JSON.
        """
        body = urllib.parse.urlencode({"q": q, "db": self.database, "epoch": "ms"}).encode()
        request = urllib.request.Request(f"{self.base}/query", data=body, method="POST")
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
        for key, value in self.credentials.header().items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                msg = (
                    f"InfluxDB at {self.base} refused the credentials (HTTP {exc.code}); "
                    "set INFLUX_TOKEN, or INFLUX_USER and INFLUX_PASSWORD"
                )
                raise DatabaseError(msg) from exc
            try:
                data = json.load(exc)
            except ValueError:
                msg = f"InfluxDB at {self.base} answered HTTP {exc.code}"
                raise DatabaseError(msg) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            msg = f"cannot reach InfluxDB at {self.base}: {reason}"
            raise DatabaseError(msg) from exc
        except ValueError as exc:
            msg = f"InfluxDB at {self.base} did not answer JSON"
            raise DatabaseError(msg) from exc
        if not isinstance(data, dict):
            msg = f"InfluxDB at {self.base} answered something unexpected"
            raise DatabaseError(msg)
        return data


def _statement(answer: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Return the series of the first statement and its error (if any)."""
    if "error" in answer:
        return [], str(answer["error"])
    results = answer.get("results") or [{}]
    first = results[0] if isinstance(results[0], dict) else {}
    if "error" in first:
        return [], str(first["error"])
    return list(first.get("series") or []), None


def _count_values(series: Sequence[Mapping[str, Any]]) -> int:
    """Count the non-null values (time column excluded) across series."""
    n = 0
    for s in series:
        columns = list(s.get("columns") or [])
        skip = {i for i, c in enumerate(columns) if c == "time"}
        for row in s.get("values") or []:
            n += sum(1 for i, v in enumerate(row) if i not in skip and v is not None)
    return n


# --------------------------------------------------------------------------- the check


Status = Literal["ok", "no data", "waiting", "error"]


@dataclass(frozen=True, slots=True)
class PanelCheck:
    """The outcome of one query.

    Attributes:
        query: which query.
        status: ``ok``; ``no data`` (its fields are in InfluxDB, nothing came back); ``waiting``
            (a field it reads was never written: the twin does not write it yet); ``error``.
        series: series returned.
        values: non-null values returned.
        missing: the (measurement, field) pairs it reads that InfluxDB has never seen.
        message: the error, or what is missing.
        rendered: the query as sent.
    """

    query: InfluxQuery
    status: Status
    series: int = 0
    values: int = 0
    missing: tuple[tuple[str, str], ...] = ()
    message: str = ""
    rendered: str = ""


@dataclass
class CheckReport:
    """Every query's outcome, and the range and variables used."""

    from_ms: int
    to_ms: int
    variables: dict[str, str]
    checks: list[PanelCheck] = field(default_factory=list)
    written: set[tuple[str, str]] = field(default_factory=set)

    def by_status(self, status: Status) -> list[PanelCheck]:
        """Return the checks with that status."""
        return [c for c in self.checks if c.status == status]

    @property
    def failed(self) -> bool:
        """Whether a query failed or returned nothing although its fields exist."""
        return bool(self.by_status("error") or self.by_status("no data"))


def _field_present(ref: tuple[str, str], written: set[tuple[str, str]]) -> bool:
    measurement, name = ref
    if name.endswith("*"):
        return any(m == measurement and f.startswith(name[:-1]) for m, f in written)
    return ref in written


def _written_fields(reader: _InfluxReader) -> set[tuple[str, str]]:
    """Return every (measurement, field) the database holds (``SHOW FIELD KEYS``)."""
    series, error = _statement(reader.query("SHOW FIELD KEYS"))
    if error:
        msg = f"InfluxDB refused SHOW FIELD KEYS on {reader.database!r}: {error}"
        raise DatabaseError(msg)
    return {(str(s.get("name")), str(v[0])) for s in series for v in s.get("values") or []}


def _latest_ms(reader: _InfluxReader, site: str | None) -> int | None:
    where = f" WHERE \"site\" = '{site}'" if site else ""
    newest: int | None = None
    for measurement, fld in (("site_state", "packs_total"), ("pack_telemetry", "voltage_v"), ("site_state", "load_w")):
        series, error = _statement(reader.query(f'SELECT last("{fld}") FROM "{measurement}"{where}'))
        if error or not series:
            continue
        t = series[0]["values"][0][0]
        newest = int(t) if newest is None else max(newest, int(t))
    return newest


def _resolve_variables(
    reader: _InfluxReader, boards: Mapping[str, Mapping[str, Any]], given: Mapping[str, str]
) -> dict[str, str]:
    """Give every template variable a value: the one given, else the first its own query returns."""
    values = dict(given)
    for board in boards.values():
        for var in board.get("templating", {}).get("list", []):
            name = str(var.get("name"))
            if name in values or var.get("type") != "query":
                continue
            try:
                text = render_query(str(var.get("query", "")), from_ms=0, to_ms=0, variables=values)
            except DashboardError:
                continue  # depends on a variable not resolved yet; the next board may have it
            series, error = _statement(reader.query(text))
            if error or not series or not series[0].get("values"):
                continue
            values[name] = str(series[0]["values"][0][-1])
    return values


def check_dashboards(
    influx_url: str,
    database: str,
    *,
    credentials: InfluxCredentials | None = None,
    dashboards: Mapping[str, Mapping[str, Any]] | None = None,
    from_ms: int | None = None,
    to_ms: int | None = None,
    window_s: float = 3600.0,
    variables: Mapping[str, str] | None = None,
) -> CheckReport:
    """Run every query of every dashboard against InfluxDB and sort the outcomes.

    Args:
        influx_url: InfluxDB's URL (1.x, or 2.x/3.x for the v1 compatibility API).
        database: the database (or the bucket, through its DBRP mapping).
        credentials: the datasource's credentials.
        dashboards: the dashboards (default: the built-in ones).
        from_ms: the range's start; default ``to_ms - window_s``.
        to_ms: the range's end; default: the newest point of the site (or now, if none).
        window_s: the range's length when ``from_ms`` is not given.
        variables: template-variable values (``site``, ``pack``); the others are resolved by
            running the variable's own query and taking its first value, as Grafana does.

    Returns:
        The report.

    Raises:
        DatabaseError: InfluxDB cannot be reached or refuses the credentials.
    """
    import time

    reader = _InfluxReader(influx_url, database, credentials or InfluxCredentials())
    boards = dashboards if dashboards is not None else build_dashboards()
    written = _written_fields(reader)
    values = _resolve_variables(reader, boards, dict(variables or {}))
    if to_ms is None:
        to_ms = _latest_ms(reader, values.get("site")) or time.time_ns() // 1_000_000
    if from_ms is None:
        from_ms = to_ms - round(window_s * 1000)
    report = CheckReport(from_ms=from_ms, to_ms=to_ms, variables=values, written=written)
    for board in boards.values():
        for q in iter_queries(board):
            report.checks.append(_check_one(reader, q, from_ms, to_ms, values, written))
    return report


def _check_one(
    reader: _InfluxReader,
    q: InfluxQuery,
    from_ms: int,
    to_ms: int,
    values: Mapping[str, str],
    written: set[tuple[str, str]],
) -> PanelCheck:
    refs, _unknown = query_refs(q.query)
    missing = tuple(sorted(r for r in refs if not _field_present(r, written)))
    try:
        text = render_query(q.query, from_ms=from_ms, to_ms=to_ms, variables=values)
    except DashboardError as exc:
        return PanelCheck(q, "error", missing=missing, message=str(exc))
    series, error = _statement(reader.query(text))
    if error:
        return PanelCheck(q, "error", missing=missing, message=error, rendered=text)
    n = _count_values(series)
    if n:
        return PanelCheck(q, "ok", series=len(series), values=n, missing=missing, rendered=text)
    if missing:
        what = ", ".join(f"{m}.{f}" for m, f in missing)
        return PanelCheck(q, "waiting", missing=missing, message=f"not written yet: {what}", rendered=text)
    return PanelCheck(
        q, "no data", message="the fields exist but the query returned nothing in the range", rendered=text
    )


# --------------------------------------------------------------------------- Grafana


def datasource_model(
    influx_url: str, database: str, credentials: InfluxCredentials, *, name: str = "microgrid InfluxDB"
) -> dict[str, Any]:
    """Return the datasource as Grafana's API takes it (InfluxQL; token header or user and password)."""
    model: dict[str, Any] = {
        "uid": DATASOURCE_UID,
        "name": name,
        "type": "influxdb",
        "access": "proxy",
        "url": influx_url,
        "isDefault": False,
        "jsonData": {"dbName": database, "httpMode": "POST", "version": "InfluxQL", "timeInterval": "1s"},
        "secureJsonData": {},
    }
    if credentials.token:
        model["jsonData"]["httpHeaderName1"] = "Authorization"
        model["secureJsonData"]["httpHeaderValue1"] = f"Token {credentials.token}"
    elif credentials.username:
        model["user"] = credentials.username
        model["secureJsonData"]["password"] = credentials.password or ""
    model["database"] = database
    return model


@dataclass
class PushResult:
    """What was uploaded."""

    grafana: str
    datasource: str
    folder: str
    dashboards: list[str] = field(default_factory=list)


def _grafana_call(url: str, what: str, call: Callable[[], Any]) -> Any:
    """Run one grafana-client call, translating its errors (and niquests') into :class:`GrafanaError`."""
    from grafana_client.client import GrafanaException

    try:
        return call()
    except GrafanaException as exc:
        status = getattr(exc, "status_code", 0)
        msg = (
            f"Grafana at {url} refused to {what}: HTTP {status} {exc}"
            if status
            else f"cannot reach Grafana at {url} to {what}: {exc}"
        )
        raise GrafanaError(msg) from exc
    except Exception as exc:  # niquests' connection errors are not GrafanaExceptions
        if type(exc).__module__.startswith(("niquests", "urllib3", "requests")) or isinstance(exc, OSError):
            msg = f"cannot reach Grafana at {url} to {what}: {type(exc).__name__}"
            raise GrafanaError(msg) from exc
        raise


def push_dashboards(
    grafana_url: str,
    *,
    influx_url: str,
    database: str,
    influx_credentials: InfluxCredentials,
    grafana_credential: str | tuple[str, str] | None,
    dashboards: Mapping[str, Mapping[str, Any]] | None = None,
    timeout_s: float = 10.0,
) -> PushResult:
    """Create or update the datasource, the folder and every dashboard in a Grafana through its HTTP API.

    Args:
        grafana_url: Grafana's URL (no credentials in it).
        influx_url: InfluxDB's URL as Grafana reaches it.
        database: the database or bucket.
        influx_credentials: the datasource's credentials.
        grafana_credential: a service-account token, or (user, password).
        dashboards: the dashboards (default: the built-in ones).
        timeout_s: per request.

    Returns:
        What was uploaded.

    Raises:
        GrafanaError: Grafana cannot be reached or refuses a request.
    """
    from grafana_client.api import GrafanaApi
    from grafana_client.client import GrafanaClientError

    parts = urllib.parse.urlsplit(grafana_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"Grafana URL {grafana_url!r} must be http(s)://HOST:PORT"
        raise GrafanaError(msg)
    if parts.username or parts.password:
        msg = "credentials do not belong in the Grafana URL: set GRAFANA_TOKEN or GRAFANA_USER/GRAFANA_PASSWORD"
        raise GrafanaError(msg)
    api = GrafanaApi.from_url(grafana_url, credential=grafana_credential, timeout=timeout_s)
    try:
        boards = dashboards if dashboards is not None else build_dashboards()
        _grafana_call(grafana_url, "answer a health check", api.health.check)
        model = datasource_model(influx_url, database, influx_credentials)

        def upsert_datasource() -> None:
            try:
                api.datasource.get_datasource_by_uid(DATASOURCE_UID)
            except GrafanaClientError as exc:
                if getattr(exc, "status_code", 0) != 404:
                    raise
                api.datasource.create_datasource(model)
                return
            api.datasource.update_datasource_by_uid(DATASOURCE_UID, model)

        _grafana_call(grafana_url, "save the datasource", upsert_datasource)

        def ensure_folder() -> None:
            try:
                api.folder.get_folder(FOLDER_UID)
            except GrafanaClientError as exc:
                if getattr(exc, "status_code", 0) != 404:
                    raise
                api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)

        _grafana_call(grafana_url, "create the folder", ensure_folder)
        result = PushResult(grafana=grafana_url, datasource=DATASOURCE_UID, folder=FOLDER_UID)
        for name, board in boards.items():
            body = {k: v for k, v in board.items() if k != "id"}
            payload = {
                "dashboard": body,
                "folderUid": FOLDER_UID,
                "overwrite": True,
                "message": "mgtwin dashboards push",
            }
            save: Callable[[], Any] = partial(api.dashboard.update_dashboard, payload)
            _grafana_call(grafana_url, f"save dashboard {name}", save)
            result.dashboards.append(str(board.get("uid")))
        return result
    finally:
        api.client.s.close()  # the HTTP session's pooled connections


def grafana_credential_from_env(environ: Mapping[str, str]) -> str | tuple[str, str] | None:
    """Return ``GRAFANA_TOKEN``, or (``GRAFANA_USER``, ``GRAFANA_PASSWORD``), or None."""
    if environ.get("GRAFANA_TOKEN"):
        return environ["GRAFANA_TOKEN"]
    if environ.get("GRAFANA_USER"):
        return environ["GRAFANA_USER"], environ.get("GRAFANA_PASSWORD", "")
    return None


def parse_time(text: str, *, now_ms: int) -> int:
    """Parse ``now``, ``now-6h``, an ISO 8601 time or epoch milliseconds into epoch milliseconds.

    Raises:
        DashboardError: the text is none of these.

    Examples:
        >>> parse_time("now-1h", now_ms=7_200_000)
        3600000
        >>> parse_time("2025-07-01T07:00:00Z", now_ms=0)
        1751353200000
    """
    from datetime import UTC, datetime

    value = text.strip()
    match = re.fullmatch(r"now(?:-(\d+(?:\.\d+)?)([smhdw]))?", value)
    if match:
        if match.group(1) is None:
            return now_ms
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now_ms - round(float(match.group(1)) * scale * 1000)
    if re.fullmatch(r"\d{10,16}", value):
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        msg = f"{text!r} is not a time: use now, now-6h, an ISO 8601 time or epoch milliseconds"
        raise DashboardError(msg) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return math.floor(parsed.timestamp() * 1000)
