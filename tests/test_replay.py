"""Offline replay (`mgtwin replay`) and the accuracy harness (`mgtwin evaluate`).

* replay runs on the live service's code path: feeding the same run as MQTT payloads through
  :func:`twin.pipeline.decode_batch` and :class:`twin.state.TwinCore` in random-sized message
  batches ends in the same estimates;
* the estimates do not depend on how the telemetry file is cut into read batches;
* ``mgtwin evaluate --json`` gives every documented key and writes its plots;
* bad sources get one clear error line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from emulators.publisher import encode_rows
from twin import contract as c
from twin.cli import app
from twin.evaluate import KEYS, pool_scores
from twin.pipeline import decode_batch
from twin.replay import ReplayOptions, RunFolder, replay_run
from twin.state import CoreOptions, TwinCore

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replay") / "small"
    result = runner.invoke(
        app,
        [
            "emulate",
            "--scenario",
            "small",
            "--duration",
            "90m",
            "--truth",
            "--site-truth-every",
            "5m",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def replayed(run_dir: Path) -> Path:
    result = runner.invoke(app, ["replay", str(run_dir), "--every", "60s"])
    assert result.exit_code == 0, result.output
    assert "pack-samples/s" in result.output
    return run_dir


def test_replay_writes_estimates_for_every_pack_and_window(replayed: Path) -> None:
    est = pl.read_parquet(replayed / "estimates.parquet")
    site = pl.read_parquet(replayed / "site_estimates.parquet")
    meta = pl.read_parquet(replayed / "packs.parquet")
    windows = site.height
    assert windows == 90 + 1  # a window at the start and one per minute
    assert est.height == windows * meta.height
    assert set(est["pack"].unique()) == set(meta["pack"])
    late = est.filter(pl.col("ts_ms") > est["ts_ms"].min() + 600_000)  # type: ignore[operator]
    assert late["soc"].null_count() == 0
    assert ((late["soc"] >= 0) & (late["soc"] <= 1)).all()
    assert (late["soc_std"] > 0).all()
    # The site's bands are ordered wherever the twin has an estimate.
    s = site.filter(pl.col("energy_to_floor_kwh").is_not_null())
    assert s.height > windows // 2
    assert (s["energy_to_floor_kwh_p5"] <= s["energy_to_floor_kwh"]).all()
    assert (s["energy_to_floor_kwh"] <= s["energy_to_floor_kwh_p95"]).all()
    r = s.filter(pl.col("ridethrough_s_p50").is_not_null())
    assert r.height > 0
    assert (
        (r["ridethrough_s_p5"] <= r["ridethrough_s_p50"]) & (r["ridethrough_s_p50"] <= r["ridethrough_s_p95"])
    ).all()
    info = json.loads((replayed / "replay.json").read_text())
    assert info["telemetry_rows"] == pl.read_parquet(replayed / "telemetry.parquet").height
    assert info["estimation"]["no_meta"] == 0
    assert info["end_ms"] == site["ts_ms"].max()
    assert info["windows"] == windows


def test_replay_does_not_depend_on_the_read_batches(run_dir: Path) -> None:
    run = RunFolder.open(run_dir)
    whole = replay_run(run, options=ReplayOptions(every_s=300.0))
    pieces = replay_run(run, options=ReplayOptions(every_s=300.0, batch_rows=7_777))
    assert whole.estimates.equals(pieces.estimates)
    assert whole.site_estimates.equals(pieces.site_estimates)


def test_replay_is_the_live_code_path(run_dir: Path) -> None:
    """The run as MQTT messages, decoded and ingested in random-sized batches, ends where replay ends."""
    run = RunFolder.open(run_dir)
    tele = pl.read_parquet(run_dir / "telemetry.parquet").sort("ts_ms", "pack", maintain_order=True)
    tele = tele.filter(pl.col("ts_ms") <= tele["ts_ms"].min() + 1_800_000)  # type: ignore[operator]
    end_ms = int(tele["ts_ms"].max())  # type: ignore[arg-type]
    site_rows = run.site_rows.filter(pl.col("ts_ms") <= end_ms)
    status = run.status.filter(pl.col("ts_ms") <= end_ms)

    # Replay of the same cut (a run folder of its own).
    cut = run_dir.parent / "cut"
    cut.mkdir(exist_ok=True)
    for name in ("packs", "run"):
        src = run_dir / (f"{name}.parquet" if name == "packs" else "run.json")
        (cut / src.name).write_bytes(src.read_bytes())
    tele.write_parquet(cut / "telemetry.parquet")
    site_rows.write_parquet(cut / "site.parquet")
    status.write_parquet(cut / "status.parquet")
    replayed = replay_run(RunFolder.open(cut), options=ReplayOptions(every_s=60.0))

    # Live: meta and status first (retained), then site and telemetry messages in event order.
    site = run.site
    topics: list[str] = []
    payloads: list[bytes] = []
    for frame, model, kind in (
        (run.meta, c.PackMeta, c.TopicKind.PACK_META),
        (status, c.PackStatus, c.TopicKind.PACK_STATUS),
    ):
        for pack, payload in zip(frame["pack"], encode_rows(frame, model), strict=True):
            topics.append(c.topic(kind, site, pack))
            payloads.append(payload)
    merged = pl.concat(
        [
            tele.select("ts_ms", pl.lit(0).alias("kind"), pl.int_range(pl.len()).alias("row")),
            site_rows.select("ts_ms", pl.lit(1).alias("kind"), pl.int_range(pl.len()).alias("row")),
        ]
    ).sort("ts_ms", "kind", "row")
    tele_payloads = encode_rows(tele, c.PackTelemetry)
    site_payloads = encode_rows(site_rows, c.SiteTelemetry)
    tele_topics = [c.topic(c.TopicKind.PACK_TELEMETRY, site, p) for p in tele["pack"]]
    site_topic = c.topic(c.TopicKind.SITE_TELEMETRY, site)
    for kind, row in merged.select("kind", "row").iter_rows():
        topics.append(tele_topics[row] if kind == 0 else site_topic)
        payloads.append(tele_payloads[row] if kind == 0 else site_payloads[row])

    core = TwinCore(CoreOptions(site=site))
    rng = np.random.default_rng(7)
    i = 0
    while i < len(payloads):
        n = int(rng.integers(1, 3000))
        decoded = decode_batch(topics[i : i + n], payloads[i : i + n], site=site)
        assert decoded.rejects.height == 0
        core.ingest(decoded, now_ms=end_ms)
        i += n
    live = core.pack_frame(end_ms).sort("pack")
    last = replayed.estimates.filter(pl.col("ts_ms") == replayed.estimates["ts_ms"].max()).sort("pack")
    np.testing.assert_array_equal(live["soc"].to_numpy(), last["soc"].to_numpy())
    np.testing.assert_array_equal(live["soc_std"].to_numpy(), last["soc_std"].to_numpy())
    np.testing.assert_array_equal(live["energy_to_floor_kwh"].to_numpy(), last["energy_to_floor_kwh"].to_numpy())
    live_site = core.site_frame(end_ms).row(0, named=True)
    replay_site = replayed.site_estimates.row(-1, named=True)
    for key in ("soc", "energy_to_floor_kwh", "runtime_s_p50", "ridethrough_s_p50"):
        assert live_site[key] == replay_site[key], key


def test_evaluate_json_has_every_key_and_writes_plots(replayed: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(replayed), "--json", "--skip", "30m"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    for key in KEYS:
        assert key in scores, key
    assert scores["soc_rmse"] is not None
    assert 0.0 <= scores["soc_rmse"] < 0.2
    assert scores["soc_rmse_bms"] is not None
    assert set(scores["soc_rmse_by_chemistry"]) == set(pl.read_parquet(replayed / "packs.parquet")["chemistry"])
    assert scores["energy_points"] > 0
    assert scores["ridethrough_points"] > 0
    assert scores["soc_z_rms"] > 0.0
    assert set(scores["soc_z_rms_by_chemistry"]) == set(scores["soc_rmse_by_chemistry"])
    assert scores["energy_band_halfwidth"] > 0.0
    assert scores["energy_error_median"] >= 0.0
    for plot in scores["plots"]:
        data = Path(plot).read_bytes()
        assert data.startswith(b"\x89PNG"), plot
        assert len(data) > 10_000


def test_site_scores_give_the_band_half_width_beside_the_error() -> None:
    from twin.evaluate import _site_scores

    site = pl.DataFrame(
        {
            "est": [101.0, 98.0, 100.0, 90.0],
            "true": [100.0, 100.0, 100.0, 100.0],
            "p5": [96.0, 93.0, 95.0, 85.0],
            "p95": [106.0, 103.0, 105.0, 95.0],
        }
    )
    scores = _site_scores(site, "est", "true", "p5", "p95")
    assert scores["n"] == 4
    assert scores["mape"] == pytest.approx((1 + 2 + 0 + 10) / 4 / 100)
    assert scores["coverage"] == pytest.approx(0.75)  # the last band misses the truth
    assert scores["halfwidth"] == pytest.approx(0.05)
    assert scores["error"] == pytest.approx(0.015)


def test_band_verdict_says_why_a_band_is_too_wide_or_too_narrow() -> None:
    from twin.evaluate import band_verdict

    wide = {"energy_band_coverage": 1.0, "energy_band_halfwidth": 0.03, "energy_error_median": 0.002}
    assert "the cells' OCV is the twin's table" in (band_verdict(wide, 0.0) or "")
    assert "mgtwin bands" in (band_verdict(wide, 0.0) or "")
    narrow = {"energy_band_coverage": 0.3, "energy_band_halfwidth": 0.024, "energy_error_median": 0.026}
    assert "3 mV off the tables" in (band_verdict(narrow, 3.0) or "")
    fitting = {"energy_band_coverage": 0.9, "energy_band_halfwidth": 0.02, "energy_error_median": 0.012}
    assert band_verdict(fitting, 1.5) is None
    assert band_verdict({"energy_band_coverage": None}, 0.0) is None


def test_pooled_scores_weigh_each_run_by_what_it_scored() -> None:
    """Coverage and MAPE by points, SoC RMSE by pack rows (root of the mean square), widths as medians."""
    runs = [
        {"soc_rmse": 0.01, "pack_rows_scored": 100, "energy_band_coverage": 1.0, "energy_points": 10,
         "energy_mape": 0.01, "energy_band_halfwidth": 0.03, "soc_rmse_bms": 0.02, "soc_bms_rows": 100},
        {"soc_rmse": 0.03, "pack_rows_scored": 300, "energy_band_coverage": 0.5, "energy_points": 30,
         "energy_mape": 0.05, "energy_band_halfwidth": 0.01, "soc_rmse_bms": 0.04, "soc_bms_rows": 100},
        {"soc_rmse": None, "pack_rows_scored": 0, "energy_band_coverage": None, "energy_points": 0,
         "energy_mape": None, "energy_band_halfwidth": 0.02},
    ]  # fmt: skip
    pooled = pool_scores(runs)
    assert pooled["runs"] == 3
    assert pooled["soc_rmse"] == pytest.approx(np.sqrt((100 * 0.01**2 + 300 * 0.03**2) / 400), rel=1e-12)
    assert pooled["energy_band_coverage"] == pytest.approx((10 * 1.0 + 30 * 0.5) / 40, rel=1e-12)
    assert pooled["energy_mape"] == pytest.approx((10 * 0.01 + 30 * 0.05) / 40, rel=1e-12)
    assert pooled["energy_band_halfwidth"] == pytest.approx(0.02, rel=1e-12)
    assert pooled["energy_points"] == 40
    assert pooled["energy_runs_covering_all"] == 1
    assert pooled["runtime_band_coverage"] is None  # nothing scored
    # the BMS by the rows it was scored on (a cycler's log has no BMS SoC, a run may lack it)
    assert pooled["soc_rmse_bms"] == pytest.approx(np.sqrt((0.02**2 + 0.04**2) / 2), rel=1e-12)
    assert pooled["soc_z_rms"] is None


def test_band_places_say_where_the_truth_fell_and_plot(replayed: Path, tmp_path: Path) -> None:
    """-1 at P5, +1 at P95: the share within [-1, 1] is the band's coverage; the plot is written."""
    from twin.evaluate import EvaluateOptions, band_places, evaluate_run, plot_bands

    options = EvaluateOptions(skip_s=1800.0)
    scores = evaluate_run(replayed, options=options)
    places = band_places(replayed, options=options)
    for key in ("energy", "ridethrough"):
        mine = places.filter(pl.col("figure") == key)["place"]
        assert mine.len() == scores[f"{key}_points"]
        assert float((mine.abs() <= 1.0).mean()) == pytest.approx(scores[f"{key}_band_coverage"], abs=1e-12)
        assert 0.0 <= scores[f"{key}_band50_coverage"] <= scores[f"{key}_band_coverage"]
    png = plot_bands([{"run": str(replayed), **scores}] * 2, pl.concat([places, places]), tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_scores_runs_side_by_side(replayed: Path) -> None:
    result = runner.invoke(app, ["compare", str(replayed), str(replayed), "--json", "--skip", "30m"])
    assert result.exit_code == 0, result.output
    both = json.loads(result.stdout)
    rows, pooled = both["runs"], both["pooled"]
    assert [r["run"] for r in rows] == [str(replayed)] * 2
    assert rows[0]["ocv_error_mv"] == 0.0  # the packaged scenario's cells have the tables' OCV
    single = json.loads(runner.invoke(app, ["evaluate", str(replayed), "--json", "--no-plots", "--skip", "30m"]).stdout)
    for key in ("soc_rmse", "energy_mape", "energy_band_coverage"):
        assert rows[0][key] == single[key], key
        # a run pooled with itself is that run
        assert pooled[key] == pytest.approx(single[key], rel=1e-12), key
    assert pooled["runs"] == 2
    assert pooled["energy_points"] == 2 * single["energy_points"]
    table = runner.invoke(app, ["compare", str(replayed), str(replayed), "--skip", "30m"])
    assert table.exit_code == 0, table.output
    assert "side by side" in table.output
    assert "pooled over 2 runs: P5-P95 holds the truth" in " ".join(table.output.split())
    missing = runner.invoke(app, ["compare", str(replayed / "nope")])
    assert missing.exit_code != 0


def test_evaluate_prints_a_table(replayed: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(replayed), "--no-plots", "--skip", "30m"])
    assert result.exit_code == 0, result.output
    assert "SoC RMSE" in result.output
    assert "ridethrough" in result.output


def test_replay_and_evaluate_refuse_bad_sources_clearly(tmp_path: Path, run_dir: Path) -> None:
    from twin.errors import TwinError
    from twin.evaluate import evaluate_run

    with pytest.raises(TwinError, match="not a run folder"):
        RunFolder.open(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    pl.DataFrame({"pack": ["a"], "ts_ms": [1]}).write_parquet(bad / "telemetry.parquet")
    with pytest.raises(TwinError, match="missing the column"):
        RunFolder.open(bad)
    with pytest.raises(TwinError, match="mgtwin replay"):
        evaluate_run(run_dir, estimates_dir=tmp_path)
    result = runner.invoke(app, ["replay", str(tmp_path / "nope")])
    assert result.exit_code != 0


def test_rows_that_break_the_contract_are_refused_and_the_rest_replays_as_without_them(
    tmp_path: Path, run_dir: Path
) -> None:
    """A file is not checked as a message is: replay applies the contract's checks, refuses, counts, goes on.

    One absurd current (1e200 A), one NaN voltage and one negative SoC from the BMS, and a pack
    whose metadata gives a negative capacity: the replay finishes, refuses exactly those rows
    with the live service's reasons, writes them to rejects.parquet, and every estimate equals
    that of the same run with the rows taken out beforehand.
    """
    dirty, clean = tmp_path / "dirty", tmp_path / "clean"
    for folder in (dirty, clean):
        folder.mkdir()
        for name in ("packs.parquet", "status.parquet", "site.parquet", "run.json"):
            if (run_dir / name).exists():
                (folder / name).write_bytes((run_dir / name).read_bytes())
    tele = pl.read_parquet(run_dir / "telemetry.parquet")
    packs = tele["pack"].unique(maintain_order=True).to_list()
    spoil = {
        (packs[0], 600): ("current_a", 1e200),
        (packs[1], 900): ("voltage_v", float("nan")),
        (packs[2], 1200): ("soc_bms", -0.5),
    }
    key = pl.struct("pack", "seq")
    out = tele
    for (pack, seq), (column, value) in spoil.items():
        hit = (pl.col("pack") == pack) & (pl.col("seq") == seq)
        out = out.with_columns(pl.when(hit).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))
    out.write_parquet(dirty / "telemetry.parquet")
    spoilt = pl.DataFrame({"pack": [p for p, _ in spoil], "seq": [s for _, s in spoil]})
    tele.join(spoilt, on=["pack", "seq"], how="anti", maintain_order="left").write_parquet(clean / "telemetry.parquet")
    meta = pl.read_parquet(run_dir / "packs.parquet")
    bad_pack = packs[3]
    meta.with_columns(
        pl.when(pl.col("pack") == bad_pack).then(-1.0).otherwise(pl.col("rated_capacity_ah")).alias("rated_capacity_ah")
    ).write_parquet(dirty / "packs.parquet")
    meta.filter(pl.col("pack") != bad_pack).write_parquet(clean / "packs.parquet")
    assert out.filter(key.is_in(spoilt.select(key).to_series().implode())).height == 3

    result = runner.invoke(app, ["replay", str(dirty)])
    assert result.exit_code == 0, result.output
    assert "rejects: " in result.output
    assert "out_of_range 3" in result.output  # current, SoC and capacity beyond their bounds
    assert "not_finite 1" in result.output  # the NaN voltage
    rejects = pl.read_parquet(dirty / "rejects.parquet")
    assert rejects.height == 4
    assert sorted(rejects["topic"].to_list()) == ["pack_meta", "pack_telemetry", "pack_telemetry", "pack_telemetry"]
    fields = ("current_a", "voltage_v", "soc_bms", "rated_capacity_ah")
    assert sorted(next(f for f in fields if f in d) for d in rejects["detail"]) == sorted(fields)

    assert runner.invoke(app, ["replay", str(clean)]).exit_code == 0
    got = pl.read_parquet(dirty / "estimates.parquet")
    want = pl.read_parquet(clean / "estimates.parquet")
    assert got.height > 0
    assert got.equals(want)
    assert pl.read_parquet(dirty / "site_estimates.parquet").equals(pl.read_parquet(clean / "site_estimates.parquet"))
