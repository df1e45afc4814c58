"""API keys: `Authorization: Bearer <key>` → tenant.

Keys are configured in plain text or as SHA-256 digests; both are kept as
digests. The presented key is hashed once and compared with every configured
digest using `hmac.compare_digest`, without stopping at a match, so the time
taken does not tell an attacker which key (or how much of one) was right.
"""

from __future__ import annotations

import hashlib
import hmac

from events.settings import AuthSettings
from service.errors import ApiError

#: The tenant of every request when no keys are configured (the embedded demo).
DEFAULT_TENANT = "default"

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="boothd"'}


class Authenticator:
    """Maps a presented API key to its tenant."""

    def __init__(self, settings: AuthSettings) -> None:
        self._keys: list[tuple[bytes, str]] = []
        for entry in settings.keys:
            if entry.key is not None:
                self._keys.append((hashlib.sha256(entry.key.encode()).digest(), entry.tenant))
            if entry.key_sha256 is not None:
                self._keys.append((bytes.fromhex(entry.key_sha256), entry.tenant))

    @property
    def enabled(self) -> bool:
        """False when no keys are configured: auth is off."""
        return bool(self._keys)

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant of an `Authorization` header value; 401 `unauthorized` otherwise."""
        if not self.enabled:
            return DEFAULT_TENANT
        if not authorization:
            raise ApiError(
                401,
                "unauthorized",
                "missing Authorization: Bearer <key> header",
                headers=_CHALLENGE,
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "unauthorized",
                "the Authorization header must be 'Bearer <key>'",
                headers=_CHALLENGE,
            )
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        tenant: str | None = None
        for digest, key_tenant in self._keys:
            # No early exit: every key is compared on every request.
            if hmac.compare_digest(presented, digest):
                tenant = key_tenant
        if tenant is None:
            raise ApiError(401, "unauthorized", "invalid API key", headers=_CHALLENGE)
        return tenant
