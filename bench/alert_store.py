"""Mass alert writes: a district's sensors go quiet together, then report again.

Times ``AlertStore.apply`` raising N offline alerts in one batch and clearing them in the
next (what the alerts worker does after a power or network cut), against two baselines
measured in the same run on the same PostgreSQL:

- ``per_row``: the same lifecycle written the way the store did before it went set-based,
  two round trips per alert (an ``INSERT .. ON CONFLICT .. RETURNING`` or ``UPDATE ..
  RETURNING``, then its audit row), all in one transaction;
- ``copy``: a raw ``copy_records_to_table`` of the same N alert rows into a scratch copy of
  the table, the ceiling for getting N rows into PostgreSQL from Python.

Reported per phase as alerts/s and as ratios (set-based / per-row, set-based / COPY).

Usage: ``.venv/bin/python bench/alert_store.py [--alerts 5000] [--rounds 3]``
Starts its own PostgreSQL (cityops stack, postgres only), stops it after; writes
``bench/results/alert_store.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from alerts.model import Signal, SignalKind
from alerts.store import AlertStore, create_pool
from cityops.settings import PROJECT_ROOT
from cityops.stack import Stack
from tests.support import isolated_settings

RESULTS = PROJECT_ROOT / "bench" / "results" / "alert_store.json"


def signals(kind: SignalKind, sources: list[str]) -> list[Signal]:
    return [Signal(kind=kind, rule_id="sensor_offline", source=s, at_ms=1_700_000_000_000,
                   severity="warning", title=f"Sensor {s} offline", value=None,
                   sensor_id=s, domain="traffic", district="ninh_kieu",
                   details={"silent_s": 180}) for s in sources]


async def per_row(pool: asyncpg.Pool, sigs: list[Signal], clear: bool) -> None:
    """Two round trips per alert, as the store wrote them before (the baseline)."""
    async with pool.acquire() as conn, conn.transaction():
        for s in sigs:
            if clear:
                row = await conn.fetchrow(
                    "update alerts set state = 'cleared', cleared_at = now(), cleared_by = $3, "
                    "updated_at = now(), version = version + 1 where rule_id = $1 and "
                    "source = $2 and state = 'active' returning *", s.rule_id, s.source, "system")
            else:
                row = await conn.fetchrow(
                    "insert into alerts (rule_id, source, severity, state, title, message, "
                    "domain, district, landmark, sensor_id, lat, lon, value, details, "
                    "first_event_time, last_event_time) values ($1,$2,$3,'active',$4,$5,$6,"
                    "$7,$8,$9,$10,$11,$12,$13,to_timestamp($14/1000.0),to_timestamp($14/1000.0)) "
                    "on conflict (rule_id, source) where state = 'active' do update set "
                    "value = excluded.value, updated_at = now() returning *",
                    s.rule_id, s.source, s.severity, s.title, s.message, s.domain, s.district,
                    s.landmark, s.sensor_id, s.lat, s.lon, s.value, s.details, s.at_ms)
            await conn.execute("insert into alert_audit (alert_id, actor, action, detail) "
                               "values ($1, 'system', $2, $3)", row["alert_id"],
                               "cleared" if clear else "raised", {"version": row["version"]})


async def copy(conn: asyncpg.Connection, sigs: list[Signal]) -> None:
    """Binary COPY (a plain connection: the store's jsonb codec is text-only)."""
    records = [(s.rule_id, s.source, s.severity, "active", s.title, s.domain, s.district,
                s.sensor_id, json.dumps(s.details)) for s in sigs]
    async with conn.transaction():
        await conn.copy_records_to_table(
            "alerts_copy", records=records,
            columns=["rule_id", "source", "severity", "state", "title", "domain", "district",
                     "sensor_id", "details"])


async def run(dsn: str, n: int, rounds: int) -> dict[str, object]:
    pool = await create_pool(dsn, size=2)
    plain = await asyncpg.connect(dsn)
    await pool.execute("create table if not exists alerts_copy (like alerts including defaults)")
    times: dict[str, list[float]] = {k: [] for k in
                                     ("set_raise", "set_clear", "row_raise", "row_clear", "copy")}
    for r in range(rounds):
        for variant in ("set", "row"):
            sources = [f"bench-{uuid.uuid4().hex[:6]}-{i}" for i in range(n)]
            for kind, phase in ((SignalKind.RAISE, "raise"), (SignalKind.CLEAR, "clear")):
                sigs = signals(kind, sources)
                t0 = time.perf_counter()
                if variant == "set":
                    changes = await AlertStore(pool, update_every_s=0.0).apply(sigs)
                    assert len(changes) == n, (phase, len(changes))
                else:
                    await per_row(pool, sigs, clear=kind == SignalKind.CLEAR)
                times[f"{variant}_{phase}"].append(time.perf_counter() - t0)
        await pool.execute("truncate alerts_copy")
        sigs = signals(SignalKind.RAISE, [f"copy-{r}-{i}" for i in range(n)])
        t0 = time.perf_counter()
        await copy(plain, sigs)
        times["copy"].append(time.perf_counter() - t0)
        last = ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items())
        print(f"round {r + 1}: {last}", flush=True)
    await pool.close()
    await plain.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: round(n / v) for k, v in med.items()}
    return {
        "alerts_per_batch": n, "rounds": rounds,
        "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "alerts_per_s": rate,
        "ratios": {
            "raise_set_vs_per_row": round(med["row_raise"] / med["set_raise"], 2),
            "clear_set_vs_per_row": round(med["row_clear"] / med["set_clear"], 2),
            "raise_set_vs_copy": round(med["copy"] / med["set_raise"], 3),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alerts", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="cityops-bench-alert-store-"))
    state.chmod(0o755)
    stack = Stack(isolated_settings(state))
    try:
        stack.up(only=["postgres"])
        result = asyncio.run(run(stack.settings.pg_dsn, args.alerts, args.rounds))
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    out = {"benchmark": "alert_store",
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "note": "2 cores shared with PostgreSQL and whatever else runs"},
           **result}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["ratios"]), json.dumps(out["alerts_per_s"]))


if __name__ == "__main__":
    main()
