"""API keys and tenant isolation: another tenant's anything is 404 (or invisible)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from aiohttp import web

from service.openapi import DOCS_STATIC_ROUTE, is_public_route
from tests.service.conftest import ALICE, BOB, Client
from tests.service.helpers import finish_job, gen_job, images_form, png, submit, train_job

PUBLIC = {"/ping", "/healthz", "/metrics", "/openapi.json", "/docs", "/docs/openapi-3.0.json"}


def _api_routes(app: web.Application) -> list[tuple[str, str]]:
    return sorted(
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.name != DOCS_STATIC_ROUTE
        and route.method != "HEAD"
    )


async def test_every_non_public_route_needs_a_key(auth_client: Client) -> None:
    """With keys configured, every route except the public ones answers 401
    `unauthorized` (with a Bearer challenge) to a request without a key."""
    routes = _api_routes(auth_client.app)
    assert len(routes) > 15
    for method, path in routes:
        url = re.sub(r"{\w+}", "x", path)
        resp = await auth_client.request(method, url)
        if path in PUBLIC:
            assert resp.status == 200, (method, path)
            continue
        assert resp.status == 401, (method, path, resp.status)
        body = await resp.json()
        assert body["error"]["code"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    public = {
        r.resource.canonical
        for r in auth_client.app.router.routes()
        if r.resource is not None and is_public_route(r) and r.resource.name != DOCS_STATIC_ROUTE
    }
    assert public == PUBLIC


@pytest.mark.parametrize(
    "header",
    [
        "Bearer wrong-key",
        "Basic YWxpY2U6cHc=",
        "Bearer",
        "Token abc",
        "alice-secret-key",
    ],
)
async def test_bad_credentials_are_401(auth_client: Client, header: str) -> None:
    """A wrong key, another scheme or a malformed header is 401 `unauthorized`."""
    resp = await auth_client.get("/v1/jobs", headers={"Authorization": header})
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_plain_and_hashed_keys_map_to_their_tenants(auth_client: Client) -> None:
    """A key configured in plain text and one configured as a sha256 digest both work,
    each for its own tenant; the scheme name is case-insensitive."""
    job = await submit(auth_client, gen_job(), headers=ALICE)
    assert (await auth_client.get(f"/v1/jobs/{job['id']}", headers=ALICE)).status == 200
    lower = {"Authorization": ALICE["Authorization"].replace("Bearer", "bearer")}
    assert (await auth_client.get(f"/v1/jobs/{job['id']}", headers=lower)).status == 200
    assert (await auth_client.get("/v1/jobs", headers=BOB)).status == 200


async def test_auth_off_means_one_default_tenant(app_client: Client) -> None:
    """Without keys, no header is needed and everything belongs to `default`."""
    job = await submit(app_client, gen_job())
    resp = await app_client.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer x"})
    assert resp.status == 200
    listing = await (await app_client.get("/v1/jobs")).json()
    assert [j["id"] for j in listing["jobs"]] == [job["id"]]


async def _alice_world(client: Client) -> dict[str, Any]:
    upload = await client.post("/v1/datasets", data=images_form({"a.png": png()}), headers=ALICE)
    assert upload.status == 201
    dataset = await upload.json()
    queued = await submit(client, gen_job(), headers=ALICE)
    trained = await submit(client, train_job(), headers=ALICE)
    ids = await finish_job(client, trained["id"], image=png())
    hook = await client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=ALICE)
    assert hook.status == 201, await hook.text()
    return {
        "dataset": dataset["id"],
        "queued": queued["id"],
        "trained": trained["id"],
        "webhook": (await hook.json())["id"],
        **ids,
    }


async def test_another_tenants_resources_are_404_everywhere(auth_client: Client) -> None:
    """Bob cannot read, cancel, delete, stream or download Alice's jobs and artifacts,
    nor touch her webhooks: every such request is 404, as if it did not exist."""
    alice = await _alice_world(auth_client)
    requests = [
        ("GET", f"/v1/jobs/{alice['queued']}"),
        ("POST", f"/v1/jobs/{alice['queued']}/cancel"),
        ("DELETE", f"/v1/jobs/{alice['trained']}"),
        ("GET", f"/v1/jobs/{alice['queued']}/events"),
        ("GET", f"/v1/checkpoints/{alice['checkpoint']}/download"),
        ("GET", f"/v1/images/{alice['image']}"),
        ("DELETE", f"/v1/webhooks/{alice['webhook']}"),
        ("GET", f"/v1/webhooks/{alice['webhook']}/deliveries"),
        ("POST", f"/v1/webhooks/{alice['webhook']}/test"),
    ]
    for method, url in requests:
        resp = await auth_client.request(method, url, headers=BOB)
        assert resp.status == 404, (method, url, resp.status)
        assert (await resp.json())["error"]["code"].endswith("not_found")
    # ... while Alice still has all of it, untouched.
    for method, url in requests[:1] + requests[4:6]:
        assert (await auth_client.request(method, url, headers=ALICE)).status == 200, url
    job = await (await auth_client.get(f"/v1/jobs/{alice['trained']}", headers=ALICE)).json()
    assert job["data_removed"] is False


async def test_another_tenants_resources_are_invisible_in_lists(auth_client: Client) -> None:
    """Bob's listings of jobs, models and webhooks show nothing of Alice's, and his
    job requests cannot name her dataset or trained models."""
    alice = await _alice_world(auth_client)
    jobs = await (await auth_client.get("/v1/jobs", headers=BOB)).json()
    assert jobs["jobs"] == []
    models = await (await auth_client.get("/v1/models", headers=BOB)).json()
    assert {m["kind"] for m in models["models"]} == {"base"}
    alice_models = await (await auth_client.get("/v1/models", headers=ALICE)).json()
    assert f"job:{alice['trained']}" in {m["name"] for m in alice_models["models"]}
    hooks = await (await auth_client.get("/v1/webhooks", headers=BOB)).json()
    assert hooks["webhooks"] == []

    body = train_job()
    body["train"] = {"instance_prompt": "x", "dataset_id": alice["dataset"], "steps": 5}
    resp = await auth_client.post("/v1/jobs", json=body, headers=BOB)
    assert resp.status == 422
    assert (await resp.json())["error"]["code"] == "unknown_dataset"
    for model in (f"job:{alice['trained']}", f"checkpoint:{alice['checkpoint']}"):
        resp = await auth_client.post("/v1/jobs", json=gen_job(model=model), headers=BOB)
        assert resp.status == 422, model
        error = (await resp.json())["error"]
        assert (error["code"], error["field"]) == ("unknown_model", "generate.0.model")


async def test_event_stream_carries_only_the_callers_events(auth_client: Client) -> None:
    """Replaying /v1/events from the start gives Bob his job's events and none of Alice's
    (hers were appended first, so a leak would show before his)."""
    alice_job = await submit(auth_client, gen_job(), headers=ALICE)
    bob_job = await submit(auth_client, gen_job(), headers=BOB)
    resp = await auth_client.get("/v1/events", headers={**BOB, "Last-Event-ID": "0"})
    assert resp.status == 200
    seen = b""
    async with asyncio.timeout(10):
        while bob_job["id"].encode() not in seen:
            seen += await resp.content.readany()
    resp.close()
    assert alice_job["id"].encode() not in seen
