"""Replay sources: run folders, a user's own CSV or Parquet log, an InfluxDB range.

Every source becomes a :class:`twin.replay.RunFolder` (pack metadata, status and site rows
in memory, telemetry read in batches), so :func:`twin.replay.replay_run`, the InfluxDB sink
and the MQTT publisher of :mod:`twin.publish_replay` take any source the same way, and a
replay runs through the same core as the live service. The kinds:

* a **run folder** from ``mgtwin emulate --out`` (one Parquet file per table) or from
  ``mgtwin record`` (rolled parts): :func:`twin.replay.open_run`;
* an **external file** (CSV or Parquet), e.g. a BMS or cycler log, read through a column
  mapping (:func:`parse_mapping`), a time unit, a current sign convention and the pack's
  metadata (:class:`PackSpec`), given on the command line or in a small TOML file
  (:func:`load_external_toml`): :func:`read_external`;
* an **InfluxDB range** of what the twin wrote (``pack_telemetry``, ``pack_cells`` and the
  site meter's ``site_state`` rows), with the pack metadata from a packs table, since
  InfluxDB holds none: :func:`read_influx`.

Wrappers cut a source to a time range (:func:`between`), move it in time
(:func:`shifted`) or give it another site identifier (:func:`with_site`).

External files, conventions (the contract's, stated in :mod:`twin.contract`): time becomes
integer ms since the epoch, UTC. Numeric times are in ``time_unit``; times before
2000-01-01 are taken as relative to ``t0`` (default :data:`DEFAULT_T0`), so a cycler's
"seconds since the test started" lands on a fixed, reproducible date. Text times are ISO
8601 (UTC when no zone is given). Current becomes positive on discharge
(``current_sign="discharge-negative"`` flips a log that counts discharge negative). Fields
the file does not have are derived and said so: the temperatures are the mapped
``temp_c`` or the constant ``temp_c`` option; the cell voltage extremes are the pack
voltage over the series count; the BMS's own SoC and SoH stay unknown (null). Errors are
:class:`twin.replay.ReplayError` with the column, the row and the value: an unknown column
(with the closest names), a value that is not a number or a time, time that goes
backwards, a value outside the contract's range.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, get_args

import annotated_types as at
import polars as pl
import pyarrow.parquet as pq
from pydantic import ValidationError

from twin import contract as c
from twin.pipeline import output_schema
from twin.replay import PartsRunFolder, ReplayError, RunFolder, open_run, table_parts

__all__ = [
    "DEFAULT_T0",
    "MAP_TARGETS",
    "CurrentSign",
    "ExternalOptions",
    "PackSpec",
    "StreamRun",
    "TimeUnit",
    "as_stream",
    "between",
    "cells_batches",
    "load_external_toml",
    "parse_mapping",
    "parse_time",
    "read_external",
    "read_influx",
    "read_packs",
    "shifted",
    "source_span",
    "with_site",
]

TimeUnit = Literal["s", "ms", "us", "ns"]
CurrentSign = Literal["discharge-positive", "discharge-negative"]

#: Where relative times of an external file start (they are offsets from this instant).
DEFAULT_T0: Final = "2020-01-01T00:00:00Z"

#: What a column mapping may name: the target and what it holds.
MAP_TARGETS: Final[dict[str, str]] = {
    "ts": "time: a number in --time-unit (relative before 2000: offset from --t0) or ISO 8601 text",
    "pack": "pack identifier (default: one pack, --pack)",
    "seq": "sequence number (default: the row number)",
    "voltage_v": "pack voltage, V",
    "current_a": "pack current, A (sign per --current-sign)",
    "temp_c": "one temperature for min, max and average, °C (default: the constant --temp-c)",
    "temp_min_c": "lowest sensor temperature, °C",
    "temp_max_c": "highest sensor temperature, °C",
    "temp_avg_c": "average temperature, °C",
    "cell_v_min_v": "lowest cell-group voltage, V (default: voltage over series cells)",
    "cell_v_max_v": "highest cell-group voltage, V (default: voltage over series cells)",
    "soc_bms": "the BMS's SoC, fraction (default: unknown)",
    "soh_bms": "the BMS's SoH, fraction (default: unknown)",
}
_REQUIRED_TARGETS: Final = ("ts", "voltage_v", "current_a")
_FLOAT_TARGETS: Final = (
    "voltage_v",
    "current_a",
    "temp_c",
    "temp_min_c",
    "temp_max_c",
    "temp_avg_c",
    "cell_v_min_v",
    "cell_v_max_v",
    "soc_bms",
    "soh_bms",
)
_EPOCH_2000_MS: Final = 946_684_800_000
_UNIT_MS: Final[dict[str, float]] = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
_SLICE_MS: Final = 3_600_000  # an InfluxDB source is read an hour at a time


def _telemetry_schema() -> dict[str, pl.DataType]:
    return {k: v for k, v in output_schema(c.PackTelemetry).items() if k != "msg"}


def _cells_schema() -> dict[str, pl.DataType]:
    return {k: v for k, v in output_schema(c.PackCells).items() if k != "msg"}


def _table_schema(model: type[c.Message]) -> dict[str, pl.DataType]:
    return {k: v for k, v in output_schema(model).items() if k != "msg"}


def _conform(frame: pl.DataFrame, model: type[c.Message]) -> pl.DataFrame:
    schema = _table_schema(model)
    return frame.select(
        [pl.col(k).cast(t) if k in frame.columns else pl.lit(None, dtype=t).alias(k) for k, t in schema.items()]
    )


def _closest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(x) for x in close)}?" if close else ""


# --------------------------------------------------------------------------- streams


BatchSource = Callable[[int], Iterator[pl.DataFrame]]


def _no_batches(_rows: int) -> Iterator[pl.DataFrame]:
    return iter(())


@dataclass(frozen=True, slots=True)
class StreamRun(RunFolder):
    """A source whose telemetry and cells come from batch factories (any source, after a wrapper).

    Attributes:
        telemetry_source: ``rows -> iterator of telemetry frames`` (contract columns).
        cells_source: the same for the cells table.
        first_ms: the earliest telemetry time, when known.
        last_ms: the latest telemetry time, when known.
        skipped: files that could not be read (a recording cut off by a crash).
        notes: what reading the source left out, counted (e.g. ``repeated_times``).
    """

    telemetry_source: BatchSource = _no_batches
    cells_source: BatchSource = _no_batches
    first_ms: int | None = None
    last_ms: int | None = None
    skipped: tuple[Path, ...] = ()
    notes: dict[str, int] = field(default_factory=dict)

    def telemetry_batches(self, rows: int) -> Iterator[pl.DataFrame]:
        """Yield the telemetry in batches of about ``rows`` rows."""
        return self.telemetry_source(rows)


def _frame_batches(frame: pl.DataFrame) -> BatchSource:
    def batches(rows: int) -> Iterator[pl.DataFrame]:
        for start in range(0, frame.height, max(rows, 1)):
            yield frame.slice(start, rows)

    return batches


def _parquet_batches(files: tuple[Path, ...], model: type[c.Message]) -> BatchSource:
    schema = _table_schema(model)

    def batches(rows: int) -> Iterator[pl.DataFrame]:
        for path in files:
            parquet = pq.ParquetFile(path)
            present = [k for k in schema if k in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=rows, columns=present):
                frame = pl.from_arrow(batch)
                assert isinstance(frame, pl.DataFrame)
                yield _conform(frame, model)

    return batches


def cells_batches(run: RunFolder, rows: int) -> Iterator[pl.DataFrame]:
    """Yield a source's cells table (contract columns) in batches; nothing when it has none."""
    if isinstance(run, StreamRun):
        return run.cells_source(rows)
    if isinstance(run, PartsRunFolder):
        parts, _ = table_parts(run.path, "cells")
        return _parquet_batches(parts, c.PackCells)(rows)
    single = run.path / "cells.parquet"
    return _parquet_batches((single,) if single.is_file() else (), c.PackCells)(rows)


def source_span(run: RunFolder) -> tuple[int | None, int | None]:
    """Return the first and last telemetry time of a source (reads only the ``ts_ms`` column)."""
    if isinstance(run, StreamRun) and run.first_ms is not None and run.last_ms is not None:
        return run.first_ms, run.last_ms
    low: int | None = None
    high: int | None = None
    for batch in run.telemetry_batches(1 << 20):
        lo, hi = batch["ts_ms"].min(), batch["ts_ms"].max()
        if isinstance(lo, int) and isinstance(hi, int):
            low = lo if low is None else min(low, lo)
            high = hi if high is None else max(high, hi)
    return low, high


def as_stream(run: RunFolder) -> StreamRun:
    """Wrap any source as a :class:`StreamRun` (a no-op for one)."""
    if isinstance(run, StreamRun):
        return run
    skipped = run.skipped if isinstance(run, PartsRunFolder) else ()
    return StreamRun(
        path=run.path,
        site=run.site,
        meta=run.meta,
        status=run.status,
        site_rows=run.site_rows,
        telemetry_rows=run.telemetry_rows,
        telemetry_source=run.telemetry_batches,
        cells_source=lambda rows: cells_batches(run, rows),
        skipped=skipped,
    )


def shifted(run: RunFolder, shift_ms: int) -> StreamRun:
    """Move every time of a source by ``shift_ms`` (telemetry, cells, site, status; meta and commissioning dates).

    The packs' ages stay what they were, so a shift by whole hours (the health tracker's aging
    chunks; the capacity checkpoints' grid is a minute) changes the estimates' times and nothing else.
    """
    src = as_stream(run)
    if shift_ms == 0:
        return src
    move = pl.col("ts_ms") + shift_ms

    def tele(rows: int) -> Iterator[pl.DataFrame]:
        return (b.with_columns(move) for b in src.telemetry_source(rows))

    def cells(rows: int) -> Iterator[pl.DataFrame]:
        return (b.with_columns(move) for b in src.cells_source(rows))

    return dataclasses.replace(
        src,
        meta=src.meta.with_columns(move, pl.col("commissioned_ms") + shift_ms),
        status=src.status.with_columns(move),
        site_rows=src.site_rows.with_columns(move),
        telemetry_source=tele,
        cells_source=cells,
        first_ms=None if src.first_ms is None else src.first_ms + shift_ms,
        last_ms=None if src.last_ms is None else src.last_ms + shift_ms,
    )


def with_site(run: RunFolder, site: str) -> StreamRun:
    """Give a source another site identifier (its site rows follow).

    Raises:
        ReplayError: ``site`` is not a valid identifier.
    """
    if not c.is_identifier(site):
        msg = f"bad site identifier {site!r}: must match {c.IDENTIFIER_PATTERN}"
        raise ReplayError(msg)
    src = as_stream(run)
    if site == src.site:
        return src
    return dataclasses.replace(src, site=site, site_rows=src.site_rows.with_columns(pl.lit(site).alias("site")))


def between(run: RunFolder, start_ms: int | None, stop_ms: int | None) -> StreamRun:
    """Keep what happened in ``[start_ms, stop_ms)`` (the pack metadata is kept whole).

    The row count becomes an estimate (the source's), used only for progress bars.
    """
    src = as_stream(run)
    if start_ms is None and stop_ms is None:
        return src
    lo = -(2**62) if start_ms is None else start_ms
    hi = 2**62 if stop_ms is None else stop_ms
    keep = (pl.col("ts_ms") >= lo) & (pl.col("ts_ms") < hi)

    def tele(rows: int) -> Iterator[pl.DataFrame]:
        return (f for b in src.telemetry_source(rows) if (f := b.filter(keep)).height)

    def cells(rows: int) -> Iterator[pl.DataFrame]:
        return (f for b in src.cells_source(rows) if (f := b.filter(keep)).height)

    return dataclasses.replace(
        src,
        status=src.status.filter(keep | pl.col("ts_ms").is_null()),
        site_rows=src.site_rows.filter(keep),
        telemetry_source=tele,
        cells_source=cells,
        first_ms=None,
        last_ms=None,
    )


# --------------------------------------------------------------------------- times


def parse_time(text: str, *, now_ms: int, first_ms: int | None = None) -> int:
    """Parse a time: ISO 8601, epoch ms, ``now``/``now-6h``, or ``+26h`` after the source's first sample.

    Raises:
        ReplayError: the text is none of these, or ``+...`` without a source start.

    Examples:
        >>> parse_time("2025-07-01T07:00:00Z", now_ms=0)
        1751353200000
        >>> parse_time("+1h30m", now_ms=0, first_ms=1_000)
        5401000
        >>> parse_time("now-1h", now_ms=7_200_000)
        3600000
    """
    value = text.strip()
    relative = re.fullmatch(r"([+]|now-?)((?:\d+(?:\.\d+)?(?:ms|d|h|m|s))*)", value)
    if relative and (relative.group(1) != "+" or relative.group(2)):
        offset = _duration_ms(relative.group(2)) if relative.group(2) else 0
        if relative.group(1) == "+":
            if first_ms is None:
                msg = f"{text!r}: a time relative to the source's start needs a source with a known start"
                raise ReplayError(msg)
            return first_ms + offset
        return now_ms - offset
    if re.fullmatch(r"\d{10,16}", value):
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        msg = f"{text!r} is not a time: use an ISO 8601 time, epoch milliseconds, now-6h or +2h (after the start)"
        raise ReplayError(msg) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return math.floor(parsed.timestamp() * 1000)


def _duration_ms(text: str) -> int:
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    return round(sum(float(n) * scale[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)", text)))


# --------------------------------------------------------------------------- external files


def parse_mapping(text: str) -> dict[str, str]:
    """Parse ``target=column,target=column`` into a mapping (a column name may hold commas).

    Raises:
        ReplayError: an unknown target (with the closest names), a repeated one, or a bad item.

    Examples:
        >>> parse_mapping("ts=Time(s),current_a=Current(A),voltage_v=Voltage(V)")
        {'ts': 'Time(s)', 'current_a': 'Current(A)', 'voltage_v': 'Voltage(V)'}
    """
    out: dict[str, str] = {}
    items = [item for item in re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)", text) if item.strip()]
    for item in items:
        target, sep, column = item.partition("=")
        target = target.strip()
        if not sep or not column.strip():
            msg = f"bad mapping item {item!r}: use target=column, e.g. current_a=Current(A)"
            raise ReplayError(msg)
        if target not in MAP_TARGETS:
            hint = _closest(target, list(MAP_TARGETS))
            msg = f"unknown mapping target {target!r}{hint} (targets: {', '.join(MAP_TARGETS)})"
            raise ReplayError(msg)
        if target in out:
            msg = f"mapping target {target!r} is given twice"
            raise ReplayError(msg)
        out[target] = column.strip()
    return out


@dataclass(frozen=True, slots=True)
class PackSpec:
    """The metadata of the pack an external log comes from (the contract's pack_meta).

    Args:
        pack: identifier (every pack of the file, when the file has a pack column).
        chemistry: a cell type of :mod:`twin.chemistry` (``nmc811``, ``nmc532``, ``lfp``, ``lmo``).
        rated_capacity_ah: rated capacity of the pack (a cell group: cell Ah x parallel), Ah.
        series_cells: cell groups in series.
        parallel_cells: cells in parallel per group.
        life: ``new`` or ``second_life``.
        oem: maker or model, free text.
        rated_energy_kwh: default: rated Ah x series x the chemistry's nominal voltage.
        voltage_min_v: default: series x the chemistry's lower cell limit.
        voltage_max_v: default: series x the chemistry's upper cell limit.
        current_max_discharge_a: default: the chemistry's discharge C-rate x rated Ah.
        current_max_charge_a: default: the chemistry's charge C-rate x rated Ah.
    """

    pack: str
    chemistry: str
    rated_capacity_ah: float
    series_cells: int
    parallel_cells: int = 1
    life: Literal["new", "second_life"] = "new"
    oem: str = "unknown"
    rated_energy_kwh: float | None = None
    voltage_min_v: float | None = None
    voltage_max_v: float | None = None
    current_max_discharge_a: float | None = None
    current_max_charge_a: float | None = None

    def meta_row(self, ts_ms: int, packs: list[str] | None = None) -> pl.DataFrame:
        """Return the pack_meta rows (one per pack of ``packs``, default this spec's pack).

        Raises:
            ReplayError: an unknown chemistry or a value the contract refuses.
        """
        from twin.chemistry import CHEMISTRY_NAMES, get_chemistry
        from twin.errors import ChemistryError

        try:
            chem = get_chemistry(self.chemistry)
        except (ChemistryError, KeyError) as exc:
            hint = _closest(self.chemistry, list(CHEMISTRY_NAMES))
            msg = f"unknown chemistry {self.chemistry!r}{hint} (known: {', '.join(CHEMISTRY_NAMES)})"
            raise ReplayError(msg) from exc
        ah = float(self.rated_capacity_ah)
        values = {
            "ts_ms": ts_ms,
            "chemistry": self.chemistry,
            "life": self.life,
            "oem": self.oem,
            "rated_capacity_ah": ah,
            "rated_energy_kwh": self.rated_energy_kwh
            if self.rated_energy_kwh is not None
            else round(ah * self.series_cells * chem.v_nominal_v / 1000.0, 6),
            "series_cells": self.series_cells,
            "parallel_cells": self.parallel_cells,
            "voltage_min_v": self.voltage_min_v
            if self.voltage_min_v is not None
            else round(self.series_cells * chem.v_min_v, 4),
            "voltage_max_v": self.voltage_max_v
            if self.voltage_max_v is not None
            else round(self.series_cells * chem.v_max_v, 4),
            "current_max_discharge_a": self.current_max_discharge_a
            if self.current_max_discharge_a is not None
            else round(chem.max_discharge_c * ah, 4),
            "current_max_charge_a": self.current_max_charge_a
            if self.current_max_charge_a is not None
            else round(chem.max_charge_c * ah, 4),
        }
        rows = []
        for pack in packs or [self.pack]:
            try:
                c.PackMeta.model_validate({**values, "pack": pack})
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"])
                msg = f"pack metadata: {where}: {first['msg']} (got {first.get('input')!r})"
                raise ReplayError(msg) from exc
            rows.append({**values, "pack": pack})
        return _conform(pl.DataFrame(rows), c.PackMeta)


@dataclass(frozen=True, slots=True)
class ExternalOptions:
    """How to read an external log (see the module docstring for the conventions).

    Args:
        mapping: target -> the file's column (targets: :data:`MAP_TARGETS`); empty: the file
            uses the contract's column names (``ts_ms`` for the time).
        pack: the pack's metadata; None when ``packs`` gives the metadata of every pack.
        packs: pack metadata per pack (contract pack_meta columns), e.g. a run's packs table.
        time_unit: unit of a numeric time column.
        t0: the instant relative times count from (ISO 8601).
        current_sign: how the file signs current.
        temp_c: the temperature when the file has none, °C.
        site: the site identifier to replay as.
        separator: CSV field separator.
    """

    mapping: Mapping[str, str] = field(default_factory=dict)
    pack: PackSpec | None = None
    packs: pl.DataFrame | None = None
    time_unit: TimeUnit = "s"
    t0: str = DEFAULT_T0
    current_sign: CurrentSign = "discharge-positive"
    temp_c: float = 25.0
    site: str = "replay"
    separator: str = ","

    def __post_init__(self) -> None:
        """Check the options.

        Raises:
            ReplayError: an unknown unit or sign convention, a bad site, no metadata.
        """
        if self.time_unit not in get_args(TimeUnit):
            msg = f"time unit {self.time_unit!r} is not one of {', '.join(get_args(TimeUnit))}"
            raise ReplayError(msg)
        if self.current_sign not in get_args(CurrentSign):
            msg = f"current sign {self.current_sign!r} is not one of {', '.join(get_args(CurrentSign))}"
            raise ReplayError(msg)
        if not c.is_identifier(self.site):
            msg = f"bad site identifier {self.site!r}: must match {c.IDENTIFIER_PATTERN}"
            raise ReplayError(msg)
        if self.pack is None and self.packs is None:
            msg = (
                "an external file needs the pack's metadata: --chemistry, --rated-ah, --series "
                "(and --parallel), a --meta TOML file, or --packs with a packs table"
            )
            raise ReplayError(msg)


_TOML_KEYS: Final = frozenset(
    {f.name for f in dataclasses.fields(PackSpec)}
    | {"map", "time_unit", "t0", "current_sign", "temp_c", "site", "separator"}
)


def load_external_toml(path: Path) -> dict[str, Any]:
    """Read a small TOML file of pack metadata and reading options.

    Keys: the fields of :class:`PackSpec`, ``time_unit``, ``t0``, ``current_sign``,
    ``temp_c``, ``site``, ``separator`` and a ``[map]`` table (target = "column").

    Raises:
        ReplayError: an unreadable file, invalid TOML, or an unknown key (with the closest names).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}"
        raise ReplayError(msg) from exc
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path} is not valid TOML: {exc}"
        raise ReplayError(msg) from exc
    unknown = sorted(set(data) - _TOML_KEYS)
    if unknown:
        key = unknown[0]
        msg = f"{path}: unknown key {key!r}{_closest(key, sorted(_TOML_KEYS))}"
        raise ReplayError(msg)
    mapping = data.get("map", {})
    if not isinstance(mapping, dict):
        msg = f"{path}: 'map' must be a table of target = \"column\""
        raise ReplayError(msg)
    for target in mapping:
        if target not in MAP_TARGETS:
            msg = f"{path}: unknown mapping target {target!r}{_closest(target, list(MAP_TARGETS))}"
            raise ReplayError(msg)
    return data


def read_packs(path: Path) -> pl.DataFrame:
    """Read pack metadata (contract pack_meta columns) from a Parquet or CSV table, or a run folder.

    Raises:
        ReplayError: no such table, or one without the contract's required columns.
    """
    if path.is_dir():
        return open_run(path).meta
    if not path.is_file():
        msg = f"{path}: no such packs table"
        raise ReplayError(msg)
    frame = pl.read_csv(path) if path.suffix.lower() == ".csv" else pl.read_parquet(path)
    required = [k for k, f in c.PackMeta.model_fields.items() if f.is_required() and k != "ts_ms"]
    missing = [k for k in required if k not in frame.columns]
    if missing:
        msg = f"{path}: not a packs table, missing {', '.join(missing)}"
        raise ReplayError(msg)
    if "ts_ms" not in frame.columns:
        frame = frame.with_columns(pl.lit(_EPOCH_2000_MS, pl.Int64).alias("ts_ms"))
    return _conform(frame, c.PackMeta).group_by("pack", maintain_order=True).last()


def _read_file(path: Path, separator: str) -> pl.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".csv", ".txt", ".tsv"):
            return pl.read_csv(
                path,
                separator="\t" if suffix == ".tsv" else separator,
                infer_schema=False,
                truncate_ragged_lines=True,
            )
    except (OSError, pl.exceptions.PolarsError) as exc:
        msg = f"cannot read {path}: {exc}"
        raise ReplayError(msg) from exc
    msg = f"{path}: not a CSV or Parquet file (expected .csv, .tsv, .txt or .parquet)"
    raise ReplayError(msg)


def _numbers(raw: pl.DataFrame, column: str, target: str, *, required: bool) -> pl.Series:
    """Return a column as float64, with a clear error for a value that is not a number."""
    series = raw.get_column(column)
    if series.dtype.is_numeric() or series.dtype == pl.Boolean:
        out = series.cast(pl.Float64)
        text = None
    else:
        text = series.cast(pl.String).str.strip_chars()
        out = text.cast(pl.Float64, strict=False)
    if text is not None:
        bad = out.is_null() & text.is_not_null() & (text != "")
        if bad.any():
            row = int(bad.arg_true()[0])
            msg = f"column {column!r} ({target}): row {row + 1} holds {text[row]!r}, which is not a number"
            raise ReplayError(msg)
    if required and out.is_null().any():
        row = int(out.is_null().arg_true()[0])
        msg = f"column {column!r} ({target}): row {row + 1} is empty"
        raise ReplayError(msg)
    if (~out.is_finite()).fill_null(value=False).any():
        row = int((~out.is_finite()).fill_null(value=False).arg_true()[0])
        shown = repr(text[row]) if text is not None else out[row]
        msg = f"column {column!r} ({target}): row {row + 1} holds {shown}, which is not a finite number"
        raise ReplayError(msg)
    return out


def _times(raw: pl.DataFrame, column: str, options: ExternalOptions) -> pl.Series:
    """Return the time column as epoch ms (int64)."""
    series = raw.get_column(column)
    if isinstance(series.dtype, pl.Datetime):
        if series.dtype.time_zone is None:
            series = series.dt.replace_time_zone("UTC")
        ms = series.dt.epoch("ms")
    else:
        numeric = series.dtype.is_numeric()
        text = None if numeric else series.cast(pl.String).str.strip_chars()
        values = series.cast(pl.Float64) if numeric else text.cast(pl.Float64, strict=False)  # type: ignore[union-attr]
        if text is not None and values.is_null().all() and text.is_not_null().any():
            parsed = text.str.to_datetime(strict=False, time_unit="ms", time_zone="UTC")
            bad = parsed.is_null()
            if bad.any():
                row = int(bad.arg_true()[0])
                msg = f"column {column!r} (ts): row {row + 1} holds {text[row]!r}, which is not an ISO 8601 time"
                raise ReplayError(msg)
            ms = parsed.dt.epoch("ms")
        else:
            values = _numbers(raw, column, "ts", required=True)
            ms = (values * _UNIT_MS[options.time_unit]).round(0).cast(pl.Int64)
            top = ms.max()
            if isinstance(top, int) and top < _EPOCH_2000_MS:
                ms = ms + parse_time(options.t0, now_ms=0)
    return ms.alias("ts_ms")


def _check_ranges(frame: pl.DataFrame, columns: Mapping[str, str]) -> None:
    """Refuse values outside the contract's ranges (a wrong unit or column), naming the first."""
    for name, info in c.PackTelemetry.model_fields.items():
        if name not in frame.columns or name not in _FLOAT_TARGETS:
            continue
        lo = hi = None
        for meta in info.metadata:
            if isinstance(meta, at.Ge):
                lo = float(meta.ge)  # type: ignore[arg-type]
            elif isinstance(meta, at.Le):
                hi = float(meta.le)  # type: ignore[arg-type]
        col = frame.get_column(name)
        bad = pl.Series([False] * frame.height)
        if lo is not None:
            bad = bad | (col < lo).fill_null(value=False)
        if hi is not None:
            bad = bad | (col > hi).fill_null(value=False)
        if bad.any():
            row = int(bad.arg_true()[0])
            source = columns.get(name, name)
            msg = (
                f"column {source!r} ({name}): row {row + 1} holds {col[row]}, outside the contract's "
                f"[{lo}, {hi}]: a wrong unit or column?"
            )
            raise ReplayError(msg)


def read_external(path: Path, options: ExternalOptions) -> StreamRun:
    """Read a CSV or Parquet log into a replay source, through the mapping and conventions of ``options``.

    Raises:
        ReplayError: an unreadable file, an unknown column, a value that is not a number or a
            time, time going backwards within a pack, a value outside the contract's range,
            bad pack metadata.
    """
    raw = _read_file(path, options.separator)
    # Without a mapping, the file uses the contract's names (ts_ms for the time).
    mapping = dict(options.mapping) or {
        ("ts" if k == "ts_ms" else k): k for k in raw.columns if k in MAP_TARGETS or k == "ts_ms"
    }
    missing = [t for t in _REQUIRED_TARGETS if t not in mapping]
    if missing:
        msg = f"{path}: the mapping needs {', '.join(missing)} (e.g. --map ts=Time,current_a=Current,voltage_v=Voltage)"
        raise ReplayError(msg)
    for target, column in mapping.items():
        if column not in raw.columns:
            shown = ", ".join(repr(x) for x in raw.columns[:20]) + (" ..." if raw.width > 20 else "")
            msg = f"{path}: no column {column!r} (for {target}){_closest(column, raw.columns)}; the columns are {shown}"
            raise ReplayError(msg)
    if raw.height == 0:
        msg = f"{path} holds no rows"
        raise ReplayError(msg)

    ts = _times(raw, mapping["ts"], options)
    cols: dict[str, pl.Series] = {"ts_ms": ts}
    for target in _FLOAT_TARGETS:
        if target in mapping:
            cols[target] = _numbers(raw, mapping[target], target, required=target in _REQUIRED_TARGETS).alias(target)
    if "pack" in mapping:
        packs = raw.get_column(mapping["pack"]).cast(pl.String).str.strip_chars().alias("pack")
        bad = ~packs.str.contains(c.IDENTIFIER_PATTERN).fill_null(value=False)
        if bad.any():
            row = int(bad.arg_true()[0])
            msg = (
                f"column {mapping['pack']!r} (pack): row {row + 1} holds {packs[row]!r}, "
                f"not an identifier ({c.IDENTIFIER_PATTERN})"
            )
            raise ReplayError(msg)
    else:
        pack_id = options.pack.pack if options.pack is not None else None
        if pack_id is None:
            msg = "an external file without a pack column needs --pack (or a pack spec)"
            raise ReplayError(msg)
        if not c.is_identifier(pack_id):
            msg = f"bad pack identifier {pack_id!r}: must match {c.IDENTIFIER_PATTERN}"
            raise ReplayError(msg)
        packs = pl.Series("pack", [pack_id] * raw.height, dtype=pl.String)
    cols["pack"] = packs
    frame = pl.DataFrame(list(cols.values())).with_row_index("_row")
    if "seq" in mapping:
        frame = frame.with_columns(_numbers(raw, mapping["seq"], "seq", required=True).cast(pl.Int64).alias("seq"))
    else:
        frame = frame.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("pack").alias("seq"))

    # Time must not go backwards within a pack; a repeated time keeps its first row.
    back = frame.select((pl.col("ts_ms").diff().over("pack") < 0).fill_null(value=False).alias("b"))["b"]
    if back.any():
        row = int(back.arg_true()[0])
        msg = (
            f"column {mapping['ts']!r} (ts): time goes backwards at row {row + 1} "
            f"({raw.get_column(mapping['ts'])[row]!r} after {raw.get_column(mapping['ts'])[row - 1]!r})"
        )
        raise ReplayError(msg)
    repeated = frame.height
    frame = frame.unique(subset=["pack", "ts_ms"], keep="first", maintain_order=True)
    repeated -= frame.height

    if options.current_sign == "discharge-negative":
        frame = frame.with_columns(-pl.col("current_a"))
    temp = pl.col("temp_c") if "temp_c" in frame.columns else pl.lit(options.temp_c, pl.Float64)
    for name in ("temp_min_c", "temp_max_c", "temp_avg_c"):
        if name not in frame.columns:
            frame = frame.with_columns(temp.alias(name))
    meta = _external_meta(options, frame)
    series = frame.join(meta.select("pack", "series_cells"), on="pack", how="left", maintain_order="left")
    per_cell = pl.col("voltage_v") / pl.col("series_cells").cast(pl.Float64)
    series = series.with_columns(
        *(per_cell.alias(n) for n in ("cell_v_min_v", "cell_v_max_v") if n not in frame.columns),
        pl.lit(0, pl.Int64).alias("cell_v_min_idx"),
        pl.lit(0, pl.Int64).alias("cell_v_max_idx"),
        pl.lit(value=True).alias("contactor_closed"),
        pl.lit(0, pl.Int64).alias("fault_bits"),
    )
    _check_ranges(series, mapping)
    tele = _conform(series.sort("ts_ms", "_row"), c.PackTelemetry)
    first, last = tele["ts_ms"].min(), tele["ts_ms"].max()
    assert isinstance(first, int)
    assert isinstance(last, int)
    meta = meta.with_columns(pl.lit(first, pl.Int64).alias("ts_ms"))
    return StreamRun(
        path=path,
        site=options.site,
        meta=meta,
        status=pl.DataFrame(schema=_table_schema(c.PackStatus)),
        site_rows=pl.DataFrame(schema=_table_schema(c.SiteTelemetry)),
        telemetry_rows=tele.height,
        telemetry_source=_frame_batches(tele),
        first_ms=first,
        last_ms=last,
        notes={"repeated_times": repeated},
    )


def _external_meta(options: ExternalOptions, frame: pl.DataFrame) -> pl.DataFrame:
    packs = frame.get_column("pack").unique(maintain_order=True).to_list()
    first = frame["ts_ms"].min()
    assert isinstance(first, int)
    if options.packs is not None:
        known = options.packs.filter(pl.col("pack").is_in(packs))
        lacking = [p for p in packs if p not in set(known["pack"].to_list())]
        if lacking and options.pack is None:
            msg = f"no metadata for pack(s) {', '.join(lacking[:5])} in the packs table"
            raise ReplayError(msg)
        extra = options.pack.meta_row(first, lacking) if lacking and options.pack is not None else None
        return known if extra is None else pl.concat([known, extra])
    assert options.pack is not None
    return options.pack.meta_row(first, packs)


# --------------------------------------------------------------------------- InfluxDB


def _influx_lines(url: str, database: str, query: str, auth: tuple[str, str] | None) -> Iterator[dict[str, Any]]:
    """Run an InfluxQL query (chunked answer) and yield every series piece of the answer."""
    params = urllib.parse.urlencode(
        {"db": database, "q": query, "epoch": "ms", "chunked": "true", "chunk_size": "20000"}
    )
    request = urllib.request.Request(f"{url.rstrip('/')}/query", data=params.encode(), method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    if auth is not None:
        request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            for line in answer:
                if not line.strip():
                    continue
                doc = json.loads(line)
                for result in doc.get("results", []):
                    if "error" in result:
                        msg = f"InfluxDB refused {query[:120]!r}: {result['error']}"
                        raise ReplayError(msg)
                    yield from result.get("series", [])
    except urllib.error.HTTPError as exc:
        msg = f"InfluxDB at {url} answered HTTP {exc.code} to a query of {database!r}"
        raise ReplayError(msg) from exc
    except (urllib.error.URLError, OSError) as exc:
        msg = f"cannot reach InfluxDB at {url}: {exc}"
        raise ReplayError(msg) from exc


def _influx_frame(url: str, database: str, query: str, auth: tuple[str, str] | None) -> pl.DataFrame:
    frames = []
    for series in _influx_lines(url, database, query, auth):
        columns = list(series["columns"])
        values = series.get("values") or []
        if not values:
            continue
        data = {name: [row[i] for row in values] for i, name in enumerate(columns)}
        frames.append(pl.DataFrame(data, strict=False, infer_schema_length=None))
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="diagonal_relaxed")


def _q(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def read_influx(
    url: str,
    database: str,
    *,
    site: str,
    start_ms: int,
    stop_ms: int,
    packs: pl.DataFrame,
    auth: tuple[str, str] | None = None,
    slice_ms: int = _SLICE_MS,
) -> StreamRun:
    """Read a time range of what the twin wrote to InfluxDB (1.x, or the v1 API of 2.x/3.x) as a replay source.

    ``pack_telemetry`` and ``pack_cells`` are read an hour at a time (``slice_ms``) as the
    replay asks for them; the site meter's rows of ``site_state`` (those with ``ambient_c``,
    which only the meter writes) at once. InfluxDB keeps no pack metadata and no gateway
    status: ``packs`` gives the metadata; every pack counts as online.

    Raises:
        ReplayError: InfluxDB cannot be reached or refuses the query, or the range is empty.
    """
    if stop_ms <= start_ms:
        msg = f"the range is empty: --stop ({stop_ms}) is not after --start ({start_ms})"
        raise ReplayError(msg)
    where = f'"site" = {_q(site)} AND time >= {start_ms}ms AND time < {stop_ms}ms'
    counted = _influx_frame(url, database, f'SELECT count("voltage_v") FROM "pack_telemetry" WHERE {where}', auth)
    rows = int(counted.get_column("count")[0]) if counted.height and "count" in counted.columns else 0
    if rows == 0:
        msg = f"InfluxDB {url} database {database!r} holds no pack_telemetry of site {site!r} in the range"
        raise ReplayError(msg)

    def slices() -> Iterator[str]:
        for lo in range(start_ms, stop_ms, slice_ms):
            hi = min(lo + slice_ms, stop_ms)
            yield f'"site" = {_q(site)} AND time >= {lo}ms AND time < {hi}ms'

    def tele(batch_rows: int) -> Iterator[pl.DataFrame]:
        for cond in slices():
            frame = _influx_frame(url, database, f'SELECT * FROM "pack_telemetry" WHERE {cond}', auth)
            if frame.height:
                frame = _conform(frame.rename({"time": "ts_ms"}), c.PackTelemetry).sort("ts_ms", maintain_order=True)
                yield from _frame_batches(frame)(batch_rows)

    def cells(batch_rows: int) -> Iterator[pl.DataFrame]:
        for cond in slices():
            frame = _influx_frame(url, database, f'SELECT * FROM "pack_cells" WHERE {cond}', auth)
            if frame.height == 0:
                continue
            volts = sorted((k for k in frame.columns if re.fullmatch(r"cell_v_\d+", k)), key=lambda k: int(k[7:]))
            temps = sorted((k for k in frame.columns if re.fullmatch(r"temp_c_\d+", k)), key=lambda k: int(k[7:]))
            frame = frame.rename({"time": "ts_ms"}).with_columns(
                pl.concat_list([pl.col(k).cast(pl.Float64) for k in volts]).list.drop_nulls().alias("cell_voltages_v"),
                (
                    pl.concat_list([pl.col(k).cast(pl.Float64) for k in temps]).list.drop_nulls()
                    if temps
                    else pl.lit([], dtype=pl.List(pl.Float64))
                ).alias("temps_c"),
            )
            yield from _frame_batches(_conform(frame, c.PackCells).sort("ts_ms", maintain_order=True))(batch_rows)

    fields = ", ".join(f'"{k}"' for k in ("ambient_c", "load_w", "solar_w", "grid_w", "battery_w"))
    site_frame = _influx_frame(url, database, f'SELECT {fields} FROM "site_state" WHERE {where}', auth)
    if site_frame.height and "ambient_c" in site_frame.columns:
        site_frame = (
            site_frame.filter(pl.col("ambient_c").is_not_null())
            .rename({"time": "ts_ms"})
            .with_columns(pl.lit(site).alias("site"), pl.int_range(pl.len(), dtype=pl.Int64).alias("seq"))
        )
        site_rows = _conform(site_frame, c.SiteTelemetry).sort("ts_ms")
    else:
        site_rows = pl.DataFrame(schema=_table_schema(c.SiteTelemetry))
    return StreamRun(
        path=Path(f"influx:{database}"),
        site=site,
        meta=_conform(packs, c.PackMeta),
        status=pl.DataFrame(schema=_table_schema(c.PackStatus)),
        site_rows=site_rows,
        telemetry_rows=rows,
        telemetry_source=tele,
        cells_source=cells,
    )
