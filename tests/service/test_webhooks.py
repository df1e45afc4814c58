"""Webhooks: the /v1/webhooks handlers and the dispatcher, delivering over real HTTP
to a receiver app on loopback, with delivery state in the real SQLite log. Job
events are appended by the test (the runner stand-in, see `sse_fixtures`);
the retry schedule is compressed through settings."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks import Webhook

from events.settings import Settings
from events.store import SQLiteEventStore
from events.types import (
    CheckpointSaved,
    ImageGenerated,
    JobFailed,
    JobStarted,
    JobSucceeded,
    TrainingProgressed,
    WebhookDelivered,
    WebhookDeliveryAttempted,
    WebhookEndpointDisabled,
)
from service.keys import STORE
from service.webhooks import (
    WEBHOOKS,
    WebhookDispatcher,
    delivery_id_for,
    job_at,
    send_dry_run_callback,
)
from tests.service.sse_fixtures import (
    Received,
    Receiver,
    append_job_events,
    auth,
    build_app,
    settings_for,
    submitted,
)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]
ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def receiver(aiohttp_server: ServerFactory) -> tuple[Receiver, TestServer]:
    hooks = Receiver()
    server = await aiohttp_server(hooks.app())
    return hooks, server


@pytest.fixture
def new_client(aiohttp_client: ClientFactory, tmp_path: Path) -> Callable[..., Awaitable[Client]]:
    async def make(**webhooks: Any) -> Client:
        return await aiohttp_client(build_app(settings_for(tmp_path, **webhooks)))

    return make


def url_of(server: TestServer, path: str) -> str:
    return str(server.make_url(path))


async def create_endpoint(
    client: Client, url: str, events: list[str] | None = None, tenant: str = "acme"
) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url, "description": "test"}
    if events is not None:
        body["events"] = events
    async with client.post("/v1/webhooks", json=body, headers=auth(tenant)) as resp:
        assert resp.status == 201, await resp.text()
        created: dict[str, Any] = await resp.json()
        return created


def verify(secret: str, received: Received) -> dict[str, Any]:
    """Check the Standard Webhooks signature; the verified payload."""
    payload: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    return payload


def fail_first(times: int, status: int = 500) -> Any:
    """A behaviour answering `status` to the first `times` requests of each webhook-id."""

    async def behaviour(request: Received, history: list[Received]) -> tuple[int, dict[str, str]]:
        earlier = sum(1 for r in history if r.webhook_id == request.webhook_id)
        return (status, {}) if earlier < times else (200, {})

    return behaviour


def store_of(client: Client) -> SQLiteEventStore:
    return client.app[STORE]


def job_lifecycle(job_id: str, tenant: str = "acme", **config: Any) -> list[Any]:
    return [
        submitted(job_id, tenant=tenant, **config),
        JobStarted(runner_id="r1", device="cpu"),
        TrainingProgressed(step=1, total_steps=2, loss=0.1),
        CheckpointSaved(
            checkpoint_id="ckp_1",
            kind="lora",
            step=2,
            format="safetensors",
            path="c",
            size_bytes=1,
            sha256="0",
        ),
        ImageGenerated(
            image_id="img_1",
            prompt="p",
            seed=1,
            width=8,
            height=8,
            format="png",
            path="i",
            sha256="0",
        ),
        JobSucceeded(),
    ]


ALL_TYPES = [
    "job.queued",
    "job.started",
    "job.progress",
    "job.checkpoint",
    "job.image",
    "job.succeeded",
]


# --------------------------------------------------------------------------- #
# Handlers
# --------------------------------------------------------------------------- #


async def test_endpoint_crud_and_tenant_isolation(
    new_client: Callable[..., Awaitable[Client]],
) -> None:
    """POST shows the secret once (201, wh_/whsec_ ids); GET lists without it;
    another tenant neither sees nor deletes nor reads the endpoint (404);
    DELETE removes it."""
    client = await new_client()
    created = await create_endpoint(client, "http://127.0.0.1:9/hook", ["job.completed"])
    assert created["id"].startswith("wh_") and created["secret"].startswith("whsec_")
    assert created["events"] == ["job.completed"] and created["disabled"] is False

    async with client.get("/v1/webhooks", headers=auth("acme")) as resp:
        listed = (await resp.json())["webhooks"]
    assert [w["id"] for w in listed] == [created["id"]]
    assert "secret" not in listed[0]

    async with client.get("/v1/webhooks", headers=auth("globex")) as resp:
        assert (await resp.json())["webhooks"] == []
    wh = created["id"]
    for method, path in (
        ("DELETE", f"/v1/webhooks/{wh}"),
        ("GET", f"/v1/webhooks/{wh}/deliveries"),
        ("POST", f"/v1/webhooks/{wh}/test"),
    ):
        async with client.request(method, path, headers=auth("globex")) as resp:
            assert resp.status == 404, (method, path)
            assert (await resp.json())["error"]["code"] == "webhook_not_found"

    async with client.delete(f"/v1/webhooks/{wh}", headers=auth("acme")) as resp:
        assert resp.status == 204
    async with client.get("/v1/webhooks", headers=auth("acme")) as resp:
        assert (await resp.json())["webhooks"] == []


async def test_create_validation(new_client: Callable[..., Awaitable[Client]]) -> None:
    """Unknown fields and unknown event names are 422 naming the field; a body that
    is not JSON is 400."""
    client = await new_client()
    cases = [
        ({"url": "http://127.0.0.1:9/", "events": ["job.nope"]}, 422, "events"),
        ({"url": "http://127.0.0.1:9/", "bogus": 1}, 422, "bogus"),
        ({"events": ["job.*"]}, 422, "url"),
    ]
    for body, status, field in cases:
        async with client.post("/v1/webhooks", json=body, headers=auth("acme")) as resp:
            assert resp.status == status, body
            error = (await resp.json())["error"]
            assert error["field"] == field, error
    async with client.post("/v1/webhooks", data=b"{", headers=auth("acme")) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"


async def test_private_urls_refused_unless_allowed(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """Without `network.allow_private_urls`, a loopback or metadata URL is refused
    with 422 `url_not_allowed` on the `url` field."""
    base = settings_for(tmp_path)
    settings = base.model_copy(
        update={"network": base.network.model_copy(update={"allow_private_urls": False})}
    )
    client = await aiohttp_client(build_app(settings))
    for url in ("http://127.0.0.1:8080/hook", "http://169.254.169.254/", "ftp://example.com/"):
        async with client.post("/v1/webhooks", json={"url": url}, headers=auth("acme")) as resp:
            assert resp.status == 422, url
            error = (await resp.json())["error"]
            assert error["code"] == "url_not_allowed" and error["field"] == "url"


async def test_default_secret_is_stable_and_survives_restart(
    new_client: Callable[..., Awaitable[Client]], tmp_path: Path
) -> None:
    """The tenant's default secret is created on first use, is the same on every
    call, differs per tenant, and is read back from the log by a new dispatcher."""
    client = await new_client()
    secrets = []
    for tenant in ("acme", "acme", "globex"):
        async with client.get("/v1/webhooks/default/secret", headers=auth(tenant)) as resp:
            assert resp.status == 200
            secrets.append((await resp.json())["secret"])
    assert secrets[0] == secrets[1] != secrets[2]
    assert secrets[0].startswith("whsec_")

    fresh = WebhookDispatcher(store_of(client), client.app[WEBHOOKS].settings)
    await fresh.start()
    try:
        assert await fresh.default_secret("acme") == secrets[0]
    finally:
        await fresh.stop()


async def test_test_endpoint_sends_a_signed_sample(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """POST /v1/webhooks/{id}/test sends one signed sample at once, reports the
    outcome, and the attempt shows in the endpoint's deliveries."""
    hooks, server = receiver
    client = await new_client()
    created = await create_endpoint(client, url_of(server, "/hook"))
    async with client.post(f"/v1/webhooks/{created['id']}/test", headers=auth("acme")) as resp:
        assert resp.status == 200
        result = await resp.json()
    assert result["delivered"] is True and result["status"] == 200
    (received,) = hooks.on("/hook")
    payload = verify(created["secret"], received)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["dry_run"] is True and payload["data"]["id"].startswith("TEST_")
    async with client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=auth("acme")) as resp:
        (delivery,) = (await resp.json())["deliveries"]
    assert delivery["id"] == received.webhook_id and delivery["test"] is True
    assert delivery["state"] == "delivered"


# --------------------------------------------------------------------------- #
# Dispatcher
# --------------------------------------------------------------------------- #


async def test_every_event_delivered_through_failures_with_stable_id(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """An endpoint that fails twice per delivery still receives every subscribed
    event: each retry carries the same `webhook-id` and a valid signature, the
    body is the job object folded up to that event, and every attempt is in the
    log and in GET /deliveries."""
    hooks, server = receiver
    hooks.behaviours["/hook"] = fail_first(2)
    client = await new_client()
    created = await create_endpoint(client, url_of(server, "/hook"), ["job.*"])
    store = store_of(client)
    positions = await append_job_events(store, "j1", *job_lifecycle("j1"))

    await hooks.wait_until(lambda: len(hooks.on("/hook")) == 3 * len(ALL_TYPES))
    by_id: dict[str, list[Received]] = {}
    for received in hooks.on("/hook"):
        by_id.setdefault(received.webhook_id, []).append(received)
    assert set(by_id) == {delivery_id_for(f"webhook-{created['id']}", p) for p in positions}
    types = []
    for attempts in by_id.values():
        assert len(attempts) == 3
        payloads = [verify(created["secret"], r) for r in attempts]
        assert all(p == payloads[0] for p in payloads), "retries send the same body"
        types.append(payloads[0]["type"])
        data = payloads[0]["data"]
        assert data == await job_at(store, "j1", data["position"])
    assert sorted(types) == sorted(ALL_TYPES)

    async def all_delivered() -> list[dict[str, Any]]:
        url = f"/v1/webhooks/{created['id']}/deliveries"
        async with client.get(url, headers=auth("acme")) as resp:
            deliveries: list[dict[str, Any]] = (await resp.json())["deliveries"]
            return deliveries

    deliveries: list[dict[str, Any]] = []

    async def settled() -> bool:
        nonlocal deliveries
        deliveries = await all_delivered()
        return len(deliveries) == len(ALL_TYPES) and all(
            d["state"] == "delivered" for d in deliveries
        )

    async with asyncio.timeout(10):
        while not await settled():
            await asyncio.sleep(0.05)
    assert all(len(d["attempts"]) == 3 for d in deliveries)
    assert [d["attempts"][-1]["status"] for d in deliveries] == [200] * len(ALL_TYPES)
    assert deliveries[0]["type"] == "job.succeeded"  # newest first
    records = await store.read_stream(f"webhook-{created['id']}")
    kinds = [r.type for r in records[1:]]
    assert kinds.count("WebhookDeliveryAttempted") == 2 * len(ALL_TYPES)
    assert kinds.count("WebhookDelivered") == len(ALL_TYPES)
    failed = [r.event for r in records if isinstance(r.event, WebhookDeliveryAttempted)]
    assert all(e.status == 500 and e.next_attempt_at is not None for e in failed)


async def test_retry_after_is_honoured(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """A 503 with `Retry-After: 1` delays the next attempt by at least a second,
    although the retry schedule says 50 ms; the recorded next_attempt_at says so."""
    hooks, server = receiver

    async def busy_once(request: Received, history: list[Received]) -> tuple[int, dict[str, str]]:
        return (503, {"Retry-After": "1"}) if not history else (200, {})

    hooks.behaviours["/hook"] = busy_once
    client = await new_client()
    created = await create_endpoint(client, url_of(server, "/hook"), ["job.queued"])
    await append_job_events(store_of(client), "j1", submitted("j1"))
    await hooks.wait_until(lambda: len(hooks.on("/hook")) == 2)
    first, second = hooks.on("/hook")
    assert first.webhook_id == second.webhook_id
    assert second.at - first.at >= 0.95
    records = await store_of(client).read_stream(f"webhook-{created['id']}")
    attempted = [r for r in records if isinstance(r.event, WebhookDeliveryAttempted)]
    assert len(attempted) == 1
    event = attempted[0].event
    assert isinstance(event, WebhookDeliveryAttempted) and event.next_attempt_at is not None
    assert (event.next_attempt_at - attempted[0].recorded_at).total_seconds() >= 0.95


async def test_410_disables_the_endpoint(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """An endpoint answering 410 Gone is disabled (`WebhookEndpointDisabled`, shown in
    the listing) and gets nothing more, not even retries; others are unaffected."""
    hooks, server = receiver

    async def gone(request: Received, history: list[Received]) -> tuple[int, dict[str, str]]:
        return 410, {}

    hooks.behaviours["/gone"] = gone
    client = await new_client()
    created = await create_endpoint(client, url_of(server, "/gone"))
    await create_endpoint(client, url_of(server, "/ok"))
    store = store_of(client)
    await append_job_events(store, "j1", submitted("j1"))

    async def disabled() -> bool:
        async with client.get("/v1/webhooks", headers=auth("acme")) as resp:
            listed = {w["id"]: w for w in (await resp.json())["webhooks"]}
        return bool(listed[created["id"]]["disabled"])

    async with asyncio.timeout(10):
        while not await disabled():
            await asyncio.sleep(0.02)
    await append_job_events(store, "j1", JobStarted(runner_id="r", device="cpu"), JobSucceeded())
    # The healthy endpoint got the later events, so the dispatcher has handled them.
    await hooks.wait_until(lambda: len(hooks.on("/ok")) == 3)
    assert len(hooks.on("/gone")) == 1
    records = await store.read_stream(f"webhook-{created['id']}")
    assert any(isinstance(r.event, WebhookEndpointDisabled) for r in records)


async def test_slow_endpoint_does_not_delay_another(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """While one endpoint holds a request open, another endpoint receives every
    delivery: each endpoint has its own queue and worker."""
    hooks, server = receiver
    release = asyncio.Event()

    async def stuck(request: Received, history: list[Received]) -> tuple[int, dict[str, str]]:
        await release.wait()
        return 200, {}

    hooks.behaviours["/slow"] = stuck
    client = await new_client(timeout_seconds=30.0)
    await create_endpoint(client, url_of(server, "/slow"))
    await create_endpoint(client, url_of(server, "/fast"))
    await append_job_events(store_of(client), "j1", *job_lifecycle("j1"))
    await hooks.wait_until(lambda: len(hooks.on("/fast")) == len(ALL_TYPES))
    assert len(hooks.on("/slow")) == 1, "the slow endpoint is still on its first request"
    release.set()
    await hooks.wait_until(lambda: len(hooks.on("/slow")) == len(ALL_TYPES))


async def test_progress_is_throttled_per_job(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """At most one job.progress per `progress_interval_seconds` of event time per
    job; the others are not delivered (terminal events always are)."""
    hooks, server = receiver
    client = await new_client(progress_interval_seconds=1.0)
    await create_endpoint(client, url_of(server, "/hook"), ["job.progress", "job.completed"])
    store = store_of(client)
    await append_job_events(store, "j1", submitted("j1"))
    # One append: one commit, so all five share one recorded_at.
    await append_job_events(
        store, "j1", *(TrainingProgressed(step=s, total_steps=10) for s in range(1, 6))
    )
    await hooks.wait_until(lambda: len(hooks.on("/hook")) == 1)
    await asyncio.sleep(1.05)
    await append_job_events(store, "j1", TrainingProgressed(step=6, total_steps=10))
    await append_job_events(store, "j1", TrainingProgressed(step=7, total_steps=10))
    await append_job_events(store, "j1", JobSucceeded())
    await hooks.wait_until(lambda: any(r.json["type"] == "job.succeeded" for r in hooks.requests))
    delivered = [(r.json["type"], r.json["data"]["progress"]["step"]) for r in hooks.on("/hook")]
    progress_steps = [step for kind, step in delivered if kind == "job.progress"]
    assert progress_steps[0] == 1
    assert len(progress_steps) == 2 and progress_steps[1] in (6, 7)


async def test_job_callback_url_with_event_filter(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """A job's callback_url gets exactly the types in its webhook_events, signed
    with the tenant's default secret, recorded in `callback-<job_id>`; another
    tenant's endpoint gets nothing of it."""
    hooks, server = receiver
    client = await new_client()
    await create_endpoint(client, url_of(server, "/globex"), ["job.*"], tenant="globex")
    store = store_of(client)
    await append_job_events(
        store,
        "j1",
        submitted(
            "j1",
            callback_url=url_of(server, "/cb"),
            webhook_events=["job.started", "job.completed"],
        ),
        JobStarted(runner_id="r", device="cpu"),
        TrainingProgressed(step=1, total_steps=2),
        JobFailed(code="boom", message="it broke"),
    )
    # A later globex job: once its delivery arrived, acme's events were handled.
    await append_job_events(store, "g1", submitted("g1", tenant="globex"))
    await hooks.wait_until(lambda: len(hooks.on("/cb")) == 2 and len(hooks.on("/globex")) == 1)
    async with client.get("/v1/webhooks/default/secret", headers=auth("acme")) as resp:
        secret = (await resp.json())["secret"]
    payloads = [verify(secret, r) for r in hooks.on("/cb")]
    assert [p["type"] for p in payloads] == ["job.started", "job.failed"]
    assert payloads[1]["data"]["failure"] == {"code": "boom", "message": "it broke"}
    assert hooks.on("/globex")[0].json["data"]["id"] == "g1"

    async def recorded() -> list[Any]:
        return [
            r.event
            for r in await store.read_stream("callback-j1")
            if isinstance(r.event, WebhookDelivered)
        ]

    async with asyncio.timeout(10):
        while len(await recorded()) < 2:
            await asyncio.sleep(0.02)


async def test_dry_run_callback_sends_a_sample(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """send_dry_run_callback sends one sample (signed with the default secret) to a
    dry-run job's callback_url, typed by its webhook_events."""
    hooks, server = receiver
    client = await new_client()
    job_doc = {
        "id": "TEST_abc",
        "state": "queued",
        "dry_run": True,
        "config": {"callback_url": url_of(server, "/cb"), "webhook_events": ["job.queued"]},
    }
    await send_dry_run_callback(client.app, job_doc, tenant="acme")
    await hooks.wait_until(lambda: len(hooks.on("/cb")) == 1)
    secret = await client.app[WEBHOOKS].default_secret("acme")
    payload = verify(secret, hooks.on("/cb")[0])
    assert payload["type"] == "job.queued"
    assert payload["data"]["id"] == "TEST_abc" and payload["data"]["dry_run"] is True


async def test_restart_mid_retry_resumes_without_loss_or_repeat(
    tmp_path: Path, receiver: tuple[Receiver, TestServer]
) -> None:
    """A dispatcher stopped while a retry is pending is replaced by a new one that
    reads the pending retry from the log and makes it at its recorded time with
    the same webhook-id; deliveries already made are not made again."""
    hooks, server = receiver
    settings: Settings = settings_for(tmp_path, retry_schedule_seconds=[0.5])
    store = await SQLiteEventStore.open(tmp_path / "events.db")
    first = WebhookDispatcher(store, settings)
    second: WebhookDispatcher | None = None
    try:
        await first.start()
        endpoint = await first.create_endpoint("acme", url_of(server, "/hook"), ["job.*"], "")

        async def fail_very_first(
            request: Received, history: list[Received]
        ) -> tuple[int, dict[str, str]]:
            return (500, {}) if not history else (200, {})

        hooks.behaviours["/hook"] = fail_very_first
        positions = await append_job_events(store, "j1", submitted("j1"))
        await hooks.wait_until(lambda: len(hooks.on("/hook")) == 1)

        async def attempts_recorded() -> int:
            records = await store.read_stream(endpoint.stream_id)
            return sum(isinstance(r.event, WebhookDeliveryAttempted) for r in records)

        async with asyncio.timeout(10):
            while await attempts_recorded() < 1:
                await asyncio.sleep(0.01)
        await first.stop()  # the retry (due in ~0.5 s) is pending

        # Another event while no dispatcher runs; it is delivered after the restart.
        positions += await append_job_events(store, "j1", JobStarted(runner_id="r", device="cpu"))
        second = WebhookDispatcher(store, settings)
        await second.start()
        await hooks.wait_until(lambda: len(hooks.on("/hook")) == 3)
        await asyncio.sleep(0.7)  # time for any needless repeat to show
        ids = [r.webhook_id for r in hooks.on("/hook")]
        expected = [delivery_id_for(endpoint.stream_id, p) for p in positions]
        assert ids.count(expected[0]) == 2  # the failed first attempt and its one retry
        assert ids.count(expected[1]) == 1
        assert len(ids) == 3
    finally:
        await first.stop()
        if second is not None:
            await second.stop()
        await store.close()


# --------------------------------------------------------------------------- #
# Through the real job submission handler
# --------------------------------------------------------------------------- #


def gen_job(**extra: Any) -> dict[str, Any]:
    return {"type": "image_gen", "generate": [{"prompt": "a red apple"}], **extra}


async def test_submitted_job_callback_gets_queued_event(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """A job submitted with POST /v1/jobs and a callback_url subscribed to
    job.queued gets that delivery, signed with the tenant's default secret, its
    data the job object as submitted."""
    hooks, server = receiver
    client = await new_client()
    body = gen_job(callback_url=url_of(server, "/cb"), webhook_events=["job.queued"])
    async with client.post("/v1/jobs", json=body, headers=auth("acme")) as resp:
        assert resp.status == 201, await resp.text()
        job = await resp.json()
    await hooks.wait_until(lambda: len(hooks.on("/cb")) == 1)
    secret = await client.app[WEBHOOKS].default_secret("acme")
    payload = verify(secret, hooks.on("/cb")[0])
    assert payload["type"] == "job.queued"
    assert payload["data"]["id"] == job["id"] and payload["data"]["state"] == "queued"
    assert payload["data"]["config"] == job["config"]


async def test_dry_run_job_sends_sample_callback(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """POST /v1/jobs with dry_run: true stores nothing but sends the callback a
    signed sample payload for the returned TEST_ job."""
    hooks, server = receiver
    client = await new_client()
    body = gen_job(callback_url=url_of(server, "/cb"), dry_run=True)
    async with client.post("/v1/jobs", json=body, headers=auth("acme")) as resp:
        assert resp.status == 201, await resp.text()
        job = await resp.json()
    assert job["id"].startswith("TEST_")
    await hooks.wait_until(lambda: len(hooks.on("/cb")) == 1)
    secret = await client.app[WEBHOOKS].default_secret("acme")
    payload = verify(secret, hooks.on("/cb")[0])
    assert payload["type"] == "job.succeeded"  # the default webhook_events: job.completed
    assert payload["data"]["id"] == job["id"] and payload["data"]["dry_run"] is True


async def test_timeouts_and_connection_errors_are_retried_then_given_up(
    new_client: Callable[..., Awaitable[Client]], receiver: tuple[Receiver, TestServer]
) -> None:
    """An attempt that times out is retried (and succeeds); an endpoint that refuses
    connections is retried per the schedule, then given up (`next_attempt_at`
    null, shown as `failed`)."""
    hooks, server = receiver
    release = asyncio.Event()

    async def hang_once(request: Received, history: list[Received]) -> tuple[int, dict[str, str]]:
        if not history:
            await release.wait()
        return 200, {}

    hooks.behaviours["/hang"] = hang_once
    client = await new_client(timeout_seconds=0.3, retry_schedule_seconds=[0.05, 0.05])
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    hanging = await create_endpoint(client, url_of(server, "/hang"), ["job.queued"])
    refused = await create_endpoint(client, f"http://127.0.0.1:{closed_port}/", ["job.queued"])
    try:
        await append_job_events(store_of(client), "j1", submitted("j1"))
        await hooks.wait_until(lambda: len(hooks.on("/hang")) == 2)
    finally:
        release.set()

    async def deliveries(endpoint: dict[str, Any]) -> list[dict[str, Any]]:
        url = f"/v1/webhooks/{endpoint['id']}/deliveries"
        async with client.get(url, headers=auth("acme")) as resp:
            found: list[dict[str, Any]] = (await resp.json())["deliveries"]
            return found

    async with asyncio.timeout(10):
        while [d["state"] for d in await deliveries(hanging)] != ["delivered"]:
            await asyncio.sleep(0.02)
        while [d["state"] for d in await deliveries(refused)] != ["failed"]:
            await asyncio.sleep(0.02)
    (timed_out,) = await deliveries(hanging)
    assert "timed out" in timed_out["attempts"][0]["error"]
    (gave_up,) = await deliveries(refused)
    assert len(gave_up["attempts"]) == 3 and gave_up["next_attempt_at"] is None
    assert all(a["status"] is None and a["error"] for a in gave_up["attempts"])
