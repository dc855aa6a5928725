"""The declared InfluxDB points: render() against the reference encoder, and a real InfluxDB round trip."""

from __future__ import annotations

import math
import random
import typing
from datetime import UTC, datetime
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.servers import Influxd
from twin import contract
from twin.points import (
    MEASUREMENTS,
    Kind,
    MeasurementSpec,
    PointDescription,
    Rendered,
    escape_key,
    escape_measurement,
    field_keys,
    reference_line,
    render,
)

TS0 = 1_700_000_000_000

SPEC = MeasurementSpec(
    "lp_test",
    tags=("pack", "site", "alpha"),
    fields=(
        PointDescription("voltage_v", unit="V"),
        PointDescription("seq", dtype=int, kind=Kind.COUNTER),
        PointDescription("closed", dtype=bool),
        PointDescription("note", dtype=str),
        PointDescription("current_a", unit="A"),
    ),
)
SCHEMA = pl.Schema(
    {
        "pack": pl.String(),
        "site": pl.String(),
        "alpha": pl.String(),
        "voltage_v": pl.Float64(),
        "seq": pl.Int64(),
        "closed": pl.Boolean(),
        "note": pl.String(),
        "current_a": pl.Float64(),
        "ts_ms": pl.Int64(),
    }
)
TAGS = SPEC.tags
FIELDS = ("voltage_v", "seq", "closed", "note", "current_a")

# Characters that line protocol treats specially, and some that merely look dangerous.
SPECIAL = [" ", ",", "=", '"', "\\", "\n", "\r", "\t", "#", "'", "é", "✓", "𝄞", "\x00"]


def expected(rows: list[dict[str, Any]], measurement: str = "lp_test") -> Rendered:
    """Encode rows one by one with the reference encoder and count what it leaves out."""
    lines = [reference_line(measurement, {k: r[k] for k in TAGS}, {k: r[k] for k in FIELDS}, r["ts_ms"]) for r in rows]
    body = "".join(line + "\n" for line in lines if line).encode()
    dropped_fields = sum(
        1 for r in rows for k in ("voltage_v", "current_a") if r[k] is not None and not math.isfinite(r[k])
    )
    written = sum(1 for line in lines if line)
    return Rendered(body=body, lines=written, dropped_rows=len(rows) - written, dropped_fields=dropped_fields)


# --------------------------------------------------------------------------- property-based

text_values = st.text(st.one_of(st.sampled_from(SPECIAL), st.characters(codec="utf-8")), max_size=10)
tag_values = st.one_of(st.none(), text_values)
float_values = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-3, max_value=1e-3),
    st.sampled_from([0.0, -0.0, 1e-5, -1e-5, 1.5e-7, 1e16, 1e22, 5e-324]),
)
rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "pack": tag_values,
            "site": tag_values,
            "alpha": tag_values,
            "voltage_v": float_values,
            "seq": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
            "closed": st.one_of(st.none(), st.booleans()),
            "note": st.one_of(st.none(), text_values),
            "current_a": float_values,
            "ts_ms": st.integers(0, 4_102_444_800_000),
        }
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(rows_strategy)
def test_render_matches_reference_on_random_rows(rows: list[dict[str, Any]]) -> None:
    frame = pl.DataFrame(rows, schema=SCHEMA)
    out = render(frame, SPEC)
    assert out == expected(rows)
    # B3: one line per point, whatever the tag and string values hold.
    assert out.body.count(b"\n") == out.lines


def random_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Random rows with escapes, nulls, NaN, infinities and floats of every magnitude."""
    rng = random.Random(seed)

    def text() -> str | None:
        if rng.random() < 0.1:
            return None
        pool = [*SPECIAL, "a", "b", "P", "0", "_", "-"]
        return "".join(rng.choice(pool) for _ in range(rng.randint(0, 8)))

    def number() -> float | None:
        roll = rng.random()
        if roll < 0.05:
            return None
        if roll < 0.08:
            return rng.choice([math.nan, math.inf, -math.inf])
        return rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 25)

    return [
        {
            "pack": text(),
            "site": rng.choice(["nevada", "a b", "x,y=z", None, "c\\d", "é"]),
            "alpha": text(),
            "voltage_v": number(),
            "seq": None if rng.random() < 0.05 else rng.randint(-(2**63), 2**63 - 1),
            "closed": rng.choice([True, False, None]),
            "note": text(),
            "current_a": number(),
            "ts_ms": TS0 + i,
        }
        for i in range(n)
    ]


def test_render_is_byte_identical_to_reference_on_10k_rows() -> None:
    """L2: the vectorised path and the reference agree byte for byte, escapes included."""
    rows = random_rows(10_000, seed=20_260_101)
    out = render(pl.DataFrame(rows, schema=SCHEMA), SPEC)
    want = expected(rows)
    assert out.body == want.body
    assert out == want
    assert out.lines > 9_000


# --------------------------------------------------------------------------- examples


def frame_of(**columns: Any) -> pl.DataFrame:
    n = len(next(iter(columns.values())))
    base: dict[str, Any] = {name: [None] * n for name in SCHEMA}
    base["ts_ms"] = [TS0 + i for i in range(n)]
    base.update(columns)
    return pl.DataFrame(base, schema=SCHEMA)


def test_null_fields_are_omitted_not_zero() -> None:
    out = render(frame_of(pack=["P1", "P2"], voltage_v=[3.5, None], current_a=[None, -2.0]), SPEC)
    assert out.body == (f"lp_test,pack=P1 voltage_v=3.5 {TS0}\nlp_test,pack=P2 current_a=-2.0 {TS0 + 1}\n".encode())
    assert (out.lines, out.dropped_rows, out.dropped_fields) == (2, 0, 0)


def test_nan_and_infinities_are_dropped_and_counted() -> None:
    out = render(
        frame_of(pack=["P1", "P2", "P3"], voltage_v=[math.nan, math.inf, 1.25], current_a=[2.0, -math.inf, None]),
        SPEC,
    )
    assert out.body == f"lp_test,pack=P1 current_a=2.0 {TS0}\nlp_test,pack=P3 voltage_v=1.25 {TS0 + 2}\n".encode()
    assert (out.lines, out.dropped_rows, out.dropped_fields) == (2, 1, 3)


def test_integers_booleans_strings_and_floats_are_typed_right() -> None:
    out = render(
        frame_of(
            pack=["P1"],
            voltage_v=[1e-5],
            seq=[-(2**63)],
            closed=[False],
            note=['say "hi"\\\nbye'],
            current_a=[3.0],
        ),
        SPEC,
    )
    assert out.body == (
        b"lp_test,pack=P1 voltage_v=1e-05,seq=-9223372036854775808i,closed=false,"
        b'note="say \\"hi\\"\\\\\\nbye",current_a=3.0 ' + str(TS0).encode() + b"\n"
    )


def test_integer_and_boolean_fields_accept_other_column_types() -> None:
    spec = MeasurementSpec(
        "conv",
        tags=(),
        fields=(
            PointDescription("small", dtype=int),
            PointDescription("big", dtype=int),
            PointDescription("from_float", dtype=int),
            PointDescription("flag", dtype=bool),
            PointDescription("ratio"),
        ),
    )
    frame = pl.DataFrame(
        {
            "small": pl.Series([7, 8], dtype=pl.UInt8),
            "big": pl.Series([2**64 - 1, 5], dtype=pl.UInt64),
            "from_float": [2.5, math.nan],
            "flag": pl.Series([1, 0], dtype=pl.Int32),
            "ratio": pl.Series([1, 2], dtype=pl.Int16),
            "ts_ms": [1, 2],
        }
    )
    out = render(frame, spec)
    assert (
        out.body == b"conv small=7i,from_float=2i,flag=true,ratio=1.0 1\nconv small=8i,big=5i,flag=false,ratio=2.0 2\n"
    )
    assert out.dropped_fields == 2  # 2**64-1 does not fit int64; NaN is no integer


def test_tag_values_are_escaped_and_never_break_the_line() -> None:
    out = render(frame_of(pack=["a b,c=d", 'q"\\x', "line\nbreak\r", "#hash"], voltage_v=[1.0] * 4), SPEC)
    assert out.body.splitlines() == [
        f"lp_test,pack=a\\ b\\,c\\=d voltage_v=1.0 {TS0}".encode(),
        f'lp_test,pack=q"\\x voltage_v=1.0 {TS0 + 1}'.encode(),
        f"lp_test,pack=line\\nbreak\\r voltage_v=1.0 {TS0 + 2}".encode(),
        f"lp_test,pack=#hash voltage_v=1.0 {TS0 + 3}".encode(),
    ]
    assert out.body.count(b"\n") == out.lines == 4


def test_null_and_empty_tags_are_omitted_and_trailing_backslash_drops_the_row() -> None:
    out = render(frame_of(pack=[None, "", "bad\\", "ok"], alpha=["x", None, "y", "z"], voltage_v=[1.0] * 4), SPEC)
    assert (
        out.body
        == (
            f"lp_test,alpha=x voltage_v=1.0 {TS0}\nlp_test voltage_v=1.0 {TS0 + 1}\n"
            f"lp_test,alpha=z,pack=ok voltage_v=1.0 {TS0 + 3}\n"
        ).encode()
    )
    assert (out.lines, out.dropped_rows) == (3, 1)


def test_rows_without_timestamp_or_fields_are_dropped_and_counted() -> None:
    frame = frame_of(pack=["P1", "P2", "P3"], voltage_v=[1.0, None, 2.0]).with_columns(
        ts_ms=pl.Series([None, TS0, TS0 + 1], dtype=pl.Int64)
    )
    out = render(frame, SPEC)
    assert out.body == f"lp_test,pack=P3 voltage_v=2.0 {TS0 + 1}\n".encode()
    assert (out.lines, out.dropped_rows, out.dropped_fields) == (1, 2, 0)


def test_extra_tags_are_constant_sorted_and_checked() -> None:
    frame = frame_of(pack=["P1"], voltage_v=[1.0]).drop("site")
    out = render(frame, SPEC, extra_tags={"site": "ne vada"})
    assert out.body == f"lp_test,pack=P1,site=ne\\ vada voltage_v=1.0 {TS0}\n".encode()
    with pytest.raises(ValueError, match="not declared"):
        render(frame, SPEC, extra_tags={"site": "x", "zone": "y"})
    with pytest.raises(ValueError, match="both a column"):
        render(frame_of(pack=["P1"], voltage_v=[1.0]), SPEC, extra_tags={"site": "x"})
    with pytest.raises(ValueError, match="neither a column"):
        render(frame, SPEC)
    with pytest.raises(ValueError, match="cannot be written"):
        render(frame, SPEC, extra_tags={"site": "x\\"})


def test_missing_columns_and_wrong_types_raise() -> None:
    with pytest.raises(ValueError, match="no column"):
        render(frame_of(pack=["P1"], voltage_v=[1.0]).drop("note"), SPEC)
    with pytest.raises(TypeError, match="cannot be written as float"):
        render(frame_of(pack=["P1"]).with_columns(voltage_v=pl.lit("3.7")), SPEC)


def test_datetime_time_column_and_empty_frame() -> None:
    frame = frame_of(pack=["P1"], voltage_v=[1.0]).with_columns(
        ts_ms=pl.Series([datetime.fromtimestamp(TS0 / 1000, tz=UTC)])
    )
    assert render(frame, SPEC).body == f"lp_test,pack=P1 voltage_v=1.0 {TS0}\n".encode()
    assert render(frame.clear(), SPEC) == Rendered(b"", 0, 0, 0)


def test_keys_and_measurement_names_are_escaped() -> None:
    assert escape_key("a b,c=d") == "a\\ b\\,c\\=d"
    assert escape_measurement("m 1,x=y") == "m\\ 1\\,x=y"
    for bad in ("", "time", "x\\", "a\nb"):
        with pytest.raises(ValueError, match="cannot be written"):
            escape_key(bad)
    assert reference_line("m x", {"t k": "v"}, {"f,k": 1}, 5) == "m\\ x,t\\ k=v f\\,k=1i 5"


def test_specs_validate_their_names() -> None:
    with pytest.raises(ValueError, match="field key"):
        PointDescription("bad key")
    with pytest.raises(ValueError, match="field key"):
        PointDescription("time")
    with pytest.raises(ValueError, match="placeholder"):
        PointDescription("cell_v", per_element=True)
    with pytest.raises(ValueError, match="both tag and field"):
        MeasurementSpec("m", tags=("pack",), fields=(PointDescription("pack"),))
    with pytest.raises(ValueError, match="duplicate tag"):
        MeasurementSpec("m", tags=("a", "a"), fields=())


# --------------------------------------------------------------------------- the registry


def contract_fields(model: type[contract.Message], *, numeric_only: bool = True) -> set[str]:
    """The fields of a contract model that hold numbers or booleans."""
    out = set()
    for name, info in model.model_fields.items():
        dtype = contract.polars_schema(model)[info.alias or name]
        if dtype.is_numeric() or dtype == pl.Boolean or not numeric_only:
            out.add(info.alias or name)
    return out - {"ts_ms"}


def test_registry_covers_the_contract() -> None:
    assert set(MEASUREMENTS) == {"pack_telemetry", "pack_cells", "site_state", "pack_state", "alerts", "twin_health"}
    assert set(field_keys(MEASUREMENTS["pack_telemetry"])) == contract_fields(contract.PackTelemetry)
    assert set(field_keys(MEASUREMENTS["pack_state"])) == contract_fields(contract.TwinPackState)
    site = contract_fields(contract.TwinState) | (contract_fields(contract.SiteTelemetry) - {"seq"})
    assert set(field_keys(MEASUREMENTS["site_state"])) == site
    alert = contract_fields(contract.Alert, numeric_only=False) - {"schema", "site", "kind", "severity", "pack"}
    assert set(field_keys(MEASUREMENTS["alerts"])) == alert
    assert MEASUREMENTS["pack_telemetry"].tags == ("site", "pack", "chemistry", "life")
    kinds = {d.field: d for d in MEASUREMENTS["pack_telemetry"].fields}
    assert (kinds["seq"].dtype, kinds["contactor_closed"].dtype, kinds["fault_bits"].dtype) == (int, bool, int)
    for name in ("pack_telemetry", "pack_cells", "site_state", "pack_state"):
        assert all(d.unit for d in MEASUREMENTS[name].fields if d.dtype is float), name


def contract_frame(model: type[contract.Message], rows: list[dict[str, Any]]) -> pl.DataFrame:
    messages = [model.model_validate(r).model_dump(by_alias=True) for r in rows]
    return pl.DataFrame(messages, schema=contract.polars_schema(model))


def test_pack_telemetry_renders_from_a_contract_frame() -> None:
    row = {
        "pack": "P001",
        "ts_ms": TS0,
        "seq": 7,
        "voltage_v": 350.5,
        "current_a": -12.25,
        "temp_min_c": 20.0,
        "temp_max_c": 25.5,
        "temp_avg_c": 22.0,
        "cell_v_min_v": 3.6,
        "cell_v_max_v": 3.7,
        "cell_v_min_idx": 3,
        "cell_v_max_idx": 90,
        "soc_bms": 0.5,
        "soh_bms": 0.9,
        "contactor_closed": True,
        "fault_bits": 5,
    }
    frame = contract_frame(contract.PackTelemetry, [row]).with_columns(
        chemistry=pl.lit("nmc811"), life=pl.lit("second_life")
    )
    out = render(frame, MEASUREMENTS["pack_telemetry"], extra_tags={"site": "nevada"})
    assert out.body == (
        b"pack_telemetry,chemistry=nmc811,life=second_life,pack=P001,site=nevada "
        b"seq=7i,voltage_v=350.5,current_a=-12.25,temp_min_c=20.0,temp_max_c=25.5,temp_avg_c=22.0,"
        b"cell_v_min_v=3.6,cell_v_max_v=3.7,cell_v_min_idx=3i,cell_v_max_idx=90i,soc_bms=0.5,soh_bms=0.9,"
        b"contactor_closed=true,fault_bits=5i " + str(TS0).encode() + b"\n"
    )


def test_pack_cells_expands_list_columns() -> None:
    frame = pl.DataFrame(
        {
            "pack": ["P1", "P2"],
            "ts_ms": [TS0, TS0 + 1],
            "seq": [1, 2],
            "cell_voltages_v": [[3.6, 3.61, math.nan], [3.5]],
            "temps_c": [[20.5], []],
        }
    )
    out = render(frame, MEASUREMENTS["pack_cells"], extra_tags={"site": "nevada"})
    assert (
        out.body
        == (
            f"pack_cells,pack=P1,site=nevada seq=1i,cell_v_000=3.6,cell_v_001=3.61,temp_c_0=20.5 {TS0}\n"
            f"pack_cells,pack=P2,site=nevada seq=2i,cell_v_000=3.5 {TS0 + 1}\n"
        ).encode()
    )
    assert out.dropped_fields == 1
    assert field_keys(MEASUREMENTS["pack_cells"], frame) == (
        "seq",
        "cell_v_000",
        "cell_v_001",
        "cell_v_002",
        "temp_c_0",
    )


def test_twin_health_accepts_extra_numeric_counters() -> None:
    spec = MEASUREMENTS["twin_health"]
    counters = {d.field: [1] for d in spec.fields} | {"lag_ms": [12.5], "invalid_not_json": [3], "degraded": [True]}
    frame = pl.DataFrame({"ts_ms": [TS0], **counters})
    out = render(frame, spec, extra_tags={"site": "nevada"})
    assert out.body.startswith(b"twin_health,site=nevada received=1i,accepted=1i,")
    assert b",lag_ms=12.5,invalid_not_json=3i,degraded=true " in out.body
    with pytest.raises(TypeError, match="not numeric"):
        render(frame.with_columns(state=pl.lit("ok")), spec, extra_tags={"site": "nevada"})


def test_every_registry_spec_renders_a_row_of_nulls_as_nothing() -> None:
    for spec in MEASUREMENTS.values():
        columns: dict[str, pl.Series] = {spec.time_column: pl.Series([TS0], dtype=pl.Int64)}
        for tag in spec.tags:
            columns[tag] = pl.Series(["x"])
        for d in spec.fields:
            dtype: pl.DataType = {float: pl.Float64(), int: pl.Int64(), bool: pl.Boolean(), str: pl.String()}[d.dtype]
            columns[d.source] = pl.Series([None], dtype=pl.List(dtype) if d.per_element else dtype)
        out = render(pl.DataFrame(columns), spec)
        assert (out.lines, out.dropped_rows) == (0, 1), spec.name


# --------------------------------------------------------------------------- real InfluxDB

TRICKY_TAGS = [
    "plain",
    "with space",
    "comma,here",
    "equals=sign",
    'double"quote',
    "back\\slash",
    "two\\\\backslashes",
    "back\\ before space",
    "back\\,before comma",
    "Zürich ✓ 𝄞",
    "#not a comment",
    "tab\there",
    "new\nline",
    " leading and trailing ",
    "a=b,c=d e",
]
TRICKY_STRINGS = ['say "hi"', "back\\slash", "ends with \\", "multi\nline\r\n", "", "✓"]


@pytest.mark.integration
def test_tricky_values_round_trip_through_influxdb(influxd: Influxd, influx_db: str) -> None:
    rows = [
        {"pack": tag, "site": "s", "note": TRICKY_STRINGS[i % len(TRICKY_STRINGS)], "voltage_v": float(i)}
        for i, tag in enumerate([*TRICKY_TAGS, "trailing backslash\\"])
    ]
    frame = frame_of(**{k: [r[k] for r in rows] for k in ("pack", "site", "note", "voltage_v")})
    out = render(frame, SPEC)
    assert (out.lines, out.dropped_rows) == (len(TRICKY_TAGS), 1)
    assert influxd.write(influx_db, out.body.decode()) == 204

    def as_stored(value: str) -> str:
        # Newlines cannot be stored in line protocol: they arrive as the two characters \n.
        return value.replace("\n", "\\n").replace("\r", "\\r")

    tag_values = influxd.query('SHOW TAG VALUES FROM "lp_test" WITH KEY = "pack"', db=influx_db)
    stored = [v for _, v in tag_values["results"][0]["series"][0]["values"]]
    assert sorted(stored) == sorted(as_stored(t) for t in TRICKY_TAGS)

    series = influxd.query("SHOW SERIES", db=influx_db)["results"][0]["series"][0]["values"]
    assert len(series) == len(TRICKY_TAGS)  # no extra series from an injected tag
    measurements = influxd.query("SHOW MEASUREMENTS", db=influx_db)["results"][0]["series"][0]["values"]
    assert measurements == [["lp_test"]]

    result = influxd.query('SELECT "pack", "note", "voltage_v" FROM "lp_test"', db=influx_db)
    points = result["results"][0]["series"][0]["values"]
    assert len(points) == len(TRICKY_TAGS)  # no extra points
    by_time = {row[0]: row[1:] for row in points}
    for i, row in enumerate(rows[: len(TRICKY_TAGS)]):
        assert by_time[TS0 + i] == [as_stored(row["pack"]), as_stored(row["note"]), float(i)]


def test_reference_line_types() -> None:
    line = reference_line("m", {"b": "2", "a": "1", "c": None}, {"f": 1.5, "i": 2, "t": True, "s": "x", "n": None}, 9)
    assert line == 'm,a=1,b=2 f=1.5,i=2i,t=true,s="x" 9'
    assert reference_line("m", {}, {"n": math.nan}, 1) == ""
    with pytest.raises(TypeError, match="cannot write"):
        reference_line("m", {}, {"x": typing.cast(Any, [1])}, 1)
