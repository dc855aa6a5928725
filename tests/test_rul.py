"""``mgtwin rul``: RUL from a table of capacity checkups, fitted on its first half.

No measured capacity-fade series with a licence that allows copying is in the shared data
folder (it holds HPPC and pulse tests, not aging checkups), so the table is synthetic: cells
cycled at 1C/1C, 100 % DoD, 25 °C, aged by the BLAST-Lite laws of :mod:`twin.chemistry.aging`
(calendar and cycle terms, each cell with its own rate scalar, one with a knee of
:class:`~twin.chemistry.aging.KneeModel`), a checkup every 25 cycles with 0.3 % measurement
noise, written as a lab would (``Cell``, ``Cycle``, ``Capacity(Ah)``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from twin.chemistry.aging import KneeModel, Stressors, get_aging_law
from twin.cli import app
from twin.rul import CheckupError, RulOptions, checkup_table, parse_mapping, rul_report

runner = CliRunner()
MAP = "cycle=Cycle,capacity_ah=Capacity(Ah),cell=Cell"

#: (cell, law, nominal Ah, rate scalar, knee onset EFC or None)
CELLS = (
    ("LFP-01", "lfp_gr_250ah_prismatic", 250.0, 6.0, None),
    ("LFP-02", "lfp_gr_250ah_prismatic", 250.0, 9.0, None),
    ("NMC-01", "nmc811_grsi_lgm50", 5.0, 1.5, None),
    ("NMC-02", "nmc811_grsi_lgm50", 5.0, 2.5, None),
    ("NMC-K", "nmc811_grsi_lgm50", 5.0, 1.0, 700.0),
    ("LMO-01", "lmo_gr_nissanleaf66ah_2ndlife", 46.0, 1.0, None),
)
HOURS_PER_CYCLE = 2.5


def synthetic_checkups(seed: int = 0) -> pl.DataFrame:
    """Checkups every 25 cycles until each cell is below 60 % (or 3000 cycles)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, int, float]] = []
    for cell, law_name, nominal, scalar, onset in CELLS:
        law = get_aging_law(law_name)
        state = law.initial_state(1, knee_onset_efc=np.inf if onset is None else onset)
        knee = KneeModel() if onset is not None else None
        step = Stressors.from_means(
            dt_days=25 * HOURS_PER_CYCLE / 24.0,
            temp_k=298.15,
            soc_mean=0.5,
            dod=1.0,
            c_rate_mean=0.8,
            c_rate_charge_mean=1.0,
            c_rate_discharge_mean=1.0,
            efc=25.0,
            n_packs=1,
        )
        cycle = 0
        while cycle <= 3000:
            q = float(state.q[0])
            rows.append((cell, cycle, round(nominal * q * (1.0 + 0.003 * rng.standard_normal()), 4)))
            if q < 0.6:
                break
            state = law.step(state, step, scalar=scalar, knee=knee)
            cycle += 25
    return pl.DataFrame(rows, schema=["Cell", "Cycle", "Capacity(Ah)"], orient="row")


@pytest.fixture(scope="module")
def checkups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rul") / "checkups.csv"
    synthetic_checkups().write_csv(path)
    return path


def test_forecast_from_the_first_half(checkups: Path) -> None:
    result = runner.invoke(app, ["rul", str(checkups), "--map", MAP, "--eol", "0.65", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    series = {s["series"]: s for s in report["series"]}
    assert set(series) == {c[0] for c in CELLS}
    for s in report["series"]:
        print(
            f"\n{s['series']:7s} fit {s['fit_points']}/{s['points']} to cycle {s['x_fit_end']:.0f} "
            f"({s['soh_fit_end']:.3f}): EOL P5/P50/P95 {s['eol_p5']:.0f}/{s['eol_p50']:.0f}/{s['eol_p95']:.0f}, "
            f"actual {s['actual']}, RUL error {s['rul_relative_error']}, {s['model']} p={s['exponent']:.2f}",
            end="",
        )
        assert s["eol_p5"] <= s["eol_p50"] <= s["eol_p95"]
        assert s["actual"] is not None  # every synthetic cell crosses 65 % within its checkups
        assert s["x_fit_end"] < s["actual"]  # ... after the fitted half
    summary = report["summary"]
    print(f"\nRUL MAPE {summary['rul_mape']:.1%}, P5-P95 coverage {summary['coverage_p5_p95']:.0%}")
    assert summary["scored"] == len(CELLS)
    # Without a knee the power law from the first half lands within 25 % of the remaining life.
    plain = [series[c[0]] for c in CELLS if c[4] is None]
    assert max(abs(s["rul_relative_error"]) for s in plain) < 0.25
    assert summary["coverage_p5_p95"] >= 0.65


def test_table_output_and_chemistry_option(checkups: Path) -> None:
    result = runner.invoke(app, ["rul", str(checkups), "--map", MAP, "--eol", "0.8", "--chemistry", "lfp"])
    assert result.exit_code == 0, result.output
    assert "LFP-01" in result.stdout
    assert "RUL MAPE" in result.stdout


def test_parquet_time_column_and_rated_capacity(tmp_path: Path) -> None:
    frame = synthetic_checkups().filter(pl.col("Cell") == "LFP-01")
    frame = frame.with_columns((pl.col("Cycle") * HOURS_PER_CYCLE * 3600.0).alias("Test time (s)"))
    path = tmp_path / "one.parquet"
    frame.write_parquet(path)
    mapping = "time_s=Test time (s),capacity_ah=Capacity(Ah)"
    result = runner.invoke(app, ["rul", str(path), "--map", mapping, "--rated-ah", "250", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["x_unit"] == "day"
    (s,) = report["series"]
    assert s["series"] == "all"
    by_cycle = json.loads(
        runner.invoke(
            app, ["rul", str(path), "--map", "cycle=Cycle,capacity_ah=Capacity(Ah)", "--rated-ah", "250", "--json"]
        ).stdout
    )["series"][0]
    # The same crossing, in days of 2.5 h cycles.
    assert s["actual"] == pytest.approx(by_cycle["actual"] * HOURS_PER_CYCLE / 24.0, rel=1e-6)


def test_clear_errors(tmp_path: Path, checkups: Path) -> None:
    result = runner.invoke(app, ["rul", str(checkups), "--map", "cycle=Cycles,capacity_ah=Capacity(Ah)"])
    assert result.exit_code == 2
    assert "did you mean 'Cycle'" in result.stderr
    result = runner.invoke(app, ["rul", str(checkups), "--map", "cycles=Cycle,capacity_ah=Capacity(Ah)"])
    assert result.exit_code == 2
    assert "unknown target 'cycles'; did you mean 'cycle'" in result.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("Cell,Cycle,Capacity(Ah)\nA,0,5.0\nA,25,4.9x\n")
    result = runner.invoke(app, ["rul", str(bad), "--map", MAP])
    assert result.exit_code == 2
    assert "'4.9x' in data row 2 is not a number" in result.stderr
    back = tmp_path / "back.csv"
    back.write_text("Cell,Cycle,Capacity(Ah)\nA,0,5.0\nA,50,4.9\nA,25,4.8\nB,0,5.0\n")
    result = runner.invoke(app, ["rul", str(back), "--map", MAP])
    assert result.exit_code == 2
    assert "goes backwards in series 'A' at data row 3" in result.stderr
    result = runner.invoke(app, ["rul", str(tmp_path / "missing.csv"), "--map", MAP])
    assert result.exit_code == 2
    with pytest.raises(CheckupError, match="must map capacity_ah"):
        parse_mapping("cycle=Cycle")
    short = pl.DataFrame({"Cycle": ["0", "1", "2"], "Capacity(Ah)": ["1", "0.9", "0.8"]})
    table = checkup_table(short, parse_mapping("cycle=Cycle,capacity_ah=Capacity(Ah)"), RulOptions())
    with pytest.raises(CheckupError, match="at least 4"):
        rul_report(table, RulOptions(), x_unit="cycle")
    with pytest.raises(CheckupError, match="--eol"):
        RulOptions(eol_soh=1.5)


def test_module_doctests_pass() -> None:
    import doctest

    from twin import rul

    result = doctest.testmod(rul)
    assert result.failed == 0
    assert result.attempted >= 1
