"""Every application and request key, declared once (aiohttp `web.AppKey` / `web.RequestKey`)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from aiohttp import web

from events.projector import JobProjector
from events.settings import Settings
from events.store import SQLiteEventStore
from service.metrics import Metrics


class RunnerStatusSource(Protocol):
    """What the app needs of the runner supervisor: one status dict per runner.

    A dict says a runner is up with `"alive": true`, or with a `"state"` in
    `service.metrics.RUNNER_UP_STATES`.
    """

    def status(self) -> list[dict[str, Any]]: ...


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", SQLiteEventStore)
PROJECTOR = web.AppKey("projector", JobProjector)
#: Present only while runner subprocesses are supervised by this process.
SUPERVISOR = web.AppKey("supervisor", RunnerStatusSource)
#: Whether this app was created to supervise runners (`create_app(start_runners=...)`).
RUNNERS_EXPECTED = web.AppKey("runners_expected", bool)
METRICS = web.AppKey("metrics", Metrics)
#: Set when shutdown begins: long-lived streams end when it is set.
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)

#: `request[TENANT]`: the tenant of the authenticated caller (set by the auth middleware).
TENANT = web.RequestKey("tenant", str)
