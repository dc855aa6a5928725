"""Offline replay of the nevada site through the twin: pack-samples per second on one core, and peak memory.

A nevada run (805 packs, 1 s telemetry) is emulated first in a child process (not timed);
then, in this process pinned to one core:

* **read ceiling**: reading the telemetry in record batches and cutting it into the
  replay's 60 s windows, with nothing else (the baseline, measured in the same run);
* **SoC filter alone**: :meth:`SocEstimator.update` per window on the same rows;
* **replay**: :func:`twin.replay.replay_run`, the whole core (mirror, data-quality rules,
  SoC filter, energy, runtime and ride-through by forward simulation every window).

Goal (issue 5): replay at >= 1,000,000 pack-samples/s, a day of the site in about a minute.
Peak memory is the process's maximum resident set after the replay (the emulation ran
elsewhere).

Usage: ``python benchmarks/replay_speed.py [--hours 2]``.
"""

from __future__ import annotations

import os

for _var in ("POLARS_MAX_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402

from twin.estimators.soc import SocEstimator  # noqa: E402
from twin.replay import ReplayOptions, RunFolder, replay_run  # noqa: E402

EVERY_S = 60.0


def _emulate(out: Path, hours: float) -> None:
    cmd = [sys.executable, "-m", "twin.cli", "emulate", "--scenario", "nevada", "--duration", f"{hours:g}h"]
    cmd += ["--pack-level", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)


def _windows(run: RunFolder) -> list[pl.DataFrame]:
    every_ms = round(EVERY_S * 1000)
    parts: list[pl.DataFrame] = []
    start: int | None = None
    for batch in run.telemetry_batches(ReplayOptions().batch_rows):
        start = int(batch["ts_ms"].min()) if start is None else start  # type: ignore[arg-type]
        w = (pl.col("ts_ms") - start + every_ms - 1) // every_ms
        parts.extend(batch.with_columns(w.alias("_w")).partition_by("_w", maintain_order=True))
    return parts


def main(hours: float = 2.0) -> dict[str, float]:
    """Run the benchmark and print its table; return the figures."""
    with tempfile.TemporaryDirectory(prefix="mgtwin-replay-bench-") as tmp:
        run_dir = Path(tmp) / "nevada"
        _emulate(run_dir, hours)
        run = RunFolder.open(run_dir)
        rows = run.telemetry_rows

        t = time.perf_counter()
        windows = _windows(run)
        read_s = time.perf_counter() - t

        soc = SocEstimator.from_meta(run.meta)
        t = time.perf_counter()
        for part in windows:
            soc.update(part)
            soc.estimate()
        soc_s = time.perf_counter() - t
        del windows

        t = time.perf_counter()
        result = replay_run(run, options=ReplayOptions(every_s=EVERY_S))
        replay_s = time.perf_counter() - t
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    figures = {
        "packs": float(run.meta.height),
        "telemetry_rows": float(rows),
        "windows": float(result.site_estimates.height),
        "read_ceiling_samples_per_s": rows / read_s,
        "soc_filter_samples_per_s": rows / soc_s,
        "replay_samples_per_s": rows / replay_s,
        "replay_vs_read_ceiling": (rows / replay_s) / (rows / read_s),
        "replay_day_of_site_s": replay_s * 24.0 / hours,
        "peak_rss_mib": peak_mib,
        "goal_samples_per_s": 1_000_000.0,
    }
    print(f"offline replay of nevada ({int(figures['packs'])} packs, {hours:g} h, {rows:,} pack-samples), one core")
    print(f"  read + window ceiling : {figures['read_ceiling_samples_per_s']:>12,.0f} pack-samples/s")
    print(f"  SoC filter alone      : {figures['soc_filter_samples_per_s']:>12,.0f} pack-samples/s")
    print(
        f"  replay (whole twin)   : {figures['replay_samples_per_s']:>12,.0f} pack-samples/s "
        f"({figures['replay_vs_read_ceiling']:.2f} x the read ceiling; a day of the site in "
        f"{figures['replay_day_of_site_s']:.0f} s; goal 1,000,000/s)"
    )
    print(f"  peak memory           : {peak_mib:,.0f} MiB")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=2.0, help="simulated hours of the nevada run (default 2)")
    main(parser.parse_args().hours)
