"""Apache Kafka in the local stack: the real broker, from Maven Central, run with Java 17.

The broker is the same software production runs (``deploy/compose``, ``deploy/kubernetes``),
in KRaft mode as one combined broker+controller on loopback. Its jars are the Maven
artifacts of ``deploy/kafka/pom.xml`` (``org.apache.kafka:kafka_2.13`` and its
dependencies), fetched once with ``mvn dependency:copy-dependencies`` into
``Settings.cache_dir`` -- outside the repository, shared by every clone and run on the
machine -- so later starts need no network. Starting it is what Kafka's own scripts do:
``java <heap/GC> -cp '<jars>/*' kafka.Kafka server.properties``, after
``kafka.tools.StorageTool format`` once per state folder.

Durability of the single local node, decided here and tested by the fault matrix: a
produce with ``acks=all`` is acknowledged once the broker has appended it to its log
file, i.e. handed it to the operating system; Kafka leaves fsync to the OS (its default
``log.flush.*`` policy, kept). So a killed broker process -- SIGTERM or SIGKILL -- loses
nothing it acknowledged: the page cache survives the process, and log recovery on the
next start truncates only a torn tail that was never acknowledged. A crash of the whole
machine can lose what the OS had not yet written back (seconds). Production does not
rely on fsync either: three brokers, replication factor 3 and ``min.insync.replicas=2``
mean an acknowledged record is in two brokers' memory before the ack, so it survives
the loss of any one machine (``deploy/SCALING.md``).
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import functools
import hashlib
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from cityops.kafka import missing_topics
from cityops.settings import PROJECT_ROOT, Settings
from cityops.stack.process import StackError, require

POM = PROJECT_ROOT / "deploy" / "kafka" / "pom.xml"
MIN_JAVA = 17
NODE_ID = 1


def kafka_version(pom: Path = POM) -> str:
    """The pinned broker version (``kafka.version`` in the pom)."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if not found:
        raise StackError(f"kafka: {pom} names no <kafka.version>")
    return found.group(1).strip()


def java() -> str:
    """The ``java`` to run the broker with: on PATH and version 17 or newer."""
    exe = require("java", "openjdk-17-jre-headless",
                  "sudo apt-get install -y openjdk-17-jre-headless (or run scripts/bootstrap.sh)")
    major = _java_major(exe)
    if major < MIN_JAVA:
        raise StackError(f"kafka: {exe} is Java {major or '?'}; Apache Kafka 4 needs Java "
                         f"{MIN_JAVA}+: sudo apt-get install -y openjdk-17-jre-headless")
    return exe


@functools.cache
def _java_major(exe: str) -> int:
    """The major version ``exe -version`` reports (0 if unreadable), asked once per program:
    a stack start checks it for the install check, ``up`` and ``start`` alike, and each
    ``java -version`` is a JVM start."""
    out = subprocess.run([exe, "-version"], capture_output=True, text=True, check=False)
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(found.group(1)) if found else 0
    if major == 1 and found and found.group(2):  # "1.8.0_x" style
        major = int(found.group(2))
    return major


class BrokerJars:
    """The broker's jars in the download cache, fetched by Maven at most once.

    The folder is named by the version and a hash of the pom, so changing the pin (or a
    dependency) fetches anew while the old folder stays usable by older clones. A lock
    file makes parallel first starts (test sessions, a demo) wait for one fetch; the jars
    land in a temporary folder that is renamed into place only when Maven succeeded.
    """

    def __init__(self, cache_dir: Path, pom: Path = POM) -> None:
        self.pom = pom
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
        self.dir = cache_dir / "kafka" / f"{kafka_version(pom)}-{digest}"
        self.libs = self.dir / "libs"

    @property
    def fetched(self) -> bool:
        return (self.dir / ".complete").is_file()

    def classpath(self) -> str:
        self.fetch()
        return f"{self.libs}/*"

    def fetch(self) -> float:
        """Fetch the jars if they are not cached; returns the seconds it took (0 if cached)."""
        if self.fetched:
            return 0.0
        mvn = require("mvn", "maven", "sudo apt-get install -y maven (or scripts/bootstrap.sh)")
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with (self.dir.parent / ".fetch.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.fetched:  # another process fetched while we waited
                return 0.0
            tmp = self.dir.parent / f".tmp-{self.dir.name}-{uuid.uuid4().hex[:8]}"
            try:
                proc = subprocess.run(
                    [mvn, "-B", "-q", "-f", str(self.pom), "dependency:copy-dependencies",
                     f"-DoutputDirectory={tmp / 'libs'}", "-DincludeScope=runtime"],
                    capture_output=True, text=True, timeout=900, check=False)
                if proc.returncode != 0 or not any((tmp / "libs").glob("kafka_2.13-*.jar")):
                    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                             if "ERROR" in ln] or (proc.stdout + proc.stderr).splitlines()
                    last = lines[0].strip()[:300] if lines else f"exit code {proc.returncode}"
                    raise StackError(
                        f"kafka: fetching Apache Kafka {kafka_version(self.pom)} from Maven "
                        f"Central failed ({last}); check that this machine reaches Maven "
                        f"Central, then run `cityops stack up` again")
                shutil.rmtree(self.dir, ignore_errors=True)
                tmp.rename(self.dir)
                (self.dir / ".complete").write_text(f"{time.time():.0f}\n")
            except subprocess.TimeoutExpired as exc:
                raise StackError("kafka: Maven did not finish fetching the broker's jars "
                                 "in 15 minutes; check the network, then try again") from exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return time.monotonic() - t0


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's Uuid).

    Never one that starts with "-", as Kafka's own ``Uuid.randomUuid`` guarantees: the
    storage tool's argument parser takes ``-t -abc...`` for an option (1 id in 64 did).
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def server_properties(settings: Settings, data_dir: Path) -> str:
    """The broker's configuration: loopback only, one node, single-node internal topics."""
    s = settings
    return "\n".join([
        "# Written by `cityops stack up` (cityops/stack/kafka.py) on every start.",
        "process.roles=broker,controller",
        f"node.id={NODE_ID}",
        f"controller.quorum.voters={NODE_ID}@{s.host}:{s.kafka_controller_port}",
        f"listeners=PLAINTEXT://{s.host}:{s.kafka_port},"
        f"CONTROLLER://{s.host}:{s.kafka_controller_port}",
        f"advertised.listeners=PLAINTEXT://{s.host}:{s.kafka_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={data_dir}",
        # Topics are created by the stack with their settings, never by a stray client.
        "auto.create.topics.enable=false",
        "num.partitions=1",
        "default.replication.factor=1",
        "min.insync.replicas=1",
        # One node: the internal topics cannot have more replicas than brokers.
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=6",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=4",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        # A fresh group starts at once (tests, restarts); the default waits 3 s.
        "group.initial.rebalance.delay.ms=0",
        # Two cores: fewer threads than the defaults (3 network, 8 I/O).
        "num.network.threads=2",
        "num.io.threads=4",
        "num.recovery.threads.per.data.dir=2",
        "log.retention.check.interval.ms=60000",
        "metadata.max.idle.interval.ms=5000",
        # Flushing stays with the OS (Kafka's default): see the module docstring.
        "",
    ])


LOG4J2 = """\
# Written by `cityops stack up`: the broker logs to stdout, which the stack keeps in
# <state>/kafka.log; state changes and request logs only when they matter.
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.state.name = state.change.logger
logger.state.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.coord.name = org.apache.kafka.coordinator
logger.coord.level = warn
"""


def jvm_options(settings: Settings, log_config: Path) -> list[str]:
    heap = settings.kafka_heap_mb
    return [f"-Xms{min(256, heap)}m", f"-Xmx{heap}m", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent", "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log_config}"]


def read_meta(data_dir: Path) -> dict[str, str]:
    """``meta.properties`` of a formatted log folder (empty if not formatted)."""
    meta = data_dir / "meta.properties"
    if not meta.is_file():
        return {}
    out = {}
    for line in meta.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


async def create_topics(settings: Settings) -> None:
    """Create the project's topics with their partitions and retention; existing topics
    get the configured retention (error 36, "exists", is fine on create)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=10_000)
    await admin.start()
    try:
        t = settings.topics
        cfg = {"retention.ms": str(settings.kafka_retention_ms)}
        wanted = [
            NewTopic(t.events, settings.kafka_partitions, 1, topic_configs=cfg),
            NewTopic(t.deadletter, 3, 1, topic_configs=cfg),
            NewTopic(t.aggregates, 3, 1, topic_configs=cfg),
            NewTopic(t.alerts, 3, 1, topic_configs=cfg),
            NewTopic(t.alerts_scoped, settings.kafka_partitions, 1, topic_configs=cfg),
            NewTopic(t.incidents, 3, 1, topic_configs=cfg),
        ]
        existing = set(await admin.list_topics())
        new = [nt for nt in wanted if nt.name not in existing]
        if new:
            resp = await admin.create_topics(new)
            for err in getattr(resp, "topic_errors", []):
                name, code = err[0], err[1]
                if code not in (0, 36):
                    raise StackError(f"kafka: creating topic {name} failed with error code "
                                     f"{code} ({err[2] if len(err) > 2 else ''})")
        # A created topic reaches the broker's metadata cache a moment after the answer:
        # wait for it, so a service started right after finds its topics.
        deadline = time.monotonic() + 30
        while await missing_topics(settings, [nt.name for nt in wanted]):
            if time.monotonic() > deadline:
                raise StackError("kafka: created topics did not appear in the metadata "
                                 "within 30 s; see the broker's log")
            await asyncio.sleep(0.1)
        old = [nt.name for nt in wanted if nt.name in existing]
        if old:
            for resp in await admin.alter_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, name, cfg) for name in old]):
                for res in resp.resources:
                    if res[0]:
                        raise StackError(f"kafka: setting retention of topic {res[3]} failed "
                                         f"with error code {res[0]} ({res[1]})")
    finally:
        await admin.close()


class BrokerFiles:
    """Where one local broker keeps its files under the stack's state folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.properties = root / "server.properties"
        self.log_config = root / "log4j2.properties"
        self.cluster_id_file = root / "cluster.id"

    def cluster_id(self) -> str:
        """This state folder's cluster id, chosen once (adopted from a formatted folder)."""
        if self.cluster_id_file.is_file():
            return self.cluster_id_file.read_text().strip()
        cid = read_meta(self.data).get("cluster.id") or new_cluster_id()
        self.cluster_id_file.write_text(cid + "\n")
        return cid

    def check_formatted_for(self, cluster_id: str) -> bool:
        """True if the log folder is formatted for this cluster, False if not formatted;
        raises if it belongs to another cluster or node (a stale or copied folder)."""
        meta = read_meta(self.data)
        if not meta:
            return False
        if meta.get("cluster.id") != cluster_id or meta.get("node.id", str(NODE_ID)) != str(
                NODE_ID):
            raise StackError(
                f"kafka: {self.data} belongs to Kafka cluster {meta.get('cluster.id')!r} "
                f"(node {meta.get('node.id')}), not this stack's {cluster_id!r}: move that "
                f"folder away (its topics are lost) or point CITYOPS_STATE_DIR elsewhere")
        return True


def format_storage(java_exe: str, classpath: str, files: BrokerFiles) -> None:
    """``kafka-storage format`` once per state folder."""
    cid = files.cluster_id()
    if files.check_formatted_for(cid):
        return
    proc = subprocess.run(
        [java_exe, f"-Dlog4j2.configurationFile={files.log_config}", "-cp", classpath,
         "kafka.tools.StorageTool", "format", f"--cluster-id={cid}", "-c",
         str(files.properties)],
        capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise StackError(f"kafka: formatting {files.data} failed: {tail[0][:300]}")

