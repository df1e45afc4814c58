"""Fixtures for the event-store contract suite.

`store_factory` is parametrised over every `EventStore` implementation; a new
backend (PostgreSQL) is added here and the whole contract runs against it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from events.store import EventStore, SQLiteEventStore

StoreFactory = Callable[[], Awaitable[EventStore]]


@pytest.fixture(params=["sqlite"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Opens stores on one database; every store opened is closed after the test."""
    opened: list[EventStore] = []

    async def factory() -> EventStore:
        store = await SQLiteEventStore.open(tmp_path / "events.db")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> EventStore:
    return await store_factory()
