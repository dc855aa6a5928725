"""Issue 6 end to end: health, resistance and alerts of a faulted, aging site, scored against the emulator's truth.

A reduced nevada (30 packs of every kind, its injected faults) runs two days with the aging
sped up 30 times (so that fade is visible: two months of aging), 10 s telemetry; it is
replayed through the twin and scored with ``mgtwin evaluate --json``. The figures are printed
whatever the outcome.

Asserted: SoH MAE within 1.5 points (1.1 here), resistance MAPE within 10 %; every injected
fault detected, precision and recall at least 0.9; the twin's SoH better than the
BMS-reported SoH, scored the same way. Reported, not asserted (not met, see the issue): the
RUL MAPE (the packs near a knee are not flagged in so short a run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from twin.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: Path = tmp_path_factory.mktemp("health") / "n30"
    emulate = ["emulate", "--scenario", "nevada", "--packs", "30", "--duration", "2d", "--dt", "10", "--pack-level"]
    emulate += [
        "--aging-speedup",
        "30",
        "--truth",
        "--truth-every",
        "60s",
        "--site-truth-every",
        "1h",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, emulate)
    assert result.exit_code == 0, result.output
    for name in ("faults.parquet", "eol_truth.parquet"):
        assert (out / name).is_file(), name
    result = runner.invoke(app, ["replay", str(out), "--every", "5m"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(out), "--json", "--no-plots", "--skip", "6h"])
    assert result.exit_code == 0, result.output
    figures: dict[str, Any] = json.loads(result.stdout)
    print("\nnevada 30 packs, 2 days at 30x aging: " + json.dumps(figures, indent=1, sort_keys=True))
    figures["run_dir"] = str(out)
    return figures


@pytest.mark.slow
def test_resistance_is_within_ten_percent(scores: dict[str, Any]) -> None:
    assert scores["resistance_mape"] is not None
    assert scores["resistance_mape"] <= 0.10


@pytest.mark.slow
def test_every_injected_fault_is_detected_without_false_alarms(scores: dict[str, Any]) -> None:
    assert scores["fault_windows"] >= 5
    assert scores["alerts_recall"] >= 0.9
    assert scores["alerts_precision"] >= 0.9
    assert scores["alert_delay_s_median"] is not None


@pytest.mark.slow
def test_health_figures_are_computed_and_beat_the_bms(scores: dict[str, Any]) -> None:
    for key in ("soh_mae", "soh_mae_bms", "capacity_mape", "rul_mape", "rul_band_coverage"):
        assert scores[key] is not None, key
    assert scores["soh_mae"] < scores["soh_mae_bms"]
    assert scores["capacity_mape"] <= 0.05
    # RUL is also scored apart on the packs drawn with a knee (the truth says which).
    assert scores["rul_packs_no_knee"] + scores["rul_packs_knee"] == scores["rul_packs"]
    assert scores["rul_mape_no_knee"] is not None


@pytest.mark.slow
def test_soh_is_within_one_and_a_half_points(scores: dict[str, Any]) -> None:
    assert scores["soh_mae"] <= 0.015
    assert scores["rul_packs"] >= 20


@pytest.mark.slow
def test_passport_of_every_second_life_pack(scores: dict[str, Any]) -> None:
    import polars as pl

    run = Path(scores["run_dir"])
    result = runner.invoke(app, ["passport", str(run), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    meta = pl.read_parquet(run / "packs.parquet")
    second = meta.filter(pl.col("life") == "second_life")
    assert sorted(r["pack"] for r in rows) == sorted(second["pack"].to_list())
    for r in rows:
        assert r["vehicle"]
        assert r["intake_soh"] is not None
        assert 0.3 < r["soh"] < 1.1
        assert r["aging_model"]
