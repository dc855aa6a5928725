"""Time of one site outlook (energy, runtime and ride-through with P5/P50/P95) for a nevada-sized site.

805 packs with nevada.toml's mix (270 nmc811, 300 nmc532, 100 lmo and 135 lfp), SoC drawn
in [0.5, 0.9], at a discharge power that takes about 10 h to the reserve floor. Figures are
milliseconds per call (best of a few repeats) of:

* :func:`site_outlook` with the ride-through at 1.2 x the battery power (two forward
  simulations of three scenarios each), and with the load equal to the battery power (an
  outage: the one simulation serves both);
* :func:`time_to_floor_s` alone (three scenarios side by side);
* :func:`energy_to_floor_wh` for every pack.

Goal (issue): ``site_outlook`` under 30 ms on one core.

Usage: ``python benchmarks/outlook_speed.py`` (prints a table; ``main()`` returns the figures).
"""

from __future__ import annotations

import os

# One core, as the goal says (set before numpy is imported).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from twin.estimators.energy import EnergyPacks, energy_to_floor_wh, site_outlook, time_to_floor_s  # noqa: E402

MIX = (("nmc811", 270, 300.0, 96), ("nmc532", 300, 171.0, 96), ("lmo", 100, 66.2, 96), ("lfp", 135, 404.0, 120))
HOURS_TO_FLOOR = 10.0
REPEATS = 20
FLOOR = 0.10


def fleet() -> EnergyPacks:
    """The 805 packs with nevada's chemistry mix, limited to 0.18 C as the site's packs are."""
    chem = [c for c, n, _, _ in MIX for _ in range(n)]
    rated = np.concatenate([np.full(n, ah) for _, n, ah, _ in MIX])
    series = np.concatenate([np.full(n, s) for _, n, _, s in MIX])
    meta = pl.DataFrame(
        {
            "pack": [f"pack-{k:04d}" for k in range(len(chem))],
            "chemistry": chem,
            "rated_capacity_ah": rated,
            "series_cells": series,
            "intake_soh": np.full(len(chem), 0.9),
            "current_max_discharge_a": 0.18 * rated,
        }
    )
    return EnergyPacks.from_meta(meta)


def best_ms(call: Callable[[], object]) -> float:
    """Best wall time of ``REPEATS`` calls, ms (after one warm-up call)."""
    call()
    best = np.inf
    for _ in range(REPEATS):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return float(best * 1e3)


def main() -> dict[str, float]:
    """Time the calls, print a table and return the figures (ms per call)."""
    packs = fleet()
    n = packs.n_packs
    rng = np.random.default_rng(7)
    soc = rng.uniform(0.5, 0.9, n)
    soc_std = rng.uniform(0.01, 0.04, n)
    temp = rng.uniform(15.0, 35.0, n)
    current = np.zeros(n)
    available = np.ones(n, dtype=bool)
    energy_wh = float(energy_to_floor_wh(packs, soc, floor_soc=FLOOR, temp_c=temp, current_a=current).sum())
    power = energy_wh / HOURS_TO_FLOOR

    def outlook(load_w: float) -> Callable[[], object]:
        return lambda: site_outlook(
            packs,
            soc=soc,
            soc_std=soc_std,
            temp_c=temp,
            current_a=current,
            available=available,
            battery_w=power,
            load_w=load_w,
        )

    scenarios = np.stack([soc - 0.02, soc, soc + 0.02])
    out = site_outlook(
        packs,
        soc=soc,
        soc_std=soc_std,
        temp_c=temp,
        current_a=current,
        available=available,
        battery_w=power,
        load_w=None,
    )
    figures = {
        "packs": float(n),
        "runtime P50 h": float(out.runtime_s_p50 or np.nan) / 3600.0,
        "site_outlook ms (load 1.2 x battery)": best_ms(outlook(1.2 * power)),
        "site_outlook ms (load = battery)": best_ms(outlook(power)),
        "time_to_floor_s ms (3 scenarios)": best_ms(
            lambda: time_to_floor_s(packs, power, scenarios, temp_c=temp, available=available, floor_soc=FLOOR)
        ),
        "energy_to_floor_wh ms": best_ms(
            lambda: energy_to_floor_wh(packs, soc, floor_soc=FLOOR, temp_c=temp, current_a=current)
        ),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:>10.3f}")
    return figures


if __name__ == "__main__":
    main()
