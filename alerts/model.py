"""The alert domain: severities, what a rule says about a source, and what operators see.

A rule evaluator never touches the database: it emits ``Signal``s (raise, update, clear)
keyed by ``(rule_id, source)``. The lifecycle turns signals into ``Alert`` rows, one active
alert per key, and every change into an ``AlertChange`` on the alerts topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec


class Severity(StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"
    INFO = "info"


SEVERITY_RANK: dict[str, int] = {s.value: i for i, s in enumerate(Severity)}


class SignalKind(StrEnum):
    RAISE = "raise"
    UPDATE = "update"
    CLEAR = "clear"


@dataclass(slots=True)
class Signal:
    """A rule's verdict on one source at one moment (event time, epoch ms)."""

    kind: SignalKind
    rule_id: str
    source: str
    at_ms: int
    severity: str = "warning"
    title: str = ""
    message: str = ""
    value: float | None = None
    sensor_id: str | None = None
    domain: str = ""
    district: str = ""
    landmark: str = ""
    lat: float | None = None
    lon: float | None = None
    receive_ms: int | None = None  # ingest receive time of the triggering event (latency)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.rule_id, self.source)


class Alert(msgspec.Struct, kw_only=True):
    """An alert as stored, published and shown (times are epoch ms)."""

    alert_id: int
    rule_id: str
    source: str
    severity: str
    state: str  # active | cleared
    acknowledged: bool
    acked_by: str | None = None
    acked_at: int | None = None
    assignee: str | None = None
    title: str
    message: str = ""
    domain: str = ""
    district: str = ""
    landmark: str = ""
    sensor_id: str | None = None
    lat: float | None = None
    lon: float | None = None
    value: float | None = None
    details: dict[str, Any] = {}
    updates: int = 0
    version: int = 1
    escalation_level: int = 0
    escalated_at: int | None = None
    first_event_time: int | None = None
    last_event_time: int | None = None
    raised_at: int
    updated_at: int
    cleared_at: int | None = None
    cleared_by: str | None = None
    incident_id: int | None = None  # the incident it belongs to (alerts.incidents)


class AlertChange(msgspec.Struct, kw_only=True):
    """One change to one alert: what the alerts topic carries and the console streams."""

    action: str  # raised | updated | cleared | acknowledged | assigned | commented | escalated
    actor: str
    at: int
    alert: Alert
    note: str | None = None


ACTIONS: tuple[str, ...] = ("raised", "updated", "cleared", "acknowledged", "assigned",
                            "commented", "escalated")

_change_encoder = msgspec.json.Encoder()
_change_decoder = msgspec.json.Decoder(AlertChange)


def encode_change(change: AlertChange) -> bytes:
    return _change_encoder.encode(change)


def decode_change(data: bytes) -> AlertChange:
    return _change_decoder.decode(data)
