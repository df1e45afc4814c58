"""Webhook delivery against a hostile receiver (a second aiohttp app on loopback).

The receiver answers half of the requests badly, chosen by a seeded RNG: it
stalls past `webhooks.timeout_seconds`, resets the connection, or answers 500.
Rule under test: every subscribed event is still delivered (a 2xx answer) at
least once to every endpoint, each (endpoint, event) always carries the same
`webhook-id` and body, that id is `delivery_id_for(endpoint stream, position)`,
and every request verifies with the endpoint's secret (Standard Webhooks).
The retry schedule is compressed through settings.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks import Webhook

from events.projections import JOB_STREAM_PREFIX, job_stream
from events.settings import parse_settings
from events.store import ANY_VERSION
from events.types import JobStarted, JobSucceeded
from service.app import create_app
from service.keys import STORE
from service.webhook_dispatcher import WEBHOOK_TYPE_OF, delivery_id_for
from tests.faults.common import AUTH, KEY, gen_job, read_log

Client = TestClient[web.Request, web.Application]
TIMEOUT = 0.3


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    outcome: str  # "ok", "timeout", "reset", "500"


@dataclass
class ChaosReceiver:
    """Half the requests fail (timeout / reset / 500), decided by a seeded RNG."""

    rng: random.Random = field(default_factory=lambda: random.Random(20261123))
    hits: list[Hit] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        roll = self.rng.random()
        outcome = "ok" if roll >= 0.5 else ("timeout", "reset", "500")[int(roll * 6)]
        self.hits.append(Hit(request.path, dict(request.headers), body, outcome))
        if outcome == "timeout":
            await asyncio.sleep(TIMEOUT * 3)
        elif outcome == "reset":
            assert request.transport is not None
            request.transport.abort()
            raise web.HTTPInternalServerError()
        elif outcome == "500":
            return web.Response(status=500, text="chaos")
        return web.Response(status=200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        return app


async def test_every_event_is_delivered_with_a_stable_verifiable_id_despite_chaos(
    aiohttp_client: Callable[..., Awaitable[Client]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
) -> None:
    """Timeouts, resets and 500s (half the requests) only cause retries: each subscribed
    event reaches each endpoint with a 2xx at least once, under one stable webhook-id
    and body per (endpoint, event), every request signed with the endpoint's secret."""
    hooks = ChaosReceiver()
    receiver = await aiohttp_server(hooks.app())
    settings = parse_settings(
        {
            "storage": {"data_dir": str(tmp_path / "data"), "durability": "normal"},
            "auth": {"keys": [{"key": KEY, "tenant": "t1"}]},
            "network": {"allow_private_urls": True},
            "webhooks": {
                "timeout_seconds": TIMEOUT,
                "retry_schedule_seconds": [0.02] * 20,
                "progress_interval_seconds": 0.0,
            },
        }
    )
    client = await aiohttp_client(create_app(settings, start_runners=False))

    endpoints: dict[str, dict[str, Any]] = {}
    for name in ("a", "b"):
        url = str(receiver.make_url(f"/{name}"))
        async with client.post("/v1/webhooks", json={"url": url}, headers=AUTH) as resp:
            assert resp.status == 201, await resp.text()
            endpoints[f"/{name}"] = await resp.json()
    store = client.app[STORE]
    for n in range(3):
        async with client.post("/v1/jobs", json=gen_job(n), headers=AUTH) as resp:
            assert resp.status == 201, await resp.text()
            job = await resp.json()
        await store.append(
            job_stream(job["id"]), ANY_VERSION,
            [JobStarted(runner_id="fault-runner", device="cpu"), JobSucceeded()],
        )

    subscribed = [
        r for r in await read_log(store)
        if r.stream_id.startswith(JOB_STREAM_PREFIX) and r.event.type in WEBHOOK_TYPE_OF
    ]
    assert len(subscribed) == 9
    expected = {
        (path, delivery_id_for("webhook-" + ep["id"], r.position)): WEBHOOK_TYPE_OF[r.event.type]
        for path, ep in endpoints.items()
        for r in subscribed
    }

    def delivered() -> set[tuple[str, str]]:
        return {(h.path, h.headers["webhook-id"]) for h in hooks.hits if h.outcome == "ok"}

    async with asyncio.timeout(25):
        while not set(expected) <= delivered():
            await asyncio.sleep(0.05)

    outcomes = {h.outcome for h in hooks.hits}
    assert {"timeout", "reset", "500"} <= outcomes, outcomes  # the chaos did happen
    bodies: dict[tuple[str, str], set[bytes]] = defaultdict(set)
    for hit in hooks.hits:
        key = (hit.path, hit.headers["webhook-id"])
        assert key in expected, f"unexpected delivery {key}"
        payload = Webhook(endpoints[hit.path]["secret"]).verify(hit.body, hit.headers)
        assert payload["type"] == expected[key]
        bodies[key].add(hit.body)
    assert all(len(b) == 1 for b in bodies.values()), "a retry changed the body"
    ids_a = {i for p, i in expected if p == "/a"}
    ids_b = {i for p, i in expected if p == "/b"}
    assert len(ids_a) == len(ids_b) == 9 and not ids_a & ids_b
