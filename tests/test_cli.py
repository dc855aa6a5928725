"""The command line: help, version, and clear errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

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
