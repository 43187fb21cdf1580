"""Cross-check with the simulators' own encoders (written independently from PAYLOADS.md):
what they send must normalize to the measurements they say the contract expects, and
what they corrupt must be dead-lettered with the reason they intend."""

from __future__ import annotations

import pytest

from cityops.registry import Fleet, Sensor, load_fleet
from cityops.settings import Settings
from ingest import samples
from ingest.normalize import InboundMessage, Normalizer
from simulators import vendors as v

T = 1_795_312_800_123
RECV = T + 2_000


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(Settings().fleet_file)


@pytest.fixture(scope="module")
def norm(fleet: Fleet) -> Normalizer:
    return Normalizer(fleet, Settings())


def encoded(fleet: Fleet) -> list[tuple[Sensor, v.Encoded]]:
    """One simulator-encoded payload per (vendor, type, shape) of the fleet."""
    each = samples.one_of_each(fleet)
    out: list[tuple[Sensor, v.Encoded]] = []

    def add(key: tuple[str, str], items: list[v.Encoded]) -> None:
        out.extend((each[key], e) for e in items)

    i = lambda key: [each[key].sensor_id]  # noqa: E731
    add(("saomai", "lane_detector"), v.saomai_traffic(i(("saomai", "lane_detector")), [T], [60],
                                                      [120], [14], [2], [1], [32.46], [0.183]))
    add(("mekongflow", "traffic_camera"), v.mekongflow_traffic(
        i(("mekongflow", "traffic_camera")), [T], [90], [120], [14], [2], [1], [32.5], [0.18]))
    add(("compact", "lane_detector"), v.compact_traffic(
        i(("compact", "lane_detector")), [T], [60], [120], [14], [2], [1], [32.5], [0.18]))
    for phase, fault in (("red", False), ("flashing", True)):
        add(("saomai", "traffic_signal"), v.saomai_signal(i(("saomai", "traffic_signal")), [T],
                                                          [phase], [fault]))
    add(("guardeye", "cctv"), v.guardeye_stats(i(("guardeye", "cctv")), [T], [140], [1.8]))
    add(("guardeye", "cctv"), v.guardeye_event(i(("guardeye", "cctv")), [T], ["fight"],
                                               [0.91], [4], [0.2]))
    add(("guardeye", "door_sensor"), v.guardeye_event(i(("guardeye", "door_sensor")), [T],
                                                      ["door_open"], [1.0], [0], [0.0]))
    add(("safecity", "cctv"), v.safecity(i(("safecity", "cctv")) * 2, [T, T + 1],
                                         ["HEARTBEAT", "crowd_density"],
                                         [{"people": 30, "density": 0.6},
                                          {"people": 300, "density": 4.5}]))
    add(("safecity", "door_sensor"), v.safecity(i(("safecity", "door_sensor")), [T],
                                                ["door_forced"], [{"door_open": True}]))
    add(("safecity", "panic_button"), v.safecity(i(("safecity", "panic_button")), [T],
                                                 ["panic"], [{}]))
    add(("visitcount", "footfall_counter"), v.visitcount_footfall(
        i(("visitcount", "footfall_counter")), [T], [60], [34], [20]))
    add(("compact", "footfall_counter"), v.compact_footfall(
        i(("compact", "footfall_counter")), [T], [60], [340], [310]))
    add(("probenet", "footfall_counter"), v.probenet_footfall(
        i(("probenet", "footfall_counter")), [T], [60], [34], [20]))
    add(("visitcount", "boat_counter"), v.visitcount_boats(
        i(("visitcount", "boat_counter")), [T], [120], [42]))
    add(("visitcount", "hotel"), v.visitcount_hotel(i(("visitcount", "hotel")), [T], [120], [90]))
    add(("probenet", "hotel"), v.probenet_hotel(i(("probenet", "hotel")), [T], [3600], [80],
                                                [61]))
    add(("probenet", "wifi_probe"), v.probenet_probe(
        i(("probenet", "wifi_probe")), [T], [300],
        [[("VN", 400), ("KR", 40), ("GB", 7), ("TW", 3), ("XX", 50)]]))
    return out


def test_simulator_payloads_normalize_to_their_expected_measurements(
        norm: Normalizer, fleet: Fleet) -> None:
    cases = encoded(fleet)
    msgs = [InboundMessage(samples.topic_of(s), payload, RECV) for s, (payload, _, _) in cases]
    events, dead = norm.normalize(msgs)
    assert dead == []
    assert len(events) == len(cases)
    for ev, (s, (_, event_time, expected)) in zip(events, cases, strict=True):
        assert ev.sensor_id == s.sensor_id
        assert ev.event_time == event_time
        got = {k: val for k, val in ev.measurements.items()
               if not (k.startswith("visitors_") and val == 0 and k not in expected)}
        assert got == pytest.approx({k: float(x) for k, x in expected.items()}), s.sensor_id
    kinds = [(e.kind, e.incident) for e in events]
    assert ("incident", "signal_fault") in kinds and ("incident", "fight") in kinds
    assert ("incident", "crowd_density") in kinds and ("incident", "panic") in kinds


def test_simulator_gateway_batches_are_accepted(norm: Normalizer, fleet: Fleet) -> None:
    for gw, members in fleet.gateways().items():
        elements, compact = [], []
        for s in members:
            sid = [s.sensor_id]
            if s.vendor == "compact":
                (p, _, _), = v.compact_traffic(sid, [T], [60], [1], [2], [3], [4], [30.0], [0.1])
            elif s.vendor == "mekongflow":
                (p, _, _), = v.mekongflow_traffic(sid, [T], [60], [1], [2], [3], [4], [30.0],
                                                  [0.1])
            else:
                (p, _, _), = v.probenet_probe(sid, [T], [300], [[("VN", 5)]])
            elements.append(p)
            compact.append(s.vendor == "compact")
        payload = v.gateway_batch(gw, T, elements, compact)
        events, dead = norm.normalize([InboundMessage(
            samples.gateway_topic(members[0].district, gw), payload, RECV)])
        assert dead == [] and [e.sensor_id for e in events] == [s.sensor_id for s in members]


def test_simulator_malformations_get_the_intended_reason(norm: Normalizer,
                                                         fleet: Fleet) -> None:
    checked = 0
    for s, (payload, _, _) in encoded(fleet):
        for reason in v.supported_malformations(s.vendor, payload, in_gateway=False):
            fake = s.sensor_id.replace(f"-{s.vendor[:2]}", "-zz")
            bad = v.malform(s.vendor, payload, reason, s.sensor_id, fake)
            topic = samples.topic_of(s)
            if reason == "unknown_sensor":
                topic = topic.replace(s.sensor_id, fake)
            _, dead = norm.normalize([InboundMessage(topic, bad, RECV)])
            assert [d.reason for d in dead] == [reason], (s.sensor_id, reason, bad)
            checked += 1
    assert checked > 40
