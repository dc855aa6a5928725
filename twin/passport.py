"""The second-life pack passport: where a pack comes from, what it was at intake, what it is now.

One row per second-life pack, from the pack's metadata (the retained ``meta`` topic: its
first-life summary and intake SoH) and the twin's present estimates (SoH, BMS SoH, RUL,
resistance, knee), with the aging model and the validity ranges the estimates rest on, so a
reader can tell a forecast inside the tested range from an extrapolation.

Pure: frames in, a frame out (:func:`passport`). The column set is fixed
(:data:`PASSPORT_SCHEMA`); an estimate the caller does not have is null.
"""

from __future__ import annotations

from typing import Final

import polars as pl

from twin.chemistry import CHEMISTRY_NAMES, get_chemistry
from twin.chemistry.aging import get_aging_law

__all__ = ["PASSPORT_SCHEMA", "passport"]

#: The passport's columns and types.
PASSPORT_SCHEMA: Final = pl.Schema(
    {
        "pack": pl.String,
        "chemistry": pl.String,
        "oem": pl.String,
        "rated_capacity_ah": pl.Float64,
        "vehicle": pl.String,
        "years_in_service": pl.Float64,
        "first_life_efc": pl.Float64,
        "retirement_soh": pl.Float64,
        "grading_method": pl.String,
        "commissioned_ms": pl.Int64,
        "intake_soh": pl.Float64,
        "soh": pl.Float64,
        "soh_std": pl.Float64,
        "soh_bms": pl.Float64,
        "soh_change_since_intake": pl.Float64,
        "rul_days_p5": pl.Float64,
        "rul_days_p50": pl.Float64,
        "rul_days_p95": pl.Float64,
        "rul_efc_p50": pl.Float64,
        "eol_soh": pl.Float64,
        "resistance_ohm_25c": pl.Float64,
        "resistance_growth": pl.Float64,
        "knee": pl.Boolean,
        "knee_onset_ms": pl.Int64,
        "aging_model": pl.String,
        "aging_model_provenance": pl.String,
        "aging_validity": pl.String,
        "ecm_validity": pl.String,
        "validity_share": pl.Float64,
    }
)

#: The passport's columns that come from the twin's estimates (typed as in the schema).
_ESTIMATE_COLUMNS: Final = {
    name: PASSPORT_SCHEMA[name]
    for name in (
        "soh",
        "soh_std",
        "soh_bms",
        "rul_days_p5",
        "rul_days_p50",
        "rul_days_p95",
        "rul_efc_p50",
        "eol_soh",
        "resistance_ohm_25c",
        "resistance_growth",
        "knee",
        "knee_onset_ms",
        "validity_share",
    )
}


def _model_columns() -> pl.DataFrame:
    """Per chemistry: its aging law, the law's provenance and tested range, and the ECM's validity range."""
    rows = []
    for name in CHEMISTRY_NAMES:
        chem = get_chemistry(name)
        law = get_aging_law(chem.aging_model)
        v = law.validity
        ecm = chem.validity
        rows.append(
            {
                "chemistry": name,
                "aging_model": law.name,
                "aging_model_provenance": law.provenance,
                "aging_validity": (
                    f"cycling {v.cycling_temp_c[0]:g}-{v.cycling_temp_c[1]:g} °C, calendar "
                    f"{v.calendar_temp_c[0]:g}-{v.calendar_temp_c[1]:g} °C, DoD {v.dod[0]:g}-{v.dod[1]:g}, "
                    f"charge <= {v.max_c_rate_charge:g}C, discharge <= {v.max_c_rate_discharge:g}C"
                ),
                "ecm_validity": (
                    f"{ecm.temp_c[0]:g}-{ecm.temp_c[1]:g} °C, |C| <= {ecm.c_rate_max:g}, "
                    f"SoC {ecm.soc[0]:g}-{ecm.soc[1]:g}"
                ),
            }
        )
    return pl.DataFrame(rows)


def passport(meta: pl.DataFrame, estimates: pl.DataFrame) -> pl.DataFrame:
    """Return the passport of every second-life pack: first life, intake, now, RUL, model and validity.

    Args:
        meta: pack_meta rows (``pack``, ``chemistry``, ``life``; optionally ``oem``,
            ``rated_capacity_ah``, ``intake_soh``, ``commissioned_ms`` and the ``first_life``
            struct with ``vehicle``, ``years_in_service``, ``efc``, ``retirement_soh``,
            ``grading_method``). The last row of a pack wins.
        estimates: one row per pack with ``pack`` and any of ``soh``, ``soh_std``,
            ``soh_bms``, ``rul_days_p5``, ``rul_days_p50``, ``rul_days_p95``,
            ``rul_efc_p50``, ``eol_soh``, ``resistance_ohm_25c``, ``resistance_growth``,
            ``knee``, ``knee_onset_ms``, ``validity_share`` (for instance
            :meth:`twin.estimators.health.HealthEstimate.to_frame` joined with the resistance
            and the latest ``soh_bms``). Missing columns and packs, and NaN estimates (a RUL
            before any duty is known), give nulls.

    Returns:
        One row per second-life pack in the meta's order, columns :data:`PASSPORT_SCHEMA`.

    Raises:
        ValueError: the meta lacks ``pack``, ``chemistry`` or ``life``, or the estimates lack ``pack``.

    Examples:
        >>> meta = pl.DataFrame({"pack": ["a", "b"], "chemistry": ["lmo", "nmc811"], "life": ["second_life", "new"],
        ...     "intake_soh": [0.64, None], "first_life": [{"vehicle": "Leaf", "years_in_service": 9.5, "efc": 800.0,
        ...     "retirement_soh": 0.64, "grading_method": "full capacity test"}, None]})
        >>> p = passport(meta, pl.DataFrame({"pack": ["a"], "soh": [0.62], "rul_days_p50": [400.0]}))
        >>> p.select("pack", "vehicle", "intake_soh", "soh", "rul_days_p50", "aging_model").row(0)
        ('a', 'Leaf', 0.64, 0.62, 400.0, 'lmo_gr_nissanleaf66ah_2ndlife')
    """
    for column in ("pack", "chemistry", "life"):
        if column not in meta.columns:
            msg = f"passport: the meta lacks the column {column!r}"
            raise ValueError(msg)
    if "pack" not in estimates.columns:
        msg = "passport: the estimates lack the column 'pack'"
        raise ValueError(msg)
    second = meta.unique(subset="pack", keep="last", maintain_order=True).filter(pl.col("life") == "second_life")
    first_fields = {
        "vehicle": ("vehicle", pl.String),
        "years_in_service": ("years_in_service", pl.Float64),
        "first_life_efc": ("efc", pl.Float64),
        "retirement_soh": ("retirement_soh", pl.Float64),
        "grading_method": ("grading_method", pl.String),
    }
    dtype_first = second.schema.get("first_life")
    present = {f.name for f in dtype_first.fields} if isinstance(dtype_first, pl.Struct) else set()
    first_cols = [
        (pl.col("first_life").struct.field(src).cast(dtype) if src in present else pl.lit(None, dtype)).alias(name)
        for name, (src, dtype) in first_fields.items()
    ]

    def meta_col(name: str, dtype: pl.DataType | type[pl.DataType]) -> pl.Expr:
        return pl.col(name).cast(dtype) if name in second.columns else pl.lit(None, dtype).alias(name)

    base = second.select(
        pl.col("pack").cast(pl.String),
        pl.col("chemistry").cast(pl.String),
        meta_col("oem", pl.String),
        meta_col("rated_capacity_ah", pl.Float64),
        *first_cols,
        meta_col("commissioned_ms", pl.Int64),
        meta_col("intake_soh", pl.Float64),
    )
    est = estimates.unique(subset="pack", keep="last").select(
        pl.col("pack").cast(pl.String),
        *[
            (pl.col(c).cast(t) if c in estimates.columns else pl.lit(None, t)).alias(c)
            if t != pl.Float64
            else (pl.col(c).cast(t).fill_nan(None) if c in estimates.columns else pl.lit(None, t)).alias(c)
            for c, t in _ESTIMATE_COLUMNS.items()
        ],
    )
    out = (
        base.join(est, on="pack", how="left", maintain_order="left")
        .join(_model_columns(), on="chemistry", how="left", maintain_order="left")
        .with_columns((pl.col("soh") - pl.col("intake_soh")).alias("soh_change_since_intake"))
    )
    return out.select([pl.col(c).cast(t) for c, t in PASSPORT_SCHEMA.items()])
