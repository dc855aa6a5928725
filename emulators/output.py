"""The run folder an emulation writes: Parquet tables appended chunk by chunk, and run.json.

Layout (the recorder writes the same, without the truth tables)::

    run.json             scenario, seed, versions, time span, row counts
    packs.parquet        one row per pack: the contract's pack_meta fields
    status.parquet       the contract's pack_status fields: every gateway's online/offline changes
    telemetry.parquet    the contract's pack_telemetry fields, one row per pack and sample
    cells.parquet        the contract's pack_cells fields
    site.parquet         the contract's site_telemetry fields
    truth.parquet        the emulator's true state per pack (never read by the twin)
    site_truth.parquet   true site energy to the floor, runtime and ride-through

Column names and types of the telemetry tables are the contract's polars schemas (without
the constant ``schema`` column), so a run folder replays through the same decoder as MQTT.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from twin import contract as c

__all__ = ["TABLE_SCHEMAS", "RunWriter", "contract_columns"]


def contract_columns(model: type[c.Message]) -> pl.Schema:
    """The contract's polars schema of ``model`` without the constant ``schema`` column."""
    return pl.Schema({k: v for k, v in c.polars_schema(model).items() if k != "schema"})


TRUTH_SCHEMA: Final = pl.Schema(
    {
        "ts_ms": pl.Int64(),
        "pack": pl.String(),
        "soc": pl.Float64(),
        "soc_cell_mean": pl.Float64(),
        "capacity_ah": pl.Float64(),
        "soh": pl.Float64(),
        "r0_ohm": pl.Float64(),
        "r0_ohm_25c": pl.Float64(),
        "temp_c": pl.Float64(),
        "current_a": pl.Float64(),
        "voltage_v": pl.Float64(),
        "energy_to_floor_kwh": pl.Float64(),
        "available": pl.Boolean(),
    }
)
SITE_TRUTH_SCHEMA: Final = pl.Schema(
    {
        "ts_ms": pl.Int64(),
        "energy_to_floor_kwh": pl.Float64(),
        "battery_w": pl.Float64(),
        "load_w": pl.Float64(),
        "runtime_s": pl.Float64(),
        "ridethrough_s": pl.Float64(),
        "packs_available": pl.Int64(),
    }
)

TABLE_SCHEMAS: Final[dict[str, pl.Schema]] = {
    "packs": contract_columns(c.PackMeta),
    "status": contract_columns(c.PackStatus),
    "telemetry": contract_columns(c.PackTelemetry),
    "cells": contract_columns(c.PackCells),
    "site": contract_columns(c.SiteTelemetry),
    "truth": TRUTH_SCHEMA,
    "site_truth": SITE_TRUTH_SCHEMA,
}


class RunWriter:
    """Append polars frames to the run folder's Parquet files, one row group per chunk.

    Args:
        out: the run folder (created).
        tables: which tables to write (default: all).
    """

    def __init__(self, out: Path, tables: tuple[str, ...] = tuple(TABLE_SCHEMAS)) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._tables = tables
        self.rows: dict[str, int] = dict.fromkeys(tables, 0)

    def write(self, table: str, frame: pl.DataFrame) -> None:
        """Append ``frame`` (cast to the table's schema) to ``table``."""
        schema = TABLE_SCHEMAS[table]
        if frame.height == 0:
            return
        arrow = frame.select([pl.col(k).cast(v) for k, v in schema.items()]).to_arrow()
        writer = self._writers.get(table)
        if writer is None:
            writer = pq.ParquetWriter(self.out / f"{table}.parquet", arrow.schema, compression="zstd")
            self._writers[table] = writer
        writer.write_table(arrow)
        self.rows[table] += frame.height

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """Write a JSON document (``run.json``) into the folder."""
        (self.out / name).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def close(self) -> None:
        """Close every file; tables that got no rows are written empty, with their schema."""
        for writer in self._writers.values():
            writer.close()
        for table in self._tables:
            if table not in self._writers:
                empty = pl.DataFrame(schema=TABLE_SCHEMAS[table]).to_arrow()
                pq.write_table(empty, self.out / f"{table}.parquet")
        self._writers.clear()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def arrow_schema(table: str) -> pa.Schema:
    """The Arrow schema of a run-folder table."""
    return pl.DataFrame(schema=TABLE_SCHEMAS[table]).to_arrow().schema
