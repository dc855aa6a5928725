"""Line-protocol serialisation speed: the vectorised renderer against per-point encoders (L2).

Encodes the same rows (default 100k points, 4 tags, 6 float fields) with:

* ``render`` (twin.points, polars expressions), on clean data and on data with 5 % nulls,
  1 % NaN and tag values that need escaping (the slower, null-aware path);
* ``reference_line`` (twin.points, the slow, obviously correct encoder the tests trust);
* ``influxdb_client.Point`` (the official client's point-by-point encoder);
* an f-string per point with ``repr`` floats (no escaping: the naive baseline).

All in one run, on one machine, so the ratios are comparable even where absolute numbers
are noisy. The per-point encoders get their rows as Python tuples prepared outside the
timing (generous to them). It also checks that ``render`` and ``reference_line`` give
byte-identical bodies. INGEST_NOTES L2 asks for at least 1M points/s on the vectorised path.

Run: ``.venv/bin/python benchmarks/line_protocol_speed.py [rows]``.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import polars as pl

from twin.points import MeasurementSpec, PointDescription, reference_line, render

TAGS = ("site", "pack", "chemistry", "life")
FIELDS = ("voltage_v", "current_a", "temp_avg_c", "soc_bms", "soh_bms", "cell_v_max_v")
SPEC = MeasurementSpec("bench", tags=TAGS, fields=tuple(PointDescription(f, unit="") for f in FIELDS))
TARGET_POINTS_PER_S = 1_000_000
TS0 = 1_700_000_000_000


def make_frame(rows: int, *, dirty: bool, seed: int = 7) -> pl.DataFrame:
    """Telemetry-like rows: 800 packs, two chemistries; ``dirty`` adds nulls, NaN and escapes."""
    rng = random.Random(seed)
    packs = [f"P{i:03d}" for i in range(800)]
    if dirty:
        packs = [p if i % 10 else f"{p} spare,bay=3" for i, p in enumerate(packs)]
    scales = {"voltage_v": 400.0, "current_a": 200.0, "temp_avg_c": 40.0, "soc_bms": 1.0, "soh_bms": 1.0}

    def value(name: str) -> float | None:
        if dirty and rng.random() < 0.05:
            return None
        if dirty and rng.random() < 0.01:
            return math.nan
        return rng.random() * scales.get(name, 4.2)

    return pl.DataFrame(
        {
            "site": ["nevada"] * rows,
            "pack": [packs[i % len(packs)] for i in range(rows)],
            "chemistry": [("nmc811", "lfp")[i % 7 == 0] for i in range(rows)],
            "life": [("new", "second_life")[i % 3 == 0] for i in range(rows)],
            **{name: [value(name) for _ in range(rows)] for name in FIELDS},
            "ts_ms": [TS0 + i for i in range(rows)],
        },
        schema_overrides=dict.fromkeys(FIELDS, pl.Float64),
    )


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Return the fastest of ``repeats`` timed runs, in seconds."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def encode_reference(rows: list[tuple[Any, ...]]) -> bytes:
    """Encode with the reference encoder, one call per point."""
    lines = []
    for row in rows:
        line = reference_line(
            "bench", dict(zip(TAGS, row[:4], strict=True)), dict(zip(FIELDS, row[4:10], strict=True)), row[10]
        )
        if line:
            lines.append(line + "\n")
    return "".join(lines).encode()


def encode_point(rows: list[tuple[Any, ...]]) -> bytes:
    """Encode with influxdb_client.Point, one object per point."""
    from influxdb_client.client.write.point import Point
    from influxdb_client.domain.write_precision import WritePrecision

    lines = []
    for row in rows:
        point = Point("bench")
        for key, tag in zip(TAGS, row[:4], strict=True):
            point.tag(key, tag)
        for key, field in zip(FIELDS, row[4:10], strict=True):
            point.field(key, field)
        lines.append(point.time(row[10], WritePrecision.MS).to_line_protocol())
    return ("\n".join(lines) + "\n").encode()


def encode_fstring(rows: list[tuple[Any, ...]]) -> bytes:
    """Encode with one f-string per point: repr floats, no escaping, no null handling."""
    return "".join(
        f"bench,chemistry={c},life={lf},pack={p},site={s} voltage_v={a!r},current_a={b!r},temp_avg_c={t!r},"
        f"soc_bms={d!r},soh_bms={e!r},cell_v_max_v={f!r} {ts}\n"
        for s, p, c, lf, a, b, t, d, e, f, ts in rows
    ).encode()


def main(rows: int = 100_000) -> dict[str, Any]:
    """Run the benchmark, print a table and return the results.

    Args:
        rows: points per method.

    Returns:
        ``{"rows", "points_per_s": {method: rate}, "identical", "target_met"}``.
    """
    clean = make_frame(rows, dirty=False)
    dirty = make_frame(rows, dirty=True)
    tuples = clean.rows()
    render(clean.head(1000), SPEC)  # warm up polars' thread pool and regex cache

    seconds: dict[str, float] = {}
    seconds["render (polars, clean)"] = best_of(5, lambda: render(clean, SPEC))
    seconds["render (5% null, 1% NaN, escapes)"] = best_of(5, lambda: render(dirty, SPEC))
    seconds["f-string per point (repr, no escaping)"] = best_of(1, lambda: encode_fstring(tuples))
    seconds["influxdb_client.Point"] = best_of(1, lambda: encode_point(tuples))
    seconds["reference_line"] = best_of(1, lambda: encode_reference(tuples))

    identical = render(clean, SPEC).body == encode_reference(tuples)
    identical_dirty = render(dirty, SPEC).body == encode_reference(dirty.rows())
    rates = {name: rows / s for name, s in seconds.items()}
    reference = rates["reference_line"]
    point = rates["influxdb_client.Point"]

    print(f"line protocol, {rows:,} points x ({len(TAGS)} tags, {len(FIELDS)} float fields), one run")
    print(f"{'method':40s} {'points/s':>12s} {'ms':>9s} {'x reference':>12s} {'x Point':>9s}")
    for name, rate in rates.items():
        print(f"{name:40s} {rate:12,.0f} {seconds[name] * 1000:9.1f} {rate / reference:12.1f} {rate / point:9.1f}")
    target_met = rates["render (polars, clean)"] >= TARGET_POINTS_PER_S
    print(f"render == reference_line, byte for byte: clean {identical}, dirty {identical_dirty}")
    print(f"L2 target >= {TARGET_POINTS_PER_S:,} points/s on the vectorised path: {'met' if target_met else 'NOT met'}")
    return {
        "rows": rows,
        "points_per_s": rates,
        "identical": identical and identical_dirty,
        "target_met": target_met,
    }


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
