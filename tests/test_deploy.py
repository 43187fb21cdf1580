"""deploy/: the container image, the compose stack and the Kubernetes manifests.

No container engine or cluster runs here, so these tests read what an engine would read
and check what would otherwise only break at deploy time:

* deploy/env.yaml against ``cityops.settings.Settings`` (enumerated at test time, so a
  field added later fails here until deploy/ says who reads it), and every field each
  process reads is set, type-correct, for it in compose and in Kubernetes;
* every command an image runs is a real ``cityops`` subcommand (parsed by the CLI's own
  parser);
* host names and ports line up between the services, Kafka, the database, Prometheus
  scrape targets and Grafana data sources;
* compose.yaml against the Compose Specification schema, every manifest against the
  Kubernetes OpenAPI schemas (``kubernetes-validate``, offline); CRDs structurally;
* the Dockerfile's structure, and the image's health check run for real against a live
  ``/healthz``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cityops.cli import SERVICES, _load, build_parser
from cityops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "kubernetes"
OVERLAYS = ("base", "overlays/production", "overlays/loadtest")
K8S_VERSION = "1.30.0"
COMPILERS = ("gcc", "g++", "cc", "clang", "build-essential", "make", "cmake", "gfortran",
             "python3-dev", "libc6-dev", "cargo", "rustc")


# --- deploy/env.yaml ----------------------------------------------------------------------

@cache
def env_spec() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "env.yaml").read_text())


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(Settings)}


def env_var(field: str) -> str:
    return f"CITYOPS_{field.upper()}"


def processes() -> dict[str, dict[str, Any]]:
    """Services and jobs of env.yaml: name -> {reads, command?, http_port?}."""
    spec = env_spec()
    return {**spec["services"], **spec["jobs"]}


def cityops_processes() -> dict[str, dict[str, Any]]:
    """The processes that run the cityops image (they have a command)."""
    return {name: p for name, p in processes().items() if "command" in p}


def secret_fields() -> set[str]:
    return set(env_spec()["secrets"])


def test_env_spec_places_every_settings_field() -> None:
    spec = env_spec()
    fields = field_names()
    read = {f for p in processes().values() for f in p["reads"]}
    elsewhere = set(spec["defaults"]) | set(spec["not_in_production"])
    unplaced = fields - read - elsewhere
    assert not unplaced, (
        f"Settings fields {sorted(unplaced)} are not placed in deploy/env.yaml: add each to "
        "the `reads` of every service that uses it (and set it in deploy/compose/compose.yaml "
        "and deploy/kubernetes), or under `not_in_production` with the reason")
    unknown = (read | elsewhere | secret_fields() | set(spec["production_overrides"])) - fields
    assert not unknown, f"deploy/env.yaml names fields Settings does not have: {sorted(unknown)}"
    assert not (read & set(spec["not_in_production"])), "a field is both read and not in production"
    for name, p in processes().items():
        assert len(p["reads"]) == len(set(p["reads"])), f"{name}: a field is listed twice"
    for name, p in spec["services"].items():
        assert name in Settings().metrics_ports, f"{name} has no entry in Settings.metrics_ports"
        assert p["http_port"] in p["reads"]
        assert p["http_port"] == {v: k for k, v in _port_fields().items()}[name]
        assert "bind_host" in p["reads"], f"{name} must listen beyond 127.0.0.1 in a container"


def _port_fields() -> dict[str, str]:
    """metrics_ports key -> the Settings field behind it (found by changing each field)."""
    out = {}
    for f in dataclasses.fields(Settings):
        if not f.name.endswith("_port"):
            continue
        changed = Settings().replace(**{f.name: 1}).metrics_ports
        for svc, port in changed.items():
            if port == 1:
                out[f.name] = svc
    return out


def test_env_spec_commands_are_real_cityops_subcommands() -> None:
    for name, p in cityops_processes().items():
        args = parse_command(p["command"])
        assert args.command == p["command"][0], name
    for svc in env_spec()["services"]:
        assert svc in SERVICES, f"{svc} is not a cityops service"


@cache
def _parser() -> argparse.ArgumentParser:
    return build_parser()


def parse_command(argv: list[str]) -> argparse.Namespace:
    """Parse a container's command with the cityops CLI itself; fail on anything it rejects."""
    try:
        args = _parser().parse_args([str(a) for a in argv])
    except SystemExit as exc:
        raise AssertionError(f"`cityops {' '.join(argv)}` is not a valid command") from exc
    module = getattr(args, "_service_module", None)
    if module is not None:
        mod = _load(module)
        assert mod is not None and hasattr(mod, "run"), (
            f"`cityops {argv[0]}`: {module} has no run(); the image could not start it")
    return args


def check_process_env(where: str, name: str, env: dict[str, str], *,
                      secret_refs: set[str]) -> Settings:
    """The environment a cityops process gets: complete, type-correct, least privilege."""
    reads = set(processes()[name]["reads"])
    given = {k for k in env if k.startswith("CITYOPS_")}
    known = {env_var(f) for f in field_names()}
    missing = sorted(env_var(f) for f in reads if env_var(f) not in env)
    assert not missing, f"{where}: {name} reads {missing} but they are not set"
    unknown = sorted(given - known - {"CITYOPS_INGEST_WORKER_ID", "CITYOPS_CONFIG"})
    assert not unknown, f"{where}: {name} gets {unknown}: no such Settings field (typo?)"
    extra_secrets = sorted(env_var(f) for f in secret_fields() - reads if env_var(f) in given)
    assert not extra_secrets, f"{where}: {name} gets secrets it does not read: {extra_secrets}"
    for f in secret_fields() & reads:
        assert env_var(f) in secret_refs, (
            f"{where}: {name}'s {env_var(f)} must come from a secret, not a literal")
    settings = Settings.load(env=env)  # raises SettingsError on a value of the wrong type
    overrides = set(env_spec()["production_overrides"])
    for f in reads - overrides - secret_fields():
        if env_var(f) in env:
            assert getattr(settings, f) == getattr(Settings(), f), (
                f"{where}: {name} sets {f}={getattr(settings, f)!r} but Settings now defaults "
                f"to {getattr(Settings(), f)!r}: follow the default, or list {f} under "
                "production_overrides in deploy/env.yaml")
    for f in reads:
        if f.endswith("_port"):
            assert getattr(settings, f) != getattr(Settings(), f), (
                f"{where}: {name} keeps the local-stack default {f}={getattr(Settings(), f)}")
    return settings


# --- compose ------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}"
                  r"|\$([A-Za-z_][A-Za-z0-9_]*)")


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(value: Any, env: dict[str, str], seen: set[str]) -> Any:
    """Compose's variable substitution, as `docker compose config` applies it."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, seen) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        seen.add(name)
        val = env.get(name)
        if op in (":-", "-"):
            return (val if (val if op == ":-" else val is not None) else arg) or ""
        assert val, f"compose needs ${{{name}}}" + (f" ({arg})" if arg else "") + \
            " and deploy/compose/.env.example does not give it"
        return val

    return _VAR.sub(sub, value)


@cache
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


@cache
def compose_example_env() -> dict[str, str]:
    return read_env_file(COMPOSE_DIR / ".env.example")


@cache
def compose() -> dict[str, Any]:
    seen: set[str] = set()
    doc = interpolate(compose_raw(), compose_example_env(), seen)
    doc["x-variables-used"] = sorted(seen)
    return doc


def compose_env(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    assert isinstance(env, dict), f"compose {service}: write environment as a mapping"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def compose_secret_refs(service: str) -> set[str]:
    raw = compose_raw()["services"][service].get("environment", {})
    return {k for k, v in raw.items() if isinstance(v, str) and "${" in v}


def cityops_image_services() -> dict[str, dict[str, Any]]:
    image = compose_raw()["x-cityops"]["image"]
    return {n: s for n, s in compose_raw()["services"].items() if s.get("image") == image}


def shell_text(service: dict[str, Any]) -> str:
    parts = [*service.get("entrypoint", []), *service.get("command", [])]
    return "\n".join(str(p) for p in parts)


def test_compose_matches_the_compose_specification_schema() -> None:
    schema = json.loads((COMPOSE_DIR / "schema" / "compose-spec.json").read_text())
    doc = {k: v for k, v in compose().items() if k != "x-variables-used"}
    errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_compose_variables_come_from_the_example_env_and_secrets_are_ignored_by_git() -> None:
    used = set(compose()["x-variables-used"])
    example = set(compose_example_env())
    assert used <= example, f"not in .env.example: {sorted(used - example)}"
    assert not example - used, f".env.example has unused variables: {sorted(example - used)}"
    for path in ("deploy/compose/.env", "deploy/compose/certs/ca.key",
                 "deploy/kubernetes/overlays/production/secrets.env",
                 "deploy/kubernetes/overlays/production/certs/tls.key"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} would be committed: add it to a .gitignore"


def test_compose_gives_every_process_the_settings_it_reads() -> None:
    services = compose()["services"]
    for name, p in cityops_processes().items():
        assert name in services, f"compose has no service {name!r}"
        svc = services[name]
        assert svc["command"] == p["command"], f"compose {name}: command differs from env.yaml"
        parse_command(svc["command"])
        settings = check_process_env("compose", name, compose_env(name),
                                     secret_refs=compose_secret_refs(name))
        if name in env_spec()["services"]:
            port = settings.metrics_ports[name]
            assert "healthcheck" not in svc, f"compose {name}: keep the image's HEALTHCHECK"
            published = [str(x).rsplit(":", 1)[-1] for x in svc.get("ports", [])]
            assert all(int(x) == port for x in published), (name, published, port)
    # every cityops-image container runs a command known to env.yaml
    for name in cityops_image_services():
        assert name in cityops_processes(), f"compose {name} is not described in env.yaml"
    topics = services["kafka-topics"]
    check_process_env("compose", "kafka-topics", compose_env("kafka-topics"), secret_refs=set())
    check_topics_script("compose kafka-topics", shell_text(topics))


def check_topics_script(where: str, script: str) -> None:
    for topic in Settings().topics.all():
        assert re.search(rf"create {re.escape(topic)} ", script), f"{where}: no topic {topic}"
    assert "--replication-factor 3" in script and "min.insync.replicas=2" in script, where
    assert '"$CITYOPS_KAFKA_PARTITIONS"' in script, f"{where}: events partitions not from settings"
    assert '--config retention.ms="$CITYOPS_KAFKA_RETENTION_MS"' in script, where


def compose_networks_of(service: str) -> set[str]:
    nets = compose()["services"][service].get("networks", ["default"])
    return set(nets)


def compose_reachable(a: str, b: str) -> bool:
    return bool(compose_networks_of(a) & compose_networks_of(b))


def test_compose_addresses_line_up_between_services() -> None:
    services = compose()["services"]
    brokers = {n for n, s in services.items() if "KAFKA_NODE_ID" in s.get("environment", {})}
    assert len(brokers) == 3, f"expected three Kafka brokers, found {sorted(brokers)}"
    ids, voters = set(), set()
    for b in brokers:
        env = compose_env(b)
        ids.add(env["KAFKA_NODE_ID"])
        assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{b}:9092"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
        voters.add(env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
        assert services[b].get("hostname", b) == b
    assert ids == {"1", "2", "3"} and len(voters) == 1
    assert {v.split("@")[1].split(":")[0] for v in voters.pop().split(",")} == brokers
    db_env = compose_env("timescaledb")
    assert "timescale/timescaledb" in services["timescaledb"]["image"]
    for name, p in cityops_processes().items():
        s = Settings.load(env=compose_env(name))
        if "kafka_bootstrap_override" in p["reads"]:
            hosts = [hp.rsplit(":", 1) for hp in s.kafka_bootstrap.split(",")]
            assert {h for h, _ in hosts} == brokers and {port for _, port in hosts} == {"9092"}
            assert all(compose_reachable(name, h) for h, _ in hosts), name
        if "pg_host_override" in p["reads"]:
            assert s.pg_host_override == "timescaledb" and s.pg_port == 5432, name
            assert compose_reachable(name, "timescaledb"), name
            assert (s.pg_user, s.pg_database, s.pg_password) == (
                db_env["POSTGRES_USER"], db_env["POSTGRES_DB"], db_env["POSTGRES_PASSWORD"])
        if "mqtt_host_override" in p["reads"]:
            assert s.mqtt_host == "mosquitto" and compose_reachable(name, "mosquitto"), name
            assert s.mqtt_port == PLATFORM_PORT in mosquitto_conf()["listeners"], name
            ca = s.mqtt_ca_file
            secrets = services[name].get("secrets", [])
            assert any(ca == f"/run/secrets/{x}" for x in secrets), f"{name}: CA not mounted"
    # The compose secrets' files are what make-certs.sh writes.
    made = re.findall(r"\$out/([a-z]+\.(?:crt|key))", (COMPOSE_DIR / "make-certs.sh").read_text())
    issued = {f"{n}.{ext}" for n in re.findall(r"^issue (\w+) ", (COMPOSE_DIR / "make-certs.sh")
                                                .read_text(), re.M) for ext in ("crt", "key")}
    for spec in compose()["secrets"].values():
        assert Path(spec["file"]).name in set(made) | issued | {"ca.crt"}, spec


def test_compose_only_ingest_shares_a_network_with_the_broker_and_the_backend_is_internal() -> None:
    near_broker = {n for n in cityops_image_services() if compose_reachable(n, "mosquitto")}
    assert near_broker == {"ingest", "simulate"}, near_broker
    assert "simulate" in cityops_image_services()
    assert compose()["services"]["simulate"].get("profiles") == ["simulate"]
    assert compose()["networks"]["backend"].get("internal") is True
    for name, svc in compose()["services"].items():
        if svc.get("ports"):
            assert "backend" not in compose_networks_of(name) or compose_networks_of(name) - {
                "backend"}, f"{name} publishes a port but sits only on the internal network"
    published = {n for n, s in compose()["services"].items() if s.get("ports")}
    public = {n for n in published if not all(str(p).startswith("127.0.0.1:")
                                              for p in compose()["services"][n]["ports"])}
    assert public == {"console", "mosquitto"}, public


def test_compose_bind_mounts_exist() -> None:
    for name, svc in compose()["services"].items():
        for vol in svc.get("volumes", []):
            src = str(vol).split(":", 1)[0]
            if not src.startswith("."):
                continue
            path = (COMPOSE_DIR / src).resolve()
            if path.name == "certs":  # made by make-certs.sh, git-ignored
                continue
            assert path.exists(), f"compose {name} mounts {src}, which does not exist"


@cache
def mosquitto_conf() -> dict[str, Any]:
    """The production mosquitto.conf: global options, and ``listeners``: port -> the
    options that follow its ``listener`` line (per_listener_settings: each has its own
    authentication)."""
    conf: dict[str, Any] = {"listeners": {}}
    current: dict[str, str] | None = None
    for line in (COMPOSE_DIR / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            current = conf["listeners"][int(value)] = {}
        elif current is not None and key in LISTENER_OPTIONS:
            current[key] = value.strip()
        else:
            conf[key] = value.strip()
    return conf


LISTENER_OPTIONS = {"protocol", "cafile", "certfile", "keyfile", "tls_version",
                    "require_certificate", "use_identity_as_username", "allow_anonymous",
                    "password_file", "acl_file"}
PLATFORM_PORT, DEVICE_PORT = 8883, 8884


def acl_users() -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    current = None
    for line in (COMPOSE_DIR / "mosquitto" / "acl").read_text().splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            current = words[1]
            users[current] = []
        elif words[:1] == ["topic"] and current:
            users[current].append(" ".join(words[1:]))
    return users


def test_production_mosquitto_has_tls_mutual_tls_for_devices_acls_and_a_lossless_queue(
        ) -> None:
    conf = mosquitto_conf()
    assert conf["per_listener_settings"] == "true"
    listeners = conf["listeners"]
    assert set(listeners) == {PLATFORM_PORT, DEVICE_PORT}
    for port, opts in listeners.items():  # TLS only, nobody anonymous, the same ACL
        assert opts["allow_anonymous"] == "false", port
        for key in ("cafile", "certfile", "keyfile", "acl_file"):
            assert key in opts, (port, key)
        assert opts["acl_file"] == listeners[PLATFORM_PORT]["acl_file"]
    platform, devices = listeners[PLATFORM_PORT], listeners[DEVICE_PORT]
    assert "password_file" in platform and "require_certificate" not in platform
    # devices: a client certificate is required and its CN is the identity, no password
    assert devices["require_certificate"] == "true"
    assert devices["use_identity_as_username"] == "true"
    assert "password_file" not in devices
    assert int(conf["max_queued_messages"]) >= Settings().mqtt_max_queued
    root = compose_env("ingest")["CITYOPS_MQTT_TOPIC_ROOT"]
    init = compose_env("mosquitto-init")
    users = acl_users()
    assert users == {  # no shared sensor account
        init["MQTT_INGEST_USER"]: [f"read {root}/#"],
        init["MQTT_ADMIN_USER"]: [f"read {root}/#", "read $SYS/#"],
    }
    patterns = [ln.split(None, 1)[1] for ln in (COMPOSE_DIR / "mosquitto" / "acl").read_text()
                .splitlines() if ln.startswith("pattern ")]
    assert patterns == [f"write {root}/+/+/+/%u", f"write {root}/+/gateway/%u"]
    assert compose_env("ingest")["CITYOPS_MQTT_INGEST_USER"] == init["MQTT_INGEST_USER"]
    assert not any("SENSOR" in k for k in compose_env("simulate"))
    script = shell_text(compose()["services"]["mosquitto-init"])
    for who in ("INGEST", "ADMIN"):
        assert f'"$MQTT_{who}_USER" "$MQTT_{who}_PASSWORD"' in script, who
    assert "SENSOR" not in script
    mounts = {str(v).split(":")[1]: str(v).split(":")[0]
              for v in compose()["services"]["mosquitto"]["volumes"]}
    acl_file = platform["acl_file"]
    assert Path(acl_file).parent.as_posix() in mounts or acl_file in mounts
    for key in ("cafile", "certfile", "keyfile", "password_file"):
        assert platform[key].startswith("/mosquitto/auth/"), key
    # sensors dial the host's 8883 and land on the mutual-TLS listener
    assert compose()["services"]["mosquitto"]["ports"] == [f"8883:{DEVICE_PORT}"]


def test_the_broker_configuration_runs_with_mutual_tls_passwords_and_acls(tmp_path: Path
                                                                         ) -> None:
    """Start Debian's Mosquitto with the production config (paths and ports moved): a
    device with a certificate from make-certs.sh publishes as the identity in its CN and
    only on its own topic; no certificate, a certificate from another CA, or plain TCP is
    refused; ingest logs in with its password on the platform listener."""
    import ssl

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    certs = tmp_path / "certs"
    make = ["sh", str(COMPOSE_DIR / "make-certs.sh")]
    subprocess.run([*make, str(certs)], check=True, capture_output=True)
    me, other = "street_30_4-ld-sa001", "street_30_4-ld-sa002"
    subprocess.run([*make, str(certs), "device", me], check=True, capture_output=True)
    rogue = tmp_path / "rogue"  # a certificate for the same name from another CA
    subprocess.run([*make, str(rogue)], check=True, capture_output=True)
    subprocess.run([*make, str(rogue), "device", other], check=True, capture_output=True)
    bad = subprocess.run([*make, str(certs), "device", "a/b"], capture_output=True)
    assert bad.returncode == 2
    auth = tmp_path / "auth"
    auth.mkdir()
    for f in ("ca.crt", "server.crt", "server.key"):
        (auth / f).write_bytes((certs / f).read_bytes())
    passwords = {"ingest": "1ngest", "ops": "0ps"}
    passwd = auth / "passwd"
    for i, (user, pw) in enumerate(passwords.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd),
                        user, pw], check=True, capture_output=True)
    ports = {}
    for name in ("platform", "devices"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[name] = sock.getsockname()[1]
    text = (COMPOSE_DIR / "mosquitto" / "mosquitto.conf").read_text()
    text = text.replace("/mosquitto/auth/", f"{auth}/").replace(
        "/mosquitto/config/acl", str(COMPOSE_DIR / "mosquitto" / "acl")).replace(
        "/mosquitto/data/", f"{tmp_path}/").replace(
        f"listener {PLATFORM_PORT}\n", f"listener {ports['platform']} 127.0.0.1\n").replace(
        f"listener {DEVICE_PORT}\n", f"listener {ports['devices']} 127.0.0.1\n")
    text = text.replace("log_dest stdout", f"log_dest file {tmp_path}/mosquitto.log")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text + "user root\n" if os.geteuid() == 0 else text)
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(user: str | None = None, pw: str | None = None, *, tls: bool = True,
               cert: Path | None = None) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if user is not None:
            c.username_pw_set(user, pw)
        if tls:  # the helper the services use, verifying the broker's certificate
            ctx = Settings(mqtt_ca_file=str(certs / "ca.crt")).mqtt_tls_context()
            assert ctx is not None and ctx.verify_mode.name == "CERT_REQUIRED"
            if cert is not None:
                ctx.load_cert_chain(cert.with_suffix(".crt"), cert.with_suffix(".key"))
            c.tls_set_context(ctx)
        return c

    def refused(c: mqtt.Client, port: int) -> bool:
        """True if the broker will not have this client (TLS handshake or CONNACK)."""
        rc: list[Any] = []
        c.on_connect = lambda c, u, f, reason, p: rc.append(reason)
        try:
            c.connect("127.0.0.1", port)
            for _ in range(10):
                c.loop(timeout=0.2)
        except (ssl.SSLError, OSError):
            return True
        return not c.is_connected() and (not rc or rc[0].is_failure)

    try:
        _wait_port(ports["platform"])
        _wait_port(ports["devices"])
        ingest = client("ingest", passwords["ingest"])
        got: list[tuple[str, bytes]] = []
        ingest.on_message = lambda c, u, m: got.append((m.topic, m.payload))
        assert ingest.connect("127.0.0.1", ports["platform"]) == 0
        ingest.subscribe("$share/cityops-ingest/city/#", qos=1)
        ingest.loop_start()
        device = client(cert=certs / "devices" / me)  # no username: the CN is the identity
        assert device.connect("127.0.0.1", ports["devices"]) == 0
        device.loop_start()
        _wait(lambda: device.is_connected() and ingest.is_connected())
        mine = f"city/ninh_kieu/traffic/lane_detector/{me}"
        for topic in ("elsewhere/x", f"city/ninh_kieu/traffic/lane_detector/{other}",
                      f"city/ninh_kieu/gateway/{other}", mine):
            device.publish(topic, b"x", qos=1).wait_for_publish(5)
        _wait(lambda: got)
        import time
        time.sleep(0.3)
        assert got == [(mine, b"x")]  # everything not its own was dropped
        device.loop_stop()
        device.disconnect()
        # refused: no certificate, a certificate from another CA, a device's name and a
        # guessed password, plain TCP on either port, a wrong platform password
        assert refused(client(), ports["devices"])
        assert refused(client(cert=rogue / "devices" / other), ports["devices"])
        assert refused(client(me, "guess"), ports["devices"])
        assert refused(client(me, "guess"), ports["platform"])
        assert refused(client("ingest", "wrong-password"), ports["platform"])
        for port in ports.values():
            assert refused(client("ingest", passwords["ingest"], tls=False), port)
        ingest.loop_stop()
        ingest.disconnect()
    finally:
        broker.terminate()
        broker.wait(10)


def _wait_port(port: int, timeout: float = 10) -> None:
    _wait(lambda: _port_open(port), timeout)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(cond: Any, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- Prometheus and Grafana -------------------------------------------------------------

def test_compose_prometheus_scrapes_every_service_where_it_listens() -> None:
    conf = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    for svc in env_spec()["services"]:
        job = jobs[f"cityops-{svc}"]
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [svc] and svc in compose()["services"]
        assert sd["port"] == Settings.load(env=compose_env(svc)).metrics_ports[svc], svc
        assert compose_reachable("prometheus", svc)
        labels = {r["target_label"]: r["replacement"] for r in job["relabel_configs"]}
        assert labels == {"service": svc}
    (am,) = conf["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = am.split(":")
    assert host in compose()["services"] and port == "9093"
    mounts = dict(reversed(str(v).split(":")[:2]) for v in
                  compose()["services"]["prometheus"]["volumes"])
    assert (COMPOSE_DIR / mounts["/etc/prometheus/rules"]).resolve() == DEPLOY / "prometheus/rules"
    assert conf["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    project = DEPLOY / "prometheus" / "prometheus.yml"
    if project.exists():  # same jobs and `service` labels as the project's own config
        theirs = yaml.safe_load(project.read_text())
        their_jobs = {j["job_name"]: j for j in theirs["scrape_configs"]}
        assert set(their_jobs) == set(jobs), (sorted(their_jobs), sorted(jobs))
        for name, job in their_jobs.items():
            for sc in job.get("static_configs", []):
                if "service" in sc.get("labels", {}):
                    assert {"service": sc["labels"]["service"]} == {
                        r["target_label"]: r["replacement"] for r in jobs[name]["relabel_configs"]}
        their_am = theirs["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
        assert their_am == [am]


def test_grafana_datasources_resolve_to_compose_services() -> None:
    ds_dir = DEPLOY / "grafana" / "provisioning" / "datasources"
    files = sorted(ds_dir.glob("*.y*ml"))
    assert files, "deploy/grafana/provisioning/datasources has no data source"
    grafana = compose()["services"]["grafana"]
    env = compose_env("grafana")
    for f in files:
        text = f.read_text()
        needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)) | set(
            re.findall(r"\$__env\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
        assert needed <= set(env), f"{f.name} needs {sorted(needed - set(env))} in grafana's env"
        doc = yaml.safe_load(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                    lambda m: env[m.group(1)], text))
        for ds in doc.get("datasources", []):
            url = re.sub(r"^[a-z]+://", "", ds["url"]).split("/")[0]
            host, port = url.rsplit(":", 1)
            assert host in compose()["services"], f"{ds['name']}: {host} is no compose service"
            assert compose_reachable("grafana", host), ds["name"]
            listens = {"prometheus": 9090, "timescaledb": 5432}[host]
            assert int(port) == listens, ds["name"]
            if ds["type"].endswith("postgresql-datasource") or ds["type"] == "postgres":
                db = compose_env("timescaledb")
                assert ds["jsonData"]["database"] == db["POSTGRES_DB"]
                assert ds["user"] == db["GRAFANA_PG_USER"]
                assert ds["secureJsonData"]["password"] == db["GRAFANA_PG_PASSWORD"]
                if ds["jsonData"].get("sslmode") not in (None, "disable"):
                    assert "ssl=on" in shell_text(compose()["services"]["timescaledb"])
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in grafana["volumes"]}
    for f in (DEPLOY / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"):
        for provider in yaml.safe_load(f.read_text())["providers"]:
            path = provider["options"]["path"]
            assert path in mounts, f"grafana: dashboards path {path} is not mounted"
            assert (COMPOSE_DIR / mounts[path]).resolve().is_dir()


# --- Kubernetes -----------------------------------------------------------------------------

def _merge_labels(doc: dict[str, Any], pairs: dict[str, str], templates: bool) -> None:
    doc.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    if templates and "template" in doc.get("spec", {}):
        doc["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def render(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize` builds, for the features this repository uses.

    Secrets from secretGenerator are built from the committed *.example files (the real
    ones are git-ignored), so the check runs on a fresh clone.
    """
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    supported = {"apiVersion", "kind", "namespace", "labels", "resources", "images",
                 "secretGenerator", "generatorOptions"}
    assert set(kust) <= supported, (
        f"{directory}: {sorted(set(kust) - supported)} not understood by this test's renderer")
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        assert path.exists(), f"{directory}: resource {res} does not exist"
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in kust.get("secretGenerator", []):
        data: dict[str, str] = {}
        for env_file in gen.get("envs", []):
            example = directory / f"{env_file}.example"
            assert example.exists(), f"{directory}: {env_file} has no {env_file}.example"
            data.update(read_env_file(example))
        for spec in gen.get("files", []):
            key, _, _src = spec.partition("=")
            data[key] = "(file)"
        docs.append({"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": gen["name"]}, "stringData": data})
    docs = copy.deepcopy(docs)
    for d in docs:
        if kust.get("namespace") and d["kind"] != "Namespace":
            d["metadata"]["namespace"] = kust["namespace"]
        for lab in kust.get("labels", []):
            _merge_labels(d, lab["pairs"], lab.get("includeTemplates", False))
        for c in _containers(d):
            for img in kust.get("images", []):
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    return docs


def _pod_spec(d: dict[str, Any]) -> dict[str, Any] | None:
    return d.get("spec", {}).get("template", {}).get("spec")


def _containers(d: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = _pod_spec(d) or {}
    return spec.get("containers", []) + (spec.get("initContainers", []) if init else [])


def _pod_labels(d: dict[str, Any]) -> dict[str, str]:
    return d["spec"]["template"]["metadata"]["labels"]


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(K8S / overlay))


def by_kind(docs: Any, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: Any) -> dict[str, dict[str, Any]]:
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet"), **by_kind(docs, "Job")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_kubernetes_schemas(overlay: str) -> None:
    crds = {"Kafka", "KafkaNodePool", "KafkaTopic", "ScaledObject"}
    for d in rendered(overlay):
        if d["kind"] in crds:
            assert d["apiVersion"] in {"kafka.strimzi.io/v1beta2", "keda.sh/v1alpha1"}, d["kind"]
            continue
        errors = sorted(k8s_validator(d["apiVersion"], d["kind"]).iter_errors(d), key=str)
        assert not errors, f"{overlay}: {d['kind']}/{d['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


@cache
def k8s_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """The strict (no unknown fields) OpenAPI schema of one kind, as kubernetes-validate
    ships it for K8S_VERSION; built once per kind, where kubernetes_validate.validate()
    would reload the definitions for every document."""
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
    schema = schema_contents(f"{folder}/{kind.lower()}-{group}.json", K8S_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def k8s_env(docs: Any, container: dict[str, Any]) -> tuple[dict[str, str], set[str]]:
    """The env a container gets (ConfigMaps + literals + secret refs) and which are secret."""
    cms = by_kind(docs, "ConfigMap")
    secrets = by_kind(docs, "Secret")
    env: dict[str, str] = {}
    from_secret: set[str] = set()
    for src in container.get("envFrom", []):
        assert "configMapRef" in src, "secrets go in per key (secretKeyRef), never envFrom"
        env.update(cms[src["configMapRef"]["name"]]["data"])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secrets, f"secret {ref['name']} is not generated"
            assert ref["key"] in secrets[ref["name"]]["stringData"], f"no key {ref['key']}"
            env[e["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
            from_secret.add(e["name"])
        else:
            env[e["name"]] = "pod-0"  # downward API (the ingest worker id)
    return env, from_secret


@pytest.mark.parametrize("overlay", ["overlays/production", "overlays/loadtest"])
def test_kubernetes_gives_every_process_the_settings_it_reads(overlay: str) -> None:
    docs = rendered(overlay)
    wl = workloads(docs)
    expected = {"ingest", "process", "alerts", "console", "cityops-migrate",
                "cityops-kafka-topics"} | ({"simulate"} if "loadtest" in overlay else set())
    for name in expected:
        proc = name.removeprefix("cityops-")
        (c,) = _containers(wl[name])
        env, from_secret = k8s_env(docs, c)
        settings = check_process_env(f"k8s {overlay}", proc, env, secret_refs=from_secret)
        if proc == "kafka-topics":
            check_topics_script(f"k8s {name}", "\n".join(c["args"]))
            continue
        assert c["image"].split(":")[0].endswith("cityops"), name
        assert c["args"] == processes()[proc]["command"], name
        parse_command(c["args"])
        if proc in env_spec()["services"]:
            port = settings.metrics_ports[proc]
            assert c["ports"] == [{"name": "http", "containerPort": port}], name
    for name, w in wl.items():
        for c in _containers(w):
            if c["image"].split(":")[0].endswith("cityops"):
                assert name in expected, f"{name} runs the cityops image but env.yaml omits it"
    for cm in by_kind(docs, "ConfigMap").values():
        leaked = {env_var(f) for f in secret_fields()} & set(cm.get("data", {}))
        assert not leaked, f"ConfigMap {cm['metadata']['name']} holds secrets {leaked}"


@pytest.mark.parametrize("overlay", ["overlays/production", "overlays/loadtest"])
def test_kubernetes_probes_resources_and_disruption_budgets(overlay: str) -> None:
    docs = rendered(overlay)
    wl = workloads(docs)
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for name, w in wl.items():
        spec = _pod_spec(w)
        assert spec is not None
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in _containers(w, init=True):
            r = c.get("resources", {})
            assert r.get("requests") and r.get("limits"), f"{name}/{c['name']}: no resources"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        if w["kind"] == "Job":
            continue
        for c in _containers(w):
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, f"{name}: no {probe}"
                if name in env_spec()["services"]:
                    assert c[probe]["httpGet"]["path"] == "/healthz", name
                    assert c[probe]["httpGet"]["port"] in ports, name
        if name in env_spec()["services"] and name != "simulate":
            matching = [p for p in pdbs.values()
                        if p["spec"]["selector"]["matchLabels"].items() <= _pod_labels(w).items()]
            assert len(matching) == 1, f"{name}: {len(matching)} PodDisruptionBudgets"
            budget = matching[0]["spec"]
            allowed = budget.get("maxUnavailable", w["spec"]["replicas"] - budget.get(
                "minAvailable", 0))
            assert 0 < allowed < w["spec"]["replicas"] or w["spec"]["replicas"] == 1, name
    for svc in by_kind(docs, "Service").values():
        if svc["spec"].get("type") == "ExternalName":
            continue
        targets = [w for w in wl.values() if w["kind"] != "Job" and
                   svc["spec"]["selector"].items() <= _pod_labels(w).items()]
        assert targets, f"Service {svc['metadata']['name']} selects no pods"
        names = {p["name"] for c in _containers(targets[0]) for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p.get("targetPort", p["port"]) in names, svc["metadata"]["name"]


def _service_port(docs: Any, name: str) -> int:
    (port,) = [p["port"] for p in by_kind(docs, "Service")[name]["spec"]["ports"]]
    return port


def test_kubernetes_addresses_line_up_between_services() -> None:
    docs = rendered("overlays/loadtest")
    wl = workloads(docs)
    (kafka,) = by_kind(docs, "Kafka").values()
    listener = {lst["port"] for lst in kafka["spec"]["kafka"]["listeners"]}
    bootstrap = f"{kafka['metadata']['name']}-kafka-bootstrap"
    for name in ("ingest", "process", "alerts", "console", "simulate", "cityops-kafka-topics",
                 "cityops-migrate"):
        (c,) = _containers(wl[name])
        env, _ = k8s_env(docs, c)
        s = Settings.load(env=env)
        reads = processes()[name.removeprefix("cityops-")]["reads"]
        if "kafka_bootstrap_override" in reads:
            host, port = s.kafka_bootstrap.rsplit(":", 1)
            assert host == bootstrap and int(port) in listener, name
        if "pg_host_override" in reads:
            assert s.pg_host_override in by_kind(docs, "Service"), name
            assert _service_port(docs, s.pg_host_override) == s.pg_port, name
        if "mqtt_host_override" in reads:
            assert _service_port(docs, s.mqtt_host) == s.mqtt_port, name
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert str(Path(s.mqtt_ca_file).parent) in mounts, f"{name}: MQTT CA not mounted"
    mosq = by_kind(docs, "ConfigMap")["mosquitto-config"]["data"]
    assert mosq["mosquitto.conf"] == (COMPOSE_DIR / "mosquitto" / "mosquitto.conf").read_text()
    assert mosq["acl"] == (COMPOSE_DIR / "mosquitto" / "acl").read_text()
    init = "\n".join(wl["mosquitto"]["spec"]["template"]["spec"]["initContainers"][0]["args"])
    for user in acl_users():
        assert f"/mosquitto/auth/passwd {user} " in init, user


def test_strimzi_kafka_replicates_every_topic_three_ways() -> None:
    docs = rendered("overlays/production")
    (kafka,) = by_kind(docs, "Kafka").values()
    cfg = kafka["spec"]["kafka"]["config"]
    assert cfg["default.replication.factor"] == 3 and cfg["min.insync.replicas"] == 2
    assert cfg["unclean.leader.election.enable"] is False
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    pools = by_kind(docs, "KafkaNodePool").values()
    assert sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"]) == 3
    topics = {t["spec"]["topicName"]: t["spec"] for t in by_kind(docs, "KafkaTopic").values()}
    assert set(topics) == set(Settings().topics.all())
    topics_cm = by_kind(docs, "ConfigMap")["cityops-kafka-topics"]["data"]
    for name, spec in topics.items():
        assert spec["replicas"] == 3 and spec["config"]["min.insync.replicas"] == 2, name
        assert spec["config"]["retention.ms"] == int(topics_cm["CITYOPS_KAFKA_RETENTION_MS"])
    assert topics[Settings().topics.events]["partitions"] == int(
        topics_cm["CITYOPS_KAFKA_PARTITIONS"])
    assert compose_env("kafka-topics")["CITYOPS_KAFKA_PARTITIONS"] == topics_cm[
        "CITYOPS_KAFKA_PARTITIONS"]


def test_production_kafka_version_is_the_local_one() -> None:
    """Compose images, the Kubernetes topics job and Strimzi run the Kafka release the
    local stack runs (deploy/kafka/pom.xml), so what the tests prove is what ships."""
    from cityops.stack.kafka import kafka_version

    version = kafka_version()
    images = {svc.get("image") for svc in compose()["services"].values()
              if "kafka" in str(svc.get("image", ""))}
    assert images == {f"apache/kafka:{version}"}, images
    docs = rendered("overlays/production")
    (kafka,) = by_kind(docs, "Kafka").values()
    assert kafka["spec"]["kafka"]["version"] == version
    assert str(kafka["spec"]["kafka"]["metadataVersion"]).startswith(
        ".".join(version.split(".")[:2]) + "-IV")
    jobs = (DEPLOY / "kubernetes" / "base" / "jobs.yaml").read_text()
    assert re.findall(r"image: apache/kafka:(\S+)", jobs) == [version]


def test_keda_scales_ingest_and_processors_on_their_backlog() -> None:
    docs = rendered("overlays/production")
    wl = workloads(docs)
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {"ingest", "process"}
    # Mosquitto keeps feeding a departed member's persistent session (deploy/SCALING.md):
    # ingest must not be scaled in automatically while a graceful stop leaves that behind.
    behavior = scaled["ingest"]["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"] == {"selectPolicy": "Disabled"}
    partitions = {t["spec"]["topicName"]: t["spec"]["partitions"]
                  for t in by_kind(docs, "KafkaTopic").values()}
    metric_names = set()
    for module in ROOT.glob("*/metrics.py"):
        metric_names |= set(re.findall(r'"(cityops_[a-z_]+)"', module.read_text()))
    for name, so in scaled.items():
        ref = so["spec"]["scaleTargetRef"]
        target = wl[ref["name"]]
        assert target["kind"] == ref.get("kind", "Deployment"), name
        assert so["spec"]["minReplicaCount"] <= target["spec"]["replicas"] <= so["spec"][
            "maxReplicaCount"], name
        for trig in so["spec"]["triggers"]:
            md = trig["metadata"]
            if trig["type"] == "kafka":
                (c,) = _containers(target)
                group = Settings.load(env=k8s_env(docs, c)[0]).process_group
                assert md["consumerGroup"] == group, f"{name}: KEDA watches another group"
                assert md["topic"] == Settings().topics.events
                assert so["spec"]["maxReplicaCount"] <= partitions[md["topic"]]
                assert md["bootstrapServers"].split(".")[0] == "cityops-kafka-bootstrap"
                assert int(md["lagThreshold"]) > 0
            else:
                assert trig["type"] == "prometheus", trig["type"]
                used = set(re.findall(r"cityops_[a-z_]+", md["query"]))
                assert used <= metric_names, f"{name}: no such metric {used - metric_names}"
                assert float(md["threshold"]) > 0


def _allowed_sources(docs: Any, pod: dict[str, Any], port: int) -> list[dict[str, Any]]:
    """The `from` entries of every policy rule that lets traffic into `pod` on `port`."""
    out = []
    labels = _pod_labels(pod)
    for pol in by_kind(docs, "NetworkPolicy").values():
        sel = pol["spec"]["podSelector"]
        if not _selects(sel, labels):
            continue
        for rule in pol["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            out += rule.get("from", [{"anywhere": True}])
    return out


def _selects(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    if not sel:
        return True
    ok = sel.get("matchLabels", {}).items() <= labels.items()
    for expr in sel.get("matchExpressions", []):
        assert expr["operator"] == "In"
        ok &= labels.get(expr["key"]) in expr["values"]
    return ok


@pytest.mark.parametrize("overlay", ["overlays/production", "overlays/loadtest"])
def test_network_policies_only_ingest_reaches_mqtt_and_only_the_console_is_exposed(
        overlay: str) -> None:
    docs = rendered(overlay)
    wl = {n: w for n, w in workloads(docs).items() if w["kind"] != "Job"}
    deny = [p for p in by_kind(docs, "NetworkPolicy").values()
            if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "no default deny"
    def pods_allowed(srcs: list[dict[str, Any]]) -> set[str]:
        return {n for n, w in wl.items() for s in srcs
                if "podSelector" in s and _selects(s["podSelector"], _pod_labels(w))}

    platform = _allowed_sources(docs, wl["mosquitto"], PLATFORM_PORT)
    assert pods_allowed(platform) == {"ingest"}
    assert not any("ipBlock" in s for s in platform), "the sensor network reaches passwords"
    sources = _allowed_sources(docs, wl["mosquitto"], DEVICE_PORT)
    assert pods_allowed(sources) == ({"simulate"} if "loadtest" in overlay else set())
    for srcs in (platform, sources):
        assert all("anywhere" not in s and "namespaceSelector" not in s for s in srcs)
    for name, w in wl.items():
        for c in _containers(w):
            for p in c.get("ports", []):
                srcs = _allowed_sources(docs, w, p["containerPort"])
                if name == "console":
                    assert {"anywhere": True} in srcs
                else:
                    assert {"anywhere": True} not in srcs, f"{name}:{p['containerPort']} exposed"
                if name in env_spec()["services"]:
                    assert any(s.get("namespaceSelector") for s in srcs), (
                        f"{name}: Prometheus cannot scrape port {p['containerPort']}")
    lbs = [s for s in by_kind(docs, "Service").values() if s["spec"].get("type") in (
        "LoadBalancer", "NodePort")]
    assert [s["metadata"]["name"] for s in lbs] == ["mosquitto-sensors"]
    (lb_port,) = lbs[0]["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for c in _containers(wl["mosquitto"])
             for p in c["ports"]}
    assert named[lb_port["targetPort"]] == DEVICE_PORT, "sensors must land on mutual TLS"
    ranges = lbs[0]["spec"]["loadBalancerSourceRanges"]
    assert {"ipBlock": {"cidr": ranges[0]}} in sources, "sensor range differs from the policy"
    (ing,) = by_kind(docs, "Ingress").values()
    backends = {p["backend"]["service"]["name"] for r in ing["spec"]["rules"]
                for p in r["http"]["paths"]}
    assert backends == {"console"}


# --- the image ---------------------------------------------------------------------------

def dockerfile_stages() -> list[dict[str, Any]]:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    args = {}
    stages: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k] = v
        elif op == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
            name = rest.split()[-1] if " AS " in rest.upper() else None
            stages.append({"base": base, "name": name, "ops": []})
        else:
            stages[-1]["ops"].append((op, rest.strip()))
    return stages


def image_files() -> set[str]:
    """Files the final stage COPYs into the image (destinations)."""
    return {rest.split()[-1] for op, rest in dockerfile_stages()[-1]["ops"]
            if op == "COPY" and "--from=" not in rest}


def test_data_files_the_processes_read_are_in_the_image() -> None:
    """fleet_file and rules_file point at files the image carries (mount over them)."""
    for name, p in cityops_processes().items():
        envs = [("compose", compose_env(name))]
        docs = rendered("overlays/loadtest")
        wl = workloads(docs).get(name) or workloads(docs).get(f"cityops-{name}")
        envs.append(("k8s", k8s_env(docs, _containers(wl)[0])[0]))
        for where, env in envs:
            for field in ("fleet_file", "rules_file"):
                if field in p["reads"]:
                    assert env[env_var(field)] in image_files(), f"{where} {name}: {field}"


def test_dockerfile_is_multi_stage_non_root_with_a_health_check_and_no_compilers() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert re.search(r"-slim|alpine|distroless", final["base"]), (
        f"final base {final['base']} ships compilers (use a -slim image)")
    ops = final["ops"]
    users = [rest for op, rest in ops if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [op for op, _ in ops].index("USER") < max(
        i for i, (op, _) in enumerate(ops) if op in ("ENTRYPOINT", "CMD"))
    for op, rest in ops:
        if op == "RUN":
            words = set(re.split(r"[\s;&|]+", rest))
            assert not words & set(COMPILERS), f"final stage installs {words & set(COMPILERS)}"
            assert "pip" not in words, "the final stage installs nothing with pip"
        if op == "COPY" and "--from=" in rest:
            src = rest.split("--from=")[1].split()[0]
            assert src in {s["name"] for s in stages[:-1]}, src
            assert rest.split()[1:] == ["/opt/cityops", "/opt/cityops"], rest
    (hc,) = [rest for op, rest in ops if op == "HEALTHCHECK"]
    assert "/opt/cityops/healthcheck.py" in hc
    assert any(op == "COPY" and "healthcheck.py /opt/cityops/healthcheck.py" in rest
               for op, rest in ops)
    (entry,) = [json.loads(rest) for op, rest in ops if op == "ENTRYPOINT"]
    assert entry == ["cityops"]
    env = " ".join(rest for op, rest in ops if op == "ENV")
    assert "CITYOPS_BIND_HOST=0.0.0.0" in env
    for var in ("CITYOPS_FLEET_FILE", "CITYOPS_RULES_FILE"):
        path = re.search(rf"{var}=(\S+)", env)
        assert path and path.group(1) in image_files(), f"{var}: the image has no such file"
    build_ops = [rest for s in stages[:-1] for op, rest in s["ops"] if op == "COPY"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        pkg = pattern.rstrip("*")
        assert any(r.startswith(f"{pkg} ") for r in build_ops), f"package {pkg} not copied"


def _dockerignored(path: str) -> bool:
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!")
        hit = any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/"))
                  for p in _prefixes(path))
        if hit:
            ignored = not neg
    return ignored


def _prefixes(path: str) -> Iterator[str]:
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])
    yield parts[-1]


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    assert _dockerignored(".venv/bin/python") and _dockerignored("deploy/compose/.env")
    assert _dockerignored("tests/test_deploy.py") and not _dockerignored("cityops/cli.py")
    for stage in dockerfile_stages():
        for op, rest in stage["ops"]:
            if op != "COPY" or "--from=" in rest:
                continue
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: no such file"
                assert not _dockerignored(src), f"COPY {src}: excluded by .dockerignore"
                for p in ((ROOT / src).rglob("*") if (ROOT / src).is_dir() else []):
                    rel = p.relative_to(ROOT).as_posix()
                    if p.suffix == ".py" and "__pycache__" not in rel:
                        assert not _dockerignored(rel), rel


def _run_healthcheck(args: list[str], env: dict[str, str], cwd: Path) -> int:
    script = DEPLOY / "docker" / "healthcheck.py"
    base = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    proc = subprocess.run([sys.executable, str(script), *args], env={**base, **env},
                          cwd=cwd, capture_output=True, text=True, timeout=30)
    return proc.returncode


def test_image_health_check_asks_the_running_service(tmp_path: Path) -> None:
    from cityops.service import serve_http

    sys.path.insert(0, str(DEPLOY / "docker"))
    try:
        import healthcheck
    finally:
        sys.path.remove(str(DEPLOY / "docker"))
    assert healthcheck.service_of(["/opt/cityops/bin/python", "/opt/cityops/bin/cityops",
                                   "ingest"]) == "ingest"
    assert healthcheck.service_of(["cityops", "--config", "/etc/x.toml", "-v", "process"]) == \
        "process"
    state = {"healthy": True}
    server = serve_http("ingest", "127.0.0.1", 0, health=lambda: state["healthy"])
    try:
        port = server.server_port
        env = {"CITYOPS_INGEST_METRICS_PORT": str(port), "CITYOPS_STATE_DIR": str(tmp_path)}
        assert _run_healthcheck(["ingest"], env, tmp_path) == 0
        state["healthy"] = False
        assert _run_healthcheck(["ingest"], env, tmp_path) == 1
        assert _run_healthcheck(["migrate"], env, tmp_path) == 0  # one-shot: nothing to ask
        env["CITYOPS_PROCESS_METRICS_PORT"] = str(port + 1 if port < 65535 else port - 1)
        if not _port_open(int(env["CITYOPS_PROCESS_METRICS_PORT"])):
            assert _run_healthcheck(["process"], env, tmp_path) == 1  # nothing listening
    finally:
        server.shutdown()
        server.server_close()


def test_the_schema_check_rejects_a_broken_manifest() -> None:
    """The validator above is strict: an unknown field or a wrong type is an error."""
    good = copy.deepcopy(workloads(rendered("base"))["alerts"])
    assert not list(k8s_validator("apps/v1", "Deployment").iter_errors(good))
    typo = copy.deepcopy(good)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    wrong = copy.deepcopy(good)
    wrong["spec"]["replicas"] = "three"
    for bad in (typo, wrong):
        assert list(k8s_validator("apps/v1", "Deployment").iter_errors(bad))


def _settings_attribute_uses(package: str, attr: str) -> list[str]:
    """`<settings>.<attr>` reads in a package's service code (test helpers excluded)."""
    import ast

    hits = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name == "testing.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == attr:
                owner = node.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name in {"settings", "s", "_settings"}:
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return hits


@pytest.mark.parametrize("package", ["ingest", "processors", "alerts", "simulators"])
def test_services_use_the_production_addresses(package: str) -> None:
    """In a container `host` (127.0.0.1) is wrong for both listening and connecting:
    services listen on `bind_host` and reach the broker at `mqtt_host` (which falls back to
    `host` locally), Kafka at `kafka_bootstrap`, the database at `pg_dsn`."""
    uses = _settings_attribute_uses(package, "host")
    assert not uses, (
        f"{package} reads settings.host at {uses}: use settings.bind_host to listen, "
        "settings.mqtt_host / kafka_bootstrap / pg_dsn to connect")
    mqtt_clients = [p for p in (ROOT / package).rglob("*.py") if p.name != "testing.py"
                    and "mqtt_port" in p.read_text()]
    for path in mqtt_clients:
        text = path.read_text()
        assert "mqtt_tls_context" in text or "mqtt_ca_file" in text, (
            f"{path.relative_to(ROOT)} connects to MQTT without TLS: production brokers only "
            "speak TLS (port 8883); pass settings.mqtt_tls_context() to the client")


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """promtool (Debian's prometheus package, which the local stack needs anyway) reads the
    compose Prometheus config with the project's rule files where compose mounts them."""
    conf = (COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text()
    rules = DEPLOY / "prometheus" / "rules"
    assert sorted(rules.glob("*.yml")), "deploy/prometheus/rules has no rule file"
    copy_ = tmp_path / "prometheus.yml"
    copy_.write_text(conf.replace("/etc/prometheus/rules/", f"{rules}/"))
    out = subprocess.run(["promtool", "check", "config", str(copy_)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr and str(rules) in out.stdout + out.stderr


def test_kubernetes_prometheus_finds_every_service_pod_on_its_metrics_port() -> None:
    """deploy/kubernetes/monitoring/prometheus.yml (kubernetes_sd: Debian's promtool is
    built without it, so this is a structural check) keeps the pods of each service by
    their name label and their `http` port, with the project's job names and labels."""
    conf = yaml.safe_load((K8S / "monitoring" / "prometheus.yml").read_text())
    compose_conf = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    assert [j["job_name"] for j in conf["scrape_configs"]] == [
        j["job_name"] for j in compose_conf["scrape_configs"]]
    assert conf["rule_files"] == compose_conf["rule_files"]
    wl = workloads(rendered("overlays/loadtest"))
    for svc in env_spec()["services"]:
        job = next(j for j in conf["scrape_configs"] if j["job_name"] == f"cityops-{svc}")
        (sd,) = job["kubernetes_sd_configs"]
        assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["cityops"]
        keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
                if r.get("action") == "keep"}
        assert keep == {"__meta_kubernetes_pod_label_app_kubernetes_io_name": svc,
                        "__meta_kubernetes_pod_container_port_name": "http"}
        assert {"target_label": "service", "replacement": svc} in job["relabel_configs"]
        pod = wl[svc]
        assert _pod_labels(pod)["app.kubernetes.io/name"] == svc
        (c,) = _containers(pod)
        (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "http"]
        annotations = pod["spec"]["template"]["metadata"].get("annotations", {})
        if annotations:
            assert annotations["prometheus.io/port"] == str(port), svc


def _quantity(value: str) -> float:
    """CPU or memory quantity (Kubernetes "500m", "1Gi"; compose "768M", "1.0") as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 2**10, "M": 2**20,
             "G": 2**30}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert m, value
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_compose_and_kubernetes_give_each_service_the_same_limits() -> None:
    """One sizing (deploy/SCALING.md), two deployments: the limits must not drift apart."""
    wl = workloads(rendered("overlays/production"))
    for name in ("ingest", "process", "alerts", "console"):
        limits = compose()["services"][name]["deploy"]["resources"]["limits"]
        (c,) = _containers(wl[name])
        k8s = c["resources"]["limits"]
        assert _quantity(limits["cpus"]) == _quantity(k8s["cpu"]), name
        assert _quantity(limits["memory"]) == _quantity(k8s["memory"]), name
        assert _quantity(c["resources"]["requests"]["cpu"]) <= _quantity(k8s["cpu"])
    for path in [DEPLOY / "SCALING.md", DEPLOY / "env.yaml", *COMPOSE_DIR.rglob("*.y*ml"),
                 *K8S.rglob("*.y*ml")]:
        assert "TODO" not in path.read_text(), f"{path.relative_to(ROOT)} still has a TODO"


def test_compose_alertmanager_routes_to_a_defined_receiver() -> None:
    am = compose()["services"]["alertmanager"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in am["volumes"]}
    flag = next(a for a in am["command"] if a.startswith("--config.file="))
    path = COMPOSE_DIR / mounts[flag.split("=", 1)[1]]
    conf = yaml.safe_load(path.read_text())
    receivers = {r["name"] for r in conf["receivers"]}
    routes = [conf["route"], *conf["route"].get("routes", [])]
    assert all(r.get("receiver", conf["route"]["receiver"]) in receivers for r in routes)
    assert compose_reachable("prometheus", "alertmanager")
