"""/openapi.json (generated from the handlers' pydantic models) and /docs (offline Swagger UI)."""

from __future__ import annotations

import base64
import json
from typing import Any

from aiohttp import web

from service.openapi import DOCS_STATIC_ROUTE
from tests.service.conftest import ALICE, Client, ClientFactory


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def _routes(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.name != DOCS_STATIC_ROUTE
        and route.method != "HEAD"
    }


async def test_openapi_is_31_and_documents_every_route(app_client: Client) -> None:
    """Every route of the app is in /openapi.json, and every $ref resolves."""
    resp = await app_client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    documented = {(m, path) for path, ops in doc["paths"].items() for m in ops}
    assert documented == _routes(app_client.app)
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref
    operation_ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and op["responses"], (method, path)
            operation_ids.append(op["operationId"])
    assert len(operation_ids) == len(set(operation_ids))


async def test_openapi_uses_the_models_the_handlers_use(app_client: Client) -> None:
    """The job body is JobSpec (with TrainConfig/GenerateParams), answers are the
    response models, errors are ErrorResponse; API.md's API paths are present."""
    doc = await (await app_client.get("/openapi.json")).json()
    schemas = doc["components"]["schemas"]
    for name in (
        "JobSpec",
        "TrainConfig",
        "GenerateParams",
        "JobObject",
        "JobList",
        "DatasetCreated",
        "ModelList",
        "Health",
        "ErrorResponse",
    ):
        assert name in schemas, name
    post_jobs = doc["paths"]["/v1/jobs"]["post"]
    body_schema = post_jobs["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/JobSpec"}
    assert post_jobs["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobObject"
    }
    assert any(p["name"] == "Idempotency-Key" for p in post_jobs["parameters"])
    listing = doc["paths"]["/v1/jobs"]["get"]
    limit = next(p for p in listing["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 100 and limit["schema"]["minimum"] == 1
    assert "multipart/form-data" in doc["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert doc["paths"]["/ping"]["get"]["security"] == []
    assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearerAuth": []}]
    for path in (
        "/v1/jobs/{id}/events",
        "/v1/events",
        "/v1/webhooks",
        "/v1/images/{id}",
        "/v1/checkpoints/{id}/download",
        "/v1/webhooks/default/secret",
    ):
        assert path in doc["paths"], path


async def test_swagger_ui_is_served_offline(auth_client: Client) -> None:
    """/docs is HTML that loads Swagger UI from this server only (no CDN), and the
    3.0 rendition it reads has no 3.1-only constructs; none of it needs a key."""
    resp = await auth_client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert "https://" not in page and "http://" not in page
    assert "/docs/static/swagger-ui-bundle.js" in page
    js = await auth_client.get("/docs/static/swagger-ui-bundle.js")
    assert js.status == 200 and len(await js.read()) > 100_000
    css = await auth_client.get("/docs/static/swagger-ui.css")
    assert css.status == 200
    legacy = await auth_client.get("/docs/openapi-3.0.json")
    doc = await legacy.json()
    assert doc["openapi"] == "3.0.3"
    text = json.dumps(doc)
    assert '{"type": "null"}' not in text and '"const"' not in text
    assert (await auth_client.get("/openapi.json")).status == 200
    # Everything else still needs a key.
    assert (await auth_client.get("/v1/models")).status == 401
    assert (await auth_client.get("/v1/models", headers=ALICE)).status == 200


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_docs_basic_auth_when_configured(make_client: ClientFactory) -> None:
    """With [docs] username/password, /docs and its assets need basic auth; the API keys
    are unaffected and /openapi.json stays public."""
    client = await make_client(docs={"username": "ann", "password": "pw"})
    resp = await client.get("/docs")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert (await resp.json())["error"]["code"] == "unauthorized"
    resp = await client.get("/docs", headers=_basic("ann", "wrong"))
    assert resp.status == 401
    resp = await client.get("/docs/static/swagger-ui.css")
    assert resp.status == 401
    resp = await client.get("/docs", headers=_basic("ann", "pw"))
    assert resp.status == 200 and "swagger-ui" in await resp.text()
    resp = await client.get("/openapi.json")
    assert resp.status == 200
