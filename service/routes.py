"""`setup_routes(app)`: every route of API.md, and nothing else."""

from __future__ import annotations

from aiohttp import web

from service import sse, webhooks
from service.handlers import artifacts, datasets, docs, jobs, models, system
from service.openapi import DOCS_STATIC_ROUTE, Operation, register

_JSON = "application/json"
_SSE = "text/event-stream"
_LAST_EVENT_ID = {"Last-Event-ID": "resume after this event position"}

# The SSE and webhook handlers live in their own modules; what /openapi.json
# says about them is declared here, beside their routes.
register(
    sse.job_events,
    Operation(
        summary="Stream a job's events (SSE)",
        responses={200: _SSE},
        headers=_LAST_EVENT_ID,
        tags=("events",),
    ),
)
register(
    sse.all_events,
    Operation(
        summary="Stream all of the tenant's job events (SSE)",
        responses={200: _SSE},
        headers=_LAST_EVENT_ID,
        tags=("events",),
    ),
)
register(
    webhooks.create_webhook,
    Operation(
        summary="Register a webhook endpoint",
        body=webhooks.CreateWebhookRequest,
        responses={201: _JSON},
        tags=("webhooks",),
    ),
)
register(
    webhooks.list_webhooks,
    Operation(summary="List webhook endpoints", responses={200: _JSON}, tags=("webhooks",)),
)
register(
    webhooks.default_secret,
    Operation(
        summary="The secret signing per-job callbacks", responses={200: _JSON}, tags=("webhooks",)
    ),
)
register(
    webhooks.delete_webhook,
    Operation(summary="Delete a webhook endpoint", responses={204: None}, tags=("webhooks",)),
)
register(
    webhooks.list_deliveries,
    Operation(summary="List an endpoint's deliveries", responses={200: _JSON}, tags=("webhooks",)),
)
register(
    webhooks.test_webhook,
    Operation(summary="Send a test delivery", responses={200: _JSON}, tags=("webhooks",)),
)


def setup_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/ping", system.ping)
    router.add_get("/healthz", system.healthz)
    router.add_get("/metrics", system.metrics)
    router.add_get("/openapi.json", docs.openapi_json)
    router.add_get("/docs", docs.docs)
    router.add_get("/docs/openapi-3.0.json", docs.openapi_30_json)
    router.add_static("/docs/static", docs.SWAGGER_UI_DIR, name=DOCS_STATIC_ROUTE)

    router.add_post("/v1/datasets", datasets.upload_dataset)

    router.add_post("/v1/jobs", jobs.submit_job)
    router.add_get("/v1/jobs", jobs.list_jobs)
    router.add_get("/v1/jobs/{id}", jobs.get_job)
    router.add_delete("/v1/jobs/{id}", jobs.delete_job)
    router.add_post("/v1/jobs/{id}/cancel", jobs.cancel_job)
    router.add_get("/v1/jobs/{id}/events", sse.job_events)
    router.add_get("/v1/events", sse.all_events)

    router.add_get("/v1/checkpoints/{id}/download", artifacts.download_checkpoint)
    router.add_get("/v1/images/{id}", artifacts.get_image)
    router.add_get("/v1/models", models.list_models)

    router.add_post("/v1/webhooks", webhooks.create_webhook)
    router.add_get("/v1/webhooks", webhooks.list_webhooks)
    # Before /{id}: "default" is not an endpoint id.
    router.add_get("/v1/webhooks/default/secret", webhooks.default_secret)
    router.add_delete("/v1/webhooks/{id}", webhooks.delete_webhook)
    router.add_get("/v1/webhooks/{id}/deliveries", webhooks.list_deliveries)
    router.add_post("/v1/webhooks/{id}/test", webhooks.test_webhook)
