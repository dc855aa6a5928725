"""How fast the emulator runs the ``nevada`` site (805 packs, cell-level state), one core.

Goal: 24 h of simulated time at 1 s steps in at most 120 s of wall time (> 720x real time).

Each configuration runs in its own interpreter (``--worker``), pinned to one CPU where the
OS allows it, so that its peak RSS is its own and polars cannot spread over other cores:

* ``cell-level``: the scenario as the demo runs it (every cell group, truth tables on),
  output discarded;
* ``cell-level + parquet``: the same, written to a temporary run folder (:class:`FolderSink`);
* ``pack-level`` (baseline): the same run with ``cell_level=False`` (two groups per string);
* ``bank step, naive loop`` (baseline): one step of the pack physics written as a plain
  Python loop over packs and cells, timed on 20 packs and scaled to the fleet, against the
  vectorised :meth:`PackBank.step` on the whole fleet.

The emulator rows run ``--duration`` of simulated time (default 1 h; ``--duration 24h`` for
the goal itself) and are extrapolated to 24 h; the baselines run at most 1 h. Ratios are
against the baselines measured in the same run.

Usage: ``python benchmarks/emulator_speed.py [--duration 1h|24h|3600]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DAY_S = 86_400.0
GOAL_WALL_S = 120.0
NAIVE_PACKS = 20


def _parse_duration(text: str) -> float:
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
    if text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def _pin_one_cpu() -> None:
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Discard:
    def meta(self, packs: object, status: object) -> None:
        pass

    def chunk(self, chunk: object) -> None:
        pass


def _run_emulation(duration_s: float, *, cell_level: bool, parquet: bool) -> dict[str, float]:
    from emulators.live import FolderSink, run_info
    from emulators.run import Emulation, EmulationOptions
    from emulators.scenario import load_scenario

    started = time.perf_counter()
    emulation = Emulation(load_scenario("nevada"), EmulationOptions(duration_s=duration_s, cell_level=cell_level))
    setup_s = time.perf_counter() - started
    cpu_started = time.process_time()
    with tempfile.TemporaryDirectory(prefix="emulator_speed_") as tmp:
        if parquet:
            sink = FolderSink(Path(tmp) / "run")
            figures = emulation.run(sink)
            sink.close(run_info(emulation, figures))
        else:
            figures = emulation.run(_Discard())
    return {
        "packs": float(emulation.fleet.n_packs),
        "simulated_s": emulation.steps_done * emulation.options.dt_s,
        "wall_s": figures["wall_s"],
        "cpu_s": time.process_time() - cpu_started,
        "setup_s": setup_s,
        "peak_rss_mb": _peak_rss_mb(),
    }


class _NaiveBank:
    """The pack physics of :class:`PackBank`, one pack and one cell at a time on Python floats."""

    def __init__(self, params: Any, packs: int) -> None:
        from emulators.pack import GRID_POINTS

        t = params.tables
        self.grid = GRID_POINTS
        self.ocv, self.slope = t.ocv_v.tolist(), t.ocv_slope.tolist()
        self.rsoc, self.rsoc_slope = t.rsoc.tolist(), t.rsoc_slope.tolist()
        self.hyst, self.hyst_slope, self.entropic = (
            t.hyst_v.tolist(),
            t.hyst_slope.tolist(),
            t.entropic_v_per_k.tolist(),
        )
        names = ("r0_ref", "r1_ref", "tau_s", "ea", "eta", "v_min", "v_max", "gamma")
        names += ("i_dis_max", "i_chg_max", "heat_cap_j_per_k", "ua_w_per_k")
        self.d = {k: params.derived(k).tolist() for k in names}
        self.packs = []
        for i in range(packs):
            cells = int(params.series[i])
            self.packs.append(
                {
                    "row": int(params.chem_index[i]) * GRID_POINTS,
                    "soc": params.soc0[i, :cells].tolist(),
                    "cap": params.capacity_ah[i, :cells].tolist(),
                    "r": params.r_cell[i, :cells].tolist(),
                    "i_f": 0.0,
                    "h": 0.0,
                    "temp": 25.0,
                }
            )

    def lookup(self, table: list[float], slopes: list[float], row: int, soc: float) -> float:
        x = min(max(soc, 0.0), 1.0) * (self.grid - 1)
        k = min(int(x), self.grid - 2)
        return table[row + k] + slopes[row + k] * (x - k) / (self.grid - 1)

    def step(self, power: list[float]) -> list[float]:
        """One 1-s step of every pack at ``power`` (W); return the pack voltages."""
        d, volts = self.d, []
        for i, pk in enumerate(self.packs):
            row, socs, caps, rs = pk["row"], pk["soc"], pk["cap"], pk["r"]
            mean = sum(socs) / len(socs)
            arr = math.exp(d["ea"][i] / 8.314462618 * (1.0 / (pk["temp"] + 273.15) - 1.0 / 298.15))
            scale = self.lookup(self.rsoc, self.rsoc_slope, row, mean) * arr
            k0, k1 = d["r0_ref"][i] * scale, d["r1_ref"][i] * scale
            hv = self.lookup(self.hyst, self.hyst_slope, row, mean) * pk["h"]
            voc = [
                self.lookup(self.ocv, self.slope, row, s) - k1 * pk["i_f"] * r + hv
                for s, r in zip(socs, rs, strict=True)
            ]
            r_sum = sum(rs)
            v_pack, r_pack = sum(voc), k0 * r_sum * 1.035
            head_dis = min((v - d["v_min"][i]) / r for v, r in zip(voc, rs, strict=True)) / (k0 * 1.035)
            head_chg = min((d["v_max"][i] - v) / r for v, r in zip(voc, rs, strict=True)) / (k0 * 1.035)
            current = (v_pack - math.sqrt(max(v_pack * v_pack - 4.0 * r_pack * power[i], 0.0))) / (2.0 * r_pack)
            current = min(max(current, -min(head_chg, d["i_chg_max"][i])), head_dis, d["i_dis_max"][i])
            cells_v = [v - k0 * current * r for v, r in zip(voc, rs, strict=True)]
            volts.append(v_pack - current * r_pack)
            _ = min(cells_v), max(cells_v)
            eff = d["eta"][i] * current if current < 0 else current
            pk["soc"] = [s - eff / 3600.0 / c for s, c in zip(socs, caps, strict=True)]
            pk["i_f"] += (current - pk["i_f"]) * (1.0 - math.exp(-1.0 / d["tau_s"][i]))
            decay = 1.0 - math.exp(-d["gamma"][i] * abs(current) / (sum(caps) / len(caps)))
            pk["h"] -= decay * (pk["h"] + math.copysign(1.0, current) * (current != 0))
            heat = current * current * r_pack + pk["i_f"] ** 2 * k1 * r_sum
            heat -= current * (pk["temp"] + 273.15) * self.entropic[row + int(mean * (self.grid - 1))] * len(socs)
            pk["temp"] += (heat - d["ua_w_per_k"][i] * (pk["temp"] - 25.0)) / d["heat_cap_j_per_k"][i]
        return volts


def _naive_bank_step(duration_s: float) -> dict[str, float]:
    """Time one step of the vectorised bank on the fleet, and of the naive loop on a few packs."""
    import numpy as np

    from emulators.fleet import build_fleet
    from emulators.pack import PackBank
    from emulators.scenario import load_scenario

    scenario = load_scenario("nevada")
    params = build_fleet(scenario, np.random.default_rng(scenario.seed)).params
    n = params.n_packs
    steps = max(10, min(int(duration_s), 200))
    powers = np.random.default_rng(0).normal(3000.0, 3000.0, (steps, n))
    env = np.full(n, 25.0)
    bank = PackBank(params, temp_c=env.copy())
    started = time.perf_counter()
    for k in range(steps):
        bank.step(powers[k], env, dt_s=1.0)
    bank_step_s = (time.perf_counter() - started) / steps

    naive = _NaiveBank(params, NAIVE_PACKS)
    first = naive.step(powers[0, :NAIVE_PACKS].tolist())
    reference = PackBank(params, temp_c=env.copy()).step(powers[0], env, dt_s=1.0).voltage_v[:NAIVE_PACKS]
    agree_v = max(abs(a - b) for a, b in zip(first, reference.tolist(), strict=True))
    naive_steps = max(5, steps // 10)
    started = time.perf_counter()
    for k in range(naive_steps):
        naive.step(powers[k, :NAIVE_PACKS].tolist())
    naive_step_s = (time.perf_counter() - started) / naive_steps * n / NAIVE_PACKS
    return {
        "packs": float(n),
        "bank_step_s": bank_step_s,
        "naive_step_s": naive_step_s,
        "naive_vs_bank_max_dv": agree_v,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _worker(kind: str, duration_s: float) -> dict[str, float]:
    _pin_one_cpu()
    if kind == "naive":
        return _naive_bank_step(duration_s)
    return _run_emulation(duration_s, cell_level=kind != "pack", parquet=kind == "parquet")


def _spawn(kind: str, duration_s: float) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--duration", str(duration_s)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "POLARS_MAX_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        msg = f"worker {kind} failed:\n{proc.stderr}"
        raise RuntimeError(msg)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(duration_s: float = 3600.0) -> dict[str, Any]:
    """Measure every configuration, print the table, and return the figures."""
    baseline_s = min(duration_s, 3600.0)
    cell = _spawn("cell", duration_s)
    parquet = _spawn("parquet", duration_s)
    pack = _spawn("pack", baseline_s)
    naive = _spawn("naive", baseline_s)

    def day_wall(r: dict[str, float]) -> float:
        return r["wall_s"] * DAY_S / r["simulated_s"]

    def day_cpu(r: dict[str, float]) -> float:
        return r["cpu_s"] * DAY_S / r["simulated_s"]

    rows = []
    for name, r in (("cell-level", cell), ("cell-level + parquet", parquet), ("pack-level (baseline)", pack)):
        rows.append(
            (
                name,
                r["simulated_s"],
                r["wall_s"],
                r["packs"] * r["simulated_s"] / r["wall_s"],
                r["simulated_s"] / r["wall_s"],
                day_wall(r),
                day_cpu(r),
                r["peak_rss_mb"],
                day_wall(r) / day_wall(pack),
            )
        )
    header = (
        "configuration",
        "simulated s",
        "wall s",
        "pack-steps/s",
        "realtime x",
        "24 h wall s",
        "24 h CPU s",
        "peak RSS MB",
        "vs pack",
    )
    print(f"{header[0]:<24}" + "".join(f"{h:>14}" for h in header[1:]))
    for row in rows:
        print(f"{row[0]:<24}" + "".join(f"{v:>14,.1f}" if i != 8 else f"{v:>14.2f}" for i, v in enumerate(row[1:], 1)))
    packs = naive["packs"]
    print()
    print(f"{'one bank step (805 packs)':<30}{'wall ms':>10}{'pack-steps/s':>16}{'vs naive':>10}")
    for name, step_s in (
        ("PackBank.step", naive["bank_step_s"]),
        (f"naive loop ({NAIVE_PACKS} packs, scaled)", naive["naive_step_s"]),
    ):
        print(f"{name:<30}{step_s * 1e3:>10.3f}{packs / step_s:>16,.0f}{naive['naive_step_s'] / step_s:>10.1f}")
    print(f"(naive loop vs PackBank, first step: max |dV| {naive['naive_vs_bank_max_dv']:.2g} V)")
    goal = "met" if day_wall(cell) <= GOAL_WALL_S else "NOT met"
    print(f"\n24 h of nevada, cell-level: {day_wall(cell):.1f} s wall, {day_cpu(cell):.1f} s CPU", end=" ")
    print(f"(goal {GOAL_WALL_S:.0f} s wall: {goal});")
    print(f"measured over {cell['simulated_s']:.0f} s simulated, setup {cell['setup_s']:.1f} s not included.")
    return {
        "simulated_s": cell["simulated_s"],
        "cell_wall_s": cell["wall_s"],
        "cell_realtime_x": cell["simulated_s"] / cell["wall_s"],
        "cell_24h_wall_s": day_wall(cell),
        "cell_24h_cpu_s": day_cpu(cell),
        "cell_parquet_24h_wall_s": day_wall(parquet),
        "pack_level_24h_wall_s": day_wall(pack),
        "cell_vs_pack_level": day_wall(cell) / day_wall(pack),
        "cell_peak_rss_mb": cell["peak_rss_mb"],
        "parquet_peak_rss_mb": parquet["peak_rss_mb"],
        "bank_step_ms": naive["bank_step_s"] * 1e3,
        "naive_step_ms": naive["naive_step_s"] * 1e3,
        "bank_vs_naive_speedup": naive["naive_step_s"] / naive["bank_step_s"],
        "goal_24h_s": GOAL_WALL_S,
        "goal": goal,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default="1h", help="simulated time: seconds, or with s/m/h/d (default 1h)")
    parser.add_argument("--worker", choices=("cell", "parquet", "pack", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_worker(args.worker, _parse_duration(args.duration))))
    else:
        main(_parse_duration(args.duration))
