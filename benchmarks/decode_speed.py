"""Decode speed: the bulk polars path of ``twin.pipeline`` against per-message pydantic.

Three batches of 5,000 pack-telemetry messages (about 350 bytes each, as the emulator sends
them) are decoded:

* all valid, through :func:`twin.pipeline.decode_batch` (the bulk path, one NDJSON read);
* the same with 1 % bad messages of several kinds (half of them break the bulk read and
  cost a bisection, half are row-level problems found by the bulk checks);
* the per-message baseline, measured in the same run: ``contract.decode`` in a loop, and the
  full per-message reference (topic check, ``contract.decode``, pack match, then one polars
  frame built from the dumped rows), which is what ``decode_batch`` replaces.

Each figure is the best of several runs (this machine is shared and noisy); ratios are
against the baseline of the same run.

Usage: ``python benchmarks/decode_speed.py``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

import polars as pl

from twin import contract as c
from twin.errors import ContractError
from twin.pipeline import decode_batch, output_schema

SITE = "nevada"
N = 5000
TS = 1_767_225_600_000


def _valid_batch(rng: random.Random) -> tuple[list[str], list[bytes]]:
    topics, payloads = [], []
    for i in range(N):
        pack = f"P{i % 805:04d}"
        message = c.PackTelemetry(
            pack=pack,
            ts_ms=TS + i * 1000,
            seq=i,
            voltage_v=round(330 + rng.random() * 70, 3),
            current_a=round(rng.uniform(-150, 150), 3),
            temp_min_c=round(rng.uniform(15, 30), 2),
            temp_max_c=round(rng.uniform(30, 40), 2),
            temp_avg_c=round(rng.uniform(25, 35), 2),
            cell_v_min_v=round(rng.uniform(3.5, 3.8), 4),
            cell_v_max_v=round(rng.uniform(3.8, 4.1), 4),
            cell_v_min_idx=rng.randrange(96),
            cell_v_max_idx=rng.randrange(96),
            soc_bms=round(rng.random(), 4),
            soh_bms=round(rng.uniform(0.6, 1.0), 4),
            contactor_closed=rng.random() < 0.95,
            fault_bits=0,
        )
        topics.append(c.topic(c.TopicKind.PACK_TELEMETRY, SITE, pack))
        payloads.append(c.encode(message))
    return topics, payloads


def _spoil(payload: bytes, how: int) -> bytes:
    data = json.loads(payload)
    spoilers: list[Callable[[], bytes]] = [
        # Break the bulk read: bisection, then the reference for the one message.
        lambda: json.dumps({**data, "voltage_v": "371.4"}).encode(),
        lambda: payload[: len(payload) // 2],
        lambda: payload.replace(b'"seq":', b'"seq":NaN,"x":', 1),
        lambda: json.dumps({**data, "seq": 1.5}).encode(),
        # Found row by row by the bulk checks.
        lambda: json.dumps({**data, "soc_bms": 1.7}).encode(),
        lambda: json.dumps({k: v for k, v in data.items() if k != "current_a"}).encode(),
        lambda: json.dumps({**data, "pack": "P0000,chem=lfp"}).encode(),
        lambda: json.dumps({**data, "schema": "pack_telemetry/2"}).encode(),
    ]
    return spoilers[how % len(spoilers)]()


def _best(func: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - started)
    return best


def _reference_batch(topics: list[str], payloads: list[bytes]) -> pl.DataFrame:
    """Decode message by message with the reference, into the same frame as the bulk path."""
    rows = []
    for i, (topic, payload) in enumerate(zip(topics, payloads, strict=True)):
        try:
            parsed = c.parse_topic(topic)
            message = c.decode(payload, c.model_for_topic(parsed.kind))
        except ContractError:
            continue
        row = message.model_dump(mode="json", by_alias=True)
        del row["schema"]
        if parsed.site == SITE and row["pack"] == parsed.pack:
            rows.append({"msg": i, **row})
    return pl.DataFrame(rows, schema=output_schema(c.PackTelemetry))


def main() -> dict[str, float | int | str]:
    """Measure and print the table; return its figures."""
    rng = random.Random(20260101)
    topics, payloads = _valid_batch(rng)
    bad_at = sorted(rng.sample(range(N), N // 100))
    spoiled = list(payloads)
    for k, i in enumerate(bad_at):
        spoiled[i] = _spoil(payloads[i], k)

    # Warm up (first-call costs: regex compilation, the cached check plan, thread pools).
    decode_batch(topics, payloads, site=SITE)
    assert decode_batch(topics, spoiled, site=SITE).rejected() == len(bad_at)

    bulk_s = _best(lambda: decode_batch(topics, payloads, site=SITE), 15)
    bad_s = _best(lambda: decode_batch(topics, spoiled, site=SITE), 15)
    loop_s = _best(lambda: [c.decode(p, c.PackTelemetry) for p in payloads], 5)
    reference_s = _best(lambda: _reference_batch(topics, payloads), 5)

    figures: dict[str, float | int | str] = {
        "messages per batch": N,
        "mean payload bytes": round(sum(map(len, payloads)) / N),
        "bulk ms": round(bulk_s * 1e3, 2),
        "bulk msg/s": round(N / bulk_s),
        "1% bad ms": round(bad_s * 1e3, 2),
        "1% bad msg/s": round(N / bad_s),
        "contract.decode loop ms": round(loop_s * 1e3, 2),
        "contract.decode loop msg/s": round(N / loop_s),
        "reference + frame ms": round(reference_s * 1e3, 2),
        "reference + frame msg/s": round(N / reference_s),
        "bulk / decode loop": round(loop_s / bulk_s, 2),
        "1% bad / decode loop": round(loop_s / bad_s, 2),
        "bulk / reference + frame": round(reference_s / bulk_s, 2),
    }
    width = max(map(len, figures))
    print(f"decode_speed: {N} pack_telemetry messages, best of several runs")
    for key, value in figures.items():
        text = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"  {key:<{width}}  {text:>12}")
    return figures


if __name__ == "__main__":
    main()
