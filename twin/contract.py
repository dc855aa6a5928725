"""The MQTT contract, version 1: topics, payload models and their polars schemas.

This module is the single source of truth for what crosses MQTT, for both the emulators
(which publish) and the twin (which subscribes and publishes its estimates). The JSON
Schemas shipped in ``twin/schemas/`` and the polars schemas used to decode batches are
both derived from the models below; nothing is written twice.

Conventions, stated once here and asserted in the tests:

* **Current is positive on discharge** (:data:`CURRENT_SIGN`). Power likewise: battery
  power is positive when the batteries deliver energy, grid power is positive on import.
* Units are in field names: ``voltage_v``, ``current_a``, ``temp_max_c``, ``power_w``,
  ``energy_kwh``, ``capacity_ah``, ``duration_s``. SoC and SoH are fractions in [0, 1]
  (SoH may exceed 1 slightly for a new pack that beats its rating).
* Timestamps are integer milliseconds since the Unix epoch, UTC, set by the device
  (``ts_ms``). Values outside 2000-2100 are rejected, which catches seconds and
  nanoseconds sent by mistake.
* Identifiers (site, pack, alert ids) match :data:`IDENTIFIER_PATTERN`.
* Every payload is a JSON object whose ``schema`` field names the message and its
  version, e.g. ``"pack_telemetry/1"``.

Topics (root ``microgrid/{site}/``):

==============================  =========================  ==============================
topic                           model                      QoS / retained
==============================  =========================  ==============================
``packs/{pack}/meta``           :class:`PackMeta`          1, retained
``packs/{pack}/telemetry``      :class:`PackTelemetry`     1
``packs/{pack}/cells``          :class:`PackCells`         1, slower cadence
``packs/{pack}/status``         :class:`PackStatus`        1, retained, gateway last will
``site/telemetry``              :class:`SiteTelemetry`     1
``twin/state``                  :class:`TwinState`         1, retained, message expiry
``twin/packs/{pack}``           :class:`TwinPackState`     1, retained, message expiry
``twin/alerts``                 :class:`Alert`             1
``twin/status``                 :class:`TwinStatus`        1, retained, twin last will
``twin/deadletter``             :class:`DeadLetter`        1
``truth/...``                   emulator only              off by default, never read by the twin
==============================  =========================  ==============================
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from twin.errors import PayloadError, TopicError

__all__ = [
    "CONTRACT_VERSION",
    "CURRENT_SIGN",
    "IDENTIFIER_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_MODELS",
    "TOPIC_ROOT",
    "Alert",
    "DeadLetter",
    "FirstLifeSummary",
    "Message",
    "PackCells",
    "PackMeta",
    "PackStatus",
    "PackTelemetry",
    "ParsedTopic",
    "SiteTelemetry",
    "TopicKind",
    "TwinPackState",
    "TwinState",
    "TwinStatus",
    "decode",
    "encode",
    "encode_frame",
    "is_identifier",
    "json_schema",
    "json_schemas",
    "model_for_topic",
    "parse_topic",
    "polars_schema",
    "subscription",
    "topic",
]

CONTRACT_VERSION: Final = 1
TOPIC_ROOT: Final = "microgrid"
IDENTIFIER_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
CURRENT_SIGN: Final = "positive on discharge"
#: Largest payload the twin accepts; a pack with 400 cell groups fits in well under this.
MAX_PAYLOAD_BYTES: Final = 64 * 1024

_IDENTIFIER_RE: Final = re.compile(IDENTIFIER_PATTERN)
# 2000-01-01 and 2100-01-01 in ms: a timestamp outside is in the wrong unit or nonsense.
_TS_MIN_MS: Final = 946_684_800_000
_TS_MAX_MS: Final = 4_102_444_800_000

Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
TimestampMs = Annotated[
    int,
    Field(ge=_TS_MIN_MS, le=_TS_MAX_MS, description="Milliseconds since the Unix epoch, UTC, set by the device."),
]
Seq = Annotated[int, Field(ge=0, le=2**53, description="Per-publisher sequence number, +1 per message.")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
SohFraction = Annotated[float, Field(ge=0.0, le=1.5)]
TempC = Annotated[float, Field(ge=-60.0, le=200.0)]
CellVoltage = Annotated[float, Field(ge=0.0, le=5.5)]
PackVoltage = Annotated[float, Field(ge=0.0, le=2000.0)]
PackCurrent = Annotated[float, Field(ge=-10_000.0, le=10_000.0, description=f"Amperes, {CURRENT_SIGN}.")]
PowerW = Annotated[float, Field(ge=-1e9, le=1e9)]
NonNegative = Annotated[float, Field(ge=0.0)]
Life = Literal["new", "second_life"]
OnOff = Literal["online", "offline"]


class Message(BaseModel):
    """Base of every payload: strict types, no extra fields, no NaN or infinities.

    Subclasses set :attr:`schema_name` and declare ``schema`` as a ``Literal`` of
    ``"{schema_name}/{version}"``.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        populate_by_name=True,
        protected_namespaces=(),
    )
    schema_name: ClassVar[str]


class FirstLifeSummary(BaseModel):
    """What a second-life pack did before it came to the site (from its passport or seller)."""

    model_config = Message.model_config
    vehicle: str | None = Field(default=None, max_length=128, description="Vehicle or application of the first life.")
    years_in_service: NonNegative | None = None
    odometer_km: NonNegative | None = None
    efc: NonNegative | None = Field(default=None, description="Equivalent full cycles in the first life.")
    retirement_soh: SohFraction | None = Field(default=None, description="SoH measured at retirement (intake test).")
    grading_method: str | None = Field(default=None, max_length=128)


class PackMeta(Message):
    """Static description of a pack: published retained on ``packs/{pack}/meta``."""

    schema_name: ClassVar[str] = "pack_meta"
    schema_: Literal["pack_meta/1"] = Field(default="pack_meta/1", alias="schema")
    pack: Identifier
    ts_ms: TimestampMs
    chemistry: Identifier = Field(description="Cell type, a name from twin.chemistry (nmc811, nmc532, lfp, lmo).")
    life: Life
    oem: str = Field(max_length=64)
    rated_capacity_ah: Annotated[float, Field(gt=0.0, le=100_000.0)]
    rated_energy_kwh: Annotated[float, Field(gt=0.0, le=100_000.0)]
    series_cells: Annotated[int, Field(ge=1, le=1000)]
    parallel_cells: Annotated[int, Field(ge=1, le=1000)]
    voltage_min_v: PackVoltage
    voltage_max_v: PackVoltage
    current_max_discharge_a: Annotated[float, Field(gt=0.0, le=10_000.0)]
    current_max_charge_a: Annotated[float, Field(gt=0.0, le=10_000.0)]
    temp_max_c: TempC = 55.0
    commissioned_ms: TimestampMs | None = None
    intake_soh: SohFraction | None = Field(default=None, description="SoH measured when the pack came to the site.")
    first_life: FirstLifeSummary | None = None


class PackTelemetry(Message):
    """One pack's BMS snapshot, about once a second: ``packs/{pack}/telemetry``."""

    schema_name: ClassVar[str] = "pack_telemetry"
    schema_: Literal["pack_telemetry/1"] = Field(default="pack_telemetry/1", alias="schema")
    pack: Identifier
    ts_ms: TimestampMs
    seq: Seq
    voltage_v: PackVoltage
    current_a: PackCurrent
    temp_min_c: TempC
    temp_max_c: TempC
    temp_avg_c: TempC
    cell_v_min_v: CellVoltage
    cell_v_max_v: CellVoltage
    cell_v_min_idx: Annotated[int, Field(ge=0, le=999)]
    cell_v_max_idx: Annotated[int, Field(ge=0, le=999)]
    soc_bms: Fraction = Field(description="SoC as the pack's own BMS reports it (often wrong for second life).")
    soh_bms: SohFraction = Field(description="SoH as the pack's own BMS reports it.")
    contactor_closed: bool
    fault_bits: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0


class PackCells(Message):
    """Every series cell group's voltage and the temperature sensors: ``packs/{pack}/cells``."""

    schema_name: ClassVar[str] = "pack_cells"
    schema_: Literal["pack_cells/1"] = Field(default="pack_cells/1", alias="schema")
    pack: Identifier
    ts_ms: TimestampMs
    seq: Seq
    cell_voltages_v: Annotated[list[CellVoltage], Field(min_length=1, max_length=1000)]
    temps_c: Annotated[list[TempC], Field(min_length=0, max_length=256)]


class PackStatus(Message):
    """A pack gateway's availability, retained, and its last will: ``packs/{pack}/status``."""

    schema_name: ClassVar[str] = "pack_status"
    schema_: Literal["pack_status/1"] = Field(default="pack_status/1", alias="schema")
    pack: Identifier
    state: OnOff
    ts_ms: TimestampMs | None = Field(default=None, description="Absent in a last will, which is set at connect.")


class SiteTelemetry(Message):
    """The site meter and weather: ``site/telemetry``.

    ``battery_w`` is positive when the batteries discharge; ``grid_w`` positive on import.
    At the meter, ``load_w = solar_w + grid_w + battery_w`` up to losses and metering error.
    """

    schema_name: ClassVar[str] = "site_telemetry"
    schema_: Literal["site_telemetry/1"] = Field(default="site_telemetry/1", alias="schema")
    site: Identifier
    ts_ms: TimestampMs
    seq: Seq
    load_w: PowerW = Field(description="Data-centre load, IT plus cooling.")
    solar_w: PowerW
    grid_w: PowerW = Field(description="Grid power, positive on import.")
    battery_w: PowerW = Field(description="Battery power at the meter, positive on discharge.")
    ambient_c: TempC


Band = Annotated[float | None, Field(description="None while the twin cannot estimate it.")]


class TwinState(Message):
    """The twin's site estimates: ``twin/state``, retained with a message expiry."""

    schema_name: ClassVar[str] = "twin_state"
    schema_: Literal["twin_state/1"] = Field(default="twin_state/1", alias="schema")
    site: Identifier
    ts_ms: TimestampMs
    packs_total: Annotated[int, Field(ge=0)]
    packs_online: Annotated[int, Field(ge=0)]
    packs_offline: Annotated[int, Field(ge=0)]
    packs_excluded: Annotated[int, Field(ge=0)]
    load_w: PowerW | None = None
    solar_w: PowerW | None = None
    grid_w: PowerW | None = None
    battery_w: PowerW | None = None
    soc: Band = None
    soc_p5: Band = None
    soc_p95: Band = None
    energy_to_floor_kwh: Band = None
    energy_to_floor_kwh_p5: Band = None
    energy_to_floor_kwh_p95: Band = None
    max_discharge_w: Band = None
    runtime_s_p5: Band = Field(default=None, description="None when the site is not discharging.")
    runtime_s_p50: Band = None
    runtime_s_p95: Band = None
    ridethrough_s_p5: Band = None
    ridethrough_s_p50: Band = None
    ridethrough_s_p95: Band = None
    quality: list[Identifier] = Field(default_factory=list, description="Data-quality flags that apply.")


class TwinPackState(Message):
    """The twin's estimates for one pack: ``twin/packs/{pack}``, retained with a message expiry."""

    schema_name: ClassVar[str] = "twin_pack_state"
    schema_: Literal["twin_pack_state/1"] = Field(default="twin_pack_state/1", alias="schema")
    pack: Identifier
    ts_ms: TimestampMs
    online: bool
    available: bool = Field(description="Online, contactor closed, no fault: it can discharge now.")
    soc: Band = None
    soc_std: Band = None
    soc_bms: Band = None
    energy_to_floor_kwh: Band = None
    energy_to_floor_kwh_p5: Band = None
    energy_to_floor_kwh_p95: Band = None
    capacity_ah: Band = None
    capacity_ah_std: Band = None
    soh: Band = None
    soh_std: Band = None
    soh_bms: Band = None
    resistance_ohm: Band = None
    resistance_growth: Band = Field(default=None, description="Resistance over its value at commissioning.")
    rul_days_p5: Band = None
    rul_days_p50: Band = None
    rul_days_p95: Band = None
    rul_efc_p50: Band = None
    knee: bool = False
    knee_onset_ms: TimestampMs | None = None
    anomaly_score: Band = None
    quality: list[Identifier] = Field(default_factory=list)


class Alert(Message):
    """An alert raised or cleared by the twin: ``twin/alerts``."""

    schema_name: ClassVar[str] = "alert"
    schema_: Literal["alert/1"] = Field(default="alert/1", alias="schema")
    site: Identifier
    ts_ms: TimestampMs
    alert_id: Identifier
    kind: Identifier = Field(description="cell_overvoltage, over_temperature, cell_imbalance, pack_offline, ...")
    severity: Literal["info", "warning", "critical"]
    state: Literal["raised", "cleared"]
    pack: Identifier | None = None
    cell: Annotated[int, Field(ge=0, le=999)] | None = None
    value: float | None = None
    threshold: float | None = None
    message: str = Field(max_length=512)


class TwinStatus(Message):
    """The twin service's availability, retained, and its last will: ``twin/status``."""

    schema_name: ClassVar[str] = "twin_status"
    schema_: Literal["twin_status/1"] = Field(default="twin_status/1", alias="schema")
    state: OnOff
    ts_ms: TimestampMs | None = None
    version: str = Field(default="", max_length=64)


class DeadLetter(Message):
    """A message the twin refused, with the reason: ``twin/deadletter``."""

    schema_name: ClassVar[str] = "deadletter"
    schema_: Literal["deadletter/1"] = Field(default="deadletter/1", alias="schema")
    topic: str = Field(max_length=1024)
    reason: Identifier
    detail: str = Field(max_length=1024)
    payload_excerpt: str = Field(max_length=512, description="The start of the payload, for diagnosis.")
    received_ms: TimestampMs | None = None


MESSAGE_MODELS: Final[dict[str, type[Message]]] = {
    m.schema_name: m
    for m in (
        PackMeta,
        PackTelemetry,
        PackCells,
        PackStatus,
        SiteTelemetry,
        TwinState,
        TwinPackState,
        Alert,
        TwinStatus,
        DeadLetter,
    )
}


# --------------------------------------------------------------------------- topics


class TopicKind(enum.StrEnum):
    """The kinds of topic in the contract."""

    PACK_META = "packs/{pack}/meta"
    PACK_TELEMETRY = "packs/{pack}/telemetry"
    PACK_CELLS = "packs/{pack}/cells"
    PACK_STATUS = "packs/{pack}/status"
    SITE_TELEMETRY = "site/telemetry"
    TWIN_STATE = "twin/state"
    TWIN_PACK = "twin/packs/{pack}"
    TWIN_ALERTS = "twin/alerts"
    TWIN_STATUS = "twin/status"
    TWIN_DEADLETTER = "twin/deadletter"
    TRUTH_PACK = "truth/packs/{pack}"
    TRUTH_SITE = "truth/site"


_TOPIC_MODELS: Final[dict[TopicKind, type[Message]]] = {
    TopicKind.PACK_META: PackMeta,
    TopicKind.PACK_TELEMETRY: PackTelemetry,
    TopicKind.PACK_CELLS: PackCells,
    TopicKind.PACK_STATUS: PackStatus,
    TopicKind.SITE_TELEMETRY: SiteTelemetry,
    TopicKind.TWIN_STATE: TwinState,
    TopicKind.TWIN_PACK: TwinPackState,
    TopicKind.TWIN_ALERTS: Alert,
    TopicKind.TWIN_STATUS: TwinStatus,
    TopicKind.TWIN_DEADLETTER: DeadLetter,
}


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic of the contract, taken apart."""

    site: str
    kind: TopicKind
    pack: str | None = None


def is_identifier(value: str) -> bool:
    """Return whether ``value`` is a valid site, pack or alert identifier."""
    return _IDENTIFIER_RE.fullmatch(value) is not None


def _check_identifier(value: str, what: str) -> None:
    if not is_identifier(value):
        msg = f"bad {what} identifier {value[:80]!r}: must match {IDENTIFIER_PATTERN}"
        raise TopicError(msg, reason="bad_identifier")


def topic(kind: TopicKind, site: str, pack: str | None = None) -> str:
    """Build a contract topic.

    Args:
        kind: which topic.
        site: the site identifier.
        pack: the pack identifier, for per-pack topics.

    Returns:
        The topic string, e.g. ``microgrid/nevada/packs/P001/telemetry``.

    Raises:
        TopicError: an identifier breaks the rule, or ``pack`` is missing or superfluous.

    Examples:
        >>> topic(TopicKind.PACK_TELEMETRY, "nevada", "P001")
        'microgrid/nevada/packs/P001/telemetry'
    """
    _check_identifier(site, "site")
    needs_pack = "{pack}" in kind.value
    if needs_pack:
        if pack is None:
            msg = f"topic {kind.name} needs a pack identifier"
            raise TopicError(msg, reason="bad_topic")
        _check_identifier(pack, "pack")
        return f"{TOPIC_ROOT}/{site}/{kind.value.format(pack=pack)}"
    if pack is not None:
        msg = f"topic {kind.name} takes no pack identifier"
        raise TopicError(msg, reason="bad_topic")
    return f"{TOPIC_ROOT}/{site}/{kind.value}"


def subscription(kind: TopicKind, site: str) -> str:
    """Return the subscription filter for every topic of one kind at a site (``+`` for the pack)."""
    _check_identifier(site, "site")
    return f"{TOPIC_ROOT}/{site}/{kind.value.format(pack='+')}"


_PATTERNS: Final = [
    (kind, re.compile("^" + re.escape(kind.value).replace(r"\{pack\}", "(?P<pack>[^/]+)") + r"\Z"))
    for kind in TopicKind
]


def parse_topic(value: str) -> ParsedTopic:
    """Take a contract topic apart.

    Raises:
        TopicError: the topic is outside the contract (``reason="bad_topic"``) or an identifier
            in it breaks the rule (``reason="bad_identifier"``).

    Examples:
        >>> parse_topic("microgrid/nevada/packs/P001/telemetry")
        ParsedTopic(site='nevada', kind=<TopicKind.PACK_TELEMETRY: 'packs/{pack}/telemetry'>, pack='P001')
    """
    parts = value.split("/", 2)
    if len(value) > 1024 or len(parts) != 3 or parts[0] != TOPIC_ROOT:
        msg = f"topic {value[:120]!r} is not under {TOPIC_ROOT}/{{site}}/"
        raise TopicError(msg, reason="bad_topic")
    _, site, rest = parts
    _check_identifier(site, "site")
    for kind, pattern in _PATTERNS:
        match = pattern.match(rest)
        if match is not None:
            pack = match.groupdict().get("pack")
            if pack is not None:
                _check_identifier(pack, "pack")
            return ParsedTopic(site=site, kind=kind, pack=pack)
    msg = f"topic {value[:120]!r} is not in the contract"
    raise TopicError(msg, reason="bad_topic")


def model_for_topic(kind: TopicKind) -> type[Message]:
    """Return the payload model of a topic kind.

    Raises:
        TopicError: the kind has no model in the contract (the emulator-only truth topics).
    """
    try:
        return _TOPIC_MODELS[kind]
    except KeyError:
        msg = f"topic kind {kind.name} has no payload model in the contract"
        raise TopicError(msg, reason="bad_topic") from None


# --------------------------------------------------------------------------- payloads

_ERROR_REASONS: Final = {
    "missing": "missing_field",
    "extra_forbidden": "extra_field",
    "finite_number": "not_finite",
    "string_pattern_mismatch": "bad_identifier",
    "literal_error": "bad_value",
    "greater_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "too_short": "bad_length",
    "too_long": "bad_length",
    "string_too_long": "bad_length",
}


def _reason_of(error: ValidationError) -> tuple[str, str]:
    first = error.errors(include_url=False)[0]
    kind = str(first["type"])
    reason = _ERROR_REASONS.get(kind, "wrong_type" if kind.endswith("_type") else "invalid")
    where = ".".join(str(p) for p in first["loc"]) or "payload"
    return reason, f"{where}: {first['msg']}"


def decode(payload: bytes | str, model: type[Message] | None = None) -> Message:
    """Decode and validate one payload.

    Args:
        payload: the raw MQTT payload.
        model: the expected model (from the topic). When ``None``, the ``schema`` field picks it.

    Returns:
        The validated message.

    Raises:
        PayloadError: with ``reason`` one of ``oversize``, ``not_json``, ``not_object``,
            ``unknown_schema``, ``wrong_version``, ``schema_mismatch``, ``missing_field``,
            ``extra_field``, ``wrong_type``, ``not_finite``, ``out_of_range``,
            ``bad_identifier``, ``bad_value``, ``bad_length``, ``invalid``.

    Examples:
        >>> m = decode(b'{"schema": "pack_status/1", "pack": "P1", "state": "online"}')
        >>> m.state
        'online'
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        msg = f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        raise PayloadError(msg, reason="oversize")
    try:
        # Standard JSON has no NaN or Infinity; refuse Python's extension at the parser.
        data = json.loads(payload, parse_constant=_refuse_constant)
    except _NonFiniteError as exc:
        raise PayloadError(str(exc), reason="not_finite") from exc
    except RecursionError as exc:
        msg = "payload is not JSON the twin accepts: nested too deeply"
        raise PayloadError(msg, reason="not_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"payload is not JSON: {exc}"
        raise PayloadError(msg, reason="not_json") from exc
    if not isinstance(data, dict):
        msg = f"payload is a JSON {type(data).__name__}, not an object"
        raise PayloadError(msg, reason="not_object")
    schema = data.get("schema")
    if not isinstance(schema, str) or "/" not in schema:
        msg = "payload has no 'schema' field of the form 'name/version'"
        raise PayloadError(msg, reason="unknown_schema")
    name, _, version = schema.partition("/")
    found = MESSAGE_MODELS.get(name)
    if found is None:
        msg = f"unknown schema {schema[:64]!r}"
        raise PayloadError(msg, reason="unknown_schema")
    if version != str(CONTRACT_VERSION):
        msg = f"schema {schema[:64]!r}: version {version[:16]!r} is not supported (this twin speaks {CONTRACT_VERSION})"
        raise PayloadError(msg, reason="wrong_version")
    if model is not None and found is not model:
        msg = f"schema {schema!r} on a topic that carries {model.schema_name}/{CONTRACT_VERSION}"
        raise PayloadError(msg, reason="schema_mismatch")
    try:
        return found.model_validate(data)
    except ValidationError as exc:
        reason, detail = _reason_of(exc)
        msg = f"{schema}: {detail}"
        raise PayloadError(msg, reason=reason) from exc


class _NonFiniteError(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    msg = f"payload contains {name}, which is not a finite number"
    raise _NonFiniteError(msg)


_NULL_MEMBER: Final = re.compile(r',"[A-Za-z0-9_]+":null')


def encode_frame(frame: pl.DataFrame, model: type[Message]) -> list[bytes]:
    """Encode each row of ``frame`` as the JSON payload of ``model``, vectorised with polars.

    Columns are taken in the model's field order (those the frame has); the ``schema`` field
    comes first; null members are left out, as :func:`encode` leaves out ``None``.

    Examples:
        >>> frame = pl.DataFrame({"pack": ["P1", "P2"], "state": ["online", "offline"], "ts_ms": [None, 1_000]})
        >>> for payload in encode_frame(frame, PackStatus):
        ...     print(payload.decode())
        {"schema":"pack_status/1","pack":"P1","state":"online"}
        {"schema":"pack_status/1","pack":"P2","state":"offline","ts_ms":1000}
    """
    if frame.height == 0:
        return []
    schema = polars_schema(model)
    name = f"{model.schema_name}/{CONTRACT_VERSION}"
    cols = [pl.lit(name).alias("schema")] + [pl.col(k) for k in schema if k != "schema" and k in frame.columns]
    text = frame.select(pl.struct(cols).struct.json_encode().alias("j"))["j"]
    # Every member but "schema" (always first, never null) follows a comma, except the first
    # member of a nested object; strip null members in both places.
    text = (
        text.str.replace_all(_NULL_MEMBER.pattern, "")
        .str.replace_all(r'\{"[A-Za-z0-9_]+":null\}', "{}")
        .str.replace_all(r'\{"[A-Za-z0-9_]+":null,', "{")
    )
    return [t.encode() for t in text.to_list()]


def encode(message: Message) -> bytes:
    """Serialise a message to its compact JSON payload (with the ``schema`` field, no nulls)."""
    return message.model_dump_json(by_alias=True, exclude_none=True).encode()


# --------------------------------------------------------------------------- derived schemas


def json_schema(model: type[Message]) -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a payload model, in serialisation mode."""
    schema = model.model_json_schema(by_alias=True, mode="serialization")
    schema["$id"] = f"https://microgrid-twin.dev/schemas/{model.schema_name}.v{CONTRACT_VERSION}.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def json_schemas() -> dict[str, dict[str, Any]]:
    """Return every payload's JSON Schema, keyed by file name (``pack_telemetry.v1.json``)."""
    return {f"{name}.v{CONTRACT_VERSION}.json": json_schema(model) for name, model in MESSAGE_MODELS.items()}


def _polars_dtype(annotation: Any) -> pl.DataType:
    """Map a field annotation to a polars dtype (nullability is a property of every column)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _polars_dtype(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) != 1:
            msg = f"cannot map union {annotation!r} to one polars dtype"
            raise TypeError(msg)
        return _polars_dtype(inner[0])
    if origin is Literal:
        return pl.String()
    if origin is list:
        return pl.List(_polars_dtype(typing.get_args(annotation)[0]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pl.Struct(
            {(info.alias or name): _polars_dtype(info.annotation) for name, info in annotation.model_fields.items()}
        )
    simple: dict[Any, pl.DataType] = {bool: pl.Boolean(), int: pl.Int64(), float: pl.Float64(), str: pl.String()}
    if annotation in simple:
        return simple[annotation]
    msg = f"no polars dtype for annotation {annotation!r}"
    raise TypeError(msg)


def polars_schema(model: type[Message]) -> pl.Schema:
    """Return the polars schema of a payload model, derived from its fields.

    Column names are the JSON keys (``schema``, not ``schema_``).

    Examples:
        >>> dict(polars_schema(PackStatus))
        {'schema': String, 'pack': String, 'state': String, 'ts_ms': Int64}
    """
    return pl.Schema(
        {(info.alias or name): _polars_dtype(info.annotation) for name, info in model.model_fields.items()}
    )
