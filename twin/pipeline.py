"""Decode and validate MQTT micro-batches in bulk with polars (pure: no I/O, no clock, no logging).

The twin receives telemetry as micro-batches of ``(topic, payload)`` pairs. :func:`decode_batch`
turns one batch into a frame per message kind, with the contract's declared polars schema, and a
frame of rejects with their reasons. The verdict for every message equals the per-message
reference, which is::

    parse_topic(topic)                    -> bad_topic / bad_identifier
    parsed.site == site                   -> wrong_site
    parsed.kind is an ingest kind         -> bad_topic
    contract.decode(payload, model)       -> oversize, not_json, ..., invalid
    payload pack (site) == topic pack (site) -> pack_mismatch (site_mismatch)

How a batch is decoded, without a Python loop per message on the happy path:

1. Topics are taken apart with two regex passes over the topic column, with ``parse_topic``'s
   exact semantics (including Python's ``$``, which also matches before a final newline).
2. Payloads are screened in bulk. A payload goes to the *fast path* when it is UTF-8, starts
   with ``{``, ends with ``}``, holds no backslash (so no string escapes, hence no quote inside a
   string), no raw newline (so it is exactly one NDJSON line) and no more brackets than a valid
   message can have. Anything else goes straight to the reference, one message at a time.
3. Per message kind, fast-path payloads are joined into NDJSON and read with the contract's
   polars schema (declared, never inferred). For ``int``, ``float``, ``bool`` and lists polars
   is as strict as pydantic's strict mode: an int is taken for a float, but a float, bool or
   string is never taken for an int, nor a string for a float. Read with ``ignore_errors``, such
   a value becomes null; step 5 then sends its row to the reference, so a wrong type costs no
   extra read. What still fails the read is JSON that polars cannot parse (``NaN``, a bad
   number, broken syntax). The failing group's payloads are then parsed one by one in a single
   vectorised pass (``str.json_path_match``); the ones that do not parse go to the reference and
   the rest is read again. Should that read fail too, the group is bisected and the halves are
   read again, down to single messages, which go to the reference: one bad message costs at
   most O(log n) extra reads (in practice one).
4. Each row is then checked with polars expressions derived from the pydantic models (never a
   second copy of the constraints): the ``schema`` field, missing fields, ranges, finiteness,
   patterns, lengths, ``Literal`` values, list items, the nested first-life record, and the
   pack or site against the topic. The reason is the first failing check in field order,
   within a field in pydantic's order, which is what ``contract.decode`` reports (pydantic's
   first error); the reason names come from the contract's own table.
5. What the NDJSON reader cannot see is resolved from the raw text, which has no quote inside a
   string (it has no backslash): a key given as ``null`` (or nulled by ``ignore_errors``)
   versus an absent key, keys the schema does not know, and duplicated keys (polars keeps the
   first value, Python's ``json`` the last). Each key is followed by the only ``:`` outside a
   string, so the row's count of keys must equal its count of non-null values; a row where it
   does not goes to the reference. polars also turns a number, bool, list or object given for a
   *string* field into text; such text is recognisable by its first character, and only then
   is the raw payload searched for the opening quote of the value.

The reference for one message is :func:`twin.contract.decode`; the only deviation is a payload
nested so deeply that Python's ``json`` raises ``RecursionError`` (``contract.decode`` lets it
escape): it is rejected here as ``not_json``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Final, Literal

import annotated_types as at
import polars as pl
from pydantic import BaseModel, StringConstraints
from pydantic.fields import FieldInfo

from twin import contract
from twin.contract import (
    CONTRACT_VERSION,
    IDENTIFIER_PATTERN,
    MAX_PAYLOAD_BYTES,
    MESSAGE_MODELS,
    TOPIC_ROOT,
    Message,
    TopicKind,
    is_identifier,
    model_for_topic,
    polars_schema,
)
from twin.errors import PayloadError, TopicError

__all__ = ["EXCERPT_CHARS", "INGEST_KINDS", "REJECTS_SCHEMA", "Decoded", "check_rows", "decode_batch", "output_schema"]

#: How many characters of a refused payload the rejects frame keeps.
EXCERPT_CHARS: Final = 200

#: The topics the twin ingests, and the :class:`Decoded` frame each one lands in.
INGEST_KINDS: Final[dict[TopicKind, str]] = {
    TopicKind.PACK_TELEMETRY: "telemetry",
    TopicKind.PACK_CELLS: "cells",
    TopicKind.PACK_META: "meta",
    TopicKind.PACK_STATUS: "status",
    TopicKind.SITE_TELEMETRY: "site",
}

#: The schema of :attr:`Decoded.rejects`.
REJECTS_SCHEMA: Final = pl.Schema(
    {
        "msg": pl.Int64(),
        "topic": pl.String(),
        "reason": pl.String(),
        "detail": pl.String(),
        "payload_excerpt": pl.String(),
    }
)

_MAX_TOPIC_CHARS: Final = 1024
_NO_CODE: Final = pl.lit(None, dtype=pl.UInt16)
# What polars raises on input it cannot take; a panic is a polars bug, but must not poison a batch.
_POLARS_FAILURES: Final = (pl.exceptions.PolarsError, pl.exceptions.PanicException)
# A string column holds text polars made from a number, bool, list or object only if it starts so.
_MAYBE_NOT_STRING: Final = r"^(?:[-0-9\[{]|true$|false$)"
_JSON_WS: Final = r"[ \t\r\n]*"
# A key: a string followed by a colon. Exact on a parsed payload that has no backslash.
_KEY_RX: Final = rf'"[^"]*"{_JSON_WS}:'
_PLAIN_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded batch: a frame per ingest kind, and the rejects.

    Every frame starts with ``msg``, the message's index in the input batch, and is sorted by it.
    The kind frames have :func:`output_schema` of their model: the contract's polars schema
    without the ``schema`` column, with defaults filled in for absent fields.

    Attributes:
        telemetry: ``packs/{pack}/telemetry`` (:class:`~twin.contract.PackTelemetry`).
        cells: ``packs/{pack}/cells`` (:class:`~twin.contract.PackCells`).
        meta: ``packs/{pack}/meta`` (:class:`~twin.contract.PackMeta`).
        status: ``packs/{pack}/status`` (:class:`~twin.contract.PackStatus`).
        site: ``site/telemetry`` (:class:`~twin.contract.SiteTelemetry`).
        rejects: refused messages, with :data:`REJECTS_SCHEMA`: ``reason`` is the
            machine-readable reason, ``payload_excerpt`` the first :data:`EXCERPT_CHARS`
            characters of the payload decoded as UTF-8 with ``errors="replace"``.
    """

    telemetry: pl.DataFrame
    cells: pl.DataFrame
    meta: pl.DataFrame
    status: pl.DataFrame
    site: pl.DataFrame
    rejects: pl.DataFrame

    def accepted(self) -> int:
        """Return how many messages were accepted, over every kind."""
        return sum(getattr(self, name).height for name in INGEST_KINDS.values())

    def rejected(self) -> int:
        """Return how many messages were refused."""
        return self.rejects.height


def output_schema(model: type[Message]) -> pl.Schema:
    """Return the schema of a :class:`Decoded` kind frame: ``msg`` and the model's columns but ``schema``."""
    columns = {name: dtype for name, dtype in polars_schema(model).items() if name != "schema"}
    return pl.Schema({"msg": pl.Int64(), **columns})


def decode_batch(topics: Sequence[str], payloads: Sequence[bytes], *, site: str) -> Decoded:
    """Decode and validate one micro-batch of MQTT messages.

    Args:
        topics: the topic of each message.
        payloads: the raw payload of each message, in the same order.
        site: the site this twin serves; topics of other sites are refused (``wrong_site``).

    Returns:
        The accepted messages per kind and the refused ones with their reasons; every input
        message is in exactly one frame. The inputs are not modified.

    Raises:
        ValueError: ``topics`` and ``payloads`` differ in length.
        TopicError: ``site`` is not a valid identifier.

    Examples:
        >>> from twin.contract import PackStatus, encode
        >>> ok = encode(PackStatus(pack="P1", state="online"))
        >>> out = decode_batch(
        ...     ["microgrid/nv/packs/P1/status", "microgrid/nv/packs/P2/status", "microgrid/nv/packs/P1/status"],
        ...     [ok, ok, b"{oops"],
        ...     site="nv",
        ... )
        >>> out.status["pack"].to_list(), out.rejects["reason"].to_list()
        (['P1'], ['pack_mismatch', 'not_json'])
    """
    if len(topics) != len(payloads):
        msg = f"got {len(topics)} topics but {len(payloads)} payloads"
        raise ValueError(msg)
    if not is_identifier(site):
        msg = f"bad site identifier {site[:80]!r}: must match {IDENTIFIER_PATTERN}"
        raise TopicError(msg, reason="bad_identifier")
    frame = _screened(_input_frame(topics, payloads), site)
    out = _Collector()
    refused = frame.filter(pl.col("__case").is_not_null())
    if refused.height:
        out.add_refused(refused, _topic_cases(site))
        frame = frame.filter(pl.col("__case").is_null())
    groups = frame.partition_by("__kind", "__fast", as_dict=True)
    for kind in INGEST_KINDS:
        plan = _plan(model_for_topic(kind))
        _decode_fast(plan, groups.get((kind.name, True), frame.clear()), out)
        for row in groups.get((kind.name, False), frame.clear()).iter_rows(named=True):
            out.add_verdict(plan, row)
    return out.build()


# --------------------------------------------------------------------------- topics and screening


def _input_frame(topics: Sequence[str], payloads: Sequence[bytes]) -> pl.DataFrame:
    """Return the batch as a frame: index, topic, payload and (when UTF-8) its text."""
    try:
        topic = pl.Series("__topic", topics, dtype=pl.String)
    except UnicodeEncodeError:
        # A lone surrogate cannot be stored; U+FFFD keeps the length and is no identifier either.
        topic = pl.Series("__topic", [re.sub("[\ud800-\udfff]", "\ufffd", t) for t in topics], dtype=pl.String)
    payload = pl.Series("__payload", payloads, dtype=pl.Binary)
    try:
        text = payload.cast(pl.String).alias("__text")
    except pl.exceptions.PolarsError:
        # Some payload is not UTF-8: find which (only when the batch holds one).
        text = pl.Series("__text", [_utf8_or_none(p) for p in payloads], dtype=pl.String)
    return pl.DataFrame([pl.int_range(len(topics), dtype=pl.Int64, eager=True).alias("__msg"), topic, payload, text])


def _utf8_or_none(payload: bytes) -> str | None:
    """Return the payload as text, or None when it is not UTF-8."""
    try:
        return payload.decode()
    except UnicodeDecodeError:
        return None


def _kind_regex() -> str:
    """Return one regex matching the part of a topic after the site, with a group per kind.

    Built like ``contract._PATTERNS``: the whole topic, nothing after it (not even a newline).
    """
    bodies = []
    for index, kind in enumerate(TopicKind):
        if re.fullmatch(r"[a-z_/{}]+", kind.value) is None:
            msg = f"topic kind {kind.value!r} needs escaping before it can go into a regex"
            raise TypeError(msg)
        group = f"(?P<k{index}>[^/]+)"
        bodies.append(kind.value.replace("{pack}", group) if "{pack}" in kind.value else f"(?P<k{index}>{kind.value})")
    return "(?s)^(?:" + "|".join(bodies) + r")$"


_KIND_RX: Final = _kind_regex()


def _topic_cases(site: str) -> list[tuple[pl.Expr, str, pl.Expr]]:
    """Return the topic and size checks in ``parse_topic``'s order: (failed, reason, detail)."""
    t_site, t_pack, kind = pl.col("__tsite"), pl.col("__tpack"), pl.col("__kind")
    shown = pl.col("__topic").str.slice(0, 120)
    size = pl.col("__payload").bin.size()
    must_match = f"': must match {IDENTIFIER_PATTERN}"
    return [
        (
            (pl.col("__topic").str.len_chars() > _MAX_TOPIC_CHARS) | t_site.is_null(),
            "bad_topic",
            pl.concat_str(pl.lit("topic '"), shown, pl.lit(f"' is not under {TOPIC_ROOT}/<site>/")),
        ),
        (
            ~t_site.str.contains(IDENTIFIER_PATTERN),
            "bad_identifier",
            pl.concat_str(pl.lit("bad site identifier '"), t_site.str.slice(0, 80), pl.lit(must_match)),
        ),
        (kind.is_null(), "bad_topic", pl.concat_str(pl.lit("topic '"), shown, pl.lit("' is not in the contract"))),
        (
            t_pack.is_not_null() & ~t_pack.str.contains(IDENTIFIER_PATTERN),
            "bad_identifier",
            pl.concat_str(pl.lit("bad pack identifier '"), t_pack.str.slice(0, 80), pl.lit(must_match)),
        ),
        (t_site != site, "wrong_site", pl.concat_str(pl.lit("topic '"), shown, pl.lit(f"' is not for site {site}"))),
        (
            ~kind.is_in([k.name for k in INGEST_KINDS]),
            "bad_topic",
            pl.concat_str(pl.lit("topic '"), shown, pl.lit("' is not one the twin ingests")),
        ),
        (
            size > MAX_PAYLOAD_BYTES,
            "oversize",
            pl.concat_str(pl.lit("payload of "), size, pl.lit(f" bytes exceeds {MAX_PAYLOAD_BYTES}")),
        ),
    ]


def _screened(frame: pl.DataFrame, site: str) -> pl.DataFrame:
    """Add each message's kind, topic site and pack, failed topic or size check, and fast-path flag.

    ``__case`` is the index of the first failed check of :func:`_topic_cases` (null when none
    failed); ``__fast`` tells whether the payload can be read as one NDJSON line.
    """
    # Each regex runs once into a struct column; its fields are then taken from that column.
    parts = pl.col("__topic").str.extract_groups(rf"(?s)^{TOPIC_ROOT}/(?P<site>[^/]*)/(?P<rest>.*)$")
    groups = pl.col("__groups")
    kinds = list(TopicKind)
    kind = pl.coalesce(
        [pl.when(groups.struct.field(f"k{i}").is_not_null()).then(pl.lit(k.name)) for i, k in enumerate(kinds)]
    )
    pack = pl.coalesce([groups.struct.field(f"k{i}") for i, k in enumerate(kinds) if "{pack}" in k.value])
    text = pl.col("__text")
    max_open = max(_plan(model_for_topic(k)).max_open for k in INGEST_KINDS)
    fast = (
        text.str.starts_with("{")
        & text.str.ends_with("}")
        & ~text.str.contains("\\", literal=True)
        & ~text.str.contains("\n", literal=True)
        & (text.str.count_matches(r"[\[{]") <= max_open)
    )
    cases = _topic_cases(site)
    return (
        frame.lazy()
        .with_columns(parts.alias("__parts"))
        .with_columns(pl.col("__parts").struct.field("site").alias("__tsite"))
        .with_columns(pl.col("__parts").struct.field("rest").str.extract_groups(_KIND_RX).alias("__groups"))
        .with_columns(kind.alias("__kind"), pack.alias("__tpack"))
        .with_columns(
            pl.coalesce([pl.when(failed).then(pl.lit(i, pl.UInt8)) for i, (failed, _, _) in enumerate(cases)]).alias(
                "__case"
            ),
            fast.fill_null(value=False).alias("__fast"),
        )
        .drop("__parts", "__groups")
        .collect()
    )


# --------------------------------------------------------------------------- the models, as checks


_Kind = Literal["int", "float", "bool", "str", "literal", "list", "struct"]
_TYPE_ERRORS: Final[dict[_Kind, str]] = {
    "int": "int_type",
    "float": "float_type",
    "bool": "bool_type",
    "str": "string_type",
    "literal": "literal_error",
    "list": "list_type",
    "struct": "model_type",
}
_SCALARS: Final[dict[Any, _Kind]] = {bool: "bool", int: "int", float: "float", str: "str"}
_BOUNDS: Final[dict[type[Any], tuple[str, str, str]]] = {
    at.Ge: ("ge", "greater_than_equal", "greater than or equal to"),
    at.Gt: ("gt", "greater_than", "greater than"),
    at.Le: ("le", "less_than_equal", "less than or equal to"),
    at.Lt: ("lt", "less_than", "less than"),
}


@dataclass(frozen=True, slots=True)
class _Spec:
    """What pydantic checks on one field, read from the model (never written out by hand)."""

    key: str
    kind: _Kind
    required: bool = False
    default: Any = None
    nullable: bool = False
    bounds: tuple[tuple[type[Any], float], ...] = ()
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    literals: tuple[str, ...] = ()
    item: _Spec | None = None
    fields: tuple[_Spec, ...] = ()


@dataclass(slots=True)
class _Constraints:
    """The constraints gathered from a field's metadata, on the way to a :class:`_Spec`."""

    bounds: list[tuple[type[Any], float]] = field(default_factory=list)
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None


def _reason(error_type: str) -> str:
    """Return the reason ``contract.decode`` gives for a pydantic error type (through its own table)."""
    return contract._ERROR_REASONS.get(error_type, "wrong_type" if error_type.endswith("_type") else "invalid")


def _collect_constraints(metadata: Sequence[Any], into: _Constraints) -> None:
    """Gather the constraints of a field's metadata; refuse any this module cannot check in bulk."""
    for item in metadata:
        if isinstance(item, FieldInfo):
            _collect_constraints(item.metadata, into)
        elif type(item) in _BOUNDS:
            into.bounds.append((type(item), getattr(item, _BOUNDS[type(item)][0])))
        elif isinstance(item, at.MinLen):
            into.min_length = item.min_length
        elif isinstance(item, at.MaxLen):
            into.max_length = item.max_length
        elif (
            isinstance(item, StringConstraints)
            and not (item.strip_whitespace or item.to_upper or item.to_lower or item.ascii_only or item.strict is False)
            and (item.pattern is None or isinstance(item.pattern, str))
        ):
            into.pattern = item.pattern or into.pattern
            into.min_length = item.min_length if item.min_length is not None else into.min_length
            into.max_length = item.max_length if item.max_length is not None else into.max_length
        else:
            msg = f"no bulk check for constraint {item!r}: teach twin.pipeline about it"
            raise TypeError(msg)


def _spec(key: str, annotation: Any, metadata: Sequence[Any], *, required: bool, default: Any) -> _Spec:
    """Describe one annotated type as a :class:`_Spec`."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extra = typing.get_args(annotation)
        return _spec(key, base, [*metadata, *extra], required=required, default=default)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) != 1:
            msg = f"no bulk check for union {annotation!r}"
            raise TypeError(msg)
        return dataclasses.replace(_spec(key, inner[0], metadata, required=required, default=default), nullable=True)
    found = _Constraints()
    _collect_constraints(metadata, found)
    common: dict[str, Any] = {
        "key": key,
        "required": required,
        "default": default,
        "min_length": found.min_length,
        "max_length": found.max_length,
    }
    if origin is Literal:
        values = typing.get_args(annotation)
        if not all(isinstance(v, str) for v in values):
            msg = f"no bulk check for non-string literal {annotation!r}"
            raise TypeError(msg)
        spec = _Spec(kind="literal", literals=values, **common)
    elif origin is list:
        item = _spec(key, typing.get_args(annotation)[0], [], required=True, default=None)
        if item.kind not in ("int", "float", "bool") or item.nullable:
            msg = f"no bulk check for list items {annotation!r}"
            raise TypeError(msg)
        spec = _Spec(kind="list", item=item, **common)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        spec = _Spec(kind="struct", fields=_model_specs(annotation), **common)
    elif annotation in _SCALARS:
        spec = _Spec(kind=_SCALARS[annotation], bounds=tuple(found.bounds), pattern=found.pattern, **common)
    else:
        msg = f"no bulk check for annotation {annotation!r}"
        raise TypeError(msg)
    if (spec.bounds and spec.kind not in ("int", "float")) or (spec.pattern and spec.kind != "str"):
        msg = f"constraint on {key!r} does not apply to a {spec.kind}"
        raise TypeError(msg)
    return spec


def _model_specs(model: type[BaseModel]) -> tuple[_Spec, ...]:
    """Describe every field of a strict, closed model, in field order."""
    config = model.model_config
    if not (config.get("strict") and config.get("extra") == "forbid" and config.get("allow_inf_nan") is False):
        msg = f"{model.__name__} is not strict, closed and finite: the bulk checks assume it is"
        raise TypeError(msg)
    specs = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        if _PLAIN_KEY.fullmatch(key) is None or info.default_factory is not None:
            msg = f"{model.__name__}.{name}: key or default not supported by the bulk checks"
            raise TypeError(msg)
        required = info.is_required()
        specs.append(
            _spec(key, info.annotation, info.metadata, required=required, default=None if required else info.default)
        )
    return tuple(specs)


class _Codes:
    """Numbered problems of one model: a check yields a code, the code maps to reason and detail."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.reasons: list[str] = []
        self.details: list[str] = []

    def add(self, reason: str, where: str, message: str) -> pl.Expr:
        """Register a problem and return its code as a literal."""
        self.reasons.append(reason)
        self.details.append(f"{self.label}: {where}: {message}")
        return pl.lit(len(self.reasons) - 1, dtype=pl.UInt16)

    def error(self, error_type: str, where: str, message: str) -> pl.Expr:
        """Register a pydantic error type (its reason as ``contract.decode`` names it)."""
        return self.add(_reason(error_type), where, message)


def _not_string(value: pl.Expr, key: str) -> pl.Expr:
    """Return whether a string column's value was not a JSON string in the payload.

    polars renders a number, bool, list or object given for a string field as text. Such text
    starts with a digit, ``-``, ``[`` or ``{``, or is ``true``/``false``; only then is the raw
    payload searched (an unescaped payload has no quote inside a string, and ``key`` occurs once).
    """
    maybe = value.str.contains(_MAYBE_NOT_STRING)
    quoted = pl.when(maybe).then(pl.col("__text")).str.contains(f'"{key}"{_JSON_WS}:{_JSON_WS}"')
    return maybe & ~quoted


def _value_checks(spec: _Spec, value: pl.Expr, where: str, codes: _Codes, *, typed: bool = False) -> list[pl.Expr]:
    """Return the checks of a present value, in pydantic's order: each a code when it fails, else null.

    ``typed``: the value comes from a typed column, not from a payload (no raw text to consult).
    """
    checks: list[tuple[pl.Expr, pl.Expr]] = []
    if spec.kind == "float":
        checks.append((~value.is_finite(), codes.error("finite_number", where, "Input should be a finite number")))
    for bound_type, bound in spec.bounds:
        _, error_type, words = _BOUNDS[bound_type]
        failed = {at.Ge: value < bound, at.Gt: value <= bound, at.Le: value > bound, at.Lt: value >= bound}[bound_type]
        checks.append((failed, codes.error(error_type, where, f"Input should be {words} {bound}")))
    if spec.kind == "str":
        if not typed:
            checks.append(
                (_not_string(value, spec.key), codes.error("string_type", where, "Input should be a valid string"))
            )
        if spec.max_length is not None:
            message = f"String should have at most {spec.max_length} characters"
            checks.append((value.str.len_chars() > spec.max_length, codes.error("string_too_long", where, message)))
        if spec.min_length is not None:
            message = f"String should have at least {spec.min_length} characters"
            checks.append((value.str.len_chars() < spec.min_length, codes.error("string_too_short", where, message)))
        if spec.pattern is not None:
            message = f"String should match pattern '{spec.pattern}'"
            checks.append((~value.str.contains(spec.pattern), codes.error("string_pattern_mismatch", where, message)))
    elif spec.kind == "literal":
        message = "Input should be " + " or ".join(repr(v) for v in spec.literals)
        checks.append((~value.is_in(spec.literals), codes.error("literal_error", where, message)))
    elif spec.kind == "list":
        return _list_checks(spec, value, where, codes, typed=typed)
    elif spec.kind == "struct":
        return [
            pl.coalesce(
                [_field_code(s, value.struct.field(s.key), f"{where}.{s.key}", codes, typed=typed) for s in spec.fields]
            )
        ]
    return [pl.when(failed).then(code) for failed, code in checks]


def _list_checks(spec: _Spec, value: pl.Expr, where: str, codes: _Codes, *, typed: bool = False) -> list[pl.Expr]:
    """Return a list's checks: too long, then its first bad item, then too short (pydantic's order)."""
    if spec.item is None:  # pragma: no cover - _spec always sets it for a list
        msg = f"list field {spec.key!r} has no item spec"
        raise TypeError(msg)
    item_where = f"{where}[i]"
    element = pl.element()
    item_code = pl.coalesce(
        [
            pl.when(element.is_null()).then(
                codes.error(_TYPE_ERRORS[spec.item.kind], item_where, "Input should be a number")
            ),
            *_value_checks(spec.item, element, item_where, codes, typed=typed),
        ]
    )
    first_bad = value.list.eval(item_code).list.drop_nulls().list.first()
    checks: list[pl.Expr] = []
    if spec.max_length is not None:
        message = f"List should have at most {spec.max_length} items"
        checks.append(pl.when(value.list.len() > spec.max_length).then(codes.error("too_long", where, message)))
    checks.append(first_bad)
    if spec.min_length is not None:
        message = f"List should have at least {spec.min_length} items"
        checks.append(pl.when(value.list.len() < spec.min_length).then(codes.error("too_short", where, message)))
    return checks


def _field_code(
    spec: _Spec, value: pl.Expr, where: str, codes: _Codes, *, typed: bool = False, require: bool = True
) -> pl.Expr:
    """Return the code of a field's first problem, or null.

    A null value is an absent key here: a key given as ``null`` makes the row's key count
    disagree, which sends the row to the reference before this code is used.
    """
    checks = _value_checks(spec, value, where, codes, typed=typed)
    if spec.required and require:
        checks.insert(0, pl.when(value.is_null()).then(codes.error("missing", where, "Field required")))
    return pl.coalesce(checks) if checks else _NO_CODE


def _present(specs: Sequence[_Spec], parent: pl.Expr | None = None) -> list[pl.Expr]:
    """Return one 0/1 term per field (nested fields included) telling whether polars saw a value."""
    terms = []
    for spec in specs:
        value = pl.col(spec.key) if parent is None else parent.struct.field(spec.key)
        terms.append(value.is_not_null().cast(pl.Int32))
        if spec.kind == "struct":
            terms.extend(_present(spec.fields, value))
    return terms


def _open_brackets(specs: Sequence[_Spec]) -> int:
    """Return how many ``{`` and ``[`` a valid message has at most, besides its own ``{``."""
    return sum(1 + _open_brackets(s.fields) if s.kind == "struct" else int(s.kind == "list") for s in specs)


def _all_keys(specs: Sequence[_Spec]) -> list[str]:
    """Return every key of a model, nested ones included."""
    return [key for spec in specs for key in (spec.key, *_all_keys(spec.fields))]


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything needed to read and check one model's messages in bulk, built once per model."""

    model: type[Message]
    read_schema: pl.Schema
    outputs: tuple[pl.Expr, ...]
    keys_agree: pl.Expr
    code: pl.Expr
    reasons: tuple[str, ...]
    details: tuple[str, ...]
    mismatch_code: int | None
    mismatch_detail: pl.Expr | None
    max_open: int


@cache
def _plan(model: type[Message]) -> _Plan:
    """Build the read schema, checks and output columns of a model from its pydantic fields."""
    specs = _model_specs(model)
    if len(set(_all_keys(specs))) != len(_all_keys(specs)):
        msg = f"{model.__name__}: a key occurs at two levels; the raw-text checks need each key once"
        raise TypeError(msg)
    label = f"{model.schema_name}/{CONTRACT_VERSION}"
    codes = _Codes(label)
    schema = pl.col("schema")
    name = schema.str.extract(r"(?s)^([^/]*)/", 1)
    version = schema.str.extract(r"(?s)^[^/]*/(.*)$", 1)
    no_schema = "payload has no 'schema' field of the form 'name/version'"
    checks: list[pl.Expr] = [
        pl.when(name.is_null()).then(codes.add("unknown_schema", "schema", no_schema)),
        pl.when(~name.is_in(list(MESSAGE_MODELS))).then(codes.add("unknown_schema", "schema", "unknown schema")),
        pl.when(version != str(CONTRACT_VERSION)).then(
            codes.add("wrong_version", "schema", f"version is not supported (this twin speaks {CONTRACT_VERSION})")
        ),
        pl.when(name != model.schema_name).then(
            codes.add("schema_mismatch", "schema", f"schema on a topic that carries {label}")
        ),
    ]
    checks.extend(_field_code(s, pl.col(s.key), s.key, codes) for s in specs if s.key != "schema")
    keys = [s.key for s in specs]
    identity = next(((k, t) for k, t in (("pack", "__tpack"), ("site", "__tsite")) if k in keys), None)
    mismatch_code = mismatch_detail = None
    if identity is not None:
        key, topic_column = identity
        checks.append(pl.when(pl.col(key) != pl.col(topic_column)).then(codes.add(f"{key}_mismatch", key, "")))
        mismatch_code = len(codes.reasons) - 1
        # concat_str, not pl.format: polars 2.1's format panics on a column whose first chunk is empty.
        mismatch_detail = pl.concat_str(
            pl.lit(f"payload {key} '"),
            pl.col(key),
            pl.lit(f"' differs from the topic {key} '"),
            pl.col(topic_column),
            pl.lit("'"),
        )
    expected = pl.sum_horizontal(_present(specs))
    colons = pl.col("__text").str.count_matches(":", literal=True)
    # Every key is followed by the only ':' outside strings, so colons >= keys >= expected;
    # the exact key count is only needed when a colon sits inside a string value.
    exact = pl.when(colons != expected).then(pl.col("__text")).str.count_matches(_KEY_RX)
    outputs = [pl.col("__msg").alias("msg")]
    for spec in specs:
        if spec.key != "schema":
            column = pl.col(spec.key)
            outputs.append(column.fill_null(spec.default) if spec.default is not None else column)
    if any(nested.default is not None for spec in specs for nested in spec.fields):
        msg = f"{model.__name__}: a nested field has a default; the bulk path cannot fill it"
        raise TypeError(msg)
    return _Plan(
        model=model,
        read_schema=polars_schema(model),
        outputs=tuple(outputs),
        keys_agree=(colons == expected) | (exact == expected).fill_null(value=False),
        code=pl.coalesce(checks),
        reasons=tuple(codes.reasons),
        details=tuple(codes.details),
        mismatch_code=mismatch_code,
        mismatch_detail=mismatch_detail,
        max_open=1 + _open_brackets(specs),
    )


@cache
def _row_checks(model: type[Message], require: bool) -> tuple[pl.Expr, tuple[str, ...], tuple[str, ...]]:
    """The field checks of :func:`_plan`, for rows already in typed columns: the code, reasons, details."""
    codes = _Codes(f"{model.schema_name}/{CONTRACT_VERSION}")
    specs = [s for s in _model_specs(model) if s.key != "schema"]
    code = pl.coalesce([_field_code(s, pl.col(s.key), s.key, codes, typed=True, require=require) for s in specs])
    return code, tuple(codes.reasons), tuple(codes.details)


def check_rows(frame: pl.DataFrame, model: type[Message], *, require: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Check rows that arrive already typed (a replayed file's) against the contract, as messages are.

    The same checks, derived from the same pydantic fields, as a decoded message gets: required
    fields, ranges, finiteness, patterns, lengths, ``Literal`` values, list items and nested
    records, the reason being the first failing check in field order. What only a payload has
    (its ``schema`` field, its raw text, its topic) does not apply.

    Args:
        frame: rows with the model's columns (:func:`output_schema`), ``msg`` optional.
        model: the contract model the rows are.
        require: refuse rows without a field the model requires; False lets nulls pass (a
            cycler's log has no BMS SoC) and checks the values that are there.

    Returns:
        The rows that pass (the frame's columns, in order), and the refused ones with
        :data:`REJECTS_SCHEMA` (``msg`` the row's, or its position without one; no topic; the
        excerpt is the row as JSON).
    """
    code, reasons, details = _row_checks(model, require)
    coded = frame.with_columns(code.alias("__code"), pl.int_range(pl.len(), dtype=pl.Int64).alias("__row"))
    bad = coded.get_column("__code").is_not_null()
    if not bad.any():
        return frame, pl.DataFrame(schema=REJECTS_SCHEMA)
    columns = [k for k in frame.columns if k != "msg"]
    numbers = list(range(len(reasons)))
    refused = coded.filter(bad).select(
        (pl.col("msg").cast(pl.Int64) if "msg" in frame.columns else pl.col("__row")).alias("msg"),
        pl.lit("", dtype=pl.String).alias("topic"),
        pl.col("__code").replace_strict(numbers, list(reasons), return_dtype=pl.String).alias("reason"),
        pl.col("__code").replace_strict(numbers, list(details), return_dtype=pl.String).alias("detail"),
        pl.struct(columns).struct.json_encode().str.slice(0, EXCERPT_CHARS).alias("payload_excerpt"),
    )
    return frame.filter(~bad), refused


# --------------------------------------------------------------------------- fast path and reference


def _read_bulk(texts: pl.Series, schema: pl.Schema) -> pl.DataFrame | None:
    """Read payloads as NDJSON with a declared schema; return None when the read fails.

    With ``ignore_errors`` a value of the wrong type becomes null instead of failing the read
    (polars never coerces it); the key count then disagrees, and the row goes to the reference.
    What still fails the read is JSON that polars cannot parse. A module-level function so
    that tests can count the bulk reads.
    """
    # Joined and handed over as bytes: going through a Python str would cost a UTF-8 round trip.
    blob: bytes = texts.str.join("\n").cast(pl.Binary).item()
    try:
        data = pl.read_ndjson(blob, schema=schema, ignore_errors=True)
    except _POLARS_FAILURES:
        return None
    return data if data.height == texts.len() else None


def _decode_fast(plan: _Plan, group: pl.DataFrame, out: _Collector) -> None:
    """Read one kind's fast-path messages in bulk, isolating the ones that break the read.

    When a read fails, the group's payloads are first parsed one by one in a single vectorised
    pass (``json_path_match``), and those that do not parse go to the reference; if the rest
    still fails, it is bisected. Chunks read successfully are checked together at the end.
    """
    pending = [(group, True)] if group.height else []
    read: list[tuple[pl.DataFrame, pl.DataFrame]] = []
    while pending:
        chunk, may_locate = pending.pop()
        data = _read_bulk(chunk.get_column("__text"), plan.read_schema)
        if data is not None:
            read.append((chunk, data))
        elif chunk.height == 1:
            out.add_verdict(plan, chunk.row(0, named=True))
        elif may_locate and not (parses := _parses(chunk)).all():
            for row in chunk.filter(~parses).iter_rows(named=True):
                out.add_verdict(plan, row)
            if parses.any():
                pending.append((chunk.filter(parses), False))
        else:
            half = chunk.height // 2
            pending.extend(((chunk.slice(half), False), (chunk.slice(0, half), False)))
        if not pending and read:
            pending.extend(_check_all(plan, read, out))
            read = []


def _parses(chunk: pl.DataFrame) -> pl.Series:
    """Return, per payload, whether it parses as JSON on its own (a locator, not a verdict)."""
    try:
        return chunk.get_column("__text").str.json_path_match("$").is_not_null()
    except _POLARS_FAILURES:
        return pl.repeat(value=True, n=chunk.height, eager=True)


def _check_all(
    plan: _Plan, read: list[tuple[pl.DataFrame, pl.DataFrame]], out: _Collector
) -> list[tuple[pl.DataFrame, bool]]:
    """Check every chunk read in bulk, together; return chunks to split where polars failed."""
    chunk = pl.concat([c for c, _ in read]) if len(read) > 1 else read[0][0]
    data = pl.concat([d for _, d in read]) if len(read) > 1 else read[0][1]
    checked = _checked(plan, chunk, data)
    if checked is not None:
        out.add_checked(plan, checked)
        return []
    if len(read) > 1:
        return [item for part in read for item in _check_all(plan, [part], out)]
    if chunk.height == 1:
        out.add_verdict(plan, chunk.row(0, named=True))
        return []
    half = chunk.height // 2
    return [(chunk.slice(half), False), (chunk.slice(0, half), False)]


@dataclass(frozen=True, slots=True)
class _Checked:
    """One bulk-read chunk, checked: accepted rows, refused rows, rows only the reference can judge."""

    accepted: pl.DataFrame
    refused: pl.DataFrame | None
    unsure: pl.DataFrame | None


def _checked(plan: _Plan, chunk: pl.DataFrame, data: pl.DataFrame) -> _Checked | None:
    """Check rows read in bulk; return None when polars fails on them (the caller then splits).

    Rows whose keys the reader could not see (a key given as null, a duplicated or unknown key)
    are returned as unsure, for the reference.
    """
    try:
        return _check(plan, chunk, data)
    except _POLARS_FAILURES:
        return None


def _check(plan: _Plan, chunk: pl.DataFrame, data: pl.DataFrame) -> _Checked:
    """Run the plan's checks on a chunk and the rows read from it; split accepted, refused, unsure."""
    checked = (
        pl.concat(
            [chunk.select("__msg", "__topic", "__text", "__payload", "__tpack", "__tsite"), data], how="horizontal"
        )
        .lazy()
        .with_columns(plan.keys_agree.alias("__keys_agree"), plan.code.alias("__code"))
        .collect()
    )
    unsure = None
    agree = checked.get_column("__keys_agree")
    if not agree.all():
        unsure = checked.filter(~agree)
        checked = checked.filter(agree)
    refused = None
    problems = checked.get_column("__code").is_not_null()
    if problems.any():
        code = pl.col("__code")
        detail = code.replace_strict(list(range(len(plan.details))), plan.details, return_dtype=pl.String)
        if plan.mismatch_detail is not None:
            detail = pl.when(code == plan.mismatch_code).then(plan.mismatch_detail).otherwise(detail)
        refused = checked.filter(problems).select(
            pl.col("__msg").alias("msg"),
            pl.col("__topic").alias("topic"),
            code.replace_strict(list(range(len(plan.reasons))), plan.reasons, return_dtype=pl.String).alias("reason"),
            detail.alias("detail"),
            pl.col("__text").str.slice(0, EXCERPT_CHARS).alias("payload_excerpt"),
        )
        checked = checked.filter(~problems)
    return _Checked(accepted=checked.select(plan.outputs), refused=refused, unsure=unsure)


@dataclass(frozen=True, slots=True)
class _Refused:
    """Why the reference refused one message."""

    reason: str
    detail: str


def _decode_one(
    model: type[Message], payload: bytes, topic_pack: str | None, topic_site: str
) -> dict[str, Any] | _Refused:
    """Decode one message with the reference: ``contract.decode``, then the pack or site match.

    A module-level function so that tests can count how often the slow path runs.

    Returns:
        The accepted row (the model's JSON dump without ``schema``), or why it was refused.
    """
    try:
        message = contract.decode(payload, model)
    except PayloadError as exc:
        return _Refused(exc.reason, str(exc))
    except RecursionError:
        return _Refused("not_json", "payload is not JSON: nested too deeply")
    row = message.model_dump(mode="json", by_alias=True)
    del row["schema"]
    # The first identity field the model has is compared, as in the bulk path.
    key, expected = next(((k, v) for k, v in (("pack", topic_pack), ("site", topic_site)) if k in row), ("", None))
    if expected is not None and row[key] != expected:
        return _Refused(f"{key}_mismatch", f"payload {key} '{row[key]}' differs from the topic {key} '{expected}'")
    return row


def _excerpt(payload: bytes) -> str:
    """Return the start of a payload for the rejects frame, decoded with replacement characters."""
    # 200 characters take at most 800 bytes; decoding only those keeps a huge payload cheap.
    return payload[: 4 * EXCERPT_CHARS].decode("utf-8", errors="replace")[:EXCERPT_CHARS]


@dataclass(slots=True)
class _Collector:
    """Accepted and refused messages as they come, assembled into :class:`Decoded` at the end."""

    frames: dict[type[Message], list[pl.DataFrame]] = field(
        default_factory=lambda: {model_for_topic(k): [] for k in INGEST_KINDS}
    )
    rows: dict[type[Message], list[dict[str, Any]]] = field(
        default_factory=lambda: {model_for_topic(k): [] for k in INGEST_KINDS}
    )
    rejects: list[pl.DataFrame] = field(default_factory=list)
    reject_rows: list[dict[str, Any]] = field(default_factory=list)

    def add_refused(self, frame: pl.DataFrame, cases: Sequence[tuple[pl.Expr, str, pl.Expr]]) -> None:
        """Add messages refused for their topic or size (``__case`` indexes ``cases``)."""
        case = pl.col("__case")
        text = pl.col("__text")
        columns = [
            pl.col("__msg").alias("msg"),
            pl.col("__topic").alias("topic"),
            case.replace_strict(list(range(len(cases))), [r for _, r, _ in cases], return_dtype=pl.String).alias(
                "reason"
            ),
            pl.coalesce([pl.when(case == i).then(d) for i, (_, _, d) in enumerate(cases)]).alias("detail"),
            text.str.slice(0, EXCERPT_CHARS).alias("payload_excerpt"),
        ]
        refused = frame.select(*columns, pl.col("__payload"))
        unicode = refused.get_column("payload_excerpt").is_not_null()
        self.rejects.append(refused.filter(unicode).drop("__payload"))
        for row in refused.filter(~unicode).iter_rows(named=True):
            payload = row.pop("__payload")
            self.reject_rows.append({**row, "payload_excerpt": _excerpt(payload)})

    def add_verdict(self, plan: _Plan, row: dict[str, Any]) -> None:
        """Decode one message (a row of the screened frame) with the reference, and add it."""
        verdict = _decode_one(plan.model, row["__payload"], row["__tpack"], row["__tsite"])
        if isinstance(verdict, _Refused):
            self.reject_rows.append(
                {
                    "msg": row["__msg"],
                    "topic": row["__topic"],
                    "reason": verdict.reason,
                    "detail": verdict.detail,
                    "payload_excerpt": _excerpt(row["__payload"]),
                }
            )
        else:
            self.rows[plan.model].append({"msg": row["__msg"], **verdict})

    def add_checked(self, plan: _Plan, checked: _Checked) -> None:
        """Add a chunk checked in bulk; its unsure rows go to the reference."""
        self.frames[plan.model].append(checked.accepted)
        if checked.refused is not None:
            self.rejects.append(checked.refused)
        for row in checked.unsure.iter_rows(named=True) if checked.unsure is not None else ():
            self.add_verdict(plan, row)

    def build(self) -> Decoded:
        """Assemble the frames, each with its declared schema and sorted by ``msg``."""
        kinds = {}
        for kind, name in INGEST_KINDS.items():
            model = model_for_topic(kind)
            kinds[name] = _assemble(self.frames[model], self.rows[model], output_schema(model))
        return Decoded(rejects=_assemble(self.rejects, self.reject_rows, REJECTS_SCHEMA), **kinds)


def _assemble(frames: list[pl.DataFrame], rows: list[dict[str, Any]], schema: pl.Schema) -> pl.DataFrame:
    """Concatenate bulk frames and reference rows into one frame of ``schema``, sorted by ``msg``."""
    parts = [f for f in frames if f.height]
    if rows:
        parts.append(pl.DataFrame(rows, schema=schema))
    if not parts:
        return pl.DataFrame(schema=schema)
    if len(parts) == 1 and not rows and parts[0].get_column("msg").is_sorted():
        # One bulk frame, in batch order and read with the declared schema.
        return parts[0]
    return pl.concat([p.cast(schema) for p in parts]).sort("msg")
