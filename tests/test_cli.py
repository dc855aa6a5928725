"""The command line: help, version, and clear errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from twin import __version__
from twin.cli import app


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("version", "contract", "config"):
        assert command in result.output


def test_version() -> None:
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_topics_table() -> None:
    result = CliRunner().invoke(app, ["contract", "topics", "--site", "demo"])
    assert result.exit_code == 0
    assert "microgrid/demo/site/telemetry" in result.output


def test_twin_errors_are_one_line_and_exit_2() -> None:
    env = {"MGTWIN_MQTT__URLL": "x", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", "from twin.cli import main; main()", "config", "show"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "did you mean MGTWIN_MQTT__URL" in proc.stderr.replace("\n", " ")
    assert "Traceback" not in proc.stderr


def test_emulate_start_now_and_iso(tmp_path: Path) -> None:
    import time

    import polars as pl

    from twin.cli import parse_start

    out = tmp_path / "now"
    result = CliRunner().invoke(
        app, ["emulate", "--scenario", "small", "--duration", "30s", "--start", "now", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    first_s = int(pl.read_parquet(out / "telemetry.parquet")["ts_ms"].min()) / 1000  # type: ignore[arg-type]
    assert abs(first_s - time.time()) < 120
    assert parse_start("2026-01-15T06:00:00+01:00").isoformat() == "2026-01-15T05:00:00+00:00"
    bad = CliRunner().invoke(
        app,
        ["emulate", "--scenario", "small", "--duration", "30s", "--start", "2026-01-01", "--out", str(tmp_path / "x")],
    )
    assert bad.exit_code != 0
    assert "time zone" in bad.output
