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
import secrets
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FLEET = PROJECT_ROOT / "simulators" / "fleets" / "default.toml"
DEFAULT_RULES = PROJECT_ROOT / "alerts" / "rules" / "default.yaml"
CREDENTIALS_FILE = "credentials.toml"

# The settings that are secrets. None has a usable default: the local stack generates them
# once per installation (``cityops stack up`` -> credentials.toml), production passes them
# from its secret store (deploy/compose/.env, the Kubernetes ``cityops-secrets`` Secret).
SECRET_FIELDS = ("mqtt_ingest_password", "mqtt_admin_password", "pg_password",
                 "console_secret", "webhook_secret")
# Settings that existed once and may still sit in an older credentials.toml: the shared
# sensor account is gone (every device has its own identity, cityops/devices.py).
RETIRED_FIELDS = frozenset({"mqtt_sensor_user", "mqtt_sensor_password"})
# Which secrets each service reads (deploy/env.yaml has the full list of what it reads).
# `simulate` reads none: it logs in as the devices themselves (cityops/devices.py).
SERVICE_SECRETS: dict[str, tuple[str, ...]] = {
    "ingest": ("mqtt_ingest_password",),
    "process": ("pg_password",),
    "alerts": ("pg_password",),
    "console": ("console_secret", "pg_password"),
}
# Secrets a service needs only while a feature is on: secret -> the setting that turns the
# feature on (non-empty). An installation without a webhook receiver needs no webhook secret.
FEATURE_SECRETS: dict[str, dict[str, str]] = {
    "alerts": {"webhook_secret": "webhook_url"},
}
# Values anyone can guess because they are in this source tree, its history, the deploy
# examples or every tutorial: a service refuses to start with one of them (outside
# dev_mode), so a forgotten setting can never mean a forgeable session or an open broker.
KNOWN_DEFAULT_SECRETS = frozenset({
    "", "cityops-dev-secret-change-me", "sensors-dev", "ingest-dev", "ops-dev",
    "secret", "changeme", "change-me", "changeit", "password", "passw0rd", "admin", "test",
    "dev", "postgres", "cityops", "mosquitto", "sensors", "ingest", "ops",
    "replace-me-sensors", "replace-me-ingest", "replace-me-ops", "replacemepostgres",
    "replace-me-with-64-random-hex-characters", "replace-me-webhook",
})


def new_secret() -> str:
    """A fresh random secret (256 bits), safe inside a connection URL and as an argument:
    token_urlsafe's alphabet is URL-safe, and a leading '-' would read as an option to
    ``mosquitto_passwd``, so such draws are skipped."""
    while True:
        value = secrets.token_urlsafe(32)
        if not value.startswith("-"):
            return value


def is_default_secret(value: str) -> bool:
    """True if ``value`` is a well-known value rather than a secret (case-insensitive)."""
    return value.strip().lower() in KNOWN_DEFAULT_SECRETS


@dataclass(frozen=True, slots=True)
class Topics:
    """Kafka topic names: one per stream the pipeline carries."""

    events: str = "cityops.events"
    deadletter: str = "cityops.deadletter"
    aggregates: str = "cityops.aggregates"
    alerts: str = "cityops.alerts"
    # internal to the alerts workers: the inputs of rules spanning sensors, keyed by scope
    # (``alerts.scope``); as many partitions as the events topic
    alerts_scoped: str = "cityops.alerts.scoped"
    # incident changes (alerts/incidents), keyed by incident id: consoles and notifiers
    incidents: str = "cityops.incidents"

    def all(self) -> tuple[str, ...]:
        return (self.events, self.deadletter, self.aggregates, self.alerts, self.alerts_scoped,
                self.incidents)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a cityops process needs to find and talk to the rest of the city."""

    host: str = "127.0.0.1"
    state_dir: Path = PROJECT_ROOT / ".state"
    # Downloads kept outside the repository and shared by every clone and run on this
    # machine (the Kafka broker's jars): $XDG_CACHE_HOME/cityops or ~/.cache/cityops.
    cache_dir: Path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cityops"

    # --- MQTT (Mosquitto) --------------------------------------------------------
    mqtt_port: int = 11883
    mqtt_topic_root: str = "city"
    mqtt_share_group: str = "cityops-ingest"
    mqtt_ingest_user: str = "ingest"
    mqtt_ingest_password: str = "ingest-dev"
    mqtt_admin_user: str = "ops"
    mqtt_admin_password: str = "ops-dev"
    mqtt_max_queued: int = 1_000_000

    # --- Kafka ------------------------------------------------------------------
    kafka_port: int = 19092
    kafka_controller_port: int = 19093  # the local KRaft controller's own listener
    kafka_partitions: int = 6
    # Local topics keep 6 hours: room to ride out an outage and to replay, small enough
    # that a day of demo traffic stays a few GB (deploy/ sets 7 days in production).
    kafka_retention_ms: int = 6 * 3600 * 1000
    kafka_heap_mb: int = 1024  # local broker heap (-Xms/-Xmx): a 2-core, 24 GiB box
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
    console_secret: str = "cityops-dev-secret-change-me"  # known default: see SECRET_FIELDS
    console_session_s: int = 12 * 3600  # console login lifetime (a night shift)
    # the language a user sees until they pick one (alerts/i18n: vi, en) and the time zone
    # every time is shown in, whatever the browser's
    console_lang: str = "vi"
    console_timezone: str = "Asia/Ho_Chi_Minh"
    # a MapLibre style URL (the city's own tile server); empty: the shipped Can Tho GeoJSON
    # only, which works offline
    console_map_style_url: str = ""

    # --- Alerts (rules -> alert lifecycle; see alerts/service.py) ----------------------
    alerts_group: str = "cityops-alerts"  # Kafka consumer group of `cityops alerts`
    # rule state + offsets checkpoint period. Each writes only what changed (alerts/slots.py);
    # a kill -9 replays at most this much of the events topic (alert writes are idempotent).
    alerts_checkpoint_s: float = 5.0
    # How long after a window's end (by the sensor's event-time clock, alerts/watermark.py)
    # a late or out-of-order reading still counts in the windows the rules compute
    # (alerts/windows.py, rules with `input: rollup_1m`); later ones are dropped and counted.
    alerts_window_lateness_s: float = 10.0
    alerts_update_every_s: float = 5.0  # at most one "updated" change per alert this often
    alerts_escalate_after_s: float = 300.0  # critical + unacknowledged this long: escalate

    # --- Webhook for critical incidents (alerts/incidents/webhook.py) ------------------
    # Each incident that opens at or rises to critical is POSTed once to this URL (signed
    # with webhook_secret, X-Cityops-Signature), retried on transient failures with capped,
    # jittered back-off (ingest.backoff) and given up after webhook_max_attempts tries.
    webhook_url: str = ""  # the receiver; empty: no webhook (nothing is sent)
    webhook_secret: str = ""  # HMAC-SHA256 key shared with the receiver; see SECRET_FIELDS
    webhook_timeout_s: float = 5.0  # one attempt, connect to last byte of the answer
    webhook_max_attempts: int = 8  # then the notification is marked failed
    webhook_retry_first_s: float = 1.0  # back-off after the first failed attempt
    webhook_retry_cap_s: float = 60.0  # longest back-off between attempts

    # --- Ingest (MQTT -> normalize -> Kafka; see ingest/service.py) -------------------
    ingest_transport: str = "asyncio"  # MQTT client: asyncio (lean) | paho-thread | aiomqtt
    ingest_batch_max: int = 2000  # MQTT messages normalized and produced as one batch
    ingest_batch_linger_ms: int = 5  # how long a partial batch waits for more messages
    ingest_inflight_max: int = 20_000  # received-not-yet-acked MQTT messages (the bounded queue)
    ingest_max_payload_bytes: int = 256 * 1024  # larger payloads -> dead letter too_large
    ingest_late_ms: int = 2 * 60 * 1000  # older than this on arrival -> Quality.LATE
    ingest_too_old_ms: int = 24 * 3600 * 1000  # older -> dead letter too_old
    ingest_future_ms: int = 5 * 60 * 1000  # further ahead -> dead letter in_future
    ingest_dedup_window_s: int = 600  # same event id again within this window -> dropped
    # Which event contract ingest produces (ingest/contract.py): 1 = one JSON event per
    # reading per Kafka record; 2 = one columnar EventBatch record per MQTT message (and,
    # for single-reading messages, per Kafka partition per batch). The processor and the
    # alerts decode both (consumers upgrade first); 1 is for a consumer of another agency
    # that reads only the JSON events.
    ingest_contract_version: int = 2
    ingest_dedup_max_ids: int = 2_000_000  # memory bound of the duplicate window
    ingest_session_expiry_s: int = 3600  # MQTT persistent session kept this long offline
    ingest_reconnect_min_ms: int = 100  # first MQTT reconnect / Kafka retry delay (jittered)
    ingest_reconnect_max_ms: int = 2_000  # backoff cap (short: see ingest/mqtt.py)
    # How workers subscribe (trade-off in ingest/mqtt.py): "shared" = one $share
    # subscription split by Mosquitto (elastic scale-out; an unplanned broker restart
    # loses what arrives before ingest re-subscribes) | "districts" = plain persistent
    # subscriptions to <root>/<district>/# for this worker's districts (a broker restart
    # loses nothing; scale-out by district, every worker configured with the same count).
    ingest_subscription: str = "shared"
    ingest_workers: int = 1  # districts mode: how many workers split the districts
    ingest_worker_index: int = 0  # districts mode: this worker's slot, 0..ingest_workers-1
    kafka_compression: str = "zstd"  # producer codec: zstd | lz4 | gzip | snappy | none
    kafka_linger_ms: int = 5
    kafka_idempotent: bool = True  # ingest producer idempotence (acks=all; see ingest/kafka.py)
    kafka_max_batch_bytes: int = 1024 * 1024
    # Consumers (processors, alerts): the broker holds a fetch until this many bytes are
    # ready or the wait has passed. Under load a fetch then brings KiBs of records, not
    # whatever arrived since the previous one: fewer requests, each encoded and parsed in
    # Python by aiokafka (its fetcher was 21% of the alerts worker's CPU at 8,000 msg/s).
    # The wait is also what an idle consumer costs: 100 ms took the idle stack from 4.5%
    # to 7.7% of a core (bench/idle.py), so it stays at 500 ms, aiokafka's default; a
    # quiet stream can add up to that to a record's way, a busy one (~16 KiB in well under
    # 100 ms at 2,000 msg/s of contract-v2 records) hardly anything.
    kafka_fetch_min_bytes: int = 16 * 1024
    kafka_fetch_max_wait_ms: int = 500

    # --- Processors (Kafka -> database + numpy rollups; see processors/service.py) -----
    process_group: str = "cityops-processors"  # Kafka consumer group of `cityops process`
    process_batch_max: int = 5000  # Kafka messages per database transaction (at most)
    process_batch_linger_ms: int = 200  # how long a partial batch waits for more messages
    # Plain mode: rollup windows are computed once, when closed (processors/windows.py):
    # when every active events partition is this far past their end in event time
    # (readings of a window arriving later are late data, recomputed per cell), checked
    # every process_close_every_s. A window nobody touched for process_close_quiet_s is
    # computed even while open (a quiet city's rollups stay current).
    process_window_grace_1m_s: float = 10.0
    process_window_grace_1h_s: float = 120.0
    process_close_every_s: float = 2.0
    process_close_quiet_s: float = 30.0
    process_maintenance_interval_s: float = 3600.0  # partitions ahead/retention, timescale jobs
    # sensor_latest is flushed from in-memory arrays at most this often (and on a clean
    # stop), not upserted per batch; a crash loses at most this much latest-state change,
    # which the sensors' next readings restore (processors/latest.py).
    process_latest_flush_s: float = 2.0
    # Rollup partials (JSON, one per window x sensor/district x metric and batch, ~9-12
    # Kafka records per event) to the aggregates topic, for consumers of other agencies.
    # Off by default: cityops' own alerts compute their windows from the events
    # (alerts/windows.py). The topic stays; turn this on where someone reads it.
    process_publish_rollups: bool = False
    # Kafka static membership (KIP-345): a restarted processor takes its old place in the
    # group at once. "auto" = "<hostname>-process-<process_metrics_port>" (unique per host,
    # stable across restarts); "" = dynamic membership.
    process_instance_id: str = "auto"

    # --- Production addresses (deploy/): one host locally, one per server in production -
    mqtt_host_override: str = ""  # MQTT broker host, e.g. "mosquitto"; empty means `host`
    mqtt_ca_file: str = ""  # CA bundle; when set, MQTT clients use TLS and verify the broker
    kafka_bootstrap_override: str = ""  # "kafka-1:9092,kafka-2:9092,..."; empty: host:kafka_port
    pg_host_override: str = ""  # database host, e.g. "timescaledb"; empty means `host`
    bind_host: str = "127.0.0.1"  # where /metrics, /healthz, the console listen (0.0.0.0 in pods)

    # --- Development ----------------------------------------------------------------
    # Lets a service start with a well-known default secret (a warning instead of a refusal).
    # Only for throwaway setups; the local stack and the demo need it not (they generate).
    dev_mode: bool = False

    # ------------------------------------------------------------------------------
    @property
    def mqtt_host(self) -> str:
        return self.mqtt_host_override or self.host

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap_override or f"{self.host}:{self.kafka_port}"

    @property
    def kafka_codec(self) -> str | None:
        """``compression_type`` for every producer of the project. The broker stores
        batches as the producer compressed them, so the codec saves disk, page cache and
        replication traffic as well as bandwidth (zstd: batches of events 2.3x smaller)."""
        codec = self.kafka_compression.lower()
        return None if codec in ("", "none") else codec

    @property
    def pg_dsn(self) -> str:
        if self.pg_dsn_override:
            return self.pg_dsn_override
        auth = self.pg_user + (f":{self.pg_password}" if self.pg_password else "")
        host = self.pg_host_override or self.host
        return f"postgresql://{auth}@{host}:{self.pg_port}/{self.pg_database}"

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

    def mqtt_tls_context(self) -> ssl.SSLContext | None:
        """TLS for MQTT clients when ``mqtt_ca_file`` is set (production brokers listen on
        8883 with TLS only), verifying the broker against that CA; None for plain MQTT.
        paho: ``client.tls_set_context(ctx)``; aiomqtt: ``Client(..., tls_context=ctx)``."""
        if not self.mqtt_ca_file:
            return None
        return ssl.create_default_context(cafile=self.mqtt_ca_file)

    def default_secrets(self, names: tuple[str, ...] = SECRET_FIELDS) -> list[str]:
        """Which of the secret settings ``names`` still hold a well-known value.

        ``pg_password`` is not needed when ``pg_dsn_override`` gives the whole DSN (the
        override carries its own credentials, or none by the operator's explicit choice).
        """
        found = []
        for name in names:
            if name == "pg_password" and self.pg_dsn_override:
                continue
            if is_default_secret(getattr(self, name)):
                found.append(name)
        return found

    def service_secrets(self, service: str) -> tuple[str, ...]:
        """The secrets ``service`` needs with these settings: those it always reads
        (SERVICE_SECRETS) and those of the features that are on (FEATURE_SECRETS)."""
        on = tuple(name for name, switch in FEATURE_SECRETS.get(service, {}).items()
                   if getattr(self, switch))
        return SERVICE_SECRETS.get(service, ()) + on

    def secrets_problem(self, service: str) -> str | None:
        """One line saying why ``service`` must not start with these settings, or None.

        Called by ``cityops <service>`` before anything else runs: a known default secret
        in production means a forgeable console session or an MQTT account anyone can use.
        """
        weak = self.default_secrets(self.service_secrets(service))
        if not weak or self.dev_mode:
            return None
        envs = ", ".join(f"CITYOPS_{n.upper()}" for n in weak)
        what = "is a well-known default" if len(weak) == 1 else "are well-known defaults"
        return (f"refusing to start {service}: {', '.join(weak)} {what}; "
                f"run `cityops stack up` (generates per-installation secrets) or set {envs} "
                "from your secret store (CITYOPS_DEV_MODE=true allows defaults for development)")

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
                    if k not in RETIRED_FIELDS:
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
        if isinstance(default, float):  # float settings (alerts timings)
            return float(raw)
        if isinstance(default, Path):
            return Path(raw).expanduser().absolute()
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name!r}: cannot use {raw!r} ({exc})") from exc
