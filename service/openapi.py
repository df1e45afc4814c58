"""OpenAPI 3.1 document built from the app's routes and the handlers' pydantic models.

Each handler declares its operation (`@operation(...)`: summary, body model,
query model, response models); `build_openapi(app)` walks the router, so
every route is documented, and turns the models into `components/schemas`
with pydantic's own JSON Schema generator — no schema is written twice.

Swagger UI (`/docs`, the copy shipped in `swagger_ui_bundle`) renders only
OpenAPI 3.0 documents, so `downgrade_to_30` derives the 3.0 dialect from the
same document for it; `/openapi.json` stays 3.1.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)

API_TITLE = "boothd"
API_VERSION = "0.1.0"
_REF = "#/components/schemas/{model}"
#: The name of the static route serving Swagger UI's files (public, undocumented).
DOCS_STATIC_ROUTE = "docs-static"


@dataclass(frozen=True)
class Operation:
    """What `/openapi.json` says about one handler.

    `responses` maps a status to a response model, to a media type string for
    answers that are not JSON (`text/plain`, `text/event-stream`, a file), or
    to None for an empty answer. Public operations need no API key.
    """

    summary: str
    responses: Mapping[int, type[BaseModel] | str | None]
    body: type[BaseModel] | None = None
    body_media_type: str = "application/json"
    query: type[BaseModel] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    public: bool = False
    description: str | None = None


_OPERATIONS: dict[Callable[..., Any], Operation] = {}


def operation(op: Operation) -> Callable[[H], H]:
    """Decorator: document a handler (and mark it public or not)."""

    def register_handler(handler: H) -> H:
        _OPERATIONS[handler] = op
        return handler

    return register_handler


def register(handler: Callable[..., Any], op: Operation) -> None:
    """Document a handler written elsewhere (SSE, webhooks) without decorating it."""
    _OPERATIONS.setdefault(handler, op)


def operation_of(handler: Callable[..., Any]) -> Operation | None:
    return _OPERATIONS.get(handler)


def is_public_route(route: AbstractRoute) -> bool:
    """Whether a matched route needs no API key (an unmatched one does)."""
    resource = route.resource
    if resource is not None and resource.name == DOCS_STATIC_ROUTE:
        return True
    op = _OPERATIONS.get(route.handler)
    return op is not None and op.public


# ----------------------------------------------------------------- building


def _parameters(path: str, op: Operation, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", path)
    ]
    for name, description in op.headers.items():
        params.append(
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": description,
                "schema": {"type": "string"},
            }
        )
    if op.query is not None:
        schema = op.query.model_json_schema(ref_template=_REF)
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            entry: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": prop,
            }
            if "description" in prop:
                entry["description"] = prop["description"]
            params.append(entry)
        schemas.update(schema.get("$defs", {}))
    return params


def _media(target: type[BaseModel] | str, refs: Mapping[Any, Any]) -> dict[str, Any]:
    if isinstance(target, str):
        schema: dict[str, Any] = {"type": "string"}
        if target == "application/json":
            schema = {"type": "object"}
        elif not target.startswith("text/"):
            schema["format"] = "binary"
        return {target: {"schema": schema}}
    return {"application/json": {"schema": refs[(target, "serialization")]}}


def _operation_doc(
    method: str,
    path: str,
    handler: Callable[..., Any],
    op: Operation,
    refs: Mapping[Any, Any],
    schemas: dict[str, Any],
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}",
        "summary": op.summary,
        "tags": list(op.tags),
    }
    description = op.description or (handler.__doc__ or "").strip()
    if description:
        doc["description"] = description
    params = _parameters(path, op, schemas)
    if params:
        doc["parameters"] = params
    if op.body is not None:
        schema = refs[(op.body, "validation")]
        doc["requestBody"] = {"required": True, "content": {op.body_media_type: {"schema": schema}}}
    responses: dict[str, Any] = {}
    for status, target in op.responses.items():
        entry: dict[str, Any] = {"description": _status_text(status)}
        if target is not None:
            entry["content"] = _media(target, refs)
        responses[str(status)] = entry
    error = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}},
    }
    if not op.public:
        responses.setdefault("401", {**error, "description": "missing or invalid API key"})
        doc["security"] = [{"bearerAuth": []}]
    else:
        doc["security"] = []
    responses.setdefault("4XX", error)
    responses.setdefault("5XX", error)
    doc["responses"] = responses
    return doc


def _status_text(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


def _documented_routes(app: web.Application) -> list[tuple[str, str, Callable[..., Any]]]:
    routes = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or resource.name == DOCS_STATIC_ROUTE or route.method == "HEAD":
            continue
        routes.append((route.method, resource.canonical, route.handler))
    return routes


def build_openapi(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of `app`."""
    from service.schemas import ErrorResponse

    entries = []
    for method, path, handler in _documented_routes(app):
        op = _OPERATIONS.get(handler) or Operation(
            summary=(handler.__doc__ or f"{method} {path}").strip().splitlines()[0],
            responses={200: None},
        )
        entries.append((method, path, handler, op))

    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (ErrorResponse, "serialization"): None
    }
    for _, _, _, op in entries:
        if op.body is not None:
            wanted[(op.body, "validation")] = None
        for target in op.responses.values():
            if isinstance(target, type) and issubclass(target, BaseModel):
                wanted[(target, "serialization")] = None
    refs, definitions = models_json_schema(list(wanted), ref_template=_REF)
    schemas: dict[str, Any] = dict(definitions.get("$defs", {}))

    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler, op in entries:
        paths.setdefault(path, {})[method.lower()] = _operation_doc(
            method, path, handler, op, refs, schemas
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": API_TITLE,
            "version": API_VERSION,
            "description": "Self-hosted DreamBooth / LoRA fine-tuning and image generation. "
            'Every error is `{"error": {"code", "message", "field"}}`.',
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "API key"}
            },
        },
    }


# ------------------------------------------------------------ 3.0 for the UI


def _downgrade_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_downgrade_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _downgrade_schema(value) for key, value in node.items()}
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            node.pop(key)
            node["nullable"] = True
            if len(rest) == 1 and "$ref" not in rest[0]:
                node.update(rest[0])
            elif len(rest) == 1:
                node["allOf"] = rest
            else:
                node[key] = rest
    if isinstance(node.get("type"), list):
        types = [t for t in node["type"] if t != "null"]
        if len(types) < len(node["type"]):
            node["nullable"] = True
        node["type"] = types[0] if len(types) == 1 else types
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if isinstance(node.get("examples"), list) and node["examples"]:
        node["example"] = node.pop("examples")[0]
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[inclusive] = node.pop(bound)
            node[bound] = True
    return node


def downgrade_to_30(document: Mapping[str, Any]) -> dict[str, Any]:
    """The same document in OpenAPI 3.0 terms (nullable, enum, boolean bounds)."""
    doc = copy.deepcopy(dict(document))
    doc["openapi"] = "3.0.3"
    doc["components"]["schemas"] = _downgrade_schema(doc["components"]["schemas"])
    for methods in doc["paths"].values():
        for op in methods.values():
            for param in op.get("parameters", []):
                param["schema"] = _downgrade_schema(param["schema"])
            for section in [op.get("requestBody", {}), *op["responses"].values()]:
                for media in section.get("content", {}).values():
                    media["schema"] = _downgrade_schema(media["schema"])
    return doc
