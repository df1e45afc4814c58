"""Webhooks over HTTP: the `/v1/webhooks` handlers, the app key and `webhooks_ctx`.

Endpoints live in the log (`WebhookEndpointCreated` / `Deleted` / `Disabled` in
stream `webhook-<id>`); the dispatcher that delivers to them, and to jobs'
`callback_url`s, is `service.webhook_dispatcher.WebhookDispatcher` (its module
docstring explains retries, signing and restarts). Every handler answers 404
for another tenant's endpoint, exactly as for a missing one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpu_runner.fetch import FetchError, check_url
from gpu_runner.jobspec import check_webhook_event_names
from service.errors import ApiError
from service.handlers.common import read_json
from service.keys import SETTINGS, STORE, TENANT
from service.webhook_dispatcher import (
    WEBHOOK_TYPE_OF,
    WebhookDispatcher,
    delivery_id_for,
    job_at,
    matches,
)

__all__ = [
    "WEBHOOKS",
    "WEBHOOK_TYPE_OF",
    "CreateWebhookRequest",
    "WebhookDispatcher",
    "create_webhook",
    "default_secret",
    "delete_webhook",
    "delivery_id_for",
    "job_at",
    "list_deliveries",
    "list_webhooks",
    "matches",
    "send_dry_run_callback",
    "test_webhook",
    "webhook_routes",
    "webhooks_ctx",
]

WEBHOOKS = web.AppKey("webhooks", WebhookDispatcher)


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the dispatcher (after the store is open), stop it on cleanup."""
    dispatcher = WebhookDispatcher(app[STORE], app[SETTINGS])
    app[WEBHOOKS] = dispatcher
    await dispatcher.start()
    try:
        yield
    finally:
        await dispatcher.stop()


async def send_dry_run_callback(
    app: web.Application, job_doc: dict[str, Any], *, tenant: str = "default"
) -> None:
    """For a `dry_run: true` job with a callback_url: send a sample payload (signed with
    the tenant's default secret) in the background; returns once it is scheduled.

    `job_doc` is the job object returned to the client; `config.callback_url` and
    `config.webhook_events` pick the target and the sample's type.
    """
    await app[WEBHOOKS].send_dry_run(tenant, job_doc)


# --------------------------------------------------------------------------- #
# Handlers
# --------------------------------------------------------------------------- #


class CreateWebhookRequest(BaseModel):
    """Body of POST /v1/webhooks."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=4096)
    events: list[str] = Field(default_factory=lambda: ["job.*"], min_length=1, max_length=20)
    description: str = Field(default="", max_length=1000)

    @field_validator("events")
    @classmethod
    def _known_events(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(check_webhook_event_names(names)))


def _dispatcher(request: web.Request) -> WebhookDispatcher:
    return request.app[WEBHOOKS]


async def create_webhook(request: web.Request) -> web.Response:
    """POST /v1/webhooks: register an endpoint; its secret is shown here only."""
    # A ValidationError becomes 422 `validation_error` (with the field) in the
    # error middleware, like every other handler's.
    body = CreateWebhookRequest.model_validate(await read_json(request))
    settings = request.app[SETTINGS]
    try:
        check_url(body.url, settings.network.allow_private_urls)
    except FetchError as exc:
        raise ApiError(422, "url_not_allowed", exc.message, "url") from None
    endpoint = await _dispatcher(request).create_endpoint(
        request[TENANT], body.url, body.events, body.description
    )
    return web.json_response(
        {**endpoint.view(), "secret": endpoint.secret},
        status=201,
        headers={"Location": f"/v1/webhooks/{endpoint.id}"},
    )


async def list_webhooks(request: web.Request) -> web.Response:
    """GET /v1/webhooks: the caller's endpoints (without secrets)."""
    endpoints = _dispatcher(request).registry.of_tenant(request[TENANT])
    return web.json_response({"webhooks": [e.view() for e in endpoints]})


async def delete_webhook(request: web.Request) -> web.Response:
    """DELETE /v1/webhooks/{id}: stop delivering to the endpoint (pending retries end)."""
    await _dispatcher(request).delete_endpoint(request[TENANT], request.match_info["id"])
    return web.Response(status=204)


async def list_deliveries(request: web.Request) -> web.Response:
    """GET /v1/webhooks/{id}/deliveries?limit=50: deliveries and their attempts, newest first."""
    raw = request.query.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise ApiError(400, "invalid_limit", "limit must be an integer from 1 to 100", "limit")
    deliveries = await _dispatcher(request).deliveries(
        request[TENANT], request.match_info["id"], limit
    )
    return web.json_response({"deliveries": deliveries})


async def test_webhook(request: web.Request) -> web.Response:
    """POST /v1/webhooks/{id}/test: send a sample delivery now and report the outcome."""
    result = await _dispatcher(request).send_test(request[TENANT], request.match_info["id"])
    return web.json_response(result)


async def default_secret(request: web.Request) -> web.Response:
    """GET /v1/webhooks/default/secret: the secret that signs per-job callbacks."""
    secret = await _dispatcher(request).default_secret(request[TENANT])
    return web.json_response({"secret": secret})


def webhook_routes() -> list[web.RouteDef]:
    """The webhook routes, for `setup_routes` (the dispatcher comes from `webhooks_ctx`)."""
    return [
        web.post("/v1/webhooks", create_webhook),
        web.get("/v1/webhooks", list_webhooks),
        web.get("/v1/webhooks/default/secret", default_secret),
        web.delete("/v1/webhooks/{id}", delete_webhook),
        web.get("/v1/webhooks/{id}/deliveries", list_deliveries),
        web.post("/v1/webhooks/{id}/test", test_webhook),
    ]
