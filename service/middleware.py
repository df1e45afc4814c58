"""The app's middlewares, outermost first: metrics, errors, auth.

- `metrics_middleware` counts every answer by route template and status
  (after the error middleware has turned exceptions into answers).
- `error_middleware` is the one place exceptions become API.md's JSON error:
  `ApiError` as raised, pydantic `ValidationError` as 422
  `validation_error` naming the field, aiohttp's own 404/405/413 with stable
  codes, and anything unexpected as a logged 500 `internal_error` whose
  answer says nothing about the cause.
- `auth_middleware` maps the API key to a tenant (`request[TENANT]`) on every
  route that is not public.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from pydantic import ValidationError

from service.auth import Authenticator
from service.errors import ApiError
from service.keys import METRICS, SETTINGS, TENANT
from service.openapi import is_public_route

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's own HTTP errors that clients meet, with their API codes; any other
# status gets a code made from its reason phrase.
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(error: ApiError) -> web.Response:
    """The JSON answer for `error`."""
    response = web.json_response(error.body(), status=error.status, headers=error.headers or None)
    if error.status == 413:
        # The rest of an oversized body is not wanted: do not keep the
        # connection for another request after it.
        response.force_close()
    return response


def _dotted(loc: tuple[int | str, ...]) -> str | None:
    return ".".join(str(part) for part in loc) or None


def validation_error(exc: ValidationError) -> ApiError:
    """A pydantic error as 422 `validation_error`; `field` is the first error's path.

    Validators that know the field better than pydantic's location (the
    train config's cross-field checks, which fail on the whole `train`
    object) put it in the error context as `field`; that wins.
    """
    details: list[dict[str, Any]] = []
    for err in exc.errors(include_url=False, include_input=False):
        ctx = err.get("ctx") or {}
        named = ctx.get("field")
        field = named if isinstance(named, str) else _dotted(err["loc"])
        if err["type"] == "extra_forbidden":
            message = f"unknown field {field!r}"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
            if field is not None and not message.startswith(f"{field}:"):
                message = f"{field}: {message}"
        details.append({"field": field, "message": message, "type": err["type"]})
    if not details:
        return ApiError(422, "validation_error", "invalid input")
    extra = {"errors": details} if len(details) > 1 else None
    first = details[0]
    return ApiError(422, "validation_error", str(first["message"]), first["field"], extra=extra)


def _http_error(exc: web.HTTPException) -> ApiError:
    code = _HTTP_CODES.get(exc.status) or re.sub(r"[^a-z0-9]+", "_", exc.reason.lower()).strip("_")
    message = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
    if exc.status == 404:
        message = "no such route"
    headers = {k: v for k, v in exc.headers.items() if k in (hdrs.ALLOW, hdrs.RETRY_AFTER)}
    return ApiError(exc.status, code, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into API.md's JSON error answer."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except ValidationError as exc:
        return error_response(validation_error(exc))
    except json.JSONDecodeError as exc:
        return error_response(ApiError(400, "invalid_json", f"request body is not JSON: {exc}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # 304 Not Modified and redirects are answers, not errors
        return error_response(_http_error(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away; there is no one to answer
    except Exception:
        log.exception("http.internal_error", method=request.method, path=request.path)
        return error_response(ApiError(500, "internal_error", "internal server error"))


def auth_middleware(authenticator: Authenticator) -> Middleware:
    """Require a valid API key on every non-public route and set `request[TENANT]`."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_public_route(request.match_info.route):
            request[TENANT] = authenticator.tenant_for(request.headers.get(hdrs.AUTHORIZATION))
        return await handler(request)

    return auth


def route_label(request: web.Request) -> str:
    """The route template (`/v1/jobs/{id}`), never the raw path: bounded label values."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each answer by method, route template and status."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # client closed the request (nginx's convention)
        raise
    finally:
        request.app[METRICS].observe_request(
            request.method, route_label(request), status, time.perf_counter() - started
        )


@web.middleware
async def docs_basic_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard `/docs` with HTTP basic auth when `[docs] username/password` are set."""
    docs = request.app[SETTINGS].docs
    if docs.username and docs.password and (
        request.path == "/docs" or request.path.startswith("/docs/")
    ):
        ok = False
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True)
            except ValueError:
                decoded = b""
            login, _, password = decoded.partition(b":")
            # Both compared, always: the time taken says nothing about which failed.
            user_ok = hmac.compare_digest(login, docs.username.encode())
            pass_ok = hmac.compare_digest(password, docs.password.encode())
            ok = user_ok and pass_ok
        if not ok:
            raise ApiError(
                401, "unauthorized", "the API docs need a username and password",
                headers={"WWW-Authenticate": 'Basic realm="boothd docs"'},
            )
    return await handler(request)
