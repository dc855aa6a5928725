"""Settings: loaded once at start-up from the environment and an optional TOML file, then frozen.

Precedence, highest first: command-line options, environment variables, the TOML file,
defaults. Environment variables are ``MGTWIN_`` plus the field path in upper case with
``__`` between levels, e.g. ``MGTWIN_INFLUX__URL`` or ``MGTWIN_INGEST__BATCH_MAX_MESSAGES``.
The TOML file is given with ``--config`` or ``MGTWIN_CONFIG`` and uses the same sections::

    site = "nevada"
    [mqtt]
    url = "mqtt://127.0.0.1:1883"
    [influx]
    url = "http://127.0.0.1:8086"
    database = "microgrid"

Unknown keys, in the file or among ``MGTWIN_*`` variables, are refused with a "did you
mean". Secrets (passwords, tokens) are :class:`pydantic.SecretStr`: they print as
``**********`` and never reach a log. They come only from the environment or from files
(``MGTWIN_INFLUX__PASSWORD_FILE=/run/secrets/influx``), never from the TOML file or the
command line.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from twin.contract import IDENTIFIER_PATTERN
from twin.errors import ConfigError

__all__ = [
    "DEFAULT_CHEMISTRY_ALERTS",
    "ENV_PREFIX",
    "AlertSettings",
    "ChemistryAlertSettings",
    "EstimationSettings",
    "HealthSettings",
    "InfluxSettings",
    "IngestSettings",
    "MqttSettings",
    "PublishSettings",
    "Settings",
    "env_names",
    "load_settings",
]

ENV_PREFIX: Final = "MGTWIN_"
_CONFIG_ENV: Final = "MGTWIN_CONFIG"
_SECRET_FIELDS: Final = frozenset({"password", "token"})

Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
_Section = ConfigDict(extra="forbid", frozen=True)


def _read_secret_file(path: Path | None) -> SecretStr | None:
    if path is None:
        return None
    try:
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        msg = f"cannot read secret file {path}: {exc.strerror}"
        raise ValueError(msg) from exc


class _WithSecrets(BaseModel):
    """A section whose ``password``/``token`` may come from ``*_file`` paths."""

    model_config = _Section

    @model_validator(mode="after")
    def _load_secret_files(self) -> _WithSecrets:
        for name in _SECRET_FIELDS:
            path = getattr(self, f"{name}_file", None)
            if path is not None and getattr(self, name, None) is None:
                object.__setattr__(self, name, _read_secret_file(path))
        return self


def _check_url(value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        msg = f"{value!r} is not a URL of the form {schemes[0]}://HOST:PORT"
        raise ValueError(msg)
    if parts.password:
        msg = "credentials do not belong in a URL: use the environment or a secret file"
        raise ValueError(msg)
    return value


class MqttSettings(_WithSecrets):
    """The MQTT broker and the twin's session on it."""

    url: str = Field(default="mqtt://127.0.0.1:1883", description="mqtt:// or mqtts:// (TLS) URL of the broker.")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    client_id: str | None = Field(default=None, description="Fixed client id; default mgtwin-{site}.")
    protocol: Literal["3.1.1", "5"] = "5"
    qos: Literal[0, 1] = 1
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Field(ge=0)] = 7 * 24 * 3600
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0
    # After the broker handed our session to another client with the same id (MQTT 5 "session
    # taken over"), wait this long before reconnecting, so two copies cannot kick each other in a loop.
    takeover_backoff_s: Annotated[float, Field(ge=1, le=3600)] = 60.0
    # Follow the broker's $SYS dropped-messages counter: export it, alert when it grows.
    broker_stats: bool = True
    # Folder of the single-instance lock (one lock file per client id and broker); default
    # $XDG_RUNTIME_DIR/mgtwin, else mgtwin-<uid> in the temporary folder.
    lock_dir: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, ("mqtt", "mqtts"))


class InfluxSettings(_WithSecrets):
    """InfluxDB: 1.x through ``/write`` (api v1), or 2.x/3.x/Cloud through ``/api/v2/write``."""

    url: str | None = Field(default=None, description="http(s)://HOST:PORT; no InfluxDB output when unset.")
    api: Literal["v1", "v2"] = "v1"
    database: Identifier = "microgrid"
    retention_policy: str | None = None
    org: str | None = None
    bucket: str | None = Field(default=None, description="v2 bucket; default: the database name.")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10.0
    retry_max_s: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, ("http", "https"))


class IngestSettings(BaseModel):
    """Micro-batching and data-quality rules of the ingest."""

    model_config = _Section
    batch_max_messages: Annotated[int, Field(ge=1, le=1_000_000)] = 5000
    batch_max_age_s: Annotated[float, Field(gt=0, le=60)] = 0.25
    queue_max_messages: Annotated[int, Field(ge=10)] = 200_000
    stale_after_s: Annotated[float, Field(gt=0)] = 30.0
    late_window_s: Annotated[float, Field(ge=0)] = 10.0
    max_clock_skew_s: Annotated[float, Field(gt=0)] = 300.0
    max_packs: Annotated[int, Field(ge=1)] = 5000


class PublishSettings(BaseModel):
    """How often the twin publishes its state on MQTT."""

    model_config = _Section
    interval_s: Annotated[float, Field(gt=0)] = 5.0
    expiry_s: Annotated[int, Field(ge=1)] = 120
    change_threshold: Annotated[float, Field(ge=0)] = 0.02


class HealthSettings(BaseModel):
    """The health and metrics HTTP endpoint (loopback unless configured otherwise)."""

    model_config = _Section
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9108


class EstimationSettings(BaseModel):
    """Estimator options shared by live and replay."""

    model_config = _Section
    reserve_floor_soc: Annotated[float, Field(ge=0, lt=1)] = 0.10
    eol_soh_new: Annotated[float, Field(gt=0, lt=1)] = 0.70
    eol_soh_second_life: Annotated[float, Field(gt=0, lt=1)] = 0.60


# --------------------------------------------------------------------------- alerts (issue 6)


class ChemistryAlertSettings(BaseModel):
    """Alert thresholds of one cell chemistry; cell voltages are per series cell group.

    The defaults are warning levels inside the cells' limits (:mod:`twin.chemistry`: NMC and
    LMO 2.5-3.0 to 4.2 V, LFP 2.0 to 3.6 V), so the twin warns before a BMS trips.
    ``imbalance_v`` bounds the extreme cell's deviation from the pack's mean cell voltage;
    the defaults sit above the natural spread of the emulated packs (second-life nmc532 up
    to 0.09 V, lmo 0.09 V once a month of daily cycles has taken it below 30 % SoC under
    load, nmc811 and lfp under 0.03 V at cell level) and below a weak
    cell's (0.11-0.16 V).
    """

    model_config = _Section
    cell_overvoltage_v: Annotated[float, Field(gt=0, le=5.5)] = 4.20
    cell_undervoltage_v: Annotated[float, Field(gt=0, le=5.5)] = 3.00
    cell_voltage_hysteresis_v: Annotated[float, Field(ge=0, le=1)] = 0.05
    over_temperature_c: Annotated[float, Field(gt=-60, le=200)] = 50.0
    temperature_hysteresis_c: Annotated[float, Field(ge=0, le=50)] = 3.0
    temperature_rise_c_per_min: Annotated[float, Field(gt=0, le=100)] = 1.0
    current_limit_factor: Annotated[float, Field(gt=0, le=10)] = 1.05
    imbalance_v: Annotated[float, Field(gt=0, le=2)] = 0.08
    imbalance_hysteresis_v: Annotated[float, Field(ge=0, le=1)] = 0.02

    @model_validator(mode="after")
    def _check(self) -> ChemistryAlertSettings:
        if self.cell_undervoltage_v + self.cell_voltage_hysteresis_v >= self.cell_overvoltage_v:
            msg = "cell_undervoltage_v plus the hysteresis must stay below cell_overvoltage_v"
            raise ValueError(msg)
        if self.imbalance_hysteresis_v >= self.imbalance_v:
            msg = "imbalance_hysteresis_v must be smaller than imbalance_v"
            raise ValueError(msg)
        return self


#: Per-chemistry defaults; "default" serves a pack whose chemistry is unknown or not listed.
DEFAULT_CHEMISTRY_ALERTS: Final[dict[str, dict[str, float]]] = {
    "nmc811": {"cell_overvoltage_v": 4.20, "cell_undervoltage_v": 3.00, "imbalance_v": 0.06},
    "nmc532": {"cell_overvoltage_v": 4.20, "cell_undervoltage_v": 3.00, "imbalance_v": 0.10},
    "lmo": {"cell_overvoltage_v": 4.20, "cell_undervoltage_v": 3.00, "imbalance_v": 0.10},
    "lfp": {"cell_overvoltage_v": 3.60, "cell_undervoltage_v": 2.50, "imbalance_v": 0.05},
    "default": {"cell_overvoltage_v": 4.20, "cell_undervoltage_v": 2.50, "imbalance_v": 0.08},
}


class AlertSettings(BaseModel):
    """Alerts: thresholds with hysteresis and minimum duration, residuals, data quality (see twin.alerts).

    ``chemistry`` maps a chemistry name (or ``default``) to its thresholds. Entries given in
    the file or the environment are merged field by field over the defaults, so
    ``[alerts.chemistry.lfp]`` with ``imbalance_v = 0.05`` changes that one threshold.
    """

    model_config = _Section
    enabled: bool = True
    evaluate_every_s: Annotated[float, Field(ge=1, le=300)] = 10.0
    min_duration_s: Annotated[float, Field(ge=0)] = 30.0
    clear_duration_s: Annotated[float, Field(ge=0)] = 60.0
    chemistry: dict[str, ChemistryAlertSettings] = Field(
        default_factory=lambda: {k: ChemistryAlertSettings(**v) for k, v in DEFAULT_CHEMISTRY_ALERTS.items()}
    )
    stuck_after_s: Annotated[float, Field(gt=0)] = 300.0
    telemetry_loss_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2
    thermal_residual_c: Annotated[float, Field(gt=0)] = 2.0
    voltage_residual_v: Annotated[float, Field(gt=0)] = 0.02
    energy_balance_fraction: Annotated[float, Field(gt=0, le=1)] = 0.002
    energy_balance_min_w: Annotated[float, Field(ge=0)] = 500.0

    @field_validator("chemistry", mode="before")
    @classmethod
    def _merge_defaults(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            return value
        merged: dict[str, object] = {k: dict(v) for k, v in DEFAULT_CHEMISTRY_ALERTS.items()}
        for name, given in value.items():
            entry = given.model_dump(exclude_unset=True) if isinstance(given, ChemistryAlertSettings) else given
            base = merged.get(str(name), DEFAULT_CHEMISTRY_ALERTS["default"])
            if isinstance(entry, Mapping) and isinstance(base, Mapping):
                merged[str(name)] = {**base, **entry}
            else:
                merged[str(name)] = entry
        return merged


# --------------------------------------------------------------------------- end of alerts


_toml_file: ContextVar[Path | None] = ContextVar("_toml_file", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file named by ``--config`` or ``MGTWIN_CONFIG``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _toml_file.get()
        if path is None:
            return {}
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            msg = f"cannot read config file {path}: {exc.strerror}"
            raise ConfigError(msg) from exc
        except tomllib.TOMLDecodeError as exc:
            msg = f"config file {path} is not valid TOML: {exc}"
            raise ConfigError(msg) from exc
        _refuse_secrets(data, path)
        return data


def _refuse_secrets(data: Mapping[str, Any], path: Path, prefix: str = "") -> None:
    for key, value in data.items():
        if isinstance(value, Mapping):
            _refuse_secrets(value, path, f"{prefix}{key}.")
        elif key in _SECRET_FIELDS:
            env = f"{ENV_PREFIX}{prefix.replace('.', '__').upper()}{key.upper()}"
            msg = (
                f"{path}: '{prefix}{key}' is a secret and may not be written in the config file; "
                f"set {env} or {env}_FILE instead"
            )
            raise ConfigError(msg)


class Settings(BaseSettings):
    """All settings of the twin service, validated once and frozen."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )
    site: Identifier = "nevada"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings = InfluxSettings()
    ingest: IngestSettings = IngestSettings()
    publish: PublishSettings = PublishSettings()
    health: HealthSettings = HealthSettings()
    estimation: EstimationSettings = EstimationSettings()
    alerts: AlertSettings = AlertSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order the sources: init (command line) > environment > TOML file."""
        return init_settings, env_settings, _TomlSource(settings_cls)

    @property
    def client_id(self) -> str:
        """The MQTT client id: fixed, so that the broker keeps the session across restarts."""
        return self.mqtt.client_id or f"mgtwin-{self.site}"


def env_names() -> dict[str, str]:
    """Return every accepted environment variable, mapped to its dotted field path."""
    names: dict[str, str] = {_CONFIG_ENV: "config file"}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
            else:
                dotted = f"{prefix}{name}"
                names[ENV_PREFIX + dotted.replace(".", "__").upper()] = dotted

    walk(Settings, "")
    return names


def _check_environment(environ: Mapping[str, str]) -> None:
    known = env_names()
    for key in environ:
        upper = key.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            close = difflib.get_close_matches(upper, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            msg = f"unknown setting in the environment: {key}{hint}"
            raise ConfigError(msg)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "settings"
        if item["type"] == "extra_forbidden":
            known = list(env_names().values())
            close = difflib.get_close_matches(where, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown setting '{where}'{hint}")
        else:
            lines.append(f"{where}: {item['msg']}")
    return "invalid settings: " + "; ".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate the settings once.

    Args:
        config_file: a TOML file; defaults to ``$MGTWIN_CONFIG`` when set.
        **overrides: values from the command line, as nested dicts (``mqtt={"url": ...}``).
            ``None`` values are ignored so that unset options fall through.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: an unknown key, a bad value, a secret in the file, or an unreadable file.
    """
    _check_environment(os.environ)
    path = config_file or (Path(os.environ[_CONFIG_ENV]) if os.environ.get(_CONFIG_ENV) else None)
    cleaned = _drop_none(overrides)
    token = _toml_file.set(path)
    try:
        return Settings(**cleaned)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _toml_file.reset(token)


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out
