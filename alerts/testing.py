"""Scripted events and an in-process alerts service, for tests and benchmarks.

Not test doubles: these build real ``ingest.contract.Event``s, produce them on the real
Kafka topic and run the real ``AlertService`` as an asyncio task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from alerts.service import AlertService
from cityops.city import LANDMARKS_BY_CODE
from cityops.settings import Settings
from ingest.contract import Event, encode_event, event_id

TYPES = {"traffic": "lane_detector", "security": "cctv", "tourism": "footfall_counter"}


def now_ms() -> int:
    return int(time.time() * 1000)


def make_event(sensor_id: str, t_ms: int, *, landmark: str = "street_30_4",
               domain: str = "traffic", type: str | None = None,
               incident: str | None = None, interval_s: int = 60,
               lat: float | None = None, lon: float | None = None,
               receive_ms: int | None = None, **measurements: float) -> Event:
    lm = LANDMARKS_BY_CODE[landmark]
    kind = "incident" if incident else "reading"
    return Event(event_id=event_id(sensor_id, t_ms, kind, incident), sensor_id=sensor_id,
                 domain=domain, type=type or TYPES[domain], district=lm.district,
                 landmark=landmark, lat=lm.lat if lat is None else lat,
                 lon=lm.lon if lon is None else lon, event_time=t_ms,
                 receive_time=receive_ms or max(t_ms, now_ms()), kind=kind, incident=incident,
                 interval_s=interval_s, measurements=dict(measurements))


class EventProducer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=1)

    async def __aenter__(self) -> EventProducer:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send(self, *events: Event) -> None:
        futs = [await self.producer.send(self.settings.topics.events, encode_event(e),
                                         key=e.sensor_id.encode()) for e in events]
        await asyncio.gather(*futs)

    async def send_raw(self, value: bytes, key: bytes) -> None:
        await self.producer.send_and_wait(self.settings.topics.events, value, key=key)


class RunningService:
    """``AlertService`` as a task: start, wait until it owns its partitions, stop cleanly."""

    def __init__(self, settings: Settings, rules_file: Path, group: str, **kw: object) -> None:
        self.settings, self.rules_file, self.group, self.kw = settings, rules_file, group, kw
        self.service: AlertService | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, within: float = 30.0) -> AlertService:
        self._stop = asyncio.Event()
        self.service = AlertService(self.settings, rules_file=self.rules_file, group=self.group,
                                    **self.kw)  # type: ignore[arg-type]
        self._task = asyncio.create_task(self.service.run(self._stop))
        deadline = time.monotonic() + within
        while not self.service.healthy():
            if self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("alerts service did not get its partitions")
            await asyncio.sleep(0.05)
        return self.service

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 30)
        self._task = None


class ConsoleServer:
    """The real console app served by uvicorn on a loopback port, inside this event loop."""

    def __init__(self, settings: Settings, port: int) -> None:
        import uvicorn

        from alerts.console.app import create_app

        self.port = port
        self.url = f"http://{settings.host}:{port}"
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=settings.host, port=port,
                                                    log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        # the test process keeps its own SIGINT handling
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)
