"""The service's one exception type, turned into API.md's JSON error by a middleware."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message", "field"}}` with `status`.

    `extra` adds members to the error object (API.md allows more fields, e.g.
    the per-file `rejected` reasons of a refused upload); `headers` are sent
    with the answer (`WWW-Authenticate`, `Retry-After`).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.extra: dict[str, Any] = dict(extra or {})
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, dict[str, Any]]:
        return {
            "error": {"code": self.code, "message": self.message, "field": self.field, **self.extra}
        }


def not_found(kind: str, ident: str) -> ApiError:
    """404 for a missing resource, and equally for another tenant's resource."""
    return ApiError(404, f"{kind}_not_found", f"{kind} {ident!r} not found")
