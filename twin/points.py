"""What reaches InfluxDB: declared as data, rendered to line protocol with polars.

Every measurement the twin writes is a :class:`MeasurementSpec`: its tags and a tuple of
:class:`PointDescription` (field, source column, unit, gauge or counter, type). The registry
:data:`MEASUREMENTS` holds them all; one generic function, :func:`render`, turns a polars
frame into line protocol for any of them, with polars expressions only (no Python loop per
row), and :func:`reference_line` is the slow, obviously correct encoder it is tested against.

Line protocol as written here (precision ``ms``; InfluxDB 1.x reference, checked on 1.6.7)::

    measurement,tag_a=x,tag_b=y field_1=1.5,field_2=3i,field_3=true,field_4="text" 1700000000000

* Tags are sorted by key. A null or empty tag value omits the tag.
* Tag values escape ``,`` ``=`` and space with a backslash. Backslashes stay literal: InfluxDB
  1.x keeps ``\\\\`` in a tag value as two backslashes (measured on 1.6.7), so doubling them
  would change the value.
* A newline or carriage return cannot appear in a tag value: it is written as the two
  characters ``\\n`` / ``\\r`` (as influxdb-client and Telegraf do), so a body never holds
  more lines than points (B3).
* A tag value ending in a backslash cannot be written at all (the backslash would escape the
  delimiter; InfluxDB answers "invalid tag format"). Such a row is dropped and counted rather
  than written to a different series.
* Floats are written in their shortest round-trip form (``repr``), integers with the ``i``
  suffix, booleans as ``true``/``false``, strings in double quotes with ``"`` and ``\\``
  escaped and newlines written as ``\\n`` / ``\\r``.
* A null field is omitted: the twin never writes 0 for a missing reading. NaN and
  infinities are not valid line protocol; such fields are dropped and counted. A row left
  without any field, or without a timestamp, is dropped and counted.

Examples:
    >>> import polars as pl
    >>> spec = MeasurementSpec(
    ...     "demo", tags=("site", "pack"), fields=(PointDescription("voltage_v", unit="V"),))
    >>> frame = pl.DataFrame({"pack": ["P 1", "P2"], "voltage_v": [3.7, None], "ts_ms": [1, 2]})
    >>> out = render(frame, spec, extra_tags={"site": "nevada"})
    >>> out.body
    b'demo,pack=P\\\\ 1,site=nevada voltage_v=3.7 1\\n'
    >>> (out.lines, out.dropped_rows, out.dropped_fields)
    (1, 1, 0)
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import polars as pl

__all__ = [
    "MEASUREMENTS",
    "FieldType",
    "Kind",
    "MeasurementSpec",
    "PointDescription",
    "Rendered",
    "escape_key",
    "escape_measurement",
    "escape_string_value",
    "escape_tag_value",
    "field_keys",
    "reference_line",
    "render",
]

FieldType = type[float] | type[int] | type[bool] | type[str]

# Names the twin declares itself: plain identifiers, so they need no escaping anywhere.
_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# InfluxDB 1.x refuses a tag or field called "time".
_RESERVED: Final = frozenset({"time"})
_NO_TAGS: Final[Mapping[str, str]] = MappingProxyType({})

_TAG_ESCAPES: Final = {",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n", "\r": "\\r"}
_STRING_ESCAPES: Final = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"}


class Kind(enum.StrEnum):
    """How a field behaves over time (what Grafana should do with it)."""

    GAUGE = "gauge"
    """A reading: plot it as is."""
    COUNTER = "counter"
    """Monotonically increasing since the start of the process: plot its rate."""


@dataclass(frozen=True, slots=True)
class PointDescription:
    """One field of a measurement: where its value comes from, its unit and its type.

    Args:
        field: the InfluxDB field key. With ``per_element`` it is a template with an
            ``{index}`` placeholder, e.g. ``"cell_v_{index:03d}"``.
        column: the frame column holding the value; defaults to ``field``.
        unit: the unit, for dashboards and documentation (``"V"``, ``"A"``, ``"1"`` for fractions).
        kind: :attr:`Kind.GAUGE` or :attr:`Kind.COUNTER`.
        dtype: ``float``, ``int``, ``bool`` or ``str``: the line-protocol type written.
        per_element: the column is a list; element ``i`` becomes field ``field.format(index=i)``.
        description: one line for dashboards.

    Raises:
        ValueError: a bad field key, type or template.
    """

    field: str
    column: str | None = None
    unit: str = ""
    kind: Kind = Kind.GAUGE
    dtype: FieldType = float
    per_element: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        """Validate the key, the type and the template."""
        if self.dtype not in (float, int, bool, str):
            msg = f"field {self.field!r}: dtype must be float, int, bool or str, not {self.dtype!r}"
            raise ValueError(msg)
        if self.per_element:
            if "{index" not in self.field or self.dtype not in (float, int):
                msg = f"per-element field {self.field!r} needs an {{index}} placeholder and a numeric dtype"
                raise ValueError(msg)
            sample = self.field.format(index=0)
        else:
            sample = self.field
        if not _NAME_RE.fullmatch(sample) or sample in _RESERVED:
            msg = f"field key {self.field!r} must match {_NAME_RE.pattern} and not be 'time'"
            raise ValueError(msg)

    @property
    def source(self) -> str:
        """Return the column the value is read from."""
        return self.column or self.field

    def key(self, index: int | None = None) -> str:
        """Return the field key (for a per-element field, the key of element ``index``)."""
        return self.field.format(index=index) if self.per_element else self.field


@dataclass(frozen=True, slots=True)
class MeasurementSpec:
    """A measurement: its tags, its fields and its time column.

    Args:
        name: the measurement name.
        tags: tag keys; each is read from the frame column of the same name, or given as a
            constant in ``render(..., extra_tags=...)``. Written sorted by key.
        fields: the declared fields, written in this order.
        time_column: the column with the point's event time, integer ms since the epoch
            (a polars ``Datetime`` column is accepted too).
        open_fields: also write every other numeric or boolean column of the frame as a field
            (for service counters that grow with the code, like ``invalid_{reason}``).
        description: one line for dashboards.

    Raises:
        ValueError: a bad name, a duplicate key, or a key that is both tag and field.
    """

    name: str
    tags: tuple[str, ...]
    fields: tuple[PointDescription, ...]
    time_column: str = "ts_ms"
    open_fields: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        """Validate names and keys."""
        for what, value in (("measurement", self.name), *(("tag", t) for t in self.tags)):
            if not _NAME_RE.fullmatch(value) or value in _RESERVED:
                msg = f"{what} name {value!r} must match {_NAME_RE.pattern} and not be 'time'"
                raise ValueError(msg)
        if len(set(self.tags)) != len(self.tags):
            msg = f"measurement {self.name}: duplicate tag keys in {self.tags}"
            raise ValueError(msg)
        templates = [f.field for f in self.fields]
        if len(set(templates)) != len(templates):
            msg = f"measurement {self.name}: duplicate field keys"
            raise ValueError(msg)
        clash = set(self.tags) & set(templates)
        if clash:
            msg = f"measurement {self.name}: {sorted(clash)} are both tag and field"
            raise ValueError(msg)
        if self.time_column in self.tags or self.time_column in {f.source for f in self.fields}:
            msg = f"measurement {self.name}: the time column {self.time_column!r} is also a tag or field"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A line-protocol body and what was left out of it.

    Attributes:
        body: UTF-8 line protocol, one point per ``\\n``-terminated line (empty when no line).
        lines: the number of points in ``body`` (always ``body.count(b"\\n")``).
        dropped_rows: rows not written: no timestamp, no field left, or an unrepresentable tag value.
        dropped_fields: non-null values not written: NaN, infinities, integers out of range.
    """

    body: bytes
    lines: int
    dropped_rows: int
    dropped_fields: int


# --------------------------------------------------------------------------- the registry


def _g(field: str, unit: str, dtype: FieldType = float, *, description: str = "") -> PointDescription:
    return PointDescription(field, unit=unit, kind=Kind.GAUGE, dtype=dtype, description=description)


def _c(field: str, description: str = "") -> PointDescription:
    return PointDescription(field, unit="1", kind=Kind.COUNTER, dtype=int, description=description)


PACK_TELEMETRY: Final = MeasurementSpec(
    "pack_telemetry",
    tags=("site", "pack", "chemistry", "life"),
    fields=(
        PointDescription("seq", unit="1", kind=Kind.COUNTER, dtype=int, description="per-pack sequence number"),
        _g("voltage_v", "V"),
        _g("current_a", "A", description="positive on discharge"),
        _g("temp_min_c", "°C"),
        _g("temp_max_c", "°C"),
        _g("temp_avg_c", "°C"),
        _g("cell_v_min_v", "V"),
        _g("cell_v_max_v", "V"),
        _g("cell_v_min_idx", "1", int),
        _g("cell_v_max_idx", "1", int),
        _g("soc_bms", "1", description="SoC as the BMS reports it"),
        _g("soh_bms", "1", description="SoH as the BMS reports it"),
        _g("contactor_closed", "", bool),
        _g("fault_bits", "", int),
    ),
    description="the packs' BMS telemetry, as measured",
)

PACK_CELLS: Final = MeasurementSpec(
    "pack_cells",
    tags=("site", "pack"),
    fields=(
        PointDescription("seq", unit="1", kind=Kind.COUNTER, dtype=int),
        PointDescription("cell_v_{index:03d}", column="cell_voltages_v", unit="V", per_element=True),
        PointDescription("temp_c_{index}", column="temps_c", unit="°C", per_element=True),
    ),
    description="every series cell group's voltage and the temperature sensors",
)

_BANDS: Final = ("", "_p5", "_p95")

SITE_STATE: Final = MeasurementSpec(
    "site_state",
    tags=("site",),
    fields=(
        _g("packs_total", "1", int),
        _g("packs_online", "1", int),
        _g("packs_offline", "1", int),
        _g("packs_excluded", "1", int),
        _g("load_w", "W", description="data-centre load, measured"),
        _g("solar_w", "W"),
        _g("grid_w", "W", description="positive on import"),
        _g("battery_w", "W", description="positive on discharge"),
        _g("ambient_c", "°C"),
        *(_g(f"soc{b}", "1") for b in _BANDS),
        *(_g(f"energy_to_floor_kwh{b}", "kWh") for b in _BANDS),
        _g("max_discharge_w", "W"),
        *(_g(f"runtime_s_{p}", "s") for p in ("p5", "p50", "p95")),
        *(_g(f"ridethrough_s_{p}", "s") for p in ("p5", "p50", "p95")),
    ),
    description="the twin's site estimates and the site meter",
)

PACK_STATE: Final = MeasurementSpec(
    "pack_state",
    tags=("site", "pack", "chemistry", "life"),
    fields=(
        _g("online", "", bool),
        _g("available", "", bool),
        _g("soc", "1"),
        _g("soc_std", "1"),
        _g("soc_bms", "1"),
        *(_g(f"energy_to_floor_kwh{b}", "kWh") for b in _BANDS),
        _g("capacity_ah", "Ah"),
        _g("capacity_ah_std", "Ah"),
        _g("soh", "1"),
        _g("soh_std", "1"),
        _g("soh_bms", "1"),
        _g("resistance_ohm", "Ω"),
        _g("resistance_growth", "1"),
        *(_g(f"rul_days_{p}", "d") for p in ("p5", "p50", "p95")),
        _g("rul_efc_p50", "1"),
        _g("knee", "", bool),
        _g("knee_onset_ms", "ms", int),
        _g("anomaly_score", "1"),
    ),
    description="the twin's per-pack estimates, with their bands",
)

ALERTS: Final = MeasurementSpec(
    "alerts",
    tags=("site", "kind", "severity", "pack"),
    fields=(
        _g("state", "", str, description="raised or cleared"),
        _g("value", ""),
        _g("threshold", ""),
        _g("message", "", str),
        _g("cell", "1", int),
        _g("alert_id", "", str),
    ),
    description="alerts raised and cleared",
)

TWIN_HEALTH: Final = MeasurementSpec(
    "twin_health",
    tags=("site",),
    fields=(
        _c("received", "MQTT messages received"),
        _c("accepted", "messages that passed validation"),
        _c("duplicates", "re-delivered (pack, seq) seen before"),
        _c("late", "messages older than the late window"),
        _c("written_points", "points InfluxDB acknowledged"),
        _c("write_retries", "write attempts retried"),
        _c("deadlettered", "messages or points dead-lettered"),
        _c("acked", "MQTT messages acknowledged"),
        PointDescription("queue_depth", unit="1", dtype=int, description="messages waiting"),
        PointDescription("lag_ms", unit="ms", description="event time to write acknowledgement"),
    ),
    open_fields=True,
    description="the service's own counters; invalid_{reason} and other numeric columns are added as they come",
)

MEASUREMENTS: Final[Mapping[str, MeasurementSpec]] = MappingProxyType(
    {spec.name: spec for spec in (PACK_TELEMETRY, PACK_CELLS, SITE_STATE, PACK_STATE, ALERTS, TWIN_HEALTH)}
)


# --------------------------------------------------------------------------- escaping (scalar)


def escape_measurement(name: str) -> str:
    """Escape a measurement name: a backslash before each comma and space.

    Raises:
        ValueError: the name is empty, or holds a newline or carriage return.
    """
    if not name or "\n" in name or "\r" in name:
        msg = f"measurement name {name!r} cannot be written in line protocol"
        raise ValueError(msg)
    return "".join("\\" + ch if ch in (",", " ") else ch for ch in name)


def escape_key(key: str) -> str:
    """Escape a tag or field key: a backslash before each comma, equals sign and space.

    Raises:
        ValueError: the key is empty or ``time``, ends with a backslash, or holds a newline.
    """
    if not key or key in _RESERVED or key.endswith("\\") or "\n" in key or "\r" in key:
        msg = f"key {key!r} cannot be written in line protocol"
        raise ValueError(msg)
    return "".join("\\" + ch if ch in (",", "=", " ") else ch for ch in key)


def escape_tag_value(value: str) -> str:
    """Escape a tag value: ``,`` ``=`` space get a backslash; newline and CR become ``\\n``/``\\r``.

    Written character by character, independently of the tables :func:`render` uses, so that
    the two can be tested against each other. A value ending in a backslash cannot be written
    at all; callers check that first.
    """
    out = []
    for ch in value:
        if ch in (",", "=", " "):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        else:
            out.append(ch)
    return "".join(out)


def escape_string_value(value: str) -> str:
    """Escape a string field value (without its quotes): ``\\`` and ``"``; newline and CR as ``\\n``/``\\r``."""
    out = []
    for ch in value:
        if ch in ("\\", '"'):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        else:
            out.append(ch)
    return "".join(out)


def reference_line(
    measurement: str,
    tags: Mapping[str, str | None],
    fields: Mapping[str, float | int | bool | str | None],
    ts_ms: int,
) -> str:
    """Encode one point the slow, obvious way: the oracle for :func:`render`.

    Args:
        measurement: the measurement name.
        tags: tag values by key; ``None`` or ``""`` omits the tag.
        fields: field values by key, written in this order; ``None``, NaN and infinities are
            omitted. ``bool`` before ``int``: Python booleans are integers.
        ts_ms: the timestamp, integer ms since the epoch.

    Returns:
        The line without its terminating newline, or ``""`` when the point cannot be
        written: no field is left, or a tag value ends with a backslash.

    Raises:
        TypeError: a field value of another type.
        ValueError: a measurement name or key that cannot be written.
    """
    head = escape_measurement(measurement)
    for key in sorted(tags):
        value = tags[key]
        if value is None or value == "":
            continue
        if value.endswith("\\"):
            return ""
        head += "," + escape_key(key) + "=" + escape_tag_value(value)
    parts = []
    for key, field in fields.items():
        if field is None:
            continue
        if isinstance(field, bool):
            text = "true" if field else "false"
        elif isinstance(field, int):
            text = f"{field}i"
        elif isinstance(field, float):
            if not math.isfinite(field):
                continue
            text = repr(field)
        elif isinstance(field, str):
            text = '"' + escape_string_value(field) + '"'
        else:
            msg = f"field {key!r}: cannot write a {type(field).__name__}"
            raise TypeError(msg)
        parts.append(escape_key(key) + "=" + text)
    if not parts:
        return ""
    return f"{head} {','.join(parts)} {int(ts_ms)}"


# --------------------------------------------------------------------------- vectorised rendering

_INT64_MAX: Final = 2**63 - 1
_TAG_SPECIALS: Final = r"[,= \n\r]"


@dataclass(frozen=True, slots=True)
class _Field:
    key: str  # escaped
    source: pl.Expr
    dtype: FieldType
    source_dtype: pl.DataType


def _fields_of(frame: pl.DataFrame, spec: MeasurementSpec, tag_columns: set[str]) -> list[_Field]:
    """Resolve the spec's fields against the frame: list fields expanded, open fields added."""
    schema = frame.schema
    missing = sorted({d.source for d in spec.fields} - set(schema))
    if missing:
        msg = f"measurement {spec.name}: the frame has no column {missing} (add it as nulls if the value is unknown)"
        raise ValueError(msg)
    out: list[_Field] = []
    for desc in spec.fields:
        dtype = schema[desc.source]
        if not desc.per_element:
            out.append(_Field(desc.field, pl.col(desc.source), desc.dtype, dtype))
            continue
        if not isinstance(dtype, pl.List):
            msg = f"measurement {spec.name}: per-element field {desc.field!r} needs a list column, got {dtype}"
            raise TypeError(msg)
        inner = dtype.inner if isinstance(dtype.inner, pl.DataType) else dtype.inner()
        longest = frame.get_column(desc.source).list.len().max()
        count = int(longest) if isinstance(longest, int) else 0
        out.extend(
            _Field(desc.key(i), pl.col(desc.source).list.get(i, null_on_oob=True), desc.dtype, inner)
            for i in range(count)
        )
    if spec.open_fields:
        declared = {d.source for d in spec.fields} | tag_columns | {spec.time_column}
        for name, dtype in schema.items():
            if name in declared:
                continue
            kind: FieldType
            if dtype == pl.Boolean:
                kind = bool
            elif dtype.is_integer():
                kind = int
            elif dtype.is_float():
                kind = float
            else:
                msg = f"measurement {spec.name}: extra column {name!r} is {dtype}, not numeric or boolean"
                raise TypeError(msg)
            out.append(_Field(escape_key(name), pl.col(name), kind, dtype))
    return out


def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float()


def _converted(spec: MeasurementSpec, field: _Field) -> tuple[pl.Expr, pl.Expr, bool]:
    """Return the value in its written type, twice, and whether a value can be unwritable.

    The first expression is null wherever the value cannot be written (NaN, infinities,
    out of the int64 range); the second skips that guard, for columns the probe found clean.
    """
    src, dtype, want = field.source, field.source_dtype, field.dtype
    guarded: pl.Expr | None = None
    if want is str:
        plain = src if dtype == pl.String else src.cast(pl.String)
    elif want is bool and dtype == pl.Boolean:
        plain = src
    elif want is bool and dtype.is_integer():
        plain = src != 0
    elif want is int and dtype.is_integer():
        plain = src
        if dtype == pl.UInt64:
            plain = src.cast(pl.Int64, strict=False)
            guarded = pl.when(src <= _INT64_MAX).then(plain).otherwise(None)
    elif want is int and dtype.is_float():
        # Rounded half to even; NaN, infinities and values outside int64 become null.
        plain = guarded = src.round(0).cast(pl.Int64, strict=False)
    elif want is float and _is_numeric(dtype):
        plain = src if dtype == pl.Float64 else src.cast(pl.Float64)
        if dtype.is_float():
            guarded = pl.when(plain.is_finite()).then(plain).otherwise(None)
    else:
        msg = f"measurement {spec.name}: field {field.key!r} cannot be written as {want.__name__} from {dtype}"
        raise TypeError(msg)
    return (plain if guarded is None else guarded), plain, guarded is not None


def _text(field: _Field, value: pl.Expr) -> pl.Expr:
    """Return the line-protocol text of a converted value (null stays null)."""
    if field.dtype is str:
        return pl.concat_str([pl.lit('"'), value.str.replace_many(_STRING_ESCAPES), pl.lit('"')])
    if field.dtype is int:
        return pl.concat_str([value.cast(pl.String), pl.lit("i")])
    return value.cast(pl.String)


def _repr_floats(frame: pl.DataFrame, text: pl.Expr, value: pl.Expr) -> pl.Series:
    """Return the text of a float column with its tiny values rewritten to Python's ``repr``.

    polars prints 1e-5 <= |x| < 1e-4 as ``0.0000...`` and exponents down to -9 without the
    zero padding of ``repr`` (``1e-7``, not ``1e-07``); both still round-trip, but the body is
    specified as ``repr``. Only the few tiny values are rewritten, then scattered back.
    """
    texts = frame.select(text).to_series()
    rows = frame.select(pl.arg_where((value.abs() < 1e-4) & (value != 0))).to_series()
    fixed = (
        texts.gather(rows)
        .str.replace(r"^(-?)0\.0000([1-9])(\d*)$", "${1}${2}.${3}e-05")
        .str.replace(r"\.?e-0?(\d)$", "e-0${1}")
    )
    return texts.scatter(rows, fixed)


def _time_expr(frame: pl.DataFrame, spec: MeasurementSpec) -> pl.Expr:
    if spec.time_column not in frame.schema:
        msg = f"measurement {spec.name}: the frame has no time column {spec.time_column!r}"
        raise ValueError(msg)
    dtype = frame.schema[spec.time_column]
    col = pl.col(spec.time_column)
    if isinstance(dtype, pl.Datetime):
        return col.dt.epoch("ms")
    if not dtype.is_integer():
        msg = f"measurement {spec.name}: time column {spec.time_column!r} must be integer ms or Datetime, not {dtype}"
        raise TypeError(msg)
    return col if dtype == pl.Int64 else col.cast(pl.Int64)


def _tag_columns(frame: pl.DataFrame, spec: MeasurementSpec, extra_tags: Mapping[str, str]) -> dict[str, pl.Expr]:
    """Check the tags and return the tag columns (as strings) by key."""
    unknown = sorted(set(extra_tags) - set(spec.tags))
    if unknown:
        msg = f"measurement {spec.name}: extra tags {unknown} are not declared (tags: {spec.tags})"
        raise ValueError(msg)
    columns: dict[str, pl.Expr] = {}
    for key in spec.tags:
        if key in extra_tags:
            value = extra_tags[key]
            if key in frame.schema:
                msg = f"measurement {spec.name}: tag {key!r} is both a column and an extra tag"
                raise ValueError(msg)
            if not value or value.endswith("\\"):
                msg = f"measurement {spec.name}: extra tag {key}={value!r} cannot be written"
                raise ValueError(msg)
        elif key in frame.schema:
            columns[key] = pl.col(key) if frame.schema[key] == pl.String else pl.col(key).cast(pl.String)
        else:
            msg = f"measurement {spec.name}: tag {key!r} is neither a column nor an extra tag"
            raise ValueError(msg)
    return columns


def _probe(
    frame: pl.DataFrame,
    ts: pl.Expr,
    tags: Mapping[str, pl.Expr],
    fields: Sequence[_Field],
    converted: Sequence[tuple[pl.Expr, pl.Expr, bool]],
) -> dict[str, Any]:
    """Find, in one pass, which columns hold nulls, unwritable values, special characters or tiny floats."""
    probes: list[pl.Expr] = [ts.is_null().any().alias("ts_null")]
    for key, value in tags.items():
        probes += [
            (value.is_null() | (value == "")).any().alias(f"t{key}_missing"),
            value.str.ends_with("\\").any().alias(f"t{key}_bad"),
            value.str.contains(_TAG_SPECIALS).any().alias(f"t{key}_special"),
        ]
    for i, (field, (value, _, can_drop)) in enumerate(zip(fields, converted, strict=True)):
        probes.append(value.is_null().any().alias(f"f{i}_missing"))
        if can_drop:
            probes.append((field.source.is_not_null() & value.is_null()).sum().alias(f"f{i}_dropped"))
        if field.dtype is float and field.source_dtype.is_float():
            probes.append(((field.source.abs() < 1e-4) & (field.source != 0)).any().alias(f"f{i}_tiny"))
    return frame.select(probes).row(0, named=True)


def _head_items(
    spec: MeasurementSpec, tags: Mapping[str, pl.Expr], extra_tags: Mapping[str, str], flags: Mapping[str, Any]
) -> tuple[list[pl.Expr], str, list[pl.Expr]]:
    """Return the pieces of ``measurement,tag=value,...``, the literal still pending, and row filters."""
    items: list[pl.Expr] = []
    keep: list[pl.Expr] = []
    literal = escape_measurement(spec.name)
    for key in sorted(spec.tags):
        if key in extra_tags:
            literal += f",{escape_key(key)}={escape_tag_value(extra_tags[key])}"
            continue
        value = tags[key]
        escaped = value.str.replace_many(_TAG_ESCAPES) if flags[f"t{key}_special"] else value
        if flags[f"t{key}_bad"]:
            keep.append(~value.str.ends_with("\\").fill_null(False))
        if flags[f"t{key}_missing"]:
            items += [pl.lit(literal), pl.when(value != "").then(pl.concat_str([pl.lit(f",{key}="), escaped]))]
        else:
            items += [pl.lit(literal + f",{key}="), escaped]
        literal = ""
    return items, literal, keep


def _field_items(
    fields: Sequence[_Field], texts: Sequence[pl.Expr], present: Sequence[bool], literal: str
) -> tuple[list[pl.Expr], str, list[pl.Expr]]:
    """Return the pieces of ``field=value,...`` (after ``literal``), the literal pending, and row filters.

    A field present in every row is two plain pieces; one that may be missing is one nested
    piece, null as a whole, so that ``concat_str(..., ignore_nulls=True)`` drops key and value.
    """
    items: list[pl.Expr] = []
    if fields and present[0]:
        for i, (f, t) in enumerate(zip(fields, texts, strict=True)):
            prefix = f"{f.key}=" if i == 0 else f",{f.key}="
            if present[i]:
                items += [pl.lit(literal + prefix), t]
            else:
                items += [pl.lit(literal), pl.concat_str([pl.lit(prefix), t])]
            literal = ""
        return items, literal, []
    # The first field may be missing: build the section apart and cut its leading comma.
    pieces = [pl.concat_str([pl.lit(f",{f.key}="), t]) for f, t in zip(fields, texts, strict=True)]
    section = pl.concat_str(pieces, ignore_nulls=True).str.slice(1) if pieces else pl.lit("")
    keep = [] if any(present) else [section != ""]
    return [pl.lit(literal), section], "", keep


def render(frame: pl.DataFrame, spec: MeasurementSpec, *, extra_tags: Mapping[str, str] = _NO_TAGS) -> Rendered:
    """Render a frame to line protocol (precision ms), vectorised.

    One probing pass over the frame finds which columns hold nulls, NaN, special characters
    or tiny floats; the line is then one ``concat_str`` whose pieces are plain for clean
    columns and null-aware for the others. No Python code runs per row.

    Args:
        frame: one row per point; holds the spec's time column, its field columns and the
            tag columns not given in ``extra_tags``. Other columns are ignored (unless the
            spec has ``open_fields``).
        spec: what to write.
        extra_tags: constant tags for every row (e.g. ``{"site": "nevada"}``); each must be a
            declared tag that is not also a column.

    Returns:
        The body and what was left out. Rows keep their order.

    Raises:
        ValueError: a declared column is missing, or an extra tag is undeclared or unwritable.
        TypeError: a column has a type that cannot be written as its declared type.
    """
    tags = _tag_columns(frame, spec, extra_tags)
    fields = _fields_of(frame, spec, set(tags))
    ts = _time_expr(frame, spec)
    if frame.height == 0:
        return Rendered(b"", 0, 0, 0)
    converted = [_converted(spec, f) for f in fields]
    flags = _probe(frame, ts, tags, fields, converted)

    head, literal, keep = _head_items(spec, tags, extra_tags, flags)
    present = [not flags[f"f{i}_missing"] for i in range(len(fields))]
    texts = [
        _text(f, plain if ok else guarded)
        for f, (guarded, plain, _), ok in zip(fields, converted, present, strict=True)
    ]
    extra: dict[str, pl.Series] = {}
    for i, (guarded, plain, _) in enumerate(converted):
        if flags.get(f"f{i}_tiny"):
            name = f"\x00lp_text_{i}"
            extra[name] = _repr_floats(frame, texts[i], plain if present[i] else guarded)
            texts[i] = pl.col(name)
    if extra:
        frame = frame.with_columns(**extra)
    body_items, literal, keep_fields = _field_items(fields, texts, present, literal + " ")
    keep += keep_fields
    if flags["ts_null"]:
        keep.append(ts.is_not_null())
    line = pl.concat_str(
        [*head, *body_items, pl.lit(literal + " "), ts.cast(pl.String), pl.lit("\n")], ignore_nulls=True
    )

    rows = frame.filter(pl.all_horizontal(keep)) if keep else frame
    lines = rows.select(line).to_series()
    # Through Binary, polars hands over the bytes in one copy (no Python str in between).
    body = lines.str.join("").cast(pl.Binary).item() if lines.len() else b""
    written = lines.len()
    dropped_fields = sum(int(flags.get(f"f{i}_dropped") or 0) for i in range(len(fields)))
    return Rendered(body=body, lines=written, dropped_rows=frame.height - written, dropped_fields=dropped_fields)


def field_keys(spec: MeasurementSpec, frame: pl.DataFrame | None = None) -> Sequence[str]:
    """Return the field keys a spec writes (for a frame: list fields expanded, open fields added)."""
    if frame is None:
        return tuple(d.field for d in spec.fields)
    return tuple(f.key for f in _fields_of(frame, spec, {t for t in spec.tags if t in frame.schema}))
