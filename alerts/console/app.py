"""The console's web app: pages, the REST API (OpenAPI at ``/docs``), the live stream.

Reads and operator actions go to PostgreSQL through ``alerts.store`` (the same code the
alerts service uses, so the lifecycle rules and the audit trail are the same whoever
changes an alert); every change is published on the alerts topic, and the page learns
about all changes, its own included, from the feed of that topic over Server-Sent
Events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from aiokafka import AIOKafkaProducer
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, WithJsonSchema

from alerts.console import sensors as sensor_data
from alerts.console.auth import (
    SESSION_COOKIE,
    Principal,
    Role,
    Sessions,
    issue_token,
    list_tokens,
    revoke_token,
    rotate_token,
    token_principal,
    verify_user,
)
from alerts.console.feed import AlertFeed
from alerts.console.geo import VIEWS, render_map
from alerts.console.mapdata import SensorCollection, SensorMap
from alerts.console.wall import WallCache, WallSummary
from alerts.i18n import LANGS, translations
from alerts.incidents.model import IncidentChange, encode_incident_change
from alerts.incidents.store import IncidentStore, count_change
from alerts.metrics import (
    CONSOLE_ACTIONS,
    CONSOLE_DENIED,
    CONSOLE_LOGINS,
    CONSOLE_STREAMS,
)
from alerts.model import Alert, AlertChange, encode_change
from alerts.ruleset import RuleError, load_rules, rule_title_templates
from alerts.store import AlertStore, create_pool
from cityops.city import DISTRICTS_BY_CODE, LANDMARKS_BY_CODE
from cityops.registry import Fleet, FleetError, load_fleet
from cityops.settings import Settings

STATIC = Path(__file__).parent / "static"
# Browser libraries from npm (alerts/console/web, installed by scripts/bootstrap.sh), served
# by the console itself: /vendor/<package>/ is the folder of the package's browser build.
WEB_MODULES = Path(__file__).parent / "web" / "node_modules"
VENDOR = {"maplibre-gl": "maplibre-gl/dist", "uplot": "uplot/dist", "i18next": "i18next/dist/esm"}
log = logging.getLogger(__name__)
Severity = Literal["critical", "major", "minor", "warning", "info"]

# --- what an input may be (checked at the edge, so no input reaches PostgreSQL or the
# datetime functions in a form they reject with an exception, i.e. a 500) -------------------------
INT64_MAX = 2**63 - 1  # bigserial ids
# One line of text: no control characters (PostgreSQL text cannot hold NUL, and nothing an
# operator types or a sensor id contains needs the others).
LINE = r"^[^\x00-\x1f\x7f]*$"
# Free text (notes, reasons): also newlines and tabs.
TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
# Epoch milliseconds a maintenance window may name: 1970 .. 2100 (datetime handles both).
EPOCH_MS_MAX = 4_102_444_800_000
MAX_WINDOW_S = 30 * 86400  # a maintenance window lasts at most this long ...
MAX_WINDOW_LEAD_S = 366 * 86400  # ... and starts at most this far ahead
MAX_BODY_BYTES = 64 * 1024  # the largest request body any endpoint needs is a 2,000-char note

Id = Annotated[int, PathParam(ge=1, le=INT64_MAX, description="a positive 64-bit id")]
SensorId = Annotated[str, PathParam(min_length=1, max_length=128, pattern=LINE)]
Filter = Annotated[str | None, Query(min_length=1, max_length=64, pattern=LINE)]


# --- API models (what /docs shows) --------------------------------------------------------
class ErrorItem(BaseModel):
    loc: list[str] = Field(description="where: body, query, path, then the field")
    msg: str
    type: str


class Problem(BaseModel):
    """Every 4xx answer: a sentence, or (invalid input) what is wrong where."""

    detail: str | list[ErrorItem]


class AlertOut(BaseModel):
    """An alert; times are epoch milliseconds UTC."""

    alert_id: int
    rule_id: str
    source: str = Field(description="sensor id, or landmark:<code> for correlated incidents")
    severity: Severity
    state: Literal["active", "cleared"]
    acknowledged: bool
    acked_by: str | None = None
    acked_at: int | None = None
    assignee: str | None = None
    title: str
    message: str = ""
    domain: str = ""
    district: str = ""
    landmark: str = ""
    sensor_id: str | None = None
    lat: float | None = None
    lon: float | None = None
    value: float | None = None
    details: dict[str, Any] = {}
    updates: int = 0
    version: int = 1
    escalation_level: int = 0
    escalated_at: int | None = None
    first_event_time: int | None = None
    last_event_time: int | None = None
    raised_at: int
    updated_at: int
    cleared_at: int | None = None
    cleared_by: str | None = None
    incident_id: int | None = None


class IncidentOut(BaseModel):
    """Alerts of one cause (``alerts.incidents``); times are epoch milliseconds UTC."""

    incident_id: int
    group_key: str = Field(description="rule and grouping fields, e.g. "
                                        "speed_drop|landmark=street_30_4")
    rule_id: str
    state: Literal["open", "resolved"]
    severity: Severity = Field(description="the highest severity of its alerts")
    title: str = Field(description="English; consoles render rule_id + title_args in the "
                                   "user's language")
    title_args: dict[str, Any] = {}
    domain: str = ""
    district: str = ""
    landmark: str = ""
    gateway: str = ""
    lat: float | None = None
    lon: float | None = None
    alert_count: int = Field(description="alerts that joined it")
    active_count: int = Field(description="of them, still active")
    sensor_count: int
    first_seen: int
    last_seen: int
    acknowledged: bool = False
    acked_by: str | None = None
    acked_at: int | None = None
    assignee: str | None = None
    storm: bool = Field(default=False, description="its rule raised faster than storm control "
                                                   "allows: its alerts were not listed one by one")
    inhibited_by: int | None = Field(default=None, description="the incident suppressing it")
    announced_at: int | None = None
    announced_severity: str | None = None
    resolved_at: int | None = None
    resolved_by: str | None = None
    version: int = 1
    created_at: int
    updated_at: int
    inhibits: int = Field(default=0, description="open incidents it suppresses")


class TimelineEntry(BaseModel):
    at: int
    kind: Literal["alert", "incident"]
    actor: str
    action: str
    alert_id: int | None = None
    detail: dict[str, Any] = {}


class IncidentDetail(BaseModel):
    incident: IncidentOut
    alerts: list[AlertOut]
    inhibited: list[IncidentOut]
    sensors: list[str]
    timeline: list[TimelineEntry]


class AuditEntry(BaseModel):
    at: int
    actor: str
    action: str
    detail: dict[str, Any]


class AlertDetail(BaseModel):
    alert: AlertOut
    audit: list[AuditEntry]


class LoginIn(BaseModel):
    username: str = Field(min_length=1, max_length=64, pattern=LINE)
    password: str = Field(min_length=1, max_length=256)


class Me(BaseModel):
    user: str
    role: str
    csrf: str = ""
    lang: str | None = Field(default=None, description="the language the user picked, if any")


class LangIn(BaseModel):
    lang: Literal["vi", "en"]


class ConsoleConfig(BaseModel):
    """What every page needs before it draws anything."""

    default_lang: str = Field(description="the language a user sees until they pick one")
    langs: list[str]
    timezone: str = Field(description="IANA zone every time is shown in")
    map_style_url: str = Field(description="MapLibre style of the city's tile server; "
                                           "empty: the shipped Can Tho GeoJSON only")


class NoteIn(BaseModel):
    note: str | None = Field(default=None, max_length=2000, pattern=TEXT)


class CommentIn(BaseModel):
    note: str = Field(min_length=1, max_length=2000, pattern=TEXT)


class AssignIn(BaseModel):
    assignee: str = Field(min_length=1, max_length=64, pattern=LINE)
    note: str | None = Field(default=None, max_length=2000, pattern=TEXT)


class MaintenanceIn(BaseModel):
    """A window: starts_at (default now) plus either ends_at or duration_s; whichever sets
    the end, the window lasts at most 30 days and starts at most a year ahead."""

    scope: Literal["sensor", "district", "landmark"]
    target: str = Field(min_length=1, max_length=128, pattern=LINE)
    starts_at: int | None = Field(default=None, ge=0, le=EPOCH_MS_MAX,
                                  description="epoch ms; default now")
    ends_at: int | None = Field(default=None, ge=0, le=EPOCH_MS_MAX,
                                description="epoch ms; or give duration_s (not both)")
    duration_s: int | None = Field(default=None, gt=0, le=MAX_WINDOW_S)
    reason: str = Field(default="", max_length=500, pattern=TEXT)


class MaintenanceOut(BaseModel):
    window_id: int
    scope: str
    target: str
    starts_at: int
    ends_at: int
    reason: str
    created_by: str


class TokenIn(BaseModel):
    agency: str = Field(min_length=2, max_length=64, pattern=LINE)


class TokenOut(BaseModel):
    token_id: int = Field(description="to list, rotate or revoke it later")
    agency: str
    token: str = Field(description="shown once; send as 'Authorization: Bearer <token>'")
    scope: str = "read"


class TokenInfo(BaseModel):
    """An issued token (never the token itself: only its hash is stored)."""

    token_id: int
    agency: str
    scope: str
    created_by: str
    created_at: int = Field(description="epoch ms")
    revoked_at: int | None = Field(default=None, description="epoch ms; null while valid")


class SensorOut(BaseModel):
    sensor: dict[str, Any]
    latest: dict[str, dict[str, Any]]
    alerts: list[AlertOut]


# [epoch ms, value]. Documented as a plain 2-number array: the tuple's own schema
# (prefixItems) is valid OpenAPI 3.1 but not understood by common tools, schemathesis among
# them, which then cannot check this response.
Point = Annotated[tuple[int, float], WithJsonSchema({
    "type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2,
    "description": "[epoch ms, value]"})]


class SeriesOut(BaseModel):
    sensor_id: str
    metric: str
    points: list[Point]


class LatestRow(BaseModel):
    sensor_id: str
    metric: str
    time: int
    value: float
    district: str
    domain: str
    type: str
    landmark: str


# --- the app ------------------------------------------------------------------------------------
class Console:
    """What the request handlers share (one per app)."""

    def __init__(self, settings: Settings, fleet: Fleet | None) -> None:
        self.settings = settings
        self.fleet = fleet
        self.sessions = Sessions(settings.console_secret, settings.console_session_s)
        self.feed = AlertFeed(settings)
        self.pool: asyncpg.Pool | None = None
        self.store: AlertStore | None = None
        self.incidents: IncidentStore | None = None
        self.producer: AIOKafkaProducer | None = None
        self.maps: dict[str, str] = {}
        self._rules: tuple[float, dict[str, dict[str, str]]] | None = None

    def rule_titles(self) -> dict[str, dict[str, str]]:
        """Title templates of the rules file (``rule_title_templates``); re-read when the
        file changes."""
        path = self.settings.rules_file
        try:
            mtime = path.stat().st_mtime
            if self._rules is None or self._rules[0] != mtime:
                self._rules = (mtime, rule_title_templates(load_rules(path)))
        except (OSError, RuleError) as exc:
            log.warning("rules file unreadable for titles: %s", exc)
            return {}
        return self._rules[1]

    async def publish(self, change: AlertChange) -> None:
        assert self.producer
        await self.producer.send_and_wait(self.settings.topics.alerts, encode_change(change),
                                          key=str(change.alert.alert_id).encode())

    async def publish_incident(self, *changes: IncidentChange) -> None:
        assert self.producer
        for change in changes:
            await self.producer.send_and_wait(self.settings.topics.incidents,
                                              encode_incident_change(change),
                                              key=str(change.incident.incident_id).encode())
            count_change(change)


def _alert_dict(a: Alert) -> dict[str, Any]:
    return msgspec.to_builtins(a)  # type: ignore[no-any-return]


# --- who is asking (module level: FastAPI resolves these annotations by name) -------------------
async def principal(request: Request) -> Principal | None:
    console: Console = request.app.state.console
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        assert console.pool
        return await token_principal(console.pool, auth[7:].strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    return console.sessions.read(cookie) if cookie else None


def require(role: Role) -> Any:
    """A dependency: the caller, if authenticated with at least ``role`` (and CSRF-safe)."""
    async def dep(request: Request) -> Principal:
        p = await principal(request)
        if p is None:
            CONSOLE_DENIED.labels("unauthenticated").inc()
            raise HTTPException(401, "log in, or send a valid API token")
        if p.role < role:
            CONSOLE_DENIED.labels("role").inc()
            raise HTTPException(403, f"requires the {role.name.lower()} role")
        if request.method not in ("GET", "HEAD") and p.via == "session":
            console: Console = request.app.state.console
            if request.headers.get("x-csrf-token", "") != console.sessions.csrf(p.session):
                CONSOLE_DENIED.labels("csrf").inc()
                raise HTTPException(403, "missing or wrong X-CSRF-Token header")
        return p
    return Depends(dep)


Reader = Annotated[Principal, require(Role.READER)]
Viewer = Annotated[Principal, require(Role.VIEWER)]
Operator = Annotated[Principal, require(Role.OPERATOR)]
Supervisor = Annotated[Principal, require(Role.SUPERVISOR)]


# --- the edge: whatever arrives, the answer is a 4xx, never a 500 --------------------------------
def _json(status: int, content: Any) -> Response:
    """JSON that can always be encoded: ensure_ascii escapes even a lone surrogate (valid in
    a JSON string sent to us, not encodable as UTF-8), which FastAPI's default would
    turn into a 500 while reporting the invalid input."""
    return Response(json.dumps(content, ensure_ascii=True, default=str), status_code=status,
                    media_type="application/json")


async def _invalid_request(request: Request, exc: Exception) -> Response:
    """422 naming what is wrong, without echoing the input back (it may be anything)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
               "type": str(e.get("type", ""))} for e in exc.errors()]
    return _json(422, {"detail": errors})


async def _refused_by_database(request: Request, exc: Exception) -> Response:
    """Last resort: input the edge's types let through but PostgreSQL or a conversion
    refused (asyncpg.DataError: bad characters, numbers or times out of range). Logged, as
    it means a bound is missing above; the caller gets a 422, not a 500."""
    log.warning("input refused below the edge on %s %s: %s: %s", request.method,
                request.url.path, type(exc).__name__, exc)
    return _json(422, {"detail": f"invalid input ({type(exc).__name__})"})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or as they
    stream in: no endpoint needs more, and nothing else would stop a client from making
    the server buffer and parse megabytes."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, fleet: Fleet | None = None) -> FastAPI:
    if fleet is None:
        with contextlib.suppress(FleetError):
            fleet = load_fleet(settings.fleet_file)
    console = Console(settings, fleet)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        console.pool = await create_pool(settings.pg_dsn, size=8)
        console.incidents = IncidentStore(console.pool)
        console.store = AlertStore(console.pool, incidents=console.incidents)
        console.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                            linger_ms=1, compression_type=settings.kafka_codec)
        await console.producer.start()
        await console.feed.start()
        try:
            yield
        finally:
            await console.feed.stop()
            await console.producer.stop()
            await console.pool.close()

    app = FastAPI(
        title="cityops console API",
        version="1",
        description="Alerts and latest sensor values of the Can Tho operations center. "
                    "Browsers log in (`POST /api/login`, session cookie + `X-CSRF-Token` "
                    "header for changes); other agencies use read-only API tokens "
                    "(`Authorization: Bearer cot_...`) on alerts and latest values.",
        lifespan=lifespan,
        # one documented shape for every refusal (401, 403, 404, 409, 413, 422), so clients
        # and the schema-driven fuzz test (tests/test_console_fuzz.py) can rely on it
        responses={"4XX": {"model": Problem, "description": "refused: not logged in (401), "
                           "role or CSRF (403), not found (404), conflict (409), body too "
                           "large (413), invalid input (422)"}},
    )
    app.state.console = console
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for package, folder in VENDOR.items():  # check_dir: the API runs without them
        app.mount(f"/vendor/{package}", StaticFiles(directory=WEB_MODULES / folder,
                                                    check_dir=False), name=package)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(asyncpg.DataError, _refused_by_database)
    app.add_exception_handler(OverflowError, _refused_by_database)
    app.add_exception_handler(UnicodeError, _refused_by_database)

    def store() -> AlertStore:
        assert console.store
        return console.store

    # --- pages ---------------------------------------------------------------------------------
    def _page(name: str) -> HTMLResponse:
        return HTMLResponse((STATIC / name).read_text(),
                            headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        p = await principal(request)
        if p is None or p.via != "session":
            return RedirectResponse("/login", 303)
        return _page("index.html")

    @app.get("/login", include_in_schema=False)
    async def login_page() -> Response:
        return _page("login.html")

    @app.get("/sensor/{sensor_id}", include_in_schema=False)
    async def sensor_page(sensor_id: str, request: Request) -> Response:
        p = await principal(request)
        if p is None or p.via != "session":
            return RedirectResponse("/login", 303)
        return _page("sensor.html")

    @app.get("/incident/{incident_id}", include_in_schema=False)
    async def incident_page(incident_id: str, request: Request) -> Response:
        """The incident's page; the page itself asks the API for the incident (and shows
        "not found" there), so any id gets the page once logged in."""
        p = await principal(request)
        if p is None or p.via != "session":
            return RedirectResponse("/login", 303)
        return _page("incident.html")

    # --- session --------------------------------------------------------------------------------
    @app.post("/api/login", response_model=Me, tags=["session"])
    async def login(body: LoginIn, response: Response) -> Me:
        """Check the password (argon2id) and set the session cookie."""
        assert console.pool
        role = await verify_user(console.pool, body.username, body.password)
        if role is None:
            CONSOLE_LOGINS.labels("rejected").inc()
            await asyncio.sleep(0.3)  # blunt password guessing a little
            raise HTTPException(401, "wrong username or password")
        CONSOLE_LOGINS.labels("ok").inc()
        value = console.sessions.issue(body.username, role)
        response.set_cookie(SESSION_COOKIE, value, max_age=settings.console_session_s,
                            httponly=True, samesite="strict", path="/")
        return Me(user=body.username, role=role.name.lower(), csrf=console.sessions.csrf(value))

    @app.post("/api/logout", tags=["session"])
    async def logout(response: Response) -> dict[str, bool]:
        response.delete_cookie(SESSION_COOKIE, path="/")
        return {"ok": True}

    @app.get("/api/me", response_model=Me, tags=["session"])
    async def me(p: Viewer) -> Me:
        assert console.pool
        lang = await console.pool.fetchval("select lang from console_users where username = $1",
                                           p.name)
        return Me(user=p.name, role=p.role.name.lower(), lang=lang,
                  csrf=console.sessions.csrf(p.session) if p.via == "session" else "")

    @app.put("/api/me/lang", response_model=Me, tags=["session"])
    async def set_lang(body: LangIn, p: Viewer) -> Me:
        """Remember the user's language (every device they log in from gets it)."""
        assert console.pool
        await console.pool.execute("update console_users set lang = $2 where username = $1",
                                   p.name, body.lang)
        return Me(user=p.name, role=p.role.name.lower(), lang=body.lang,
                  csrf=console.sessions.csrf(p.session) if p.via == "session" else "")

    @app.get("/api/config", response_model=ConsoleConfig, tags=["session"])
    async def config() -> ConsoleConfig:
        """Language, time zone and map style: public, the login page needs them too."""
        return ConsoleConfig(default_lang=settings.console_lang, langs=list(LANGS),
                             timezone=settings.console_timezone,
                             map_style_url=settings.console_map_style_url)

    @app.get("/api/i18n/{lang}", tags=["session"])
    async def messages(lang: Literal["vi", "en"]) -> dict[str, Any]:
        """Every message of a language, by namespace (i18next resources; public: the login
        page is translated too). Rule titles of rules the catalogs do not know come from
        the rules file."""
        return translations(lang, console.rule_titles())

    # --- alerts ----------------------------------------------------------------------------------
    @app.get("/api/alerts", response_model=list[AlertOut], tags=["alerts"])
    async def list_alerts(p: Reader, state: Literal["active", "cleared"] | None = None,
                          domain: Filter = None, district: Filter = None,
                          severity: Severity | None = None, acknowledged: bool | None = None,
                          limit: Annotated[int, Query(ge=1, le=2000)] = 500) -> Any:
        """Alerts, active first, newest change first."""
        got = await store().search(state=state, domain=domain, district=district,
                                   severity=severity, acknowledged=acknowledged, limit=limit)
        return [_alert_dict(a) for a in got]

    @app.get("/api/alerts/{alert_id}", response_model=AlertDetail, tags=["alerts"])
    async def get_alert(alert_id: Id, p: Reader) -> Any:
        a = await store().get(alert_id)
        if a is None:
            raise HTTPException(404, f"no alert {alert_id}")
        return {"alert": _alert_dict(a), "audit": await store().audit(alert_id)}

    async def _act(alert_id: int, action: str, p: Principal, **kw: Any) -> Any:
        change = await store().act(alert_id, action, p.name, **kw)
        if change is None:
            if await store().get(alert_id) is None:
                raise HTTPException(404, f"no alert {alert_id}")
            raise HTTPException(409, f"alert {alert_id} is already cleared")
        CONSOLE_ACTIONS.labels(action).inc()
        await console.publish(change)
        await console.publish_incident(*store().take_incident_changes())
        return _alert_dict(change.alert)

    # --- incidents -------------------------------------------------------------------------------
    def incidents() -> IncidentStore:
        assert console.incidents
        return console.incidents

    def _incident_dict(inc: Any, inhibits: int = 0) -> dict[str, Any]:
        return {**msgspec.to_builtins(inc), "inhibits": inhibits}

    @app.get("/api/incidents", response_model=list[IncidentOut], tags=["incidents"])
    async def list_incidents(p: Reader, state: Literal["open", "resolved"] | None = None,
                             domain: Filter = None, district: Filter = None,
                             severity: Severity | None = None,
                             acknowledged: bool | None = None, include_inhibited: bool = False,
                             limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> Any:
        """Incidents, open first, worst first, newest change first; inhibited ones (under
        a bigger cause) only with include_inhibited."""
        got = await incidents().search(state=state, domain=domain, district=district,
                                       severity=severity, acknowledged=acknowledged,
                                       include_inhibited=include_inhibited, limit=limit)
        return [_incident_dict(i, n) for i, n in got]

    @app.get("/api/incidents/{incident_id}", response_model=IncidentDetail, tags=["incidents"])
    async def get_incident(incident_id: Id, p: Reader) -> Any:
        """An incident, its alerts, what it suppresses, its sensors and its timeline (alert
        raises and clears, and every action on it)."""
        got = await incidents().detail(incident_id)
        if got is None:
            raise HTTPException(404, f"no incident {incident_id}")
        got["incident"]["inhibits"] = got.pop("inhibits")
        return got

    async def _act_incident(incident_id: int, action: str, p: Principal, **kw: Any) -> Any:
        acted = await incidents().act(incident_id, action, p.name, **kw)
        if acted is None:
            if await incidents().get(incident_id) is None:
                raise HTTPException(404, f"no incident {incident_id}")
            raise HTTPException(409, f"incident {incident_id} is already resolved")
        CONSOLE_ACTIONS.labels(f"incident_{action}").inc()
        await console.publish_incident(acted.change, *acted.released)
        return _incident_dict(acted.change.incident)

    @app.post("/api/incidents/{incident_id}/acknowledge", response_model=IncidentOut,
              tags=["incidents"])
    async def acknowledge_incident(incident_id: Id, p: Operator,
                                   body: NoteIn | None = None) -> Any:
        """Operator: I have seen it and I am on it (acknowledges its active alerts)."""
        return await _act_incident(incident_id, "acknowledged", p,
                                   note=body.note if body else None)

    @app.post("/api/incidents/{incident_id}/comment", response_model=IncidentOut,
              tags=["incidents"])
    async def comment_incident(incident_id: Id, body: CommentIn, p: Operator) -> Any:
        """Operator: a note in the incident's timeline."""
        return await _act_incident(incident_id, "commented", p, note=body.note)

    @app.post("/api/incidents/{incident_id}/assign", response_model=IncidentOut,
              tags=["incidents"])
    async def assign_incident(incident_id: Id, body: AssignIn, p: Operator) -> Any:
        """Operator: hand the incident (and its active alerts) to someone."""
        return await _act_incident(incident_id, "assigned", p, assignee=body.assignee,
                                   note=body.note)

    @app.post("/api/incidents/{incident_id}/resolve", response_model=IncidentOut,
              tags=["incidents"])
    async def resolve_incident(incident_id: Id, p: Operator, body: NoteIn | None = None) -> Any:
        """Operator: resolved; its active alerts are cleared (their rules raise again only
        once their condition has ended and started again)."""
        return await _act_incident(incident_id, "resolved", p,
                                   note=body.note if body else None)

    @app.post("/api/alerts/{alert_id}/acknowledge", response_model=AlertOut, tags=["alerts"])
    async def acknowledge(alert_id: Id, p: Operator, body: NoteIn | None = None) -> Any:
        """Operator or supervisor: I have seen it and I am on it."""
        return await _act(alert_id, "acknowledged", p, note=body.note if body else None)

    @app.post("/api/alerts/{alert_id}/comment", response_model=AlertOut, tags=["alerts"])
    async def comment(alert_id: Id, body: CommentIn, p: Operator) -> Any:
        """Operator or supervisor: add a note to the alert's audit trail."""
        return await _act(alert_id, "commented", p, note=body.note)

    @app.post("/api/alerts/{alert_id}/assign", response_model=AlertOut, tags=["alerts"])
    async def assign(alert_id: Id, body: AssignIn, p: Supervisor) -> Any:
        """Supervisor: hand the alert to someone."""
        return await _act(alert_id, "assigned", p, assignee=body.assignee, note=body.note)

    @app.post("/api/alerts/{alert_id}/clear", response_model=AlertOut, tags=["alerts"])
    async def clear(alert_id: Id, p: Supervisor, body: NoteIn | None = None) -> Any:
        """Supervisor: clear by hand (the rule will not re-raise until its condition ends)."""
        return await _act(alert_id, "cleared", p, note=body.note if body else None)

    @app.get("/api/stream", tags=["alerts"],
             response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "Server-Sent Events: `event: alert`, data is "
                                             "an AlertChange (action, actor, at, alert); "
                                             "`event: incident`, data is an IncidentChange "
                                             "(action, actor, at, incident, note)"}})
    async def stream(request: Request, p: Viewer) -> StreamingResponse:
        """Live alert and incident changes as Server-Sent Events."""
        sub = console.feed.subscribe()

        async def events() -> AsyncIterator[bytes]:
            CONSOLE_STREAMS.inc()
            try:
                yield b"retry: 2000\n: connected\n\n"
                while True:
                    try:
                        item = await asyncio.wait_for(sub.queue.get(), 15)
                    except TimeoutError:
                        if sub.overflowed:
                            yield b"event: reload\ndata: {}\n\n"
                            return
                        yield b": keep-alive\n\n"
                        continue
                    if item is None:
                        return
                    event, data = item
                    yield b"event: " + event + b"\ndata: " + data + b"\n\n"
            finally:
                CONSOLE_STREAMS.dec()
                console.feed.unsubscribe(sub)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    # --- maintenance windows -------------------------------------------------------------------
    @app.get("/api/maintenance", response_model=list[MaintenanceOut], tags=["maintenance"])
    async def list_windows(p: Viewer) -> Any:
        return [dataclasses.asdict(w) for w in await store().load_windows()]

    @app.post("/api/maintenance", response_model=MaintenanceOut, status_code=201,
              tags=["maintenance"])
    async def add_window(body: MaintenanceIn, p: Supervisor) -> Any:
        """Supervisor: silence new alerts from a sensor, district or landmark for a while."""
        if body.scope == "district" and body.target not in DISTRICTS_BY_CODE:
            raise HTTPException(422, f"unknown district {body.target!r}")
        if body.scope == "landmark" and body.target not in LANDMARKS_BY_CODE:
            raise HTTPException(422, f"unknown landmark {body.target!r}")
        now = int(time.time() * 1000)
        if body.ends_at is not None and body.duration_s is not None:
            raise HTTPException(422, "give ends_at or duration_s, not both")
        start = now if body.starts_at is None else body.starts_at
        end = body.ends_at if body.duration_s is None else start + body.duration_s * 1000
        if end is None or end <= start:
            raise HTTPException(422, "give ends_at after starts_at, or duration_s")
        # the same bounds whichever field set the end
        if end - start > MAX_WINDOW_S * 1000:
            raise HTTPException(422, f"a maintenance window lasts at most "
                                     f"{MAX_WINDOW_S // 86400} days")
        if start > now + MAX_WINDOW_LEAD_S * 1000:
            raise HTTPException(422, "a maintenance window starts at most a year ahead")
        if end <= now:
            raise HTTPException(422, "that window would already be over")
        wid = await store().add_window(body.scope, body.target, start, end, body.reason, p.name)
        return MaintenanceOut(window_id=wid, scope=body.scope, target=body.target,
                              starts_at=start, ends_at=end, reason=body.reason,
                              created_by=p.name)

    @app.delete("/api/maintenance/{window_id}", tags=["maintenance"])
    async def delete_window(window_id: Id, p: Supervisor) -> dict[str, bool]:
        if not await store().delete_window(window_id):
            raise HTTPException(404, f"no maintenance window {window_id}")
        return {"deleted": True}

    # --- tokens --------------------------------------------------------------------------------
    @app.post("/api/tokens", response_model=TokenOut, status_code=201, tags=["tokens"])
    async def new_token(body: TokenIn, p: Supervisor) -> TokenOut:
        """Supervisor: a read-only API token for another agency (shown once)."""
        assert console.pool
        token_id, token = await issue_token(console.pool, body.agency, p.name)
        return TokenOut(token_id=token_id, agency=body.agency, token=token)

    @app.get("/api/tokens", response_model=list[TokenInfo], tags=["tokens"])
    async def tokens(p: Supervisor) -> Any:
        """Supervisor: every token issued, newest first (revoked ones with revoked_at)."""
        assert console.pool
        return await list_tokens(console.pool)

    @app.post("/api/tokens/{token_id}/rotate", response_model=TokenOut, status_code=201,
              tags=["tokens"])
    async def rotate(token_id: Id, p: Supervisor) -> TokenOut:
        """Supervisor: a new token for the same agency (shown once); the old one stops
        working at once."""
        assert console.pool
        got = await rotate_token(console.pool, token_id, p.name)
        if got is None:
            raise HTTPException(404, f"no active token {token_id}")
        CONSOLE_ACTIONS.labels("token_rotated").inc()
        new_id, agency, token = got
        return TokenOut(token_id=new_id, agency=agency, token=token)

    @app.delete("/api/tokens/{token_id}", tags=["tokens"])
    async def revoke(token_id: Id, p: Supervisor) -> dict[str, bool]:
        """Supervisor: revoke a token; its next request gets 401."""
        assert console.pool
        if not await revoke_token(console.pool, token_id):
            raise HTTPException(404, f"no active token {token_id}")
        CONSOLE_ACTIONS.labels("token_revoked").inc()
        return {"revoked": True}

    # --- webhook deliveries (alerts/incidents/webhook.py) -------------------------------------
    from alerts.incidents.webhook import recent_deliveries

    class WebhookDeliveryOut(BaseModel):
        """A notification of the critical-incident webhook; times are epoch ms UTC."""

        notification_id: int = Field(description="sent as X-Cityops-Delivery")
        incident_id: int
        kind: str = Field(description="what was notified, e.g. critical")
        title: str | None = None
        status: Literal["pending", "delivered", "failed"]
        attempts: int
        last_status: int | None = Field(default=None,
                                        description="HTTP status of the last attempt")
        last_error: str | None = Field(default=None,
                                       description="what went wrong in the last failed attempt")
        created_at: int
        next_attempt_at: int | None = Field(default=None, description="while pending")
        delivered_at: int | None = None
        failed_at: int | None = Field(default=None, description="given up")

    @app.get("/api/webhooks/deliveries", response_model=list[WebhookDeliveryOut],
             tags=["webhooks"])
    async def webhook_deliveries(p: Supervisor,
                                 limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Any:
        """Supervisor: the latest webhook notifications, newest first: pending, delivered
        or failed (given up), with attempts and the last error."""
        assert console.pool
        return await recent_deliveries(console.pool, limit)

    # --- sensors and the map ---------------------------------------------------------------------
    @app.get("/api/sensors/{sensor_id}", response_model=SensorOut, tags=["sensors"])
    async def sensor(sensor_id: SensorId, p: Reader) -> Any:
        """A sensor, its latest value per metric, and its active alerts."""
        assert console.pool
        info = await sensor_data.sensor_info(console.pool, console.fleet, sensor_id)
        if info is None:
            raise HTTPException(404, f"no sensor {sensor_id!r}")
        rows = await console.pool.fetch("select * from alerts where sensor_id = $1 and "
                                        "state = 'active' order by raised_at desc", sensor_id)
        from alerts.store import row_to_alert

        return {"sensor": info, "latest": await sensor_data.latest(console.pool, sensor_id),
                "alerts": [_alert_dict(row_to_alert(r)) for r in rows]}

    @app.get("/api/sensors/{sensor_id}/series", response_model=SeriesOut, tags=["sensors"])
    async def sensor_series(sensor_id: SensorId,
                            metric: Annotated[str, Query(min_length=1, max_length=64,
                                                         pattern=LINE)],
                            p: Reader,
                            minutes: Annotated[int, Query(ge=1, le=7 * 1440)] = 120) -> Any:
        """Recent readings of one metric (for the sparkline)."""
        assert console.pool
        pts = await sensor_data.series(console.pool, sensor_id, metric, minutes)
        return {"sensor_id": sensor_id, "metric": metric, "points": pts}

    @app.get("/api/latest", response_model=list[LatestRow], tags=["sensors"])
    async def latest(p: Reader, district: Filter = None, domain: Filter = None,
                     limit: Annotated[int, Query(ge=1, le=20000)] = 5000) -> Any:
        """Latest value of every sensor and metric (optionally one district or domain)."""
        assert console.pool
        return await sensor_data.latest_many(console.pool, district=district, domain=domain,
                                             limit=limit)

    @app.get("/api/map.svg", tags=["map"], response_class=Response,
             responses={200: {"content": {"image/svg+xml": {}}}})
    async def map_svg(p: Viewer, view: Literal["city", "center"] = "city") -> Response:
        """Districts, roads, landmarks and sensors of Can Tho as SVG."""
        svg = console.maps.get(view)
        if svg is None:
            svg = console.maps[view] = render_map(console.fleet, view)
        return Response(svg, media_type="image/svg+xml",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/places", tags=["map"])
    async def places(p: Viewer) -> dict[str, Any]:
        """Names of districts and landmarks (for filters and labels)."""
        return {"districts": {c: d.name for c, d in DISTRICTS_BY_CODE.items()},
                "landmarks": {c: lm.name for c, lm in LANDMARKS_BY_CODE.items()},
                "views": list(VIEWS)}

    # --- the city map and the wall (issue 16) ------------------------------------------------
    # The MapLibre map's live layer (static/map.js) and the video wall (static/wall.*): both
    # are polled by every open screen, so both answers are cached for a few seconds.
    sensor_map = SensorMap(console.fleet)
    wall_cache = WallCache(settings.console_timezone)

    @app.get("/api/map/sensors", response_model=SensorCollection, tags=["map"])
    async def map_sensors(p: Viewer) -> Response:
        """Every sensor of the fleet as GeoJSON points, with its state: the worst active
        alert's severity, offline (its worst alert is sensor_offline), or ok. At most 5 s
        old."""
        assert console.pool
        return Response(await sensor_map.geojson(console.pool), media_type="application/json",
                        headers={"Cache-Control": "private, max-age=5"})

    @app.get("/api/wall/summary", response_model=WallSummary, tags=["map"])
    async def wall_summary(p: Viewer,
                           at: Annotated[int | None, Query(
                               ge=0, le=EPOCH_MS_MAX,
                               description="epoch ms the traffic hour and the charts are "
                                           "for (replays); default now, cached 5 s")] = None
                           ) -> WallSummary:
        """The wall's tiles: traffic now against the usual for this hour (city and
        districts), crowds at watched landmarks against capacity, open incidents by
        severity, and the last three hours per domain."""
        assert console.pool
        return await wall_cache.get(console.pool, at)

    @app.get("/wall", include_in_schema=False)
    async def wall_page(request: Request) -> Response:
        p = await principal(request)
        if p is None or p.via != "session":
            return RedirectResponse("/login?next=/wall", 303)
        return _page("wall.html")

    # --- operations ----------------------------------------------------------------------------
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        ok = console.feed.ready.is_set()
        try:
            assert console.pool
            await console.pool.fetchval("select 1")
        except Exception:
            ok = False
        return JSONResponse({"service": "console", "healthy": ok}, status_code=200 if ok else 503)

    return app
