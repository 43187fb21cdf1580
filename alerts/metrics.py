"""Prometheus metrics of the alerts service and the console (bounded labels only)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("cityops_alerts_events_total", "Events read by the alerts service", ["topic"])
DEADLETTERS = Counter("cityops_alerts_deadletters_total",
                      "Messages the alerts service could not decode (sent to dead letter)",
                      ["reason"])
PARKED = Counter("cityops_alerts_parked_total",
                 "Records parked because rule evaluation raised on them (stage evaluate), or "
                 "signals the alert store refused for a non-transient reason (stage store): "
                 "skipped, not retried forever", ["stage"])
RULES_EVALUATED = Counter("cityops_alert_rules_evaluated_total",
                          "Rule evaluations (one per rule per batch or tick)", ["type"])
RULE_RELOADS = Counter("cityops_alert_rule_reloads_total", "Rules file reloads", ["result"])
RULES_LOADED = Gauge("cityops_alert_rules_loaded", "Rules currently running")
ALERTS_RAISED = Counter("cityops_alerts_raised_total", "Alerts raised",
                        ["severity", "domain"])
ALERTS_CLEARED = Counter("cityops_alerts_cleared_total", "Alerts cleared",
                         ["severity", "domain", "by"])
ALERTS_UPDATED = Counter("cityops_alerts_updated_total", "Updates to active alerts",
                         ["severity", "domain"])
ALERTS_SUPPRESSED = Counter("cityops_alerts_suppressed_total",
                            "Raises silenced by a maintenance window", ["domain"])
ALERTS_ESCALATED = Counter("cityops_alerts_escalated_total",
                           "Critical alerts escalated for lack of acknowledgement", ["domain"])
ALERTS_ACTIVE = Gauge("cityops_alerts_active", "Active alerts", ["severity"])
EVAL_SECONDS = Histogram("cityops_alert_evaluation_seconds",
                         "Time to evaluate all rules over one batch",
                         buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
EVENT_TO_ALERT = Histogram("cityops_alert_event_to_alert_seconds",
                           "From ingest receiving the triggering event to the alert committed",
                           buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
BATCH_SIZE = Histogram("cityops_alerts_batch_events", "Events per evaluated batch",
                       buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000))
CHECKPOINTS = Counter("cityops_alerts_checkpoints_total",
                      "Rule state + offsets checkpoints written")
SCOPED_INPUTS = Counter("cityops_alerts_scoped_inputs_total",
                        "Inputs of rules spanning sensors (count per landmark/district) on the "
                        "internal scope topic: published by the events' owner, consumed by the "
                        "scope's owner", ["direction"])
INCIDENTS_OPENED = Counter("cityops_incidents_opened_total",
                           "Incidents opened (alerts of one cause grouped)", ["severity"])
INCIDENT_CHANGES = Counter("cityops_incident_changes_total",
                           "Incident changes published on the incidents topic", ["action"])
INCIDENTS_OPEN = Gauge("cityops_incidents_open", "Open incidents on the operators' list "
                       "(not inhibited)", ["severity"])
ALERT_CHANGES_COLLAPSED = Counter("cityops_alert_changes_collapsed_total",
                                  "Alert changes not published one by one because their rule "
                                  "was storming (they reach consoles as incident changes)")
RULES_STORMING = Gauge("cityops_alert_rules_storming",
                       "Rules raising faster than their storm control limit right now")

# console
CONSOLE_LOGINS = Counter("cityops_console_logins_total", "Console logins", ["result"])
CONSOLE_ACTIONS = Counter("cityops_console_actions_total", "Operator actions", ["action"])
CONSOLE_STREAMS = Gauge("cityops_console_streams", "Open live alert streams (SSE)")
CONSOLE_DENIED = Counter("cityops_console_denied_total", "Requests refused", ["reason"])

# webhook of critical incidents (alerts/incidents/webhook.py; each alerts worker runs a sender)
WEBHOOK_DELIVERIES = Counter("cityops_webhook_deliveries_total",
                             "Webhook attempts by outcome: delivered (2xx), retry (transient "
                             "failure, tried again later), failed (refused or out of attempts: "
                             "given up)", ["outcome"])
WEBHOOK_PENDING = Gauge("cityops_webhook_pending",
                        "Incident notifications neither delivered nor given up (the outbox, as "
                        "this worker's sender last counted it)")
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "cityops_webhook_delivery_seconds",
    "From the notification enqueued (the incident became critical) to the receiver's 2xx",
    buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
