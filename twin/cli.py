"""The ``mgtwin`` command line: the only place that parses arguments.

Each command validates its options, loads the settings once, and hands plain objects to
the code that does the work. Errors of the :class:`twin.errors.TwinError` family are shown
as one clear line and exit with status 2; nothing prints a traceback at a user for a
mistake they can fix.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from twin import __version__
from twin.errors import TwinError

if TYPE_CHECKING:
    from twin.evaluate import EvaluateOptions

__all__ = ["app", "main"]

app = typer.Typer(
    name="mgtwin",
    help=(
        "microgrid-twin: a digital twin for battery microgrids of new and second-life EV packs.\n\n"
        "Settings come from MGTWIN_* environment variables and an optional TOML file (--config or "
        "MGTWIN_CONFIG); see `mgtwin config env` for every variable."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
contract_app = typer.Typer(help="The MQTT contract: topics, payload models, JSON Schemas.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the settings the twin would run with.", no_args_is_help=True)
app.add_typer(contract_app, name="contract")
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (default: $MGTWIN_CONFIG).", exists=True, dir_okay=False),
]


@app.command()
def version() -> None:
    """Print the version of microgrid-twin and of its contract."""
    from twin.contract import CONTRACT_VERSION

    console.print(f"microgrid-twin {__version__} (contract v{CONTRACT_VERSION})")


@contract_app.command("schemas")
def contract_schemas(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the JSON Schemas into.")],
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the folder's schemas are stale.")
    ] = False,
) -> None:
    """Write the JSON Schema of every payload of the contract (one file per message)."""
    from twin.contract import json_schemas

    schemas = {name: json.dumps(schema, indent=2, sort_keys=True) + "\n" for name, schema in json_schemas().items()}
    if check:
        stale = [n for n, text in schemas.items() if not (out / n).is_file() or (out / n).read_text() != text]
        extra = sorted(p.name for p in out.glob("*.json") if p.name not in schemas) if out.is_dir() else []
        if stale or extra:
            err_console.print(f"[red]stale schemas in {out}:[/] {', '.join(stale + extra)}")
            err_console.print(f"regenerate with: mgtwin contract schemas --out {out}")
            raise typer.Exit(1)
        console.print(f"{len(schemas)} schemas in {out} are up to date")
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, text in schemas.items():
        (out / name).write_text(text)
    console.print(f"wrote {len(schemas)} schemas to {out}")


@contract_app.command("topics")
def contract_topics(site: Annotated[str, typer.Option(help="Site identifier.")] = "nevada") -> None:
    """List the contract's topics and the schema each carries."""
    from twin.contract import CONTRACT_VERSION, TOPIC_ROOT, TopicKind, model_for_topic

    table = Table("topic", "payload schema")
    for kind in TopicKind:
        try:
            schema = f"{model_for_topic(kind).schema_name}/{CONTRACT_VERSION}"
        except TwinError:
            schema = "(emulator truth, never read by the twin)"
        table.add_row(f"{TOPIC_ROOT}/{site}/{kind.value}", schema)
    console.print(table)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective settings as JSON (secrets masked)."""
    from twin.config import load_settings

    settings = load_settings(config)
    console.print_json(data=settings.model_dump(mode="json"))


@config_app.command("env")
def config_env() -> None:
    """List every MGTWIN_* environment variable the twin reads."""
    from twin.config import env_names

    table = Table("variable", "setting")
    for env, field in env_names().items():
        table.add_row(env, field)
    console.print(table)


@app.command()
def serve(
    mqtt_url: Annotated[
        str | None, typer.Option("--mqtt", help="Broker URL, mqtt://HOST:PORT (MGTWIN_MQTT__URL).")
    ] = None,
    site: Annotated[str | None, typer.Option(help="Site identifier to subscribe to (MGTWIN_SITE).")] = None,
    influx: Annotated[
        str | None, typer.Option("--influx", help="InfluxDB URL, http://HOST:PORT (MGTWIN_INFLUX__URL).")
    ] = None,
    influx_db: Annotated[
        str | None, typer.Option("--influx-db", help="Database (1.x) or bucket (2.x) (MGTWIN_INFLUX__DATABASE).")
    ] = None,
    influx_api: Annotated[str | None, typer.Option(help="v1 (/write) or v2 (/api/v2/write).")] = None,
    health_port: Annotated[int | None, typer.Option(help="Port of /healthz and /metrics on loopback (0: any).")] = None,
    config: ConfigOption = None,
) -> None:
    """Run the twin service: ingest a site's telemetry, mirror its state, write InfluxDB, publish on MQTT.

    Messages are acknowledged to the broker only after what they produced is written to
    InfluxDB (or dead-lettered), so nothing is lost if the service or InfluxDB goes down.
    Credentials come only from the environment or files (MGTWIN_MQTT__PASSWORD,
    MGTWIN_INFLUX__PASSWORD_FILE, MGTWIN_INFLUX__TOKEN, ...), never from the command line.
    SIGTERM or Ctrl-C stops gracefully (write, acknowledge, publish offline); a second one forces.
    """
    import logging

    from twin.app import Service
    from twin.config import load_settings

    settings = load_settings(
        config,
        site=site,
        mqtt={"url": mqtt_url},
        influx={"url": influx, "database": influx_db, "api": influx_api},
        health={"port": health_port},
    )
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    service = Service(settings)
    service.install_signal_handlers()
    service.start()
    console.print(
        f"mgtwin serve: site {settings.site}, broker {settings.mqtt.url}, InfluxDB {settings.influx.url or '(none)'}; "
        f"health http://{settings.health.host}:{service.health.port if service.health else '-'}/healthz"
    )
    while not service.wait(0.5):
        pass
    service.close()
    unwritten = service.stats.counts.get("unwritten_at_stop", 0)
    if unwritten:
        err_console.print(f"stopped with {unwritten} messages not written (not acknowledged: the broker keeps them)")
        raise typer.Exit(1)


_UNITS = {"d": 86_400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    """Parse a duration such as ``24h``, ``90m``, ``1h30m``, ``2d`` or ``45`` (seconds) into seconds.

    Raises:
        typer.BadParameter: the text is not a positive duration.

    Examples:
        >>> parse_duration("1h30m"), parse_duration("45"), parse_duration("2d")
        (5400.0, 45.0, 172800.0)
    """
    import re

    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)", value)
        if not parts or "".join(n + u for n, u in parts) != value:
            msg = f"{text!r} is not a duration; use e.g. 30s, 15m, 24h, 2d or 1h30m"
            raise typer.BadParameter(msg)
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        msg = f"{text!r}: the duration must be positive"
        raise typer.BadParameter(msg)
    return seconds


@app.command()
def passport(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with packs.parquet and the replay's estimates.parquet.")],
    estimates: Annotated[
        Path | None, typer.Option("--estimates", help="Folder of the replay's estimates (default: the run folder).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the passports as CSV here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of the table.")] = False,
) -> None:
    """Print the second-life pack passports: first life, intake SoH, SoH now, RUL, aging model and validity.

    The estimates are the last window of `mgtwin replay RUN_DIR` (estimates.parquet); the first
    life and intake come from each pack's meta topic (packs.parquet).
    """
    import polars as pl

    from twin.passport import passport as build

    est_path = (estimates or run_dir) / "estimates.parquet"
    meta_path = run_dir / "packs.parquet"
    for path, hint in ((meta_path, "not a run folder"), (est_path, f"run `mgtwin replay {run_dir}` first")):
        if not path.is_file():
            err_console.print(f"[bold red]error:[/] {path} is missing: {hint}")
            raise typer.Exit(2)
    est = pl.read_parquet(est_path)
    last = est.filter(pl.col("ts_ms") == pl.col("ts_ms").max()).rename({"resistance_ohm": "resistance_ohm_25c"})
    table = build(pl.read_parquet(meta_path), last)
    if out is not None:
        table.write_csv(out)
    if as_json:
        for row in table.iter_rows(named=True):
            sys.stdout.write(json.dumps(row, default=str) + "\n")
        return
    view = Table("pack", "vehicle", "years", "intake SoH", "SoH now", "BMS SoH", "RUL P50 (d)", "knee", "model")
    for r in table.iter_rows(named=True):

        def num(value: object, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        view.add_row(
            r["pack"],
            r.get("vehicle") or "-",
            num(r.get("years_in_service"), ".1f"),
            num(r.get("intake_soh"), ".3f"),
            num(r.get("soh"), ".3f"),
            num(r.get("soh_bms"), ".3f"),
            num(r.get("rul_days_p50"), ",.0f"),
            "yes" if r.get("knee") else "",
            r.get("aging_model") or "-",
        )
    console.print(view)
    console.print(f"{table.height} second-life packs" + (f"; CSV: {out}" if out else ""))


def _aging_speedup(path: Path) -> float:
    """The emulator's ``aging_speedup`` from a run folder's run.json (1 for anything else)."""
    info = path / "run.json" if path.is_dir() else None
    if info is None or not info.is_file():
        return 1.0
    try:
        value = json.loads(info.read_text(encoding="utf-8")).get("options", {}).get("aging_speedup", 1.0)
    except (OSError, ValueError):
        return 1.0
    return float(value) if isinstance(value, int | float) and value > 0 else 1.0


def parse_start(text: str) -> datetime:
    """Parse ``now`` or an ISO 8601 time with a zone into an aware UTC datetime (whole seconds).

    Raises:
        typer.BadParameter: not a time, or no time zone.

    Examples:
        >>> parse_start("2026-01-15T06:00:00Z").isoformat()
        '2026-01-15T06:00:00+00:00'
    """
    if text.strip().lower() == "now":
        return datetime.now(UTC).replace(microsecond=0)
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        msg = f"{text!r} is not a time; use 'now' or ISO 8601 such as 2026-01-15T06:00:00Z"
        raise typer.BadParameter(msg) from exc
    if value.tzinfo is None:
        msg = f"{text!r} has no time zone; add Z for UTC, e.g. {text}Z"
        raise typer.BadParameter(msg)
    return value.astimezone(UTC).replace(microsecond=0)


@app.command()
def record(
    mqtt_url: Annotated[
        str | None, typer.Option("--mqtt", help="Broker URL, mqtt://HOST:PORT (MGTWIN_MQTT__URL).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder to record into (continued if it exists).")
    ] = None,
    site: Annotated[str | None, typer.Option(help="Site identifier to record (MGTWIN_SITE).")] = None,
    roll: Annotated[str, typer.Option(help="Close the Parquet parts this often (a crash loses at most this).")] = "2s",
    client_id: Annotated[
        str | None, typer.Option(help="Fixed MQTT client id (the broker keeps the session under it).")
    ] = None,
    duration: Annotated[str | None, typer.Option(help="Stop after this long (default: at SIGTERM or Ctrl-C).")] = None,
    config: ConfigOption = None,
) -> None:
    """Record a site's MQTT telemetry into a run folder, for `mgtwin replay`.

    Subscribes to the site's contract topics (meta and status, retained ones included;
    telemetry, cells, site) with a persistent session and writes the emulator's run-folder
    layout without truth: each table is a folder of Parquet parts closed every --roll, so a
    crash loses at most the part being written. A message is acknowledged to the broker only
    once its part is on disk, so what a crash or a broker restart interrupts is delivered
    again to the restarted recorder (same --client-id; default mgtwin-record-SITE). Messages
    that break the contract go to rejects/. SIGTERM or Ctrl-C closes the parts and stops.
    Credentials come from MGTWIN_MQTT__USERNAME and MGTWIN_MQTT__PASSWORD[_FILE].
    """
    import logging
    import signal
    import threading

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from twin.config import load_settings
    from twin.record import Recorder, RecordOptions, RecordStats

    if out is None:
        msg = "give --out DIR, the run folder to record into"
        raise typer.BadParameter(msg)
    settings = load_settings(config, site=site, mqtt={"url": mqtt_url})
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    options = RecordOptions(
        roll_s=parse_duration(roll),
        batch_max_messages=settings.ingest.batch_max_messages,
        batch_max_age_s=settings.ingest.batch_max_age_s,
    )
    recorder = Recorder(settings, out, site=settings.site, client_id=client_id, options=options)
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():  # a second signal: leave now; nothing unwritten was acknowledged
            raise SystemExit(1)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    recorder.start()
    console.print(
        f"recording site [bold]{settings.site}[/] from {settings.mqtt.url} into {out} "
        f"(client id {recorder.client_id}); SIGTERM or Ctrl-C stops",
        highlight=False,
    )

    def line(s: RecordStats) -> str:
        rows = ", ".join(f"{t} {n:,}" for t, n in sorted(s.rows.items()))
        return (
            f"{s.messages:,} messages, {len(s.packs)} packs, {s.span_s():,.0f} s of event time; {rows or 'nothing yet'}"
        )

    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True
        ) as bar:
            task = bar.add_task("waiting for messages")
            stats = recorder.run(
                stop,
                duration_s=parse_duration(duration) if duration else None,
                progress=lambda s: bar.update(task, description=line(s)),
            )
    finally:
        recorder.close()
    rejects = ", ".join(f"{r} {n}" for r, n in sorted(stats.rejects.items())) or "none"
    console.print(f"done: {line(stats)}", highlight=False)
    console.print(
        f"{stats.parts} rolls of parts, {stats.acked:,} messages acknowledged; rejects: {rejects}; run folder: {out}",
        highlight=False,
    )


@app.command()
def replay(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Run folder (from emulate --out or record), or a .csv/.parquet log; none with --from-influx."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for estimates.parquet and site_estimates.parquet (default without --influx: the run "
            "folder, or FILE-replay beside a file).",
        ),
    ] = None,
    every: Annotated[str, typer.Option(help="Estimate cadence in event time (window length).")] = "60s",
    influx: Annotated[
        str | None, typer.Option("--influx", help="Also write the points to this InfluxDB, http://HOST:PORT.")
    ] = None,
    influx_db: Annotated[
        str | None, typer.Option("--influx-db", help="Database (1.x, created if missing) or bucket (2.x).")
    ] = None,
    shift_to_now: Annotated[
        bool,
        typer.Option(
            "--shift-to-now",
            help="Move the source in time (whole hours): offline to end within the last hour, onto MQTT to start now.",
        ),
    ] = False,
    to_mqtt: Annotated[
        str | None,
        typer.Option(
            "--to-mqtt", help="Instead, re-publish the source onto this broker (mqtt://HOST:PORT) as a live site."
        ),
    ] = None,
    speed: Annotated[
        str, typer.Option(help="With --to-mqtt: event seconds per wall second, or 'max' (as fast as the broker takes).")
    ] = "1",
    connections: Annotated[int, typer.Option(help="With --to-mqtt: MQTT connections to publish on.", min=1)] = 4,
    from_influx: Annotated[
        str | None, typer.Option("--from-influx", help="Read the source from this InfluxDB (what the twin wrote).")
    ] = None,
    from_db: Annotated[str, typer.Option("--from-db", help="With --from-influx: the database to read.")] = "microgrid",
    start: Annotated[
        str | None,
        typer.Option(help="Replay from this time: ISO 8601, epoch ms, now-6h, or +2h after the source's start."),
    ] = None,
    stop: Annotated[str | None, typer.Option(help="Replay up to this time (same forms as --start).")] = None,
    site: Annotated[
        str | None,
        typer.Option(help="Site identifier: to read with --from-influx, to give a file's data, or to replay a run as."),
    ] = None,
    packs: Annotated[
        Path | None,
        typer.Option(help="Pack metadata (a packs.parquet/.csv table, or a run folder) for --from-influx or a file."),
    ] = None,
    mapping: Annotated[
        str | None,
        typer.Option("--map", help="File columns: ts=Time(s),current_a=Current(A),voltage_v=Voltage(V),temp_c=..."),
    ] = None,
    meta: Annotated[
        Path | None,
        typer.Option("--meta", help="TOML file with the pack's metadata, [map] and the options below.", exists=True),
    ] = None,
    pack: Annotated[str | None, typer.Option(help="File: the pack identifier (default: the file's name).")] = None,
    chemistry: Annotated[str | None, typer.Option(help="File: cell type (nmc811, nmc532, lfp, lmo).")] = None,
    rated_ah: Annotated[float | None, typer.Option(help="File: the pack's rated capacity, Ah.")] = None,
    series: Annotated[int | None, typer.Option(help="File: cell groups in series.")] = None,
    parallel: Annotated[int | None, typer.Option(help="File: cells in parallel per group (default 1).")] = None,
    life: Annotated[str | None, typer.Option(help="File: new or second_life (default new).")] = None,
    time_unit: Annotated[
        str | None, typer.Option(help="File: unit of a numeric time: s, ms, us or ns (default s).")
    ] = None,
    t0: Annotated[
        str | None, typer.Option(help="File: where relative times start (default 2020-01-01T00:00:00Z).")
    ] = None,
    current_sign: Annotated[
        str | None,
        typer.Option(help="File: discharge-positive (the contract's, default) or discharge-negative (flip)."),
    ] = None,
    temp_c: Annotated[
        float | None, typer.Option(help="File: the temperature when no column gives it, °C (25).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Replay recorded or external telemetry through the twin offline, or onto MQTT as a live site.

    SOURCE is a run folder (from `mgtwin emulate --out` or `mgtwin record`), a CSV or Parquet
    log (a BMS or cycler export, read through --map, --time-unit, --current-sign and the pack's
    metadata from the options or a --meta TOML file), or, with --from-influx URL --start --stop,
    what the twin wrote to InfluxDB (with --packs for the metadata InfluxDB does not hold).

    Offline (the default), the telemetry goes in event time, as fast as it goes, through the same
    core as `mgtwin serve`; after every window of --every the pack and site views are taken as the
    service would publish them. --out writes estimates.parquet, site_estimates.parquet and
    replay.json (ready for `mgtwin evaluate`); --influx writes the points the live service writes
    (telemetry, cells, site meter, pack and site state), stamped with the event time, so a second
    replay overwrites the same points. --shift-to-now moves the source to end now.

    With --to-mqtt, the source is re-published per the contract at --speed times its original
    pacing, so that a live `mgtwin serve`, Grafana and any subscriber see a live site (credentials
    from MGTWIN_MQTT__USERNAME and MGTWIN_MQTT__PASSWORD[_FILE]). With --shift-to-now it starts
    now; above --speed 1 its timestamps then run ahead of the wall clock, and a live twin refuses
    samples more than MGTWIN_INGEST__MAX_CLOCK_SKEW_S ahead. Estimator and data-quality options
    come from the settings (MGTWIN_ESTIMATION__*, MGTWIN_INGEST__*).

    A summary ends every replay: messages or rows, packs, event-time span, rejects (duplicates,
    late, clock skew, cardinality cap, repeated times of a file, unreadable parts of a
    recording), and the points written.
    """
    import re as re_module
    import time as time_module

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from twin.config import load_settings
    from twin.replay import ReplayError, ReplayOptions, ReplayWindow, RunFolder, open_run, replay_run, write_outputs
    from twin.sources import (
        ExternalOptions,
        PackSpec,
        between,
        load_external_toml,
        parse_mapping,
        parse_time,
        read_external,
        read_influx,
        read_packs,
        shifted,
        source_span,
        with_site,
    )
    from twin.state import CoreOptions

    settings = load_settings(config)
    now_ms = time_module.time_ns() // 1_000_000
    if to_mqtt is not None and (out is not None or influx is not None):
        msg = "--to-mqtt re-publishes the source for a live twin; it does not go with --out or --influx"
        raise typer.BadParameter(msg)

    def bar() -> Progress:
        return Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        )

    # ---- the source
    run: RunFolder
    is_folder = False
    if from_influx is not None:
        if source is not None:
            msg = "give either SOURCE or --from-influx, not both"
            raise typer.BadParameter(msg)
        if start is None or stop is None:
            msg = "--from-influx needs --start and --stop"
            raise typer.BadParameter(msg)
        if packs is None:
            msg = "InfluxDB holds no pack metadata: give --packs (a packs.parquet/.csv table, or a run folder)"
            raise typer.BadParameter(msg)
        influx_settings = settings.influx
        auth = None
        if influx_settings.username:
            secret = influx_settings.password.get_secret_value() if influx_settings.password else ""
            auth = (influx_settings.username, secret)
        run = read_influx(
            from_influx,
            from_db,
            site=site or settings.site,
            start_ms=parse_time(start, now_ms=now_ms),
            stop_ms=parse_time(stop, now_ms=now_ms),
            packs=read_packs(packs),
            auth=auth,
        )
    else:
        if source is None:
            msg = "give a SOURCE (run folder, .csv or .parquet file) or --from-influx URL"
            raise typer.BadParameter(msg)
        path = Path(source)
        if path.is_dir():
            run = open_run(path)
            is_folder = True
        elif path.is_file():
            values: dict[str, object] = load_external_toml(meta) if meta is not None else {}
            cli_values = {
                "pack": pack,
                "chemistry": chemistry,
                "rated_capacity_ah": rated_ah,
                "series_cells": series,
                "parallel_cells": parallel,
                "life": life,
                "time_unit": time_unit,
                "t0": t0,
                "current_sign": current_sign,
                "temp_c": temp_c,
                "site": site,
            }
            values.update({k: v for k, v in cli_values.items() if v is not None})
            table_mapping = values.pop("map", {})
            columns = parse_mapping(mapping) if mapping else dict(table_mapping)  # type: ignore[call-overload]
            spec_keys = {"pack", "chemistry", "rated_capacity_ah", "series_cells", "parallel_cells", "life", "oem"}
            spec_keys |= {"rated_energy_kwh", "voltage_min_v", "voltage_max_v"}
            spec_keys |= {"current_max_discharge_a", "current_max_charge_a"}
            spec_values = {k: values.pop(k) for k in list(values) if k in spec_keys}
            spec_values.setdefault("pack", re_module.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64])
            spec = None
            if {"chemistry", "rated_capacity_ah", "series_cells"} <= set(spec_values):
                spec = PackSpec(**spec_values)  # type: ignore[arg-type]
            elif {"chemistry", "rated_capacity_ah", "series_cells"} & set(spec_values):
                lacking = {"chemistry", "rated_capacity_ah", "series_cells"} - set(spec_values)
                msg = f"the pack's metadata lacks {', '.join(sorted(lacking))} (--chemistry, --rated-ah, --series)"
                raise ReplayError(msg)
            options = ExternalOptions(
                mapping=columns,
                pack=spec,
                packs=read_packs(packs) if packs is not None else None,
                **values,  # type: ignore[arg-type]
            )
            run = read_external(path, options)
        else:
            msg = f"{source}: no such run folder or file"
            raise ReplayError(msg)
        if start is not None or stop is not None:
            first = source_span(run)[0] if any(t.strip().startswith("+") for t in (start or "", stop or "")) else None
            run = between(
                run,
                parse_time(start, now_ms=now_ms, first_ms=first) if start else None,
                parse_time(stop, now_ms=now_ms, first_ms=first) if stop else None,
            )
        if site is not None and is_folder:
            run = with_site(run, site)
    if shift_to_now:
        first_ms, last_ms = source_span(run)
        if first_ms is None or last_ms is None:
            msg = "the source holds no telemetry to shift"
            raise ReplayError(msg)
        anchor = first_ms if to_mqtt is not None else last_ms
        run = shifted(run, (now_ms - anchor) // 3_600_000 * 3_600_000)  # whole hours: the aging chunks' grid

    # ---- onto MQTT
    if to_mqtt is not None:
        from twin.publish_replay import PublishOptions, publish_run

        pace = None if speed.strip().lower() in ("max", "inf") else float(speed)
        publish_options = PublishOptions(speed=pace, connections=connections)
        mqtt_settings = settings.mqtt.model_copy(update={"url": to_mqtt})
        console.print(
            f"publishing [bold]{run.site}[/]: {run.meta.height} packs, about {run.telemetry_rows:,} telemetry rows "
            f"-> {to_mqtt} at {'full speed' if pace is None else f'{pace:g}x'}",
            highlight=False,
        )
        with bar() as progress_bar:
            task = progress_bar.add_task("publishing", total=run.telemetry_rows)
            stats = publish_run(
                run,
                mqtt_settings,
                options=publish_options,
                progress=lambda done: progress_bar.update(task, completed=done),
            )
        kinds = ", ".join(f"{k} {n:,}" for k, n in sorted(stats.messages.items()))
        span = ((stats.last_ms or 0) - (stats.first_ms or 0)) / 1000.0
        console.print(
            f"done: {stats.total:,} messages ({kinds}) of {stats.packs} packs, {span:,.0f} s of event time, "
            f"in {stats.wall_s:.1f} s ({stats.total / max(stats.wall_s, 1e-9):,.0f} msg/s); "
            f"at most {stats.behind_s:.2f} s behind the pacing",
            highlight=False,
        )
        return

    # ---- offline, into Parquet and/or InfluxDB
    sink = None
    writer = None
    if influx is not None:
        from twin.io.influx import RetryPolicy, make_writer
        from twin.publish_replay import InfluxSink

        out_influx = settings.influx.model_copy(
            update={"url": influx, "database": influx_db or settings.influx.database}
        )
        writer = make_writer(out_influx)
        create = getattr(writer, "create_database", None)
        if callable(create):
            create()
        engine = None
        if settings.alerts.enabled:
            from twin.alerts import AlertEngine, AlertOptions

            engine = AlertEngine(AlertOptions.from_settings(settings, site=run.site))
        policy = RetryPolicy(max_s=out_influx.retry_max_s, deadline_s=120.0)
        sink = InfluxSink(writer, run.site, policy=policy, alerts=engine)
    if out is None and influx is None:
        out = run.path if is_folder else run.path.with_name(run.path.stem + "-replay")
    speedup = _aging_speedup(run.path)
    if speedup != 1.0:
        console.print(
            f"the run's packs age {speedup:g} times faster than real time (emulate --aging-speedup): "
            "so does the twin's aging model"
        )
    core_options = CoreOptions.from_settings(settings, site=run.site, aging_clock_scale=speedup)
    # Offline, the alerts go beside the estimates (alerts.parquet), for `mgtwin evaluate`.
    from twin.alerts import AlertEngine, AlertOptions, alerts_frame
    from twin.contract import Alert

    alert_engine = AlertEngine(AlertOptions.from_settings(settings, site=run.site)) if settings.alerts.enabled else None
    alerts_seen: list[Alert] = []

    def on_window(window: ReplayWindow) -> None:
        if sink is not None:
            sink.on_window(window)
        if alert_engine is not None and out is not None:
            alerts_seen.extend(
                alert_engine.update(
                    window.ingested.telemetry,
                    core=window.core,
                    now_ms=window.now_ms,
                    site=window.decoded.site,
                    status=window.decoded.status,
                )
            )

    console.print(f"replaying [bold]{run.site}[/]: {run.meta.height} packs, {run.telemetry_rows:,} telemetry rows")
    started = time_module.perf_counter()
    try:
        with bar() as progress_bar:
            task = progress_bar.add_task("replaying", total=run.telemetry_rows)
            result = replay_run(
                run,
                core_options=core_options,
                options=ReplayOptions(every_s=parse_duration(every)),
                progress=lambda done: progress_bar.update(task, completed=done),
                on_window=on_window,
            )
            if sink is not None:
                cells_task = progress_bar.add_task("writing cells", total=None)
                sink.write_cells(run, progress=lambda done: progress_bar.update(cells_task, completed=done))
                sink.flush()
    finally:
        if writer is not None:
            writer.close()
    wall_s = time_module.perf_counter() - started
    info = result.info
    paths = write_outputs(result, out) if out is not None else []
    if out is not None and alert_engine is not None:
        paths.append(out / "alerts.parquet")
        alerts_frame(alerts_seen).write_parquet(paths[-1])
    quality = info["quality"]
    span_s = ((info["end_ms"] or 0) - (info["start_ms"] or 0)) / 1000.0
    console.print(
        f"done: {info['telemetry_rows']:,} rows of {info['packs']} packs in {info['wall_s']:.1f} s "
        f"({info['rows_per_s'] or 0:,} pack-samples/s), {info['windows']} windows, {span_s:,.0f} s of event time; "
        f"duplicates {quality['duplicate']}, late {quality['late']}",
        highlight=False,
    )
    rejects = {k: v for k, v in quality.items() if k not in ("duplicate", "late") and v}
    for reason, n in info.get("refused", {}).items():  # rows of the source the contract refused
        rejects[reason] = rejects.get(reason, 0) + n
    rejects.update({k: v for k, v in getattr(run, "notes", {}).items() if v})
    skipped = getattr(run, "skipped", ())
    if skipped:
        rejects["unreadable_parts"] = len(skipped)
    if sink is not None and sink.rejected_writes:
        rejects["influx_rejected_writes"] = sink.rejected_writes
    console.print(
        "rejects: " + (", ".join(f"{k} {v:,}" for k, v in sorted(rejects.items())) or "none"), highlight=False
    )
    if sink is not None:
        points = sum(sink.points.values())
        detail = ", ".join(f"{k} {v:,}" for k, v in sorted(sink.points.items()))
        console.print(
            f"InfluxDB {influx} / {influx_db or settings.influx.database}: {points:,} points ({detail}) "
            f"in {wall_s:.1f} s "
            f"({points / max(wall_s, 1e-9):,.0f} points/s), {sink.retries} retries",
            highlight=False,
        )
    for p in paths:
        console.print(f"  {p}")


def _evaluate_options(skip: str) -> EvaluateOptions:
    """The scoring rules from --skip ("0" or "0s": score from the start)."""
    from twin.evaluate import EvaluateOptions

    return EvaluateOptions(skip_s=parse_duration(skip) if skip not in ("0", "0s") else 0.0)


def _scored_row(run_dir: Path, options: EvaluateOptions) -> dict[str, Any]:
    """One run's row for ``compare`` and ``bands``: its folder, its cells' OCV error and its scores."""
    from twin.evaluate import evaluate_run

    return {"run": str(run_dir), "ocv_error_mv": _ocv_error_mv(run_dir), **evaluate_run(run_dir, options=options)}


def _ocv_error_mv(run_dir: Path) -> float | None:
    """The run's ``cell_model.ocv_error_mv`` from its run.json (None if not recorded or unreadable)."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
        return float(info["scenario"].get("cell_model", {}).get("ocv_error_mv", 0.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with the emulator's truth (emulate --truth).")],
    estimates: Annotated[
        Path | None, typer.Option("--estimates", help="Folder of the replay's estimates (default: the run folder).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write eval_site.png and eval_packs.png.")] = True,
    skip: Annotated[str, typer.Option(help="Leave out the start of the run (the filters' warm-up).")] = "1h",
) -> None:
    """Score the twin's estimates against the emulator's truth (after `mgtwin replay`).

    Prints SoC RMSE (overall, by chemistry, and the BMS-reported SoC scored the same way),
    energy-to-floor, runtime and ride-through MAPE and how often the truth fell inside the
    twin's P5-P95 band, with how honest the stated uncertainty is: the SoC error over its
    standard deviation (RMS; 1 when honest) and each band's median half-width beside the
    median error. Errors are fractions in --json (0.012 = 1.2 %). Plots of estimate against
    truth with the bands, for the site and the worst packs, go beside the estimates.
    """
    import polars as pl

    from twin.evaluate import band_verdict, evaluate_run, plot_run

    options = _evaluate_options(skip)
    scores = evaluate_run(run_dir, estimates_dir=estimates, options=options)
    if (run_dir / "faults.parquet").is_file():
        from twin.alerts import alerts_from_run
        from twin.evaluate import alert_scores

        saved = (estimates or run_dir) / "alerts.parquet"
        alerts = pl.read_parquet(saved) if saved.is_file() else alerts_from_run(run_dir)
        scores.update(alert_scores(run_dir, alerts))
    files = plot_run(run_dir, estimates or run_dir, estimates_dir=estimates, options=options) if plots else []
    if as_json:
        sys.stdout.write(json.dumps({**scores, "plots": [str(f) for f in files]}, sort_keys=True) + "\n")
        return

    def pct(value: object) -> str:
        return "-" if value is None else f"{float(value):.2%}"  # type: ignore[arg-type]

    table = Table("figure", "twin", "BMS", title=f"{run_dir}: estimates against the truth (after {skip})")
    table.add_row("SoC RMSE", pct(scores["soc_rmse"]), pct(scores["soc_rmse_bms"]))
    for chem, value in (scores["soc_rmse_by_chemistry"] or {}).items():
        table.add_row(f"  {chem}", pct(value), pct((scores["soc_rmse_bms_by_chemistry"] or {}).get(chem)))
    table.add_row("pack energy to floor MAPE", pct(scores["pack_energy_mape"]), "")
    table.add_row("SoH MAE (points)", pct(scores.get("soh_mae")), pct(scores.get("soh_mae_bms")))
    table.add_row("capacity MAPE", pct(scores.get("capacity_mape")), "")
    table.add_row("resistance MAPE", pct(scores.get("resistance_mape")), "")
    table.add_row(
        "RUL MAPE / P5-P95 coverage", f"{pct(scores.get('rul_mape'))} / {pct(scores.get('rul_band_coverage'))}", ""
    )
    if "rul_mape_no_knee" in scores:
        for label, name in (("no_knee", "without"), ("knee", "with")):
            table.add_row(
                f"  packs {name} a knee ({scores[f'rul_packs_{label}']})", pct(scores[f"rul_mape_{label}"]), ""
            )
    if "alerts_precision" in scores:
        table.add_row(
            "alerts precision / recall", f"{pct(scores['alerts_precision'])} / {pct(scores['alerts_recall'])}", ""
        )
        delay = scores.get("alert_delay_s_median")
        table.add_row("alert delay, median", "-" if delay is None else f"{float(delay):.0f} s", "")
    if scores.get("soc_z_rms") is not None:
        by_z = ", ".join(f"{c} {v:.2f}" for c, v in (scores["soc_z_rms_by_chemistry"] or {}).items())
        table.add_row("SoC error / its std, RMS", f"{scores['soc_z_rms']:.2f} ({by_z})", "")
    for name in ("energy", "runtime", "ridethrough"):
        table.add_row(f"site {name} MAPE", pct(scores[f"{name}_mape"]), "")
        table.add_row(f"site {name} P5-P95 coverage", pct(scores[f"{name}_band_coverage"]), "")
        table.add_row(
            "  band half-width / error",
            f"{pct(scores[f'{name}_band_halfwidth'])} / {pct(scores[f'{name}_error_median'])}",
            "",
        )
    console.print(table)
    verdict = band_verdict(scores, _ocv_error_mv(run_dir))
    if verdict:
        console.print(verdict)
    console.print(
        f"{scores['packs_scored']} packs, {scores['pack_rows_scored']:,} pack rows, "
        f"{scores['site_rows_scored']} site rows"
    )
    for f in files:
        console.print(f"plot: {f}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Replayed run folders with the emulator's truth.")],
    as_json: Annotated[
        bool, typer.Option("--json", help='Print one JSON object, {"runs": [...], "pooled": {...}}, instead.')
    ] = False,
    skip: Annotated[str, typer.Option(help="Leave out the start of each run (the filters' warm-up).")] = "1h",
) -> None:
    """Score several replayed runs and print one row each, and the runs pooled: SoC, site energy and bands.

    For sweeps such as `make accuracy-ocv` (the same site with its cells' OCV further and
    further off the twin's tables) and ensembles such as `make accuracy-bands` (many draws of
    the site, each with its own error of the tables): each row gives the run's
    ``cell_model.ocv_error_mv``, SoC RMSE (and the BMS's, and by chemistry), site energy,
    runtime and ride-through MAPE, the bands' coverage (energy / runtime / ride-through), the
    energy band's median half-width, and the SoC error over its stated std. The last row pools
    the runs as if their points were one run's (a band's coverage is a statement about many
    runs: on one, an error common to a chemistry's packs lasts the whole run). --json prints
    {"runs": [one object per run], "pooled": {...}}.
    """
    from rich.progress import track

    from twin.evaluate import pool_scores

    options = _evaluate_options(skip)
    progress = track(run_dirs, description="scoring", disable=len(run_dirs) < 4 or not console.is_terminal)
    rows = [_scored_row(run_dir, options) for run_dir in progress]
    pooled = pool_scores(rows)
    if as_json:
        sys.stdout.write(json.dumps({"runs": rows, "pooled": pooled}, sort_keys=True) + "\n")
        return
    _print_runs(rows, pooled, "runs side by side")


_SITE_FIGURES = ("energy", "runtime", "ridethrough")
_RUNS_CAPTION = (
    "in %: mV, the cells' OCV off the twin's tables; SoC and BMS, RMSE; E, R and RT, site energy, runtime and "
    "ride-through MAPE; held, how often their P5-P95 held the truth; band±, the energy band's median half-width; "
    "z, SoC error over its std (RMS)"
)


def _print_runs(rows: list[dict[str, Any]], pooled: dict[str, Any], title: str) -> None:
    """One row per scored run and, for several, the pooled row (``compare`` and ``bands``)."""

    def pct(value: object) -> str:
        return "-" if value is None else f"{100.0 * float(value):.1f}"  # type: ignore[arg-type]

    def cover(r: dict[str, Any]) -> str:
        return "/".join(
            f"{100.0 * v:.0f}" if (v := r[f"{k}_band_coverage"]) is not None else "-" for k in _SITE_FIGURES
        )

    # By chemistry only where there is room for it (a terminal of 80 columns squeezes the rest to "…").
    chems = sorted({c for r in rows for c in (r["soc_rmse_by_chemistry"] or {})}) if console.width >= 120 else []
    headers = ("run", "mV", "SoC", "BMS", *chems, "E", "R", "RT", "held E/R/RT", "band±", "z")
    table = Table(*headers, title=title, caption=_RUNS_CAPTION, padding=(0, 1))
    for column in table.columns[1:]:
        column.no_wrap = True  # figures whole; the run's name is what shrinks
    table.columns[0].min_width = 8
    for r in rows:
        by = r["soc_rmse_by_chemistry"] or {}
        table.add_row(
            Path(r["run"]).name,
            "-" if r["ocv_error_mv"] is None else f"{r['ocv_error_mv']:g}",
            pct(r["soc_rmse"]),
            pct(r["soc_rmse_bms"]),
            *[pct(by.get(c)) for c in chems],
            *[pct(r[f"{k}_mape"]) for k in ("energy", "runtime", "ridethrough")],
            cover(r),
            pct(r["energy_band_halfwidth"]),
            "-" if r["soc_z_rms"] is None else f"{r['soc_z_rms']:.2f}",
        )
    if len(rows) > 1:
        table.add_section()
        table.add_row(
            f"pooled ({len(rows)} runs)",
            "",
            pct(pooled["soc_rmse"]),
            pct(pooled["soc_rmse_bms"]),
            *["" for _ in chems],
            *[pct(pooled[f"{k}_mape"]) for k in ("energy", "runtime", "ridethrough")],
            cover(pooled),
            pct(pooled["energy_band_halfwidth"]),
            "-" if pooled["soc_z_rms"] is None else f"{pooled['soc_z_rms']:.2f}",
        )
    console.print(table)
    if len(rows) > 1:
        cov = " / ".join(pct(pooled[f"{k}_band_coverage"]) for k in _SITE_FIGURES)
        cov50 = " / ".join(pct(pooled[f"{k}_band50_coverage"]) for k in _SITE_FIGURES)
        held = " / ".join(str(pooled[f"{k}_runs_covering_all"]) for k in _SITE_FIGURES)
        console.print(
            f"pooled over {len(rows)} runs: P5-P95 holds the truth {cov} % of the time (energy / runtime / "
            f"ride-through; about 90 % when calibrated), the P25-P75 it implies {cov50} % (about 50 %); "
            f"runs whose band held it every time: {held}",
            highlight=False,
        )


#: Draws of ``mgtwin bands`` start this far apart: 29 h, so that 24 draws start at every hour of the day.
BANDS_START_STEP_S = 29 * 3600


def _draw_commands(
    k: int,
    *,
    scenario: str,
    packs: int | None,
    duration: str,
    seed: int,
    start: datetime,
    ocv_error_mv: float,
    out: Path,
) -> list[list[str]]:
    """The two commands (``mgtwin emulate``, ``mgtwin replay``) of draw ``k`` of ``mgtwin bands``."""
    from datetime import timedelta

    begin = (start + timedelta(seconds=k * BANDS_START_STEP_S)).strftime("%Y-%m-%dT%H:%M:%SZ")
    mgtwin = [sys.executable, "-m", "twin.cli"]
    emulate = [
        *mgtwin,
        "emulate",
        "--scenario",
        scenario,
        "--duration",
        duration,
        "--pack-level",
        "--truth",
        "--site-truth-every",
        "10m",
        "--seed",
        str(seed + k),
        "--start",
        begin,
        "--ocv-error-mv",
        f"{ocv_error_mv:g}",
        "--out",
        str(out),
        *(["--packs", str(packs)] if packs else []),
    ]
    return [emulate, [*mgtwin, "replay", str(out)]]


@app.command()
def bands(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the draws' run folders (draw-00, ...).")] = Path(
        "runs/bands"
    ),
    scenario: Annotated[str, typer.Option("--scenario", "-s", help="Packaged scenario or TOML file.")] = "nevada",
    packs: Annotated[
        int, typer.Option(help="Scale the scenario to N packs, keeping the mix (0: the scenario's own).", min=0)
    ] = 60,
    duration: Annotated[str, typer.Option("--duration", "-d", help="Simulated time of each draw.")] = "4h",
    draws: Annotated[int, typer.Option(help="How many draws of the site.", min=1, max=500)] = 24,
    ocv_error_mv: Annotated[
        float | None,
        typer.Option(
            "--ocv-error-mv",
            help="RMS of each draw's OCV-table error per chemistry, mV (default: the twin's own budget, "
            "SocOptions.ocv_error_v).",
            min=0.0,
            max=50.0,
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Draws emulated and replayed at once (processes).", min=1)] = 2,
    skip: Annotated[str, typer.Option(help="Leave out the start of each draw (the filters' warm-up).")] = "1h",
    as_json: Annotated[
        bool, typer.Option("--json", help='Print one JSON object, {"runs": [...], "pooled": {...}}, instead.')
    ] = False,
    plots: Annotated[
        bool, typer.Option("--plots/--no-plots", help="Write OUT/bands.png: where the truth fell in the bands.")
    ] = True,
) -> None:
    """Score the twin's P5-P95 bands over many draws of a site: does P5-P95 hold the truth 90 % of the time?

    One run says little about a band: the error of a chemistry's OCV table is common to its
    packs and lasts the whole run, so a run's band holds the truth nearly always or nearly
    never (and always when the emulated cells are the twin's tables). Each draw here is the
    site emulated with its own seed (sensor offsets, cell spread, SoH, weather), its own start
    (29 h after the previous one: 24 draws start at every hour of the day) and its own error
    of the OCV tables (a smooth curve per chemistry at --ocv-error-mv RMS, by default the
    twin's own budget, so the truth is drawn as the twin assumes). Each is emulated and
    replayed with `mgtwin emulate` and `mgtwin replay` into OUT/draw-NN, scored after --skip,
    and the table pools them (`mgtwin compare`'s rows). A calibrated band holds the truth
    about 90 % of the pooled time (the issue's harness asks for 80-98 %), and the P25-P75 it
    implies for a normal error about 50 %. OUT/bands.png shows where the truth fell in the
    bands, pooled, against a calibrated band's curve, and each draw's coverage.
    """
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import polars as pl
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from emulators.scenario import load_scenario
    from twin.estimators.soc import SocOptions
    from twin.evaluate import band_places, plot_bands, pool_scores

    try:
        sc = load_scenario(scenario)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--scenario") from exc
    parse_duration(duration)  # a bad duration is said here, not by every draw
    options = _evaluate_options(skip)
    mv = 1000.0 * SocOptions().ocv_error_v if ocv_error_mv is None else ocv_error_mv
    folders = [out / f"draw-{k:02d}" for k in range(draws)]
    stop = threading.Event()

    def run_draw(k: int) -> None:
        for cmd in _draw_commands(
            k,
            scenario=scenario,
            packs=packs,
            duration=duration,
            seed=sc.seed,
            start=sc.start,
            ocv_error_mv=mv,
            out=folders[k],
        ):
            if stop.is_set():
                return
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if stop.is_set():
                return  # interrupted meanwhile: what the step wrote may be partial, replay nothing of it
            if done.returncode != 0:
                tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
                msg = f"draw {k} failed: mgtwin {cmd[3]} {folders[k]} exited {done.returncode}: {escape(tail)}"
                raise TwinError(msg)

    out.mkdir(parents=True, exist_ok=True)
    err_console.print(
        f"{draws} draws of [bold]{sc.site}[/] ({packs or sc.pack_count} packs, {duration} each, OCV tables "
        f"{mv:g} mV RMS off) -> {out}",
        highlight=False,
    )
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            task = bar.add_task("emulating and replaying", total=draws)
            for future in as_completed([pool.submit(run_draw, k) for k in range(draws)]):
                future.result()
                bar.advance(task)
    except BaseException:
        # A draw failed, or Ctrl-C (which the running steps got too): start nothing more, and
        # wait for what is running so that no process is left behind.
        stop.set()
        err_console.print("stopping: waiting for the draws under way to end", highlight=False)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    rows = [_scored_row(f, options) for f in folders]
    pooled = pool_scores(rows)
    if plots:
        places = pl.concat([band_places(f, options=options) for f in folders])
        err_console.print(f"plot: {plot_bands(rows, places, out / 'bands.png')}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps({"runs": rows, "pooled": pooled}, sort_keys=True) + "\n")
        return
    _print_runs(rows, pooled, f"{draws} draws of {sc.site}, OCV tables {mv:g} mV off")


@app.command()
def rul(
    file: Annotated[Path, typer.Argument(help="Capacity checkups: a CSV or Parquet table, per cell or pack.")],
    mapping: Annotated[
        str,
        typer.Option(
            "--map",
            help="Our names = your columns: cycle=...,capacity_ah=...[,cell=...][,time_s=...] (or soh=... "
            "instead of capacity_ah).",
        ),
    ],
    eol: Annotated[float, typer.Option("--eol", help="End-of-life threshold, capacity over rated.")] = 0.7,
    rated_ah: Annotated[
        float | None, typer.Option("--rated-ah", help="Rated capacity, Ah (default: each series' first checkup).")
    ] = None,
    chemistry: Annotated[
        str | None, typer.Option(help="Cell chemistry (nmc811, nmc532, lfp, lmo): its aging law shapes the fit.")
    ] = None,
    fit_fraction: Annotated[float, typer.Option(help="Share of each series the model is fitted on.")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
) -> None:
    """Forecast when each series' capacity crosses --eol, from the first part of its checkups.

    Fits a BLAST-style power law in cycles (knee-aware) on the first --fit-fraction of each
    series, forecasts the crossing with P5/P50/P95 (residual bootstrap) and, where the later
    checkups show the crossing, reports the error. Cycles are in the file's units; a time_s
    column is reported in days.
    """
    from twin.rul import RulOptions, checkup_table, parse_mapping, read_checkups, rul_report

    try:
        columns = parse_mapping(mapping)
        options = RulOptions(eol_soh=eol, fit_fraction=fit_fraction, rated_ah=rated_ah, chemistry=chemistry)
        table = checkup_table(read_checkups(file), columns, options)
        report = rul_report(table, options, x_unit="cycle" if "cycle" in columns else "day")
    except TwinError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from exc
    if as_json:
        sys.stdout.write(json.dumps({"file": str(file), **report}, sort_keys=True) + "\n")
        return

    def num(value: object, fmt: str = ".0f") -> str:
        return "-" if value is None else format(value, fmt)

    unit = report["x_unit"]
    table_out = Table(
        "series",
        "fitted",
        f"P5 ({unit})",
        "P50",
        "P95",
        "actual",
        "RUL error",
        "model",
        title=f"{file}: capacity to {eol:.0%} of rated, fitted on the first {fit_fraction:.0%}",
    )
    for s in report["series"]:
        err = s["rul_relative_error"]
        table_out.add_row(
            s["series"],
            f"{s['fit_points']}/{s['points']} to {s['x_fit_end']:.0f}",
            num(s["eol_p5"]),
            num(s["eol_p50"]),
            num(s["eol_p95"]),
            num(s["actual"]),
            "-" if err is None else f"{err:+.1%}",
            f"{s['model']} p={s['exponent']:.2f}",
        )
    console.print(table_out)
    summary = report["summary"]
    if summary["scored"]:
        console.print(
            f"{summary['scored']} of {summary['series']} series cross in the data: RUL MAPE "
            f"{summary['rul_mape']:.1%}, P5-P95 coverage {summary['coverage_p5_p95']:.0%}"
        )


@app.command()
def emulate(
    scenario: Annotated[
        str, typer.Option("--scenario", "-s", help="Packaged scenario name (see --list) or path to a TOML file.")
    ] = "nevada",
    duration: Annotated[str, typer.Option("--duration", "-d", help="Simulated time: 30m, 24h, 7d, ...")] = "1h",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write a run folder here (offline, as fast as possible).")
    ] = None,
    mqtt_url: Annotated[
        str | None, typer.Option("--mqtt", help="Publish live to this broker (mqtt://HOST:PORT) instead.")
    ] = None,
    speed: Annotated[float, typer.Option(help="Live: simulated seconds per wall-clock second.", min=0.01)] = 1.0,
    truth: Annotated[
        bool, typer.Option("--truth/--no-truth", help="Offline: write truth tables; live: publish truth topics.")
    ] = False,
    packs: Annotated[
        int | None, typer.Option(help="Scale the scenario down to N packs, keeping the mix.", min=1)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    start: Annotated[
        str | None,
        typer.Option(
            help="Start time of the simulated site: 'now' (live runs for a dashboard) or ISO 8601, "
            "e.g. 2026-01-15T06:00:00Z (default: the scenario's)."
        ),
    ] = None,
    dt: Annotated[
        float, typer.Option(help="Physics time step in seconds (telemetry cadence stays the scenario's).")
    ] = 1.0,
    pack_level: Annotated[
        bool, typer.Option("--pack-level", help="Two cell groups per string instead of every cell (faster).")
    ] = False,
    truth_every: Annotated[str, typer.Option(help="Cadence of the per-pack truth table.")] = "10s",
    site_truth_every: Annotated[str, typer.Option(help="Cadence of the site's forward-simulated runtime.")] = "15m",
    aging_speedup: Annotated[
        float, typer.Option(help="Multiply aging rates (see months of fade in a short run).")
    ] = 1.0,
    ocv_error_mv: Annotated[
        float | None,
        typer.Option(
            help="The cells' OCV off the chemistry's table (the twin's) by a smooth curve of this RMS, mV, "
            "per chemistry: how the twin fares when its tables are not the cells' (scenario: cell_model.ocv_error_mv).",
            min=0.0,
            max=50.0,
        ),
    ] = None,
    list_scenarios: Annotated[bool, typer.Option("--list", help="List the packaged scenarios and exit.")] = False,
) -> None:
    """Run the pack and site emulators: to a run folder (--out) or live on MQTT (--mqtt).

    Offline runs write run.json, packs, status, telemetry, cells and site tables as Parquet, and
    with --truth the emulator's true state (truth.parquet, site_truth.parquet) for evaluation.
    Live runs publish per the MQTT contract, one gateway connection per pack; the same seed gives
    the same messages at any --speed. Broker credentials come from MGTWIN_EMULATOR_USERNAME and
    MGTWIN_EMULATOR_PASSWORD, never the command line.
    """
    import os

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from emulators.live import FolderSink, MqttSink, run_info
    from emulators.publisher import Credentials
    from emulators.run import Emulation, EmulationOptions
    from emulators.scenario import list_scenarios as packaged
    from emulators.scenario import load_scenario

    if list_scenarios:
        for name in packaged():
            sc = load_scenario(name)
            console.print(
                f"{name:12s} {sc.pack_count:5d} packs  {sc.nameplate_power_mw:6.2f} MW  "
                f"{sc.nameplate_energy_mwh:6.2f} MWh  {sc.description}"
            )
        return
    if (out is None) == (mqtt_url is None):
        msg = "give exactly one of --out DIR (offline) or --mqtt URL (live)"
        raise typer.BadParameter(msg)
    sc = load_scenario(scenario)
    if packs is not None:
        sc = sc.scaled(packs)
    if seed is not None:
        sc = sc.model_copy(update={"seed": seed})
    if start is not None:
        sc = sc.model_copy(update={"start": parse_start(start)})
    if ocv_error_mv is not None:
        sc = sc.model_copy(update={"cell_model": sc.cell_model.model_copy(update={"ocv_error_mv": ocv_error_mv})})
    options = EmulationOptions(
        duration_s=parse_duration(duration),
        dt_s=dt,
        cell_level=not pack_level,
        chunk_s=600.0 if out is not None else max(dt, min(10.0, 10.0 * speed)),
        truth_every_s=parse_duration(truth_every),
        site_truth_every_s=parse_duration(site_truth_every),
        aging_speedup=aging_speedup,
        truth=truth,
    )
    emulation = Emulation(sc, options)
    sink: FolderSink | MqttSink
    if out is not None:
        sink = FolderSink(out, truth=truth)
    else:
        user = os.environ.get("MGTWIN_EMULATOR_USERNAME")
        creds = Credentials(user, os.environ.get("MGTWIN_EMULATOR_PASSWORD")) if user else None
        assert mqtt_url is not None
        sink = MqttSink(mqtt_url, sc.site, list(emulation.fleet.pack_ids), speed=speed, truth=truth, credentials=creds)
    total_steps = round(options.duration_s / options.dt_s)
    where = str(out) if out is not None else f"{mqtt_url} at {speed:g}x"
    console.print(f"emulating [bold]{sc.site}[/]: {emulation.fleet.n_packs} packs, {duration} -> {where}")
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("simulating", total=total_steps)
        try:
            figures = emulation.run(sink, progress=lambda done: bar.update(task, completed=done))
        except KeyboardInterrupt:
            err_console.print("interrupted: closing what was written so far")
            figures = {"wall_s": 0.0, "steps": float(emulation.steps_done), "pack_steps_per_s": 0.0}
        finally:
            sink.close(run_info(emulation))
    if out is not None and truth:
        from emulators.eol import write_eol_truth
        from emulators.faults_truth import write_faults

        write_faults(emulation, out)  # after the run: a randomly drawn weak cell is known once applied
        write_eol_truth(emulation, out)
    console.print(
        f"done: {int(figures['steps'])} steps of {options.dt_s:g} s for {emulation.fleet.n_packs} packs in "
        f"{figures['wall_s']:.1f} s ({figures['pack_steps_per_s']:,.0f} pack-steps/s)"
    )
    if out is not None:
        console.print(f"run folder: {out}")


dashboards_app = typer.Typer(
    help=(
        "Grafana dashboards: write their JSON, run every panel's query against InfluxDB, push them to a Grafana.\n\n"
        "The datasource's credentials come from INFLUX_TOKEN (InfluxDB 2.x/3.x, sent as 'Authorization: Token') or "
        "INFLUX_USER and INFLUX_PASSWORD (1.x); Grafana's from GRAFANA_TOKEN or GRAFANA_USER and GRAFANA_PASSWORD."
    ),
    no_args_is_help=True,
)
app.add_typer(dashboards_app, name="dashboards")


@dashboards_app.command("write")
def dashboards_write(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the dashboard JSON files.")] = Path("dashboards"),
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 if the folder's dashboards are stale.")
    ] = False,
) -> None:
    """Write the five dashboards (overview, pack, fleet, alerts, twin health) as Grafana JSON, for provisioning."""
    from twin.dashboards import write_dashboards

    names = write_dashboards(out, check=check)
    if check:
        if names:
            err_console.print(f"[red]stale dashboards in {out}:[/] {', '.join(names)}")
            err_console.print(f"regenerate with: mgtwin dashboards write --out {out}")
            raise typer.Exit(1)
        console.print(f"the dashboards in {out} are up to date")
        return
    console.print(f"wrote {len(names)} dashboards to {out}: {', '.join(names)}")


@dashboards_app.command("check")
def dashboards_check(
    influx: Annotated[str, typer.Option("--influx", help="InfluxDB URL, http://HOST:PORT (1.x, or 2.x/3.x v1 API).")],
    influx_db: Annotated[str, typer.Option("--influx-db", help="Database (1.x) or bucket (2.x/3.x).")] = "microgrid",
    site: Annotated[
        str | None, typer.Option(help="Value of the $site variable (default: the first site found).")
    ] = None,
    pack: Annotated[
        str | None, typer.Option(help="Value of the $pack variable (default: the first pack found).")
    ] = None,
    start: Annotated[
        str | None,
        typer.Option("--from", help="Range start: now-6h, an ISO time or epoch ms (default: --to minus --window)."),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option(
            "--to", help="Range end: now, now-1h, an ISO time or epoch ms (default: the site's newest point)."
        ),
    ] = None,
    window: Annotated[str, typer.Option(help="Range length when --from is not given.")] = "1h",
    source: Annotated[
        Path | None, typer.Option("--dir", help="Check the dashboards in this folder instead of the built-in ones.")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Also fail on panels waiting for fields the twin does not write yet.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
) -> None:
    """Run every panel's query against InfluxDB, as Grafana would, and report those that fail or return nothing.

    Grafana's macros ($timeFilter, $__interval, $__interval_ms, $__from, $__to) and the template
    variables ($site, $pack) are substituted first; a variable without a value given is resolved
    by running its own query, as Grafana does. Each query ends up as:

    ok: it returned data.
    no data: the fields it reads are in InfluxDB, yet nothing came back in the range (a problem).
    waiting: it reads a field this database has never held (the twin does not write it yet).
    error: InfluxDB refused the query.

    Exit status 1 when a query errs or returns no data (with --strict, also when one is waiting).
    """
    import os
    import time as time_module

    from twin.dashboards import InfluxCredentials, check_dashboards, load_dashboards, parse_time

    now_ms = time_module.time_ns() // 1_000_000
    variables = {k: v for k, v in (("site", site), ("pack", pack)) if v}
    report = check_dashboards(
        influx,
        influx_db,
        credentials=InfluxCredentials.from_env(os.environ),
        dashboards=load_dashboards(source),
        from_ms=parse_time(start, now_ms=now_ms) if start else None,
        to_ms=parse_time(end, now_ms=now_ms) if end else None,
        window_s=parse_duration(window),
        variables=variables,
    )
    failed = report.failed or (strict and bool(report.by_status("waiting")))
    if as_json:
        doc = {
            "from_ms": report.from_ms,
            "to_ms": report.to_ms,
            "variables": report.variables,
            "failed": failed,
            "checks": [
                {
                    "dashboard": c.query.dashboard,
                    "panel_id": c.query.panel_id,
                    "title": c.query.title,
                    "ref_id": c.query.ref_id,
                    "status": c.status,
                    "series": c.series,
                    "values": c.values,
                    "missing": [f"{m}.{f}" for m, f in c.missing],
                    "message": c.message,
                }
                for c in report.checks
            ],
        }
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    else:
        from datetime import UTC, datetime

        def iso(ms: int) -> str:
            return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")

        styles = {"ok": "green", "no data": "red", "waiting": "yellow", "error": "bold red"}
        table = Table("dashboard", "panel", "status", "values", "detail", title=f"{influx} / {influx_db}")
        for c in report.checks:
            label = c.query.title + (f" [{c.query.ref_id}]" if c.query.ref_id not in ("", "A") else "")
            table.add_row(
                c.query.dashboard,
                label,
                f"[{styles[c.status]}]{c.status}[/]",
                str(c.values),
                c.message,
                end_section=False,
            )
        console.print(table)
        variables_text = ", ".join(f"${k}={v}" for k, v in sorted(report.variables.items())) or "none"
        console.print(
            f"range {iso(report.from_ms)} to {iso(report.to_ms)}; variables {variables_text}", highlight=False
        )
        counts = {s: len(report.by_status(s)) for s in ("ok", "waiting", "no data", "error")}
        console.print(
            f"{counts['ok']} ok, {counts['waiting']} waiting for fields not written yet, "
            f"{counts['no data']} with no data, {counts['error']} failed",
            highlight=False,
        )
    if failed:
        raise typer.Exit(1)


@dashboards_app.command("push")
def dashboards_push(
    grafana: Annotated[str, typer.Option("--grafana", help="Grafana's URL, http://HOST:PORT (no credentials in it).")],
    influx_url: Annotated[
        str | None,
        typer.Option(
            "--influx-url", help="InfluxDB's URL as Grafana reaches it (default: $INFLUX_URL or http://127.0.0.1:8086)."
        ),
    ] = None,
    influx_db: Annotated[str, typer.Option("--influx-db", help="Database (1.x) or bucket (2.x/3.x).")] = "microgrid",
    source: Annotated[
        Path | None, typer.Option("--dir", help="Push the dashboards in this folder instead of the built-in ones.")
    ] = None,
) -> None:
    """Upload the InfluxDB datasource and the dashboards to a Grafana that is not provisioned from files.

    Creates or updates the datasource (uid mgtwin-influxdb, InfluxQL), the folder "Microgrid twin"
    and every dashboard, through Grafana's HTTP API (grafana-client). Grafana's credentials come
    from GRAFANA_TOKEN (a service-account token) or GRAFANA_USER and GRAFANA_PASSWORD; the
    datasource's from INFLUX_TOKEN, or INFLUX_USER and INFLUX_PASSWORD. Nothing secret is
    taken from the command line.
    """
    import os

    from twin.dashboards import InfluxCredentials, grafana_credential_from_env, load_dashboards, push_dashboards

    result = push_dashboards(
        grafana,
        influx_url=influx_url or os.environ.get("INFLUX_URL") or "http://127.0.0.1:8086",
        database=influx_db,
        influx_credentials=InfluxCredentials.from_env(os.environ),
        grafana_credential=grafana_credential_from_env(os.environ),
        dashboards=load_dashboards(source),
    )
    console.print(
        f"pushed datasource {result.datasource} and {len(result.dashboards)} dashboards "
        f"({', '.join(result.dashboards)}) to {result.grafana}, folder {result.folder}",
        highlight=False,
    )


@app.command()
def demo(
    duration: Annotated[str, typer.Option("--duration", "-d", help="Wall-clock time to run: 90s, 3m, 1h.")] = "3m",
    speed: Annotated[float, typer.Option(help="Simulated seconds per wall-clock second.", min=0.1)] = 60.0,
    packs: Annotated[
        int,
        typer.Option(
            help=(
                "Scale the site down to N packs, keeping its mix. The default fits the embedded broker at 60x "
                "on 2 cores (about 1.6k msg/s; the 805-pack site at 60x would be about 53k msg/s); "
                "halve the speed to double the packs."
            ),
            min=1,
        ),
    ] = 24,
    scenario: Annotated[str, typer.Option("--scenario", "-s", help="Packaged scenario name or TOML path.")] = "nevada",
    mqtt_url: Annotated[
        str | None,
        typer.Option("--mqtt", help="Use this broker (mqtt://HOST:PORT, MQTT 3.1.1) instead of the embedded one."),
    ] = None,
    influx: Annotated[
        str | None,
        typer.Option(
            "--influx", help="Also write InfluxDB here (http://HOST:PORT; credentials from MGTWIN_INFLUX__*)."
        ),
    ] = None,
    influx_db: Annotated[
        str, typer.Option("--influx-db", help="Database (1.x, created if missing) or bucket (2.x).")
    ] = "microgrid",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder to record into (default: runs/demo-TIMESTAMP).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    pack_level: Annotated[
        bool, typer.Option("--pack-level", help="Two cell groups per string instead of every cell (lighter physics).")
    ] = False,
) -> None:
    """Run the whole twin on your machine with no services: broker, emulated Nevada site, twin, live view.

    Starts an MQTT broker (amqtt) on a free loopback port unless --mqtt is given, runs the Nevada
    site's emulator live on it at --speed times real time, runs the twin on it (exactly the
    service `mgtwin serve` runs), and shows what the twin publishes: site power, SoC and energy to
    the floor with their bands, runtime and ride-through, the five weakest packs, active alerts and
    the ingest rate. With --influx the twin also writes InfluxDB (look at it with the Grafana
    dashboards). The emulator's output, with its truth, is recorded into a run folder, so that
    `mgtwin replay RUN && mgtwin evaluate RUN` can score the twin afterwards.

    Ends after --duration (or when the emulation ends, or on Ctrl-C) with a summary and the path
    of the run folder. Timestamps are simulated time from the scenario's start (2025-07-01 for
    Nevada), so look there in Grafana.
    """
    from rich.live import Live

    from twin.demo import Demo, DemoOptions, DemoSnapshot, progress_line, render_view

    options = DemoOptions(
        scenario=scenario,
        packs=packs,
        speed=speed,
        duration_s=parse_duration(duration),
        out=out,
        mqtt_url=mqtt_url,
        influx_url=influx,
        influx_db=influx_db,
        seed=seed,
        pack_level=pack_level,
    )
    run = Demo(options)
    console.print(
        f"demo: site {run.site} with {run.emulation.fleet.n_packs} packs at {speed:g}x for {duration}; "
        f"recording into {run.run_dir} (Ctrl-C ends it early)",
        highlight=False,
        markup=False,
    )
    if console.is_terminal:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            summary = run.run(lambda snap: live.update(render_view(snap)))
    else:
        printed = [-1e9]

        def tick(snap: DemoSnapshot) -> None:
            if snap.wall_s - printed[0] >= 10.0:
                printed[0] = snap.wall_s
                console.print(progress_line(snap), highlight=False, markup=False, soft_wrap=True)

        summary = run.run(tick)
    for line in summary.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def main() -> None:
    """Run the CLI, turning the twin's own errors into one clear line and exit status 2."""
    try:
        app()
    except TwinError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
