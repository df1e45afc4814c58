"""Helpers for the SSE and webhook tests: the app under test, job events, an SSE
reader and a webhook receiver.

The one stand-in, named as such:

- **The GPU runner.** The app is started without runner subprocesses; tests
  append the job events a runner would append (`JobStarted`,
  `TrainingProgressed`, …) to the real event store themselves
  (`append_job_events`).

Everything else is real: `create_app(settings, start_runners=False)` with its
store, projector, middlewares, SSE hub and webhook dispatcher.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, web

from events.projections import job_stream
from events.settings import (
    ApiKey,
    AuthSettings,
    NetworkSettings,
    Settings,
    StorageSettings,
    WebhookSettings,
)
from events.store import ANY_VERSION, SQLiteEventStore
from events.types import Event, JobSubmitted
from service.app import create_app
from service.sse import SSE_OPTIONS, SseOptions

TENANTS = ("acme", "globex")


def auth(tenant: str) -> dict[str, str]:
    """Request headers authenticating as `tenant` (keys configured by `settings_for`)."""
    return {"Authorization": f"Bearer key-{tenant}"}


def settings_for(tmp_path: Path, **webhooks: Any) -> Settings:
    """Settings for tests: a temporary data folder, two tenants, loopback webhook
    targets allowed, and a compressed retry schedule (overridable)."""
    hooks: dict[str, Any] = {
        "timeout_seconds": 2.0,
        "retry_schedule_seconds": [0.05, 0.05, 0.05],
        "progress_interval_seconds": 0.0,
    }
    hooks.update(webhooks)
    return Settings(
        storage=StorageSettings(data_dir=tmp_path, durability="normal"),
        network=NetworkSettings(allow_private_urls=True),
        webhooks=WebhookSettings(**hooks),
        auth=AuthSettings(keys=[ApiKey(key=f"key-{t}", tenant=t) for t in TENANTS]),
    )


def build_app(settings: Settings, sse_options: SseOptions | None = None) -> web.Application:
    """The real app, without runner subprocesses (see the module docstring)."""
    app = create_app(settings, start_runners=False)
    if sse_options is not None:
        app[SSE_OPTIONS] = sse_options
    return app


# --------------------------------------------------------------------------- #
# Job events (the runner stand-in)
# --------------------------------------------------------------------------- #


def submitted(job_id: str, tenant: str = "acme", **config: Any) -> JobSubmitted:
    """A `JobSubmitted` as the REST handler would append it."""
    return JobSubmitted(
        job_id=job_id,
        tenant=tenant,
        job_type="dreambooth",
        config={"type": "dreambooth", "base_model": "tiny-sd15", **config},
    )


async def append_job_events(store: SQLiteEventStore, job_id: str, *events: Event) -> list[int]:
    """Append `events` to the job's stream (what the runner does); their positions."""
    return await store.append(job_stream(job_id), ANY_VERSION, list(events))


# --------------------------------------------------------------------------- #
# SSE client side
# --------------------------------------------------------------------------- #


@dataclass
class SseMessage:
    """One parsed SSE message (or comment, when `comment` is set)."""

    id: int | None = None
    event: str | None = None
    data: dict[str, Any] | None = None
    comment: str | None = None


class SseReader:
    """Parses the `text/event-stream` body of a response, message by message."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = 10.0) -> SseMessage | None:
        """The next message or comment; None at the end of the stream."""
        message = SseMessage()
        seen = False
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    return message if seen else None
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if seen:
                        return message
                    continue
                seen = True
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    message.comment = value
                elif name == "id":
                    message.id = int(value)
                elif name == "event":
                    message.event = value
                elif name == "data":
                    message.data = json.loads(value)

    async def events(self, count: int, timeout: float = 10.0) -> list[SseMessage]:
        """The next `count` event messages (comments skipped)."""
        found: list[SseMessage] = []
        while len(found) < count:
            message = await self.next(timeout)
            assert message is not None, f"stream ended after {len(found)} of {count} events"
            if message.comment is None:
                found.append(message)
        return found

    async def rest(self, timeout: float = 10.0) -> list[SseMessage]:
        """Every event message until the stream ends."""
        found: list[SseMessage] = []
        while (message := await self.next(timeout)) is not None:
            if message.comment is None:
                found.append(message)
        return found


# --------------------------------------------------------------------------- #
# Webhook receiver (a second aiohttp app on loopback)
# --------------------------------------------------------------------------- #


@dataclass
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


#: Decides the answer to one request: (status, headers), possibly after waiting.
Behaviour = Callable[[Received, list[Received]], Awaitable[tuple[int, dict[str, str]]]]


async def always_ok(request: Received, history: list[Received]) -> tuple[int, dict[str, str]]:
    return 200, {}


@dataclass
class Receiver:
    """Records every request per path and answers as that path's behaviour says."""

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        received = Received(
            path=request.path,
            headers=dict(request.headers),
            body=await request.read(),
            at=asyncio.get_running_loop().time(),
        )
        history = self.on(request.path)
        self.requests.append(received)
        self.changed.set()
        behaviour = self.behaviours.get(request.path, always_ok)
        status, headers = await behaviour(received, history)
        return web.Response(status=status, headers=headers)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        return app

    async def wait_until(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `check()` holds (re-checked on every request received)."""
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                try:
                    async with asyncio.timeout(0.2):
                        await self.changed.wait()
                except TimeoutError:
                    pass


async def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `check()` every 20 ms until it holds."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)
