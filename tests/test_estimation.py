"""The site's estimators as one (twin.estimation.SiteEstimation): the contract properties, on emulated telemetry.

The same properties the estimator contract suite checks for each estimator, for the
composition the service and the replay use (SoC filter, coulomb count, capacity checkpoints):

* the same results whether a recording is fed in one batch, one sample time at a time, or
  split at random points;
* snapshot and restore in the middle give the same results as an uninterrupted run;
* input frames are not mutated; duplicates and rows older than a pack's last sample change
  nothing;
* a pack that announces itself late does not disturb the others.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from twin.cli import app
from twin.estimation import EstimationOptions, SiteEstimation
from twin.estimators.capacity import CapacityOptions

# A short capacity grid and small swings, so that a 40-minute recording forms capacity pairs.
OPTIONS = EstimationOptions(checkpoint_every_s=30.0, capacity=CapacityOptions(min_dsoc=0.01, max_rel_dsoc_std=1.0))


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, pl.DataFrame]:
    out = tmp_path_factory.mktemp("est") / "small"
    result = CliRunner().invoke(
        app, ["emulate", "--scenario", "small", "--duration", "40m", "--pack-level", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    tele = pl.read_parquet(out / "telemetry.parquet").sort("ts_ms", "pack")
    meta = pl.read_parquet(out / "packs.parquet")
    return meta, tele


def _final(est: SiteEstimation, now_ms: int) -> dict[str, np.ndarray]:
    packs = est.packs(now_ms=now_ms)
    assert packs is not None
    return {
        "soc": packs.soc,
        "soc_std": packs.soc_std,
        "capacity_ah": packs.capacity_ah,
        "capacity_std_ah": packs.capacity_std_ah,
        "current_offset_a": packs.current_offset_a,
    }


def _run(meta: pl.DataFrame, batches: list[pl.DataFrame]) -> SiteEstimation:
    est = SiteEstimation(OPTIONS)
    est.add_meta(meta)
    for batch in batches:
        est.update(batch)
    return est


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for key, value in a.items():
        np.testing.assert_array_equal(value, b[key], err_msg=key)


def test_batching_does_not_change_the_results(recording: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    meta, tele = recording
    end = int(tele["ts_ms"].max())  # type: ignore[arg-type]
    whole = _final(_run(meta, [tele]), end)
    per_time = _final(_run(meta, tele.partition_by("ts_ms", maintain_order=True)), end)
    rng = np.random.default_rng(11)
    cuts = np.sort(rng.choice(np.arange(1, tele.height), size=40, replace=False))
    pieces = [tele.slice(int(a), int(b - a)) for a, b in zip(np.r_[0, cuts], np.r_[cuts, tele.height], strict=True)]
    random_split = _final(_run(meta, pieces), end)
    _assert_same(whole, per_time)
    _assert_same(whole, random_split)
    # And the checkpoints did their work: capacity moved from its prior for some pack. (Its
    # std may also grow a little: the forgetting factor discounts the prior with every pair.)
    prior = SiteEstimation(OPTIONS)
    prior.add_meta(meta)
    assert prior.capacity is not None
    assert np.any(whole["capacity_ah"] != prior.capacity.estimate().capacity_ah)
    assert np.any(whole["capacity_std_ah"] < prior.capacity.estimate().capacity_std_ah)


def test_metadata_in_pieces_places_the_packs_as_metadata_at_once(recording: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    """The aging curves are placed when the metadata arrives (not at the first batch of
    telemetry), each pack at its own metadata's time: announced together or one by one, the
    same curves and the same SoH and RUL."""
    meta, tele = recording
    end = int(tele["ts_ms"].max())  # type: ignore[arg-type]
    together = _run(meta, [tele])
    assert together.health is not None
    assert together.health._placed is not None
    apart = SiteEstimation(OPTIONS)
    for row in range(meta.height):
        apart.add_meta(meta.slice(row, 1))
    apart.update(tele)
    a, b = together.packs(now_ms=end), apart.packs(now_ms=end)
    assert a is not None
    assert b is not None
    order = [b.pack_ids.index(p) for p in a.pack_ids]
    for name in ("soh", "soh_std", "rul_days_p50", "capacity_ah", "soc"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name)[order], err_msg=name)


def test_snapshot_and_restore_in_the_middle(recording: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    meta, tele = recording
    end = int(tele["ts_ms"].max())  # type: ignore[arg-type]
    middle = int(tele["ts_ms"].median())  # type: ignore[arg-type]
    first, second = tele.filter(pl.col("ts_ms") <= middle), tele.filter(pl.col("ts_ms") > middle)
    est = _run(meta, [first])
    snap = est.snapshot()
    est.update(second)
    resumed = SiteEstimation(OPTIONS)
    resumed.restore(snap)
    resumed.update(second)
    _assert_same(_final(est, end), _final(resumed, end))
    _assert_same(_final(est, end), _final(_run(meta, [tele]), end))


def test_inputs_are_not_mutated_and_repeats_change_nothing(recording: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    meta, tele = recording
    end = int(tele["ts_ms"].max())  # type: ignore[arg-type]
    copy = tele.clone()
    once = _run(meta, [tele])
    assert tele.equals(copy)
    half = tele.head(tele.height // 2)
    repeated = _run(meta, [half, half.sample(fraction=1.0, seed=3), tele])  # duplicates and late rows
    _assert_same(_final(once, end), _final(repeated, end))
    assert repeated.soc is not None
    assert repeated.soc.counters()["late"] + repeated.soc.counters()["duplicate"] >= half.height


def test_a_pack_announced_late_leaves_the_others_alone(recording: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    meta, tele = recording
    end = int(tele["ts_ms"].max())  # type: ignore[arg-type]
    late_pack = str(meta["pack"][-1])
    others = tele.filter(pl.col("pack") != late_pack)
    all_at_once = _run(meta.filter(pl.col("pack") != late_pack), [others])
    est = SiteEstimation(OPTIONS)
    est.add_meta(meta.filter(pl.col("pack") != late_pack))
    middle = int(tele["ts_ms"].median())  # type: ignore[arg-type]
    est.update(others.filter(pl.col("ts_ms") <= middle))
    est.update(tele.filter((pl.col("pack") == late_pack) & (pl.col("ts_ms") <= middle)))  # no meta yet: counted
    assert est.counters["no_meta"] > 0
    est.add_meta(meta.filter(pl.col("pack") == late_pack))
    est.update(tele.filter(pl.col("ts_ms") > middle))
    assert est.pack_ids[-1] == late_pack
    got = _final(est, end)
    want = _final(all_at_once, end)
    for key in want:
        np.testing.assert_array_equal(got[key][:-1], want[key], err_msg=key)
    assert 0.0 <= got["soc"][-1] <= 1.0
