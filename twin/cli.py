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


def main() -> None:
    """Run the CLI, turning the twin's own errors into one clear line and exit status 2."""
    try:
        app()
    except TwinError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)
