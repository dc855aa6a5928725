"""Aging of the emulated fleet: the packs' own stressor history drives the BLAST-Lite-style laws.

During a run, every step adds the packs' SoC, temperature and current to running sums
(no history is kept); every ``aging_every_s`` the sums become one chunk of
:class:`~twin.chemistry.aging.Stressors`, each chemistry's law advances its packs, and the
cells' capacities and the packs' resistance follow the change.

Packs start old: before the run, each pack's law is advanced through its first life
(years in service and EFC from the fleet draw, at typical EV stressors) and its time at
the site since commissioning, so
the run continues on the flatter part of the calendar and cycle curves instead of
restarting the steep initial fade of a new cell. Packs drawn with a knee get an onset
just past their present EFC.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from emulators.fleet import Fleet
from emulators.pack import PackBank
from twin.chemistry.aging import (
    FIRST_LIFE,
    SOC_GRID,
    AgingLaw,
    AgingState,
    KneeModel,
    Stressors,
    first_life_stressors,
    get_aging_law,
)

__all__ = ["FIRST_LIFE", "FleetAging"]

F64 = NDArray[np.float64]

#: First lives are aged at :data:`twin.chemistry.aging.FIRST_LIFE` (re-exported here) in chunks of this many days.
_FIRST_LIFE_CHUNK_DAYS: Final = 30.0
_KNEE_ONSET_SPREAD_EFC: Final = 50.0
_SITE_EFC_PER_DAY: Final = 1.0


class FleetAging:
    """Accumulate the packs' stressors and advance their aging laws.

    Args:
        fleet: the drawn fleet (laws per chemistry, scalars, knees, first-life age).
        bank: the packs whose capacity and resistance aging changes.
        speedup: multiplies elapsed time and throughput as the laws see them.
        rng: draws the knee onsets.
    """

    def __init__(self, fleet: Fleet, bank: PackBank, *, speedup: float, rng: np.random.Generator) -> None:
        self.fleet = fleet
        self.bank = bank
        self.speedup = speedup
        self.knee = KneeModel()
        self.laws: dict[int, AgingLaw] = {}
        self.intake_ratio = np.ones(fleet.n_packs)
        """Capacity at commissioning over capacity at the start of the run, per pack."""
        self.states: dict[int, AgingState] = {}
        self._members: dict[int, NDArray[np.intp]] = {}
        ci = fleet.params.chem_index
        for k, chem in enumerate(fleet.params.tables.chemistries):
            idx = np.flatnonzero(ci == k)
            if idx.size == 0:
                continue
            law = get_aging_law(chem.aging_model)
            state = self._first_life(law, idx)
            spread = rng.uniform(0.0, _KNEE_ONSET_SPREAD_EFC, idx.size)
            onset = np.where(fleet.knee[idx], state.efc + spread, np.inf)
            self.laws[k] = law
            self.states[k] = state.with_knee_onset(onset)
            self._members[k] = idx
        n = fleet.n_packs
        self._sums = {k: np.zeros(n) for k in ("t", "soc", "temp", "abs_c", "chg_c", "chg_t", "dis_c", "dis_t")}
        self._soc_min = np.full(n, np.inf)
        self._soc_max = np.full(n, -np.inf)
        self._occupancy = np.zeros((n, SOC_GRID.size))
        self._rows = np.arange(n, dtype=np.intp) * SOC_GRID.size

    def _first_life(self, law: AgingLaw, idx: NDArray[np.intp]) -> AgingState:
        """Age ``idx`` through their first life, then their site life so far; note the intake.

        :attr:`intake_ratio` gets each pack's capacity at commissioning (the end of its first
        life, when the intake test measured it) over its capacity now.
        """
        fleet = self.fleet
        state = law.initial_state(idx.size)
        first = fleet.years_in_service[idx] * 365.0
        days = first + fleet.site_days[idx]
        if not np.any(days > 0):
            return state
        # First life at its own EFC rate, then the site's life so far at about one EFC a day.
        efc_total = fleet.first_life_efc[idx] + _SITE_EFC_PER_DAY * fleet.site_days[idx]
        per_day = efc_total / np.maximum(days, 1.0)
        q_intake = np.asarray(state.q, dtype=np.float64).copy()
        # Chunks end at commissioning: the state there is the intake's.
        steps = (
            int(np.ceil(first.max() / _FIRST_LIFE_CHUNK_DAYS)) + int(np.ceil(days.max() / _FIRST_LIFE_CHUNK_DAYS)) + 1
        )
        for _ in range(steps):
            target = np.where(state.t_days < first, first, days)
            dt_days = np.clip(target - state.t_days, 0.0, _FIRST_LIFE_CHUNK_DAYS)
            if not np.any(dt_days > 0):
                break
            stress = first_life_stressors(dt_days, efc=per_day * dt_days)
            state = law.step(state, stress, scalar=fleet.aging_scalar[idx])
            at_intake = (first > 0) & np.isclose(state.t_days, first)
            q_intake = np.where(at_intake, np.asarray(state.q), q_intake)
        self.intake_ratio[idx] = q_intake / np.maximum(np.asarray(state.q), 1e-9)
        return state

    def accumulate(self, soc: F64, current_a: F64, temp_c: F64, dt_s: float) -> None:
        """Add one step of every pack's usable SoC, current and temperature to the running sums."""
        s = self._sums
        c_rate = np.abs(current_a) / np.maximum(self.bank.pack_capacity_ah(), 1e-9)
        charging = current_a < 0
        discharging = current_a > 0
        c_dt = c_rate * dt_s
        s["t"] += dt_s
        s["soc"] += soc * dt_s
        s["temp"] += temp_c * dt_s
        s["abs_c"] += c_dt
        # Adding only where (un)charging is adding zero elsewhere, without the temporaries.
        np.add(s["chg_c"], c_dt, out=s["chg_c"], where=charging)
        np.add(s["chg_t"], dt_s, out=s["chg_t"], where=charging)
        np.add(s["dis_c"], c_dt, out=s["dis_c"], where=discharging)
        np.add(s["dis_t"], dt_s, out=s["dis_t"], where=discharging)
        np.minimum(self._soc_min, soc, out=self._soc_min)
        np.maximum(self._soc_max, soc, out=self._soc_max)
        # Time spent near each SoC node (tent weights), for laws whose rates depend on SoC: a
        # day cycled between 10 and 90 % does not age like a day at 50 %.
        pos = np.clip(soc, 0.0, 1.0) * (SOC_GRID.size - 1)
        lo = np.minimum(pos.astype(np.intp), SOC_GRID.size - 2)
        frac = pos - lo
        flat = self._occupancy.reshape(-1)
        cell = self._rows + lo
        flat[cell] += (1.0 - frac) * dt_s
        flat[cell + 1] += frac * dt_s

    def stressors(self, idx: NDArray[np.intp]) -> Stressors:
        """The chunk's stressors of the packs ``idx``, from the running sums."""
        s = self._sums
        t = np.maximum(s["t"][idx], 1e-9)
        occupancy = self._occupancy[idx] / t[:, None]
        soc_mean = np.clip(s["soc"][idx] / t, 0.0, 1.0)
        empty = s["t"][idx] <= 0
        if np.any(empty):  # no time accumulated: all weight at the mean (nothing ages anyway)
            occupancy[empty] = 0.0
            node = np.rint(soc_mean[empty] * (SOC_GRID.size - 1)).astype(np.intp)
            occupancy[np.flatnonzero(empty), node] = 1.0
        return Stressors(
            dt_days=s["t"][idx] / 86_400.0 * self.speedup,
            temp_k=s["temp"][idx] / t + 273.15,
            soc_mean=soc_mean,
            dod=np.clip(self._soc_max[idx] - self._soc_min[idx], 0.0, 1.0),
            c_rate_mean=s["abs_c"][idx] / t,
            c_rate_charge_mean=s["chg_c"][idx] / np.maximum(s["chg_t"][idx], 1e-9),
            c_rate_discharge_mean=s["dis_c"][idx] / np.maximum(s["dis_t"][idx], 1e-9),
            efc=s["abs_c"][idx] / 3600.0 / 2.0 * self.speedup,
            soc_occupancy=occupancy,
        )

    def apply(self) -> None:
        """Advance every law by the accumulated chunk and age the packs accordingly; reset the sums."""
        n = self.fleet.n_packs
        ratio = np.ones(n)
        growth = self.bank.r_growth.copy()
        for k, law in self.laws.items():
            idx = self._members[k]
            old = self.states[k]
            new = law.step(old, self.stressors(idx), scalar=self.fleet.aging_scalar[idx], knee=self.knee)
            self.states[k] = new
            ratio[idx] = new.q / np.maximum(old.q, 1e-9)
            growth[idx] *= new.r_growth / np.maximum(old.r_growth, 1e-9)
        self.bank.apply_aging(np.clip(ratio, 0.0, 1.0), growth)
        for v in self._sums.values():
            v[:] = 0.0
        self._soc_min[:] = np.inf
        self._soc_max[:] = -np.inf
        self._occupancy[:] = 0.0
