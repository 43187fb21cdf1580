"""Device identities: one MQTT account per sensor, gateway or vendor bridge.

Why: with one shared sensor account, any sensor (or anyone holding its password) could
publish readings for any other sensor in any district. Now every device that connects
has its own identity, and the broker's ACL binds an identity to its own topics:

- a sensor (not behind a gateway) may publish only on ``<root>/+/+/+/<its id>``;
- a gateway only on ``<root>/+/gateway/<its id>`` (ingest then checks that every reading
  in the batch belongs to that gateway in the registry, else ``not_owner``);
- a *bridge* (a vendor's cloud publishing for many devices over a few connections) only
  under its topic filters, by default one district: ``<root>/<district>/#``.

Sensors and gateways need no ACL line of their own: two ``pattern`` lines with ``%u``
cover them all, so the same ACL file serves every fleet (deploy/mosquitto/acl; production
uses it with client certificates, the certificate's CN being the username). Bridges get
``user``/``topic`` lines rendered from this store.

The local stack keeps its identities in ``<state>/devices.json`` (0600), passwords in
clear, because its simulators impersonate the devices and must log in as them;
``cityops devices add|rotate`` also prints a new password once (or writes it to a file).
Mosquitto's password file is rebuilt from the store: identities hashed once, when their
password is set (``mosquitto_passwd -U`` over a batch; one call per user is O(n^2),
35 ms per user on a 7,000-line file), so ``stack up`` and ``devices`` stay fast at
tens of thousands of identities. A ``SIGHUP`` makes Mosquitto re-read both files:
a revoked identity is refused at its next CONNECT.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cityops.errors import ConfigError
from cityops.registry import Fleet
from cityops.settings import Settings, new_secret

DEVICES_FILE = "devices.json"
KINDS = ("sensor", "gateway", "bridge")
# What a username may look like: what the registry's ids, gateway ids and bridge names use.
# Never '+', '#' or '/' (an ACL pattern with such a %u would widen to other topics) nor ':'
# (the password file's separator).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class DeviceError(ConfigError):
    """A device identity cannot be added, rotated or revoked; the message says why."""


@dataclass(frozen=True, slots=True)
class Identity:
    """One MQTT account of a device, gateway or bridge."""

    name: str
    kind: str
    password: str
    topics: tuple[str, ...] = ()  # bridges: the topic filters it may publish on
    created_ms: int = 0
    hashed: str = ""  # Mosquitto's hash of ``password`` ($7$...), filled when written


@dataclass
class DeviceStore:
    """The local stack's device identities (``<state>/devices.json``)."""

    path: Path
    identities: dict[str, Identity] = field(default_factory=dict)
    # Revoked names stay revoked: provisioning the fleet at `stack up` skips them until an
    # operator adds them again on purpose.
    revoked: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, settings: Settings) -> DeviceStore:
        path = Path(settings.state_dir) / DEVICES_FILE
        store = cls(path)
        if path.is_file():
            doc = json.loads(path.read_text())
            for rec in doc.get("identities", []):
                rec["topics"] = tuple(rec.get("topics", ()))
                ident = Identity(**rec)
                store.identities[ident.name] = ident
            store.revoked = set(doc.get("revoked", []))
        return store

    def save(self) -> None:
        """Write the store atomically, 0600 from the start (it holds passwords)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": 1,
               "identities": [asdict(i) for i in sorted(self.identities.values(),
                                                        key=lambda i: i.name)],
               "revoked": sorted(self.revoked)}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".devices-")
        with os.fdopen(fd, "w") as fh:  # mkstemp: 0600
            json.dump(doc, fh, indent=0)
        os.replace(tmp, self.path)

    # -- changes ----------------------------------------------------------------------
    def add(self, name: str, kind: str, topics: Iterable[str] = (),
            password: str | None = None) -> Identity:
        check_name(name)
        if kind not in KINDS:
            raise DeviceError(f"unknown identity kind {kind!r} (one of {', '.join(KINDS)})")
        if name in self.identities:
            raise DeviceError(f"{name} already has credentials: `cityops devices rotate "
                              f"{name}` gives it a new password")
        topics = tuple(topics)
        if kind == "bridge" and not topics:
            raise DeviceError(f"bridge {name} needs the topics it may publish on")
        ident = Identity(name, kind, password or new_secret(), topics,
                         int(time.time() * 1000))
        self.identities[name] = ident
        self.revoked.discard(name)
        return ident

    def rotate(self, name: str) -> Identity:
        old = self._get(name)
        ident = replace(old, password=new_secret(), hashed="")
        self.identities[name] = ident
        return ident

    def revoke(self, name: str) -> Identity:
        ident = self._get(name)
        del self.identities[name]
        self.revoked.add(name)
        return ident

    def _get(self, name: str) -> Identity:
        try:
            return self.identities[name]
        except KeyError:
            raise DeviceError(f"no device identity {name!r} (see `cityops devices list`)"
                              ) from None

    def provision_fleet(self, fleet: Fleet, root: str) -> list[Identity]:
        """Give every device of ``fleet`` that connects itself an identity, as its
        ``[fleet] identities`` says: ``devices`` (one per sensor not behind a gateway and
        one per gateway) or ``bridges`` (one per district: the load fleets, which publish
        thousands of sensors over a few connections). Existing and revoked names are left
        alone. Returns what was added."""
        added = []
        for name, kind, topics in fleet_identities(fleet, root):
            if name not in self.identities and name not in self.revoked:
                added.append(self.add(name, kind, topics))
        return added

    # -- for the broker -------------------------------------------------------------------
    def hash_new(self, tool: str) -> int:
        """Hash the passwords not hashed yet, in one ``mosquitto_passwd -U`` call."""
        todo = [i for i in self.identities.values() if not i.hashed]
        if not todo:
            return 0
        hashed = hash_passwords(tool, [(i.name, i.password) for i in todo])
        for ident in todo:
            self.identities[ident.name] = replace(ident, hashed=hashed[ident.name])
        return len(todo)

    def acl_lines(self) -> str:
        """``user``/``topic write`` lines of the bridges (devices are covered by patterns)."""
        out = []
        for ident in sorted(self.identities.values(), key=lambda i: i.name):
            if ident.kind == "bridge":
                out.append(f"user {ident.name}")
                out.extend(f"topic write {t}" for t in ident.topics)
                out.append("")
        return "\n".join(out)


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise DeviceError(f"{name[:80]!r} is not a usable device name (letters, digits, "
                          "'.', '_', '-'; no '/', '+', '#', ':' or spaces)")


def fleet_identities(fleet: Fleet, root: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(name, kind, topics) of the identities ``fleet`` connects with.

    Every fleet gets one bridge per district. A ``bridges`` fleet publishes everything
    through them; a ``devices`` fleet only what no device identity can publish: the
    simulator's deliberate readings from ids provisioned nowhere (``unknown_sensor``),
    which reach ingest as a vendor cloud forwarding a stray reading would send them.
    """
    districts = sorted({s.district for s in fleet})
    out: list[tuple[str, str, tuple[str, ...]]] = [
        (bridge_name(d), "bridge", (f"{root}/{d}/#",)) for d in districts]
    if fleet.identities == "devices":
        out += [(s.sensor_id, "sensor", ()) for s in fleet if s.gateway is None]
        out += [(gw, "gateway", ()) for gw in sorted(fleet.gateways())]
    return out


def bridge_name(district: str) -> str:
    return f"bridge-{district}"


def hash_passwords(tool: str, users: list[tuple[str, str]]) -> dict[str, str]:
    """Mosquitto password hashes of ``users``: a plaintext file hashed in place by one
    ``mosquitto_passwd -U`` (0.9 s for 7,000 users; the tool re-hashes every line, so it
    only ever sees plaintext ones)."""
    fd, tmp = tempfile.mkstemp(prefix="cityops-passwd-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.writelines(f"{u}:{p}\n" for u, p in users)
        subprocess.run([tool, "-U", tmp], check=True, capture_output=True)
        out = {}
        for line in Path(tmp).read_text().splitlines():
            user, _, hashed = line.partition(":")
            out[user] = hashed
        return out
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_password_file(path: Path, tool: str, services: list[tuple[str, str]],
                        store: DeviceStore) -> None:
    """The broker's password file: the platform's own accounts, then every device.
    Written to a temporary file and renamed, so a reload never reads half a file."""
    lines = [f"{u}:{h}\n" for u, h in hash_passwords(tool, services).items()]
    lines += [f"{i.name}:{i.hashed}\n" for i in sorted(store.identities.values(),
                                                       key=lambda i: i.name)]
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
        fh.writelines(lines)
    os.replace(tmp, path)


def credentials(settings: Settings) -> dict[str, Identity]:
    """The identities the local simulators log in with (empty without a local stack)."""
    return DeviceStore.load(settings).identities


def apply(settings: Settings, store: DeviceStore) -> bool:
    """Save ``store`` and hand it to the local broker: password file and ACL rewritten,
    then SIGHUP (Mosquitto re-reads both; a connected client keeps its session, a new
    CONNECT is checked against the new files). Returns True if a running broker was told."""
    from cityops.stack.servers import Mosquitto

    mqtt = Mosquitto(settings)
    mqtt.write_config(store)  # hashes what is new, and saves the store with the hashes
    store.save()
    return mqtt.reload_acl()
