"""Load the ORNL 2013 Nissan Leaf cell files in ``tests/data/nissan_leaf/`` with polars.

The files are Bitrode cycler exports (CSV, 15 columns plus a trailing empty one, some with a
header row starting with ``Exclude`` and some without) and LabVIEW ``.lvm`` thermocouple
logs (tab-separated, empty first column, then TC1-TC4 in °C, one row every 3 s).

The loaders convert to the project's conventions once, here at the edge: units in column
names and **current positive on discharge** (the Bitrode files log discharge as negative
current and negative capacity). See ``tests/data/nissan_leaf/README.md`` for the source,
licence and citation.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

__all__ = [
    "BITRODE_COLUMNS",
    "DATA_DIR",
    "LVM_SAMPLE_PERIOD_S",
    "hppc_from_full_charge",
    "load_bitrode",
    "load_lvm",
    "steps",
]

DATA_DIR = Path(__file__).parent / "data" / "nissan_leaf"
"""Folder holding the copied ORNL files."""

LVM_SAMPLE_PERIOD_S = 3.0
"""Sample period of the .lvm thermocouple logs (ORNL ``datalib/tempdata.py``), s."""

BITRODE_COLUMNS = (
    "exclude",
    "time_s",
    "cycle",
    "loop1",
    "loop2",
    "loop3",
    "step",
    "step_time_s",
    "current_raw_a",
    "voltage_v",
    "power_raw_w",
    "capacity_raw_ah",
    "energy_raw_wh",
    "mode",
    "data",
)
"""Names given to the 15 Bitrode columns, in file order (raw = the file's sign)."""

_FLOAT_COLUMNS = ("time_s", "step_time_s", "current_raw_a", "voltage_v", "capacity_raw_ah")


def load_bitrode(path: str | Path) -> pl.DataFrame:
    """Load one Bitrode CSV export.

    Args:
        path: the CSV file, with or without the ``Exclude,...`` header row.

    Returns:
        A frame with columns ``time_s`` (f64, s), ``current_a`` (f64, A, positive on
        discharge), ``voltage_v`` (f64, V), ``mode`` (str: REST, CHRG or DCHG),
        ``capacity_ah`` (f64, Ah, the cycler's per-step counter, positive when discharged),
        ``step`` (i64, the cycler step number), ``step_time_s`` (f64, s) and ``flag`` (str,
        the data flag: ``S`` step boundary, ``Q``/``H``/``P`` other markers, empty otherwise).
    """
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        has_header = fh.readline().startswith("Exclude")
    raw = pl.read_csv(
        path,
        has_header=False,
        skip_rows=1 if has_header else 0,
        columns=list(range(len(BITRODE_COLUMNS))),
        infer_schema=False,
        truncate_ragged_lines=True,
    )
    raw = raw.rename(dict(zip(raw.columns, BITRODE_COLUMNS, strict=True)))
    return raw.select(
        pl.col("time_s").str.strip_chars().cast(pl.Float64),
        (0.0 - pl.col("current_raw_a").str.strip_chars().cast(pl.Float64)).alias("current_a"),
        pl.col("voltage_v").str.strip_chars().cast(pl.Float64),
        pl.col("mode").str.strip_chars(),
        (0.0 - pl.col("capacity_raw_ah").str.strip_chars().cast(pl.Float64)).alias("capacity_ah"),
        pl.col("step").str.strip_chars().cast(pl.Int64),
        pl.col("step_time_s").str.strip_chars().cast(pl.Float64),
        pl.col("data").fill_null("").str.strip_chars().alias("flag"),
    )


def load_lvm(path: str | Path) -> pl.DataFrame:
    """Load one LabVIEW ``.lvm`` thermocouple log.

    The time base is the row index times 3 s; aligning it with the Bitrode clock is left to
    the caller (ORNL align the two by hand, see ``SOURCE_README.md``).

    Args:
        path: the .lvm file (tab-separated, CRLF line ends, no header).

    Returns:
        A frame with ``time_s`` (f64, s from the first row) and ``tc1_c`` ... ``tc4_c`` (f64,
        °C; TC1 near the tabs, TC2 mid-cell, TC3 near the bottom).
    """
    raw = pl.read_csv(
        Path(path),
        has_header=False,
        separator="\t",
        infer_schema=False,
        truncate_ragged_lines=True,
    )
    tcs = raw.columns[1:5]
    return raw.select(
        (pl.int_range(pl.len(), dtype=pl.Int64).cast(pl.Float64) * LVM_SAMPLE_PERIOD_S).alias("time_s"),
        *(pl.col(name).str.strip_chars().cast(pl.Float64).alias(f"tc{k}_c") for k, name in enumerate(tcs, start=1)),
    )


def steps(df: pl.DataFrame) -> pl.DataFrame:
    """Number the contiguous cycler steps of a Bitrode frame.

    Args:
        df: a frame from :func:`load_bitrode`.

    Returns:
        ``df`` with an extra ``segment`` column (u32, 0, 1, ...) that increases every time
        the cycler step number changes.
    """
    change = (pl.col("step") != pl.col("step").shift()).fill_null(False)
    return df.with_columns(change.cum_sum().cast(pl.UInt32).alias("segment"))


def hppc_from_full_charge(df: pl.DataFrame) -> pl.DataFrame:
    """Cut an ORNL HPPC record to start at the rest that follows the full charge.

    The ORNL HPPC tests charge to 4.2 V (constant current, then constant voltage), rest for
    an hour, then repeat {30 s discharge pulse, 40 s rest, 10 s regen pulse, about 3 Ah
    discharge at 10 A, 1 h rest} down to 3.0 V. Starting at the rest before the first
    discharge pulse makes SoC 1 the first sample.

    Args:
        df: a frame from :func:`load_bitrode` holding an HPPC test.

    Returns:
        The rows from the first sample of that rest to the end of the record.
    """
    seg = steps(df)
    first_pulse = seg.filter(pl.col("current_a") > 20.0).get_column("segment").min()
    if not isinstance(first_pulse, int):
        msg = "no discharge pulse above 20 A in the record"
        raise ValueError(msg)
    return seg.filter(pl.col("segment") >= first_pulse - 1).drop("segment")
