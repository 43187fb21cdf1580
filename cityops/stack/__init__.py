"""The local stack: real Mosquitto, Kafka-protocol broker, PostgreSQL and Prometheus.

``Stack(settings).up()`` starts what is not running (starting twice is harmless),
``down()`` stops exactly what ``up()`` started, by pid, and ``status()`` reports each
server's port and health. Everything lives under ``settings.state_dir``.

No secret of the stack has a default: the first ``up()`` generates the MQTT passwords,
the database password and the console's session secret, keeps them in
``<state_dir>/credentials.toml`` (0600; ``Settings.load`` reads it, so every local
command finds them) and reuses them on every later ``up()``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from cityops.devices import DeviceStore
from cityops.registry import load_fleet
from cityops.settings import (
    CREDENTIALS_FILE,
    SECRET_FIELDS,
    Settings,
    is_default_secret,
    new_secret,
)
from cityops.stack.process import MissingBinary, StackError
from cityops.stack.servers import SERVERS, Health, Server

__all__ = ["Health", "MissingBinary", "Stack", "StackError"]


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servers: list[Server] = [cls(settings) for cls in SERVERS]

    def server(self, name: str) -> Server:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(name)

    def up(self, only: list[str] | None = None) -> list[str]:
        """Start the servers (all, or those named); returns the names started now."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        changed = self._write_credentials()
        changed |= self._provision_fleet()
        if changed:
            mqtt = self.server("mqtt")
            if mqtt.proc.pid is not None:  # running with the old passwords: hand it the new
                mqtt.write_config()  # type: ignore[attr-defined]
                mqtt.reload_acl()  # type: ignore[attr-defined]
        for s in self.servers:
            if only is None or s.name in only:
                s.check_installed()  # fail on a missing binary before starting anything
        started = []
        for s in self.servers:
            if (only is None or s.name in only) and s.up():
                started.append(s.name)
        return started

    def down(self) -> list[str]:
        stopped = []
        for s in reversed(self.servers):
            if s.down():
                stopped.append(s.name)
        return stopped

    def status(self) -> list[Health]:
        return [s.status() for s in self.servers]

    def _provision_fleet(self) -> bool:
        """Give the devices of ``settings.fleet_file`` their MQTT identities (once; the
        simulators log in with them). Returns True if any was added."""
        store = DeviceStore.load(self.settings)
        fleet = load_fleet(self.settings.fleet_file)
        if not store.provision_fleet(fleet, self.settings.mqtt_topic_root):
            return False
        store.save()
        return True

    def _write_credentials(self) -> bool:
        """Settle this stack's credentials and record them for the other commands.

        A secret that was configured (environment, config file, or read back from the
        credentials file) is kept; one still at a well-known default is taken from the
        credentials file if that holds a real one, else generated. ``self.settings`` (and
        the servers') then carry them, so whoever started the stack uses the same ones.
        Returns True if the file changed.
        """
        s = self.settings
        path = Path(s.state_dir) / CREDENTIALS_FILE
        stored: dict[str, object] = {}
        if path.exists():
            with path.open("rb") as fh:
                stored = tomllib.load(fh)
        secrets: dict[str, str] = {}
        for name in SECRET_FIELDS:
            value = getattr(s, name)
            if is_default_secret(value):
                kept = stored.get(name)
                value = kept if isinstance(kept, str) and not is_default_secret(kept) \
                    else new_secret()
            secrets[name] = value
        self.settings = s.replace(**secrets)
        for server in self.servers:
            server.settings = self.settings
        creds = {
            "mqtt_ingest_user": s.mqtt_ingest_user, "mqtt_admin_user": s.mqtt_admin_user,
            **secrets,
        }
        if stored == creds:
            return False
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)  # before the secrets are in it
        path.write_text("".join(f"{k} = {_toml_str(v)}\n" for k, v in creds.items()))
        return True


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these values)."""
    import json

    return json.dumps(value)
