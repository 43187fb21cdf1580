"""The four real servers of the local stack: Mosquitto, Apache Kafka, PostgreSQL, Prometheus.

Each class knows how to install-check, configure, start, health-check and stop its
server under the stack's state folder. Nothing here is a mock: these are the same
programs production runs (Kafka's own jars from Maven Central: ``cityops/stack/kafka.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pwd
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cityops.devices import DeviceStore, write_password_file
from cityops.kafka import missing_topics
from cityops.settings import PROJECT_ROOT, Settings
from cityops.stack import kafka
from cityops.stack.process import (
    ManagedProcess,
    StackError,
    port_open,
    require,
    wait_until,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


PG_BIN_DIRS = [f"/usr/lib/postgresql/{v}/bin" for v in (17, 16, 15)]


@dataclass(frozen=True, slots=True)
class Health:
    name: str
    port: int
    running: bool
    healthy: bool
    detail: str = ""


def _as_root() -> bool:
    return os.geteuid() == 0


def _chown_tree(path: Path, user: str) -> None:
    """Hand a folder to a service account when we run as root (servers drop privileges)."""
    if not _as_root():
        return
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return
    for p in [path, *path.rglob("*")]:
        os.chown(p, pw.pw_uid, pw.pw_gid)


class Server:
    name: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.state_dir / self.name
        self.proc = ManagedProcess(self.name, settings.state_dir)

    @property
    def port(self) -> int:
        raise NotImplementedError

    def check_installed(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def healthy(self) -> bool:
        return port_open(self.settings.host, self.port)

    def up(self) -> bool:
        """Start if not already running and healthy; returns True if it was started now."""
        self.check_installed()
        if self.proc.pid is not None and self.healthy():
            return False
        if self.proc.pid is None and port_open(self.settings.host, self.port):
            raise StackError(
                f"{self.name}: port {self.port} on {self.settings.host} is taken by another "
                f"process; set CITYOPS_{self.name.upper()}_PORT to a free port"
            )
        self.proc.stop()
        self.start()
        return True

    def down(self) -> bool:
        return self.proc.stop()

    def status(self) -> Health:
        running = self.proc.pid is not None
        try:
            healthy = running and self.healthy()
            detail = ""
        except Exception as exc:
            healthy, detail = False, f"{type(exc).__name__}: {exc}"
        return Health(self.name, self.port, running, healthy, detail)


class Mosquitto(Server):
    """Debian's Mosquitto with the project's own passwords, ACLs and persistence."""

    name = "mqtt"

    @property
    def port(self) -> int:
        return self.settings.mqtt_port

    def check_installed(self) -> None:
        require("mosquitto", "mosquitto", search=["/usr/sbin"])
        require("mosquitto_passwd", "mosquitto")

    def write_config(self, store: DeviceStore | None = None) -> Path:
        """Password file, ACL and mosquitto.conf from settings and the device store.

        The platform's own accounts (ingest, ops) come from the credentials; every device,
        gateway and bridge from ``<state>/devices.json`` (see ``cityops/devices.py``:
        identities are hashed once, so this stays fast with a big fleet).
        """
        s = self.settings
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "data").mkdir(exist_ok=True)
        tool = require("mosquitto_passwd", "mosquitto")
        store = store if store is not None else DeviceStore.load(s)
        if store.hash_new(tool):
            store.save()
        write_password_file(self.dir / "passwd", tool,
                            [(s.mqtt_ingest_user, s.mqtt_ingest_password),
                             (s.mqtt_admin_user, s.mqtt_admin_password)], store)
        root = s.mqtt_topic_root
        template = (PROJECT_ROOT / "deploy" / "mosquitto" / "acl").read_text()
        acl = self.dir / "acl.new"
        acl.write_text(template.format(root=root, ingest=s.mqtt_ingest_user,
                                       ops=s.mqtt_admin_user, bridges=store.acl_lines()))
        acl.replace(self.dir / "acl")
        conf_template = (PROJECT_ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
        conf = self.dir / "mosquitto.conf"
        conf.write_text(conf_template.format(
            host=s.host, port=s.mqtt_port, dir=self.dir, max_queued=s.mqtt_max_queued))
        _chown_tree(self.dir, "mosquitto")
        return conf

    def start(self) -> None:
        conf = self.write_config()
        exe = require("mosquitto", "mosquitto", search=["/usr/sbin"])
        self.proc.start([exe, "-c", str(conf)])
        wait_until(self.healthy, 10, "mosquitto", self.proc)

    def reload_acl(self) -> bool:
        """SIGHUP: Mosquitto re-reads its password file and ACL (a revoked identity is
        refused at its next connect). Returns False if the broker is not running."""
        if self.proc.pid:
            os.kill(self.proc.pid, signal.SIGHUP)
            return True
        return False


class KafkaBroker(Server):
    """Apache Kafka (KRaft, one combined broker+controller), plus the project's topics.

    See ``cityops/stack/kafka.py`` for where the jars come from and what one local node
    promises after a crash.
    """

    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.files = kafka.BrokerFiles(self.dir)

    @property
    def port(self) -> int:
        return self.settings.kafka_port

    def check_installed(self) -> None:
        kafka.java()
        jars = kafka.BrokerJars(self.settings.cache_dir)
        if not jars.fetched:
            require("mvn", "maven", "sudo apt-get install -y maven (or scripts/bootstrap.sh)")

    def up(self) -> bool:
        if self.proc.pid is None:
            cport = self.settings.kafka_controller_port
            if port_open(self.settings.host, cport):
                raise StackError(
                    f"kafka: controller port {cport} on {self.settings.host} is taken by "
                    f"another process; set CITYOPS_KAFKA_CONTROLLER_PORT to a free port")
        return super().up()

    def start(self) -> None:
        s, files = self.settings, self.files
        java = kafka.java()
        classpath = kafka.BrokerJars(s.cache_dir).classpath()
        self.dir.mkdir(parents=True, exist_ok=True)
        files.properties.write_text(kafka.server_properties(s, files.data))
        files.log_config.write_text(kafka.LOG4J2)
        kafka.format_storage(java, classpath, files)
        self.proc.start([java, *kafka.jvm_options(s, files.log_config), "-cp", classpath,
                         "kafka.Kafka", str(files.properties)])
        wait_until(lambda: port_open(s.host, self.port), 90, "kafka broker", self.proc)
        # The first metadata answers can come before the controller has elected itself.
        wait_until(lambda: run_sync(self._create_topics()), 60, "kafka topics", self.proc,
                   interval=0.5)
        wait_until(self.healthy, 30, "kafka broker", self.proc)

    async def _create_topics(self) -> bool:
        await kafka.create_topics(self.settings)
        return True

    def healthy(self) -> bool:
        """The broker answers metadata and every project topic exists."""
        return port_open(self.settings.host, self.port) and not run_sync(
            missing_topics(self.settings))

    def down(self) -> bool:
        """SIGTERM, then wait for Kafka's own clean shutdown (it closes the listeners,
        flushes and checkpoints the logs, so the next start skips log recovery)."""
        return self.proc.stop(timeout=90, sig=signal.SIGTERM)


class Postgres(Server):
    """A private PostgreSQL cluster (Debian binaries) with the project's schema migrated."""

    name = "postgres"

    @property
    def port(self) -> int:
        return self.settings.pg_port

    def _bin(self, program: str) -> str:
        return require(program, "postgresql", "sudo apt-get install -y postgresql",
                       search=PG_BIN_DIRS)

    def check_installed(self) -> None:
        self._bin("initdb")
        self._bin("pg_ctl")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # The server writes its own log, so it must sit in a folder the postgres user owns.
        self.proc.log_file = self.dir / "server.log"

    def _run_as_postgres(self, argv: list[str]) -> list[str]:
        if _as_root():
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def start(self) -> None:
        data = self.dir / "data"
        sock = self.dir / "sock"
        if not (data / "PG_VERSION").exists():
            if data.exists():
                shutil.rmtree(data)
            self.dir.mkdir(parents=True, exist_ok=True)
            sock.mkdir(exist_ok=True)
            _chown_tree(self.dir, "postgres")
            subprocess.run(self._run_as_postgres([
                self._bin("initdb"), "-D", str(data), "-U", self.settings.pg_user,
                "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]),
                check=True, capture_output=True)
            extra = ("\n# cityops local tuning: a dev box, not a bank\n"
                     "synchronous_commit = off\nshared_buffers = 256MB\n"
                     "max_wal_size = 2GB\ncheckpoint_timeout = 15min\n"
                     "max_connections = 200\nwork_mem = 32MB\n")
            with (data / "postgresql.conf").open("a") as fh:
                fh.write(extra)
        sock.mkdir(exist_ok=True)
        _chown_tree(sock, "postgres")
        # The socket (trust: the stack's own door, for setting the password) is for the
        # server's OS user only; TCP clients need the password (scram, see prepare()).
        opts = (f"-p {self.port} -k {sock} -c listen_addresses={self.settings.host} "
                "-c unix_socket_permissions=0700")
        # pg_ctl forks the postmaster; we record the postmaster pid from postmaster.pid.
        subprocess.run(self._run_as_postgres([
            self._bin("pg_ctl"), "-D", str(data), "-l", str(self.proc.log_file),
            "-o", opts, "-w", "-t", "60", "start"]), check=False, capture_output=True)
        pm = data / "postmaster.pid"
        if not pm.exists():
            raise StackError(f"postgres did not start; see {self.proc.log_file}\n"
                             f"{self.proc.tail()}")
        self.proc.adopt(int(pm.read_text().splitlines()[0]))
        wait_until(self.healthy, 30, "postgres", self.proc)

    def up(self) -> bool:
        """Start if needed, then always bring the schema up to date (migrations are idempotent)."""
        started = super().up()
        run_sync(self.prepare())
        return started

    def healthy(self) -> bool:
        return port_open(self.settings.host, self.port) and run_sync(self._ping())

    async def _socket_connect(self, wait_s: float = 60) -> Any:
        """A superuser connection over the cluster's own Unix socket (no password: the
        stack must reach the server before, and whatever, the password is)."""
        import asyncpg

        return await asyncpg.connect(host=str(self.dir / "sock"), port=self.port,
                                     user=self.settings.pg_user, database="postgres",
                                     timeout=wait_s)

    async def _ping(self) -> bool:
        conn = await self._socket_connect(wait_s=3)
        try:
            return await conn.fetchval("select 1") == 1
        finally:
            await conn.close()

    async def _require_password(self) -> None:
        """Give the database user the stack's generated password and make TCP clients use
        it (scram-sha-256). Runs on every ``up``, so a rotated password in credentials.toml,
        or a cluster created before passwords (all ``trust``), converges at once."""
        password = self.settings.pg_password
        if not password:
            return
        conn = await self._socket_connect()
        try:
            await conn.execute("set password_encryption = 'scram-sha-256'")
            user = await conn.fetchval("select quote_ident($1)", self.settings.pg_user)
            literal = await conn.fetchval("select quote_literal($1)", password)
            await conn.execute(f"alter role {user} password {literal}")
            hba = Path(await conn.fetchval("show hba_file"))
            if await asyncio.to_thread(_scram_for_tcp, hba):
                await conn.execute("select pg_reload_conf()")
        finally:
            await conn.close()

    async def prepare(self) -> None:
        """Require the password, create the project database if missing, migrate it."""
        import asyncpg

        await self._require_password()
        dsn = self.settings.pg_dsn.rsplit("/", 1)[0] + "/postgres"
        conn = await asyncpg.connect(dsn)
        try:
            exists = await conn.fetchval("select 1 from pg_database where datname=$1",
                                         self.settings.pg_database)
            if not exists:
                await conn.execute(f'create database "{self.settings.pg_database}"')
        finally:
            await conn.close()
        from processors.schema import migrate

        await migrate(self.settings.pg_dsn, self.settings.storage_mode,
                      retention_days=self.settings.retention_days)

    def down(self) -> bool:
        data = self.dir / "data"
        if self.proc.pid is None:
            return False
        subprocess.run(self._run_as_postgres([
            self._bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            check=False, capture_output=True)
        self.proc.stop(timeout=10)
        return True


def _scram_for_tcp(hba: Path) -> bool:
    """Turn pg_hba.conf's ``host ... trust`` lines (initdb --auth=trust) into
    ``scram-sha-256``; local (socket) lines stay. Returns True if the file changed."""
    lines = hba.read_text().splitlines(keepends=True)
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and fields[0].startswith("host") and fields[-1] == "trust":
            line = line[: line.rstrip().rfind("trust")] + "scram-sha-256\n"
        out.append(line)
    if out == lines:
        return False
    hba.write_text("".join(out))
    return True


class Prometheus(Server):
    """Debian's Prometheus scraping every cityops service, rules from ``deploy/prometheus``."""

    name = "prometheus"

    @property
    def port(self) -> int:
        return self.settings.prometheus_port

    def check_installed(self) -> None:
        require("prometheus", "prometheus")

    def write_config(self) -> Path:
        s = self.settings
        self.dir.mkdir(parents=True, exist_ok=True)
        rules_dir = PROJECT_ROOT / "deploy" / "prometheus" / "rules"
        rule_files = sorted(str(p) for p in rules_dir.glob("*.yml")) if rules_dir.is_dir() else []
        lines = [
            "# Generated by `cityops stack up` from settings; production config lives in",
            "# deploy/prometheus/prometheus.yml.",
            "global:", "  scrape_interval: 5s", "  evaluation_interval: 5s",
            "rule_files:" + ("" if rule_files else " []"), *[f"  - {r}" for r in rule_files],
            "scrape_configs:",
        ]
        for job, port in s.metrics_ports.items():
            lines += [f"  - job_name: cityops-{job}",
                      "    static_configs:",
                      f"      - targets: ['{s.host}:{port}']",
                      "        labels: {service: " + job + "}"]
        conf = self.dir / "prometheus.yml"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> None:
        conf = self.write_config()
        exe = require("prometheus", "prometheus")
        self.proc.start([exe, f"--config.file={conf}", f"--storage.tsdb.path={self.dir / 'data'}",
                         f"--web.listen-address={self.settings.host}:{self.port}",
                         "--storage.tsdb.retention.time=2d", "--web.enable-lifecycle"])
        wait_until(self.healthy, 30, "prometheus", self.proc)

    def healthy(self) -> bool:
        url = f"http://{self.settings.host}:{self.port}/-/ready"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200


SERVERS: tuple[type[Server], ...] = (Mosquitto, KafkaBroker, Postgres, Prometheus)
