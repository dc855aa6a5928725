"""Site emulation: ambient temperature, PV, the GPU data centre, the grid, and dispatch.

Every generator here is pure and deterministic: it takes event times (integer milliseconds
since the epoch, UTC, strictly increasing, not necessarily evenly spaced), a validated
scenario section and a seeded :class:`numpy.random.Generator`, and returns whole arrays for
the horizon. Nothing loops per time step; the few Python loops run over weather or job
events, or over blocks of many samples.

Sign convention (the project's, from DESIGN.md): battery power is positive on discharge,
that is, when it flows *into* the site bus; grid power is positive on import, also into the
bus. At every instant::

    load_w + curtailed_w = solar_w + battery_w + grid_w + unserved_w

Example:
    >>> import numpy as np
    >>> from emulators.scenario import load_scenario
    >>> from emulators.site import site_trace
    >>> trace = site_trace(load_scenario("small"), horizon_s=3600.0, dt_s=60.0)
    >>> trace.load_w.shape
    (60,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from emulators.scenario import (
    ClimateConfig,
    CloudConfig,
    DispatchPolicy,
    GridConfig,
    LoadConfig,
    Scenario,
    SolarConfig,
)

__all__ = [
    "DatacentreLoad",
    "DispatchResult",
    "GridBalance",
    "SiteTrace",
    "ambient_temp_c",
    "battery_request_w",
    "datacentre_load_w",
    "dispatch",
    "grid_available",
    "grid_power_w",
    "site_trace",
    "solar_power_w",
    "time_grid_ms",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]

_MS_PER_S = 1000.0
_S_PER_H = 3600.0
_MS_PER_H = 3_600_000
_MS_PER_DAY = 86_400_000
_W_PER_MW = 1e6

# Haurwitz clear-sky GHI, W/m²: 1098·cosZ·exp(−0.057/cosZ) (Haurwitz 1945; the simplest of
# the models compared in Reno, Hansen & Stein, SAND2012-2389, which rank it well for GHI).
_HAURWITZ_A_W_M2 = 1098.0
_HAURWITZ_B = 0.057
# Diffuse share of clear-sky GHI; under cloud it rises linearly to 1 at index 0 (a simple
# stand-in for an Erbs-type decomposition).
_CLEAR_DIFFUSE_FRACTION = 0.15
# The beam is not resolved below 5° sun elevation: there DNI = beam / sin(5°).
_MIN_COS_ZENITH_FOR_DNI = math.sin(math.radians(5.0))
# Clear-sky index bounds under broken cloud: cloud enhancement up to 1.2, never fully dark.
_BROKEN_INDEX_MIN = 0.05
_BROKEN_INDEX_MAX = 1.2
# An OU process is advanced in blocks spanning this many time constants, so the growth
# factor exp(t/tau) inside a block stays below e^30 (well within float64).
_OU_BLOCK_TAUS = 30.0
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


# --------------------------------------------------------------------------- time


def time_grid_ms(start: datetime, horizon_s: float, dt_s: float) -> IntArray:
    """Return evenly spaced event times covering ``[start, start + horizon_s)``.

    Args:
        start: an aware datetime.
        horizon_s: the length of the run, seconds (> 0).
        dt_s: the step, seconds (> 0; rounded to whole milliseconds).

    Returns:
        Integer milliseconds since the epoch, UTC.

    Raises:
        ValueError: ``start`` is naive, or ``horizon_s`` or ``dt_s`` is not positive.
    """
    if start.tzinfo is None or start.utcoffset() is None:
        msg = "start must be timezone-aware"
        raise ValueError(msg)
    if not (horizon_s > 0.0 and dt_s > 0.0):
        msg = f"horizon_s and dt_s must be positive, got {horizon_s} and {dt_s}"
        raise ValueError(msg)
    dt_ms = round(dt_s * _MS_PER_S)
    if dt_ms < 1:
        msg = f"dt_s must be at least 1 ms, got {dt_s}"
        raise ValueError(msg)
    start_ms = round(start.timestamp() * _MS_PER_S)
    n = math.ceil(horizon_s * _MS_PER_S / dt_ms)
    return start_ms + np.arange(n, dtype=np.int64) * dt_ms


def _checked_times(times_ms: ArrayLike) -> IntArray:
    t = np.asarray(times_ms)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        msg = "times must be a 1-D array of integer milliseconds since the epoch"
        raise ValueError(msg)
    t = t.astype(np.int64, copy=False)
    if t.size > 1 and not bool(np.all(np.diff(t) > 0)):
        msg = "times must be strictly increasing"
        raise ValueError(msg)
    return t


def _seconds_from_first(t_ms: IntArray) -> FloatArray:
    if t_ms.size == 0:
        return np.zeros(0)
    out: FloatArray = (t_ms - t_ms[0]).astype(np.float64) / _MS_PER_S
    return out


def _calendar(t_ms: IntArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return (days since 1 January 00:00 UTC, days in that year, hour of day UTC)."""
    t = t_ms.astype("datetime64[ms]")
    year = t.astype("datetime64[Y]")
    year_start = year.astype("datetime64[D]")
    day0 = (t - year_start) / np.timedelta64(1, "D")
    next_start = (year + np.timedelta64(1, "Y")).astype("datetime64[D]")
    year_days = (next_start - year_start) / np.timedelta64(1, "D")
    hour = (t_ms % _MS_PER_DAY).astype(np.float64) / _MS_PER_H
    return day0.astype(np.float64), year_days.astype(np.float64), hour


# --------------------------------------------------------------------------- random processes


def _ou(t_s: FloatArray, tau_s: float, sd: float, rng: np.random.Generator) -> FloatArray:
    """Sample a stationary Ornstein–Uhlenbeck process (mean 0, sd ``sd``) at times ``t_s``.

    Exact for any spacing: x_k = a_k·x_{k−1} + sd·sqrt(1 − a_k²)·z_k with a_k = exp(−Δt/τ).
    The recursion is solved in closed form block by block (a cumulative sum per block).
    """
    n = t_s.size
    z = rng.standard_normal(n)  # drawn whatever sd is, so the stream does not depend on it
    x = np.zeros(n)
    if n == 0 or sd == 0.0:
        return x
    x[0] = sd * z[0]
    if n == 1:
        return x
    innov = sd * np.sqrt(-np.expm1(-2.0 * np.diff(t_s) / tau_s)) * z[1:]
    block = np.floor((t_s[1:] - t_s[1]) / (_OU_BLOCK_TAUS * tau_s)).astype(np.int64)
    edges = np.flatnonzero(np.diff(block)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [n - 1]))
    prev = x[0]
    # innov[k] belongs to sample k + 1; a block innov[s:e] covers samples s+1 .. e.
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        tt = t_s[s + 1 : e + 1]
        grow = np.exp((tt - tt[0]) / tau_s)
        acc = np.cumsum(innov[s:e] * grow) / grow
        x[s + 1 : e + 1] = prev * np.exp(-(tt - t_s[s]) / tau_s) + acc
        prev = x[e]
    return x


def _renewal(
    t_s: FloatArray, means_s: FloatArray, probs: FloatArray, first: int, rng: np.random.Generator
) -> tuple[IntArray, IntArray, FloatArray]:
    """Sample a semi-Markov chain of states with exponential dwell times.

    After each dwell the next state is drawn with ``probs`` (it may repeat).

    Returns:
        (state at each time, segment index at each time, segment start times in seconds
        with the first segment starting at 0).
    """
    horizon = float(t_s[-1]) if t_s.size else 0.0
    mean_cycle = float(np.dot(probs, means_s))
    states_chunks: list[IntArray] = []
    dwell_chunks: list[FloatArray] = []
    total = 0.0
    while total <= horizon:
        m = int(horizon / mean_cycle) + 8 if math.isfinite(mean_cycle) else 1
        states = rng.choice(means_s.size, size=m, p=probs).astype(np.int64)
        if not states_chunks:
            states[0] = first
        dwell = rng.exponential(1.0, m) * means_s[states]
        states_chunks.append(states)
        dwell_chunks.append(dwell)
        total += float(dwell.sum())
    states = np.concatenate(states_chunks)
    ends = np.cumsum(np.concatenate(dwell_chunks))
    seg = np.searchsorted(ends, t_s, side="right").astype(np.int64)
    seg_start = np.concatenate(([0.0], ends))
    return states[seg], seg, seg_start


def _two_state(
    t_s: FloatArray, mean_on_s: float, mean_off_s: float, rng: np.random.Generator
) -> tuple[BoolArray, IntArray, FloatArray]:
    """Sample an on/off process started in its stationary distribution.

    Either mean may be infinite (the state is then absorbing).

    Returns:
        (on at each time, segment index at each time, segment start times in seconds).
    """
    if math.isinf(mean_on_s):
        p_on = 1.0
    elif math.isinf(mean_off_s):
        p_on = 0.0
    else:
        p_on = mean_on_s / (mean_on_s + mean_off_s)
    on0 = bool(rng.random() < p_on)
    horizon = float(t_s[-1]) if t_s.size else 0.0
    means = (mean_on_s, mean_off_s) if on0 else (mean_off_s, mean_on_s)
    cycle = means[0] + means[1]
    chunks: list[FloatArray] = []
    total = 0.0
    while total <= horizon:
        m = int(horizon / cycle) + 8 if math.isfinite(cycle) else 1
        d = np.empty(2 * m)
        for j in (0, 1):
            d[j::2] = np.inf if math.isinf(means[j]) else rng.exponential(means[j], m)
        chunks.append(d)
        total += float(d.sum())
    ends = np.cumsum(np.concatenate(chunks))
    seg = np.searchsorted(ends, t_s, side="right").astype(np.int64)
    on = (seg % 2 == 0) == on0
    seg_start = np.concatenate(([0.0], ends))
    return on, seg, seg_start


def _trailing_mean(t_s: FloatArray, x: FloatArray, window_s: float) -> FloatArray:
    """Average ``x`` over the trailing ``window_s`` (trapezoidal, any spacing)."""
    if window_s <= 0.0 or x.size < 2:
        return x
    cum = np.concatenate(([0.0], np.cumsum(0.5 * (x[1:] + x[:-1]) * np.diff(t_s))))
    lo = np.maximum(t_s - window_s, t_s[0])
    span = t_s - lo
    out = x.copy()
    ok = span > 0.0
    out[ok] = (cum[ok] - np.interp(lo[ok], t_s, cum)) / span[ok]
    return out


def _monthly(year_fraction: FloatArray, values: tuple[float, ...]) -> FloatArray:
    """Interpolate twelve monthly values, each placed mid-month, periodically over the year."""
    days = np.asarray(_MONTH_DAYS, dtype=np.float64)
    centres = (np.cumsum(days) - days / 2.0) / days.sum()
    v = np.asarray(values, dtype=np.float64)
    xp = np.concatenate(([centres[-1] - 1.0], centres, [centres[0] + 1.0]))
    fp = np.concatenate(([v[-1]], v, [v[0]]))
    return np.interp(year_fraction, xp, fp)


# --------------------------------------------------------------------------- ambient


def ambient_temp_c(times_ms: ArrayLike, climate: ClimateConfig, rng: np.random.Generator) -> FloatArray:
    """Return the ambient air temperature at each time (°C).

    Daily mean (monthly table or annual sinusoid) + daily cosine swing peaking at
    ``climate.peak_hour_utc`` + Ornstein–Uhlenbeck weather noise.

    Args:
        times_ms: event times, integer ms since the epoch, strictly increasing.
        climate: the scenario's climate section.
        rng: the random generator.

    Returns:
        Temperatures, one per time.
    """
    t_ms = _checked_times(times_ms)
    day0, year_days, hour = _calendar(t_ms)
    if climate.monthly_mean_c is not None:
        mean = _monthly(day0 / year_days, climate.monthly_mean_c)
    else:
        # The validator guarantees both sinusoid fields when there is no monthly table.
        annual_mean = climate.annual_mean_c if climate.annual_mean_c is not None else 0.0
        annual_amp = climate.annual_amplitude_c if climate.annual_amplitude_c is not None else 0.0
        phase = 2.0 * np.pi * (day0 - (climate.coldest_day_of_year - 1.0)) / year_days
        mean = annual_mean - annual_amp * np.cos(phase)
    if climate.monthly_diurnal_amplitude_c is not None:
        swing = _monthly(day0 / year_days, climate.monthly_diurnal_amplitude_c)
    else:
        swing = np.full(t_ms.size, climate.diurnal_amplitude_c or 0.0)
    diurnal = swing * np.cos(2.0 * np.pi * (hour - climate.peak_hour_utc) / 24.0)
    noise = _ou(_seconds_from_first(t_ms), climate.noise_tau_h * _S_PER_H, climate.noise_sd_c, rng)
    return mean + diurnal + noise


# --------------------------------------------------------------------------- solar


def _sun_vector(t_ms: IntArray, latitude_deg: float, longitude_deg: float) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Return the sun's unit vector (up, east, north) at each time.

    Declination and equation of time from Spencer (1971), as used in the NOAA general
    solar position notes; accurate to about a minute of time, plenty for PV power.
    """
    day0, year_days, hour = _calendar(t_ms)
    g = 2.0 * np.pi * (day0 - 0.5) / year_days  # Spencer's fractional year, noon-centred
    decl = (
        0.006918
        - 0.399912 * np.cos(g)
        + 0.070257 * np.sin(g)
        - 0.006758 * np.cos(2 * g)
        + 0.000907 * np.sin(2 * g)
        - 0.002697 * np.cos(3 * g)
        + 0.00148 * np.sin(3 * g)
    )
    eot_min = 229.18 * (
        0.000075 + 0.001868 * np.cos(g) - 0.032077 * np.sin(g) - 0.014615 * np.cos(2 * g) - 0.040849 * np.sin(2 * g)
    )
    solar_hour = hour + longitude_deg / 15.0 + eot_min / 60.0
    omega = np.radians(15.0 * (solar_hour - 12.0))
    phi = math.radians(latitude_deg)
    up = math.sin(phi) * np.sin(decl) + math.cos(phi) * np.cos(decl) * np.cos(omega)
    east = -np.cos(decl) * np.sin(omega)
    north = math.cos(phi) * np.sin(decl) - math.sin(phi) * np.cos(decl) * np.cos(omega)
    return up, east, north


def _clear_sky_index(t_s: FloatArray, clouds: CloudConfig, rng: np.random.Generator) -> FloatArray:
    """Return the clear-sky index (GHI / clear-sky GHI) from the regime chain."""
    means_s = np.array([clouds.clear_dwell_h, clouds.broken_dwell_h, clouds.overcast_dwell_h]) * _S_PER_H
    weights = np.array([clouds.clear_weight, clouds.broken_weight, clouds.overcast_weight])
    probs = weights / weights.sum()
    first = int(rng.choice(3, p=np.asarray(clouds.regime_shares)))
    regime, _, _ = _renewal(t_s, means_s, probs, first, rng)
    broken = np.clip(
        clouds.broken_index_mean + _ou(t_s, clouds.broken_tau_s, clouds.broken_index_sd, rng),
        _BROKEN_INDEX_MIN,
        _BROKEN_INDEX_MAX,
    )
    index = np.where(regime == 0, 1.0, np.where(regime == 1, broken, clouds.overcast_index))
    return _trailing_mean(t_s, index, clouds.ramp_s)


def solar_power_w(
    times_ms: ArrayLike,
    solar: SolarConfig,
    rng: np.random.Generator,
    *,
    ambient_c: FloatArray | None = None,
    clear_sky: bool = False,
) -> FloatArray:
    """Return the PV plant's AC output at each time (W).

    Clear-sky GHI (Haurwitz) from the solar position, scaled by a clear-sky index from the
    cloud-regime chain; split into beam and isotropic diffuse; transposed onto the tilted
    plane with ground reflection; DC power with the NOCT cell-temperature derate and system
    losses; inverter efficiency; clipped at the AC rating.

    Args:
        times_ms: event times, integer ms since the epoch, strictly increasing.
        solar: the scenario's solar section.
        rng: the random generator (used for clouds only).
        ambient_c: ambient temperature at each time; without it the cells are taken to be
            at 25 °C (no temperature derate).
        clear_sky: skip the clouds (the rng is not used).

    Returns:
        AC power, >= 0, one per time.
    """
    t_ms = _checked_times(times_ms)
    up, east, north = _sun_vector(t_ms, solar.latitude_deg, solar.longitude_deg)
    above = up > 0.0
    cos_z = np.where(above, up, 1.0)
    ghi_clear = np.where(above, _HAURWITZ_A_W_M2 * cos_z * np.exp(-_HAURWITZ_B / cos_z), 0.0)
    index = np.ones(t_ms.size) if clear_sky else _clear_sky_index(_seconds_from_first(t_ms), solar.clouds, rng)
    ghi = ghi_clear * index
    diffuse_fraction = np.clip(
        _CLEAR_DIFFUSE_FRACTION + (1.0 - _CLEAR_DIFFUSE_FRACTION) * (1.0 - index),
        _CLEAR_DIFFUSE_FRACTION,
        1.0,
    )
    dhi = ghi * diffuse_fraction
    dni = (ghi - dhi) / np.maximum(cos_z, _MIN_COS_ZENITH_FOR_DNI)
    beta = math.radians(solar.tilt_deg)
    gamma = math.radians(solar.azimuth_deg)
    cos_aoi = up * math.cos(beta) + east * math.sin(beta) * math.sin(gamma) + north * math.sin(beta) * math.cos(gamma)
    poa = (
        dni * np.maximum(cos_aoi, 0.0)
        + dhi * (1.0 + math.cos(beta)) / 2.0
        + ghi * solar.albedo * (1.0 - math.cos(beta)) / 2.0
    )
    if ambient_c is None:
        derate = np.ones(t_ms.size)
    else:
        cell_c = np.asarray(ambient_c, dtype=np.float64) + poa * (solar.noct_c - 20.0) / 800.0
        derate = 1.0 + solar.temp_coeff_per_c * (cell_c - 25.0)
    dc_w = solar.dc_mw * _W_PER_MW * poa / 1000.0 * derate * (1.0 - solar.system_loss)
    return np.clip(dc_w * solar.inverter_efficiency, 0.0, solar.ac_mw * _W_PER_MW)


# --------------------------------------------------------------------------- data centre


@dataclass(frozen=True, slots=True, eq=False)
class DatacentreLoad:
    """The data centre's draw at each time (W): IT, cooling, and their sum."""

    total_w: FloatArray
    it_w: FloatArray
    cooling_w: FloatArray


def datacentre_load_w(
    times_ms: ArrayLike, load: LoadConfig, ambient_c: FloatArray, rng: np.random.Generator
) -> DatacentreLoad:
    """Return the GPU data centre's power draw at each time.

    Training slots switch between running and idle (Poisson starts and stops); a running
    job dips by ``checkpoint_depth`` for ``checkpoint_duration_s`` once per checkpoint
    period, counted from the job's start, so the dips of separate jobs are not aligned.
    Inference follows a daily cosine with slow multiplicative noise. Cooling is
    ``IT × (PUE − 1)``, PUE rising linearly with ambient within its bounds.

    Args:
        times_ms: event times, integer ms since the epoch, strictly increasing.
        load: the scenario's load section.
        ambient_c: ambient temperature at each time (°C).
        rng: the random generator.

    Returns:
        The total, IT and cooling power.
    """
    t_ms = _checked_times(times_ms)
    t_s = _seconds_from_first(t_ms)
    _, _, hour = _calendar(t_ms)
    slot_w = load.it_base_mw * _W_PER_MW * load.training_share / load.training_job_slots
    mean_busy_s = math.inf if load.job_stop_rate_per_h == 0.0 else _S_PER_H / load.job_stop_rate_per_h
    mean_idle_s = math.inf if load.job_start_rate_per_h == 0.0 else _S_PER_H / load.job_start_rate_per_h
    training = np.zeros(t_ms.size)
    for _slot in range(load.training_job_slots):
        busy, seg, seg_start = _two_state(t_s, mean_busy_s, mean_idle_s, rng)
        jitter = rng.uniform(-1.0, 1.0, seg_start.size) * load.checkpoint_period_jitter
        period = load.checkpoint_period_s * (1.0 + jitter)
        job_start = seg_start.copy()
        # A job running at the first sample started earlier, at a random checkpoint phase.
        job_start[0] = -period[0] * (1.0 + rng.random())
        elapsed = t_s - job_start[seg]
        p = period[seg]
        in_dip = busy & (elapsed >= p) & (np.mod(elapsed, p) < load.checkpoint_duration_s)
        level = np.where(busy, np.where(in_dip, 1.0 - load.checkpoint_depth, 1.0), load.idle_fraction)
        training += slot_w * level
    inference_w = load.it_base_mw * _W_PER_MW * (1.0 - load.training_share)
    daily = 1.0 + load.inference_diurnal_amplitude * np.cos(2.0 * np.pi * (hour - load.inference_peak_hour_utc) / 24.0)
    noise = _ou(t_s, load.inference_noise_tau_s, load.inference_noise_sd, rng)
    inference = inference_w * np.maximum(daily * (1.0 + noise), 0.0)
    it_w = training + inference
    pue = np.clip(
        load.pue_ref + load.pue_per_c * (np.asarray(ambient_c, dtype=np.float64) - load.pue_ref_ambient_c),
        load.pue_min,
        load.pue_max,
    )
    cooling_w = it_w * (pue - 1.0)
    return DatacentreLoad(total_w=it_w + cooling_w, it_w=it_w, cooling_w=cooling_w)


# --------------------------------------------------------------------------- grid


def grid_available(times_ms: ArrayLike, grid: GridConfig, rng: np.random.Generator) -> BoolArray:
    """Return whether the grid connection is up at each time.

    Up-times and outages alternate, both exponential; the mean outage is
    ``grid.mean_outage_h`` and the long-run share of up-time is ``grid.availability``.

    Args:
        times_ms: event times, integer ms since the epoch, strictly increasing.
        grid: the scenario's grid section.
        rng: the random generator.

    Returns:
        True where the grid is available.
    """
    t_ms = _checked_times(times_ms)
    if grid.availability >= 1.0:
        return np.ones(t_ms.size, dtype=np.bool_)
    if grid.availability <= 0.0:
        return np.zeros(t_ms.size, dtype=np.bool_)
    down_s = grid.mean_outage_h * _S_PER_H
    up_s = down_s * grid.availability / (1.0 - grid.availability)
    on, _, _ = _two_state(_seconds_from_first(t_ms), up_s, down_s, rng)
    return on


@dataclass(frozen=True, slots=True, eq=False)
class GridBalance:
    """How the site balances after the battery (W; arrays broadcast from the inputs).

    Attributes:
        grid_w: grid power, positive on import.
        unserved_w: load that neither the battery nor the grid could serve (>= 0).
        curtailed_w: surplus that the battery could not absorb and the grid could not
            export, i.e. PV curtailment (>= 0).
    """

    grid_w: FloatArray
    unserved_w: FloatArray
    curtailed_w: FloatArray


def grid_power_w(
    load_w: ArrayLike,
    solar_w: ArrayLike,
    battery_w: ArrayLike,
    *,
    grid: GridConfig,
    available: ArrayLike,
) -> GridBalance:
    """Close the site balance with the grid, within its limits.

    The grid covers what solar and the battery leave, up to the import limit, and takes
    any surplus up to the export limit. When it is unavailable, or its limit is reached, a
    deficit becomes unserved load and a surplus becomes PV curtailment; both are reported,
    never hidden. ``load + curtailed = solar + battery + grid + unserved`` holds exactly
    (to rounding).

    Args:
        load_w: site load (data centre), >= 0.
        solar_w: PV output, >= 0.
        battery_w: battery power actually delivered, positive on discharge.
        grid: the scenario's grid section.
        available: whether the grid is up.

    Returns:
        Grid power, unserved load and curtailment.
    """
    residual = np.asarray(load_w, dtype=np.float64) - np.asarray(solar_w) - np.asarray(battery_w)
    up = np.asarray(available, dtype=np.float64)
    import_w = grid.import_limit_mw * _W_PER_MW * up
    export_w = grid.export_limit_mw * _W_PER_MW * up
    g = np.clip(residual, -export_w, import_w)
    return GridBalance(
        grid_w=g,
        unserved_w=np.maximum(residual - g, 0.0),
        curtailed_w=np.maximum(g - residual, 0.0),
    )


def battery_request_w(
    load_w: ArrayLike,
    solar_w: ArrayLike,
    site_soc: ArrayLike,
    *,
    policy: DispatchPolicy,
    grid: GridConfig,
    grid_available: ArrayLike,
) -> FloatArray:
    """Return the power the policy asks of the battery (positive = discharge).

    The battery serves ``load − solar`` first. Without ``charge_from_solar_first``, surplus
    PV is exported first and only the rest is offered to the battery. With
    ``grid_charging_allowed``, while the grid is up and the site SoC is below
    ``target_soc``, the battery is also asked to charge from the grid's spare import
    capacity. The reserve floor is applied per pack by :func:`dispatch` through the energy
    each pack has above it.

    Args:
        load_w: site load.
        solar_w: PV output.
        site_soc: the site's energy-weighted SoC (fraction).
        policy: the scenario's dispatch policy.
        grid: the scenario's grid section.
        grid_available: whether the grid is up.

    Returns:
        The requested battery power, broadcast from the inputs.
    """
    net = np.asarray(load_w, dtype=np.float64) - np.asarray(solar_w, dtype=np.float64)
    up = np.asarray(grid_available, dtype=np.bool_)
    request = net.copy()
    if not policy.charge_from_solar_first:
        export_w = grid.export_limit_mw * _W_PER_MW * up
        request = np.where(net < 0.0, np.minimum(net + export_w, 0.0), net)
    if policy.grid_charging_allowed:
        import_w = grid.import_limit_mw * _W_PER_MW
        charging = up & (np.asarray(site_soc, dtype=np.float64) < policy.target_soc)
        request = np.where(charging, np.minimum(request, net - import_w), request)
    return np.asarray(request, dtype=np.float64)


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True, slots=True, eq=False)
class DispatchResult:
    """Per-pack power for one step.

    Attributes:
        pack_power_w: power of each pack, positive on discharge; zero for excluded packs.
        unserved_w: the part of the request the packs could not take, with the request's
            sign (positive: discharge shortfall; negative: charge that could not be absorbed).
            ``pack_power_w.sum() + unserved_w == request_w`` to rounding.
    """

    pack_power_w: FloatArray
    unserved_w: float


_MIN_WEIGHT_WH: Final = 1e-6


def _water_fill(total: float, weight: FloatArray, cap: FloatArray) -> tuple[FloatArray, float]:
    """Share ``total`` in proportion to ``weight``, no share above its ``cap``.

    Exact water-filling without iteration: a pack clips at the fill level ``cap/weight``;
    sorting those levels gives the delivered power as a piecewise-linear function of the
    level, and the level that delivers ``total`` is found with one search.

    Returns:
        (shares, shortfall): shortfall > 0 only when every eligible pack is at its cap.
    """
    eligible = (weight > 0.0) & (cap > 0.0)
    w = weight[eligible]
    c = cap[eligible]
    out = np.zeros(weight.size)
    cap_sum = float(c.sum())
    if total <= 0.0 or w.size == 0:
        return out, max(total, 0.0)
    if total >= cap_sum:
        out[eligible] = c
        return out, total - cap_sum
    # Fill level at which each pack clips. A pack with a vanishing weight may overflow it;
    # the largest finite float then stands in for "never clips".
    with np.errstate(over="ignore", divide="ignore"):
        level = np.minimum(c / w, np.finfo(np.float64).max)
    order = np.argsort(level, kind="stable")
    lv = level[order]
    cum_c = np.cumsum(c[order])
    # Weight of the packs from k on, summed directly rather than as total minus a prefix, so a
    # small remainder is not lost to cancellation.
    tail_w = np.concatenate((np.cumsum(w[order][::-1])[::-1], [0.0]))
    # Power delivered at fill level lv[k]: packs 0..k clipped, the rest at lv[k]·w.
    with np.errstate(over="ignore"):
        delivered = cum_c + lv * tail_w[1:]
    k = min(int(np.searchsorted(delivered, total, side="left")), lv.size - 1)
    c_before = float(cum_c[k - 1]) if k > 0 else 0.0
    # The packs from k on share what the clipped ones leave, in proportion to weight.
    out[eligible] = np.minimum(c, (total - c_before) * (w / tail_w[k]))
    return out, 0.0


def dispatch(
    request_w: float,
    *,
    discharge_energy_wh: ArrayLike,
    charge_headroom_wh: ArrayLike,
    max_discharge_w: ArrayLike,
    max_charge_w: ArrayLike,
    excluded: ArrayLike,
    dt_s: float | None = None,
) -> DispatchResult:
    """Split one step's battery request among the packs.

    Discharge is shared in proportion to each pack's energy above the reserve floor,
    charge in proportion to its headroom, so the packs empty and fill together. A pack
    never exceeds its power limit (nor, given ``dt_s``, the energy it has for this step);
    power a clipped pack cannot take goes to the others (water-filling). Excluded packs
    (faulted, offline, contactor open) and packs with non-finite inputs get zero.

    Args:
        request_w: the battery power wanted, positive on discharge.
        discharge_energy_wh: per pack, energy available above the reserve floor (Wh).
        charge_headroom_wh: per pack, energy it can still take (Wh).
        max_discharge_w: per pack, discharge power limit (W, >= 0).
        max_charge_w: per pack, charge power limit as a magnitude (W, >= 0).
        excluded: per pack, True to leave it out.
        dt_s: the step length; if given, a pack's power is also capped at its energy
            (or headroom) divided by the step.

    Returns:
        Per-pack power and the unserved remainder.

    Raises:
        ValueError: arrays of different shapes, or a non-finite request.
    """
    energy = np.asarray(discharge_energy_wh, dtype=np.float64)
    headroom = np.asarray(charge_headroom_wh, dtype=np.float64)
    p_dis = np.asarray(max_discharge_w, dtype=np.float64)
    p_chg = np.asarray(max_charge_w, dtype=np.float64)
    skip = np.asarray(excluded, dtype=np.bool_)
    if not (energy.ndim == 1 and energy.shape == headroom.shape == p_dis.shape == p_chg.shape == skip.shape):
        msg = "per-pack arrays must be 1-D and of one length"
        raise ValueError(msg)
    if not math.isfinite(request_w):
        msg = f"request_w must be finite, got {request_w}"
        raise ValueError(msg)
    discharging = request_w >= 0.0
    weight = energy if discharging else headroom
    cap = p_dis if discharging else p_chg
    if dt_s is not None:
        cap = np.minimum(cap, np.maximum(weight, 0.0) * _S_PER_H / dt_s)
    # A weight below a microwatt-hour is an empty pack; subnormal weights would overflow the
    # fill levels of the water-filling.
    usable = ~skip & np.isfinite(weight) & np.isfinite(cap) & (weight > _MIN_WEIGHT_WH)
    weight = np.where(usable, weight, 0.0)
    cap = np.where(usable, np.maximum(cap, 0.0), 0.0)
    share, shortfall = _water_fill(abs(request_w), weight, cap)
    sign = 1.0 if discharging else -1.0
    return DispatchResult(pack_power_w=sign * share, unserved_w=sign * shortfall)


# --------------------------------------------------------------------------- whole site


@dataclass(frozen=True, slots=True, eq=False)
class SiteTrace:
    """The site's exogenous inputs over a horizon; arrays are read-only and of one length.

    Attributes:
        times_ms: event times, integer ms since the epoch, UTC.
        load_w: data-centre draw, IT plus cooling.
        it_load_w: IT (GPU servers, network, storage).
        cooling_w: data-centre cooling.
        solar_w: PV AC output.
        ambient_c: ambient air temperature.
        grid_available: whether the grid connection is up.
    """

    times_ms: IntArray
    load_w: FloatArray
    it_load_w: FloatArray
    cooling_w: FloatArray
    solar_w: FloatArray
    ambient_c: FloatArray
    grid_available: BoolArray

    def __post_init__(self) -> None:
        """Check the lengths and make every array read-only."""
        n = self.times_ms.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value.shape != n:
                msg = f"SiteTrace.{f.name} has shape {value.shape}, expected {n}"
                raise ValueError(msg)
            value.flags.writeable = False


def site_trace(
    scenario: Scenario,
    *,
    horizon_s: float,
    dt_s: float,
    start: datetime | None = None,
    rng: np.random.Generator | None = None,
) -> SiteTrace:
    """Generate the site's ambient, PV, load and grid availability for a horizon.

    Each part draws from its own child generator (spawned from ``rng``), so changing one
    model does not change the others' random streams.

    Args:
        scenario: the scenario.
        horizon_s: the length of the run, seconds.
        dt_s: the step, seconds.
        start: first time; the scenario's start by default.
        rng: the random generator; by default one seeded with ``scenario.seed``.

    Returns:
        The trace, evenly spaced at ``dt_s``.
    """
    times = time_grid_ms(scenario.start if start is None else start, horizon_s, dt_s)
    parent = np.random.default_rng(scenario.seed) if rng is None else rng
    rng_ambient, rng_solar, rng_load, rng_grid = parent.spawn(4)
    ambient = ambient_temp_c(times, scenario.climate, rng_ambient)
    solar = solar_power_w(times, scenario.solar, rng_solar, ambient_c=ambient)
    load = datacentre_load_w(times, scenario.load, ambient, rng_load)
    up = grid_available(times, scenario.grid, rng_grid)
    return SiteTrace(
        times_ms=times,
        load_w=load.total_w,
        it_load_w=load.it_w,
        cooling_w=load.cooling_w,
        solar_w=solar,
        ambient_c=ambient,
        grid_available=up,
    )
