"""Small helpers every handler uses: reading JSON bodies, answering with models."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NoReturn

from aiohttp import web
from pydantic import BaseModel

from service.errors import ApiError
from service.keys import TENANT


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> Any:
    """The parsed JSON body; 400 `invalid_json` when it is empty or not JSON.

    The body is read within the app's `client_max_size` (413 above it).
    NaN and Infinity, which Python's parser accepts, are refused like any
    other invalid JSON.
    """
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "invalid_json", "request body is empty; send a JSON object")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None


def respond(
    model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Answer with `model` as JSON (serialised by pydantic, as documented)."""
    return web.Response(
        text=model.model_dump_json(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def tenant_of(request: web.Request) -> str:
    """The caller's tenant (set by the auth middleware on every non-public route)."""
    return request[TENANT]
