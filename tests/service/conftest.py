"""Fixtures for the HTTP API tests: the real app, over loopback HTTP, on a real SQLite file.

Runners are not started (`start_runners=False`); tests that need a job to
have run append the runner's events themselves (see `helpers.finish_job`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from events.settings import Settings, parse_settings
from service.app import create_app

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]

ALICE_KEY = "alice-secret-key"
BOB_KEY = "bob-secret-key"
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
BOB = {"Authorization": f"Bearer {BOB_KEY}"}
#: Alice's key in plain text, Bob's as a SHA-256 digest: both forms of config.toml.
AUTH_KEYS = {
    "keys": [
        {"key": ALICE_KEY, "tenant": "alice"},
        {"key_sha256": hashlib.sha256(BOB_KEY.encode()).hexdigest(), "tenant": "bob"},
    ]
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings on a fresh data folder; keyword arguments override config.toml sections."""

    def make(**sections: Any) -> Settings:
        raw = {
            "storage": {"data_dir": str(tmp_path / "data"), "durability": "normal"},
            "network": {"allow_private_urls": True},
        }
        return parse_settings(_merge(raw, sections))

    return make


@pytest.fixture
def make_client(
    aiohttp_client: Callable[..., Awaitable[Client]], make_settings: Callable[..., Settings]
) -> ClientFactory:
    """Start the real app (no runners) with settings overrides, and a client for it."""

    async def make(app: web.Application | None = None, **sections: Any) -> Client:
        return await aiohttp_client(
            app or create_app(make_settings(**sections), start_runners=False)
        )

    return make


@pytest.fixture
async def app_client(make_client: ClientFactory) -> Client:
    """The app with auth off (everything belongs to tenant `default`)."""
    return await make_client()


@pytest.fixture
async def auth_client(make_client: ClientFactory) -> Client:
    """The app with two tenants: alice (`ALICE` headers) and bob (`BOB`)."""
    return await make_client(auth=AUTH_KEYS)
