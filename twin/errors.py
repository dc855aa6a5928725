"""The exception tree of microgrid-twin.

Every error the twin raises on purpose derives from :class:`TwinError`, so a caller can
catch the family with one ``except``. Boundary modules (``twin/io/*``) translate their
libraries' exceptions into these types with ``raise ... from exc``.

::

    TwinError
    ├── ConfigError            settings that fail validation (unknown key, bad value)
    ├── ContractError          a payload or topic that breaks the MQTT contract
    │   ├── TopicError         a topic outside the contract, or a bad identifier in it
    │   └── PayloadError       a payload that is not JSON, has the wrong schema, types or ranges
    ├── ChemistryError         an unknown cell type, or a parameter set that is inconsistent
    ├── ScenarioError          an emulator scenario that fails validation
    └── ServiceError           a dependency (broker, database) that cannot be reached or refuses us
        ├── BrokerError
        └── DatabaseError
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ChemistryError",
    "ConfigError",
    "ContractError",
    "DatabaseError",
    "PayloadError",
    "ScenarioError",
    "ServiceError",
    "TopicError",
    "TwinError",
]


class TwinError(Exception):
    """Base of every error microgrid-twin raises on purpose."""


class ConfigError(TwinError):
    """Settings failed validation."""


class ContractError(TwinError):
    """A message or topic breaks the MQTT contract.

    Attributes:
        reason: a short machine-readable reason (``not_json``, ``bad_identifier``, ...),
            used as the dead-letter reason and as a counter label.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TopicError(ContractError):
    """A topic is outside the contract or carries a bad identifier."""


class PayloadError(ContractError):
    """A payload is not JSON, or has the wrong schema, version, types or ranges."""


class ChemistryError(TwinError):
    """An unknown cell type, or an inconsistent parameter set."""


class ScenarioError(TwinError):
    """An emulator scenario failed validation."""


class ServiceError(TwinError):
    """A dependency cannot be reached or refuses the twin."""


class BrokerError(ServiceError):
    """The MQTT broker cannot be reached or refused the connection."""


class DatabaseError(ServiceError):
    """InfluxDB cannot be reached or refused a request."""
