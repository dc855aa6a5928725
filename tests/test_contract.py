"""The MQTT contract: models, JSON Schemas, polars schemas, topics, and what is refused."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from twin import contract as c
from twin.cli import app
from twin.errors import PayloadError, TopicError

SCHEMA_DIR = Path(c.__file__).parent / "schemas"
TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

SAMPLES: dict[str, c.Message] = {
    "pack_meta": c.PackMeta(
        pack="P0001",
        ts_ms=TS,
        chemistry="lmo",
        life="second_life",
        oem="Nissan",
        rated_capacity_ah=66.2,
        rated_energy_kwh=24.0,
        series_cells=96,
        parallel_cells=2,
        voltage_min_v=288.0,
        voltage_max_v=403.2,
        current_max_discharge_a=132.0,
        current_max_charge_a=66.0,
        commissioned_ms=TS - 86_400_000,
        intake_soh=0.64,
        first_life=c.FirstLifeSummary(vehicle="Nissan Leaf 2013", years_in_service=10.0, retirement_soh=0.65),
    ),
    "pack_telemetry": c.PackTelemetry(
        pack="P0001",
        ts_ms=TS,
        seq=7,
        voltage_v=371.4,
        current_a=-12.5,
        temp_min_c=24.0,
        temp_max_c=27.5,
        temp_avg_c=25.1,
        cell_v_min_v=3.861,
        cell_v_max_v=3.874,
        cell_v_min_idx=41,
        cell_v_max_idx=3,
        soc_bms=0.62,
        soh_bms=1.0,
        contactor_closed=True,
        fault_bits=0,
    ),
    "pack_cells": c.PackCells(pack="P0001", ts_ms=TS, seq=3, cell_voltages_v=[3.86, 3.87, 3.865], temps_c=[25.0, 26.0]),
    "pack_status": c.PackStatus(pack="P0001", state="offline"),
    "site_telemetry": c.SiteTelemetry(
        site="nevada", ts_ms=TS, seq=1, load_w=9.5e6, solar_w=4.0e6, grid_w=0.0, battery_w=5.5e6, ambient_c=31.0
    ),
    "twin_state": c.TwinState(
        site="nevada",
        ts_ms=TS,
        packs_total=805,
        packs_online=800,
        packs_offline=3,
        packs_excluded=2,
        soc=0.55,
        soc_p5=0.53,
        soc_p95=0.57,
        energy_to_floor_kwh=28_000.0,
        runtime_s_p50=10_800.0,
        quality=["stale_packs"],
    ),
    "twin_pack_state": c.TwinPackState(
        pack="P0001",
        ts_ms=TS,
        online=True,
        available=True,
        soc=0.61,
        soc_std=0.01,
        soc_bms=0.62,
        soh=0.64,
        soh_bms=1.0,
        knee=True,
        knee_onset_ms=TS - 3_600_000,
        quality=[],
    ),
    "alert": c.Alert(
        site="nevada",
        ts_ms=TS,
        alert_id="P0001-cell_imbalance",
        kind="cell_imbalance",
        severity="warning",
        state="raised",
        pack="P0001",
        cell=41,
        value=0.082,
        threshold=0.05,
        message="cell 41 of P0001 is 82 mV below the pack's mean",
    ),
    "twin_status": c.TwinStatus(state="online", ts_ms=TS, version="0.1.0"),
    "deadletter": c.DeadLetter(
        topic="microgrid/nevada/packs/P0001/telemetry", reason="not_json", detail="Expecting value", payload_excerpt="{"
    ),
}


def test_samples_cover_every_model() -> None:
    assert set(SAMPLES) == set(c.MESSAGE_MODELS)
    assert {type(m) for m in SAMPLES.values()} == set(c.MESSAGE_MODELS.values())


@pytest.mark.parametrize("name", sorted(c.MESSAGE_MODELS))
def test_round_trip_json_schema_and_polars(name: str) -> None:
    message = SAMPLES[name]
    model = type(message)
    payload = c.encode(message)
    data = json.loads(payload)
    assert data["schema"] == f"{name}/{c.CONTRACT_VERSION}"

    shipped = json.loads((SCHEMA_DIR / f"{name}.v{c.CONTRACT_VERSION}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(shipped)
    jsonschema.validate(data, shipped, cls=jsonschema.Draft202012Validator)

    assert c.decode(payload) == message
    assert c.decode(payload, model) == message

    # The polars schema, derived from the model, reads a batch of such payloads.
    schema = c.polars_schema(model)
    batch = pl.read_ndjson(io.BytesIO(b"\n".join([payload] * 5)), schema=schema)
    assert batch.schema == schema
    assert batch.height == 5
    # Every column, absent optional fields included (as nulls), equals the model's own dump.
    assert batch.row(0, named=True) == message.model_dump(mode="json", by_alias=True)


def test_shipped_schemas_are_fresh() -> None:
    result = CliRunner().invoke(app, ["contract", "schemas", "--check", "--out", str(SCHEMA_DIR)])
    assert result.exit_code == 0, result.output


def test_stale_schema_is_detected(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["contract", "schemas", "--out", str(tmp_path)]).exit_code == 0
    target = tmp_path / "pack_telemetry.v1.json"
    target.write_text(target.read_text().replace("voltage_v", "volts"))
    result = runner.invoke(app, ["contract", "schemas", "--check", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "pack_telemetry.v1.json" in result.output


def test_current_sign_is_written_down_once() -> None:
    assert c.CURRENT_SIGN == "positive on discharge"
    described = c.PackTelemetry.model_json_schema()["properties"]["current_a"]["description"]
    assert "positive on discharge" in described


def _telemetry(**changes: Any) -> bytes:
    data = json.loads(c.encode(SAMPLES["pack_telemetry"]))
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data).encode()


_DROP = object()


@pytest.mark.parametrize(
    ("payload", "reason", "mentions"),
    [
        (_telemetry(pack="P 1"), "bad_identifier", "pack"),
        (_telemetry(pack="x" * 65), "bad_identifier", "pack"),
        (_telemetry(pack="P1,chem=lfp"), "bad_identifier", "pack"),
        (_telemetry(voltage_v="371.4"), "wrong_type", "voltage_v"),
        (_telemetry(seq=1.5), "wrong_type", "seq"),
        (_telemetry(contactor_closed="yes"), "wrong_type", "contactor_closed"),
        (_telemetry(current_a=_DROP), "missing_field", "current_a"),
        (_telemetry(extra_field=1), "extra_field", "extra_field"),
        (_telemetry(soc_bms=1.7), "out_of_range", "soc_bms"),
        (_telemetry(ts_ms=1_767_225_600), "out_of_range", "ts_ms"),  # seconds, not ms
        (_telemetry(ts_ms=1_767_225_600_000_000_000), "out_of_range", "ts_ms"),  # ns
        (_telemetry(schema="pack_telemetry/2"), "wrong_version", "version"),
        (_telemetry(schema="battery/1"), "unknown_schema", "battery"),
        (b'{"schema":"pack_telemetry/1","voltage_v":NaN}', "not_finite", "NaN"),
        (b'{"schema":"pack_telemetry/1","voltage_v":Infinity}', "not_finite", "Infinity"),
        (b'{"schema":"pack_telemetry/1","voltage_v":-Infinity}', "not_finite", "Infinity"),
        (_telemetry(voltage_v=123456.0).replace(b"123456.0", b"1e999"), "not_finite", "voltage_v"),  # parses to inf
        (b"{not json", "not_json", "not JSON"),
        (b"", "not_json", "not JSON"),
        (b"\xff\xfe\x00binary", "not_json", "not JSON"),
        (b"[1, 2]", "not_object", "list"),
        (b'{"pack": "P1"}', "unknown_schema", "schema"),
        (b"{" + b'"a":1,' * 20_000 + b"}", "oversize", "exceeds"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload: bytes, reason: str, mentions: str) -> None:
    with pytest.raises(PayloadError) as info:
        c.decode(payload)
    assert info.value.reason == reason
    assert mentions in str(info.value)


def test_schema_must_match_the_topic() -> None:
    with pytest.raises(PayloadError) as info:
        c.decode(c.encode(SAMPLES["pack_status"]), c.PackTelemetry)
    assert info.value.reason == "schema_mismatch"


def test_messages_are_frozen() -> None:
    message = SAMPLES["pack_telemetry"]
    with pytest.raises(ValueError, match="frozen"):
        message.voltage_v = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- topics


def test_topic_builders() -> None:
    assert c.topic(c.TopicKind.PACK_META, "nevada", "P1") == "microgrid/nevada/packs/P1/meta"
    assert c.topic(c.TopicKind.SITE_TELEMETRY, "nevada") == "microgrid/nevada/site/telemetry"
    assert c.topic(c.TopicKind.TWIN_PACK, "nevada", "P1") == "microgrid/nevada/twin/packs/P1"
    assert c.subscription(c.TopicKind.PACK_TELEMETRY, "nevada") == "microgrid/nevada/packs/+/telemetry"
    with pytest.raises(TopicError):
        c.topic(c.TopicKind.PACK_META, "nevada")
    with pytest.raises(TopicError):
        c.topic(c.TopicKind.TWIN_STATE, "nevada", "P1")
    for bad in ["+", "#", "a/b", "a b", "", "ü", "x" * 65]:
        with pytest.raises(TopicError) as info:
            c.topic(c.TopicKind.PACK_TELEMETRY, "nevada", bad)
        assert info.value.reason == "bad_identifier"


@pytest.mark.parametrize(
    "bad",
    [
        "microgrid/nevada/packs/P1/telemetry/extra",
        "microgrid/nevada/packs/+/telemetry",
        "microgrid/nevada/packs/#",
        "microgrid/ne vada/site/telemetry",
        "other/nevada/site/telemetry",
        "microgrid/nevada",
        "microgrid/nevada/packs//telemetry",
        "microgrid/nevada/" + "a/" * 500,
    ],
)
def test_bad_topics_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        c.parse_topic(bad)


identifiers = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")


@given(kind=st.sampled_from(list(c.TopicKind)), site=identifiers, pack=identifiers)
def test_topic_round_trip(kind: c.TopicKind, site: str, pack: str) -> None:
    built = c.topic(kind, site, pack if "{pack}" in kind.value else None)
    parsed = c.parse_topic(built)
    assert parsed.site == site
    assert parsed.kind is kind
    assert parsed.pack == (pack if "{pack}" in kind.value else None)


@given(st.text(max_size=200))
def test_parse_topic_never_crashes(value: str) -> None:
    try:
        parsed = c.parse_topic(value)
    except TopicError:
        return
    assert c.is_identifier(parsed.site)
    assert parsed.pack is None or c.is_identifier(parsed.pack)


@given(st.binary(max_size=300))
def test_decode_never_crashes_on_garbage(payload: bytes) -> None:
    try:
        c.decode(payload)
    except PayloadError as exc:
        assert exc.reason


def test_every_model_topic_pairs_up() -> None:
    for kind in c.TopicKind:
        if kind.name.startswith("TRUTH"):
            with pytest.raises(TopicError):
                c.model_for_topic(kind)
        else:
            assert c.model_for_topic(kind) in c.MESSAGE_MODELS.values()


def test_a_trailing_newline_is_not_part_of_a_valid_topic() -> None:
    with pytest.raises(TopicError):
        c.parse_topic("microgrid/nevada/packs/P1/telemetry\n")


def test_deeply_nested_json_is_refused_not_a_crash() -> None:
    with pytest.raises(PayloadError) as info:
        c.decode(b"[" * 5000 + b"]" * 5000)
    assert info.value.reason == "not_json"


@pytest.mark.parametrize("name", sorted(c.MESSAGE_MODELS))
def test_encode_frame_matches_encode(name: str) -> None:
    message = SAMPLES[name]
    model = type(message)
    frame = pl.DataFrame([message.model_dump(mode="json", by_alias=True)], schema=c.polars_schema(model))
    assert c.encode_frame(frame.drop("schema"), model) == [c.encode(message)]
