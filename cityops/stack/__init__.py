"""The local stack: real Mosquitto, Kafka-protocol broker, PostgreSQL and Prometheus.

``Stack(settings).up()`` starts what is not running (starting twice is harmless),
``down()`` stops exactly what ``up()`` started, by pid, and ``status()`` reports each
server's port and health. Everything lives under ``settings.state_dir``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from cityops.settings import CREDENTIALS_FILE, Settings
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
        self._write_credentials()
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

    def _write_credentials(self) -> None:
        """Record the credentials this stack was configured with, for the other commands."""
        s = self.settings
        path = Path(s.state_dir) / CREDENTIALS_FILE
        creds = {
            "mqtt_sensor_user": s.mqtt_sensor_user, "mqtt_sensor_password": s.mqtt_sensor_password,
            "mqtt_ingest_user": s.mqtt_ingest_user, "mqtt_ingest_password": s.mqtt_ingest_password,
            "mqtt_admin_user": s.mqtt_admin_user, "mqtt_admin_password": s.mqtt_admin_password,
        }
        if path.exists():
            with path.open("rb") as fh:
                if tomllib.load(fh) == creds:
                    return
        path.write_text("".join(f'{k} = "{v}"\n' for k, v in creds.items()))
        path.chmod(0o600)
