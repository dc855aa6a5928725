"""State estimators of the twin: small stateful classes over polars batches, with no I/O.

Every batch estimator implements :class:`~twin.estimators.base.Estimator` and is listed in
:data:`~twin.estimators.base.REGISTRY`, which the contract suite in ``tests/`` runs over.

* :class:`SocEstimator`: pack SoC by an extended Kalman filter vectorised over all packs.
* :class:`CapacityTracker`: usable capacity from (ΔSoC, charge) pairs, weighted total least
  squares, fed at fixed event-time checkpoints by :class:`twin.estimation.SiteEstimation`.
* :class:`ResistanceTracker`: pack resistance at 25 °C and 50 % SoC from current steps (RLS).
* :class:`HealthTracker`: SoH, aging rate, RUL with P5-P95 and knees (BLAST-Lite laws
  calibrated per pack against the capacity estimates).
* :func:`site_outlook`: energy to the reserve floor, runtime and ride-through with P5/P50/P95,
  by forward simulation of the packs (stateless: a function of the estimates).
"""

from __future__ import annotations

from twin.estimators.base import REGISTRY, Estimator, EstimatorError
from twin.estimators.capacity import CapacityEstimate, CapacityOptions, CapacityTracker
from twin.estimators.energy import EnergyPacks, OutlookOptions, SiteOutlook, energy_to_floor_wh, site_outlook
from twin.estimators.health import HealthEstimate, HealthOptions, HealthTracker
from twin.estimators.resistance import ResistanceEstimate, ResistanceOptions, ResistanceTracker
from twin.estimators.soc import PackInfo, SocEstimate, SocEstimator, SocFlag, SocOptions, SocState

__all__ = [
    "REGISTRY",
    "CapacityEstimate",
    "CapacityOptions",
    "CapacityTracker",
    "EnergyPacks",
    "Estimator",
    "EstimatorError",
    "HealthEstimate",
    "HealthOptions",
    "HealthTracker",
    "OutlookOptions",
    "PackInfo",
    "ResistanceEstimate",
    "ResistanceOptions",
    "ResistanceTracker",
    "SiteOutlook",
    "SocEstimate",
    "SocEstimator",
    "SocFlag",
    "SocOptions",
    "SocState",
    "energy_to_floor_wh",
    "site_outlook",
]
