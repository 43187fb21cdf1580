"""Storm control: a rule raising faster than its ``group.storm_per_min`` stops publishing
its alerts one by one; they collapse into their incidents.

An accident on a long street trips the speed-drop rule at every detector upstream within
a few minutes (296 alerts in the demo); a district's network outage trips the absence
rule for thousands of sensors at once. Each alert is still written, audited and attached
to its incident, but while the rule storms its alert changes are not put on the alerts
topic: the consoles get the incident's changes (one per incident per batch) instead of
a flood. The storm ends once the rule's raises over the last minute are back under the
limit. Each alerts worker judges the raises it writes (with N workers a rule storms on a
worker when that worker alone raises more than the limit).
"""

from __future__ import annotations

from collections import deque

from alerts.metrics import ALERT_CHANGES_COLLAPSED, RULES_STORMING
from alerts.model import AlertChange

WINDOW_S = 60.0
_SYSTEM_ACTIONS = ("raised", "updated", "cleared")


class StormControl:
    def __init__(self) -> None:
        self._raises: dict[str, deque[tuple[float, int]]] = {}
        self._counts: dict[str, int] = {}
        self.storming: set[str] = set()

    def observe(self, raised_per_rule: dict[str, int], limits: dict[str, int],
                now_s: float) -> set[str]:
        """Count this batch's raises; returns the rules storming now (limit 0: never)."""
        for rule, n in raised_per_rule.items():
            self._raises.setdefault(rule, deque()).append((now_s, n))
            self._counts[rule] = self._counts.get(rule, 0) + n
        horizon = now_s - WINDOW_S
        for rule in list(self._raises):
            q = self._raises[rule]
            while q and q[0][0] < horizon:
                self._counts[rule] -= q.popleft()[1]
            if not q:
                del self._raises[rule], self._counts[rule]
        self.storming = {r for r, n in self._counts.items() if 0 < limits.get(r, 0) < n}
        RULES_STORMING.set(len(self.storming))
        return self.storming

    def publishable(self, changes: list[AlertChange]) -> list[AlertChange]:
        """The changes to publish one by one: all but the system's changes to alerts of
        storming rules (operators' actions always go out)."""
        if not self.storming:
            return changes
        out = [c for c in changes if not (c.alert.rule_id in self.storming
                                          and c.action in _SYSTEM_ACTIONS)]
        if len(out) != len(changes):
            ALERT_CHANGES_COLLAPSED.inc(len(changes) - len(out))
        return out
