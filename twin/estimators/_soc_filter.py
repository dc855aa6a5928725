"""The SoC filter's recursion, compiled: one pass over each pack's new samples (see :mod:`twin.estimators.soc`).

:func:`run` is what :func:`twin.estimators.soc.step` calls. The filter is recursive in time, so
numpy could only vectorise it over packs and paid its call overhead at every sample (some
three hundred array operations per second of telemetry, 30 ms per minute of an 805-pack site).
Here each pack's state is loaded once, carried through its samples in local variables, and
written back: the arithmetic of the numpy filter it replaced, operation by operation (sums in
the order ``np.einsum`` added them), so results agree to rounding (on a 1 h replay of the
805-pack nevada site the final states differ by at most 2e-14), in 8 ms instead of 30 per
minute of the site's telemetry.

The model and its tuning are documented in :mod:`twin.estimators.soc`: the states
``[soc, v_rc1, v_rc2, hyst, current_offset, r_scale]``, the two extreme-cell trackers
``[offset, rate, resistance excess]``, the statistically linearised OCV, the correlated
model-error inflation and the centring of a pending SoC prior on the first reading.

Everything here is numbers: per-pack constants as arrays, the options as :class:`Consts`
(a named tuple of floats), the chemistries' tables stacked on one SoC grid.
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

import numpy as np
from numpy.typing import NDArray

from twin._jit import kernel

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]
B = NDArray[np.bool_]
IP = NDArray[np.intp]

GRID_POINTS: Final = 1001
"""Points of the common SoC grid the chemistries are tabulated on (0.1 % SoC steps)."""
KELVIN: Final = 273.15
N_STATES: Final = 6
# State indices: x = [soc, v_rc1_v, v_rc2_v, hyst, current_offset_a, r_scale].
SOC, V1, V2, HY, OFF, RS = 0, 1, 2, 3, 4, 5
N_CELL: Final = 3
CD, CR, CX = 0, 1, 2  # SoC offset from the mean, rate (d soc_cell / d soc_mean - 1), resistance excess
# Columns of the stacked tables (value and step to the next grid point, for interpolation).
OCV, DOCV, HYST, DHYST, RSOC = 0, 2, 4, 6, 8
N_COLS: Final = 10

NO_TS: Final = -1
CENTRE_SPAN: Final = 0.05  # half-width of the SoC span whose mean OCV slope is the reading's sensitivity
OPEN_SOC: Final = 0.05  # a first reading leaving the SoC open by more than this centres the prior on it
SOC_LO, SOC_HI = -0.2, 1.2  # the state may overshoot [0, 1] a little; outputs are clipped
R_SCALE_LO, R_SCALE_HI = 0.2, 10.0
#: How the usable share reads the extreme cells' rates (see ``soc._extreme_rates``): a weakest
#: cell up to twice as fast as the mean, a strongest one up to half as slow, a little slack
#: across zero; and the least usable share the coulomb count applies.
MAX_RATE: Final = 1.0
RATE_SLACK: Final = 0.02
MIN_USABLE_SHARE: Final = 0.75
CELL_OFFSET_LIMIT: Final = 0.5
CELL_RATE_LO, CELL_RATE_HI = -0.5, 1.5
CELL_R_LO, CELL_R_HI = -0.9, 9.0
SQRT3: Final = math.sqrt(3.0)
W0: Final = 2.0 / 3.0  # Gauss-Hermite weights of the nodes 0 and +-sqrt(3) sigma
W1: Final = 1.0 / 6.0
SL_MIN_HALF_WIDTH: Final = 0.005  # below this the secant is the local slope, smoothed over 1 % SoC
TINY: Final = 1e-12


class Consts(NamedTuple):
    """The options turned into what the filter adds and compares (variances per second, per unit, ...)."""

    soc_rw2_per_s: float
    offset_rw2_per_s: float
    r_rw2_per_s: float
    capacity2: float
    gap2_per_s2: float
    current2: float
    resistance2: float
    spread2: float
    ocv2: float
    cell_ocv2: float
    cell_rw2: float
    cell_rate_rw2: float
    cell_r_rw2_per_s: float
    hyst_error: float
    conn_frac: float
    max_gap_s: float
    ocv_error_corr_s: float
    ocv_error_corr_soc: float
    t_ref_k: float


class PackConsts(NamedTuple):
    """Per-pack constants of the active packs, ``(A,)`` arrays (``tf_*``: ``(A, J)``)."""

    row: IP
    inv_q_as: F64
    eta: F64
    tau_s: F64
    tau2_s: F64
    gamma: F64
    r0_ref_ohm: F64
    r1_ref_ohm: F64
    r2_ref_ohm: F64
    r_series_cell_ohm: F64
    tf_const: F64
    tf_slope: F64
    tf_knots: F64
    tf_changes: F64
    inv_series: F64
    v_low_v: F64
    v_high_v: F64
    r_voltage_white: F64
    r_cell_white: F64
    soc0_std: F64


class Samples(NamedTuple):
    """The batch as ``(K, A)`` grids; a pack's samples are rows ``0 .. count - 1`` of its column."""

    ts_ms: I64
    voltage_v: F64
    current_a: F64
    temp_c: F64
    cell_v_min_v: F64
    cell_v_max_v: F64


class InverseOcv(NamedTuple):
    """Each chemistry's OCV table for inversion, padded to one width: ``(C, L)`` and ``(C,)``."""

    ocv_v: F64
    soc: F64
    size: I64


@kernel
def _lookup(row: int, soc: float) -> tuple[int, float]:
    """The table row below ``soc`` (clipped to [0, 1]) and the fraction to the next."""
    s = min(max(soc, 0.0), 1.0) * (GRID_POINTS - 1)
    # Clamped on both sides: int(NaN) is the most negative integer, and a kernel does not check
    # its indices (a NaN SoC, from absurd inputs no contract check stopped, reads row 0).
    k = min(max(int(s), 0), GRID_POINTS - 2)
    return row + k, s - k


@kernel
def _col(table: F64, r: int, frac: float, c: int) -> float:
    value: float = table[r, c] + table[r, c + 1] * frac
    return value


@kernel
def temp_factor(slope: float, const: float, knots: F64, changes: F64, temp_c: float, t_ref_k: float) -> float:
    """A resistance factor ``R(T)/R(25 °C)`` in the chemistry's hinge form (see ``CellChemistry.temp_factor``).

    ``ln f = const + slope * u + sum_j changes_j * max(u - knots_j, 0)`` with
    ``u = 1/T - 1/T_ref``. Scalars and one pack's rows only: handing the kernels' named tuples
    of arrays to a helper per sample costs as much as the whole filter step.
    """
    u = 1.0 / (temp_c + KELVIN) - 1.0 / t_ref_k
    expo = slope * u
    for j in range(knots.size):
        if changes[j] != 0.0:
            expo += changes[j] * max(u - knots[j], 0.0)
    if const != 0.0:
        expo += const
    out: float = math.exp(expo)
    return out


@kernel
def _dot6(u: F64, v: F64) -> float:
    """``sum_j u[j] v[j]`` added as ``np.einsum`` adds six terms (0+2+4, 1+3+5, then both), as the numpy filter did."""
    out: float = ((u[0] * v[0] + u[2] * v[2]) + u[4] * v[4]) + ((u[1] * v[1] + u[3] * v[3]) + u[5] * v[5])
    return out


@kernel
def run(
    x: F64,
    cov: F64,
    cell_x: F64,
    cell_cov: F64,
    last_ts: I64,
    last_i: F64,
    last_t: F64,
    pending: B,
    counts: I64,
    out_counts: I64,
    s: Samples,
    pc: PackConsts,
    table: F64,
    inv: InverseOcv,
    k: Consts,
) -> None:
    """Run every active pack's filter over its samples, updating the arrays in place.

    Args:
        x, cov, cell_x, cell_cov: the active packs' states (``(A, 6)``, ``(A, 6, 6)``,
            ``(A, 2, 3)``, ``(A, 2, 3, 3)``).
        last_ts, last_i, last_t: their last sample's time, current (held) and temperature.
        pending: packs whose SoC prior is still to be centred on their first valid reading
            (cleared as it is).
        counts: ``(A,)`` new samples per pack.
        out_counts: ``(A, 3)`` intervals found to be gaps, samples skipped, samples processed.
        s: the samples; pc: per-pack constants; table: the stacked tables; inv: the OCV
        tables for inversion; k: the options' constants.
    """
    hrow = np.empty(N_STATES)
    ph = np.empty(N_STATES)
    dvec = np.ones(N_STATES)
    cvec = np.zeros(N_STATES)
    qvec = np.zeros(N_STATES)
    g = np.empty((N_STATES, N_STATES))
    post = np.empty((N_STATES, N_STATES))
    cph = np.empty(N_CELL)
    for a in range(x.shape[0]):
        row = pc.row[a]
        soc, vrc1, vrc2, hy, off, rs = x[a, 0], x[a, 1], x[a, 2], x[a, 3], x[a, 4], x[a, 5]
        p = cov[a]
        cx = cell_x[a]
        cp = cell_cov[a]
        ts_prev, i_prev, t_prev = last_ts[a], last_i[a], last_t[a]
        tf_args = (pc.tf_slope[a], pc.tf_const[a], pc.tf_knots[a], pc.tf_changes[a])
        tf = temp_factor(*tf_args, t_prev, k.t_ref_k)
        waiting = pending[a]
        n_gap = 0
        n_skip = 0
        dt_seen, a1, one_a1, a2, one_a2 = math.nan, 1.0, 0.0, 1.0, 0.0
        for j in range(counts[a]):
            # -- prediction over dt with the held current -------------------------------------
            dt = (s.ts_ms[j, a] - ts_prev) * 1e-3 if ts_prev != NO_TS else 0.0
            gap = dt > k.max_gap_s
            n_gap += gap
            i_true = i_prev - off
            eff = pc.eta[a] if i_true < 0.0 else 1.0
            share = _usable_share(soc, cx)
            dt_q = dt * pc.inv_q_as[a] * share
            dsoc = -eff * i_true * dt_q
            r_, f_ = _lookup(row, soc)
            scale = _col(table, r_, f_, RSOC) * tf
            r1 = pc.r1_ref_ohm[a] * scale
            r2 = pc.r2_ref_ohm[a] * scale
            if dt != dt_seen:  # regular telemetry repeats its interval: the RC decays are reused
                dt_seen = dt
                x1 = -dt / pc.tau_s[a]
                x2 = -dt / pc.tau2_s[a]
                a1 = math.exp(x1)
                one_a1 = -math.expm1(x1)
                a2 = math.exp(x2)
                one_a2 = -math.expm1(x2)
            f = math.exp(-pc.gamma[a] * abs(i_true) * dt_q)
            sgn = np.sign(i_true)
            soc = soc + dsoc
            g1 = one_a1 * r1
            g2 = one_a2 * r2
            vrc1 = a1 * vrc1 + g1 * i_true
            vrc2 = a2 * vrc2 + g2 * i_true
            cvec[SOC] = eff * dt_q
            cvec[V1] = -g1
            cvec[V2] = -g2
            cvec[HY] = f * pc.gamma[a] * dt_q * sgn * (hy + sgn)
            hy = f * hy - (1.0 - f) * sgn
            dvec[V1] = a1
            dvec[V2] = a2
            dvec[HY] = f
            abs_dsoc = abs(dsoc)
            gap_var = k.gap2_per_s2 * dt * dt if gap else 0.0
            i_var = k.current2 + k.resistance2 * i_true * i_true
            qvec[SOC] = k.current2 * (eff * dt_q) ** 2 + k.capacity2 * abs_dsoc + k.soc_rw2_per_s * dt + gap_var
            qvec[V1] = g1 * g1 * i_var
            qvec[V2] = g2 * g2 * i_var  # zero without a slow pair: that state stays at zero
            qvec[HY] = (k.hyst_error * (1.0 - f)) ** 2
            qvec[OFF] = k.offset_rw2_per_s * dt
            qvec[RS] = k.r_rw2_per_s * dt
            # P' = F P F^T + Q with F = diag(d) + c e_off^T: G = F P, then P' = G F^T.
            for r in range(N_STATES):
                for c in range(N_STATES):
                    g[r, c] = dvec[r] * p[r, c] + cvec[r] * p[OFF, c]
            for r in range(N_STATES):
                for c in range(N_STATES):
                    p[r, c] = g[r, c] * dvec[c] + g[r, OFF] * cvec[c]
                p[r, r] += qvec[r]
            # The extreme cells' offsets move with their rates: d' = d + rate * dsoc.
            for e in range(2):
                cx[e, CD] += cx[e, CR] * dsoc
                for c in range(N_CELL):
                    cp[e, CD, c] += dsoc * cp[e, CR, c]
                for r in range(N_CELL):
                    cp[e, r, CD] += dsoc * cp[e, r, CR]
                cp[e, CD, CD] += k.cell_rw2 * abs_dsoc
                cp[e, CR, CR] += k.cell_rate_rw2 * abs_dsoc
                cp[e, CX, CX] += k.cell_r_rw2_per_s * dt

            # -- measurement update -----------------------------------------------------------
            i_k, t_k = s.current_a[j, a], s.temp_c[j, a]
            i_ok = math.isfinite(i_k)
            t_now = t_k if math.isfinite(t_k) else t_prev
            i_now = i_k if i_ok else i_prev
            y = s.voltage_v[j, a] * pc.inv_series[a]
            valid = i_ok and math.isfinite(y) and y > pc.v_low_v[a] and y < pc.v_high_v[a]
            if waiting and valid:
                soc = _centre_prior(a, soc, p, y, i_now - off, vrc1 + vrc2, hy, rs, t_now, pc, table, inv, k)
                waiting = False
            r_, f_ = _lookup(row, soc)
            ocv = _col(table, r_, f_, OCV)
            amp = _col(table, r_, f_, HYST)
            # Statistical linearisation of the OCV over the SoC prior (3-point Gauss-Hermite).
            var = max(p[SOC, SOC], 0.0)
            half = max(SQRT3 * math.sqrt(var), SL_MIN_HALF_WIDTH)
            rl, fl = _lookup(row, soc - half)
            rh, fh = _lookup(row, soc + half)
            ocv_lo = _col(table, rl, fl, OCV)
            ocv_hi = _col(table, rh, fh, OCV)
            ocv_mean = W0 * ocv + W1 * (ocv_lo + ocv_hi)
            slope = (ocv_hi - ocv_lo) / (2.0 * half)
            spread = W0 * (ocv - ocv_mean) ** 2 + W1 * ((ocv_lo - ocv_mean) ** 2 + (ocv_hi - ocv_mean) ** 2)
            r_lin = max(spread - slope * slope * var, 0.0)
            tf_now = tf if t_now == t_prev else temp_factor(*tf_args, t_now, k.t_ref_k)
            r0 = pc.r0_ref_ohm[a] * _col(table, r_, f_, RSOC) * tf_now  # per unit of the resistance scale
            i_true = i_now - off
            drop = r0 * i_true + vrc1 + vrc2  # ohmic and RC drop per unit scale
            r_ser = pc.r_series_cell_ohm[a]
            innov = y - (ocv_mean + amp * hy - rs * drop - r_ser * i_true)
            hrow[SOC] = slope + _col(table, r_, f_, DHYST) * hy
            hrow[V1] = -rs
            hrow[V2] = -rs
            hrow[HY] = amp
            hrow[OFF] = rs * r0 + r_ser
            hrow[RS] = -drop
            # Model errors are biases that decorrelate after ocv_error_corr_soc of SoC travel or
            # ocv_error_corr_s of time: the samples in between count as one.
            corr = min(
                k.ocv_error_corr_s / (dt if dt > 0.0 else k.ocv_error_corr_s),
                k.ocv_error_corr_soc / max(abs_dsoc, TINY),
            )
            corr = max(corr, 1.0)
            soc_pre, rs_pre = soc, rs
            # An invalid reading updates nothing (the numpy filter's zero gain); the clips and the
            # symmetrisation apply to every sample, as they did there.
            if valid:
                r_meas = pc.r_voltage_white[a] + (k.ocv2 + k.resistance2 * (rs * drop) ** 2) * corr + r_lin
                for r in range(N_STATES):
                    ph[r] = _dot6(p[r], hrow)
                s_inn = _dot6(hrow, ph)
                gain = 1.0 / (s_inn + r_meas)
                soc = soc + ph[SOC] * gain * innov
                vrc1 = vrc1 + ph[V1] * gain * innov
                vrc2 = vrc2 + ph[V2] * gain * innov
                hy = hy + ph[HY] * gain * innov
                off = off + ph[OFF] * gain * innov
                rs = rs + ph[RS] * gain * innov
                for r in range(N_STATES):
                    for c in range(N_STATES):
                        post[r, c] = p[r, c] - ph[r] * gain * ph[c]
            else:
                n_skip += 1
                post[:, :] = p
            soc = min(max(soc, SOC_LO), SOC_HI)
            hy = min(max(hy, -1.0), 1.0)
            rs = min(max(rs, R_SCALE_LO), R_SCALE_HI)
            # Keep the covariance exactly symmetric (rounding would skew it over millions of steps).
            for r in range(N_STATES):
                for c in range(N_STATES):
                    p[r, c] = (post[r, c] + post[c, r]) * 0.5

            # The extreme cells, from cell_v - y (the shared OCV level, hysteresis and most of
            # the drop cancel): cell_v - y = OCV(soc + d) - OCV(soc) - m * dr + (connector +
            # series) drop, with m the mean cell's drop (the cells' share).
            if valid:
                m_cell = rs_pre * (r0 * (1.0 - k.conn_frac) * i_true + vrc1 + vrc2)
                outside = (rs_pre * r0 * k.conn_frac + r_ser) * i_true
                r_cell = pc.r_cell_white[a] + (k.cell_ocv2 + k.spread2 * m_cell * m_cell) * corr
                var_soc = p[SOC, SOC] * corr
                for e in range(2):
                    z = (s.cell_v_min_v[j, a] if e == 0 else s.cell_v_max_v[j, a]) - y
                    if math.isfinite(z):
                        cell = (soc_pre, ocv, slope, var_soc, m_cell, outside, r_cell)
                        _correct_cell(cx[e], cp[e], cph, z, row, cell, table)
            # The weakest cell sits at or below the mean, the strongest at or above.
            cx[0, CD] = min(max(cx[0, CD], -CELL_OFFSET_LIMIT), 0.0)
            cx[1, CD] = min(max(cx[1, CD], 0.0), CELL_OFFSET_LIMIT)
            for e in range(2):
                cx[e, CR] = min(max(cx[e, CR], CELL_RATE_LO), CELL_RATE_HI)
                cx[e, CX] = min(max(cx[e, CX], CELL_R_LO), CELL_R_HI)
            ts_prev = s.ts_ms[j, a]
            i_prev = i_now
            t_prev = t_now
            tf = tf_now
        x[a, 0], x[a, 1], x[a, 2], x[a, 3], x[a, 4], x[a, 5] = soc, vrc1, vrc2, hy, off, rs
        last_ts[a], last_i[a], last_t[a] = ts_prev, i_prev, t_prev
        pending[a] = waiting
        out_counts[a, 0] = n_gap
        out_counts[a, 1] = n_skip
        out_counts[a, 2] = counts[a]


@kernel
def _usable_share(soc: float, cx: F64) -> float:
    """The string's usable capacity over its mean cell's: held + room of ``soc._held_room``, rates on their sides."""
    rate_min, rate_max = cx[0, CR], cx[1, CR]
    if not (-RATE_SLACK <= rate_min <= MAX_RATE and -MAX_RATE <= rate_max <= RATE_SLACK):
        return 1.0  # trackers that make no sense leave the count on the string's capacity
    s_min, s_max = min(max(soc + cx[0, CD], 0.0), 1.0), min(max(soc + cx[1, CD], 0.0), 1.0)
    k_min = 1.0 / (1.0 + min(max(rate_min, 0.0), MAX_RATE))
    k_max = 1.0 / (1.0 + min(max(rate_max, -MAX_RATE), 0.0))
    # Empty when the first cell is, full when the first is (see ``soc._held_room``).
    held = min(s_min * k_min, s_max * k_max)
    room = min((1.0 - s_min) * k_min, (1.0 - s_max) * k_max)
    share: float = min(max(held + room, MIN_USABLE_SHARE), 1.0)
    return share


@kernel
def _correct_cell(
    cx: F64,
    p: F64,
    ph: F64,
    z: float,
    row: int,
    mean: tuple[float, float, float, float, float, float, float],
    table: F64,
) -> None:
    """Update one extreme cell (``cx``: its three states, ``p``: their covariance) with ``z = cell_v - y``.

    The mean SoC's own error moves ``OCV(soc + d) - OCV(soc)`` by the difference of the two
    slopes: a slowly varying error (``var_soc`` is its variance times the correlation factor),
    large where the cell is on a steep end of a flat OCV and the mean on the plateau.

    ``mean``: the mean cell's SoC, OCV and OCV slope before the update, that SoC's variance
    times the correlation factor, the cells' share of the drop, the drop outside the cells and
    the measurement variance. ``ph``: scratch of three.
    """
    soc, ocv, slope, var_soc, m_cell, outside, r_cell = mean
    r_, f_ = _lookup(row, soc + cx[CD])
    ocv_cell = _col(table, r_, f_, OCV)
    slope_cell = table[r_, OCV + 1] * (GRID_POINTS - 1)
    pred = ocv_cell - ocv - m_cell * cx[CX] + outside
    # H = [slope_cell, 0, -m]: P H^T from two columns of P.
    for r in range(N_CELL):
        ph[r] = p[r, CD] * slope_cell - p[r, CX] * m_cell
    s = slope_cell * ph[CD] - m_cell * ph[CX]
    s += r_cell + (slope_cell - slope) ** 2 * var_soc
    gain = 1.0 / s
    innov = (z - pred) * gain
    for r in range(N_CELL):
        cx[r] += ph[r] * innov
    # P -= P H^T H P / s, formed from the outer product so it stays exactly symmetric.
    for r in range(N_CELL):
        for c in range(N_CELL):
            p[r, c] -= ph[r] * ph[c] * gain


@kernel
def _centre_prior(
    a: int,
    soc: float,
    p: F64,
    y: float,
    i_true: float,
    vrc: float,
    hy: float,
    rs: float,
    t_now: float,
    pc: PackConsts,
    table: F64,
    inv: InverseOcv,
    k: Consts,
) -> float:
    """Centre pack ``a``'s SoC prior on its first valid reading where it matters; return the SoC.

    See ``SocEstimator``: where the reading pins the SoC (a sloped OCV) the prior stays; on
    the LFP plateau it is centred on the OCV the measurement model gives for the reading
    (with the filter's own RC voltages and hysteresis state), read through the chemistry's
    table. Its spread is the OCV table's error and the hysteresis state's spread over the
    OCV's mean slope within 5 % of the centre, at most ``soc0_std``; its correlations start
    at zero.
    """
    row = pc.row[a]
    chem = row // GRID_POINTS
    size = inv.size[chem]
    known = y + rs * vrc + pc.r_series_cell_ohm[a] * i_true
    tf = temp_factor(pc.tf_slope[a], pc.tf_const[a], pc.tf_knots[a], pc.tf_changes[a], t_now, k.t_ref_k)
    centre = 0.5
    for _ in range(2):
        r_, f_ = _lookup(row, centre)
        ocv = known + pc.r0_ref_ohm[a] * _col(table, r_, f_, RSOC) * tf * rs * i_true - _col(table, r_, f_, HYST) * hy
        centre = np.interp(ocv, inv.ocv_v[chem, :size], inv.soc[chem, :size])
    lo, hi = min(max(centre - CENTRE_SPAN, 0.0), 1.0), min(max(centre + CENTRE_SPAN, 0.0), 1.0)
    rh, fh = _lookup(row, hi)
    rl, fl = _lookup(row, lo)
    secant = (_col(table, rh, fh, OCV) - _col(table, rl, fl, OCV)) / (hi - lo)
    rc, fc = _lookup(row, centre)
    amp = _col(table, rc, fc, HYST)
    hy_var = max(p[HY, HY], 0.0)
    spread_v = math.sqrt(k.ocv2 + amp * amp * hy_var + pc.r_voltage_white[a])
    if not spread_v > OPEN_SOC * secant:
        return soc
    for j in range(N_STATES):
        p[SOC, j] = 0.0
        p[j, SOC] = 0.0
    std0 = min(spread_v / max(secant, TINY), pc.soc0_std[a])
    p[SOC, SOC] = std0 * std0
    centred: float = centre
    return centred
