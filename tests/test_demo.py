"""`mgtwin demo`: the embedded broker, the live emulator, the twin and the recorded run, for real.

The demo runs as a user runs it (a subprocess, no terminal), on the embedded amqtt broker,
with the twin writing the session's real InfluxDB.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import polars as pl
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from tests.servers import Influxd
from twin.cli import app
from twin.demo import DEFAULT_PACKS, DEFAULT_SPEED, DemoSnapshot, EmbeddedBroker, progress_line, render_view

pytestmark = pytest.mark.integration


def _demo(*args: str, timeout_s: float = 120) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MGTWIN_")}
    return subprocess.Popen(
        [sys.executable, "-c", "from twin.cli import main; main()", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "COLUMNS": "200"},
    )


def _numbers(line: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", line)]


def test_demo_runs_the_site_through_the_twin_and_records_a_scorable_run(
    tmp_path: Path, influxd: Influxd, influx_db: str
) -> None:
    run_dir = tmp_path / "run"
    proc = _demo(
        "--duration", "20s", "--packs", "6", "--out", str(run_dir), "--influx", influxd.url, "--influx-db", influx_db
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    ended = next(line for line in lines if line.startswith("demo ended"))
    assert "with 6 packs" in ended
    assert "at 60x" in ended
    messages = next(line for line in lines if line.startswith("messages:"))
    published, received, accepted, rejected, duplicates = _numbers(messages)
    assert published > 6 * 60 * 5  # 20 s at 60x: up to 20 simulated minutes of 6 packs at 1 Hz (5 at the least)
    assert received == published  # nothing lost on the embedded broker
    assert accepted == published
    assert (rejected, duplicates) == (0, 0)
    final = next(line for line in lines if line.startswith("final state at"))
    assert "packs online 6/6" in final
    assert re.search(r"SoC \d+\.\d%", final)
    assert f"run folder: {run_dir}" in lines
    assert any(line.startswith("score it: mgtwin replay") for line in lines)
    influx_line = next(line for line in lines if line.startswith("InfluxDB"))
    written = _numbers(influx_line.split(":", 2)[2])[0]
    assert written > published  # telemetry, cells and site points, plus the state and health

    # The run folder holds exactly what was published, and the truth to score it.
    info = json.loads((run_dir / "run.json").read_text())
    assert info["demo"]["speed"] == DEFAULT_SPEED
    assert info["packs"] == 6
    rows = info["rows"]
    assert rows["telemetry"] + rows["cells"] + rows["site"] + 2 * 6 == published
    assert pl.read_parquet(run_dir / "telemetry.parquet").height == rows["telemetry"]
    assert pl.read_parquet(run_dir / "truth.parquet").height > 0
    assert pl.read_parquet(run_dir / "site_truth.parquet").height > 0
    assert (run_dir / "demo.log").is_file()
    # The twin's output reached InfluxDB, at the simulated event times.
    answer = influxd.query('SELECT count("voltage_v") FROM "pack_telemetry"', db=influx_db)
    assert answer["results"][0]["series"][0]["values"][0][1] == rows["telemetry"]
    answer = influxd.query('SELECT last("soc") FROM "site_state"', db=influx_db)
    assert answer["results"][0]["series"][0]["values"][0][0] >= info["start_ms"]

    # `mgtwin replay` then `mgtwin evaluate` score it.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MGTWIN_")}
    replay = subprocess.run(
        [sys.executable, "-m", "twin.cli", "replay", str(run_dir)], capture_output=True, text=True, env=env, check=False
    )
    assert replay.returncode == 0, replay.stderr
    scored = subprocess.run(
        [sys.executable, "-m", "twin.cli", "evaluate", str(run_dir), "--skip", "0", "--json", "--no-plots"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert scored.returncode == 0, scored.stderr
    assert isinstance(json.loads(scored.stdout)["soc_rmse"], float)


def test_ctrl_c_ends_the_demo_cleanly_with_its_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _demo("--duration", "5m", "--packs", "4", "--out", str(run_dir))
    time.sleep(8)
    assert proc.poll() is None
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "demo ended (interrupted)" in out
    assert f"run folder: {run_dir}" in out
    info = json.loads((run_dir / "run.json").read_text())
    assert info["demo"]["ended_by"] == "interrupted"
    assert info["rows"]["telemetry"] > 0


def test_demo_refuses_an_occupied_run_folder_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    proc = _demo("--duration", "5s", "--out", str(tmp_path / "run"))
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "exists and is not empty" in err
    assert "Traceback" not in err


def test_embedded_broker_relays_and_retains_then_frees_its_port() -> None:
    with EmbeddedBroker() as broker:
        port = broker.port
        assert port > 0
        got: list[bytes] = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t-embedded")
        client.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            client.publish("microgrid/x/twin/status", b"online", qos=1, retain=True).wait_for_publish(5)
            client.subscribe("microgrid/x/#", qos=1)
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            client.disconnect()
            client.loop_stop()
        assert got == [b"online"]
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_demo_help_says_what_it_does_and_why_the_default_packs() -> None:
    result = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for words in (
        "embedded",
        "--mqtt",
        "--influx",
        "--duration",
        "run folder",
        "mgtwin evaluate",
        "Ctrl-C",
        "1.6k msg/s",
    ):
        assert words in text
    assert f"[default: {DEFAULT_PACKS}]" in text


def test_the_view_shows_bands_runtime_weakest_packs_alerts_and_ingest() -> None:
    from rich.console import Console

    state = {
        "ts_ms": 1751353200000, "soc": 0.5, "soc_p5": 0.4, "soc_p95": 0.6, "energy_to_floor_kwh": 100.0,
        "energy_to_floor_kwh_p5": 90.0, "energy_to_floor_kwh_p95": 110.0, "packs_online": 3, "packs_total": 4,
        "packs_offline": 1, "packs_excluded": 0, "runtime_s_p5": 3000, "runtime_s_p50": 3600, "runtime_s_p95": 4200,
        "ridethrough_s_p50": 1800, "load_w": 2.5e6, "solar_w": 0.0, "grid_w": 0.0, "battery_w": 2.5e6,
    }  # fmt: skip
    packs = [
        {"pack": "P1", "online": False, "soh_bms": 0.70, "soc": 0.4},
        {"pack": "P2", "online": True, "soh": 0.95, "soh_bms": 0.60},
    ]
    snap = DemoSnapshot(
        site="s", state=state, weakest=packs, packs_seen=4, sim_ms=1751353200000, wall_s=3, duration_s=10,
        alerts=[{"severity": "critical", "kind": "over_temperature", "pack": "P1", "message": "hot", "ts_ms": 1}],
        speed=60, received=500, accepted=498, rejected=2, ingest_rate=100.0, published=500, publish_rate=100.0,
        behind_s=0, lag_ms=600, queue_depth=3, influx=None,
    )  # fmt: skip
    console = Console(record=True, width=140)
    console.print(render_view(snap))
    text = console.export_text()
    for part in ("50.0% (40.0%-60.0%)", "100 kWh (90-110 kWh)", "0h50 / 1h00 / 1h10", "2,500 kW", "over_temperature",
                 "active alerts: 1", "498 accepted, 2 rejected", "online 3/4"):  # fmt: skip
        assert part in text, part
    assert text.index("P1") < text.index("P2")  # listed by SoH, the twin's estimate before the BMS's
    assert "SoC 50.0%" in progress_line(snap)
