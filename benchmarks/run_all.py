"""Run every benchmark in this folder, each in its own process, and print one table.

Each benchmark is a script with a ``main() -> dict`` returning its figures (numbers or short
strings); run on its own it prints its own table. Here each runs in a fresh interpreter (so
one's memory and caches do not colour another's), its ``main()`` result is collected as
JSON, and the figures are printed together. Ratios are always against a baseline measured
in the same run of the same benchmark, because this machine is shared and noisy.

Usage: ``python benchmarks/run_all.py [NAME ...]`` (default: all).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = (
    "import importlib.util, json, sys\n"
    "spec = importlib.util.spec_from_file_location('bench', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec); sys.modules['bench'] = mod; spec.loader.exec_module(mod)\n"
    "print('@@RESULT@@' + json.dumps(mod.main(), default=str))\n"
)


def _flatten(figures: dict[str, object], prefix: str = "") -> dict[str, object]:
    """Nested figures become ``outer: inner`` rows."""
    out: dict[str, object] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}: "))
        else:
            out[name] = value
    return out


#: Benchmarks too long for the default table (an hour's soak): `make bench ARGS=soak` or by name.
LONG = frozenset({"soak"})


def main() -> int:
    """Run the benchmarks named on the command line (default: all) and print one table."""
    wanted = set(sys.argv[1:])
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    # Named benchmarks run as asked; by default, all but the long ones.
    scripts = [p for p in scripts if (p.stem in wanted if wanted else p.stem not in LONG)]
    rows: list[tuple[str, str, str]] = []
    failed = 0
    for script in scripts:
        started = time.perf_counter()
        print(f"== {script.stem}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(script)], capture_output=True, text=True, check=False, cwd=HERE.parent
        )
        elapsed = time.perf_counter() - started
        sys.stdout.write(proc.stdout.split("@@RESULT@@")[0])
        if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
            failed += 1
            rows.append((script.stem, "FAILED", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"))
            continue
        figures = json.loads(proc.stdout.split("@@RESULT@@", 1)[1])
        for key, value in _flatten(figures).items():
            text = f"{value:,.4g}" if isinstance(value, float) else str(value)
            rows.append((script.stem, key, text))
        rows.append((script.stem, "benchmark wall s", f"{elapsed:.1f}"))
    width = [max(len(r[i]) for r in [*rows, ("benchmark", "figure", "value")]) for i in range(3)]
    print()
    print(f"{'benchmark':<{width[0]}}  {'figure':<{width[1]}}  {'value':>{width[2]}}")
    print(f"{'-' * width[0]}  {'-' * width[1]}  {'-' * width[2]}")
    for name, key, value in rows:
        print(f"{name:<{width[0]}}  {key:<{width[1]}}  {value:>{width[2]}}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
