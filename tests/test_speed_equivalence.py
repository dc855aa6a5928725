"""The replay's fast paths give exactly what the general paths give (issue 5: speed without changing results).

* the compiled SoC filter's sums (:func:`twin.estimators._soc_filter._dot6`) add in ``np.einsum``'s order,
  as the numpy filter it replaced did;
* the mirror's vectorised duplicate check and newest-row pick agree with the polars way on
  messy batches (redeliveries, restarted counters, ties in time, disorder);
* the replay's window cut agrees with ``partition_by`` on rows out of order;
* the alert engine's numpy aggregation per (grid step, pack) agrees with a polars group-by on
  rows with nulls, NaN, ties in time, disorder and groups long enough for polars to sum them
  pairwise, and the engine fed late and shuffled rows gives the same alerts and state with either.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import twin.alerts
from tests.test_state import SITE, T0, feed, meta, telemetry
from twin.alerts import _LAST, _STUCK, AlertEngine, AlertOptions, _aggregate
from twin.estimators._soc_filter import _dot6
from twin.estimators.base import group_time_order
from twin.replay import _Windowed
from twin.state import CoreOptions, TwinCore


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_dot6_adds_as_einsum_does(scale: float) -> None:
    rng = np.random.default_rng(5)
    cov = rng.standard_normal((805, 6, 6)) * scale
    h = rng.standard_normal((805, 6))
    ph = np.einsum("nij,nj->ni", cov, h)
    s = np.einsum("ni,ni->n", h, ph)
    ours = np.array([[_dot6(cov[n, i], h[n]) for i in range(6)] for n in range(805)])
    assert ours.tobytes() == ph.tobytes()
    assert np.array([_dot6(h[n], ph[n]) for n in range(805)]).tobytes() == s.tobytes()


def _messy_batches(seed: int) -> list[list[tuple[str, bytes]]]:
    rng = np.random.default_rng(seed)
    packs = ["A", "B", "C"]
    rows = [(p, 100 + k, T0 + 1000 * k) for k in range(40) for p in packs]
    rows += [rows[i] for i in rng.integers(0, len(rows), 10)]  # redeliveries
    rows += [("B", 3, T0 + 39_500), ("C", 500, T0 + 20_000)]  # a restarted counter, an old row
    rows += [("A", 900 + i, T0 + 30_000) for i in range(3)]  # ties in time
    order = rng.permutation(len(rows))
    shuffled = [rows[i] for i in order]
    cuts = sorted(rng.choice(np.arange(1, len(shuffled)), 6, replace=False).tolist())
    pieces = np.split(np.arange(len(shuffled)), cuts)
    clean = [[(p, k, T0 - 100_000 + 1000 * k) for k in range(j, j + 5) for p in packs] for j in (0, 5)]
    out = [[meta(p) for p in packs]]
    for piece in [*clean, *([shuffled[i] for i in piece] for piece in pieces)]:
        out.append([telemetry(p, s, t, voltage_v=300.0 + s % 7) for p, s, t in piece])
    return out


def _mirror(core: TwinCore) -> dict[str, object]:
    p = core.packs
    return {
        **{k: v[: len(p.ids)].tobytes() for k, v in p.values.items()},
        "ids": list(p.ids),
        "ts": p.last_ts_ms.tobytes(),
        "seq": p.last_seq.tobytes(),
        "counters": dict(core.counters),
    }


@pytest.mark.parametrize("seed", range(6))
def test_fast_ingest_agrees_with_the_general_path(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    options = CoreOptions(site=SITE, stale_after_s=30, late_window_s=10, max_clock_skew_s=60, max_packs=5)
    fast, slow = TwinCore(options), TwinCore(options)
    for k, batch in enumerate(_messy_batches(seed)):
        now = T0 + 5000 * (k + 1)
        got = feed(fast, batch, now)
        with monkeypatch.context() as m:
            m.setattr(TwinCore, "_no_duplicates", lambda self, idx, seq: False)
            m.setattr(TwinCore, "_newest_in_order", staticmethod(lambda tele, idx: None))
            want = feed(slow, batch, now)
        assert got.telemetry.equals(want.telemetry)
        assert (got.duplicates, got.late) == (want.duplicates, want.late)
        assert _mirror(fast) == _mirror(slow)
        assert fast.pack_frame(now).equals(slow.pack_frame(now))


def test_window_cut_agrees_with_partition_by() -> None:
    rng = np.random.default_rng(3)
    ts = T0 + rng.integers(-5_000, 600_000, 5000)
    frame = pl.DataFrame({"ts_ms": ts, "v": np.arange(ts.size)})
    for rows in (frame, frame.sort("ts_ms", maintain_order=True)):
        windowed = _Windowed.of(rows, T0, 60_000)
        ready, carry = windowed.split_top()
        w = ((pl.col("ts_ms") - T0 + 59_999) // 60_000).clip(lower_bound=0).alias("_w")
        expected = rows.with_columns(w)
        top = int(expected["_w"].max())  # type: ignore[arg-type]
        assert carry.frame.equals(expected.filter(pl.col("_w") == top).drop("_w"))
        parts = expected.filter(pl.col("_w") < top).partition_by("_w", as_dict=True)
        got = list(ready.parts())
        assert [k for k, _ in got] == sorted(int(k[0]) for k in parts)
        for k, part in got:
            assert part.equals(parts[(k,)].drop("_w"))


# --------------------------------------------------------------------------- the alert engine's aggregation


def _polars_aggregate(rows: pl.DataFrame, key: np.ndarray) -> pl.DataFrame:
    """The per-(step, pack) aggregates as a polars group-by gives them: the reference for ``_aggregate``."""
    changed = [
        pl.col("ts_ms").filter(pl.col(name) != pl.col(name).shift(1)).max().cast(pl.Float64).alias(f"{name}__chg")
        for name in _STUCK
    ]
    return (
        rows.with_columns(pl.Series("_key", key, dtype=pl.Int64))
        .sort("_key", "ts_ms", maintain_order=True)
        .group_by("_key", maintain_order=True)
        .agg(
            pl.col("_tick").first(),
            pl.col("_i").first(),
            pl.len().cast(pl.Int64).alias("n"),
            pl.col("ts_ms").first().alias("ts_first"),
            pl.col("ts_ms").last().alias("ts"),
            pl.col("seq").min().alias("seq_min"),
            pl.col("seq").max().alias("seq_max"),
            pl.col("seq").last().alias("seq_last"),
            *[pl.col(name).last() for name in _LAST],
            pl.col("cell_v_min_idx").last(),
            pl.col("cell_v_max_idx").last(),
            pl.col("contactor_closed").last(),
            (pl.col("voltage_v") * pl.col("current_a")).mean().alias("power_mean"),
            pl.col("temp_max_c").mean().alias("temp_max_mean"),
            pl.col("temp_avg_c").mean().alias("temp_avg_mean"),
            *[pl.col(name).first().alias(f"{name}__first") for name in _STUCK],
            *[pl.col(name).last().alias(f"{name}__last") for name in _STUCK],
            *changed,
        )
    )


def _with_nulls(values: np.ndarray, null: np.ndarray, dtype: pl.DataType) -> pl.Series:
    return pl.Series(values, dtype=dtype).scatter(np.flatnonzero(null), None)


def _messy_engine_rows(rng: np.random.Generator, sizes: list[int], *, nulls: bool) -> tuple[pl.DataFrame, np.ndarray]:
    """Rows of groups of the given sizes, shuffled: ties in time, repeated values, NaN, -0.0 and (optionally) nulls."""
    key = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)
    n = key.size
    tick = key // 7
    ts = 1_767_225_600_000 + tick * 10_000 - rng.integers(0, 25, n)  # many rows share a time
    few = np.array([1.0, 2.0, -0.0, 0.0, 3.5])
    some = key % 3 == 0  # NaN only in some groups, so that the others' sums are compared

    def reading() -> pl.Series:
        x = np.where(rng.random(n) < 0.3, rng.choice(few, n), rng.standard_normal(n) * 1e3)
        x[some & (rng.random(n) < 0.1)] = np.nan
        return _with_nulls(x, (rng.random(n) < 0.1) & nulls, pl.Float64)

    frame = pl.DataFrame(
        {
            "pack": [f"P{k % 5}" for k in key.tolist()],
            "ts_ms": ts,
            "seq": _with_nulls(rng.integers(0, 50, n), (rng.random(n) < 0.05) & nulls, pl.Int64),
            **{name: reading() for name in _LAST},
            "cell_v_min_idx": _with_nulls(rng.integers(0, 3, n), (rng.random(n) < 0.05) & nulls, pl.Int64),
            "cell_v_max_idx": _with_nulls(rng.integers(0, 3, n), (rng.random(n) < 0.05) & nulls, pl.Int64),
            "contactor_closed": _with_nulls(rng.random(n) < 0.8, (rng.random(n) < 0.05) & nulls, pl.Boolean),
            "_tick": tick,
            "_i": key % 5,
        }
    )
    order = rng.permutation(n)
    return frame[order], key[order]


@pytest.mark.parametrize("nulls", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_alert_aggregation_agrees_with_the_polars_group_by(seed: int, nulls: bool) -> None:
    rng = np.random.default_rng(seed)
    sizes = [1, 1, 2, 3, 9, 10, 11, 127, 128, 129, 300, 5, 1]  # polars adds 128 rows and more pairwise
    rows, key = _messy_engine_rows(rng, [int(s) for s in rng.permutation(sizes)], nulls=nulls)
    got = _aggregate(rows, key)
    want = _polars_aggregate(rows, key)
    assert got.schema == want.schema
    assert_frame_equal(got, want, check_exact=True)
    for name in got.columns:  # bit for bit, the sign of a zero included
        a, b = got[name], want[name]
        assert a.is_null().equals(b.is_null()), name
        if a.dtype == pl.Float64:
            assert a.fill_null(0.0).to_numpy().tobytes() == b.fill_null(0.0).to_numpy().tobytes(), name


def test_alert_aggregation_of_no_rows() -> None:
    rows, key = _messy_engine_rows(np.random.default_rng(0), [3], nulls=False)
    assert _aggregate(rows.clear(), key[:0]).schema == _polars_aggregate(rows, key).schema


def _engine_batches(seed: int) -> list[pl.DataFrame]:
    """Five packs for five minutes at 1 Hz, shuffled, cut at random, some rows late by 20-60 s; NaN and nulls."""
    rng = np.random.default_rng(seed)
    n = 5 * 300
    pack = np.tile(np.arange(5), 300)
    ts = T0 + 1000 * np.repeat(np.arange(300), 5) + rng.integers(0, 3, n)  # some ties in time
    few = np.array([3.9, 3.9, 3.95, np.nan])

    def reading(scale: float) -> pl.Series:
        x = np.where(rng.random(n) < 0.7, rng.choice(few, n), 3.9 + scale * rng.standard_normal(n))
        return _with_nulls(x, rng.random(n) < 0.05, pl.Float64)

    rows = pl.DataFrame(
        {
            "pack": [f"P{p}" for p in pack.tolist()],
            "ts_ms": ts,
            "seq": np.repeat(np.arange(300), 5) + rng.integers(0, 2, n),  # gaps and repeats
            "voltage_v": reading(10.0),
            "current_a": reading(50.0),
            "temp_min_c": reading(1.0),
            "temp_max_c": reading(1.0),
            "temp_avg_c": reading(1.0),
            "cell_v_min_v": reading(0.1),
            "cell_v_max_v": reading(0.1),
            "cell_v_min_idx": rng.integers(0, 96, n),
            "cell_v_max_idx": rng.integers(0, 96, n),
            "contactor_closed": _with_nulls(rng.random(n) < 0.9, rng.random(n) < 0.02, pl.Boolean),
        }
    )
    arrival = ts + np.where(rng.random(n) < 0.05, rng.integers(20_000, 60_000, n), 0)  # late rows
    rows = rows[np.argsort(arrival + rng.integers(0, 2000, n), kind="stable")]  # and out of order
    cuts = np.sort(rng.choice(np.arange(1, n), 25, replace=False))
    return [rows[int(a) : int(b)] for a, b in zip(np.r_[0, cuts], np.r_[cuts, n], strict=True)]


def _engine_state(engine: AlertEngine) -> dict[str, object]:
    snap = engine.snapshot()
    return {
        **{f.name: getattr(snap.packs, f.name).tobytes() for f in dataclasses.fields(snap.packs)},
        "site": repr(snap.site),
        "active": snap.active,
        "counters": snap.counters,
        "pending": repr(snap.pending_rows.rows()),  # NaN equals NaN in its repr
    }


@pytest.mark.parametrize("seed", range(3))
def test_alert_engine_with_the_numpy_aggregation_agrees_with_the_polars_one(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = TwinCore(CoreOptions(site=SITE))
    feed(core, [telemetry(f"P{p}", 0, T0 - 600_000) for p in range(5)], T0)  # the packs, known to the core
    options = AlertOptions(site=SITE, min_duration_s=0.0, stale_after_s=20.0, warmup_s=30.0)
    fast, slow = AlertEngine(options), AlertEngine(options)
    for batch in _engine_batches(seed):
        now = int(batch["ts_ms"].max())  # type: ignore[arg-type]
        got = fast.update(batch, core=core, now_ms=now)
        with monkeypatch.context() as m:
            m.setattr(twin.alerts, "_aggregate", _polars_aggregate)
            want = slow.update(batch, core=core, now_ms=now)
        assert [a.model_dump() for a in got] == [a.model_dump() for a in want]
        assert _engine_state(fast) == _engine_state(slow)
    assert fast.counters["late_rows"] > 0
    assert fast.counters["raised"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("groups", [3, 805, 70_000])
def test_group_time_order_is_lexsorts(seed: int, groups: int) -> None:
    """The two-pass order (time, then group by radix) is ``np.lexsort``'s, ties and disorder included."""
    rng = np.random.default_rng(seed)
    n = 5_000
    group = rng.integers(-1, groups, n)
    ts = np.repeat(np.arange(n // 5) * 1000, 5)[rng.permutation(n) if seed else slice(None)]
    ts[rng.integers(0, n, 50)] = ts[0]  # ties in time across groups
    np.testing.assert_array_equal(group_time_order(group, ts), np.lexsort((ts, group)))
    assert group_time_order(group[:0], ts[:0]).size == 0
