"""Bulk batch decoding: equal to the per-message reference, fast on the happy path, pure."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

from tests.test_contract import SAMPLES
from twin import contract as c
from twin import pipeline
from twin.errors import ContractError, TopicError

SITE = "nevada"
# Written out here, not imported, so that a wrong set in the pipeline fails the test.
INGEST = {
    c.TopicKind.PACK_TELEMETRY: "telemetry",
    c.TopicKind.PACK_CELLS: "cells",
    c.TopicKind.PACK_META: "meta",
    c.TopicKind.PACK_STATUS: "status",
    c.TopicKind.SITE_TELEMETRY: "site",
}
REJECTS = {"msg": pl.Int64, "topic": pl.String, "reason": pl.String, "detail": pl.String, "payload_excerpt": pl.String}


# --------------------------------------------------------------------------- the reference


def reference(topic: str, payload: bytes, site: str = SITE) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """Decode one message the slow, obvious way: return (frame name, reason, row)."""
    try:
        name, row = _reference(topic, payload, site)
    except ContractError as exc:
        return None, exc.reason, None
    return name, None, row


def _reference(topic: str, payload: bytes, site: str) -> tuple[str, dict[str, Any]]:
    parsed = c.parse_topic(topic)
    if parsed.site != site:
        raise ContractError(topic, reason="wrong_site")
    if parsed.kind not in INGEST:
        raise ContractError(topic, reason="bad_topic")
    try:
        message = c.decode(payload, c.model_for_topic(parsed.kind))
    except RecursionError as exc:  # contract.decode lets it escape; the pipeline calls it not_json
        raise ContractError(str(exc), reason="not_json") from exc
    row = message.model_dump(mode="json", by_alias=True)
    del row["schema"]
    for key, expected in (("pack", parsed.pack), ("site", parsed.site)):
        if key in row and row[key] != expected:
            raise ContractError(topic, reason=f"{key}_mismatch")
    return INGEST[parsed.kind], row


def expected_schema(model: type[c.Message]) -> dict[str, pl.DataType]:
    return {"msg": pl.Int64(), **{k: v for k, v in c.polars_schema(model).items() if k != "schema"}}


def assert_equivalent(topics: list[str], payloads: list[bytes], site: str = SITE) -> pipeline.Decoded:
    """Decode a batch and check every message against the reference."""
    out = pipeline.decode_batch(topics, payloads, site=site)
    for kind, name in INGEST.items():
        assert dict(getattr(out, name).schema) == expected_schema(c.model_for_topic(kind)), name
    assert dict(out.rejects.schema) == REJECTS
    got = {name: {r.pop("msg"): r for r in getattr(out, name).iter_rows(named=True)} for name in INGEST.values()}
    refused = {r["msg"]: r for r in out.rejects.iter_rows(named=True)}
    for i, (topic, payload) in enumerate(zip(topics, payloads, strict=True)):
        frame, reason, row = reference(topic, payload, site)
        where = f"message {i}: {topic!r} {payload[:300]!r}"
        if frame is None:
            assert i in refused, f"{where} accepted, reference says {reason}"
            assert refused.pop(i)["reason"] == reason, where
        else:
            assert i not in refused, f"{where} refused ({refused[i]['reason']}: {refused[i]['detail']})"
            assert got[frame].pop(i) == row, where
    assert not refused
    assert not any(got.values())
    assert out.accepted() + out.rejected() == len(topics)
    return out


# --------------------------------------------------------------------------- generators

identifiers = st.from_regex(r"\A[A-Za-z0-9_-]{1,12}\Z")
_OMIT = object()


def _number(prop: dict[str, Any], *, integer: bool) -> st.SearchStrategy[Any]:
    low = prop.get("minimum", prop.get("exclusiveMinimum"))
    high = prop.get("maximum", prop.get("exclusiveMaximum"))
    if integer:
        return st.integers(min_value=low, max_value=high)
    floats = st.floats(
        min_value=low,
        max_value=high,
        exclude_min="exclusiveMinimum" in prop,
        exclude_max="exclusiveMaximum" in prop,
        allow_nan=False,
        allow_infinity=False,
    )
    # pydantic's strict mode takes an int for a float: send some.
    int_low = -(10**6) if low is None else math.floor(low) + 1 if "exclusiveMinimum" in prop else math.ceil(low)
    int_high = 10**6 if high is None else math.floor(high)
    return floats | st.integers(int_low, int_high) if int_low <= int_high else floats


def _value(prop: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Draw a valid value for a JSON Schema property of the contract (the few forms it uses)."""
    if "anyOf" in prop:
        inner = next(p for p in prop["anyOf"] if p.get("type") != "null")
        return st.one_of(st.just(_OMIT), st.none(), _value(inner, defs))
    if "$ref" in prop:
        target = defs[prop["$ref"].rsplit("/", 1)[1]]
        optional = {key: _value(sub, defs) for key, sub in target["properties"].items()}
        return st.fixed_dictionaries({}, optional=optional).map(
            lambda d: {k: v for k, v in d.items() if v is not _OMIT}
        )
    if "const" in prop or "enum" in prop:
        return st.sampled_from(prop.get("enum", [prop.get("const")]))
    kind = prop["type"]
    if kind in ("integer", "number"):
        return _number(prop, integer=kind == "integer")
    if kind == "array":
        low = prop.get("minItems", 0)
        return st.lists(_value(prop["items"], defs), min_size=low, max_size=max(low, 6))
    text = identifiers if "pattern" in prop else st.text(max_size=prop.get("maxLength", 64))
    return {"boolean": st.booleans(), "string": text}[kind]


@st.composite
def valid_message(draw: st.DrawFn) -> tuple[c.TopicKind, str, dict[str, Any]]:
    """Draw a valid message of an ingest kind: its kind, topic and payload as a dict."""
    kind = draw(st.sampled_from(list(INGEST)))
    model = c.model_for_topic(kind)
    data = json.loads(c.encode(SAMPLES[model.schema_name]))
    schema = model.model_json_schema(by_alias=True)
    for key, prop in schema["properties"].items():
        if key != "schema" and draw(st.booleans()):
            value = draw(_value(prop, schema.get("$defs", {})))
            if value is _OMIT:
                data.pop(key, None)
            else:
                data[key] = value
    if kind is c.TopicKind.SITE_TELEMETRY:
        data["site"] = SITE
        return kind, c.topic(kind, SITE), data
    pack = draw(identifiers)
    data["pack"] = pack
    return kind, c.topic(kind, SITE, pack), data


ODD_VALUES = [
    "371.4",
    "",
    "x",
    "123",
    "true",
    "[1]",
    "a:b",
    ": x",
    True,
    False,
    0,
    1,
    -3,
    1.0,
    1.5,
    -0.0,
    1e300,
    None,
    [],
    [1.0, None],
    [3.9, "3.9"],
    [[1.0]],
    {},
    {"a": 1},
    {"vehicle": "x", "zz": 1},
    10**20,
    2**63,
    -(2**63) - 1,
    2**53 + 1,
]


def _numeric_keys(data: dict[str, Any]) -> list[str]:
    return [k for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)]


TOPIC_CHANGES = [
    "microgrid/other/{rest}",
    "microgrid/Nevada/{rest}",
    "microgrid/{site}/{rest}\n",
    "microgrid/{site}/{rest}/x",
    "/microgrid/{site}/{rest}",
    "Microgrid/{site}/{rest}",
    "microgrid/{site}/twin/state",
    "microgrid/{site}/twin/packs/P1",
    "microgrid/{site}/twin/packs/P 1",
    "microgrid/{site}/twin/packs/P1\n",
    "microgrid/{site}/truth/site",
    "microgrid/{site}/packs/+/telemetry",
    "microgrid/{site}/packs/P1\n/telemetry",
    "microgrid/{site}/packs//telemetry",
    "microgrid/{site}",
    "microgrid/ne vada/site/telemetry",
    "microgrid/{site}/packs/" + "x" * 65 + "/meta",
    "microgrid/{site}/packs/" + "y" * 1100 + "/meta",
]


def _row_level(draw: st.DrawFn, kind: c.TopicKind, topic: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Apply one change the bulk reader takes in its stride: the row is judged by the bulk checks."""
    model = c.model_for_topic(kind)
    schema = model.model_json_schema(by_alias=True)
    # Optional fields are anyOf [X, null]: look at X.
    props = {
        k: next((a for a in p.get("anyOf", []) if a.get("type") != "null"), p) for k, p in schema["properties"].items()
    }
    required = [k for k in schema["required"] if k in data]
    changes = ["range", "bound", "string", "schema", "identity", "topic"] + ["drop"] * bool(required)
    changes += {
        c.TopicKind.PACK_META: ["literal", "nested", "length"],
        c.TopicKind.PACK_STATUS: ["literal"],
        c.TopicKind.PACK_CELLS: ["list"],
    }.get(kind, [])
    how = draw(st.sampled_from(changes))
    data = dict(data)
    if how == "drop":
        del data[draw(st.sampled_from(required))]
    elif how == "range" and (numeric := [k for k in _numeric_keys(data) if k in props]):
        key = draw(st.sampled_from(numeric))
        ints = [-1, 10**16, 4102444800001, 946684799999, 1_767_225_600, 2**32, 1000]
        data[key] = draw(st.sampled_from(ints if props[key]["type"] == "integer" else [*ints, -1e-9, 1e9, -1e12, 5.6]))
    elif how == "bound":
        limits = [(k, p[b]) for k, p in props.items() for b in ("minimum", "maximum", "exclusiveMinimum") if b in p]
        key, limit = draw(st.sampled_from(limits))  # every ingest model has a bounded field
        step = draw(st.sampled_from([0, 1, -1]))
        data[key] = limit + step if isinstance(limit, int) else math.nextafter(limit, limit + step or limit)
    elif how == "string":
        key = draw(st.sampled_from([k for k, p in props.items() if "pattern" in p]))
        data[key] = draw(st.sampled_from(["P 1", "x" * 65, "", "ü", "P1,chem=lfp", "a\nb", "-", "123", "true", "[1]"]))
    elif how == "schema":
        data["schema"] = draw(
            st.sampled_from(
                ["pack_telemetry/2", "battery/1", "pack_cells/1", "pack_meta/1", "site_telemetry/1", "nope", "a/b/c"]
            )
        )
    elif how == "identity":
        data["pack" if "pack" in data else "site"] = draw(identifiers)
    elif how == "topic":
        rest = topic.split("/", 2)[-1]
        topic = draw(
            st.sampled_from(TOPIC_CHANGES).map(lambda t: t.format(site=SITE, rest=rest)) | st.text(max_size=40)
        )
    elif how == "literal":
        data["life" if "life" in data else "state"] = draw(st.sampled_from(["x", "New", "online ", "offline", "new"]))
    elif how == "nested":
        data["first_life"] = draw(
            st.sampled_from([{}, {"efc": -1}, {"vehicle": "v" * 129}, {"retirement_soh": 2}, {"odometer_km": 5}])
        )
    elif how == "length":
        data["oem"] = draw(st.sampled_from(["o" * 64, "o" * 65, "é" * 65, ""]))
    elif how == "list":
        key = draw(st.sampled_from(["cell_voltages_v", "temps_c"]))
        data[key] = draw(
            st.sampled_from([[], [3.9, 9.0], [-61.0], [3.0] * 1001, [1.0] * 257, [3, 4], [5.5, 0], [3.9, 6.0, -1.0]])
        )
    return topic, data


def _structural(draw: st.DrawFn, kind: c.TopicKind, topic: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Apply one change that the bulk reader fails on, or that only the reference can judge."""
    keys = sorted(data)
    how = draw(st.sampled_from(["add", "retype", "null", "odd_id", "nested"]))
    data = dict(data)
    if how == "add":
        key = draw(st.sampled_from(["extra", "zz", "Pack", "vehicle", "first_life"]))
        data[key] = draw(st.sampled_from(ODD_VALUES))
    elif how == "retype":
        data[draw(st.sampled_from(keys))] = draw(st.sampled_from(ODD_VALUES))
    elif how == "null":
        data[draw(st.sampled_from(keys))] = None
    elif how == "odd_id" and "pack" in data:
        # A pack id that looks like a number: valid as a string, wrong when sent as a number.
        pack = draw(st.sampled_from(["123", "-1", "0", "true"]))
        data["pack"] = draw(st.sampled_from([pack, int(pack) if pack.lstrip("-").isdigit() else True]))
        topic = c.topic(kind, SITE, pack)
    elif how == "nested":
        data["first_life"] = draw(st.sampled_from([None, {"vehicle": 5}, {"zz": 1}, [], "x", {"efc": "1"}]))
    return topic, data


def _with_token(draw: st.DrawFn, payload: bytes, data: dict[str, Any]) -> bytes:
    """Put a number token Python's json or polars treats specially in place of a numeric value."""
    numbers = _numeric_keys(data)
    if not numbers:
        return payload
    key = draw(st.sampled_from(numbers))
    token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "01", "+1", ".5"]))
    return json.dumps({**data, key: "@@"}, separators=(",", ":")).replace('"@@"', token).encode()


def _with_duplicate(draw: st.DrawFn, payload: bytes, data: dict[str, Any]) -> bytes:
    """Repeat a key, first or last (polars keeps the first value, Python's json the last)."""
    key = draw(st.sampled_from(sorted(data) or ["x"]))
    extra = f'"{key}":{json.dumps(draw(st.sampled_from(ODD_VALUES)))}'.encode()
    return payload[:-1] + b"," + extra + b"}" if draw(st.booleans()) else b"{" + extra + b"," + payload[1:]


def _mutate_bytes(draw: st.DrawFn, payload: bytes, data: dict[str, Any]) -> bytes:
    """Apply one change to the serialised payload."""
    garbage = st.binary(max_size=64) | st.sampled_from([b"\xff\xfe\x00binary", b"{\xff}", b"{}", b"{ }", b"null"])
    changes: dict[str, Callable[[], bytes]] = {
        "truncate": lambda: payload[: draw(st.integers(0, max(len(payload) - 1, 0)))],
        "garbage": lambda: draw(garbage),
        "empty": lambda: draw(st.sampled_from([b"", b" ", b"\n", b"{}\n"])),
        "pretty": lambda: json.dumps(data, indent=2).encode(),
        "token": lambda: _with_token(draw, payload, data),
        "dup": lambda: _with_duplicate(draw, payload, data),
        "escape": lambda: json.dumps({**data, "oem": "Citro\u00ebn"}).encode().replace(b'"P', b'"\\u0050'),
        "bom": lambda: b"\xef\xbb\xbf" + payload,
        "utf16": lambda: payload.decode().encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"]))),
        "oversize": lambda: payload[:-1] + b',"pad":"' + b"x" * c.MAX_PAYLOAD_BYTES + b'"}',
        "padded": lambda: draw(st.sampled_from([b" ", b"\t", b"\r\n"])) + payload + draw(st.sampled_from([b"", b"\n"])),
        "control": lambda: payload.replace(b'":"', b'":"\x01', 1),
        "cr": lambda: payload.replace(b",", b",\r", 2).replace(b":", b" :\t", 2),
        "array": lambda: b"[" + payload + b"]",
        "deep": lambda: b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}",
    }
    return changes[draw(st.sampled_from(sorted(changes)))]()


@st.composite
def messages(draw: st.DrawFn, *, structural: bool = True) -> tuple[str, bytes]:
    """Draw one message: valid, or with one or more things wrong.

    With ``structural=False`` only changes that the bulk reader takes are made, so every
    row is judged by the bulk checks (or, for a row with a null or duplicated key, the reference).
    """
    kind, topic, data = draw(valid_message())
    for _ in range(draw(st.integers(0, 2))):
        change = draw(st.sampled_from([_row_level, _row_level, _structural] if structural else [_row_level]))
        topic, data = change(draw, kind, topic, data)
    payload = json.dumps(data, separators=(",", ":")).encode()
    if structural and draw(st.integers(0, 2)) == 0:
        payload = _mutate_bytes(draw, payload, data)
    elif draw(st.booleans()):
        payload = json.dumps(data).encode()  # spaces after ',' and ':'
    return topic, payload


# --------------------------------------------------------------------------- equivalence


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(messages(), max_size=24))
def test_equivalent_to_the_reference(batch: list[tuple[str, bytes]]) -> None:
    assert_equivalent([t for t, _ in batch], [p for _, p in batch])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(messages(structural=False), max_size=24))
def test_row_level_problems_are_judged_in_bulk(batch: list[tuple[str, bytes]]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        reads = Calls(patch, "_read_bulk")
        assert_equivalent([t for t, _ in batch], [p for _, p in batch])
    assert reads.count <= len(INGEST)  # no read failed, so nothing was split


def _payload(name: str, **changes: Any) -> bytes:
    data = json.loads(c.encode(SAMPLES[name]))
    data.update(changes)
    return json.dumps(data, separators=(",", ":")).encode()


def _topic(kind: c.TopicKind, pack: str | None = "P0001", site: str = SITE) -> str:
    return f"microgrid/{site}/" + kind.value.format(pack=pack)


TEL = c.TopicKind.PACK_TELEMETRY
EDGE_CASES: list[tuple[str, bytes]] = [
    # Values polars would turn into text for a string field.
    (_topic(TEL, "123"), _payload("pack_telemetry", pack=123)),
    (_topic(TEL, "123"), _payload("pack_telemetry", pack="123")),
    (_topic(TEL, "true"), _payload("pack_telemetry", pack=True)),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta", oem=5)),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta", oem={"a": 1})),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta", oem="-1")),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta", first_life={"vehicle": 2013})),
    (_topic(c.TopicKind.PACK_STATUS), _payload("pack_status", state=1)),
    (_topic(c.TopicKind.SITE_TELEMETRY, None), _payload("site_telemetry", site=1)),
    # Null versus absent, and defaults.
    (_topic(TEL), _payload("pack_telemetry", fault_bits=None)),
    (_topic(TEL), _payload("pack_telemetry", voltage_v=None)),
    (_topic(TEL), b'{"schema":"pack_telemetry/1","pack":"P0001"}'),
    (_topic(TEL), _payload("pack_telemetry").replace(b',"fault_bits":0', b"")),
    (_topic(c.TopicKind.PACK_STATUS), b'{"schema":"pack_status/1","pack":"P0001","state":"online","ts_ms":null}'),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta", first_life=None, intake_soh=None)),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta", first_life={})),
    # Duplicated keys: polars keeps the first, Python's json the last.
    (_topic(TEL), b'{"soc_bms":7,' + _payload("pack_telemetry")[1:]),
    (_topic(TEL), _payload("pack_telemetry")[:-1] + b',"soc_bms":7}'),
    (_topic(TEL), _payload("pack_telemetry")[:-1] + b',"fault_bits":null}'),
    (_topic(TEL), b'{"schema":"battery/1",' + _payload("pack_telemetry")[1:]),
    # Colons inside strings make the quick key count unsure.
    (
        _topic(c.TopicKind.PACK_META),
        _payload("pack_meta", oem="a:b", first_life={"vehicle": "x: y", "grading_method": ":"}),
    ),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta", oem="a:b")[:-1] + b',"oem":"c"}'),
    # Types polars and pydantic must agree on.
    (_topic(TEL), _payload("pack_telemetry", seq=1.0)),
    (_topic(TEL), _payload("pack_telemetry", voltage_v=371)),
    (_topic(TEL), _payload("pack_telemetry", voltage_v=True)),
    (_topic(TEL), _payload("pack_telemetry", contactor_closed=1)),
    (_topic(TEL), _payload("pack_telemetry", seq=2**64)),
    (_topic(TEL), _payload("pack_telemetry", voltage_v=10**400)),
    (_topic(TEL), _payload("pack_telemetry", ts_ms=10**30)),
    (_topic(TEL), _payload("pack_telemetry").replace(b"371.4", b"1e999")),
    (_topic(TEL), _payload("pack_telemetry").replace(b"371.4", b"1e-400")),
    (_topic(TEL), _payload("pack_telemetry").replace(b"371.4", b"NaN")),
    (_topic(TEL), _payload("pack_telemetry").replace(b'"seq":7', b'"seq":' + b"1" * 5000)),
    (_topic(c.TopicKind.PACK_CELLS), _payload("pack_cells", cell_voltages_v=[3.0, None, 9.0])),
    (_topic(c.TopicKind.PACK_CELLS), _payload("pack_cells", cell_voltages_v=[9.0, None], temps_c=[500.0])),
    (_topic(c.TopicKind.PACK_CELLS), _payload("pack_cells", cell_voltages_v=[9.0] + [3.0] * 1000)),
    (_topic(c.TopicKind.PACK_CELLS), _payload("pack_cells", cell_voltages_v=[], temps_c=[])),
    (_topic(c.TopicKind.PACK_CELLS), _payload("pack_cells", cell_voltages_v=[3, 4], temps_c=[25])),
    # Several problems: the first in field order wins.
    (_topic(TEL), _payload("pack_telemetry", pack="P 1", voltage_v=-1.0, extra=1)),
    (_topic(TEL), _payload("pack_telemetry", soc_bms=2.0, seq=-1, schema="pack_telemetry/2")),
    (_topic(TEL), _payload("pack_telemetry", pack="P0002", soc_bms=2.0)),
    # Framing, encodings, escapes.
    (_topic(TEL), _payload("pack_telemetry") + b"\n"),
    (_topic(TEL), b"\n" + _payload("pack_telemetry")),
    (_topic(TEL), _payload("pack_telemetry").replace(b",", b",\n")),
    (_topic(TEL), _payload("pack_telemetry") + _payload("pack_telemetry")),
    (_topic(TEL), _payload("pack_telemetry").replace(b'"P0001"', b'"\\u0050\\u0030001"')),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta", oem="\ud800")),
    (_topic(c.TopicKind.PACK_META), _payload("pack_meta").replace(b'"Nissan"', b'"Nissan\xed\xa0\x80"')),
    (_topic(TEL), _payload("pack_telemetry").decode().encode("utf-16")),
    (_topic(TEL), _payload("pack_telemetry").decode().encode("utf-16-le")),
    (_topic(TEL), b"\xef\xbb\xbf" + _payload("pack_telemetry")),
    (_topic(TEL), b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"),
    (_topic(TEL), b""),
    (_topic(TEL), b"[]"),
    # Topics.
    (_topic(TEL) + "\n", _payload("pack_telemetry")),
    (f"microgrid/{SITE}/twin/packs/P1\n", _payload("pack_telemetry")),
    (_topic(TEL, site="elsewhere"), _payload("pack_telemetry")),
    (f"microgrid/{SITE}/twin/state", _payload("twin_state")),
    ("microgrid/\ud800/packs/P1/telemetry", _payload("pack_telemetry")),
    ("x" * 2000, b"\xff"),
]


def test_edge_cases_equal_the_reference() -> None:
    valid = [(_topic(TEL), _payload("pack_telemetry"))] * 3
    batch = valid + EDGE_CASES + valid
    out = assert_equivalent([t for t, _ in batch], [p for _, p in batch])
    assert out.accepted() >= 6


def test_refused_rows_after_accepted_ones(slow: Calls, reads: Calls) -> None:
    # polars 2.1 panicked here in pl.format (a filtered column whose first chunk is empty).
    batch = [(_topic(TEL), _payload("pack_telemetry"))] * 4 + [
        (_topic(TEL), _payload("pack_telemetry", schema={})),
        (_topic(TEL), _payload("pack_telemetry", pack="P2")),
        (_topic(TEL), _payload("pack_telemetry")),
    ]
    out = assert_equivalent([t for t, _ in batch], [p for _, p in batch])
    assert out.rejects["detail"].to_list()[1] == "payload pack 'P2' differs from the topic pack 'P0001'"
    assert (slow.count, reads.count) == (0, 1)  # checked in bulk, without falling back


def test_a_polars_failure_while_checking_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def panic(*_: Any) -> None:
        msg = "simulated"
        raise pl.exceptions.PanicException(msg)

    monkeypatch.setattr(pipeline, "_check", panic)
    topics, payloads = _fleet(30)
    topics.append(_topic(TEL))
    payloads.append(_payload("pack_telemetry", soc_bms=3.0))
    out = assert_equivalent(topics, payloads)
    assert out.rejects["reason"].to_list() == ["out_of_range"]


def test_each_edge_case_alone_equals_the_reference() -> None:
    for topic, payload in EDGE_CASES:
        assert_equivalent([topic], [payload])


# --------------------------------------------------------------------------- the fast path


def _fleet(n: int, seed: int = 1) -> tuple[list[str], list[bytes]]:
    """Return n valid messages of every ingest kind, mostly telemetry, as an emulator sends them."""
    rng = random.Random(seed)
    kinds = list(INGEST)
    topics, payloads = [], []
    for i in range(n):
        kind = rng.choices(kinds, [8 if k is TEL else 1 for k in kinds])[0]
        message = SAMPLES[c.model_for_topic(kind).schema_name]
        if kind is c.TopicKind.SITE_TELEMETRY:
            topics.append(c.topic(kind, SITE))
            message = message.model_copy(update={"site": SITE, "seq": i})
        else:
            pack = f"P{i % 805:04d}"
            topics.append(c.topic(kind, SITE, pack))
            message = message.model_copy(update={"pack": pack})
        if kind is TEL:
            message = message.model_copy(update={"seq": i, "voltage_v": 300 + rng.random() * 100})
        payloads.append(c.encode(message))
    return topics, payloads


class Calls:
    """Count calls of a pipeline hook while still running it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.count = 0
        real: Callable[..., Any] = getattr(pipeline, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, counted)


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(monkeypatch, "_decode_one")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(monkeypatch, "_read_bulk")


def test_valid_batch_never_takes_the_slow_path(slow: Calls, reads: Calls) -> None:
    topics, payloads = _fleet(5000)
    out = pipeline.decode_batch(topics, payloads, site=SITE)
    assert out.rejected() == 0, out.rejects.head()
    assert out.accepted() == 5000
    assert slow.count == 0
    assert reads.count == len(INGEST)  # one bulk read per kind


def test_a_wrong_type_costs_no_extra_read(slow: Calls, reads: Calls) -> None:
    topics, payloads = _fleet(5000)
    bad = 3217
    topics[bad], payloads[bad] = _topic(TEL, "P3217"), _payload("pack_telemetry", pack="P3217", voltage_v="371.4")
    out = pipeline.decode_batch(topics, payloads, site=SITE)
    assert out.rejects.select("msg", "reason").rows() == [(bad, "wrong_type")]
    assert (slow.count, reads.count) == (1, len(INGEST))


def test_unparsable_payload_is_located_with_one_extra_read(slow: Calls, reads: Calls) -> None:
    topics, payloads = _fleet(5000)
    bad = 1234
    topics[bad], payloads[bad] = (
        _topic(TEL, "P1234"),
        _payload("pack_telemetry", pack="P1234").replace(b"371.4", b"NaN"),
    )
    out = pipeline.decode_batch(topics, payloads, site=SITE)
    assert out.rejects.select("msg", "reason").rows() == [(bad, "not_finite")]
    assert (slow.count, reads.count) == (1, len(INGEST) + 1)


def test_bisection_costs_log_n_reads_when_the_locator_finds_nothing(
    slow: Calls, reads: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "_parses", lambda chunk: pl.repeat(value=True, n=chunk.height, eager=True))
    n = 4096
    topics, payloads = [_topic(TEL)] * n, [_payload("pack_telemetry")] * n
    payloads[777] = _payload("pack_telemetry").replace(b"371.4", b"1e999")
    out = pipeline.decode_batch(topics, payloads, site=SITE)
    assert out.rejects.select("msg", "reason").rows() == [(777, "not_finite")]
    assert slow.count == 1
    assert reads.count == 1 + 2 * int(math.log2(n))  # both halves at each of log2(n) levels
    assert out.telemetry.height == n - 1


def test_row_level_errors_do_not_split(slow: Calls, reads: Calls) -> None:
    topics, payloads = [_topic(TEL)] * 1000, [_payload("pack_telemetry")] * 1000
    payloads[10] = _payload("pack_telemetry", soc_bms=1.5)
    payloads[20] = _payload("pack_telemetry", pack="P 1")
    payloads[30] = _payload("pack_telemetry", pack="P0002")
    payloads[40] = _payload("pack_telemetry", schema="pack_telemetry/2")
    payloads[50] = json.dumps({k: v for k, v in json.loads(_payload("pack_telemetry")).items() if k != "seq"}).encode()
    out = pipeline.decode_batch(topics, payloads, site=SITE)
    assert out.rejects.select("msg", "reason").rows() == [
        (10, "out_of_range"),
        (20, "bad_identifier"),
        (30, "pack_mismatch"),
        (40, "wrong_version"),
        (50, "missing_field"),
    ]
    assert (slow.count, reads.count) == (0, 1)


# --------------------------------------------------------------------------- shape and purity


def test_inputs_are_not_mutated() -> None:
    topics, payloads = _fleet(50)
    topics += [_topic(TEL), "bad"]
    payloads += [b"{oops", b"\xff"]
    before = (list(topics), list(payloads))
    pipeline.decode_batch(topics, payloads, site=SITE)
    assert (topics, payloads) == before
    again = pipeline.decode_batch(tuple(topics), tuple(payloads), site=SITE)
    assert again.accepted() == 50


def test_empty_batch() -> None:
    out = pipeline.decode_batch([], [], site=SITE)
    assert out.accepted() == out.rejected() == 0
    for kind, name in INGEST.items():
        frame = getattr(out, name)
        assert frame.height == 0
        assert dict(frame.schema) == expected_schema(c.model_for_topic(kind))
    assert dict(out.rejects.schema) == REJECTS


def test_frames_have_the_declared_schemas_whichever_path_made_them() -> None:
    topics, payloads = _fleet(40)
    # A message that only the reference decodes (an escape), next to bulk ones.
    topics.append(_topic(TEL))
    payloads.append(_payload("pack_telemetry").replace(b'"P0001"', b'"\\u0050\\u0030001"'))
    out = assert_equivalent(topics, payloads)
    assert out.telemetry["msg"].is_sorted()
    assert out.telemetry.filter(pl.col("msg") == len(topics) - 1).height == 1
    assert out.meta.schema["first_life"] == c.polars_schema(c.PackMeta)["first_life"]
    assert out.telemetry["fault_bits"].dtype == pl.Int64
    assert pipeline.output_schema(c.PackCells) == pl.Schema(expected_schema(c.PackCells))


def test_absent_fields_take_their_defaults() -> None:
    payload = json.dumps({k: v for k, v in json.loads(_payload("pack_meta")).items() if k != "temp_max_c"}).encode()
    out = assert_equivalent([_topic(c.TopicKind.PACK_META)], [payload])
    assert out.meta["temp_max_c"].to_list() == [55.0]


def test_rejects_carry_topic_detail_and_excerpt() -> None:
    long_bad = b"\xff" + b"a" * 500
    out = pipeline.decode_batch(
        [_topic(TEL), "nope", _topic(TEL)], [long_bad, long_bad, _payload("pack_telemetry", soc_bms=9.0)], site=SITE
    )
    rows = out.rejects.rows(named=True)
    assert [r["reason"] for r in rows] == ["not_json", "bad_topic", "out_of_range"]
    assert rows[0]["payload_excerpt"] == "\ufffd" + "a" * 199
    assert rows[1]["payload_excerpt"] == rows[0]["payload_excerpt"]
    assert rows[1]["topic"] == "nope"
    assert "soc_bms" in rows[2]["detail"]
    assert len(rows[2]["payload_excerpt"]) == 200


def test_a_constraint_the_bulk_checks_do_not_know_fails_loudly() -> None:
    class Odd(c.Message):
        schema_name: ClassVar[str] = "odd"
        schema_: Literal["odd/1"] = Field(default="odd/1", alias="schema")
        n: Annotated[int, Field(multiple_of=2)]

    with pytest.raises(TypeError, match="no bulk check"):
        pipeline._plan(Odd)


def test_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="topics"):
        pipeline.decode_batch(["a"], [], site=SITE)
    with pytest.raises(TopicError):
        pipeline.decode_batch([], [], site="ne vada")


def test_typed_rows_get_the_checks_and_reasons_a_message_gets() -> None:
    """check_rows (a replayed file's rows) refuses what decode_batch refuses, with the same reason and detail.

    Only NaN differs in its detail: in a payload it is not JSON at all, and the reader says so.
    """
    base = json.loads(c.encode(SAMPLES["pack_telemetry"]))
    variants: list[dict[str, Any]] = [
        {},
        {"current_a": 1e9},
        {"voltage_v": -1.0},
        {"soc_bms": 1.5},
        {"temp_avg_c": float("nan")},
        {"cell_v_min_idx": -3},
        {"pack": "has space"},
        {"fault_bits": -1},
        {"current_a": 5.0, "voltage_v": 2e9},  # the first failing field in field order
    ]
    rows = [{**base, **v} for v in variants]
    topics = [c.topic(c.TopicKind.PACK_TELEMETRY, "s1", str(r["pack"]).replace(" ", "_")) for r in rows]
    payloads = [json.dumps(r, allow_nan=True).encode() for r in rows]
    # the topic's pack must match the payload's for decode_batch; a spaced pack gets its own topic
    decoded = pipeline.decode_batch(topics, payloads, site="s1")
    by_msg = {m: (r, d) for m, r, d in decoded.rejects.select("msg", "reason", "detail").iter_rows()}
    typed = pl.DataFrame(
        [{k: v for k, v in r.items() if k != "schema"} for r in rows],
        schema={k: t for k, t in pipeline.output_schema(c.PackTelemetry).items() if k != "msg"},
        orient="row",
    )
    accepted, refused = pipeline.check_rows(typed, c.PackTelemetry)
    got = {m: (r, d) for m, r, d in refused.select("msg", "reason", "detail").iter_rows()}
    wanted = {m: v for m, v in by_msg.items() if v[0] != "pack_mismatch"}
    nan = 4
    assert got[nan] == ("not_finite", "pack_telemetry/1: temp_avg_c: Input should be a finite number")
    assert wanted[nan][0] == "not_finite"
    got[nan] = wanted[nan]
    assert got == wanted
    assert len(got) == len(variants) - 1
    assert accepted.height == 1
    assert accepted.row(0, named=True)["current_a"] == base["current_a"]
