"""The emulator end to end: run folders, the contract, faults, determinism, and live MQTT."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import polars as pl
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from emulators.output import TABLE_SCHEMAS
from emulators.publisher import encode_rows
from emulators.run import Emulation, EmulationOptions
from emulators.scenario import Scenario, load_scenario, parse_scenario
from tests.servers import Mosquitto
from twin import contract as c
from twin.cli import app

runner = CliRunner()


def _emulate(out: Path, *args: str) -> None:
    result = runner.invoke(app, ["emulate", "--scenario", "small", "--out", str(out), *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "small"
    _emulate(out, "--duration", "20m", "--truth")
    return out


def test_run_folder_has_every_table_with_the_contract_columns(run_dir: Path) -> None:
    for table, schema in TABLE_SCHEMAS.items():
        frame = pl.read_parquet(run_dir / f"{table}.parquet")
        assert frame.schema == schema, table
        assert frame.height > 0, table
    info = (run_dir / "run.json").read_text()
    assert '"seed": 12' in info
    assert '"contract_version": 1' in info


def test_telemetry_rows_are_valid_contract_messages(run_dir: Path) -> None:
    tele = pl.read_parquet(run_dir / "telemetry.parquet")
    sample = tele.sample(500, seed=1)
    for payload in encode_rows(sample, c.PackTelemetry):
        message = c.decode(payload, c.PackTelemetry)
        assert isinstance(message, c.PackTelemetry)
        assert message.cell_v_min_v <= message.cell_v_max_v
        assert message.temp_min_c <= message.temp_avg_c <= message.temp_max_c
    for payload in encode_rows(pl.read_parquet(run_dir / "packs.parquet"), c.PackMeta):
        assert isinstance(c.decode(payload, c.PackMeta), c.PackMeta)
    for payload in encode_rows(pl.read_parquet(run_dir / "cells.parquet").head(50), c.PackCells):
        assert isinstance(c.decode(payload, c.PackCells), c.PackCells)
    site = pl.read_parquet(run_dir / "site.parquet")
    for payload in encode_rows(site.head(50), c.SiteTelemetry):
        assert isinstance(c.decode(payload, c.SiteTelemetry), c.SiteTelemetry)


def test_telemetry_cadence_and_sequence(run_dir: Path) -> None:
    tele = pl.read_parquet(run_dir / "telemetry.parquet")
    packs = pl.read_parquet(run_dir / "packs.parquet")
    assert tele["pack"].n_unique() == packs.height == 12
    per_pack = tele.group_by("pack").agg(
        pl.len().alias("n"),
        pl.col("seq").min().alias("lo"),
        pl.col("seq").max().alias("hi"),
        pl.col("ts_ms").diff().drop_nulls().unique().alias("dts"),
    )
    # No fault in the first 20 minutes of `small` drops telemetry: 1 message per second, seq gap-free.
    assert per_pack["n"].to_list() == [1200] * 12
    assert (per_pack["hi"] - per_pack["lo"] + 1).to_list() == [1200] * 12
    assert all(d == [1000] for d in per_pack["dts"].to_list())
    cells = pl.read_parquet(run_dir / "cells.parquet")
    assert cells.height == 12 * 120  # every 10 s
    assert set(cells["cell_voltages_v"].list.len().to_list()) == {96, 120}


def test_physics_is_consistent_with_the_meter_and_truth(run_dir: Path) -> None:
    site = pl.read_parquet(run_dir / "site.parquet")
    tele = pl.read_parquet(run_dir / "telemetry.parquet")
    truth = pl.read_parquet(run_dir / "truth.parquet")
    # Energy balance at the meter: battery power equals the sum of the packs' V·I (true values).
    power = truth.group_by("ts_ms").agg((pl.col("current_a") * pl.col("voltage_v")).sum().alias("p"))
    joined = site.join(power, on="ts_ms")
    assert np.allclose(joined["battery_w"], joined["p"], rtol=1e-6, atol=1.0)
    # The site balance closes: load = solar + grid + battery (the meter noise on load is 0.2 %).
    residual = site["load_w"] - site["solar_w"] - site["grid_w"] - site["battery_w"]
    assert (residual.abs() / site["load_w"]).max() < 0.02
    # Measured current follows the truth within the sensor's offset and noise.
    both = tele.join(truth, on=["pack", "ts_ms"], suffix="_true")
    assert (both["current_a"] - both["current_a_true"]).abs().mean() < 1.0
    assert (both["voltage_v"] - both["voltage_v_true"]).abs().max() < 1.0
    # Packs that discharge lose SoC.
    first, last = truth["ts_ms"].min(), truth["ts_ms"].max()
    soc = truth.filter(pl.col("ts_ms").is_in([first, last])).pivot("ts_ms", index="pack", values="soc")
    mean_current = truth.group_by("pack").agg(pl.col("current_a").mean())
    trend = soc.join(mean_current, on="pack")
    discharging = trend.filter(pl.col("current_a") > 1.0)
    assert discharging.height > 0
    assert (discharging[str(last)] < discharging[str(first)]).all()
    # Truth: SoC and SoH are fractions; energy to the floor positive for available packs.
    assert truth["soc"].is_between(0, 1).all()
    assert truth["soh"].is_between(0.4, 1.1).all()
    assert (truth.filter(pl.col("available"))["energy_to_floor_kwh"] > 0).all()
    site_truth = pl.read_parquet(run_dir / "site_truth.parquet")
    assert site_truth.height == 2  # every 15 min
    row = site_truth.row(0, named=True)
    assert row["runtime_s"] > 0
    assert row["ridethrough_s"] > 0
    assert row["energy_to_floor_kwh"] > 0


def _files_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    _emulate(tmp_path / "a", "--duration", "3m", "--truth", "--packs", "6")
    _emulate(tmp_path / "b", "--duration", "3m", "--truth", "--packs", "6")
    assert _files_digest(tmp_path / "a") == _files_digest(tmp_path / "b")
    _emulate(tmp_path / "c", "--duration", "3m", "--truth", "--packs", "6", "--seed", "99")
    assert _files_digest(tmp_path / "a")["telemetry.parquet"] != _files_digest(tmp_path / "c")["telemetry.parquet"]


def test_chunking_does_not_change_results() -> None:
    sc = load_scenario("small")
    frames = []
    for chunk_s in (60.0, 300.0):
        emu = Emulation(sc, EmulationOptions(duration_s=300, chunk_s=chunk_s))
        chunks = list(emu.chunks())
        frames.append(
            (pl.concat([ch.telemetry for ch in chunks]), pl.concat([ch.truth for ch in chunks if ch.truth is not None]))
        )
    assert frames[0][0].equals(frames[1][0])
    assert frames[0][1].equals(frames[1][1])


def test_scaling_keeps_the_mix() -> None:
    nevada = load_scenario("nevada")
    assert 780 <= nevada.pack_count <= 830
    assert abs(nevada.nameplate_power_mw - 12.0) / 12.0 < 0.02
    assert abs(nevada.nameplate_energy_mwh - 63.0) / 63.0 < 0.02
    small = nevada.scaled(20)
    assert small.pack_count == 20
    assert {g.chemistry for g in small.pack_groups if g.count} == {g.chemistry for g in nevada.pack_groups}


def test_cells_off_their_table_by_the_scenario_s_ocv_error() -> None:
    """``cell_model.ocv_error_mv``: the cells' OCV is the table plus a smooth curve of that RMS, per chemistry."""
    from emulators.fleet import build_fleet
    from emulators.pack import GRID_POINTS, ocv_deviation
    from twin.chemistry import get_chemistry
    from twin.errors import ScenarioError

    curve = ocv_deviation(0.003, np.random.default_rng(1))
    assert curve.shape == (GRID_POINTS,)
    assert float(np.sqrt(np.mean(curve**2))) == pytest.approx(0.003)
    assert float(np.abs(np.diff(curve)).max()) < 0.003 * 0.05  # smooth: no step near the RMS per 0.1 % SoC
    assert not ocv_deviation(0.0, np.random.default_rng(1)).any()

    exact = load_scenario("small")
    data = exact.model_dump()
    data["cell_model"] = {"ocv_error_mv": 2.0}
    off = parse_scenario(data, source="test")
    tables = {}
    for name, sc in (("exact", exact), ("off", off)):
        tables[name] = build_fleet(sc, np.random.default_rng(sc.seed)).params.tables
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    for k, chem in enumerate(tables["exact"].chemistries):
        rows = slice(k * GRID_POINTS, (k + 1) * GRID_POINTS)
        np.testing.assert_array_equal(tables["exact"].ocv_v[rows], get_chemistry(chem.name).ocv(grid))
        diff = tables["off"].ocv_v[rows] - tables["exact"].ocv_v[rows]
        assert float(np.sqrt(np.mean(diff**2))) == pytest.approx(0.002, rel=1e-9), chem.name
    # Each chemistry its own curve, and the rest of the fleet as drawn without it.
    fleets = {name: build_fleet(sc, np.random.default_rng(sc.seed)) for name, sc in (("exact", exact), ("off", off))}
    for field in dataclasses.fields(fleets["exact"].params):
        a, b = getattr(fleets["exact"].params, field.name), getattr(fleets["off"].params, field.name)
        if isinstance(a, np.ndarray):  # every drawn parameter (the tables and derived caches aside)
            np.testing.assert_array_equal(a, b, err_msg=field.name)
    assert fleets["exact"].meta.equals(fleets["off"].meta)
    first = tables["off"].ocv_v[:GRID_POINTS] - tables["exact"].ocv_v[:GRID_POINTS]
    second = tables["off"].ocv_v[GRID_POINTS : 2 * GRID_POINTS] - tables["exact"].ocv_v[GRID_POINTS : 2 * GRID_POINTS]
    assert not np.allclose(first, second)
    with pytest.raises(ScenarioError, match=r"cell_model\.ocv_error_mv"):
        parse_scenario({**data, "cell_model": {"ocv_error_mv": -1.0}}, source="test")


def test_emulate_sets_the_cells_ocv_error_from_the_command_line(tmp_path: Path) -> None:
    _emulate(tmp_path / "off", "--duration", "1m", "--pack-level", "--ocv-error-mv", "2.5")
    info = json.loads((tmp_path / "off" / "run.json").read_text())
    assert info["scenario"]["cell_model"] == {"ocv_error_mv": 2.5}
    result = runner.invoke(
        app, ["emulate", "--scenario", "small", "--out", str(tmp_path / "x"), "--ocv-error-mv", "-1"]
    )
    assert result.exit_code != 0
    assert "ocv-error-mv" in result.output


def _with_faults(faults: list[dict[str, Any]]) -> Scenario:
    data = load_scenario("small").model_dump()
    data["faults"] = faults
    return parse_scenario(data, source="test")


def test_faults_show_in_telemetry_and_truth() -> None:
    sc = _with_faults(
        [
            {"kind": "contactor_open", "target": {"group": "leaf_2l", "index": 0}, "start_s": 60, "duration_s": 120},
            {"kind": "gateway_offline", "target": {"group": "ultium_new", "index": 1}, "start_s": 60, "duration_s": 60},
            {
                "kind": "telemetry_dropout",
                "target": {"group": "bolt_2l", "index": 0},
                "start_s": 0,
                "loss_fraction": 0.5,
            },
            {
                "kind": "sensor_offset",
                "target": {"group": "lfp_bus_2l", "index": 0},
                "start_s": 0,
                "signal": "current_a",
                "offset": 5.0,
            },
            {
                "kind": "sensor_stuck",
                "target": {"group": "ultium_new", "index": 0},
                "start_s": 30,
                "signal": "pack_voltage_v",
            },
            {
                "kind": "thermal_runaway_precursor",
                "target": {"group": "bolt_2l", "index": 2},
                "start_s": 0,
                "self_heat_w": 200.0,
            },
            {
                "kind": "weak_cell",
                "target": {"group": "bolt_2l", "index": 3},
                "start_s": 0,
                "capacity_factor": 0.6,
                "resistance_factor": 3.0,
                "cell_index": 5,
            },
        ]
    )
    emu = Emulation(sc, EmulationOptions(duration_s=300, chunk_s=300))
    ids = emu.fleet.pack_ids
    chunk = next(iter(emu.chunks()))
    tele, truth, status = chunk.telemetry, chunk.truth, chunk.status
    assert truth is not None

    leaf = ids[next(i for i, p in enumerate(ids) if p.startswith("leaf_2l"))]
    during = tele.filter(
        (pl.col("pack") == leaf)
        & pl.col("ts_ms").is_between(tele["ts_ms"].min() + 61_000, tele["ts_ms"].min() + 179_000)
    )
    assert (~during["contactor_closed"]).all()
    assert (during["fault_bits"] & 8 == 8).all()
    assert truth.filter((pl.col("pack") == leaf) & ~pl.col("available")).height > 0

    offline = "ultium_new-0001"
    t0 = tele["ts_ms"].min()
    window = tele.filter((pl.col("pack") == offline) & pl.col("ts_ms").is_between(t0 + 60_000, t0 + 119_000))
    assert window.height == 0
    assert status.filter(pl.col("pack") == offline)["state"].to_list() == ["offline", "online"]

    dropped = tele.filter(pl.col("pack") == "bolt_2l-0000")
    assert 100 < dropped.height < 200  # about half of 300 lost
    assert dropped["seq"].max() == 299  # the sequence shows the gaps

    lfp = tele.filter(pl.col("pack") == "lfp_bus_2l-0000").join(truth, on=["pack", "ts_ms"], suffix="_t")
    assert (lfp["current_a"] - lfp["current_a_t"]).mean() == pytest.approx(5.0, abs=0.5)

    stuck = tele.filter((pl.col("pack") == "ultium_new-0000") & (pl.col("ts_ms") >= t0 + 30_000))
    assert stuck["voltage_v"].n_unique() == 1

    temps = truth.filter(pl.col("ts_ms") == truth["ts_ms"].max())
    hot = temps.filter(pl.col("pack") == "bolt_2l-0002")["temp_c"].item()
    others = temps.filter(pl.col("pack").str.starts_with("bolt_2l") & (pl.col("pack") != "bolt_2l-0002"))["temp_c"]
    assert hot > others.max() + 1.0

    weak = tele.filter(pl.col("pack") == "bolt_2l-0003")
    assert (weak["cell_v_min_idx"] == 5).mean() > 0.9


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    result = runner.invoke(app, ["emulate", "--scenario", "nevadda", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "nevada" in str(result.exception) or "nevada" in result.output
    result = runner.invoke(app, ["emulate", "--scenario", "small"])
    assert result.exit_code == 2
    assert "exactly one of --out" in result.output
    result = runner.invoke(app, ["emulate", "--scenario", "small", "--out", str(tmp_path), "--duration", "ten"])
    assert result.exit_code == 2
    assert "not a duration" in result.output


# --------------------------------------------------------------------------- live


def _collect_live(broker: Mosquitto, site_topic_root: str, args: list[str], expect: int) -> dict[str, list[bytes]]:
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    ready: queue.Queue[int] = queue.Queue()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"collect-{time.monotonic_ns()}")
    sub.on_message = lambda _c, _u, m: inbox.put(m)
    sub.on_subscribe = lambda _c, _u, mid, _rc, _p: ready.put(mid)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    sub.subscribe(f"{site_topic_root}/#", qos=1)
    ready.get(timeout=5)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "twin.cli", *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr
        got: dict[str, list[bytes]] = {}
        deadline = time.monotonic() + 20
        count = 0
        while count < expect and time.monotonic() < deadline:
            try:
                m = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            got.setdefault(m.topic, []).append(m.payload)
            count += 1
        return got
    finally:
        sub.disconnect()
        sub.loop_stop()


def test_live_messages_do_not_depend_on_speed(mosquitto: Mosquitto, tmp_path: Path) -> None:
    results = []
    for i, speed in enumerate(("60", "240")):
        site = f"live{i}"
        data = load_scenario("small").model_dump()
        data["site"] = site
        path = tmp_path / f"{site}.toml"
        path.write_text(_to_toml(data))
        args = [
            "emulate",
            "--scenario",
            str(path),
            "--duration",
            "30s",
            "--mqtt",
            mosquitto.url,
            "--speed",
            speed,
            "--packs",
            "4",
        ]
        expected = 4 * 30 + 4 * 3 + 30 + 4 + 4  # telemetry, cells, site, meta, status
        got = _collect_live(mosquitto, f"microgrid/{site}", args, expected)
        # Both runs publish the same messages; only the site id (to keep them apart) differs.
        results.append(
            {t.split("/", 2)[2]: sorted(x.replace(site.encode(), b"SITE") for x in p) for t, p in got.items()}
        )
        n_tele = sum(len(v) for t, v in got.items() if t.endswith("/telemetry") and "/packs/" in t)
        assert n_tele == 4 * 30
        for topic, payloads in got.items():
            parsed = c.parse_topic(topic)
            for payload in payloads:
                c.decode(payload, c.model_for_topic(parsed.kind))
    assert results[0] == results[1]


def _to_toml(data: dict[str, Any]) -> str:
    import json

    def value(v: Any) -> str:
        if isinstance(v, datetime):
            return v.strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items() if x is not None) + "}"
        raise TypeError(type(v))

    lines = []
    tables = []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
            tables.extend((f"[{k}]", item) for item in v)
        else:
            lines.append(f"{k} = {value(v)}")
    for name, body in tables:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(x)}" for k, x in body.items() if x is not None)
    return "\n".join(lines) + "\n"
