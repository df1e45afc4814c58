"""Service routes (/ping, /healthz, /metrics) and the JSON error middleware."""

from __future__ import annotations

import io
from typing import Any

from aiohttp import web

from events.settings import Settings
from service.app import create_app
from service.keys import SUPERVISOR
from tests.service.conftest import Client, ClientFactory
from tests.service.helpers import finish_job, gen_job, submit


class StubSupervisor:
    """Stand-in for the runner supervisor (no runner subprocess in these tests)."""

    def __init__(self, states: list[str]) -> None:
        self.states = states

    def status(self) -> list[dict[str, Any]]:
        return [
            {"runner_id": f"cpu-{i}", "device": "cpu", "state": s}
            for i, s in enumerate(self.states)
        ]


async def test_ping_answers_pong_as_text(app_client: Client) -> None:
    """GET /ping is `pong`, text/plain."""
    resp = await app_client.get("/ping")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert await resp.text() == "pong"


async def test_healthz_reports_queue_and_position(app_client: Client) -> None:
    """/healthz: ok without runners asked for; queue depth and log head are current."""
    await submit(app_client, gen_job())
    body = await (await app_client.get("/healthz")).json()
    assert body["status"] == "ok"
    assert body["runners"] == []
    assert body["queue_depth"] == 1
    assert body["event_position"] >= 1


async def test_healthz_is_degraded_when_a_runner_is_down(
    make_client: ClientFactory, make_settings: Any
) -> None:
    """A runner whose state is not a live one makes /healthz `degraded`."""
    settings: Settings = make_settings()
    app = create_app(settings, start_runners=False)
    app[SUPERVISOR] = StubSupervisor(["running", "restarting"])
    client = await make_client(app)
    body = await (await client.get("/healthz")).json()
    assert body["status"] == "degraded"
    assert [r["state"] for r in body["runners"]] == ["running", "restarting"]


async def test_metrics_cover_requests_jobs_runners_and_artifacts(
    make_client: ClientFactory, make_settings: Any
) -> None:
    """/metrics is Prometheus text with requests by route template and status,
    jobs by state, queue depth, runner state and artifact counters from the log."""
    app = create_app(make_settings(), start_runners=False)
    app[SUPERVISOR] = StubSupervisor(["running"])
    client = await make_client(app)
    queued = await submit(client, gen_job())
    done = await submit(client, gen_job())
    await finish_job(client, done["id"], image=b"\x89PNG fake")
    await client.get(f"/v1/jobs/{queued['id']}")
    await client.get("/v1/jobs/job_missing")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'boothd_http_requests_total{method="GET",route="/v1/jobs/{id}",status="200"} 1.0' in text
    assert 'boothd_http_requests_total{method="GET",route="/v1/jobs/{id}",status="404"} 1.0' in text
    assert 'boothd_jobs{state="queued"} 1.0' in text
    assert 'boothd_jobs{state="succeeded"} 1.0' in text
    assert "boothd_queue_depth 1.0" in text
    assert 'boothd_runner_up{device="cpu",runner="cpu-0"} 1.0' in text
    assert "boothd_checkpoints_saved_total 1.0" in text
    assert "boothd_images_generated_total 1.0" in text
    assert 'boothd_webhook_deliveries_total{outcome="delivered"} 0.0' in text


async def test_unknown_route_is_json_404(app_client: Client) -> None:
    """aiohttp's own 404 is answered in the API's error format."""
    resp = await app_client.get("/v1/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_wrong_method_is_json_405_with_allow(app_client: Client) -> None:
    """405 keeps its Allow header and has the code `method_not_allowed`."""
    resp = await app_client.put("/v1/jobs")
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
    assert (await resp.json())["error"] == {
        "code": "method_not_allowed",
        "message": "Method Not Allowed",
        "field": None,
    }


async def test_oversized_json_body_is_413(app_client: Client) -> None:
    """A JSON body over the app's client_max_size is 413 `payload_too_large`."""
    body = io.BytesIO(b"[" + b"1," * (5 * 1024 * 1024) + b"1]")
    resp = await app_client.post("/v1/jobs", data=body)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_unexpected_exception_is_500_without_details(
    make_client: ClientFactory, make_settings: Any
) -> None:
    """Anything unexpected is a logged 500 `internal_error` that reveals nothing."""

    async def boom(request: web.Request) -> web.Response:  # a deliberately broken test route
        raise RuntimeError("secret internal detail")

    app = create_app(make_settings(), start_runners=False)
    app.router.add_get("/boom", boom)
    client = await make_client(app)
    resp = await client.get("/boom")
    assert resp.status == 500
    text = await resp.text()
    assert "secret" not in text and "Traceback" not in text
    assert (await resp.json())["error"]["code"] == "internal_error"
