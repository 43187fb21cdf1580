"""The e2e bench's hot-path arithmetic (``bench/e2e/counters.py``), without servers: row
writes land in leaf partitions and must be reported under their top parent, temporary
tables of different sessions add up under one name, and a table that appears or
disappears between two snapshots must neither crash the sum nor go unnoticed."""

from __future__ import annotations

from bench.e2e.counters import (
    OFFSETS_TOPIC,
    DbSnapshot,
    TableCounts,
    kafka_figures,
    root_of,
    table_name,
    writes_by_table,
)


def test_root_of_follows_nested_inheritance() -> None:
    parents = {3: 2, 2: 1, 5: 4}
    assert root_of(3, parents) == 1
    assert root_of(5, parents) == 4
    assert root_of(7, parents) == 7


def test_table_name_folds_every_temp_schema() -> None:
    assert table_name("pg_temp_3", "stage_readings") == "pg_temp.stage_readings"
    assert table_name("pg_temp_12", "stage_readings") == "pg_temp.stage_readings"
    assert table_name("public", "readings") == "public.readings"
    assert table_name("pg_temporal", "x") == "pg_temporal.x"


def test_writes_are_summed_per_parent_and_per_temp_name() -> None:
    parents = {11: 10, 12: 10, 21: 20}  # readings: two day partitions; rollup: one
    names = {10: "public.readings", 20: "public.sensor_rollup_1m"}
    start = DbSnapshot(
        tables={10: TableCounts("public.readings"),
                11: TableCounts("public.readings_p1", ins=100),
                12: TableCounts("public.readings_p2"),
                21: TableCounts("public.sensor_rollup_1m_p1", ins=5, upd=7, hot_upd=3),
                30: TableCounts("pg_temp.stage_readings", ins=50),
                31: TableCounts("pg_temp.stage_readings", ins=1),
                40: TableCounts("public.alerts", upd=2, dele=1)},
        parents=parents, names=names)
    end = DbSnapshot(
        tables={10: TableCounts("public.readings"),
                11: TableCounts("public.readings_p1", ins=130),
                12: TableCounts("public.readings_p2", ins=20),
                13: TableCounts("public.readings_p3", ins=4),  # created during the step
                21: TableCounts("public.sensor_rollup_1m_p1", ins=6, upd=17, hot_upd=9),
                30: TableCounts("pg_temp.stage_readings", ins=80),
                31: TableCounts("pg_temp.stage_readings", ins=11),
                40: TableCounts("public.alerts", upd=2, dele=4)},
        parents={**parents, 13: 10}, names=names)
    tables, dropped = writes_by_table(start, end)
    assert tables == {
        "public.readings": {"ins": 54, "upd": 0, "hot_upd": 0, "del": 0, "writes": 54},
        "public.sensor_rollup_1m": {"ins": 1, "upd": 10, "hot_upd": 6, "del": 0,
                                    "writes": 11},
        "pg_temp.stage_readings": {"ins": 40, "upd": 0, "hot_upd": 0, "del": 0,
                                   "writes": 40},
        "public.alerts": {"ins": 0, "upd": 0, "hot_upd": 0, "del": 3, "writes": 3},
    }
    assert dropped == []


def test_a_table_dropped_during_the_step_is_named() -> None:
    start = DbSnapshot(tables={1: TableCounts("public.readings", ins=5),
                               2: TableCounts("pg_temp.stage_readings", ins=9)})
    end = DbSnapshot(tables={1: TableCounts("public.readings", ins=8)})
    tables, dropped = writes_by_table(start, end)
    assert tables["public.readings"]["writes"] == 3
    assert "pg_temp.stage_readings" not in tables
    assert dropped == ["pg_temp.stage_readings"]


def test_kafka_total_leaves_consumer_offsets_out() -> None:
    start = {"cityops.events": 1000, "cityops.alerts": 7, OFFSETS_TOPIC: 40}
    end = {"cityops.events": 1500, "cityops.alerts": 32, OFFSETS_TOPIC: 90}
    fig = kafka_figures(start, end, messages=500)
    assert fig["kafka_records"] == 525
    assert fig["kafka_records_per_msg"] == 1.05
    assert fig["kafka_topics"]["cityops.alerts"] == {"records": 25, "per_msg": 0.05}
    assert OFFSETS_TOPIC not in fig["kafka_topics"]
    assert fig["kafka_consumer_offset_commits"] == 50
