"""Rules as data: the YAML file operators edit, validated on load, reloaded on change.

A rules file is a list of rules, each with an ``id`` and a ``type`` (threshold, count,
anomaly, absence, correlation, geofence). Validation happens in two passes: the shape
(msgspec, tagged by ``type``) and the meaning (metrics, incidents, places and referenced
rules must exist). Every error names the rule and the field, because the person reading
it is a duty engineer editing YAML at night, not the author of this module.

``RulesFile.poll()`` reloads a changed file; a file that fails validation is refused and
the last good rule set keeps running (the error is logged and kept in ``last_error``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from datetime import time as dtime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml

from alerts.model import Severity
from cityops.city import DISTRICTS_BY_CODE, LANDMARKS_BY_CODE
from cityops.registry import SENSOR_TYPES
from ingest.contract import INCIDENT_TYPES, METRICS

log = logging.getLogger(__name__)

_ID = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
_TEMPLATE_FIELDS = {"sensor_id", "landmark", "landmark_name", "district", "district_name",
                    "value", "count", "rule_id", "domain", "type", "metric", "z", "gateway"}
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Op = Literal["<", "<=", ">", ">="]
Input = Literal["events", "rollup_1m", "rollup_1h"]  # raw events, or the processors' rollups
Stat = Literal["mean", "min", "max", "p95", "sum", "n"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class RuleError(ValueError):
    """A rules file is invalid; the message names the rule and the field."""


class Match(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Which sensors a rule looks at (every list empty: all sensors)."""

    domains: list[str] = []
    types: list[str] = []
    districts: list[str] = []
    landmarks: list[str] = []
    landmark_kinds: list[str] = []
    sensors: list[str] = []


GroupField = Literal["landmark", "district", "gateway", "domain", "sensor"]


class Group(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How a rule's alerts become incidents (``alerts.incidents``), in the spirit of
    Alertmanager's ``group_by`` / ``group_wait`` / ``group_interval``.

    ``by``: alerts of the rule whose fields agree join one incident (empty: the landmark,
    else the district). ``interval_s``: an incident stays open this long after its last
    alert cleared, so an alert of the same cause raised within it joins it again instead
    of opening a new one. ``wait_s``: a new incident is announced (notifications,
    webhook) only after this, so the first burst is one announcement. ``storm_per_min``:
    a rule raising more alerts than this in a minute stops publishing them one by one;
    they collapse into their incidents (0: never).
    """

    by: list[GroupField] = []
    wait_s: NonNegative = 0.0
    interval_s: NonNegative = 300.0
    storm_per_min: Annotated[int, msgspec.Meta(ge=0)] = 30


class _Rule(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True,
            frozen=True):
    id: str
    severity: Severity = Severity.WARNING
    title: str = ""
    # the title in other languages (alerts/i18n: vi, en); the console shows the user's
    titles: dict[str, str] = {}
    description: str = ""
    enabled: bool = True
    match: Match = Match()
    escalate_after_s: Positive | None = None  # critical alerts unacknowledged this long escalate
    group: Group = Group()


class ThresholdRule(_Rule, tag="threshold", frozen=True):
    """``metric op value`` held for ``for_s``; clears once ``clear_value`` holds ``clear_for_s``."""

    metric: str
    op: Op
    value: float
    input: Input = "events"
    stat: Stat = "mean"  # for rollup inputs: which statistic of the window is compared
    for_s: NonNegative = 0
    clear_value: float | None = None  # hysteresis band; default: the raise threshold itself
    clear_for_s: NonNegative = 0


class CountRule(_Rule, tag="count", frozen=True):
    """At least ``count`` incidents of the given kinds within ``window_s`` at one place."""

    incidents: list[str]
    count: Annotated[int, msgspec.Meta(ge=1)]
    window_s: Positive
    per: Literal["sensor", "landmark", "district"] = "sensor"


class AnomalyRule(_Rule, tag="anomaly", frozen=True):
    """A value far from the sensor's own recent history (EWMA z-score) or changing too fast."""

    metric: str
    input: Input = "events"
    stat: Stat = "mean"  # for rollup inputs
    method: Literal["ewma_z", "rate"] = "ewma_z"
    alpha: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.1
    z: Positive = 4.0
    clear_z: Positive = 2.0
    min_samples: Annotated[int, msgspec.Meta(ge=2)] = 10
    max_rate_per_s: Positive | None = None  # method "rate": |dvalue/dt| above this is anomalous
    clear_after_n: Annotated[int, msgspec.Meta(ge=1)] = 3  # normal samples in a row to clear


class AbsenceRule(_Rule, tag="absence", frozen=True):
    """A sensor silent longer than ``factor`` x its expected interval (or ``silence_s``)."""

    factor: Positive = 3.0
    silence_s: Positive | None = None
    include_registry: bool = False  # also watch fleet sensors never heard from since start


class CorrelationRule(_Rule, tag="correlation", frozen=True):
    """Active alerts of every listed rule near one landmark become one incident there."""

    rules: list[str]
    radius_m: Positive = 1000.0


class OutageRule(_Rule, tag="outage", frozen=True):
    """Many active alerts of one rule (``rule``, usually the absence rule) under one
    district or gateway: the cause above them. Raised when at least ``min_count`` of
    them and ``min_fraction`` of the place's known sensors are affected; cleared when
    either falls below half of that. Pair it with an ``inhibit`` entry, so the alerts
    beneath it leave the operators' list while it holds."""

    rule: str
    per: Literal["district", "gateway"] = "district"
    min_count: Annotated[int, msgspec.Meta(ge=1)] = 5
    min_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5


class Circle(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    lat: float
    lon: float
    radius_m: Positive


class Zone(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    landmarks: list[str] = []
    districts: list[str] = []
    circle: Circle | None = None
    polygon: list[tuple[float, float]] | None = None  # (lat, lon) vertices


class Schedule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Local time of day (``start`` to ``end``, may wrap midnight) on the given days."""

    start: str
    end: str
    days: list[Day] = msgspec.field(default_factory=lambda: list(DAYS))  # type: ignore[arg-type]
    tz: str = "Asia/Ho_Chi_Minh"


class GeofenceRule(_Rule, tag="geofence", frozen=True):
    """Activity inside a zone during a schedule: incidents of the listed kinds, or a metric."""

    zone: Zone
    schedule: Schedule | None = None
    incidents: list[str] = []
    metric: str | None = None
    op: Op | None = None
    value: float | None = None
    clear_after_s: Positive = 300.0


Rule = (ThresholdRule | CountRule | AnomalyRule | AbsenceRule | CorrelationRule | GeofenceRule
        | OutageRule)
RULE_TYPES: tuple[str, ...] = ("threshold", "count", "anomaly", "absence", "correlation",
                               "geofence", "outage")
SEVERITIES: tuple[str, ...] = tuple(s.value for s in Severity)


class InhibitSide(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Which incidents: of these rules (empty: any), at least / at most this severity."""

    rules: list[str] = []
    min_severity: Severity | None = None  # this severity or worse
    max_severity: Severity | None = None  # this severity or milder


class Inhibit(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An open ``source`` incident suppresses the open ``target`` incidents whose ``equal``
    fields are the same as its own (Alertmanager's inhibit_rules): they stay open under
    it and leave the list until it resolves."""

    source: InhibitSide
    target: InhibitSide
    equal: list[Literal["landmark", "district", "gateway"]]


def rule_input(rule: Rule) -> str:
    """What a rule reads: ``events`` or a rollup window (``rollup_1m``, ``rollup_1h``)."""
    return getattr(rule, "input", "events")


def metric_key(rule: ThresholdRule | AnomalyRule) -> str:
    """The measurement name a rule reads: the metric, or ``metric:stat`` from rollups."""
    if rule.input == "events" or rule.stat == "mean":
        return rule.metric
    return f"{rule.metric}:{rule.stat}"


# fields that do not change what a rule evaluates: editing them keeps its state
_PRESENTATION = ("titles", "group")


def rule_hash(rule: Rule) -> str:
    """Identity of a rule's definition: state survives reloads only while this is unchanged.
    Titles and grouping are left out: they change what operators see, not the state."""
    fields = msgspec.to_builtins(rule)
    for name in _PRESENTATION:
        fields.pop(name, None)
    return hashlib.blake2b(msgspec.json.encode(fields), digest_size=8).hexdigest()


def rule_title_templates(rules: RuleSet) -> dict[str, dict[str, str]]:
    """{language: {rule id: title template}} from the rules file: ``titles`` per language,
    and under ``"*"`` each rule's ``title`` (for languages it does not translate)."""
    out: dict[str, dict[str, str]] = {"*": {}}
    for r in rules.rules:
        if r.title:
            out["*"][r.id] = r.title
        for lang, text in r.titles.items():
            out.setdefault(lang, {})[r.id] = text
    return out


def parse_hhmm(text: str) -> int:
    """``"22:30"`` -> minutes after midnight."""
    t = dtime.fromisoformat(text)
    return t.hour * 60 + t.minute


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    digest: str
    source: str = ""
    inhibit: tuple[Inhibit, ...] = ()
    by_id: dict[str, Rule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {r.id: r for r in self.rules})


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Parse and validate a rules document; raises ``RuleError`` naming rule and field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise RuleError(f"{source}: expected a mapping with a 'rules' list")
    unknown = set(doc) - {"version", "rules", "inhibit"}
    if unknown:
        raise RuleError(f"{source}: unknown top-level field(s) {sorted(unknown)}")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc["rules"]):
        name = raw.get("id") if isinstance(raw, dict) else None
        where = f"rule {name!r}" if isinstance(name, str) else f"rule #{i + 1}"
        if not isinstance(raw, dict):
            raise RuleError(f"{source}: {where}: expected a mapping")
        if raw.get("type") not in RULE_TYPES:
            raise RuleError(f"{source}: {where}: field 'type': must be one of "
                            f"{', '.join(RULE_TYPES)}, got {raw.get('type')!r}")
        try:
            rule = msgspec.convert(raw, Rule)
        except msgspec.ValidationError as exc:
            raise RuleError(f"{source}: {where}: {_field_message(str(exc))}") from None
        if rule.id in seen:
            raise RuleError(f"{source}: {where}: field 'id': duplicate rule id")
        seen.add(rule.id)
        try:
            _check(rule)
        except _FieldError as exc:
            raise RuleError(f"{source}: {where}: field {exc.field!r}: {exc.problem}") from None
        rules.append(rule)
    by_id = {r.id: r for r in rules}
    for r in rules:
        if isinstance(r, CorrelationRule):
            for ref in r.rules:
                other = by_id.get(ref)
                if other is None:
                    raise RuleError(f"{source}: rule {r.id!r}: field 'rules': "
                                    f"no rule with id {ref!r}")
                if isinstance(other, CorrelationRule) or ref == r.id:
                    raise RuleError(f"{source}: rule {r.id!r}: field 'rules': {ref!r} is a "
                                    "correlation rule; correlations combine other rules")
        if isinstance(r, OutageRule) and (r.rule not in by_id or r.rule == r.id):
            raise RuleError(f"{source}: rule {r.id!r}: field 'rule': no other rule with id "
                            f"{r.rule!r}")
    inhibit = _parse_inhibit(doc.get("inhibit") or [], by_id, source)
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return RuleSet(tuple(rules), digest, source, inhibit)


def _parse_inhibit(raw: Any, by_id: dict[str, Rule], source: str) -> tuple[Inhibit, ...]:
    if not isinstance(raw, list):
        raise RuleError(f"{source}: 'inhibit': expected a list")
    out: list[Inhibit] = []
    for i, item in enumerate(raw):
        where = f"{source}: inhibit #{i + 1}"
        try:
            inh = msgspec.convert(item, Inhibit)
        except msgspec.ValidationError as exc:
            raise RuleError(f"{where}: {_field_message(str(exc))}") from None
        for side in ("source", "target"):
            for ref in getattr(inh, side).rules:
                if ref not in by_id:
                    raise RuleError(f"{where}: field '{side}.rules': no rule with id {ref!r}")
        if not inh.equal:
            raise RuleError(f"{where}: field 'equal': name at least one of landmark, "
                            "district, gateway (an inhibition without it would silence the "
                            "whole city)")
        out.append(inh)
    return tuple(out)


def load_rules(path: Path) -> RuleSet:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RuleError(f"rules file {path}: {exc.strerror or exc}") from None
    return parse_rules(text, str(path))


class _FieldError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def _field_message(msg: str) -> str:
    """msgspec says ``Expected `int`, got `str` - at `$.count` ``; say which field first."""
    m = re.search(r" - at `\$\.?([^`]*)`$", msg)
    if m:
        return f"field {m.group(1)!r}: {msg[: m.start()]}"
    m = re.match(r"Object missing required field `([^`]+)`", msg)
    if m:
        return f"field {m.group(1)!r}: missing required field"
    m = re.match(r"Object contains unknown field `([^`]+)`", msg)
    if m:
        return f"field {m.group(1)!r}: unknown field"
    return msg


def _check(rule: Rule) -> None:
    if not _ID.match(rule.id):
        raise _FieldError("id", "use 2-63 lower-case letters, digits or _, starting with a letter")
    _check_template(rule.title)
    for lang, text in rule.titles.items():
        if lang not in ("vi", "en"):
            raise _FieldError("titles", f"unknown language {lang!r}; use vi or en")
        _check_template(text)
    _check_match(rule.match)
    if isinstance(rule, ThresholdRule | AnomalyRule):
        _check_metric("metric", rule.metric)
        if rule.input == "events" and rule.stat != "mean":
            raise _FieldError("stat", "applies to rollup inputs only (input: rollup_1m or "
                              "rollup_1h)")
    if isinstance(rule, AnomalyRule):
        if rule.method == "rate" and rule.max_rate_per_s is None:
            raise _FieldError("max_rate_per_s", "required when method is 'rate'")
        if rule.clear_z >= rule.z:
            raise _FieldError("clear_z", f"must be below z ({rule.z}) for hysteresis")
    if isinstance(rule, ThresholdRule) and rule.clear_value is not None:
        wrong = (rule.clear_value < rule.value) if rule.op[0] == "<" else \
            (rule.clear_value > rule.value)
        if wrong:
            raise _FieldError("clear_value", f"must be on the normal side of value {rule.value} "
                              f"for op {rule.op!r} (it is the hysteresis band)")
    if isinstance(rule, CountRule):
        _check_incidents("incidents", rule.incidents, required=True)
    if isinstance(rule, CorrelationRule) and len(set(rule.rules)) < 2:
        raise _FieldError("rules", "list at least two different rules to correlate")
    if isinstance(rule, GeofenceRule):
        _check_geofence(rule)


def _check_template(title: str) -> None:
    for m in re.finditer(r"{([^}:!]*)[^}]*}", title):
        if m.group(1) not in _TEMPLATE_FIELDS:
            raise _FieldError("title", f"unknown placeholder {{{m.group(1)}}}; known: "
                              f"{', '.join(sorted(_TEMPLATE_FIELDS))}")


def _check_match(match: Match) -> None:
    from cityops.city import LANDMARKS

    kinds = {lm.kind for lm in LANDMARKS}
    types = {t for ts in SENSOR_TYPES.values() for t in ts}
    for name, values, known in (("match.domains", match.domains, set(SENSOR_TYPES)),
                                ("match.types", match.types, types),
                                ("match.districts", match.districts, set(DISTRICTS_BY_CODE)),
                                ("match.landmarks", match.landmarks, set(LANDMARKS_BY_CODE)),
                                ("match.landmark_kinds", match.landmark_kinds, kinds)):
        for v in values:
            if v not in known:
                raise _FieldError(name, f"unknown value {v!r}; known: {', '.join(sorted(known))}")


def _check_metric(name: str, metric: str | None) -> None:
    if metric not in METRICS:
        raise _FieldError(name, f"unknown metric {metric!r} (see ingest.contract.METRICS)")


def _check_incidents(name: str, incidents: list[str], required: bool) -> None:
    if required and not incidents:
        raise _FieldError(name, "list at least one incident type")
    for inc in incidents:
        if inc not in INCIDENT_TYPES:
            raise _FieldError(name, f"unknown incident {inc!r}; known: "
                              f"{', '.join(sorted(INCIDENT_TYPES))}")


def _check_geofence(rule: GeofenceRule) -> None:
    z = rule.zone
    if not (z.landmarks or z.districts or z.circle or z.polygon):
        raise _FieldError("zone", "give landmarks, districts, a circle or a polygon")
    for lm in z.landmarks:
        if lm not in LANDMARKS_BY_CODE:
            raise _FieldError("zone.landmarks", f"unknown landmark {lm!r}")
    for d in z.districts:
        if d not in DISTRICTS_BY_CODE:
            raise _FieldError("zone.districts", f"unknown district {d!r}")
    if z.polygon is not None and len(z.polygon) < 3:
        raise _FieldError("zone.polygon", "a polygon needs at least 3 (lat, lon) vertices")
    has_metric = rule.metric is not None
    if not rule.incidents and not has_metric:
        raise _FieldError("incidents", "give incidents, or metric with op and value")
    _check_incidents("incidents", rule.incidents, required=False)
    if has_metric:
        _check_metric("metric", rule.metric)
        if rule.op is None or rule.value is None:
            raise _FieldError("op" if rule.op is None else "value",
                              "required together with metric")
    if rule.schedule is not None:
        for name in ("start", "end"):
            try:
                parse_hhmm(getattr(rule.schedule, name))
            except ValueError:
                raise _FieldError(f"schedule.{name}", "use HH:MM (24 h)") from None
        try:
            ZoneInfo(rule.schedule.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise _FieldError("schedule.tz", f"unknown time zone {rule.schedule.tz!r}") from None


class RulesFile:
    """A rules file watched for changes: ``poll()`` returns a new ``RuleSet`` when it changed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.current: RuleSet | None = None
        self.last_error: str | None = None
        self._stamp: tuple[int, int] | None = None
        self._bad_digest: str | None = None

    def load(self) -> RuleSet:
        """First load: a bad file here is fatal (there is no last good set to keep)."""
        self.current = load_rules(self.path)
        self._stamp = self._stat()
        return self.current

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def poll(self) -> RuleSet | None:
        """Reload if the file changed; on error keep the last good rules and remember why."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            text = self.path.read_text()
        except OSError as exc:
            self._refuse(f"rules file {self.path}: {exc.strerror or exc}")
            return None
        digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
        if self.current is not None and digest == self.current.digest:
            return None
        try:
            new = parse_rules(text, str(self.path))
        except RuleError as exc:
            if digest != self._bad_digest:
                self._bad_digest = digest
                self._refuse(str(exc))
            return None
        self.current, self.last_error, self._bad_digest = new, None, None
        log.info("rules reloaded", extra={"fields": {"rules": len(new.rules),
                                                       "digest": new.digest}})
        return new

    def _refuse(self, error: str) -> None:
        from alerts.metrics import RULE_RELOADS

        self.last_error = error
        RULE_RELOADS.labels("refused").inc()
        log.error("rules file refused; keeping the last good rules",
                  extra={"fields": {"error": error}})


def render(template: str, values: dict[str, Any]) -> str:
    """Fill a title template; unknown or missing placeholders stay visible rather than fail."""
    class _Safe(dict):  # type: ignore[type-arg]
        def __missing__(self, key: str) -> str:
            return "{" + key + "}"

    try:
        return template.format_map(_Safe(values))
    except (ValueError, TypeError):
        return template
