"""Settings have one home with a clear precedence; fleet files expand deterministically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cityops.city import DISTRICTS
from cityops.registry import FleetError, load_fleet
from cityops.settings import (
    DEFAULT_FLEET,
    SECRET_FIELDS,
    SERVICE_SECRETS,
    Settings,
    SettingsError,
    new_secret,
)


def test_env_overrides_config_file_overrides_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "cityops.toml"
    cfg.write_text('mqtt_port = 2000\nkafka_port = 3000\npg_database = "city"\n')
    s = Settings.load(env={"CITYOPS_MQTT_PORT": "4000", "CITYOPS_STATE_DIR": str(tmp_path)},
                      config_file=cfg)
    assert (s.mqtt_port, s.kafka_port, s.pg_database) == (4000, 3000, "city")
    assert s.kafka_bootstrap == "127.0.0.1:3000"
    assert s.pg_dsn.endswith(":15432/city")


def test_credentials_written_by_the_stack_are_read(tmp_path: Path) -> None:
    # (the retired shared sensor account of an older file is ignored, not an error)
    (tmp_path / "credentials.toml").write_text('mqtt_ingest_password = "s3cret"\n'
                                               'mqtt_sensor_password = "old"\n')
    s = Settings.load(env={"CITYOPS_STATE_DIR": str(tmp_path)})
    assert s.mqtt_ingest_password == "s3cret"
    # ...but an explicit environment value still wins.
    s = Settings.load(env={"CITYOPS_STATE_DIR": str(tmp_path),
                           "CITYOPS_MQTT_INGEST_PASSWORD": "env"})
    assert s.mqtt_ingest_password == "env"


def test_to_env_round_trips() -> None:
    s = Settings(mqtt_port=1234, pg_database="x", state_dir=Path("/tmp/somewhere"))
    assert Settings.load(env=s.to_env()) == s


@pytest.mark.parametrize(("env", "message"), [
    ({"CITYOPS_MQTT_PORT": "eleven"}, "mqtt_port"),
])
def test_bad_values_name_the_setting(env: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.load(env={**env, "CITYOPS_STATE_DIR": str(tmp_path)})


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("mqtt_prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'mqtt_prot'"):
        Settings.load(env={"CITYOPS_STATE_DIR": str(tmp_path)}, config_file=cfg)


def test_default_fleet_is_deterministic_and_covers_the_city() -> None:
    a, b = load_fleet(DEFAULT_FLEET), load_fleet(DEFAULT_FLEET)
    assert [s.sensor_id for s in a] == [s.sensor_id for s in b]
    assert len({s.sensor_id for s in a}) == len(a) > 100
    assert {s.district for s in a} == {d.code for d in DISTRICTS}
    assert {s.domain for s in a} == {"traffic", "security", "tourism"}
    assert a.get(a.sensors[0].sensor_id) == a.sensors[0]
    assert a.get("no-such-sensor") is None
    gateways = a.gateways()
    assert gateways and all(len(members) > 1 for members in gateways.values())


@pytest.mark.parametrize(("group", "message"), [
    ('domain = "weather"\ntype = "x"\nvendor = "y"\nlandmark = "ctu"\ncount = 1',
     "group #1: field 'domain'"),
    ('domain = "traffic"\ntype = "cctv"\nvendor = "saomai"\nlandmark = "ctu"\ncount = 1',
     "group #1: field 'type'"),
    ('domain = "traffic"\ntype = "lane_detector"\nvendor = "guardeye"\nlandmark = "ctu"\n'
     'count = 1', "group #1: field 'vendor'"),
    ('domain = "traffic"\ntype = "lane_detector"\nvendor = "saomai"\nlandmark = "moon"\n'
     'count = 1', "group #1: field 'landmark'"),
    ('domain = "traffic"\ntype = "lane_detector"\nvendor = "saomai"\nlandmark = "ctu"\n'
     'count = 0', "group #1: field 'count'"),
    ('domain = "traffic"\ntype = "lane_detector"\nvendor = "saomai"\nlandmark = "ctu"',
     "group #1: missing field 'count'"),
])
def test_fleet_errors_name_group_and_field(tmp_path: Path, group: str, message: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f"[[group]]\n{group}\n")
    with pytest.raises(FleetError, match=message):
        load_fleet(path)


# --- no default secret --------------------------------------------------------------------------
def test_known_defaults_are_weak_and_generated_secrets_are_not() -> None:
    s = Settings()
    assert set(s.default_secrets()) == set(SECRET_FIELDS)
    strong = s.replace(**{n: new_secret() for n in SECRET_FIELDS})
    assert strong.default_secrets() == []
    assert len({getattr(strong, n) for n in SECRET_FIELDS}) == len(SECRET_FIELDS)
    # the deploy examples' placeholders count as defaults too: copied unchanged, refused
    placeholders = s.replace(console_secret="replace-me-with-64-random-hex-characters",
                             pg_password="replacemepostgres", mqtt_ingest_password="Secret")
    assert {"console_secret", "pg_password", "mqtt_ingest_password"} <= set(
        placeholders.default_secrets())
    # a whole DSN given explicitly carries its own credentials
    assert "pg_password" not in s.replace(pg_dsn_override="postgresql://u:p@h/db"
                                          ).default_secrets()


@pytest.mark.parametrize("service", sorted(SERVICE_SECRETS))
def test_services_refuse_known_default_secrets_in_one_line(service: str, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "CITYOPS_STATE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "cityops.cli", service], env=env,
                         capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert f"refusing to start {service}" in line and "Traceback" not in line
    for name in SERVICE_SECRETS[service]:
        assert name in line and f"CITYOPS_{name.upper()}" in line
    assert "cityops stack up" in line and "CITYOPS_DEV_MODE" in line


def test_dev_mode_is_the_only_way_past_a_default() -> None:
    s = Settings()
    assert s.secrets_problem("console") is not None
    assert s.replace(dev_mode=True).secrets_problem("console") is None
    assert Settings.load(env={"CITYOPS_DEV_MODE": "true"}).dev_mode is True
    strong = s.replace(**{n: new_secret() for n in SECRET_FIELDS})
    assert all(strong.secrets_problem(svc) is None for svc in SERVICE_SECRETS)
