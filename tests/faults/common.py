"""Shared helpers for the fault-injection tests."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

from events.projections import JOB_STREAM_PREFIX, fold
from events.projector import read_model_rows, rebuild_job_read_model
from events.store import SQLiteEventStore
from events.types import RecordedEvent

KEY = "fault-secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def gen_job(n: int) -> dict[str, Any]:
    """A small image_gen job body (no upload needed), distinct per `n`."""
    return {"type": "image_gen", "generate": [{"prompt": f"a red apple #{n}", "seed": n}]}


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite file (the backup API, WAL included)."""
    with sqlite3.connect(src) as source, sqlite3.connect(dst) as target:
        source.backup(target)
    source.close()
    target.close()


async def read_log(store: SQLiteEventStore) -> list[RecordedEvent]:
    events: list[RecordedEvent] = []
    while batch := await store.read_all(after=events[-1].position if events else 0, limit=5000):
        events.extend(batch)
    return events


async def folded_jobs(store: SQLiteEventStore) -> dict[str, Any]:
    """job id → `JobState` folded straight from the log (no projector involved)."""
    streams: dict[str, list[RecordedEvent]] = defaultdict(list)
    for recorded in await read_log(store):
        if recorded.stream_id.startswith(JOB_STREAM_PREFIX):
            streams[recorded.stream_id].append(recorded)
    out: dict[str, Any] = {}
    for stream, events in streams.items():
        state = fold(events)
        assert state is not None, f"{stream} folds to nothing"
        out[state.id] = state
    return out


async def rebuilt_rows_of_copy(db: Path, workdir: Path) -> list[tuple[Any, ...]]:
    """The read-model rows rebuilt from scratch from a copy of the log at `db`."""
    workdir.mkdir(parents=True, exist_ok=True)
    copy = workdir / "events.db"
    copy_db(db, copy)
    store = await SQLiteEventStore.open(copy, "normal")
    try:
        await rebuild_job_read_model(store)
        return await read_model_rows(store)
    finally:
        await store.close()
