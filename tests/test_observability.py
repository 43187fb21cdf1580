"""Metrics, Prometheus rules and PromQL: conventions, promtool, and the real Prometheus.

* Every ``*/metrics.py`` module of the project is imported and every metric it declares
  is held to the Prometheus naming conventions (``cityops_`` prefix, ``_total`` counters,
  ``_seconds`` duration histograms, bounded labels) and to the catalog page
  ``deploy/METRICS.md`` (both ways).
* ``promtool check config``, ``check rules`` and ``test rules`` run on
  ``deploy/prometheus`` (Debian's promtool, the same version as the stack's server).
* Every PromQL expression (dashboard panels and rules) is sent to the session stack's
  real Prometheus while this module serves the services' real metric registries on the
  ports that Prometheus scrapes: each must parse, every panel must return data, and the
  rule groups must be loaded and healthy.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from bench.dashboards import PROJECT_ROOT, PromExpr, QueryContext, load_dashboards, prom_exprs
from cityops.settings import Settings

PROM_DIR = PROJECT_ROOT / "deploy" / "prometheus"
CATALOG = PROJECT_ROOT / "deploy" / "METRICS.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
FORBIDDEN_LABELS = {"sensor_id", "sensor", "event_id", "device", "device_id", "alert_id", "id",
                    "mqtt_topic", "payload", "user", "username", "ip", "gateway"}
# A histogram measures either a duration (seconds) or a size in a base unit / count of things.
SIZE_SUFFIXES = ("_bytes", "_messages", "_events", "_rows", "_readings", "_ratio")
DURATION_WORDS = re.compile(r"\b(time|latency|duration|seconds?|took|wait|delay)\b|from .* to",
                            re.IGNORECASE)


# --------------------------------------------------------------------------------------
# The real metrics, from every package's metrics module
# --------------------------------------------------------------------------------------
def metrics_modules() -> list[ModuleType]:
    """``cityops.service`` plus every ``<package>/metrics.py`` (and one level deeper)."""
    names = ["cityops.service"]
    for path in sorted([*PROJECT_ROOT.glob("*/metrics.py"), *PROJECT_ROOT.glob("*/*/metrics.py")]):
        rel = path.relative_to(PROJECT_ROOT).with_suffix("")
        if rel.parts[0] in {"tests", "bench", "deploy", ".venv", ".state"}:
            continue
        names.append(".".join(rel.parts))
    return [importlib.import_module(n) for n in names]


def declared(module: ModuleType) -> list[MetricWrapperBase]:
    return [v for v in vars(module).values() if isinstance(v, MetricWrapperBase)]


MODULES = metrics_modules()
ALL_METRICS = {m._name: (mod.__name__, m) for mod in MODULES for m in declared(mod)}


def exposed_name(metric: MetricWrapperBase) -> str:
    return metric._name + ("_total" if metric._type == "counter" else "")


def test_every_service_package_declares_its_metrics() -> None:
    packages = {name.split(".")[0] for name, _ in ALL_METRICS.values()}
    assert {"cityops", "ingest", "processors", "alerts"} <= packages, packages


def test_metric_names_follow_prometheus_conventions() -> None:
    problems = []
    for name, (module, metric) in sorted(ALL_METRICS.items()):
        shown = exposed_name(metric)
        where = f"{module}: {shown}"
        if not re.fullmatch(r"cityops_[a-z][a-z0-9_]*[a-z0-9]", name):
            problems.append(f"{where}: name must be cityops_<snake_case>")
        if metric._type != "counter" and name.endswith("_total"):
            problems.append(f"{where}: only counters end in _total")
        if metric._type == "histogram":
            is_duration = name.endswith("_seconds") or bool(DURATION_WORDS.search(
                metric._documentation))
            if is_duration and not name.endswith("_seconds"):
                problems.append(f"{where}: a duration histogram must be in _seconds")
            if not is_duration and not name.endswith(SIZE_SUFFIXES):
                problems.append(f"{where}: a histogram must end in _seconds or a unit "
                                f"{SIZE_SUFFIXES}")
        bad = FORBIDDEN_LABELS & set(metric._labelnames)
        if bad:
            problems.append(f"{where}: unbounded label(s) {sorted(bad)}")
        if not metric._documentation.strip():
            problems.append(f"{where}: no help text")
    assert not problems, "\n".join(problems)


def test_the_registry_holds_only_prefixed_project_metrics() -> None:
    """Everything registered that is not the client's own process/GC/platform metrics."""
    builtin = re.compile(r"(process|python)_")
    names = {m.name for m in REGISTRY.collect()}
    foreign = sorted(n for n in names if not n.startswith("cityops_") and not builtin.match(n))
    assert not foreign, f"metrics without the cityops_ prefix: {foreign}"
    for n in names:
        if n.startswith("cityops_"):
            family = n.removesuffix("_total") if n.endswith("_total") else n
            assert family in ALL_METRICS or n in ALL_METRICS, (
                f"{n} is registered but declared in no */metrics.py module")


def _catalog_names() -> set[str]:
    text = CATALOG.read_text()
    return set(re.findall(r"^\|\s*`(cityops_[a-z0-9_]+)`", text, re.MULTILINE))


def test_catalog_lists_every_metric_and_nothing_else() -> None:
    real = {exposed_name(m) for _, m in ALL_METRICS.values()}
    listed = _catalog_names()
    assert real - listed == set(), f"missing from deploy/METRICS.md: {sorted(real - listed)}"
    assert listed - real == set(), f"in deploy/METRICS.md but not declared: {sorted(listed - real)}"


def test_catalog_labels_match_the_code() -> None:
    rows = re.findall(r"^\|\s*`(cityops_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|\s*([^|]*)\|",
                      CATALOG.read_text(), re.MULTILINE)
    by_name = {exposed_name(m): m for _, m in ALL_METRICS.values()}
    for name, kind, labels in rows:
        metric = by_name[name]
        assert kind == metric._type, f"{name}: catalog says {kind}, code says {metric._type}"
        listed = set(re.findall(r"`(\w+)`", labels))
        assert listed == set(metric._labelnames), (
            f"{name}: catalog labels {sorted(listed)} != code {sorted(metric._labelnames)}")


# --------------------------------------------------------------------------------------
# What the rules and dashboards refer to exists
# --------------------------------------------------------------------------------------
EXPRS = prom_exprs()
RECORDED = {rule["record"] for path in sorted((PROM_DIR / "rules").glob("*.yml"))
            for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def _sample_names(metric: MetricWrapperBase) -> set[str]:
    base = metric._name
    return {"counter": {base + "_total"},
            "histogram": {base + "_bucket", base + "_sum", base + "_count"},
            "summary": {base + "_sum", base + "_count", base},
            }.get(metric._type, {base})


def test_every_referenced_series_is_a_real_metric_or_a_recording_rule() -> None:
    samples = set().union(*(_sample_names(m) for _, m in ALL_METRICS.values()))
    for e in EXPRS:
        for name in re.findall(r"\b(cityops[_:][a-zA-Z0-9_:]+)", e.expr):
            if ":" in name:
                assert name in RECORDED, f"{e.where}: {name} is not a recording rule"
            else:
                assert name in samples, f"{e.where}: no service exports {name}"


# --------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------
def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True,
                          timeout=60)


# Every Prometheus config in deploy/ (production, compose). Not the Kubernetes one: Debian
# builds Prometheus without kubernetes_sd_configs, so its promtool cannot parse that file.
PROD_CONFIGS = sorted(p for p in (PROJECT_ROOT / "deploy").rglob("prometheus*.yml")
                      if not {"rules", "tests", "kubernetes"} & set(p.parts))


@pytest.mark.parametrize("config", PROD_CONFIGS,
                         ids=[str(p.relative_to(PROJECT_ROOT)) for p in PROD_CONFIGS])
def test_promtool_check_config(config: Path) -> None:
    proc = _promtool("check", "config", config)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_production_config_scrapes_every_service_on_its_port() -> None:
    doc = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    for service, port in Settings().metrics_ports.items():
        job = jobs.get(f"cityops-{service}")
        assert job, f"no scrape job for {service}"
        for sc in job["static_configs"]:
            assert sc["labels"] == {"service": service}
            assert all(t.endswith(f":{port}") for t in sc["targets"]), (service, sc)
    assert doc["rule_files"] == ["rules/*.yml"]


def test_promtool_check_config_of_the_stack(settings: Settings) -> None:
    """The config ``cityops stack up`` generated (it loads deploy/prometheus/rules)."""
    proc = _promtool("check", "config", settings.state_dir / "prometheus" / "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rule files found" in proc.stdout


def test_promtool_check_rules() -> None:
    files = sorted((PROM_DIR / "rules").glob("*.yml"))
    assert len(files) >= 2
    proc = _promtool("check", "rules", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules() -> None:
    files = sorted((PROM_DIR / "tests").glob("*.yml"))
    proc = _promtool("test", "rules", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    alerts = {rule["alert"] for path in sorted((PROM_DIR / "rules").glob("*.yml"))
              for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    assert {"CityopsServiceDown", "CityopsConsumerLagGrowing", "CityopsDeadLetterRateHigh",
            "CityopsDatabaseWriteErrors", "CityopsDistrictSilent"} <= alerts
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in sorted((PROM_DIR / "tests").glob("*.yml")):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fired == set(), f"alerts never shown firing: {alerts - fired}"
    assert alerts - quiet == set(), f"alerts never shown staying quiet: {alerts - quiet}"


def test_alerts_carry_severity_and_a_summary() -> None:
    for path in sorted((PROM_DIR / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                    assert rule["annotations"]["summary"], rule["alert"]


# --------------------------------------------------------------------------------------
# The real Prometheus: scraping the services' real registries
# --------------------------------------------------------------------------------------
# Plausible values for the (bounded) labels, so labelled series exist for the queries.
LABEL_VALUES = {"reason": "bad_json", "topic": "cityops.events", "table": "readings",
                "partition": "0", "window": "1m", "severity": "critical", "domain": "traffic",
                "district": "ninh_kieu", "by": "operator", "type": "threshold", "result": "ok",
                "action": "acknowledge", "step": "commit", "service": "test"}
SERVICE_OF_PACKAGE = {"ingest": "ingest", "processors": "process", "alerts": "alerts",
                      "simulators": "simulate"}


class ModuleCollector:
    """Exposes exactly one package's metrics, as that service's own /metrics would."""

    def __init__(self, metrics: list[MetricWrapperBase]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        for m in self.metrics:
            yield from m.collect()


def _exercise(metric: MetricWrapperBase, step: int) -> None:
    """Touch a metric so every labelled child exists and counters/histograms move."""
    target: Any = metric
    if metric._labelnames:
        target = metric.labels(*[LABEL_VALUES.get(n, "x") for n in metric._labelnames])
    if metric._type == "counter":
        target.inc(10 * step)
    elif metric._type == "gauge":
        target.set(step)
    elif metric._type in ("histogram", "summary"):
        for v in (0.003, 0.02, 0.2, 1.5):
            target.observe(v * step)


def _prom_get(settings: Settings, path: str, **params: str) -> dict[str, Any]:
    url = f"http://{settings.host}:{settings.prometheus_port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400 carries the parse error as JSON
        return json.loads(exc.read())


def _wait(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def scraped(settings: Settings) -> Iterator[Settings]:
    """Serve each service's real registry on its port until Prometheus has scraped it."""
    servers = []
    by_service: dict[str, list[MetricWrapperBase]] = {}
    for module, metric in ALL_METRICS.values():
        pkg = module.split(".")[0]
        if pkg in SERVICE_OF_PACKAGE:
            by_service.setdefault(SERVICE_OF_PACKAGE[pkg], []).append(metric)
    up = ALL_METRICS["cityops_service_up"][1]
    for metrics in by_service.values():
        for m in metrics:
            _exercise(m, 1)
    try:
        for service, metrics in by_service.items():
            registry = CollectorRegistry(auto_describe=True)
            registry.register(ModuleCollector([*metrics, up]))
            up.labels(service).set(1)
            port = settings.metrics_ports[service]
            server, _thread = start_http_server(port, settings.host, registry)
            servers.append(server)
        jobs = {f"cityops-{s}" for s in by_service}

        def scraped_twice() -> bool:
            targets = _prom_get(settings, "/api/v1/targets")["data"]["activeTargets"]
            healthy = {t["labels"]["job"] for t in targets if t["health"] == "up"}
            return jobs <= healthy

        _wait("Prometheus to scrape every served service", scraped_twice)
        # Move the counters again so rate() sees two different samples, then let the
        # recording rules evaluate over them.
        for metrics in by_service.values():
            for m in metrics:
                _exercise(m, 2)
        _wait("the recording rules to produce data", lambda: all(
            _prom_get(settings, "/api/v1/query", query=r)["data"]["result"]
            for r in ("cityops:ingest_messages:rate1m", "cityops:process_rows:rate1m")),
            timeout=90)
        yield settings
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


PROM_PANELS = [e for e in EXPRS if e.is_panel]


def _context() -> QueryContext:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    values: dict[str, list[str]] = {"district": ["ninh_kieu", "cai_rang"],
                                    "domain": ["traffic", "security", "tourism"]}
    return QueryContext(now - dt.timedelta(hours=1), now, values)


@pytest.mark.parametrize("expr", EXPRS, ids=[e.where for e in EXPRS])
def test_prometheus_accepts_the_expression(settings: Settings, expr: PromExpr) -> None:
    query = _context().expand_promql(expr.expr, scrape_interval_s=5)
    got = _prom_get(settings, "/api/v1/query", query=query)
    assert got["status"] == "success", f"{expr.where}: {got.get('error')}\n{query}"


@pytest.mark.parametrize("expr", PROM_PANELS, ids=[e.where for e in PROM_PANELS])
def test_panel_expression_returns_data(scraped: Settings, expr: PromExpr) -> None:
    query = _context().expand_promql(expr.expr, scrape_interval_s=5)

    def result() -> list[Any]:
        got = _prom_get(scraped, "/api/v1/query", query=query)
        assert got["status"] == "success", got
        return got["data"]["result"]

    series = _wait(f"data for {expr.where}: {query}", result, timeout=30)
    assert series


def test_rule_groups_are_loaded_and_healthy(scraped: Settings) -> None:
    groups = _prom_get(scraped, "/api/v1/rules")["data"]["groups"]
    loaded = {g["name"]: g for g in groups}
    assert {"cityops-recording", "cityops-pipeline"} <= set(loaded), sorted(loaded)
    for g in loaded.values():
        for rule in g["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


def test_dashboards_use_both_datasources() -> None:
    kinds = {t["datasource"]["type"] for d in load_dashboards().values()
             for p in d["panels"] for t in p["targets"]}
    assert kinds == {"prometheus", "grafana-postgresql-datasource"}
