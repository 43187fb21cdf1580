"""What an incident is, and the change records that carry it to consoles and webhooks.

An alert says "this rule holds for this source"; an incident says "this is happening
here". Alerts of one rule whose grouping fields agree (``alerts.incidents.grouping``:
rule + street, landmark, district or gateway), raised within the rule's group interval of
each other, join one incident. Operators act on the incident; what they do acts on its
alerts and goes into both audit trails. An incident whose cause is covered by a bigger
one (a district offline over its sensors' offline alerts; a major incident on a street
over its warnings) is *inhibited*: it stays open under its cause (``inhibited_by``) and
leaves the operators' list. Times are epoch milliseconds UTC.
"""

from __future__ import annotations

from typing import Any

import msgspec

INCIDENT_ACTIONS: tuple[str, ...] = (
    "opened", "joined", "updated", "acknowledged", "assigned", "commented", "resolved",
    "inhibited", "released", "announced", "storm")


class Incident(msgspec.Struct, kw_only=True):
    incident_id: int
    group_key: str
    rule_id: str
    state: str  # open | resolved
    severity: str
    title: str  # English: for API clients and webhooks; the console renders title_args
    title_args: dict[str, Any] = {}
    domain: str = ""
    district: str = ""
    landmark: str = ""
    gateway: str = ""
    lat: float | None = None
    lon: float | None = None
    alert_count: int = 0
    active_count: int = 0
    sensor_count: int = 0
    first_seen: int
    last_seen: int
    acknowledged: bool = False
    acked_by: str | None = None
    acked_at: int | None = None
    assignee: str | None = None
    storm: bool = False
    inhibited_by: int | None = None
    announced_at: int | None = None
    announced_severity: str | None = None
    resolved_at: int | None = None
    resolved_by: str | None = None
    version: int = 1
    created_at: int
    updated_at: int


class IncidentChange(msgspec.Struct, kw_only=True):
    """One change to one incident: what the incidents topic carries and consoles stream."""

    action: str  # one of INCIDENT_ACTIONS
    actor: str
    at: int
    incident: Incident
    note: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(IncidentChange)


def encode_incident_change(change: IncidentChange) -> bytes:
    return _encoder.encode(change)


def decode_incident_change(data: bytes) -> IncidentChange:
    return _decoder.decode(data)
