"""Prometheus metrics of the simulator (``cityops simulate`` serves them on /metrics).

Updated once per progress tick, not per message, so they cost nothing on the hot path.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

MESSAGES = Counter("cityops_simulator_messages_total", "MQTT messages handed to the client")
ERRORS = Counter("cityops_simulator_publish_errors_total",
                 "publish calls the MQTT client refused")
INFLIGHT = Gauge("cityops_simulator_inflight", "messages published and not yet acknowledged "
                 "(QoS 1) or written (QoS 0)")
RATE = Gauge("cityops_simulator_rate", "messages per second over the last progress tick")
