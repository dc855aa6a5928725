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
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from twin import __version__
from twin.errors import TwinError

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
def replay(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (from `mgtwin emulate --out` or `mgtwin record`).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for estimates.parquet and site_estimates.parquet.")
    ] = None,
    every: Annotated[str, typer.Option(help="Estimate cadence in event time (window length).")] = "60s",
    config: ConfigOption = None,
) -> None:
    """Replay a recorded run through the twin offline, as fast as it goes, and write its estimates.

    The run's telemetry goes, in event time, through the same core as `mgtwin serve` (mirror,
    data-quality rules, SoC filter, energy and runtime model); after every window of --every the
    pack and site views are taken as the service would publish them. Writes estimates.parquet
    (per pack), site_estimates.parquet (per site) and replay.json into --out (default: the run
    folder), ready for `mgtwin evaluate`. The reserve floor and estimator options come from the
    settings (MGTWIN_ESTIMATION__RESERVE_FLOOR_SOC, ...).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from twin.config import load_settings
    from twin.replay import ReplayOptions, RunFolder, replay_run, write_outputs
    from twin.state import CoreOptions

    settings = load_settings(config)
    run = RunFolder.open(run_dir)
    core_options = CoreOptions.from_settings(settings, site=run.site)
    console.print(f"replaying [bold]{run.site}[/]: {run.meta.height} packs, {run.telemetry_rows:,} telemetry rows")
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("replaying", total=run.telemetry_rows)
        result = replay_run(
            run,
            core_options=core_options,
            options=ReplayOptions(every_s=parse_duration(every)),
            progress=lambda done: bar.update(task, completed=done),
        )
    paths = write_outputs(result, out or run_dir)
    info = result.info
    console.print(
        f"done: {info['telemetry_rows']:,} rows of {info['packs']} packs in {info['wall_s']:.1f} s "
        f"({info['rows_per_s'] or 0:,} pack-samples/s), {info['windows']} windows; "
        f"duplicates {info['quality']['duplicate']}, late {info['quality']['late']}"
    )
    for path in paths:
        console.print(f"  {path}")


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
    twin's P5-P95 band. Errors are fractions in --json (0.012 = 1.2 %). Plots of estimate
    against truth with the bands, for the site and the worst packs, go beside the estimates.
    """
    from twin.evaluate import EvaluateOptions, evaluate_run, plot_run

    options = EvaluateOptions(skip_s=parse_duration(skip) if skip not in ("0", "0s") else 0.0)
    scores = evaluate_run(run_dir, estimates_dir=estimates, options=options)
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
    for name in ("energy", "runtime", "ridethrough"):
        table.add_row(f"site {name} MAPE", pct(scores[f"{name}_mape"]), "")
        table.add_row(f"site {name} P5-P95 coverage", pct(scores[f"{name}_band_coverage"]), "")
    console.print(table)
    console.print(
        f"{scores['packs_scored']} packs, {scores['pack_rows_scored']:,} pack rows, "
        f"{scores['site_rows_scored']} site rows"
    )
    for f in files:
        console.print(f"plot: {f}")


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
