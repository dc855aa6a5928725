"""State estimators of the twin: small stateful classes over polars batches, with no I/O.

Every estimator implements :class:`~twin.estimators.base.Estimator` and is listed in
:data:`~twin.estimators.base.REGISTRY`, which the contract suite in ``tests/`` runs over.

* :class:`SocEstimator`: pack SoC by an extended Kalman filter vectorised over all packs.
"""

from __future__ import annotations

from twin.estimators.base import REGISTRY, Estimator, EstimatorError
from twin.estimators.soc import PackInfo, SocEstimate, SocEstimator, SocFlag, SocOptions, SocState

__all__ = [
    "REGISTRY",
    "Estimator",
    "EstimatorError",
    "PackInfo",
    "SocEstimate",
    "SocEstimator",
    "SocFlag",
    "SocOptions",
    "SocState",
]
