"""Offline replay of a run folder through the twin: the estimates a live ``mgtwin serve`` would have made.

The run folder (written by ``mgtwin emulate --out``, later by ``mgtwin record``) holds the
contract's tables. Replay feeds them, in event time, through the same
:class:`twin.state.TwinCore` as the live service (mirror, data-quality rules, estimators),
one window of ``every_s`` seconds at a time, and after each window takes the same views the
service publishes (:meth:`~twin.state.TwinCore.pack_frame`, :meth:`~twin.state.TwinCore.site_frame`)
at the window's end. The clock is the event time: window ``k`` holds the rows stamped in
``(start + (k-1) every, start + k every]`` and its views are stamped ``start + k every``.

Outputs, in the output folder:

* ``estimates.parquet``: per window and pack, the TwinPackState columns plus the filter's
  ``soc_mean``, ``soc_min_cell`` and ``current_offset_a`` (``sample_ts_ms`` is the pack's last
  sample; ``ts_ms`` the window's end);
* ``site_estimates.parquet``: per window, the TwinState columns;
* ``replay.json``: what was read, the data-quality counters and the speed.

The telemetry is read in record batches (a day of the nevada site is 70 million rows), so
memory stays bounded by the batch and the estimates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from numpy.typing import NDArray

from twin import contract as c
from twin.errors import TwinError
from twin.pipeline import REJECTS_SCHEMA, Decoded, check_rows, output_schema
from twin.state import CoreOptions, IngestResult, TwinCore

__all__ = [
    "PartsRunFolder",
    "ReplayError",
    "ReplayOptions",
    "ReplayResult",
    "ReplayWindow",
    "RunFolder",
    "open_run",
    "replay_run",
    "table_parts",
    "write_outputs",
]

ESTIMATES_FILE: Final = "estimates.parquet"
SITE_ESTIMATES_FILE: Final = "site_estimates.parquet"
REPLAY_INFO_FILE: Final = "replay.json"
REPLAY_REJECTS_FILE: Final = "rejects.parquet"


class ReplayError(TwinError):
    """A source that cannot be replayed: missing tables, wrong columns, no telemetry."""


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How to replay.

    Attributes:
        every_s: window length and estimate cadence, event-time seconds.
        batch_rows: telemetry rows read at a time (bounds memory).
    """

    every_s: float = 60.0
    batch_rows: int = 1 << 20

    def __post_init__(self) -> None:
        """Check the options.

        Raises:
            ReplayError: a non-positive cadence or batch size.
        """
        if not self.every_s > 0:
            msg = f"every_s must be positive, got {self.every_s}"
            raise ReplayError(msg)
        if self.batch_rows < 1:
            msg = f"batch_rows must be at least 1, got {self.batch_rows}"
            raise ReplayError(msg)


@dataclass(frozen=True, slots=True)
class RunFolder:
    """A run folder's tables (telemetry is streamed, the small tables are loaded)."""

    path: Path
    site: str
    meta: pl.DataFrame
    status: pl.DataFrame
    site_rows: pl.DataFrame
    telemetry_rows: int

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """Open a run folder.

        Raises:
            ReplayError: not a run folder, or a table without the contract's columns.
        """
        if not path.is_dir():
            msg = f"{path} is not a folder (expected a run folder written by `mgtwin emulate --out` or `mgtwin record`)"
            raise ReplayError(msg)
        telemetry = path / "telemetry.parquet"
        if not telemetry.is_file():
            msg = f"{path} has no telemetry.parquet: not a run folder"
            raise ReplayError(msg)
        info: dict[str, Any] = {}
        if (path / "run.json").is_file():
            info = json.loads((path / "run.json").read_text(encoding="utf-8"))
        meta = _read_table(path / "packs.parquet", c.PackMeta, required=False)
        status = _read_table(path / "status.parquet", c.PackStatus, required=False)
        site_rows = _read_table(path / "site.parquet", c.SiteTelemetry, required=False)
        site = str(info.get("site") or (site_rows["site"][0] if site_rows.height else "replay"))
        _check_columns(pq.read_schema(telemetry).names, c.PackTelemetry, telemetry)
        rows = pq.ParquetFile(telemetry).metadata.num_rows
        if rows == 0:
            msg = f"{telemetry} holds no rows"
            raise ReplayError(msg)
        return cls(path=path, site=site, meta=meta, status=status, site_rows=site_rows, telemetry_rows=rows)

    def telemetry_batches(self, rows: int) -> Iterator[pl.DataFrame]:
        """Yield the telemetry in record batches of about ``rows`` rows, in file order."""
        columns = [k for k in output_schema(c.PackTelemetry) if k != "msg"]
        parquet = pq.ParquetFile(self.path / "telemetry.parquet")
        present = [k for k in columns if k in parquet.schema_arrow.names]
        meta = parquet.metadata
        if all(meta.row_group(i).num_rows <= 4 * rows for i in range(meta.num_row_groups)):
            # Whole row groups (the writers roll one per chunk): several times faster than
            # re-batching, and memory stays bounded by the row group. polars' own reader, one
            # row group per slice: 2-4x faster here than pyarrow's into a polars frame.
            scan = pl.scan_parquet(self.path / "telemetry.parquet").select(present)
            offset = 0
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                yield _conform(scan.slice(offset, n).collect(), c.PackTelemetry)
                offset += n
            return
        for batch in parquet.iter_batches(batch_size=rows, columns=present):
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            yield _conform(frame, c.PackTelemetry)


@dataclass
class ReplayResult:
    """Estimates and figures of one replay."""

    estimates: pl.DataFrame
    site_estimates: pl.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    #: Rows the contract refused (:data:`~twin.pipeline.REJECTS_SCHEMA`, ``topic`` the schema's name).
    rejects: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=REJECTS_SCHEMA))


def replay_run(
    run: RunFolder,
    *,
    core_options: CoreOptions | None = None,
    options: ReplayOptions = ReplayOptions(),
    progress: Callable[[int], None] | None = None,
    on_window: Callable[[ReplayWindow], None] | None = None,
) -> ReplayResult:
    """Replay a run folder through a fresh :class:`TwinCore` and collect its views per window.

    Args:
        run: the opened run folder.
        core_options: the core's options (default: ``CoreOptions(site=run.site)``).
        options: window length and batch size.
        progress: called with the number of telemetry rows read so far.
        on_window: called after each window with what went through the core (for sinks that
            write what the live service writes, e.g. InfluxDB); it must not change the core.

    Returns:
        The per-pack and per-site estimates and the replay's figures.
    """
    core = TwinCore(core_options or CoreOptions(site=run.site))
    every_ms = round(options.every_s * 1000)
    # Rows whose values break the contract (a file is not checked as a message is) are refused
    # and counted, as the live service refuses such messages; the rest go on. A field a file
    # lacks may be null (a cycler's log has no BMS SoC).
    refused: list[pl.DataFrame] = []

    def checked(frame: pl.DataFrame, model: type[c.Message]) -> pl.DataFrame:
        ok, bad = check_rows(frame, model, require=False)
        if bad.height:
            refused.append(bad.with_columns(pl.lit(model.schema_name).alias("topic")))
        return ok

    meta = checked(run.meta, c.PackMeta)
    status_rows = checked(run.status, c.PackStatus)
    site_rows = checked(run.site_rows, c.SiteTelemetry)
    empty = {kind: pl.DataFrame(schema=output_schema(model)) for kind, model in _KINDS.items()}
    packs_out: list[pl.DataFrame] = []
    site_out: list[pl.DataFrame] = []
    started = time.perf_counter()
    start_ms: int | None = None
    meta_pending = True
    done_rows = 0

    def window_of() -> pl.Expr:
        assert start_ms is not None
        return ((pl.col("ts_ms") - start_ms + every_ms - 1) // every_ms).clip(lower_bound=0).alias("_w")

    def run_window(w: int, tele: pl.DataFrame) -> None:
        nonlocal meta_pending
        assert start_ms is not None
        frames = dict(empty)
        frames["telemetry"] = _with_msg(tele)
        if meta_pending:
            frames["meta"] = _with_msg(meta)
            meta_pending = False
        frames["status"] = _with_msg(status_w.get(w, empty_status))
        frames["site"] = _with_msg(site_w.get(w, empty_site))
        decoded = Decoded(rejects=pl.DataFrame(schema=REJECTS_SCHEMA), **frames)
        now_ms = start_ms + w * every_ms
        ingested = core.ingest(decoded, now_ms=now_ms)
        packs = core.pack_frame(now_ms, extended=True).rename({"ts_ms": "sample_ts_ms"})
        packs_out.append(packs.with_columns(pl.lit(now_ms, pl.Int64).alias("ts_ms")))
        site_out.append(core.site_frame(now_ms).with_columns(pl.lit(now_ms, pl.Int64).alias("ts_ms")))
        if on_window is not None:
            on_window(ReplayWindow(now_ms=now_ms, decoded=decoded, ingested=ingested, core=core))

    status_w: dict[int, pl.DataFrame] = {}
    site_w: dict[int, pl.DataFrame] = {}
    empty_status = status_rows.clear()
    empty_site = site_rows.clear()
    carry: _Windowed | None = None
    last_w = -1
    for raw in run.telemetry_batches(options.batch_rows):
        batch = checked(raw, c.PackTelemetry)
        if start_ms is None and batch.height:
            start_ms = int(batch["ts_ms"].min())  # type: ignore[arg-type]
            status_w = _by_window(status_rows, window_of())
            site_w = _by_window(site_rows, window_of())
        if start_ms is None:
            done_rows += raw.height
            continue
        frame = _Windowed.of(batch, start_ms, every_ms)
        if carry is not None:
            frame = carry.then(frame)
        # The last window of a batch may continue in the next one: keep it back.
        ready, carry = frame.split_top()
        for w_file, part in ready.parts():
            w = w_file
            if w <= last_w:  # out of order in the file: fold into the next window (the core counts it late)
                w = last_w + 1
            for skipped in range(last_w + 1, w):  # windows without telemetry still get their views
                run_window(skipped, part.clear())
            run_window(w, part)
            last_w = w
        done_rows += raw.height
        if progress is not None:
            progress(done_rows)
    if carry is not None and carry.frame.height:
        w = max(int(carry.w[0]), last_w + 1)
        for skipped in range(last_w + 1, w):
            run_window(skipped, carry.frame.clear())
        run_window(w, carry.frame)
        last_w = w
    wall_s = time.perf_counter() - started
    rejects = pl.concat(refused) if refused else pl.DataFrame(schema=REJECTS_SCHEMA)
    estimates = pl.concat(packs_out, how="vertical_relaxed") if packs_out else pl.DataFrame()
    site_estimates = pl.concat(site_out, how="vertical_relaxed") if site_out else pl.DataFrame()
    info = {
        "source": str(run.path),
        "site": run.site,
        "every_s": options.every_s,
        "telemetry_rows": done_rows,
        "packs": len(core.packs.ids),
        "windows": len(site_out),
        "start_ms": start_ms,
        "end_ms": None if start_ms is None else start_ms + last_w * every_ms,
        "wall_s": round(wall_s, 3),
        "rows_per_s": round(done_rows / wall_s) if wall_s > 0 else None,
        "quality": dict(core.counters),
        "refused": {str(k): int(n) for k, n in rejects.group_by("reason").len().iter_rows()},
        "estimation": dict(core.estimation.counters),
        "soc_filter": core.estimation.soc.counters() if core.estimation.soc is not None else {},
    }
    return ReplayResult(estimates=estimates, site_estimates=site_estimates, info=info, rejects=rejects)


def write_outputs(result: ReplayResult, out: Path) -> list[Path]:
    """Write ``estimates.parquet``, ``site_estimates.parquet`` and ``replay.json`` into ``out``.

    And ``rejects.parquet`` when the contract refused rows of the source.

    Returns:
        The paths written.
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / ESTIMATES_FILE, out / SITE_ESTIMATES_FILE, out / REPLAY_INFO_FILE]
    result.estimates.write_parquet(paths[0], statistics=True)
    result.site_estimates.write_parquet(paths[1], statistics=True)
    paths[2].write_text(json.dumps(result.info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if result.rejects.height:
        paths.append(out / REPLAY_REJECTS_FILE)
        result.rejects.write_parquet(paths[-1])
    return paths


# ------------------------------------------------------------------------------------------------

_KINDS: Final[dict[str, type[c.Message]]] = {
    "telemetry": c.PackTelemetry,
    "cells": c.PackCells,
    "meta": c.PackMeta,
    "status": c.PackStatus,
    "site": c.SiteTelemetry,
}


def _check_columns(names: list[str], model: type[c.Message], path: Path) -> None:
    required = [f.alias or k for k, f in model.model_fields.items() if f.is_required()]
    missing = [k for k in required if k not in names and k != "schema"]
    if missing:
        msg = f"{path}: missing the column(s) {', '.join(missing)} of the contract's {model.schema_name}"
        raise ReplayError(msg)


def _read_table(path: Path, model: type[c.Message], *, required: bool) -> pl.DataFrame:
    if not path.is_file():
        if required:
            msg = f"{path} is missing"
            raise ReplayError(msg)
        return pl.DataFrame(schema={k: v for k, v in output_schema(model).items() if k != "msg"})
    frame = pl.read_parquet(path)
    _check_columns(frame.columns, model, path)
    return _conform(frame, model)


def _conform(frame: pl.DataFrame, model: type[c.Message]) -> pl.DataFrame:
    """Select the model's columns in contract order and types; absent optional ones are null."""
    schema = {k: v for k, v in output_schema(model).items() if k != "msg"}
    if frame.schema == pl.Schema(schema):
        return frame  # already the contract's columns, order and types
    return frame.select(
        [pl.col(k).cast(t) if k in frame.columns else pl.lit(None, dtype=t).alias(k) for k, t in schema.items()]
    )


def _with_msg(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("msg"), pl.all())


@dataclass(frozen=True, slots=True)
class _Windowed:
    """Telemetry rows and the replay window of each (``w``, aligned with the rows), cut without copies.

    Window ``w`` holds the rows stamped in ``(start + (w-1) every, start + w every]`` (0 for
    anything before the start). Rows in file order whose windows never decrease (what every
    writer produces) are cut into zero-copy slices; otherwise the rows are grouped by window
    with a stable sort, so each window keeps its rows in file order either way.
    """

    frame: pl.DataFrame
    w: NDArray[np.int64]

    @classmethod
    def of(cls, frame: pl.DataFrame, start_ms: int, every_ms: int) -> _Windowed:
        """Window the rows of ``frame``."""
        ts = frame.get_column("ts_ms").to_numpy()
        w = np.maximum((ts - start_ms + every_ms - 1) // every_ms, 0).astype(np.int64, copy=False)
        return cls(frame, w)

    def then(self, other: _Windowed) -> _Windowed:
        """These rows followed by ``other``'s."""
        return _Windowed(pl.concat([self.frame, other.frame]), np.concatenate([self.w, other.w]))

    def split_top(self) -> tuple[_Windowed, _Windowed]:
        """Split off the rows of the highest window (it may continue in the next batch)."""
        if self.w.size == 0:
            return self, self
        below = self.w < self.w.max()
        n = int(np.count_nonzero(below))
        if bool(below[:n].all()):  # the top window's rows come last: two slices
            return _Windowed(self.frame.slice(0, n), self.w[:n]), _Windowed(self.frame.slice(n), self.w[n:])
        keep = pl.Series(below)
        return (
            _Windowed(self.frame.filter(keep), self.w[below]),
            _Windowed(self.frame.filter(~keep), self.w[~below]),
        )

    def parts(self) -> Iterator[tuple[int, pl.DataFrame]]:
        """Yield each window present and its rows, in window order (rows in file order within one)."""
        frame, w = self.frame, self.w
        if w.size == 0:
            return
        if not bool(np.all(w[1:] >= w[:-1])):
            order = np.argsort(w, kind="stable")
            frame, w = frame[order], w[order]
        cuts = np.flatnonzero(w[1:] != w[:-1]) + 1
        bounds = np.concatenate([[0], cuts, [w.size]])
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):  # per window, not per row
            yield int(w[lo]), frame.slice(lo, hi - lo)


def _by_window(frame: pl.DataFrame, window: pl.Expr) -> dict[int, pl.DataFrame]:
    if frame.height == 0:
        return {}
    parts = frame.with_columns(window).partition_by("_w", as_dict=True, maintain_order=True)
    return {int(k[0]): v.drop("_w") for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------
# The rolled layout of `mgtwin record` (issue 7), and a hook for replay sinks.


@dataclass(frozen=True, slots=True)
class ReplayWindow:
    """One replay window as it went through the core, handed to ``replay_run(on_window=...)``.

    Attributes:
        now_ms: the window's end (event time): the "now" of its ingest and of its views.
        decoded: the frames the core was given (as :func:`twin.pipeline.decode_batch` would give them).
        ingested: what the core made of them (the accepted telemetry, tagged; rejects; counts).
        core: the core after the window, to take views from; read it, never change it.
    """

    now_ms: int
    decoded: Decoded
    ingested: IngestResult
    core: TwinCore


#: Part files of a table in the rolled layout: ``{table}/part-000001.parquet``, ...
PART_GLOB: Final = "part-*.parquet"
_log = logging.getLogger(__name__)


def table_parts(folder: Path, table: str) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """List the readable part files of one table of a rolled run folder, in order.

    A part whose Parquet footer cannot be read (a file cut off by a crash or a full disk) is
    skipped with a warning; files still being written (``.part-*.tmp``) are not listed.

    Returns:
        The readable parts and the skipped ones.
    """
    where = folder / table
    if not where.is_dir():
        return (), ()
    good: list[Path] = []
    bad: list[Path] = []
    for part in sorted(where.glob(PART_GLOB)):
        try:
            pq.ParquetFile(part).close()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            _log.warning("skipping %s: not a complete Parquet file (%s)", part, exc)
            bad.append(part)
        else:
            good.append(part)
    return tuple(good), tuple(bad)


def _read_parts(parts: tuple[Path, ...], model: type[c.Message]) -> pl.DataFrame:
    if not parts:
        return pl.DataFrame(schema={k: v for k, v in output_schema(model).items() if k != "msg"})
    frames = []
    for part in parts:
        frame = pl.read_parquet(part)
        _check_columns(frame.columns, model, part)
        frames.append(_conform(frame, model))
    return pl.concat(frames)


@dataclass(frozen=True, slots=True)
class PartsRunFolder(RunFolder):
    """A run folder in the rolled layout that ``mgtwin record`` writes.

    Each table is a folder of Parquet parts closed every few seconds
    (``telemetry/part-000001.parquet``, ...), so a crash loses at most the part being written.
    Parts that cannot be read are skipped with a warning (:attr:`skipped`); the rest is read.
    The pack metadata keeps the last row of each pack (a recorder gets the retained meta again
    at every reconnect); a status without a time (a last will seen before any telemetry) gets
    the time of the status before it, or the recording's first event time.
    """

    telemetry_parts: tuple[Path, ...] = ()
    skipped: tuple[Path, ...] = ()

    @classmethod
    def open_parts(cls, path: Path) -> PartsRunFolder:
        """Open a rolled run folder.

        Raises:
            ReplayError: no readable telemetry part, or a part without the contract's columns.
        """
        tele, bad_tele = table_parts(path, "telemetry")
        if not tele:
            msg = f"{path}/telemetry holds no readable part: nothing to replay"
            raise ReplayError(msg)
        info: dict[str, Any] = {}
        if (path / "run.json").is_file():
            info = json.loads((path / "run.json").read_text(encoding="utf-8"))
        skipped = list(bad_tele)
        tables = {}
        for table, model in (("packs", c.PackMeta), ("status", c.PackStatus), ("site", c.SiteTelemetry)):
            parts, bad = table_parts(path, table)
            skipped += bad
            tables[table] = _read_parts(parts, model)
        rows = 0
        first_ms: int | None = None
        for part in tele:
            parquet = pq.ParquetFile(part)
            names = parquet.schema_arrow.names
            _check_columns(names, c.PackTelemetry, part)
            rows += parquet.metadata.num_rows
            lowest = _min_ts(parquet, names.index("ts_ms"))
            if lowest is None:
                found = pl.read_parquet(part, columns=["ts_ms"])["ts_ms"].min()
                lowest = found if isinstance(found, int) else None
            if lowest is not None:
                first_ms = lowest if first_ms is None else min(first_ms, lowest)
        if rows == 0:
            msg = f"{path}/telemetry holds no rows"
            raise ReplayError(msg)
        meta_rows = tables["packs"].group_by("pack", maintain_order=True).last()
        status = tables["status"].with_columns(pl.col("ts_ms").fill_null(strategy="forward").fill_null(first_ms))
        site_rows = tables["site"]
        site = str(info.get("site") or (site_rows["site"][0] if site_rows.height else "replay"))
        return cls(
            path=path,
            site=site,
            meta=meta_rows,
            status=status,
            site_rows=site_rows,
            telemetry_rows=rows,
            telemetry_parts=tele,
            skipped=tuple(skipped),
        )

    def telemetry_batches(self, rows: int) -> Iterator[pl.DataFrame]:
        """Yield the telemetry part by part, in record batches of about ``rows`` rows."""
        columns = [k for k in output_schema(c.PackTelemetry) if k != "msg"]
        for part in self.telemetry_parts:
            parquet = pq.ParquetFile(part)
            present = [k for k in columns if k in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=rows, columns=present):
                frame = pl.from_arrow(batch)
                assert isinstance(frame, pl.DataFrame)
                yield _conform(frame, c.PackTelemetry)


def _min_ts(parquet: pq.ParquetFile, column: int) -> int | None:
    """Return the smallest ``ts_ms`` of a Parquet file from its row-group statistics (None: not recorded)."""
    lows = []
    for i in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None
        lows.append(int(stats.min))
    return min(lows) if lows else None


def open_run(path: Path) -> RunFolder:
    """Open a run folder in either layout: single tables (``mgtwin emulate``) or rolled parts (``mgtwin record``).

    Raises:
        ReplayError: neither layout, or a table without the contract's columns.
    """
    if not (path / "telemetry.parquet").is_file() and (path / "telemetry").is_dir():
        return PartsRunFolder.open_parts(path)
    return RunFolder.open(path)
