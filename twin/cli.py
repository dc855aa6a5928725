"""The ``mgtwin`` command line: the only place that parses arguments.

Each command validates its options, loads the settings once, and hands plain objects to
the code that does the work. Errors of the :class:`twin.errors.TwinError` family are shown
as one clear line and exit with status 2; nothing prints a traceback at a user for a
mistake they can fix.
"""

from __future__ import annotations

import json
import sys
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


def main() -> None:
    """Run the CLI, turning the twin's own errors into one clear line and exit status 2."""
    try:
        app()
    except TwinError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
