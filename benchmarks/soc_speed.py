"""Throughput of the vectorised SoC filter against a per-pack Python-loop EKF, in the same run.

A nevada-sized batch: 805 packs (nevada.toml's mix: 270 nmc811, 300 nmc532, 100 lmo and 135
lfp) x 600 s of 1 s telemetry = 483,000 rows, synthetic (each pack's voltage follows its
chemistry's OCV at a drifting SoC, with noise, under a random current). The figure is
pack-samples per second of :meth:`SocEstimator.update` on that frame, from a fresh
estimator (best of a few repeats; the polars-to-numpy reshaping is included). The baseline is
the same filter written the textbook way, one pack and one sample at a time with 5 x 5 numpy
matrices (both RC pairs, the chemistry's own resistance methods), timed on a subset of the
packs. Goal (issue): >= 1,000,000 pack-samples/s on one core.

Usage: ``python benchmarks/soc_speed.py`` (prints a table; ``main()`` returns the figures).
"""

from __future__ import annotations

import os

# One core, as the goal says: pin the process and keep polars and any BLAS to one thread
# (set before polars and numpy are imported).
for _var in ("POLARS_MAX_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from twin.chemistry import get_chemistry  # noqa: E402
from twin.estimators.soc import PackInfo, SocEstimator, SocOptions  # noqa: E402

N_SECONDS = 600
MIX = (("nmc811", 270, 300.0, 96), ("nmc532", 300, 171.0, 96), ("lmo", 100, 66.2, 96), ("lfp", 135, 404.0, 120))
BASELINE_PACKS = 8
REPEATS = 3
T0_MS = 1_767_225_600_000


def fleet() -> PackInfo:
    """The 805 packs with nevada's chemistry mix."""
    chem = [c for c, n, _, _ in MIX for _ in range(n)]
    rated = np.concatenate([np.full(n, ah) for _, n, ah, _ in MIX])
    series = np.concatenate([np.full(n, s) for _, n, _, s in MIX])
    n = len(chem)
    return PackInfo(
        pack_ids=tuple(f"pack-{k:04d}" for k in range(n)),
        chemistry=tuple(chem),
        rated_group_ah=rated,
        series=series,
        capacity_ah=rated * 0.9,
        soc0=np.full(n, 0.5),
        soc0_std=np.full(n, 0.3),
        series_r_ohm=np.zeros(n),
    )


def telemetry(packs: PackInfo, seconds: int, rng: np.random.Generator) -> pl.DataFrame:
    """Synthetic telemetry, one row per pack and second, in (ts, pack) order as the emulator writes it."""
    n = packs.n_packs
    current = rng.uniform(-0.2, 0.3, n)[None, :] * packs.rated_group_ah + rng.normal(0.0, 1.0, (seconds, n))
    soc = rng.uniform(0.3, 0.8, n)[None, :] - np.cumsum(current, axis=0) / 3600.0 / packs.capacity_ah
    ocv = np.empty_like(soc)
    for name in set(packs.chemistry):
        cols = np.array([c == name for c in packs.chemistry])
        ocv[:, cols] = get_chemistry(name).ocv(soc[:, cols])
    r0 = 0.08 / packs.rated_group_ah
    cell_v = ocv - r0 * current
    volts = cell_v * packs.series + rng.normal(0.0, 0.1, cell_v.shape)
    return pl.DataFrame(
        {
            "pack": np.tile(np.array(packs.pack_ids), seconds),
            "ts_ms": np.repeat(T0_MS + 1000 * np.arange(seconds, dtype=np.int64), n),
            "voltage_v": np.round(volts, 1).reshape(-1),
            "current_a": np.round(current, 1).reshape(-1),
            "temp_avg_c": np.full(seconds * n, 25.0),
            "cell_v_min_v": np.round(cell_v - 0.01, 3).reshape(-1),
            "cell_v_max_v": np.round(cell_v + 0.01, 3).reshape(-1),
        }
    )


def loop_ekf(packs: PackInfo, frame: pl.DataFrame, indices: list[int], options: SocOptions) -> None:
    """The baseline: the same predict/correct, one pack and one sample at a time (no cell offsets)."""
    o = options
    for p in indices:
        chem = get_chemistry(packs.chemistry[p])
        rows = frame.filter(pl.col("pack") == packs.pack_ids[p]).sort("ts_ms")
        ts, v, cur, temp = (rows.get_column(c).to_numpy() for c in ("ts_ms", "voltage_v", "current_a", "temp_avg_c"))
        q_as = packs.capacity_ah[p] * 3600.0
        rated, series = packs.rated_group_ah[p], packs.series[p]
        x = np.array([packs.soc0[p], 0.0, 0.0, 0.0, 0.0])  # soc, v_rc1, v_rc2, hyst, offset
        v2_var = o.v_rc0_std_v**2 if chem.r2_ohm_ah > 0.0 else 0.0
        cov = np.diag([packs.soc0_std[p] ** 2, o.v_rc0_std_v**2, v2_var, o.hyst0_std**2, o.current_offset_sd_a**2])
        r_white = (o.voltage_noise_v**2 + o.voltage_quantum_v**2 / 12.0) / series**2
        for k in range(ts.size):
            if k:
                dt = (ts[k] - ts[k - 1]) * 1e-3
                i = cur[k - 1] - x[4]
                eff = chem.coulombic_efficiency if i < 0 else 1.0
                a1 = np.exp(-dt / chem.tau1_s)
                a2 = np.exp(-dt / chem.tau2_s)
                r1 = float(chem.r1_ohm(rated, x[0], temp[k - 1]))
                r2 = float(chem.r2_ohm(rated, x[0], temp[k - 1]))
                f = np.exp(-chem.hyst_rate_per_as * abs(i) * dt / q_as)
                s = np.sign(i)
                jac = np.diag([1.0, a1, a2, f, 1.0])
                jac[0, 4] = eff * dt / q_as
                jac[1, 4] = -(1 - a1) * r1
                jac[2, 4] = -(1 - a2) * r2
                jac[3, 4] = f * chem.hyst_rate_per_as * dt / q_as * s * (x[3] + s)
                x = np.array(
                    [
                        x[0] - eff * i * dt / q_as,
                        a1 * x[1] + (1 - a1) * r1 * i,
                        a2 * x[2] + (1 - a2) * r2 * i,
                        f * x[3] - (1 - f) * s,
                        x[4],
                    ]
                )
                q_soc = o.current_noise_a**2 * (dt / q_as) ** 2
                q_rc = np.array([(1 - a1) * r1, (1 - a2) * r2]) ** 2 * o.current_noise_a**2
                q = np.diag([q_soc, *q_rc, 0.0, 0.0])
                cov = jac @ cov @ jac.T + q
            r0 = float(chem.r0_ohm(rated, x[0], temp[k]))
            h_amp = float(chem.hysteresis_v(x[0]))
            pred = float(chem.ocv(x[0])) + h_amp * x[3] - r0 * (cur[k] - x[4]) - x[1] - x[2]
            hrow = np.array([float(chem.docv_dsoc(x[0])), -1.0, -1.0, h_amp, r0])
            s_var = hrow @ cov @ hrow + r_white + o.ocv_error_v**2
            gain = cov @ hrow / s_var
            x = x + gain * (v[k] / series - pred)
            cov = cov - np.outer(gain, hrow @ cov)


def main() -> dict[str, Any]:
    """Time both and return the figures."""
    rng = np.random.default_rng(7)
    packs = fleet()
    frame = telemetry(packs, N_SECONDS, rng)
    samples = frame.height
    best = np.inf
    for _ in range(REPEATS):
        est = SocEstimator(packs)
        started = time.perf_counter()
        est.update(frame)
        best = min(best, time.perf_counter() - started)
    assert est.counters()["samples"] == samples
    vectorised = samples / best

    subset = list(np.linspace(0, packs.n_packs - 1, BASELINE_PACKS).astype(int))
    started = time.perf_counter()
    loop_ekf(packs, frame, subset, SocOptions())
    loop_s = time.perf_counter() - started
    baseline = BASELINE_PACKS * N_SECONDS / loop_s

    figures: dict[str, Any] = {
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?",
        "polars threads": pl.thread_pool_size(),
        "packs": packs.n_packs,
        "pack-samples per batch": samples,
        "vectorised update s": best,
        "vectorised pack-samples/s": vectorised,
        "loop EKF pack-samples/s": baseline,
        "speed-up": vectorised / baseline,
        "goal 1e6/s met": bool(vectorised >= 1e6),
    }
    return figures


if __name__ == "__main__":
    result = main()
    width = max(len(k) for k in result)
    for key, value in result.items():
        text = f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text:>14}")
