"""Compiled kernels for the few recursive loops numpy cannot vectorise: one decorator, :func:`kernel`.

The filters are recursive in time, so numpy can vectorise them over packs only, paying its call
overhead at every sample (a few hundred operations on 805-element arrays per second of
telemetry). Those loops are compiled with numba instead: one pass over each pack's samples,
its state held in registers. The kernels are plain Python over numpy arrays and scalars:

* ``cache=True``: compiled once per machine (10-20 s for all of them) and kept beside the
  module (``__pycache__``); set ``NUMBA_CACHE_DIR`` where the package folder is read-only
  (numba uses only a cache folder it can write to). A cache serves the CPU it was compiled
  for: the Docker image compiles them when it is built, for ``NUMBA_CPU_NAME=generic``;
* ``error_model="numpy"``: division by zero gives inf/NaN as numpy does, it does not raise;
* no ``fastmath``: IEEE arithmetic, so results are deterministic and do not depend on
  how the samples were cut into batches;
* ``NUMBA_DISABLE_JIT=1`` runs them as Python (slow; for debugging and coverage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

__all__ = ["kernel"]

_F = TypeVar("_F", bound=Callable[..., Any])


def kernel(fn: _F) -> _F:
    """Compile ``fn`` with numba in nopython mode (see the module docstring); typed as ``fn``.

    Where numba finds no writable place for its cache (a read-only install, no home folder,
    no ``NUMBA_CACHE_DIR``) the kernel is compiled in memory at each start instead.
    """
    try:
        return cast(_F, numba.njit(cache=True, nogil=True, error_model="numpy")(fn))
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return cast(_F, numba.njit(cache=False, nogil=True, error_model="numpy")(fn))
