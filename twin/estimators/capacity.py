"""Pack usable capacity from ordinary operation: weighted total least squares on (ΔSoC, charge) pairs.

Between two checkpoints of a pack, the charge it delivered (the coulomb count, A·h) and the
change of its usable SoC (from the SoC filter) are related by the capacity::

    ΔAh = Q · ΔSoC

Both sides are noisy: ΔSoC carries the filter's uncertainty at both ends, ΔAh the current
sensor's noise and offset over the interval. Ordinary least squares on noisy regressors is
biased toward zero; the errors-in-variables estimate used here weighs each pair by its
*effective* variance ``σ²_Ah + Q² σ²_SoC`` (the approximate weighted total least squares of
Plett, 2011), evaluated at the current estimate, with a forgetting factor so that fade is
followed. The capacity prior (rated x SoH prior) enters as one pseudo-pair of ΔSoC = 1 with
its own variance, so the estimate starts at the prior and moves as information arrives; it
works from partial cycles, and a pair is only formed once the SoC has moved by at least
:attr:`CapacityOptions.min_dsoc` (small swings carry little information relative to the
filter's noise), or the pair is dropped when its relative ΔSoC uncertainty is too large
(the LFP plateau, where the SoC is itself coulomb-counted and would only echo the prior).

The pair's charge is corrected for the current sensor's offset, taken from the SoC filter's
offset state *averaged over a day* (:attr:`CapacityOptions.offset_smoothing_s`), not its value
at the checkpoint. The filter's offset state also absorbs its own model errors, and those
follow the direction of the current: on a Leaf pack over 30 days it read about 0.05 A high
during discharge and low during charge. Subtracting that reading shrank both discharge and
charge pairs, and the capacity came out 6.5 % low. With the hours-long average the capacity
was within 1 %, while the pack's true, fixed offset is still taken off.

Checkpoints come on a fixed event-time grid (:class:`twin.estimation.SiteEstimation` takes
them), so the result does not depend on how the telemetry is cut into batches. Vectorised
over packs; no I/O.

References:
    Plett, G. L. (2011). Recursive approximate weighted total least squares estimation of
    battery cell total capacity. J. Power Sources 196, 2319-2331.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from twin.estimators.base import EstimatorError

__all__ = ["CapacityEstimate", "CapacityOptions", "CapacityState", "CapacityTracker"]

F64 = NDArray[np.float64]
B = NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class CapacityOptions:
    """Tuning of the capacity estimate.

    Attributes:
        prior_rel_std: relative standard deviation of the capacity prior (a stale intake test
            or a rated value).
        min_dsoc: a pair is formed once the usable SoC moved this much since the anchor.
        max_rel_dsoc_std: pairs whose ΔSoC standard deviation exceeds this share of ΔSoC are
            dropped (too little information: the plateau).
        current_noise_a: white noise of the current sensor, A (per sample).
        current_offset_std_a: residual current-offset uncertainty after the SoC filter's
            offset state, A (a bias over the interval).
        sample_s: telemetry sample period the noise refers to, s.
        forgetting: weight kept by past information per pair (1: none forgotten).
        offset_smoothing_s: time constant of the exponential average of the SoC filter's
            current-offset estimate that corrects each pair's charge, s.
    """

    prior_rel_std: float = 0.20
    min_dsoc: float = 0.08
    max_rel_dsoc_std: float = 0.25
    current_noise_a: float = 0.2
    current_offset_std_a: float = 0.1
    sample_s: float = 1.0
    forgetting: float = 0.995
    offset_smoothing_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        """Check ranges.

        Raises:
            EstimatorError: a value out of range.
        """
        if not (self.prior_rel_std > 0 and 0 < self.min_dsoc < 1 and self.max_rel_dsoc_std > 0):
            msg = f"CapacityOptions out of range: {self}"
            raise EstimatorError(msg)
        if not self.offset_smoothing_s > 0:
            msg = f"CapacityOptions.offset_smoothing_s must be positive, got {self.offset_smoothing_s}"
            raise EstimatorError(msg)
        if not 0 < self.forgetting <= 1:
            msg = f"CapacityOptions.forgetting must be in (0, 1], got {self.forgetting}"
            raise EstimatorError(msg)


@dataclass(frozen=True, slots=True, eq=False)
class CapacityState:
    """Per-pack sums of the weighted regression, and the anchor of the next pair (immutable)."""

    capacity_ah: F64  # current estimate
    sxx: F64  # Σ w ΔSoC²
    sxy: F64  # Σ w ΔSoC ΔAh
    pairs: NDArray[np.int64]
    anchor_soc: F64  # NaN: no anchor yet
    anchor_var: F64
    anchor_ah: F64
    anchor_ts_ms: NDArray[np.int64]
    armed: B  # the SoC moved enough at the previous checkpoint: the pair closes at this one
    offset_a: F64  # the filter's current offset averaged over hours; NaN: none seen yet
    offset_ts_ms: NDArray[np.int64]  # when it was last updated


@dataclass(frozen=True, slots=True, eq=False)
class CapacityEstimate:
    """Usable capacity per pack with its standard deviation, Ah, and how many pairs it rests on."""

    capacity_ah: F64
    capacity_std_ah: F64
    pairs: NDArray[np.int64]


class CapacityTracker:
    """Usable capacity of every pack from (ΔSoC, ΔAh) pairs, by weighted total least squares.

    Args:
        prior_ah: capacity prior per pack, Ah.
        options: tuning.
        prior_rel_std: relative standard deviation of each pack's prior (default:
            ``options.prior_rel_std`` for all).
    """

    def __init__(
        self, prior_ah: F64, options: CapacityOptions = CapacityOptions(), prior_rel_std: F64 | None = None
    ) -> None:
        prior = np.asarray(prior_ah, dtype=np.float64)
        if prior.ndim != 1 or not np.all(np.isfinite(prior) & (prior > 0)):
            msg = "capacity priors must be a 1-D array of positive numbers"
            raise EstimatorError(msg)
        self.options = options
        self.prior_ah = prior.copy()
        rel = np.broadcast_to(
            np.asarray(options.prior_rel_std if prior_rel_std is None else prior_rel_std, dtype=np.float64), prior.shape
        )
        if not np.all(np.isfinite(rel) & (rel > 0)):
            msg = "capacity prior standard deviations must be positive"
            raise EstimatorError(msg)
        var0 = (rel * prior) ** 2
        n = prior.size
        self._state = CapacityState(
            capacity_ah=prior.copy(),
            sxx=1.0 / var0,  # the prior as a pseudo-pair (ΔSoC = 1, ΔAh = prior, variance var0)
            sxy=prior / var0,
            pairs=np.zeros(n, dtype=np.int64),
            anchor_soc=np.full(n, np.nan),
            anchor_var=np.zeros(n),
            anchor_ah=np.zeros(n),
            anchor_ts_ms=np.zeros(n, dtype=np.int64),
            armed=np.zeros(n, dtype=np.bool_),
            offset_a=np.full(n, np.nan),
            offset_ts_ms=np.zeros(n, dtype=np.int64),
        )

    def snapshot(self) -> CapacityState:
        """Return the state (immutable)."""
        return self._state

    def restore(self, state: CapacityState) -> None:
        """Resume from a snapshot of a tracker over the same packs.

        Raises:
            EstimatorError: for a state of another size.
        """
        if state.capacity_ah.shape != self.prior_ah.shape:
            msg = "capacity state does not fit these packs"
            raise EstimatorError(msg)
        self._state = state

    def checkpoint(self, *, ts_ms: int, soc: F64, soc_std: F64, ah: F64, current_offset_a: F64, valid: B) -> None:
        """Offer every pack's usable SoC and cumulative discharged charge at one grid time.

        Args:
            ts_ms: the checkpoint's event time, ms.
            soc: usable SoC per pack (from the SoC filter).
            soc_std: its standard deviation.
            ah: cumulative charge delivered since the start (discharge positive), A·h, as
                measured (the sensor's offset included).
            current_offset_a: the SoC filter's estimate of the current sensor's offset, A;
                its average over :attr:`CapacityOptions.offset_smoothing_s` is taken off
                the pair's charge over its interval.
            valid: packs whose values are current (fresh telemetry at this checkpoint).
        """
        s, o = self._state, self.options
        soc = np.asarray(soc, dtype=np.float64)
        var = np.square(np.asarray(soc_std, dtype=np.float64))
        ok = np.asarray(valid, dtype=np.bool_) & np.isfinite(soc) & np.isfinite(var) & np.isfinite(ah)
        no_anchor = ok & np.isnan(s.anchor_soc)
        dsoc = s.anchor_soc - soc  # discharge positive, like the charge
        dt_s = (ts_ms - s.anchor_ts_ms) / 1000.0
        offset_now = np.asarray(current_offset_a, dtype=np.float64)
        seen = np.asarray(valid, dtype=np.bool_) & np.isfinite(offset_now)
        alpha = -np.expm1(-np.maximum(ts_ms - s.offset_ts_ms, 0) / (1000.0 * o.offset_smoothing_s))
        offset = np.where(
            seen, np.where(np.isnan(s.offset_a), offset_now, s.offset_a + alpha * (offset_now - s.offset_a)), s.offset_a
        )
        offset_ts = np.where(seen, ts_ms, s.offset_ts_ms)
        dah = ah - s.anchor_ah - np.nan_to_num(offset) * dt_s / 3600.0
        # A pair closes one checkpoint *after* the SoC was seen to have moved enough: closing it
        # at the crossing itself would select the samples whose noise pushed them over the
        # threshold and bias the capacity low.
        crossed = ok & ~no_anchor & (np.abs(dsoc) >= o.min_dsoc)
        moved = ok & ~no_anchor & s.armed & (np.abs(dsoc) >= 0.5 * o.min_dsoc)
        armed = (s.armed & ~ok) | (crossed & ~s.armed)
        var_x = var + s.anchor_var
        informative = moved & (np.sqrt(var_x) <= o.max_rel_dsoc_std * np.abs(dsoc))
        var_y = (o.current_noise_a**2 * o.sample_s * np.maximum(dt_s, 0.0) + (o.current_offset_std_a * dt_s) ** 2) / (
            3600.0**2
        )
        q = s.capacity_ah
        w = np.where(informative, 1.0 / np.maximum(var_y + q * q * var_x, 1e-12), 0.0)
        lam = np.where(informative, o.forgetting, 1.0)
        x = np.where(informative, dsoc, 0.0)  # NaN-free where unused (0 x NaN is NaN)
        y = np.where(informative, dah, 0.0)
        sxx = lam * s.sxx + w * x * x
        sxy = lam * s.sxy + w * x * y
        cap = np.where(informative, sxy / sxx, q)
        cap = np.clip(cap, 0.2 * self.prior_ah, 1.5 * self.prior_ah)
        renew = no_anchor | moved  # a pair was formed (used or dropped): the next one starts here
        self._state = replace(
            s,
            capacity_ah=cap,
            sxx=sxx,
            sxy=sxy,
            pairs=s.pairs + informative.astype(np.int64),
            anchor_soc=np.where(renew, soc, s.anchor_soc),
            anchor_var=np.where(renew, var, s.anchor_var),
            anchor_ah=np.where(renew, ah, s.anchor_ah),
            anchor_ts_ms=np.where(renew, ts_ms, s.anchor_ts_ms),
            armed=armed & ~renew,
            offset_a=offset,
            offset_ts_ms=offset_ts,
        )

    def estimate(self) -> CapacityEstimate:
        """Return the capacity per pack with its standard deviation."""
        s = self._state
        return CapacityEstimate(
            capacity_ah=s.capacity_ah.copy(),
            capacity_std_ah=1.0 / np.sqrt(np.maximum(s.sxx, 1e-300)),
            pairs=s.pairs.copy(),
        )

    def grown(
        self, prior_ah: F64, keep: NDArray[np.intp], into: NDArray[np.intp], prior_rel_std: F64 | None = None
    ) -> CapacityTracker:
        """Return a tracker for a larger pack set: packs ``keep`` of this one go to rows ``into``."""
        out = CapacityTracker(prior_ah, self.options, prior_rel_std)
        old, new = self._state, out._state
        arrays = {}
        for name in (
            "capacity_ah",
            "sxx",
            "sxy",
            "pairs",
            "anchor_soc",
            "anchor_var",
            "anchor_ah",
            "anchor_ts_ms",
            "armed",
            "offset_a",
            "offset_ts_ms",
        ):
            arr = np.array(getattr(new, name), copy=True)
            arr[into] = getattr(old, name)[keep]
            arrays[name] = arr
        out._state = CapacityState(**arrays)
        return out
