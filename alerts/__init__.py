"""Alerts: rules over the event stream (and the windows they compute from it), the alert
lifecycle, and the console.

``cityops alerts`` (``alerts.service``) reads Kafka, evaluates the rules of
``alerts/rules/default.yaml`` (``alerts.ruleset``, ``alerts.evaluators``) and keeps one
active alert per (rule, source) in PostgreSQL with its audit trail (``alerts.store``),
publishing every change on the alerts topic. ``cityops console`` (``alerts.console``)
serves the operators' web console and REST API over the same store.
"""
