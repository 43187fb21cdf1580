"""The one home of cityops configuration.

Every service reads its settings from here and nowhere else. Values come from, in
order of precedence: environment variables (``CITYOPS_<FIELD>``, upper case), an
optional TOML file (``CITYOPS_CONFIG`` or ``cityops.toml`` in the working
directory), the credentials file written by ``cityops stack up`` in the state
folder, and finally defaults that point at the local stack on 127.0.0.1.

The default ports sit in the 11xxx-19xxx range so the local stack never clashes
with system services (PostgreSQL 5432, Mosquitto 1883, Kafka 9092, Prometheus 9090).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FLEET = PROJECT_ROOT / "simulators" / "fleets" / "default.toml"
DEFAULT_RULES = PROJECT_ROOT / "alerts" / "rules" / "default.yaml"
CREDENTIALS_FILE = "credentials.toml"


@dataclass(frozen=True, slots=True)
class Topics:
    """Kafka topic names: one per stream the pipeline carries."""

    events: str = "cityops.events"
    deadletter: str = "cityops.deadletter"
    aggregates: str = "cityops.aggregates"
    alerts: str = "cityops.alerts"

    def all(self) -> tuple[str, ...]:
        return (self.events, self.deadletter, self.aggregates, self.alerts)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a cityops process needs to find and talk to the rest of the city."""

    host: str = "127.0.0.1"
    state_dir: Path = PROJECT_ROOT / ".state"

    # --- MQTT (Mosquitto) --------------------------------------------------------
    mqtt_port: int = 11883
    mqtt_topic_root: str = "city"
    mqtt_share_group: str = "cityops-ingest"
    mqtt_sensor_user: str = "sensors"
    mqtt_sensor_password: str = "sensors-dev"
    mqtt_ingest_user: str = "ingest"
    mqtt_ingest_password: str = "ingest-dev"
    mqtt_admin_user: str = "ops"
    mqtt_admin_password: str = "ops-dev"
    mqtt_max_queued: int = 1_000_000

    # --- Kafka ------------------------------------------------------------------
    kafka_port: int = 19092
    kafka_partitions: int = 6
    kafka_retention_ms: int = 30 * 60 * 1000
    topics: Topics = field(default_factory=Topics)

    # --- PostgreSQL / TimescaleDB ----------------------------------------------------
    pg_port: int = 15432
    pg_database: str = "cityops"
    pg_user: str = "postgres"
    pg_password: str = ""
    pg_dsn_override: str = ""
    storage_mode: str = "auto"  # auto | timescale | postgres
    retention_days: int = 30

    # --- Prometheus and service metrics ports ------------------------------------
    prometheus_port: int = 19090
    ingest_metrics_port: int = 19101
    process_metrics_port: int = 19102
    alerts_metrics_port: int = 19103
    simulate_metrics_port: int = 19104
    console_port: int = 18080

    # --- Domain files -----------------------------------------------------------
    fleet_file: Path = DEFAULT_FLEET
    rules_file: Path = DEFAULT_RULES

    # --- Console ------------------------------------------------------------------
    console_secret: str = "cityops-dev-secret-change-me"

    # ------------------------------------------------------------------------------
    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def pg_dsn(self) -> str:
        if self.pg_dsn_override:
            return self.pg_dsn_override
        auth = self.pg_user + (f":{self.pg_password}" if self.pg_password else "")
        return f"postgresql://{auth}@{self.host}:{self.pg_port}/{self.pg_database}"

    @property
    def metrics_ports(self) -> dict[str, int]:
        """Where each long-running service exposes ``/metrics`` (Prometheus scrapes these)."""
        return {
            "ingest": self.ingest_metrics_port,
            "process": self.process_metrics_port,
            "alerts": self.alerts_metrics_port,
            "simulate": self.simulate_metrics_port,
            "console": self.console_port,
        }

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """These settings as ``CITYOPS_*`` variables, for starting a child service with them."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Topics):
                continue  # topic names are not overridable per process
            env[f"CITYOPS_{f.name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value))
        return env

    @classmethod
    def load(
        cls,
        env: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> Settings:
        """Build settings from defaults, credentials, config file and environment."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or (Path(env["CITYOPS_CONFIG"]) if env.get("CITYOPS_CONFIG") else None)
        if path is None and Path("cityops.toml").is_file():
            path = Path("cityops.toml")
        if path is not None:
            if not path.is_file():
                raise SettingsError(f"config file {path} does not exist")
            with path.open("rb") as fh:
                values.update(tomllib.load(fh))
        for f in fields(cls):
            key = f"CITYOPS_{f.name.upper()}"
            if key in env:
                values[f.name] = env[key]
        state_dir = Path(values.get("state_dir", PROJECT_ROOT / ".state"))
        creds = state_dir / CREDENTIALS_FILE
        if creds.is_file():
            with creds.open("rb") as fh:
                for k, v in tomllib.load(fh).items():
                    values.setdefault(k, v)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Coerce strings (from env or TOML) to the declared field types."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, raw in values.items():
            if name not in known:
                raise SettingsError(f"unknown setting {name!r}")
            default = getattr(cls(), name)
            kwargs[name] = _coerce(name, raw, default)
        return cls(**kwargs)


class SettingsError(ValueError):
    """A setting is unknown or has a value of the wrong type."""


def _coerce(name: str, raw: Any, default: Any) -> Any:
    try:
        if isinstance(default, Topics):
            return raw if isinstance(raw, Topics) else Topics(**dict(raw))
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, Path):
            return Path(raw).expanduser().absolute()
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name!r}: cannot use {raw!r} ({exc})") from exc
