"""The compiled kernels' decorator (twin/_jit.py): where numba keeps its cache, and what happens without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numba
import pytest

import twin._jit
from twin._jit import kernel


def test_a_kernel_compiles_in_memory_where_numba_has_no_place_for_its_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    real = numba.njit
    asked: list[bool] = []

    def njit(*args: Any, **options: Any) -> Any:
        if options.get("error_model") == "numpy":  # ours; numba's own modules call njit too
            asked.append(options["cache"])
            if options["cache"]:
                msg = "cannot cache function 'add': no locator available for file 'add.py'"
                raise RuntimeError(msg)
        return real(*args, **options)

    monkeypatch.setattr(twin._jit.numba, "njit", njit)

    @kernel
    def add(a: float, b: float) -> float:
        return a + b

    assert add(2.0, 3.5) == 5.5
    assert asked == [True, False]


def test_the_cache_goes_where_numba_cache_dir_says(tmp_path: Path) -> None:
    """The Docker image compiles the kernels into NUMBA_CACHE_DIR when it is built (its package folder is root's)."""
    code = "import numpy as np; from twin.estimators._soc_filter import _dot6; print(_dot6(np.ones(6), np.ones(6)))"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "6.0"
    assert any(tmp_path.rglob("_soc_filter._dot6-*.nbi"))
    assert any(tmp_path.rglob("_soc_filter._dot6-*.nbc"))


def test_the_warm_up_readies_every_kernel_a_replay_uses(tmp_path: Path) -> None:
    """After :func:`warm_up_kernels` (what `mgtwin serve` runs before its first message) a replay compiles nothing."""
    code = """
import json, sys
from pathlib import Path
from numba.core.registry import CPUDispatcher
import twin.estimators._soc_filter, twin.estimators.energy, twin.estimators.resistance
from twin.replay import RunFolder, replay_run
from twin.state import warm_up_kernels

mods = (twin.estimators._soc_filter, twin.estimators.energy, twin.estimators.resistance)
def signatures():
    return {f"{m.__name__}.{n}": len(getattr(m, n).signatures) for m in mods for n in dir(m)
            if isinstance(getattr(m, n), CPUDispatcher)}
warm_up_kernels()
before = signatures()
replay_run(RunFolder.open(Path(sys.argv[1])))
print(json.dumps([before, signatures()]))
"""
    run = tmp_path / "run"
    emulate = [sys.executable, "-m", "twin.cli", "emulate", "--scenario", "small", "--duration", "5m"]
    subprocess.run([*emulate, "--pack-level", "--out", str(run)], check=True, capture_output=True, timeout=300)
    out = subprocess.run(
        [sys.executable, "-c", code, str(run)], check=True, capture_output=True, text=True, timeout=300
    )
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == after
    assert before["twin.estimators._soc_filter.run"] == 1
    assert before["twin.estimators.resistance._filter"] == 1
    assert before["twin.estimators.energy._simulate"] == 1


def test_the_soc_kernel_s_table_look_up_stays_inside_the_table() -> None:
    """A kernel does not check its indices: the look-up clamps them, NaN SoC included (int(NaN) is huge)."""
    from twin.estimators._soc_filter import GRID_POINTS, _lookup

    assert _lookup(0, float("nan"))[0] == 0
    assert _lookup(GRID_POINTS, -0.5) == (GRID_POINTS, 0.0)
    assert _lookup(GRID_POINTS, 1.5) == (GRID_POINTS + GRID_POINTS - 2, 1.0)
    row, frac = _lookup(0, 0.25)
    assert row == 250
    assert frac == pytest.approx(0.0, abs=1e-9)
