"""What the packs' sensors and BMSs report: noise, quantisation, offsets, a drifting coulomb counter.

The twin sees only these readings, never the physics' true state.

* Pack voltage: Gaussian noise, 0.1 V resolution. Current: a per-pack offset (the main
  cause of coulomb-counting drift) plus noise, 0.1 A resolution. Temperatures: several
  sensors per pack, each with a fixed placement offset, noise and the BMS's resolution
  (1 °C is common); the hottest sensor also sees the pack's internal gradient, which
  grows with the heat it dissipates.
* Cell voltages: noise and quantisation (1 mV is common for cell monitoring ICs).
* BMS SoC: a coulomb counter on the *measured* current, dividing by the capacity the BMS
  believes (rated × its own SoH, which second-life BMSs often get wrong, e.g. reset to
  100 %), with a slow random drift; it resynchronises to 100 % when a cell reaches the
  top of charge and to 0 % when one reaches the bottom, as production BMSs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from emulators.scenario import SensorConfig

__all__ = ["FAULT_BITS", "N_TEMP_SENSORS", "BmsModel", "SensorModel", "quantise"]

F64 = NDArray[np.float64]

#: Bits of the telemetry's ``fault_bits`` as the emulated BMSs set them.
FAULT_BITS: Final = {
    "over_temperature": 1,
    "cell_overvoltage": 2,
    "cell_undervoltage": 4,
    "contactor_open": 8,
    "sensor_fault": 16,
}
N_TEMP_SENSORS: Final = 6
#: Spread of the temperature sensors' placement offsets (K) and the internal gradient per
#: watt of heat relative to the pack's heat transfer (K per K of mean rise).
_PLACEMENT_SD_C: Final = 0.6
_GRADIENT_SHARE: Final = 0.5
#: Where each temperature sensor sits, from the cooling plate (-0.5) to the cells' core (1).
_SENSOR_POSITION: Final = np.linspace(-0.5, 1.0, N_TEMP_SENSORS)[None, :]


def quantise(x: F64, step: float, *, out: F64 | None = None) -> F64:
    """Round ``x`` to the sensor's resolution ``step`` (no rounding when ``step`` is 0).

    With ``out`` (which may be ``x``), the result is written there instead of a new array.
    """
    if step <= 0:
        if out is None or out is x:
            return x
        out[...] = x
        return out
    if out is None:
        rounded: F64 = np.round(x / step) * step
        return rounded
    np.divide(x, step, out=out)
    np.round(out, out=out)
    np.multiply(out, step, out=out)
    return out


@dataclass
class SensorModel:
    """Per-pack sensor errors that persist (offsets), drawn once; noise is drawn per sample."""

    config: SensorConfig
    current_offset_a: F64
    temp_offsets_c: F64  # (P, N_TEMP_SENSORS)

    @classmethod
    def draw(cls, config: SensorConfig, n_packs: int, rng: np.random.Generator) -> SensorModel:
        """Draw the persistent errors of ``n_packs`` packs."""
        return cls(
            config=config,
            current_offset_a=config.current_offset_sd_a * rng.standard_normal(n_packs),
            temp_offsets_c=_PLACEMENT_SD_C * rng.standard_normal((n_packs, N_TEMP_SENSORS)),
        )

    def pack_voltage(self, v: F64, rng: np.random.Generator) -> F64:
        """Measured pack voltage (V)."""
        return quantise(v + self.config.pack_voltage_noise_v * rng.standard_normal(v.shape), 0.1)

    def current(self, i: F64, rng: np.random.Generator) -> F64:
        """Measured current (A), positive on discharge."""
        noisy = i + self.current_offset_a + self.config.current_noise_a * rng.standard_normal(i.shape)
        return quantise(noisy, 0.1)

    def cell_voltage(self, v: F64, rng: np.random.Generator, *, out: F64 | None = None) -> F64:
        """Measured cell-group voltages (V), any shape.

        With ``out`` (a float64 array of ``v``'s shape, which may be ``v`` itself), the
        result is written there: the same values, without temporaries of that size.
        """
        if out is None:
            noisy = v + self.config.cell_voltage_noise_v * rng.standard_normal(v.shape)
            return quantise(noisy, self.config.cell_voltage_quantum_v)
        if out is v:
            noise = rng.standard_normal(v.shape)
            noise *= self.config.cell_voltage_noise_v
            np.add(v, noise, out=out)
        else:
            rng.standard_normal(out=out)
            out *= self.config.cell_voltage_noise_v
            np.add(v, out, out=out)
        return quantise(out, self.config.cell_voltage_quantum_v, out=out)

    def temperatures(self, temp_c: F64, rise_c: F64, rng: np.random.Generator) -> F64:
        """Measured sensor temperatures (P, N_TEMP_SENSORS) from the lumped temperature.

        ``rise_c`` is the pack's heat over its heat transfer (K): sensors near the cells'
        core read up to half of it above the lumped mean, those near the cooling plate less.
        """
        gradient = _GRADIENT_SHARE * np.maximum(rise_c, 0.0)[:, None] * _SENSOR_POSITION
        noisy = temp_c[:, None] + self.temp_offsets_c + gradient
        noisy = noisy + self.config.temp_noise_c * rng.standard_normal(noisy.shape)
        return quantise(noisy, self.config.temp_quantum_c)


@dataclass
class BmsModel:
    """The packs' own SoC and SoH figures, as their BMSs compute them."""

    soc: F64
    believed_capacity_ah: F64
    soh_reported: F64
    drift_per_s: F64

    @classmethod
    def start(
        cls,
        soc: F64,
        rated_ah: F64,
        soh_reported: F64,
        config: SensorConfig,
        rng: np.random.Generator,
    ) -> BmsModel:
        """Start the counters at the true usable SoC plus a small initial error."""
        initial = np.clip(soc + 0.01 * rng.standard_normal(soc.shape), 0.0, 1.0)
        drift = config.bms_soc_drift_per_h / 3600.0 * rng.standard_normal(soc.shape)
        return cls(
            soc=initial,
            believed_capacity_ah=rated_ah * soh_reported,
            soh_reported=soh_reported.copy(),
            drift_per_s=drift,
        )

    def update(self, measured_a: F64, dt_s: float, *, at_top: NDArray[np.bool_], at_bottom: NDArray[np.bool_]) -> None:
        """Count the measured charge and resynchronise at the ends of charge."""
        self.soc -= measured_a * dt_s / 3600.0 / self.believed_capacity_ah
        self.soc += self.drift_per_s * dt_s
        np.clip(self.soc, 0.0, 1.0, out=self.soc)
        self.soc[at_top] = 1.0
        self.soc[at_bottom] = 0.0
