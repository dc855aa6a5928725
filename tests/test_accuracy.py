"""The accuracy harness end to end: emulate with sensor errors, replay through the twin, score against the truth.

Two scenarios, as issue 5 asks: a short cut of the nevada site (every pack kind, sensor
errors on) and ``cold_lfp`` (winter, weakly heated containers, mostly second-life LFP). Each
is emulated with its truth, replayed with ``mgtwin replay`` and scored with ``mgtwin
evaluate --json``; the figures are printed whatever the outcome.

Asserted are the targets the twin meets today: NMC SoC within 1.5 % (and 3 times better
than the BMS on nevada), site energy, runtime and ride-through within 5 % on nevada. The
rest are printed and reported in the issue, never hidden behind an expected failure: the
LFP SoC on the plateau (coulomb-counted with a capacity prior that a stale intake test
makes 10-15 % high until enough swing lets the capacity estimator learn it), the 3x margin
over cold_lfp's BMS, and the P5-P95 coverage, which is too wide (the truth falls inside
every time, the target is 80-98 %).
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
    return _score(tmp_path_factory.mktemp("acc") / "cold", "cold_lfp", "4h", "--pack-level")


NMC_TARGET = 0.015
BETTER_THAN_BMS = 3.0


@pytest.mark.slow
def test_nevada_nmc_soc_meets_the_target_and_beats_the_bms(nevada: dict[str, Any]) -> None:
    by_chem = nevada["soc_rmse_by_chemistry"]
    bms = nevada["soc_rmse_bms_by_chemistry"]
    for chem in ("nmc811", "nmc532"):
        assert by_chem[chem] <= NMC_TARGET, chem
        assert by_chem[chem] * BETTER_THAN_BMS <= bms[chem], chem


@pytest.mark.slow
def test_cold_lfp_site_nmc_soc_meets_the_target(cold_lfp: dict[str, Any]) -> None:
    assert cold_lfp["soc_rmse_by_chemistry"]["nmc532"] <= NMC_TARGET


@pytest.mark.slow
def test_nevada_energy_runtime_and_ridethrough_are_within_five_percent(nevada: dict[str, Any]) -> None:
    for key in ("energy_mape", "runtime_mape", "ridethrough_mape"):
        assert nevada[key] is not None, key
        assert nevada[key] <= 0.05, key


@pytest.mark.slow
def test_every_documented_figure_is_computed(nevada: dict[str, Any], cold_lfp: dict[str, Any]) -> None:
    for scores in (nevada, cold_lfp):
        for key in ("soc_rmse", "soc_rmse_bms", "energy_mape", "ridethrough_mape", "ridethrough_band_coverage"):
            assert scores[key] is not None, key
        assert scores["energy_points"] >= 15
        # The band is wide enough to hold the truth more often than not, and the P50 is not far off.
        assert scores["energy_band_coverage"] >= 0.8
        assert scores["energy_mape"] <= 0.15
