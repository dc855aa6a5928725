"""The replay's fast paths give exactly what the general paths give (issue 5: speed without changing results).

* the SoC filter's pack-last sums (:func:`twin.estimators.soc._sum6`) add in ``np.einsum``'s order;
* the mirror's vectorised duplicate check and newest-row pick agree with the polars way on
  messy batches (redeliveries, restarted counters, ties in time, disorder);
* the replay's window cut agrees with ``partition_by`` on rows out of order.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tests.test_state import SITE, T0, feed, meta, telemetry
from twin.estimators.soc import _sum6
from twin.replay import _Windowed
from twin.state import CoreOptions, TwinCore


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_sum6_adds_as_einsum_does(scale: float) -> None:
    rng = np.random.default_rng(5)
    cov = rng.standard_normal((805, 6, 6)) * scale
    h = rng.standard_normal((805, 6))
    ph = np.einsum("nij,nj->ni", cov, h)
    s = np.einsum("ni,ni->n", h, ph)
    pack_last = np.ascontiguousarray(cov.transpose(1, 2, 0))
    ph_last = _sum6(pack_last * h.T[None, :, :], axis=1)
    assert ph_last.T.tobytes() == ph.tobytes()
    assert _sum6(h.T * ph_last, axis=0).tobytes() == s.tobytes()


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
