"""The state mirror (pure): duplicates, late and skewed samples, staleness, the cap, site aggregates."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tests.test_contract import SAMPLES
from twin import contract as c
from twin.pipeline import decode_batch
from twin.state import CoreOptions, TwinCore

SITE = "demo"
T0 = 1_767_225_600_000


def telemetry(pack: str, seq: int, ts_ms: int, **changes: object) -> tuple[str, bytes]:
    data = json.loads(c.encode(SAMPLES["pack_telemetry"]))
    data.update({"pack": pack, "seq": seq, "ts_ms": ts_ms, **changes})
    return c.topic(c.TopicKind.PACK_TELEMETRY, SITE, pack), json.dumps(data).encode()


def meta(pack: str, **changes: object) -> tuple[str, bytes]:
    data = json.loads(c.encode(SAMPLES["pack_meta"]))
    data.update({"pack": pack, **changes})
    return c.topic(c.TopicKind.PACK_META, SITE, pack), json.dumps(data).encode()


def status(pack: str, state: str) -> tuple[str, bytes]:
    return c.topic(c.TopicKind.PACK_STATUS, SITE, pack), c.encode(c.PackStatus(pack=pack, state=state))  # type: ignore[arg-type]


def feed(core: TwinCore, messages: list[tuple[str, bytes]], now_ms: int):  # type: ignore[no-untyped-def]
    decoded = decode_batch([t for t, _ in messages], [p for _, p in messages], site=SITE)
    assert decoded.rejected() == 0, decoded.rejects
    return core.ingest(decoded, now_ms=now_ms)


@pytest.fixture
def core() -> TwinCore:
    return TwinCore(CoreOptions(site=SITE, stale_after_s=30, late_window_s=10, max_clock_skew_s=60, max_packs=3))


def test_latest_values_and_duplicates(core: TwinCore) -> None:
    result = feed(core, [telemetry("P1", 0, T0, voltage_v=300.0), telemetry("P1", 1, T0 + 1000, voltage_v=301.0)], T0)
    assert result.telemetry.height == 2
    again = feed(
        core, [telemetry("P1", 1, T0 + 1000, voltage_v=999.0), telemetry("P1", 2, T0 + 2000, voltage_v=302.0)], T0
    )
    assert again.duplicates == 1
    assert again.telemetry["seq"].to_list() == [2]
    assert core.packs.values["voltage_v"][core.packs.index["P1"]] == 302.0
    assert core.counters["duplicate"] == 1


def test_the_meta_temperature_limit_does_not_overwrite_the_measured_temperature(core: TwinCore) -> None:
    feed(core, [telemetry("P1", 0, T0, temp_max_c=26.0)], T0)
    feed(core, [meta("P1", temp_max_c=55.0), meta("P2", temp_max_c=55.0)], T0)
    n = len(core.packs.ids)
    assert n == 2
    assert all(values.size == n for values in core.packs.values.values())
    assert core.packs.values["temp_max_c"][core.packs.index["P1"]] == 26.0
    assert core.packs.values["temp_limit_c"][core.packs.index["P1"]] == 55.0


def test_out_of_order_within_a_batch_keeps_the_newest(core: TwinCore) -> None:
    feed(core, [telemetry("P1", 5, T0 + 5000, voltage_v=305.0), telemetry("P1", 4, T0 + 4000, voltage_v=304.0)], T0)
    assert core.packs.values["voltage_v"][0] == 305.0
    assert core.packs.last_seq[0] == 5


def test_late_samples_are_counted_and_do_not_move_the_mirror_back(core: TwinCore) -> None:
    feed(core, [telemetry("P1", 100, T0 + 100_000, voltage_v=310.0)], T0 + 100_000)
    late = feed(core, [telemetry("P1", 50, T0 + 50_000, voltage_v=250.0)], T0 + 100_000)
    assert late.late == 1
    assert late.telemetry.height == 1  # it still reaches InfluxDB, at its own event time
    assert core.packs.values["voltage_v"][0] == 310.0


def test_clock_skew_is_refused(core: TwinCore) -> None:
    result = core.ingest(
        decode_batch(*zip(*[telemetry("P1", 0, T0 + 3_600_000)], strict=True), site=SITE),
        now_ms=T0,  # type: ignore[call-arg]
    )
    assert result.telemetry.height == 0
    assert result.rejects["reason"].to_list() == ["clock_skew"]


def test_cardinality_cap_refuses_new_packs_beyond_it(core: TwinCore) -> None:
    msgs = [telemetry(f"P{i}", 0, T0) for i in range(5)]
    decoded = decode_batch([t for t, _ in msgs], [p for _, p in msgs], site=SITE)
    result = core.ingest(decoded, now_ms=T0)
    assert len(core.packs.ids) == 3
    assert result.rejects["reason"].to_list() == ["cardinality_cap"] * 2
    assert core.counters["cardinality_cap"] == 2


def test_staleness_status_and_availability(core: TwinCore) -> None:
    feed(core, [meta("P1"), meta("P2"), telemetry("P1", 0, T0), telemetry("P2", 0, T0)], T0)
    assert core.online(T0 + 1000).tolist() == [True, True]
    assert core.online(T0 + 31_000).tolist() == [False, False]  # stale
    feed(core, [status("P2", "offline"), telemetry("P1", 1, T0 + 40_000), telemetry("P2", 1, T0 + 40_000)], T0 + 40_000)
    assert core.online(T0 + 40_000).tolist() == [True, False]  # the gateway's status says offline
    feed(core, [telemetry("P1", 2, T0 + 41_000, contactor_closed=False)], T0 + 41_000)
    assert core.available(T0 + 41_000).tolist() == [False, False]


def test_site_aggregates_the_estimates_of_available_packs_and_leaves_out_the_rest(core: TwinCore) -> None:
    """Site energy is the sum over available packs; an offline pack counts for nothing; the BMS's SoC is not used."""
    feed(
        core,
        [
            meta("P1", rated_capacity_ah=100.0, rated_energy_kwh=36.0),
            meta("P2", rated_capacity_ah=50.0, rated_energy_kwh=18.0),
            meta("P3", rated_capacity_ah=100.0, rated_energy_kwh=36.0),
            telemetry("P1", 0, T0, soc_bms=0.8, soh_bms=1.0),
            telemetry("P2", 0, T0, soc_bms=0.2, soh_bms=0.5),
            telemetry("P3", 0, T0 - 120_000, soc_bms=1.0, soh_bms=1.0),
        ],
        T0,
    )
    site = core.site_frame(T0).row(0, named=True)
    assert site["packs_total"] == 3
    assert site["packs_online"] == 2
    assert site["packs_offline"] == 1
    packs = core.pack_frame(T0)
    assert packs["online"].to_list() == [True, True, False]
    assert packs["soc"].null_count() == 0
    assert packs["soc_bms"].to_list() == [0.8, 0.2, 1.0]  # reported beside the estimate, unchanged
    energy = packs["energy_to_floor_kwh"].to_numpy()
    assert np.all(energy[:2] > 0)
    assert np.isnan(energy[2])  # offline: it cannot deliver, so no energy is counted for it
    assert site["energy_to_floor_kwh"] == pytest.approx(energy[0] + energy[1], rel=1e-9)  # P3 offline: left out
    assert site["energy_to_floor_kwh_p5"] <= site["energy_to_floor_kwh"] <= site["energy_to_floor_kwh_p95"]
    lo, hi = sorted(packs["soc"].to_list()[:2])
    assert lo <= site["soc"] <= hi  # a weighted mean of the available packs' SoC
    # The cheap signature the service checks after every batch agrees with the full frame.
    assert core.site_signature(T0) == (site["packs_online"], site["packs_excluded"], site["soc"])
    # Feeding the BMS a different SoC changes nothing in the estimates.
    other = TwinCore(core.options)
    feed(
        other,
        [
            meta("P1", rated_capacity_ah=100.0, rated_energy_kwh=36.0),
            meta("P2", rated_capacity_ah=50.0, rated_energy_kwh=18.0),
            meta("P3", rated_capacity_ah=100.0, rated_energy_kwh=36.0),
            telemetry("P1", 0, T0, soc_bms=0.1, soh_bms=0.7),
            telemetry("P2", 0, T0, soc_bms=0.9, soh_bms=0.9),
            telemetry("P3", 0, T0 - 120_000, soc_bms=0.0, soh_bms=1.0),
        ],
        T0,
    )
    assert other.site_frame(T0)["energy_to_floor_kwh"].item() == site["energy_to_floor_kwh"]


def test_empty_batch_changes_nothing(core: TwinCore) -> None:
    result = core.ingest(decode_batch([], [], site=SITE), now_ms=T0)
    assert result.telemetry.height == 0
    assert core.site_frame(T0)["packs_total"].item() == 0


def test_site_frame_has_declared_types_when_nothing_is_known(core: TwinCore) -> None:
    feed(core, [telemetry("P1", 0, T0)], T0)  # no meta yet: no capacity, so no SoC or energy
    frame = core.site_frame(T0)
    assert frame["soc"].dtype == frame["energy_to_floor_kwh"].dtype == frame["load_w"].dtype == pl.Float64
    assert frame["soc"].item() is None
