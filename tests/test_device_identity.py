"""Every device its own identity (issue 14): the broker binds an identity to its own
topics, ingest binds a topic's device to the sensors its payload names (``not_owner``),
and a revoked identity is refused at its next connect.

Against the real Mosquitto of the session stack (and, for revocation, a private one, so
no other test loses a device). Mosquitto drops a forbidden publish silently and still
PUBACKs it, so "refused by the broker" is asserted where it matters: nothing of it
reaches a subscriber, ingest or Kafka (and what is not on the events topic is never
stored: the processors read nothing else).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cityops.devices import (
    DeviceError,
    DeviceStore,
    Identity,
    bridge_name,
    fleet_identities,
)
from cityops.registry import Fleet, Sensor, load_fleet
from cityops.settings import PROJECT_ROOT, Settings
from cityops.stack import Stack
from ingest import samples
from ingest.contract import DEADLETTER_REASONS, decode_deadletter
from ingest.normalize import InboundMessage, Normalizer
from ingest.service import IngestService
from tests.support import (
    NOT_AUTHORIZED,
    events_in,
    isolated_settings,
    mqtt_login,
    wait_for_login,
)
from tests.test_ingest_service import KafkaReader, base_time, own_group, running, stop

pytestmark = pytest.mark.timeout(180)
T = 1_795_300_000_000
RECV = T + 1_000


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


def direct(fleet: Fleet, vendor: str, district: str | None = None,
           not_district: str | None = None) -> Sensor:
    return next(s for s in fleet if s.gateway is None and s.vendor == vendor
                and s.type != "traffic_signal"
                and (district is None or s.district == district)
                and (not_district is None or s.district != not_district))


def two_gateways(fleet: Fleet) -> tuple[str, list[Sensor], str, list[Sensor]]:
    """Two gateways of the same vendor (their readings are interchangeable in format)."""
    gws = fleet.gateways()
    by_vendor: dict[str, list[str]] = {}
    for g, members in gws.items():
        by_vendor.setdefault(members[0].vendor, []).append(g)
    g1, g2 = next(v for v in by_vendor.values() if len(v) >= 2)[:2]
    return g1, gws[g1], g2, gws[g2]


# -- ingest: the payload's sensors must belong to the topic's device ------------------------
def test_a_gateway_reporting_a_sensor_not_behind_it_is_not_owner(fleet: Fleet) -> None:
    norm = Normalizer(fleet, Settings())
    g1, own, _, others = two_gateways(fleet)
    stranger = others[0]  # same vendor, behind the other gateway
    loner = direct(fleet, own[0].vendor) if any(
        s.gateway is None and s.vendor == own[0].vendor for s in fleet) else None
    docs = [samples.reading(s, T) for s in own] + [samples.reading(stranger, T)]
    if loner is not None:
        docs.append(samples.reading(loner, T))
    topic, payload = samples.gateway_message(g1, own, T, readings=docs)
    events, dead = norm.normalize([InboundMessage(topic, payload, RECV)])
    assert [e.sensor_id for e in events] == [s.sensor_id for s in own]  # the rest goes on
    # One dead letter per gateway message, whatever it refused (issue 14: no amplification).
    (letter,) = dead
    assert letter.reason == "not_owner" and letter.bad_readings == (2 if loner else 1)
    assert letter.sensor_id is None and stranger.sensor_id in letter.detail
    assert json.loads(letter.payload)["readings"] == docs  # the whole message, raw
    assert "not_owner" in DEADLETTER_REASONS


def test_a_device_naming_another_sensor_in_its_payload_is_not_owner(fleet: Fleet) -> None:
    norm = Normalizer(fleet, Settings())
    me = direct(fleet, "saomai")
    other = next(s for s in fleet if s.gateway is None and s.vendor == "saomai"
                 and s.type == me.type and s.sensor_id != me.sensor_id)
    events, dead = norm.normalize([InboundMessage(
        samples.topic_of(me), samples.encode(samples.reading(other, T)), RECV)])
    assert events == [] and [d.reason for d in dead] == ["not_owner"]
    # ...and a sensor using the gateway topic of its own name owns no gateway readings
    topic = samples.gateway_topic(me.district, me.sensor_id)
    payload = json.dumps({"gateway": me.sensor_id, "sent_at": T,
                          "readings": [samples.reading(other, T)]}).encode()
    events, dead = norm.normalize([InboundMessage(topic, payload, RECV)])
    assert events == [] and [d.reason for d in dead] == ["not_owner"]


# -- the store ---------------------------------------------------------------------------------
def test_fleet_identities_devices_and_bridges(fleet: Fleet, tmp_path: Path) -> None:
    names = {n: k for n, k, _ in fleet_identities(fleet, "city")}
    assert all(names[s.sensor_id] == "sensor" for s in fleet if s.gateway is None)
    assert not any(s.sensor_id in names for s in fleet if s.gateway)  # the gateway connects
    assert all(names[g] == "gateway" for g in fleet.gateways())
    assert {n for n, k in names.items() if k == "bridge"} == {
        bridge_name(d) for d in {s.district for s in fleet}}
    load = load_fleet(PROJECT_ROOT / "simulators" / "fleets" / "load.toml")
    assert load.identities == "bridges"
    assert {k for _, k, _ in fleet_identities(load, "city")} == {"bridge"}

    store = DeviceStore(tmp_path / "devices.json")
    added = store.provision_fleet(fleet, "city")
    assert len(added) == len(names) and len({i.password for i in added}) == len(added)
    first = next(i for i in added if i.kind == "sensor")
    store.revoke(first.name)
    store.save()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    again = DeviceStore.load(Settings(state_dir=tmp_path))
    assert again.provision_fleet(fleet, "city") == []  # a revoked device stays revoked
    assert first.name not in again.identities and first.name in again.revoked
    assert "user bridge-ninh_kieu\ntopic write city/ninh_kieu/#" in again.acl_lines()
    for bad in ("a/b", "x+", "#", "a:b", "", "with space"):
        with pytest.raises(DeviceError):
            again.add(bad, "sensor")
    with pytest.raises(DeviceError):
        again.add(next(iter(again.identities)), "sensor")  # already there: rotate instead


# -- the broker --------------------------------------------------------------------------------
class Publisher:
    """One identity's QoS 1 connection; ``send`` returns when Mosquitto acknowledged (which
    it does for a forbidden publish too)."""

    def __init__(self, settings: Settings, ident: Identity) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"id-{uuid.uuid4().hex[:8]}")
        self.c.username_pw_set(ident.name, ident.password)
        self.c.connect(settings.mqtt_host, settings.mqtt_port)
        self.c.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Subscriber:
    """The operators' read-only account, subscribed to the whole city tree."""

    def __init__(self, settings: Settings) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ops-{uuid.uuid4().hex[:8]}")
        self.c.username_pw_set(settings.mqtt_admin_user, settings.mqtt_admin_password)
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload))
        subscribed = []
        self.c.on_subscribe = lambda *_: subscribed.append(1)
        self.c.connect(settings.mqtt_host, settings.mqtt_port)
        self.c.loop_start()
        self.c.subscribe(f"{settings.mqtt_topic_root}/#", qos=1)
        deadline = time.monotonic() + 10
        while not subscribed and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


async def test_an_identity_cannot_publish_for_another_sensor_gateway_or_district(
        settings: Settings, fleet: Fleet) -> None:
    st = own_group(settings)
    ids = DeviceStore.load(st).identities
    t0 = base_time()
    me = direct(fleet, "saomai")
    victim = direct(fleet, "mekongflow", not_district=me.district)
    g1, own, g2, others = two_gateways(fleet)
    bridge = ids[bridge_name(me.district)]
    mine = samples.device_message(me, t0)
    # broker: dropped (another sensor's topic, another gateway's, another district's bridge)
    forged = samples.device_message(victim, t0 + 1)
    forged_gw = samples.gateway_message(g2, others, t0 + 2)
    bridge_elsewhere = samples.device_message(victim, t0 + 3)
    # broker lets through (the identity's own topics), ingest refuses
    wrong_district = (samples.topic_of(me).replace(f"/{me.district}/", f"/{victim.district}/"),
                      samples.encode(samples.reading(me, t0 + 4)))
    twin = next(x for x in fleet if x.gateway is None and x.vendor == me.vendor
                and x.type == me.type and x.sensor_id != me.sensor_id)  # same format
    names_victim = (samples.topic_of(me), samples.encode(samples.reading(twin, t0 + 5)))
    as_gateway = (samples.gateway_topic(me.district, me.sensor_id), json.dumps(
        {"gateway": me.sensor_id, "sent_at": t0 + 6,
         "readings": [samples.reading(victim, t0 + 6)]}).encode())
    gw_batch = samples.gateway_message(g1, own, t0 + 7, readings=[
        *(samples.reading(s, t0 + 7) for s in own), samples.reading(others[0], t0 + 7)])

    victim_ids = {victim.sensor_id, twin.sensor_id, *(s.sensor_id for s in others)}
    service = IngestService(st, f"own-{uuid.uuid4().hex[:6]}")
    sub = Subscriber(st)
    async with KafkaReader(st, st.topics.events) as events, \
            KafkaReader(st, st.topics.deadletter) as dlq:
        task = await running(service)
        try:
            pubs = {n: Publisher(st, ids[n]) for n in (me.sensor_id, g1)}
            pubs["bridge"] = Publisher(st, bridge)
            try:
                for topic, payload in (mine, forged, forged_gw, wrong_district, names_victim,
                                       as_gateway):
                    await asyncio.to_thread(pubs[me.sensor_id].send, topic, payload)
                await asyncio.to_thread(pubs[g1].send, *forged_gw)  # its own id, wrong topic
                await asyncio.to_thread(pubs[g1].send, *gw_batch)
                if victim.district != me.district:
                    await asyncio.to_thread(pubs["bridge"].send, *bridge_elsewhere)
            finally:
                for p in pubs.values():
                    p.close()
            own_ids = {me.sensor_id, *(s.sensor_id for s in own)}
            evs = await events.until(lambda rs: own_ids <= {
                e.sensor_id for e in events_in(r.value for r in rs) if e.event_time >= t0})
            letters = [decode_deadletter(r.value) for r in await dlq.until(
                lambda rs: sum(decode_deadletter(r.value).received_at >= t0 - 60_000
                               and decode_deadletter(r.value).mqtt_topic in
                               {wrong_district[0], names_victim[0], as_gateway[0], gw_batch[0]}
                               for r in rs) >= 4)]
            await asyncio.sleep(1.0)  # anything forged that got through would show by now
            evs = events_in(r.value for r in events.records)
        finally:
            await stop(service, task)
            sub.close()
    seen = {t for t, _ in sub.got}
    # refused by the broker: nobody subscribed saw them
    assert forged[0] not in seen and not any(p == forged_gw[1] for _, p in sub.got)
    assert not any(p == bridge_elsewhere[1] for _, p in sub.got)
    assert mine[0] in seen and gw_batch[0] in seen
    # and nothing of a victim became an event (so nothing of it can be stored)
    recent = [e for e in evs if e.event_time >= t0]
    assert not victim_ids & {e.sensor_id for e in recent}, recent
    assert {e.sensor_id for e in recent} >= {me.sensor_id, *(s.sensor_id for s in own)}
    reasons = {(d.mqtt_topic, d.reason) for d in letters if d.received_at >= t0 - 60_000}
    assert (wrong_district[0], "bad_topic") in reasons
    assert (names_victim[0], "not_owner") in reasons
    assert (as_gateway[0], "not_owner") in reasons
    assert (gw_batch[0], "not_owner") in reasons


# -- revocation --------------------------------------------------------------------------------
@pytest.fixture
def private_broker() -> Iterator[Settings]:
    """A Mosquitto of its own with the default fleet's identities (revoking a device in
    the session's broker would take it from every later test)."""
    state = Path(tempfile.mkdtemp(prefix="cityops-ident-", dir=os.environ.get("CITYOPS_TEST_TMP")))
    state.chmod(0o755)
    st = Stack(isolated_settings(state))
    try:
        st.up(only=["mqtt"])
        yield st.settings
    finally:
        st.down()
        shutil.rmtree(state, ignore_errors=True)


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CITYOPS_STATE_DIR": str(settings.state_dir),
           "CITYOPS_MQTT_PORT": str(settings.mqtt_port)}
    return subprocess.run([sys.executable, "-m", "cityops.cli", "devices", *args], env=env,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)


def test_revoked_credentials_are_refused_at_the_next_connect(private_broker: Settings,
                                                             tmp_path: Path) -> None:
    s = private_broker
    store = DeviceStore.load(s)
    a, b = [i for i in store.identities.values() if i.kind == "sensor"][:2]
    assert mqtt_login(s, a.name, a.password) == 0
    assert mqtt_login(s, a.name, "wrong") == NOT_AUTHORIZED
    connected = []
    other = paho.Client(CallbackAPIVersion.VERSION2, client_id="bystander")
    other.username_pw_set(b.name, b.password)
    other.on_connect = lambda *x: connected.append(str(x[3]))
    other.connect(s.mqtt_host, s.mqtt_port)
    other.loop_start()
    try:
        res = cli(s, "revoke", a.name)
        assert res.returncode == 0 and "broker reloaded" in res.stdout, res.stderr
        wait_for_login(s, a.name, a.password, accepted=False)
        assert mqtt_login(s, a.name, a.password) == NOT_AUTHORIZED  # CONNACK
        assert other.is_connected() and connected == ["Success"]  # bystanders keep going
        listed = cli(s, "list").stdout
        assert any(ln.split()[:2] == [a.name, "revoked"] for ln in listed.splitlines())

        # added again: a new password, printed once (here: to a file)
        pw_file = tmp_path / "a.pw"
        res = cli(s, "add", a.name, "--password-file", str(pw_file))
        assert res.returncode == 0, res.stderr
        new = pw_file.read_text().strip()
        assert new != a.password and new not in res.stdout
        assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
        wait_for_login(s, a.name, new, accepted=True)
        assert mqtt_login(s, a.name, a.password) == NOT_AUTHORIZED

        # rotated: the old password stops working, the new one works
        res = cli(s, "rotate", a.name)
        assert res.returncode == 0, res.stderr
        rotated = res.stdout.split("password ")[1].split()[0]
        wait_for_login(s, a.name, rotated, accepted=True)
        assert mqtt_login(s, a.name, new) == NOT_AUTHORIZED

        # what cannot be added is one clear line
        res = cli(s, "add", "not-in-the-fleet")
        assert res.returncode == 2 and "neither a sensor nor a gateway" in res.stderr
        behind = next(x for x in load_fleet(s.fleet_file) if x.gateway)
        res = cli(s, "add", behind.sensor_id)
        assert res.returncode == 2 and behind.gateway in res.stderr
    finally:
        other.disconnect()
        other.loop_stop()
