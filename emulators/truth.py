"""The site's true runtime and ride-through: forward simulation of the true packs.

"How long can the site go on at this power?" is answered the way the site would find
out: by running the packs' own physics forward at that constant power, shared among the
packs by the same dispatch as the live site, until the packs can no longer deliver it
(their usable SoC at the reserve floor, or their voltage or current limits binding).

To keep this cheap enough to evaluate every few minutes of a long run, each string is
reduced to two cell groups, its weakest (the one holding the least charge) and the mean
of the rest, and the simulation takes coarse steps; the two RC states and the hysteresis
state are integrated exactly, so the coarse step costs little accuracy.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from numpy.typing import NDArray

from emulators.pack import PackBank, PackParams
from emulators.site import dispatch

__all__ = ["reduced_bank", "time_to_floor_s"]

F64 = NDArray[np.float64]
B = NDArray[np.bool_]

#: Share of the requested power that may go unserved before the site counts as unable to carry it.
SHORTFALL_SHARE: Final = 0.005


def reduced_bank(bank: PackBank) -> PackBank:
    """Return a copy of ``bank`` with every string reduced to its weakest group and the rest."""
    p = bank.params
    n = p.n_packs
    rows = np.arange(n)
    held = np.where(p.mask, np.clip(bank.soc, 0.0, 1.0) * bank.capacity_ah, np.inf)
    weak = held.argmin(axis=1)
    w = p.weight.copy()
    w[rows, weak] = 0.0
    rest_w = np.maximum(w.sum(axis=1), 1e-12)

    def pair(x: F64) -> F64:
        rest = (x * w).sum(axis=1) / rest_w
        return np.column_stack([x[rows, weak], np.where(w.sum(axis=1) > 0, rest, x[rows, weak])])

    weight = np.column_stack([p.weight[rows, weak], p.series - p.weight[rows, weak]])
    small = PackParams(
        chem_index=p.chem_index,
        series=p.series,
        parallel=p.parallel,
        rated_group_ah=p.rated_group_ah,
        capacity_ah=pair(bank.capacity_ah),
        r_cell=pair(bank.r_cell),
        soc0=pair(bank.soc),
        mask=weight > 0,
        weight=weight,
        i_dis_max_a=p.i_dis_max_a,
        i_chg_max_a=p.i_chg_max_a,
        tables=p.tables,
        cooling_ua_w_per_k_per_ah=p.cooling_ua_w_per_k_per_ah,
    )
    out = PackBank(small, temp_c=bank.temp_c.copy())
    out.r_growth = bank.r_growth.copy()
    out.i_filtered = bank.i_filtered.copy()
    out.i_filtered2 = bank.i_filtered2.copy()
    out.hyst = bank.hyst.copy()
    out.contactor_closed = bank.contactor_closed.copy()
    out.extra_heat_w = bank.extra_heat_w.copy()
    out._invalidate()  # same module family: recompute with the copied state
    return out


def time_to_floor_s(
    bank: PackBank,
    power_w: float,
    *,
    floor_soc: float,
    env_temp_c: F64,
    excluded: B,
    dt_s: float = 300.0,
    horizon_s: float = 7 * 86_400.0,
) -> float:
    """Return how long the packs can deliver ``power_w`` (s), by forward simulation.

    Args:
        bank: the true packs now (not modified).
        power_w: constant battery power to hold, positive on discharge.
        floor_soc: reserve floor on each pack's usable SoC.
        env_temp_c: the packs' surroundings, held constant.
        excluded: packs that take no part (offline, faulted, contactor open).
        dt_s: simulation step.
        horizon_s: give up (return ``inf``) beyond this.

    Returns:
        Seconds until the packs fall short of ``power_w`` by more than 0.5 %; ``nan`` when
        ``power_w`` is not a discharge; ``inf`` beyond the horizon.
    """
    if not power_w > 0.0:
        return math.nan
    b = reduced_bank(bank)
    v_nom = b.params.derived("v_nom")
    t = 0.0
    while t < horizon_s:
        q_low, q_high = b.string_charge_ah()
        energy_wh = np.clip(q_low - floor_soc * (q_low + q_high), 0.0, None) * v_nom
        p_dis, _ = b.power_limits_w()
        plan = dispatch(
            power_w,
            discharge_energy_wh=energy_wh,
            charge_headroom_wh=np.zeros_like(energy_wh),
            max_discharge_w=p_dis,
            max_charge_w=np.zeros_like(energy_wh),
            excluded=excluded,
            dt_s=dt_s,
        )
        if plan.unserved_w > SHORTFALL_SHARE * power_w:
            # Part of this step could still be served: credit that share of the step.
            served = max(power_w - plan.unserved_w, 0.0) / power_w
            return t + dt_s * served
        b.step(plan.pack_power_w, env_temp_c, dt_s=dt_s)
        t += dt_s
    return math.inf
