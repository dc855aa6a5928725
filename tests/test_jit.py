"""The compiled kernels' decorator (twin/_jit.py): where numba keeps its cache, and what happens without one."""

from __future__ import annotations

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
