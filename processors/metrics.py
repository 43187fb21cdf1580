"""Prometheus metrics of the processors (``cityops process``).

Labels are bounded: a table name, a rollup name, a Kafka partition number (the events
topic has a fixed, small partition count), never a sensor id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCHES = Counter("cityops_process_batches_total", "Batches written to the database")
MESSAGES = Counter("cityops_process_messages_total", "Kafka messages consumed", ["topic"])
ROWS_WRITTEN = Counter("cityops_process_rows_written_total",
                       "Rows newly stored (duplicates excluded)", ["table"])
DUPLICATES = Counter("cityops_process_duplicates_total",
                     "Readings and incidents already stored (redelivery or resend), skipped")
BAD_EVENTS = Counter("cityops_process_bad_events_total",
                     "Events topic messages that failed to decode (sent to the dead-letter topic)")
WRITE_SECONDS = Histogram(
    "cityops_process_write_seconds", "Database write of one batch, COPY to commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
WRITE_STEP_SECONDS = Histogram(
    "cityops_process_write_step_seconds",
    "Time per step of a batch write: readings, aggregate, rollups, other, commit, latest "
    "(in-memory merge after commit); latest_flush: one periodic sensor_latest flush",
    ["step"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
AGGREGATION_SECONDS = Histogram(
    "cityops_process_aggregation_seconds", "Numpy rollup of one batch (all windows)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5))
BATCH_SIZE = Histogram("cityops_process_batch_messages", "Kafka messages per batch",
                       buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000))
CONSUMER_LAG = Gauge("cityops_process_consumer_lag",
                     "Messages behind the high watermark, per events topic partition",
                     ["partition"])
ROLLUPS_PUBLISHED = Counter("cityops_process_rollups_published_total",
                            "Rollup partials published on the aggregates topic", ["window"])
WINDOWS_CLOSED = Counter("cityops_process_windows_closed_total",
                         "Rollup buckets computed from raw readings when their window closed "
                         "(plain mode; again if late data or an early close re-opened them)",
                         ["window"])
LATE_CELLS = Counter("cityops_process_late_cells_total",
                     "(window, bucket, sensor, metric) cells of closed windows recomputed for "
                     "late readings (plain mode)")
CAGG_REFRESHES = Counter("cityops_process_cagg_refreshes_total",
                         "Explicit continuous-aggregate refreshes after late data (timescale)")
PARKED = Counter("cityops_process_parked_total",
                 "Kafka records the database refused for a reason of their own (a data error, "
                 "after bounded retries): parked with their raw bytes, offset committed",
                 ["topic"])
WRITE_RETRIES = Counter("cityops_process_write_retries_total",
                        "Batches retried after a transient database error")
