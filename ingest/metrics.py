"""Prometheus metrics of the ingest service (served on ``/metrics``).

Labels are bounded: rejection reasons come from ``DEADLETTER_REASONS``, districts and
domains from the city model (9 x 3); never a sensor id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from cityops.city import DISTRICTS
from ingest.contract import Domain

MESSAGES_IN = Counter("cityops_ingest_messages_total", "MQTT messages received")
EVENTS_OUT = Counter("cityops_ingest_events_total",
                     "events produced to Kafka and acknowledged by it",
                     ["district", "domain"])
# Every district and domain exists from the start, at 0: "a district went silent" is then
# a rate falling to zero, not a series that was never there.
for _district in DISTRICTS:
    for _domain in Domain:
        EVENTS_OUT.labels(_district.code, _domain.value)
REJECTIONS = Counter("cityops_ingest_rejections_total",
                     "payloads refused and sent to the dead-letter topic", ["reason"])
DUPLICATES = Counter("cityops_ingest_duplicates_total",
                     "events dropped because their id was seen within the window")
BATCH_MESSAGES = Histogram("cityops_ingest_batch_messages", "MQTT messages per ingest batch",
                           buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
BATCH_EVENTS = Histogram("cityops_ingest_batch_events", "events per ingest batch",
                         buckets=(1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000))
KAFKA_SEND_SECONDS = Histogram("cityops_ingest_kafka_send_seconds",
                               "time from handing a batch to the producer to Kafka's ack",
                               buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                        0.5, 1, 2.5, 5, 10))
QUEUE_DEPTH = Gauge("cityops_ingest_queue_depth",
                    "MQTT messages received and not yet acknowledged (waiting for Kafka)")
MQTT_RECONNECTS = Counter("cityops_ingest_mqtt_reconnects_total",
                          "attempts to reconnect to MQTT after the connection was lost "
                          "(or could not be made)")
MQTT_CONNECTED = Gauge("cityops_ingest_mqtt_connected",
                       "1 while the MQTT session is connected and subscribed, else 0")
KAFKA_RETRIES = Counter("cityops_ingest_kafka_retries_total",
                        "batches handed to Kafka again after it failed to acknowledge them")
