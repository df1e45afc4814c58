"""Service routes that need no API key: `/ping`, `/healthz`, `/metrics`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from service import readmodel
from service.handlers.common import respond
from service.keys import METRICS, RUNNERS_EXPECTED, STORE, SUPERVISOR
from service.metrics import CONTENT_TYPE, runner_is_up
from service.openapi import Operation, operation
from service.schemas import Health


def runner_status(app: web.Application) -> list[dict[str, Any]]:
    """The supervisor's status of each runner; empty when this app runs none."""
    supervisor = app.get(SUPERVISOR)
    return [] if supervisor is None else list(supervisor.status())


@operation(
    Operation(summary="Liveness", responses={200: "text/plain"}, public=True, tags=("service",))
)
async def ping(request: web.Request) -> web.Response:
    """Answers `pong` while the process serves HTTP."""
    return web.Response(text="pong")


@operation(Operation(summary="Health", responses={200: Health}, public=True, tags=("service",)))
async def healthz(request: web.Request) -> web.Response:
    """`ok`, or `degraded` when a runner is down (or none runs though runners were
    asked for); with the queue depth and the log's head position."""
    app = request.app
    store = app[STORE]
    runners = runner_status(app)
    down = any(not runner_is_up(r) for r in runners)
    missing = app[RUNNERS_EXPECTED] and not runners
    by_state = await store.read_transaction(readmodel.count_by_state)
    return respond(
        Health(
            status="degraded" if down or missing else "ok",
            runners=runners,
            queue_depth=by_state.get("queued", 0),
            event_position=await store.head(),
        )
    )


@operation(
    Operation(
        summary="Prometheus metrics", responses={200: "text/plain"}, public=True, tags=("service",)
    )
)
async def metrics(request: web.Request) -> web.Response:
    """Requests by route and status, jobs by state, queue depth, runner state,
    webhook deliveries by outcome, training steps, artifacts written."""
    app = request.app
    registry = app[METRICS]
    await registry.refresh(app[STORE], runner_status(app))
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE})
