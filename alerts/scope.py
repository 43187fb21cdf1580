"""Scale-out of the alerts rules over N workers in one consumer group: who owns what.

Why: one worker evaluating every rule is a ceiling on the city's size. Rules split two
ways (see ``alerts.service``):

- Per-sensor rules (threshold, anomaly, absence, count per sensor, geofence, the rules'
  windows) keep state per sensor, and a sensor's events all live on one partition of the
  events topic. The worker owning that partition owns the sensor's state.
- Rules whose state spans sensors (count per landmark or district, correlation) cannot be
  judged by the owner of one events partition. Their inputs (only what the rule needs:
  the matching incident, as a ``ScopeInput``) go to the internal scope topic, keyed by the
  scope (``landmark:ninh_kieu``), and the owner of that scope partition judges them.
  Correlation reads the active alerts from the database and has no inputs to publish:
  every worker runs it, and each keeps and raises only the landmarks whose scope key
  hashes to a scope partition it owns, so exactly one worker raises each.

``Ownership`` says which events and scope partitions this worker holds right now, which
partition each sensor's state belongs to (the partition its events were read from; for
a registry sensor not heard from yet, the partition ingest's routing key would put it
on), and which partition each scope key hashes to (murmur2, as the producer picks it).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import numpy as np

from alerts.batch import SensorIndex
from cityops.kafka import partition_for


class ScopeInput(msgspec.Struct, array_like=True, frozen=True):
    """One input of a rule whose state spans sensors, as published on the scope topic.

    ``event_id`` makes a replayed input idempotent: the events worker publishes its inputs
    before it checkpoints the events offsets they came from, so after a crash it publishes
    them again, and the scoped evaluator drops an event id it has already counted.
    """

    rule_id: str
    rule_hash: str
    key: str  # the scope: "landmark:<code>" or "district:<code>"
    event_id: str
    event_time: int
    receive_time: int
    incident: str | None
    sensor_id: str
    domain: str
    type: str
    district: str
    landmark: str
    lat: float
    lon: float


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ScopeInput)


def encode_input(inp: ScopeInput) -> bytes:
    return _encoder.encode(inp)


def decode_input(data: bytes) -> ScopeInput:
    return _decoder.decode(data)


def scope_partition(key: str, partitions: int) -> int:
    """The scope-topic partition of ``key``: what ``send(key=...)`` picks (murmur2)."""
    return partition_for(key.encode(), partitions)


class Ownership:
    """The partitions of the events and scope topics this worker owns, and the partition
    each sensor and scope key belongs to.

    ``route_keys``: each registry sensor's Kafka key as ingest produces it (the gateway for
    a sensor behind one with contract v2, else the sensor id), so a registry sensor never
    heard from is judged by the one worker whose partition it will arrive on.
    """

    def __init__(self, index: SensorIndex, route_keys: Mapping[str, str] | None = None
                 ) -> None:
        self.index = index
        self.route_keys = dict(route_keys or {})
        self.events: set[int] = set()
        self.scope: set[int] = set()
        self.n_events = 1
        self.n_scope = 1
        self._predicted = np.full(0, -1, np.int32)  # per sensor code, for n_events

    def set_counts(self, n_events: int, n_scope: int) -> None:
        if n_events != self.n_events:
            self._predicted = np.full(0, -1, np.int32)
        self.n_events, self.n_scope = max(1, n_events), max(1, n_scope)

    def parts_of(self, codes: np.ndarray) -> np.ndarray:
        """Events partition of each sensor code: where its events were read from, else
        where ingest's key routes it (-1: never heard of)."""
        codes = np.asarray(codes, np.int64)
        part = self.index.clock.part
        out = np.full(codes.size, -1, np.int32)
        known = codes < part.size
        out[known] = part[codes[known]]
        missing = out < 0
        if missing.any():
            out[missing] = self._predict(codes[missing])
        return out

    def _predict(self, codes: np.ndarray) -> np.ndarray:
        ids = self.index.ids
        if self._predicted.size < len(ids):
            grown = np.full(max(64, 2 * len(ids)), -2, np.int32)  # -2: not computed yet
            grown[: self._predicted.size] = self._predicted
            self._predicted = grown
        todo = codes[self._predicted[codes] == -2]
        for c in np.unique(todo).tolist():
            sid = ids[c]
            self._predicted[c] = scope_partition(self.route_keys.get(sid, sid), self.n_events)
        return self._predicted[codes]

    def owns_codes(self, codes: np.ndarray) -> np.ndarray:
        """Mask of the sensor codes whose events partition this worker owns."""
        if codes.size == 0:
            return np.zeros(0, bool)
        return np.isin(self.parts_of(codes), np.fromiter(self.events, np.int32))

    def scope_of(self, key: str) -> int:
        return scope_partition(key, self.n_scope)

    def owns_scope(self, key: str) -> bool:
        return self.scope_of(key) in self.scope
