"""Ingest in districts mode (``ingest_subscription = "districts"``, see ingest/mqtt.py): each
worker subscribes, without ``$share``, to ``city/<district>/#`` for its own districts.

Why the mode exists: Mosquitto 2.0.11 restores a persistent session's plain subscriptions
(and what was queued for them) after its own restart, but not a shared one, so with the
shared subscription whatever sensors publish between the broker's return and ingest's
re-subscription has no subscriber and is dropped. Here that gap is made certain: ingest
reconnects slowly (first attempt 5-10 s after the broker went away) while the publisher
keeps publishing and reconnects within 0.2 s of the broker's return, and the test checks
that the publisher really got messages acknowledged inside the gap. Districts mode must
deliver every one of them; shared mode, with the same gap, loses them (the limitation is
asserted too, so an upgraded broker that fixes it shows up here).

The split itself: two workers share the districts with nothing lost or doubled, and each
receives exactly the messages of its own districts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cityops.city import DISTRICTS
from cityops.registry import Fleet, load_fleet
from cityops.settings import Settings
from cityops.stack import Stack
from ingest.mqtt import session_client_id, subscriptions, worker_districts
from tests.support import events_in
from tests.test_ingest_reconnect import (
    SurvivingPublisher,
    end_offsets,
    event_ids_since,
    own_stack,  # noqa: F401 (a fixture: this module's own Mosquitto + Kafka)
    wait_for,
)
from tests.test_ingest_service import KafkaReader, Worker, base_time, publish_all, stream

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


def districts_mode(settings: Settings, workers: int, index: int = 0) -> Settings:
    return settings.replace(ingest_subscription="districts", ingest_workers=workers,
                            ingest_worker_index=index)


def district_of(topic: str) -> str:
    return topic.split("/")[1]  # city/{district}/...


def health(worker: Worker) -> int:
    """The worker's /healthz status; 0 when it does not answer in time (a loaded machine)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/healthz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def drop_sessions(workers: list[Worker]) -> None:
    """End the workers' persistent sessions (clean start, expiry 0): their plain
    subscriptions would otherwise queue every later test's messages for an hour."""
    for w in workers:
        st = w.settings
        c = paho.Client(CallbackAPIVersion.VERSION2,
                        client_id=session_client_id(st, w.worker_id),
                        protocol=paho.MQTTv5)
        c.username_pw_set(st.mqtt_ingest_user, st.mqtt_ingest_password)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        with contextlib.suppress(OSError):
            c.connect(st.host, st.mqtt_port, clean_start=True, properties=props)
            c.loop(1.0)
            c.disconnect()


# -- the split, without a broker ----------------------------------------------------------------
@pytest.mark.parametrize("workers", range(1, len(DISTRICTS) + 1))
def test_workers_own_every_district_exactly_once(workers: int) -> None:
    s = Settings()
    shares = [worker_districts(districts_mode(s, workers, i)) for i in range(workers)]
    owned = [d for share in shares for d in share]
    assert sorted(owned) == sorted(d.code for d in DISTRICTS)
    assert all(shares), f"a worker owns no district: {shares}"
    assert max(map(len, shares)) - min(map(len, shares)) <= 1, shares
    filters = [subscriptions(districts_mode(s, workers, i)) for i in range(workers)]
    assert all(not f.startswith("$share/") for fs in filters for f in fs)
    assert [f for fs in filters for f in fs] == [f"city/{d}/#" for d in owned]
    ids = {session_client_id(districts_mode(s, workers, i), "same-host") for i in range(workers)}
    assert len(ids) == workers, "two slots would resume one MQTT session"


def test_shared_mode_is_unchanged_and_bad_settings_are_refused() -> None:
    s = Settings()
    assert subscriptions(s) == ["$share/cityops-ingest/city/#"]
    assert session_client_id(s, "w1") == "cityops-ingest-w1"
    for bad in (districts_mode(s, 0), districts_mode(s, 2, 2), districts_mode(s, 2, -1),
                districts_mode(s, len(DISTRICTS) + 1), s.replace(ingest_subscription="topics")):
        with pytest.raises(ValueError):
            subscriptions(bad)


# -- two workers on the session stack ---------------------------------------------------------
@pytest.mark.parametrize("transport", ["asyncio", "paho-thread", "aiomqtt"])
async def test_two_workers_split_the_districts(settings: Settings, fleet: Fleet,
                                               tmp_path: Path, transport: str) -> None:
    group = f"t-{uuid.uuid4().hex[:8]}"  # its own sessions: <group>-districts-<i>-of-2
    slots = [districts_mode(settings.replace(mqtt_share_group=group,
                                             ingest_transport=transport), 2, i)
             for i in range(2)]
    n = 4_000
    msgs, want = stream(fleet, n, base_time() - n)
    per_district = collections.Counter(district_of(t) for t, _ in msgs)
    workers = [Worker(st, f"part-{i}", tmp_path / f"w{i}.log").start()
               for i, st in enumerate(slots)]
    try:
        async with KafkaReader(settings, settings.topics.events) as reader:
            await asyncio.to_thread(publish_all, settings, msgs)
            records = await reader.until(
                lambda rs: want <= {e.event_id for e in events_in(r.value for r in rs)},
                within=60)
            await asyncio.sleep(1.0)  # a doubled delivery would trail the last new one
            records = await reader.until(lambda rs: False, within=0.5)
        got = [w.metric("cityops_ingest_messages_total") for w in workers]
    finally:
        codes = [w.terminate() for w in workers]
        drop_sessions(workers)
    assert codes == [0, 0]
    ids = [e for e in (ev.event_id for ev in events_in(r.value for r in records)) if e in want]
    assert set(ids) == want, f"lost {len(want - set(ids))} of {len(want)}"
    assert len(ids) == len(want), f"{len(ids) - len(want)} events doubled"
    owed = [sum(per_district[d] for d in worker_districts(st)) for st in slots]
    assert got == owed, f"messages per worker {got}, their districts published {owed}"
    assert all(got), got
    print(f"districts split ({transport}) {n} messages as {got}: "
          f"{[worker_districts(st) for st in slots]}")


# -- an unplanned broker restart while the publisher keeps going ------------------------------
async def unplanned_mqtt_restart(stack: Stack, slots: list[Settings], fleet: Fleet,
                                 tmp_path: Path, n: int, quiet_s: float | None = None
                                 ) -> tuple[list[str], set[str], int]:
    """Publish ``n`` messages; a third of the way in, stop Mosquitto (SIGTERM), start it
    again after a second, and let the publisher carry on at once. Returns the event ids in
    Kafka, the ids published, and how many messages the broker acknowledged to the
    publisher while no ingest worker was subscribed (the gap)."""
    st0 = slots[0]
    msgs, want = stream(fleet, n, base_time() - n)
    workers = [Worker(st, f"unpl-{i}", tmp_path / f"w{i}.log").start()
               for i, st in enumerate(slots)]
    start = await end_offsets(st0)
    pub = SurvivingPublisher(st0, msgs).start()
    try:
        await wait_for(lambda: len(pub.acked) >= n // 3, 60, "publisher never got going")
        await asyncio.to_thread(stack.server("mqtt").down)
        await wait_for(lambda: all(health(w) == 503 for w in workers), 10,
                       "/healthz stayed healthy")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(stack.server("mqtt").up)
        back = len(pub.acked)
        await wait_for(lambda: all(health(w) == 200 for w in workers), 30,
                       "ingest never reconnected")
        in_gap = len(pub.acked) - back
        await asyncio.to_thread(pub.join, 90)
        ids = await event_ids_since(st0, start, want, within=30, quiet_s=quiet_s)
        for w in workers:
            assert w.proc is not None and w.proc.poll() is None, \
                "ingest exited:\n" + w.log.read_text()[-3000:]
            assert w.metric("cityops_ingest_mqtt_reconnects_total") >= 1
    except BaseException:
        for w in workers:
            print(w.log.read_text()[-3000:])
        raise
    finally:
        codes = [w.terminate() for w in workers]
        drop_sessions(workers)
    assert codes == [0] * len(workers)
    return ids, want, in_gap


# Ingest's first reconnect attempt comes 5-10 s after the broker went away (the broker is
# back after ~1-2 s), the publisher's within 0.2 s of its return: a certain gap.
SLOW_RECONNECT = {"ingest_reconnect_min_ms": 10_000, "ingest_reconnect_max_ms": 10_000}


# paho-thread is left out, as in tests/test_ingest_reconnect.py: paho reconnects on its own
# schedule, without the service (or /healthz) seeing the connection go, so the gap cannot
# be placed; its subscribing is covered by the split test.
@pytest.mark.parametrize("transport", ["asyncio", "aiomqtt"])
async def test_districts_mode_loses_nothing_when_mosquitto_restarts_under_load(
        own_stack: Stack, fleet: Fleet, tmp_path: Path, transport: str) -> None:  # noqa: F811
    base = own_stack.settings.replace(mqtt_share_group=f"u-{uuid.uuid4().hex[:6]}",
                                      ingest_transport=transport, **SLOW_RECONNECT)
    slots = [districts_mode(base, 2, i) for i in range(2)]
    ids, want, in_gap = await unplanned_mqtt_restart(own_stack, slots, fleet, tmp_path, 6000)
    assert in_gap > 0, "the publisher published nothing before ingest re-subscribed: no test"
    got = set(ids)
    assert want <= got, (f"districts mode ({transport}): lost {len(want - got)} of "
                         f"{len(want)}; {in_gap} were published before ingest re-subscribed")
    assert got <= want
    print(f"districts mode ({transport}): unplanned Mosquitto restart, {in_gap} messages "
          f"published before ingest re-subscribed, all {len(want)} in Kafka, "
          f"{len(ids) - len(want)} redelivered duplicates (same event ids)")


async def test_shared_mode_loses_what_arrives_before_ingest_resubscribes(
        own_stack: Stack, fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    """The Mosquitto 2.0.11 limitation districts mode exists for, made visible: with the
    same certain gap, the shared subscription is not restored and those messages are gone.
    (If this starts failing, the broker restores shared subscriptions now: revisit
    ingest/mqtt.py and the planned-restart note in tests/test_e2e_faults.py.)"""
    base = own_stack.settings.replace(mqtt_share_group=f"s-{uuid.uuid4().hex[:6]}",
                                      **SLOW_RECONNECT)
    ids, want, in_gap = await unplanned_mqtt_restart(own_stack, [base], fleet, tmp_path, 6000,
                                                     quiet_s=5.0)
    assert in_gap > 0, "the publisher published nothing before ingest re-subscribed: no test"
    lost = len(want - set(ids))
    assert lost > 0, f"shared mode lost nothing although {in_gap} arrived in the gap"
    print(f"shared mode: unplanned Mosquitto restart lost {lost} of {len(want)} "
          f"({in_gap} published before ingest re-subscribed)")
