"""Incidents: the alerts of one cause as one thing to act on (grouping, inhibition, storm
control, notification). See ``alerts.incidents.model`` for what an incident is."""
