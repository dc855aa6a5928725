"""The faults an emulation injected, as the truth the twin's alerts are scored against (``faults.parquet``).

One row per faulted pack and fault: the pack, the fault's kind, the event-time window it was
active in (``start_ms`` inclusive, ``end_ms`` exclusive, cut at the end of the emulation; a
fault scheduled after the end is left out, it was never injected), the cell it names (a
weak cell, a self-heating cell) and the signal a sensor fault acts on. The windows are those the emulator resolved
(``Emulation._faults``: packs drawn with the scenario's seed, times on its step grid), so
they are exactly what the physics and the sensors saw.

Write it beside the other truth tables of a run folder, after the run (a weak cell drawn at
random is only known once it has been applied)::

    emulation.run(sink)
    sink.close(run_info(emulation))
    write_faults(emulation, out)

The twin never reads this file; :func:`twin.evaluate.alert_scores` does, afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import numpy as np
import polars as pl

from emulators.run import Emulation
from emulators.scenario import SensorOffset, SensorStuck, ThermalRunawayPrecursor, WeakCell

__all__ = ["FAULTS_FILE", "FAULTS_SCHEMA", "fault_windows", "write_faults"]

FAULTS_FILE: Final = "faults.parquet"
FAULTS_SCHEMA: Final = pl.Schema(
    {
        "pack": pl.String(),
        "kind": pl.String(),
        "start_ms": pl.Int64(),
        "end_ms": pl.Int64(),
        "cell": pl.Int64(),
        "signal": pl.String(),
        "fault": pl.Int64(),
    }
)


def _cell(emulation: Emulation, spec: object, pack: int, start_step: int) -> int | None:
    """The series cell a fault names, when the emulation knows it."""
    if isinstance(spec, ThermalRunawayPrecursor):
        return spec.cell_index
    if not isinstance(spec, WeakCell):
        return None
    if spec.cell_index is not None:
        return spec.cell_index
    if not emulation.options.cell_level:
        # Two groups per string: the weak group stands at the pack's drawn series position.
        return int(emulation.fleet.cell_position[pack, 0])
    if emulation.steps_done > start_step:
        # Drawn at random when applied: the cell that lost the capacity is the weakest now.
        series = int(emulation.fleet.params.series[pack])
        return int(np.argmin(emulation.bank.capacity_ah[pack, :series]))
    return None


def fault_windows(emulation: Emulation) -> pl.DataFrame:
    """Return one row per (fault, pack) the emulation injects, with its event-time window.

    Args:
        emulation: the emulation (run, or at least built: windows and packs are resolved at
            construction; a weak cell drawn at random is known only after its start).

    Returns:
        A frame with :data:`FAULTS_SCHEMA`, ordered by start time, fault and pack.
    """
    dt_ms = emulation.options.dt_s * 1000.0
    t0 = int(emulation.trace.times_ms[0])
    total = round(emulation.options.duration_s / emulation.options.dt_s)
    rows: list[tuple[str, str, int, int, int | None, str | None, int]] = []
    for number, window in enumerate(emulation._faults):  # the emulator's resolved windows; a handful
        if window.start >= total:
            continue  # scheduled after the end of this run: never injected
        spec = window.spec
        signal = spec.signal if isinstance(spec, SensorOffset | SensorStuck) else None
        start_ms = t0 + round(window.start * dt_ms)
        end_ms = t0 + round(min(window.end, total) * dt_ms)
        for p in window.packs.tolist():
            cell = _cell(emulation, spec, int(p), window.start)
            rows.append((emulation.fleet.pack_ids[p], window.kind, start_ms, end_ms, cell, signal, number))
    frame = pl.DataFrame(rows, schema=FAULTS_SCHEMA, orient="row")
    return frame.sort("start_ms", "fault", "pack")


def write_faults(emulation: Emulation, out: Path) -> Path:
    """Write :func:`fault_windows` to ``out / faults.parquet``; return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / FAULTS_FILE
    fault_windows(emulation).write_parquet(path, statistics=True)
    return path
