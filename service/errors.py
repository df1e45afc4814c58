"""The service's one exception type, turned into API.md's JSON error by a middleware."""

from __future__ import annotations


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message", "field"}}` with `status`."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


def not_found(kind: str, ident: str) -> ApiError:
    """404 for a missing resource, and equally for another tenant's resource."""
    return ApiError(404, f"{kind}_not_found", f"{kind} {ident!r} not found")
