"""Settings have one home with a clear precedence; fleet files expand deterministically."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityops.city import DISTRICTS
from cityops.registry import FleetError, load_fleet
from cityops.settings import DEFAULT_FLEET, Settings, SettingsError


def test_env_overrides_config_file_overrides_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "cityops.toml"
    cfg.write_text('mqtt_port = 2000\nkafka_port = 3000\npg_database = "city"\n')
    s = Settings.load(env={"CITYOPS_MQTT_PORT": "4000", "CITYOPS_STATE_DIR": str(tmp_path)},
                      config_file=cfg)
    assert (s.mqtt_port, s.kafka_port, s.pg_database) == (4000, 3000, "city")
    assert s.kafka_bootstrap == "127.0.0.1:3000"
    assert s.pg_dsn.endswith(":15432/city")


def test_credentials_written_by_the_stack_are_read(tmp_path: Path) -> None:
    (tmp_path / "credentials.toml").write_text('mqtt_sensor_password = "s3cret"\n')
    s = Settings.load(env={"CITYOPS_STATE_DIR": str(tmp_path)})
    assert s.mqtt_sensor_password == "s3cret"
    # ...but an explicit environment value still wins.
    s = Settings.load(env={"CITYOPS_STATE_DIR": str(tmp_path),
                           "CITYOPS_MQTT_SENSOR_PASSWORD": "env"})
    assert s.mqtt_sensor_password == "env"


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
