"""The accuracy harness end to end: emulate with sensor errors, replay through the twin, score against the truth.

Two scenarios, as issue 5 asks: a short cut of the nevada site (every pack kind, sensor
errors on) and ``cold_lfp`` (winter, weakly heated containers, mostly second-life LFP). Each
is emulated with its truth, replayed with ``mgtwin replay`` and scored with ``mgtwin
evaluate --json``; the figures are printed whatever the outcome.

Asserted are the targets the twin meets today: on nevada (60 packs, 4 h) every chemistry's
SoC RMSE target, three times better than the BMS over all packs, and site energy, runtime
and ride-through within 5 %; on cold_lfp (24 h) the LFP and NMC SoC targets, three times
better than the BMS (3.4x: the LFP packs rest on their plateau for the first hours, where
the prior centred on the first reading keeps the twin within about 2 %, and once the day's
charge reaches the steep top the twin is at 1 % and the BMS at 5 %), and the energy and
ride-through within 5 %; the P5-P95 band holds the truth at least 80 % of the time on both.
The rest is printed and reported in the issue, never hidden behind an expected failure:
the bands are too wide for the issue's 98 % upper bound (the truth falls inside every time:
the LFP packs' SoC uncertainty on the plateau dominates them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from twin.cli import app

runner = CliRunner()


def _score(out: Path, scenario: str, duration: str, *extra: str) -> dict[str, Any]:
    emulate = ["emulate", "--scenario", scenario, "--duration", duration, "--truth", "--out", str(out), *extra]
    result = runner.invoke(app, [*emulate, "--site-truth-every", "10m"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["replay", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(out), "--json", "--no-plots"])
    assert result.exit_code == 0, result.output
    scores: dict[str, Any] = json.loads(result.stdout)
    print(f"\n{scenario} {duration}: " + json.dumps(scores, indent=1, sort_keys=True))
    return scores


@pytest.fixture(scope="module")
def nevada(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-hour cut of the nevada site scaled to 60 packs (every group kept), sensor errors on."""
    return _score(tmp_path_factory.mktemp("acc") / "nevada", "nevada", "4h", "--packs", "60", "--pack-level")


@pytest.fixture(scope="module")
def cold_lfp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A winter day: the LFP packs sit on their plateau until the day's charge reaches the steep top."""
    return _score(tmp_path_factory.mktemp("acc") / "cold", "cold_lfp", "24h", "--pack-level")


TARGETS = {"nmc811": 0.015, "nmc532": 0.015, "lmo": 0.015, "lfp": 0.03}
BETTER_THAN_BMS = 3.0


@pytest.mark.slow
def test_nevada_soc_meets_every_chemistry_target_and_beats_the_bms_threefold(nevada: dict[str, Any]) -> None:
    by_chem = nevada["soc_rmse_by_chemistry"]
    assert set(by_chem) == set(TARGETS)
    for chem, target in TARGETS.items():
        assert by_chem[chem] <= target, chem
    assert nevada["soc_rmse"] * BETTER_THAN_BMS <= nevada["soc_rmse_bms"]


@pytest.mark.slow
def test_cold_lfp_soc_meets_the_targets_and_beats_the_bms_threefold(cold_lfp: dict[str, Any]) -> None:
    by_chem = cold_lfp["soc_rmse_by_chemistry"]
    assert by_chem["lfp"] <= TARGETS["lfp"]
    assert by_chem["nmc532"] <= TARGETS["nmc532"]
    assert cold_lfp["soc_rmse"] * BETTER_THAN_BMS <= cold_lfp["soc_rmse_bms"]


@pytest.mark.slow
def test_nevada_energy_runtime_and_ridethrough_are_within_five_percent(nevada: dict[str, Any]) -> None:
    for key in ("energy_mape", "runtime_mape", "ridethrough_mape"):
        assert nevada[key] is not None, key
        assert nevada[key] <= 0.05, key


@pytest.mark.slow
def test_cold_lfp_energy_and_ridethrough_are_within_five_percent(cold_lfp: dict[str, Any]) -> None:
    assert cold_lfp["energy_mape"] <= 0.05
    assert cold_lfp["ridethrough_mape"] is not None
    assert cold_lfp["ridethrough_mape"] <= 0.05


@pytest.mark.slow
def test_every_documented_figure_is_computed(nevada: dict[str, Any], cold_lfp: dict[str, Any]) -> None:
    for scores in (nevada, cold_lfp):
        for key in ("soc_rmse", "soc_rmse_bms", "energy_mape", "ridethrough_mape", "ridethrough_band_coverage"):
            assert scores[key] is not None, key
        assert scores["energy_points"] >= 15
        # The P5-P95 band holds the truth at least 80 % of the time (the 98 % upper bound of the
        # issue is not met yet: the band is too wide, see the module docstring).
        assert scores["energy_band_coverage"] >= 0.8
        assert scores["ridethrough_band_coverage"] >= 0.8
