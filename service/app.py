"""The application factory: `create_app(settings)`.

Resources are opened in `cleanup_ctx` generators, in dependency order, and
closed in reverse: the event store, the job projector, the SSE hub, the
webhook dispatcher, then the runner supervisor (last up, first down: runners
only run while everything they report to is there).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from events.projector import JobProjector
from events.settings import Settings
from events.store import SQLiteEventStore
from service.auth import Authenticator
from service.keys import (
    METRICS,
    PROJECTOR,
    RUNNERS_EXPECTED,
    SETTINGS,
    SHUTTING_DOWN,
    STORE,
    SUPERVISOR,
)
from service.metrics import Metrics
from service.middleware import (
    auth_middleware,
    docs_basic_auth_middleware,
    error_middleware,
    metrics_middleware,
)
from service.paths import staging_dir
from service.retention import retention_ctx
from service.routes import setup_routes
from service.sse import sse_ctx
from service.webhooks import webhooks_ctx

log = structlog.get_logger(__name__)

#: Largest JSON body accepted (a job with 1,000 image URLs fits); uploads are
#: streamed under `limits.max_upload_bytes` instead.
JSON_BODY_LIMIT = 8 * 1024 * 1024


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The event store; also clears uploads left half-received by a crash."""
    settings = app[SETTINGS]
    data_dir = settings.storage.data_dir
    await asyncio.to_thread(shutil.rmtree, staging_dir(data_dir), True)
    store = await SQLiteEventStore.open(data_dir / "events.db", settings.storage.durability)
    app[STORE] = store
    try:
        yield
    finally:
        await store.close()


async def projector_ctx(app: web.Application) -> AsyncIterator[None]:
    """The job read model: caught up before the first request, then following."""
    projector = JobProjector(app[STORE])
    await projector.start()
    app[PROJECTOR] = projector
    try:
        yield
    finally:
        await projector.stop()


async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    """The runner subprocesses, when this app was asked to run them."""
    if not app[RUNNERS_EXPECTED]:
        yield
        return
    # Imported here: an app that runs no runners (tests, an API-only node)
    # never loads the subprocess machinery.
    from service.supervisor import RunnerSupervisor

    supervisor = RunnerSupervisor(app[SETTINGS], app[STORE])
    await supervisor.start()
    app[SUPERVISOR] = supervisor
    try:
        yield
    finally:
        await supervisor.stop()


async def _signal_shutdown(app: web.Application) -> None:
    # Long-lived answers (SSE) end when this is set, so shutdown does not
    # wait for clients that never disconnect.
    app[SHUTTING_DOWN].set()


def create_app(settings: Settings, *, start_runners: bool = True) -> web.Application:
    """The boothd web application (routes, middlewares, resources)."""
    app = web.Application(
        client_max_size=JSON_BODY_LIMIT,
        middlewares=[
            metrics_middleware,
            error_middleware,
            docs_basic_auth_middleware,
            auth_middleware(Authenticator(settings.auth)),
        ],
    )
    app[SETTINGS] = settings
    app[RUNNERS_EXPECTED] = start_runners
    app[METRICS] = Metrics()
    app[SHUTTING_DOWN] = asyncio.Event()
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(projector_ctx)
    app.cleanup_ctx.append(sse_ctx)
    app.cleanup_ctx.append(retention_ctx)
    app.cleanup_ctx.append(webhooks_ctx)
    app.cleanup_ctx.append(supervisor_ctx)
    app.on_shutdown.append(_signal_shutdown)
    setup_routes(app)
    return app
